"""BRISQUE (Mittal, Moorthy & Bovik 2012), a no-reference quality score (lower = better) for generated images.

Statistics of mean-subtracted contrast-normalised (MSCN) luminance and of products of neighbouring MSCN
coefficients, at two scales, mapped to a score by an SVR. We compute the 36 features ourselves (numpy/scipy, no
OpenCV) with the conventions of the `brisque` PyPI package, and score them with the SVR + feature scaling that
package ships (read from its data files; the package itself is never imported, because its module needs OpenCV
just for one resize). docs/evaluation.md says where the numbers can differ from the package's.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

from ..errors import InputError, ModelError
from .metrics import gaussian_window

BRISQUE_WINDOW, BRISQUE_SIGMA, BRISQUE_C = 7, 7 / 6, 1 / 255
LUMA = (0.2125, 0.7154, 0.0721)   # the RGB -> grey weights the shipped model was trained with


def brisque_model_dir() -> Path:
    spec = importlib.util.find_spec("brisque")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("BRISQUE needs the 'brisque' package (pip install brisque --no-deps) for its SVR model")
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    if not (folder / "svm.txt").is_file() or not (folder / "normalize.pickle").is_file():
        raise ModelError(f"BRISQUE model files svm.txt / normalize.pickle missing in {folder}")
    return folder


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 (or [0, 1] float) H x W x 3 -> float64 luminance in [0, 1]."""
    rgb = np.asarray(rgb)
    x = rgb.astype(np.float64) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
    return x[..., :3] @ np.array(LUMA)


def half_scale(gray: np.ndarray) -> np.ndarray:
    """Bicubic downscale by 2 (PIL's float image path; OpenCV's INTER_CUBIC gives slightly different values)."""
    from PIL import Image

    h, w = gray.shape
    im = Image.fromarray(gray.astype(np.float32), mode="F")
    return np.asarray(im.resize((max(1, round(w / 2)), max(1, round(h / 2))), Image.BICUBIC), dtype=np.float64)


def mscn(gray: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients under a 7x7 Gaussian (zero-padded 'same' filtering)."""
    from scipy.signal import convolve2d

    kernel = gaussian_window(BRISQUE_WINDOW, BRISQUE_SIGMA).numpy()
    mu = convolve2d(gray, kernel, mode="same")
    sigma = np.sqrt(np.abs(mu * mu - convolve2d(gray * gray, kernel, mode="same")))
    return (gray - mu) / (sigma + BRISQUE_C)


def _ggd_ratio(alpha: float) -> float:
    from scipy.special import gammaln

    return float(np.exp(2 * gammaln(2 / alpha) - gammaln(1 / alpha) - gammaln(3 / alpha)))


def aggd_fit(x: np.ndarray) -> tuple[float, float, float, float]:
    """Moment-matching fit of an asymmetric generalised Gaussian: (shape alpha, mean, sigma_left, sigma_right)."""
    from scipy.optimize import brentq
    from scipy.special import gammaln

    x = np.asarray(x, dtype=np.float64).ravel()
    left, right = x[x < 0], x[x >= 0]
    sl = math.sqrt(np.mean(left ** 2)) if left.size else 0.0
    sr = math.sqrt(np.mean(right ** 2)) if right.size else 0.0
    ms = np.mean(x ** 2)
    if ms == 0 or sr == 0:
        return 10.0, 0.0, sl, sr               # flat image: no texture to fit
    gamma = sl / sr
    r_hat = np.mean(np.abs(x)) ** 2 / ms
    big_r = r_hat * (gamma ** 3 + 1) * (gamma + 1) / (gamma ** 2 + 1) ** 2
    lo, hi = 0.05, 20.0
    big_r = min(max(big_r, _ggd_ratio(lo) + 1e-12), _ggd_ratio(hi) - 1e-12)
    alpha = brentq(lambda a: _ggd_ratio(a) - big_r, lo, hi, xtol=1e-10)
    mean = (sr - sl) * math.exp(gammaln(2 / alpha) - 0.5 * (gammaln(1 / alpha) + gammaln(3 / alpha)))
    return alpha, mean, sl, sr


def brisque_features(gray: np.ndarray) -> np.ndarray:
    """The 18 features of one scale: MSCN (shape, variance) then, for the horizontal, vertical and two diagonal
    neighbour products, (shape, mean, left variance, right variance)."""
    m = mscn(gray)
    alpha, _, sl, sr = aggd_fit(m)
    feats = [alpha, (sl ** 2 + sr ** 2) / 2]
    for prod in (m[:, :-1] * m[:, 1:], m[:-1, :] * m[1:, :], m[:-1, :-1] * m[1:, 1:], m[1:, :-1] * m[:-1, 1:]):
        a, mean, sl, sr = aggd_fit(prod)
        feats += [a, mean, sl ** 2, sr ** 2]
    return np.array(feats, dtype=np.float64)


class BrisqueScorer:
    """Loads the shipped SVR once; ``scorer(rgb) -> float`` (lower = better quality; about 0-100)."""

    def __init__(self, model_dir: Path | None = None):
        import pickle

        from libsvm import svmutil

        folder = Path(model_dir) if model_dir else brisque_model_dir()
        self.model = svmutil.svm_load_model(str(folder / "svm.txt"))
        with open(folder / "normalize.pickle", "rb") as f:
            params = pickle.load(f)
        self.lo = np.array(params["min_"], dtype=np.float64)
        self.hi = np.array(params["max_"], dtype=np.float64)

    def features(self, rgb: np.ndarray) -> np.ndarray:
        gray = to_gray(rgb)
        if min(gray.shape) < 16:
            raise InputError(f"BRISQUE: image of {gray.shape} px is too small (at least 16 x 16)")
        return np.concatenate([brisque_features(gray), brisque_features(half_scale(gray))])

    def score_features(self, feats: np.ndarray) -> float:
        from libsvm import svmutil

        scaled = -1 + 2 * (feats - self.lo) / (self.hi - self.lo)
        nodes, _ = svmutil.gen_svm_nodearray([float(v) for v in scaled], isKernel=False)
        estimates = (svmutil.c_double * 1)()
        return float(svmutil.libsvm.svm_predict_probability(self.model, nodes, estimates))

    def __call__(self, rgb: np.ndarray) -> float:
        return self.score_features(self.features(rgb))
