"""The numbers of an identity-leak evaluation, as small pure functions over tensors (docs/evaluation.md):

* **FSR** (face-detection success rate): the share of images in which the detector finds a face. A generator
  that stops drawing faces "protects" trivially, so FSR is reported beside every similarity.
* **ISM** (identity-score matching): the mean cosine similarity between each *detected* face's embedding and
  the user's prototype, the normalised mean embedding of the clean photos. Images without a face are left out
  of ISM (they are counted by FSR). One ISM per evaluation recogniser; lower = less identity leaks.
* **Retrieval**: rank the user among distractor identities of a gallery folder (top-k hit rate, mean rank).
* **PSNR / SSIM** of protected photos X' against the clean X0: how visible the perturbation is.

Match decisions (which score, which threshold) are the judges' business: evaluation/judges.py.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

# ----------------------------------------------------------------------------------------------- identity metrics


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


def mean_finite(values) -> Optional[float]:
    """The mean of the finite values (None and inf left out), or None when there are none."""
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(values)) if values else None


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


def fidelity_report(protected: torch.Tensor, original: torch.Tensor) -> dict:
    """PSNR / SSIM of X' against X0, per image and averaged (an identical image has PSNR inf, left out of the
    mean and counted in ``identical``)."""
    p, s = psnr(protected, original), ssim(protected, original)
    return {"psnr": mean_finite(p.tolist()), "ssim": float(s.mean()), "identical": int(torch.isinf(p).sum()),
            "psnr_per_image": [None if math.isinf(v) else float(v) for v in p.tolist()],
            "ssim_per_image": [float(v) for v in s.tolist()]}
