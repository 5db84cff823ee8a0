"""Identity-leak evaluation: does a generated (or protected) image still look like the user to a face recogniser?

Metrics, as in the IDDM paper's tables:

* **FSR** (face-detection success rate): the share of images in which the detector finds a face. A generator
  that stops drawing faces "protects" trivially, so FSR is reported beside every similarity.
* **ISM** (identity-score matching): the mean cosine similarity between each *detected* face's embedding and
  the user's prototype, the normalised mean embedding of the clean photos. Images without a face are left out
  of ISM (they are counted by FSR). One ISM per evaluation recogniser; lower = less identity leaks.
* **Retrieval**: rank the user among distractor identities of a gallery folder (top-k hit rate, mean rank).
* **PSNR / SSIM** of protected photos X' against the clean X0: how visible the perturbation is.
* **BRISQUE**: a no-reference quality score (lower = better) for generated images.

The evaluation recogniser must be *held out*: scoring with a recogniser the perturbation was optimised against
measures the attack, not the leak. :func:`evaluate` warns loudly when the two sets overlap.

Everything here is a small pure function over tensors/arrays except :func:`evaluate`, which strings them
together; nothing writes files or logs photo names.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, ModelError

# ----------------------------------------------------------------------------------------------- identity metrics

# Cosine similarity at or above which a recogniser "still recognises the user": each recogniser's 1 %-false-accept
# point on the congress corpus (1,251 photos with a face, 1,115 people: 136 same-person pairs, 781,739 different;
# `python -m iddm_core.bench verify --faces ../shared/faces/congress`, docs/evaluation.md). At these points dlib
# accepts 100 % of the same-person pairs, faceres 98 %, mobileface 94 %. dlib's own rule, Euclidean distance of its
# raw descriptors <= 0.6, sits at the same place (its 1 %-false-accept distance there is 0.610): the cosine is its
# stand-in on the normalised embeddings the pipeline uses. ArcFace-family models (arcface, glintr100, irse50,
# ir152, mobileface_zoo, facenet) are not installable here and keep the common 0.4.
MATCH_THRESHOLDS = {"dlib": 0.911, "faceres": 0.615, "mobileface": 0.379}
DEFAULT_MATCH_THRESHOLD = 0.4


def match_threshold(name: str) -> float:
    return MATCH_THRESHOLDS.get(name, DEFAULT_MATCH_THRESHOLD)


def match_rate(similarities: Sequence[Optional[float]], threshold: float) -> Optional[float]:
    """Share of detected faces the recogniser would still accept as the user (None if no face at all)."""
    values = [s for s in similarities if s is not None]
    return float(sum(s >= threshold for s in values)) / len(values) if values else None



def face_success_rate(found: Sequence[bool]) -> float:
    """Share of images with a detected face (0.0 for an empty list, so a run that made nothing never 'passes')."""
    found = list(found)
    return float(sum(bool(f) for f in found)) / len(found) if found else 0.0


def prototype(embeddings: torch.Tensor) -> torch.Tensor:
    """The identity prototype: the L2-normalised mean of (already normalised) embeddings ``[N, D] -> [D]``."""
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise InputError("prototype: need at least one reference embedding (no face found in the reference photos?)")
    return F.normalize(embeddings.float().mean(0), dim=0)


def cosine_to(embeddings: torch.Tensor, proto: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row of ``embeddings [N, D]`` to ``proto [D]`` (inputs are re-normalised)."""
    return F.normalize(embeddings.float(), dim=-1) @ F.normalize(proto.float(), dim=0)


def identity_score(similarities: Sequence[Optional[float]]) -> Optional[float]:
    """ISM: mean of the per-image similarities, skipping images without a face (None); None if no face at all."""
    values = [float(s) for s in similarities if s is not None]
    return float(np.mean(values)) if values else None


def retrieval_ranks(probes: torch.Tensor, identity_protos: torch.Tensor, target: int) -> list[int]:
    """1-based rank of identity ``target`` for each probe when the identities (rows of ``identity_protos``)
    are sorted by cosine similarity to the probe, most similar first. Ties count against the target."""
    sims = F.normalize(probes.float(), dim=-1) @ F.normalize(identity_protos.float(), dim=-1).T   # [P, I]
    target_sim = sims[:, target:target + 1]
    return [int(r) for r in (sims >= target_sim).sum(1)]   # includes the target itself


def top_k_rate(ranks: Sequence[int], k: int) -> Optional[float]:
    """Share of probes whose true identity is within the first ``k`` (None when there are no probes)."""
    ranks = list(ranks)
    return float(sum(r <= k for r in ranks)) / len(ranks) if ranks else None


# ------------------------------------------------------------------------------------------------ gallery folders

_TRAILING_INDEX = re.compile(r"[\s_\-.]*\d+$")


def identity_from_stem(stem: str) -> str:
    """Identity of a file in a flat gallery: the file stem without a trailing index ("obama2", "obama_03" ->
    "obama"), lower-cased. A stem that is all digits keeps its digits."""
    name = _TRAILING_INDEX.sub("", stem).strip().lower()
    return name or stem.lower()


def gallery_layout(folder) -> dict[str, list[Path]]:
    """Identity -> image files of a gallery folder.

    Two layouts: sub-folders per identity (``gallery/<identity>/*.jpg``; used when the folder has any
    sub-folder with images) or a flat folder whose file names carry the identity (see :func:`identity_from_stem`).
    """
    from ..images import IMAGE_EXTENSIONS, list_images

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"gallery folder not found: {folder}")
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    layout: dict[str, list[Path]] = {}
    for d in subdirs:
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            layout[d.name] = files
    if not layout:
        for p in list_images(folder):
            layout.setdefault(identity_from_stem(p.stem), []).append(p)
    return layout


# --------------------------------------------------------------------------------------------- fidelity (X' vs X0)


def _check_pair(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise InputError(f"{what}: expected two [N, C, H, W] batches of the same shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, ``10 log10(range^2 / MSE)``; +inf for identical images."""
    _check_pair(x, y, "psnr")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    out = 10 * torch.log10(data_range ** 2 / mse)
    return torch.where(mse == 0, torch.full_like(mse, math.inf), out)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian window (the 11x11, sigma 1.5 window of Wang et al. 2004 by default)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): local statistics under a Gaussian window, only where the window fits
    inside the image ("valid"), averaged over positions and channels. 1.0 for identical images."""
    _check_pair(x, y, "ssim")
    if min(x.shape[-2:]) < size:
        raise InputError(f"ssim: images of {tuple(x.shape[-2:])} px are smaller than the {size}x{size} window")
    c = x.shape[1]
    w = gaussian_window(size, sigma).to(x.device)[None, None].expand(c, 1, size, size)
    x, y = x.double(), y.double()
    blur = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cov = blur(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


# ------------------------------------------------------------------------------------------------------ BRISQUE
# BRISQUE (Mittal, Moorthy & Bovik 2012): statistics of mean-subtracted contrast-normalised (MSCN) luminance and
# of products of neighbouring MSCN coefficients, at two scales, mapped to a score by an SVR. We compute the 36
# features ourselves (numpy/scipy, no OpenCV) with the conventions of the `brisque` PyPI package, and score them
# with the SVR + feature scaling that package ships (read from its data files; the package itself is never
# imported, because its module needs OpenCV just for one resize).

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


# ------------------------------------------------------------------------------------------- faces -> embeddings


@dataclass
class FaceScan:
    """Which images of a batch have a face, and the landmarks [M, 5, 2] of those that do (in image pixels)."""

    found: list[bool]
    landmarks: torch.Tensor

    @property
    def index(self) -> list[int]:
        return [i for i, f in enumerate(self.found) if f]


def _uint8(images: torch.Tensor) -> list[np.ndarray]:
    return [(x.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
            for x in images]


def scan_faces(images: torch.Tensor, detector) -> FaceScan:
    """Detect the largest face of every image ``[N, 3, H, W]`` in [0, 1] (the detector's first face)."""
    found, lms = [], []
    for rgb in _uint8(images):
        faces = detector.detect(rgb)
        found.append(bool(faces))
        if faces:
            lms.append(torch.as_tensor(faces[0].points()))
    landmarks = torch.stack(lms) if lms else torch.zeros(0, 5, 2)
    return FaceScan(found, landmarks)


@torch.inference_mode()
def embed(recognizer, images: torch.Tensor, landmarks: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Normalised embeddings ``[N, D]`` (float32, CPU) computed in chunks on the recogniser's device."""
    if images.shape[0] == 0:
        return torch.zeros(0, 0)
    device = next(itertools.chain(recognizer.parameters(), recognizer.buffers())).device   # TF.js: buffers only
    out = [recognizer.embed(images[i:i + chunk].to(device).float(), landmarks[i:i + chunk].to(device).float())
           .float().cpu() for i in range(0, images.shape[0], chunk)]
    return torch.cat(out)


def embed_photos(recognizer, photos: Iterable[np.ndarray], detector) -> torch.Tensor:
    """Embeddings of the largest face of each uint8 photo (photos without a face are skipped)."""
    from ..images import to_tensor

    rows = []
    for rgb in photos:
        faces = detector.detect(rgb)
        if faces:
            lm = torch.as_tensor(faces[0].points())[None]
            rows.append(embed(recognizer, to_tensor(rgb)[None], lm))
    return torch.cat(rows) if rows else torch.zeros(0, 0)


# ----------------------------------------------------------------------------------------------- orchestration


def recognizer_name(spec) -> str:
    """Registry name of a recogniser given as a Recognizer object, a RecognizerSpec or a 'name[:path]' string."""
    from ..face.registry import canonical_name

    if isinstance(spec, torch.nn.Module):
        return str(getattr(spec, "name", type(spec).__name__))
    if hasattr(spec, "name") and not isinstance(spec, str):
        return spec.name
    return canonical_name(str(spec).partition(":")[0])


def held_out_warnings(eval_names: Sequence[str], surrogate_names: Sequence[str]) -> list[str]:
    """One message per evaluation recogniser that was also a surrogate (its scores are not a fair leak test)."""
    overlap = [n for n in eval_names if n in set(surrogate_names)]
    return [f"evaluation recogniser {n!r} was also an attack surrogate: its similarity measures the attack, not "
            f"the identity leak; evaluate with a held-out recogniser" for n in overlap]


AUTO = "auto"      # eval_recognizers value: every installed recogniser that was not a surrogate of the run


@dataclass
class Judges:
    """Which recognisers judge a run. ``tokens``: registry tokens ("name" or "name:PATH") or ready modules;
    ``held_out``: no judge was a surrogate (False also when the surrogates are unknown); ``note``: one line naming
    the judges for a report or the console (names only, never paths); ``warning``: set when "auto" found no
    held-out recogniser and fell back to the surrogates."""

    tokens: list
    names: list[str]
    held_out: bool
    note: str
    warning: Optional[str] = None


def _token(spec) -> str:
    return spec.name if spec.path is None else f"{spec.name}:{spec.path}"


def choose_judges(requested=AUTO, surrogates: Sequence = (), search_dirs: Sequence[str] | None = None) -> Judges:
    """The evaluation recognisers of a run.

    ``requested`` = ``"auto"`` (or None/empty): every *installed* recogniser (``face.registry.discover``) that is
    not among ``surrogates``, so the judge is held out from the attack by default. When none is installed besides
    the surrogates, the surrogates judge (dlib is always installed) and the note says loudly that the scores then
    measure the attack, not the leak. Anything else (names, "name:PATH" strings, specs or modules, or a comma
    separated string of tokens) is used as given.
    """
    from ..face.registry import discover

    surrogate_names = [recognizer_name(s) for s in surrogates]
    if requested is None or (isinstance(requested, str) and requested.strip().lower() in ("", AUTO)):
        installed = [s for s in discover(None if search_dirs is None else list(search_dirs)) if s.available]
        held = [s for s in installed if s.name not in surrogate_names]
        if not surrogate_names:
            names = [s.name for s in installed]
            return Judges([_token(s) for s in installed], names, False,
                          f"judged by every installed recogniser ({', '.join(names)}); the run's surrogates were "
                          "not given, so whether they are held out is unknown")
        if held:
            names = [s.name for s in held]
            return Judges([_token(s) for s in held], names, True,
                          f"judged by held-out recognisers: {', '.join(names)} (surrogates of the run: "
                          f"{', '.join(surrogate_names)})")
        fallback = [s for s in installed if s.name in surrogate_names] or [s for s in installed if s.name == "dlib"]
        names = [s.name for s in fallback]
        message = (f"no held-out recogniser is installed: judged by {', '.join(names)}, which the protection was "
                   "optimised against, so the scores measure the attack, not the identity leak; install another "
                   "recogniser (e.g. faceres, see `python -m iddm_core face-models`)")
        return Judges([_token(s) for s in fallback], names, False, message, warning=message)
    items = [t.strip() for t in requested.split(",") if t.strip()] if isinstance(requested, str) else list(requested)
    names = [recognizer_name(r) for r in items]
    overlap = [n for n in names if n in surrogate_names]
    held_out = bool(surrogate_names) and not overlap
    note = (f"judged by {', '.join(names)}" + (" (held out from the surrogates)" if held_out else "")
            + ("" if surrogate_names else "; the run's surrogates were not given"))
    return Judges(items, names, held_out, note)


def load_eval_recognizers(items, device) -> list:
    """Recogniser modules from names / 'name:path' strings / specs / ready modules (modules are kept as given)."""
    from ..face.registry import RecognizerSpec, load_recognizer, parse_surrogates

    out = []
    for item in items:
        if isinstance(item, torch.nn.Module):
            out.append(item.to(device).eval())
        elif isinstance(item, RecognizerSpec):
            out.append(load_recognizer(item, device))
        else:
            out.extend(load_recognizer(s, device) for s in parse_surrogates(str(item)))
    return out


def _reference_batch(refs) -> tuple[torch.Tensor, torch.Tensor]:
    """All clean photos of a PrivateRefs (Xc and X0: both are the user's clean identity), or an (images,
    landmarks) pair."""
    if hasattr(refs, "images") and hasattr(refs, "landmarks"):
        return refs.images, refs.landmarks
    images, landmarks = refs
    return images, landmarks


def _mean(values) -> Optional[float]:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(values)) if values else None


def fidelity_report(protected: torch.Tensor, original: torch.Tensor) -> dict:
    """PSNR / SSIM of X' against X0, per image and averaged (an identical image has PSNR inf, left out of the
    mean and counted in ``identical``)."""
    p, s = psnr(protected, original), ssim(protected, original)
    return {"psnr": _mean(p.tolist()), "ssim": float(s.mean()), "identical": int(torch.isinf(p).sum()),
            "psnr_per_image": [None if math.isinf(v) else float(v) for v in p.tolist()],
            "ssim_per_image": [float(v) for v in s.tolist()]}


# Generated samples up to this size are judged by dlib's CNN (MMOD) detector, larger ones by HOG (see
# face.detect.DlibCNNDetector: HOG misses the small, smooth faces of the 128 px demo model's samples).
SMALL_SAMPLE_PX = 256


def sample_detector_name(size: int) -> str:
    """The detector that finds faces in generated samples of ``size`` px: ``dlib-cnn`` up to
    :data:`SMALL_SAMPLE_PX`, else ``dlib`` (HOG; the CNN's cost grows with the pixel count)."""
    return "dlib-cnn" if size <= SMALL_SAMPLE_PX else "dlib"


def evaluate(images: torch.Tensor, refs, eval_recognizers=AUTO, surrogates: Sequence = (),
             detector=None, gallery=None, top_k: Sequence[int] = (1, 5), protected: torch.Tensor | None = None,
             original: torch.Tensor | None = None, quality: bool = True, device=None, labels: Sequence[str] = (),
             callback=None, search_dirs: Sequence[str] | None = None) -> dict:
    """Score a batch of images ``[N, 3, H, W]`` in [0, 1] against the user's clean photos ``refs``.

    ``eval_recognizers``: ``"auto"`` (default: every installed recogniser that is not a surrogate, see
    :func:`choose_judges`), or names ("dlib", "arcface:PATH.onnx", ...) / Recognizer modules; ``surrogates``: the
    recognisers the protection was optimised against (names), used to pick held-out judges and to warn.
    ``gallery``: a folder of distractor identities (see :func:`gallery_layout`); the user (prototype of ``refs``)
    is added as identity ``"user"`` and retrieval reports how often a generated face ranks the user first.
    ``protected``/``original``: X' and X0 for PSNR/SSIM. ``labels``: per-image labels (e.g. prompt index)
    copied into the result. ``search_dirs``: model folders for "auto" (default ``$IDDM_MODEL_DIRS``).
    ``detector``: finds the faces of ``images`` and of the gallery photos; default: dlib's HOG for the photos and
    :func:`sample_detector_name` of the images' size for the images. Returns a JSON-ready dict (no file names or paths in it).
    """
    from ..events import Emitter

    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise InputError(f"images: expected a non-empty [N, 3, H, W] batch, got {tuple(images.shape)}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    judges = choose_judges(eval_recognizers, surrogates, search_dirs)
    eval_names = judges.names
    surrogate_names = [recognizer_name(s) for s in surrogates]
    messages = [judges.warning] if judges.warning else held_out_warnings(eval_names, surrogate_names)
    for m in messages:
        warnings.warn(m, UserWarning, stacklevel=2)
    from ..face.detect import get_detector

    sample_detector = detector or get_detector(sample_detector_name(images.shape[-1]))
    detector = detector or get_detector("dlib")
    recognizers = load_eval_recognizers(judges.tokens, device)
    emit = Emitter(callback, total=len(recognizers) + 2)

    scan = scan_faces(images, sample_detector)
    emit("eval", message="faces detected")
    ref_images, ref_landmarks = _reference_batch(refs)
    gallery_layout_ = gallery_layout(gallery) if gallery is not None else None
    result = {"n_images": int(images.shape[0]), "faces_found": scan.found, "fsr": face_success_rate(scan.found),
              "eval_recognizers": eval_names, "surrogates": surrogate_names, "held_out": judges.held_out,
              "judges": judges.note, "recognizers": {}, "warnings": messages}
    if labels:
        result["labels"] = list(labels)
    for rec in recognizers:
        proto = prototype(embed(rec, ref_images, ref_landmarks))
        emb = embed(rec, images[scan.index], scan.landmarks)
        sims: list[Optional[float]] = [None] * len(scan.found)
        for i, s in zip(scan.index, cosine_to(emb, proto).tolist() if emb.numel() else []):
            sims[i] = float(s)
        entry = {"ism": identity_score(sims), "similarity": sims, "threshold": match_threshold(rec.name),
                 "match_rate": match_rate(sims, match_threshold(rec.name))}
        if gallery_layout_ is not None:
            entry["retrieval"] = _retrieval(rec, proto, emb, gallery_layout_, detector, top_k)
        result["recognizers"][rec.name] = entry
        emit("eval", similarity={rec.name: entry["ism"]} if entry["ism"] is not None else {})
    if quality:
        scorer = BrisqueScorer()
        scores = [scorer(rgb) for rgb in _uint8(images)]
        result["brisque"] = _mean(scores)
        result["brisque_per_image"] = scores
    if protected is not None and original is not None:
        result["fidelity"] = fidelity_report(protected.cpu(), original.cpu())
    emit("eval", message="done")
    return result


def _retrieval(rec, user_proto: torch.Tensor, probes: torch.Tensor, layout: dict, detector, top_k) -> dict:
    from ..images import load_rgb

    names, protos = ["user"], [user_proto]
    for identity, files in layout.items():
        emb = embed_photos(rec, (load_rgb(p) for p in files), detector)
        if emb.numel():
            names.append(identity)
            protos.append(prototype(emb))
    ranks = retrieval_ranks(probes, torch.stack(protos), 0) if probes.numel() else []
    out = {"identities": len(names), "mean_rank": _mean(ranks)}
    out.update({f"top{k}": top_k_rate(ranks, k) for k in top_k})
    return out
