"""The perturbation budget of a pixel attack: an L_inf box, and optionally a PSNR floor on one or more regions.

Sign-PGD under |delta|_inf <= eta fills nearly every pixel it touches with +-eta: at eta 0.08 the face box ends at
about 23 dB PSNR, and lowering eta until the box reaches 30 dB (eta ~0.04) spends the budget evenly on pixels that
matter to a recogniser and pixels that do not. A PSNR floor is an L2 ball instead: the mean squared change over
the region is at most 10^(-psnr/10), and normalised-gradient steps (L2-PGD) put it where the gradient is large.
Both constraints hold together. The floor can hold on several disjoint regions at once, each its own ball (the
face attack: the face box, and the rest of the photo), so a photo is never at a lower PSNR in any of them; pixels
in no region are not changed.

Projection onto the intersection is done in two moves that keep every constraint (a feasible point, not the
nearest one): clamp to the L_inf box, then scale each region's part of the perturbation down into its own ball.
Scaling keeps the box, and the final clip to [0, 1] only shrinks |delta| (x0 is in [0, 1]), so the result
satisfies all of them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import InputError

MIN_PSNR, MAX_PSNR = 10.0, 80.0
DEFAULT_PSNR = 30.0     # face-attack and bench transfer (0 there: the L_inf budget alone); IDDM: off unless asked


def psnr_option(value: Optional[float], alpha: Optional[float], flag: str = "--psnr") -> Optional[float]:
    """A command line's PSNR floor: 0 -> None (off); checked; an explicit sign step (``alpha``) needs it off,
    since with a floor the steps are L2 steps of 2.5 radius / steps."""
    value = None if value is None or value == 0 else float(value)
    check_psnr(value)
    if value is not None and alpha:
        raise InputError(f"--alpha is the L_inf sign step; with {flag} {value:g} the steps are L2 steps (2.5 x the "
                         f"ball's radius / steps): leave --alpha out, or pass {flag} 0 for the L_inf attack")
    return value


def check_psnr(psnr: Optional[float]) -> None:
    if psnr is not None and not MIN_PSNR <= psnr <= MAX_PSNR:
        raise InputError(f"psnr must be in [{MIN_PSNR:g}, {MAX_PSNR:g}] dB (or unset: L_inf budget only), got {psnr}")


def mse_limit(psnr: float) -> float:
    """The largest mean squared change (pixel range 1) that keeps PSNR >= ``psnr`` dB."""
    return 10.0 ** (-psnr / 10.0)


def box_mask(boxes: Sequence, height: int, width: int) -> torch.Tensor:
    """[N, 1, H, W] mask, 1 inside each detector box (x0, y0, x1, y1; pixels, clipped to the image), 0 outside."""
    mask = torch.zeros(len(boxes), 1, height, width)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        r0, r1 = max(0, int(round(y0))), min(height, int(round(y1)))
        c0, c1 = max(0, int(round(x0))), min(width, int(round(x1)))
        if r1 <= r0 or c1 <= c0:
            raise InputError(f"face box {i} ({x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}) lies outside the "
                             f"{width} x {height} image")
        mask[i, :, r0:r1, c0:c1] = 1.0
    return mask


def box_regions(boxes: Sequence, height: int, width: int) -> torch.Tensor:
    """[N, 2, H, W]: each detector box and the rest of its image, two regions with one PSNR floor each."""
    inside = box_mask(boxes, height, width)
    return torch.cat([inside, 1.0 - inside], dim=1)


def l2_radius(regions: torch.Tensor, channels: int, psnr: float) -> torch.Tensor:
    """[N, R] L2 radius of each region's ball ([N, R, H, W] masks): sqrt(MSE limit x values in the region)."""
    count = regions.flatten(2).sum(2) * channels
    return (count * mse_limit(psnr)).sqrt()


def _norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


@torch.no_grad()
def project(delta: torch.Tensor, eta: float, radius: Optional[torch.Tensor] = None,
            regions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``delta`` [N, C, H, W] kept to the regions ([N, R, H, W] disjoint masks; default one region, the whole
    image), clamped to |delta|_inf <= eta, then each region's part scaled into its ball (``radius`` [N, R])."""
    if regions is not None:
        delta = delta * regions.sum(1, keepdim=True).clamp(max=1.0)
    delta = delta.clamp(-eta, eta)
    if radius is None:
        return delta
    if regions is None:
        return delta * _shrink(delta, radius.view(-1))
    out = torch.zeros_like(delta)
    for r in range(regions.shape[1]):
        part = delta * regions[:, r:r + 1]
        out = out + part * _shrink(part, radius[:, r])
    return out


def _shrink(part: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Per-image factor <= 1 that brings ``part`` into the L2 ball of ``radius`` [N]."""
    return (radius.view(-1, 1, 1, 1) / _norm(part).clamp_min(1e-12)).clamp(max=1.0)


@torch.no_grad()
def l2_pgd_step(x0: torch.Tensor, x: torch.Tensor, direction: torch.Tensor, step: torch.Tensor, eta: float,
                radius: torch.Tensor, regions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One descent step of L2 length ``step`` [N] along ``direction`` (inside the regions, default the whole
    image; normalised per image), projected onto the budget (:func:`project`) and clipped to [0, 1]."""
    d = direction if regions is None else direction * regions.sum(1, keepdim=True).clamp(max=1.0)
    d = d / _norm(d).clamp_min(1e-12)
    stepped = x - step.view(-1, 1, 1, 1) * d
    return (x0 + project(stepped - x0, eta, radius, regions)).clamp(0.0, 1.0)
