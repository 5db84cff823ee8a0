"""Transfer options of the identity attack: what helps a perturbation made against a few face recognisers also
fool recognisers it never saw.

Plain sign-PGD fits its surrogates too closely: the very pixels their crops sample, the alignment the clean photo's
landmarks give, a gradient whose sign flips from step to step. A recogniser that detects the face again on the
protected photo (its own landmarks, its own crop) sees another input than the one the attack was made for. Each
option below is off by default; each is used by the face attack (:func:`~.attack.face_attack`) and by IDDM's
Stage II (``PGDConfig.transfer``):

- ``momentum`` (MI-FGSM, Dong et al. 2018): steps follow the sign of a decayed sum of L1-normalised gradients.
- ``diversity`` (DI-FGSM, Xie et al. 2019, here on the aligned crop): each crop, with this probability, is
  rescaled, shifted, slightly rotated and mirrored at random before its recogniser sees it.
- ``jitter`` (expectation over the alignment): the landmarks each crop is cut from get Gaussian noise with this
  share of the eye distance as its standard deviation, the way another detector (or the same detector on the
  perturbed photo) would place them.
- ``smooth`` (TI-FGSM, Dong et al. 2019): the gradient is blurred by a Gaussian of this standard deviation (photo
  pixels) before its sign is taken.
- ``samples``: random draws of diversity and jitter per step; the loss is averaged over them (expectation over
  transformation).

The random draws come from one generator per image (IDDM's per-image streams), drawn only when an option needs
them, so with every option off no random number is drawn and X' is what it was without this module.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional, Sequence

from ..errors import InputError

if TYPE_CHECKING:          # torch is imported where it is used: the CLIs read the defaults below without it
    import torch

# Ranges of the crop diversity, each drawn uniformly: zoom 1 +- 10 %, shift +- 5 % of the crop side in x and y,
# rotation +- 10 degrees, mirrored half of the time. Mild on purpose: the recogniser must still see a face it
# recognises, otherwise the gradient stops telling how to hide this face.
CROP_ZOOM, CROP_SHIFT, CROP_DEGREES = 0.10, 0.05, 10.0
CROP_PARAMS = 6          # uniform numbers per crop: apply?, zoom, shift x, shift y, angle, mirror?


@dataclass(frozen=True)
class TransferOptions:
    momentum: float = 0.0    # MI-FGSM decay mu (0: plain sign-PGD)
    diversity: float = 0.0   # probability that an aligned crop is randomly transformed (0: never)
    jitter: float = 0.0      # landmark noise, standard deviation as a share of the eye distance (0: none)
    smooth: float = 0.0      # Gaussian blur of the gradient, standard deviation in pixels (0: none)
    samples: int = 1         # random draws per step, losses averaged

    def validate(self) -> "TransferOptions":
        if not 0.0 <= self.momentum <= 1.0:
            raise InputError(f"momentum={self.momentum!r} must be in [0, 1] (MI-FGSM's decay; 0 = off, 1.0 usual)")
        if not 0.0 <= self.diversity <= 1.0:
            raise InputError(f"diversity={self.diversity!r} must be a probability in [0, 1] (0 = off)")
        if not 0.0 <= self.jitter <= 0.5:
            raise InputError(f"jitter={self.jitter!r} must be in [0, 0.5] (share of the eye distance; 0 = off)")
        if not 0.0 <= self.smooth <= 20.0:
            raise InputError(f"smooth={self.smooth!r} must be in [0, 20] (pixels; 0 = off)")
        if not isinstance(self.samples, int) or not 1 <= self.samples <= 64:
            raise InputError(f"samples={self.samples!r} must be an integer in [1, 64]")
        return self

    @property
    def random(self) -> bool:
        """Whether a step draws random numbers (crop diversity or landmark jitter)."""
        return self.diversity > 0 or self.jitter > 0

    @property
    def active(self) -> bool:
        return self.random or self.momentum > 0 or self.smooth > 0

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        """One line for reports, e.g. "momentum 1, diversity 0.5, jitter 0.03, 4 samples" ("none" when all off)."""
        parts = [f"{name} {getattr(self, name):g}" for name in ("momentum", "diversity", "jitter", "smooth")
                 if getattr(self, name)]
        if self.random and self.samples > 1:
            parts.append(f"{self.samples} samples")
        return ", ".join(parts) or "none"


# The face attack's defaults (``face-attack``, ``bench transfer``; IDDM keeps every option off), chosen by
# ``bench transfer`` on the first 30 congress identities with faceres held out (docs/evaluation.md, "Transfer").
# Under the L_inf budget alone momentum and crop diversity took faceres from 0.527 to 0.392, at face-box PSNR 23 dB.
# Under a 30 dB PSNR floor (face/budget.py) momentum hurt (face box only: 0.502 with, 0.481 without, 50 steps,
# diversity 1, 4 draws) and smoothing hurt (0.531); with the floor on the face box and on the rest of the photo,
# every crop transformed with 4 draws over 50 steps gave 0.450 (3 % verified) where 20 steps with momentum,
# diversity 0.5 and 2 draws gave 0.495 (7 %); on the 105 identities after those 30, 0.449 (0 %, dlib+mobileface).
DEFAULT_STEPS = 50
DEFAULT_TRANSFER = TransferOptions(diversity=1.0, samples=4)


@dataclass
class Draws:
    """One step's random transforms for a batch of N images, ``samples`` draws each, rows image-major
    (image 0's draws first), the order of ``images.repeat_interleave(samples, 0)``."""

    options: TransferOptions
    landmark_noise: torch.Tensor     # [N * samples, L, 2] standard normal
    crop: torch.Tensor               # [N * samples, CROP_PARAMS] uniform in [0, 1)

    @property
    def samples(self) -> int:
        return self.options.samples


def draw(options: Optional[TransferOptions], generators: Sequence[torch.Generator], points: int) -> Optional[Draws]:
    """The random numbers of one step, one generator per image (None when no option needs any)."""
    if options is None or not options.random:
        return None
    import torch

    k = options.samples
    noise = torch.cat([torch.randn((k, points, 2), generator=g) for g in generators])
    crop = torch.cat([torch.rand((k, CROP_PARAMS), generator=g) for g in generators])
    return Draws(options, noise, crop)


def expand(images: torch.Tensor, landmarks: torch.Tensor, draws: Optional[Draws]):
    """(images, landmarks) with every image repeated ``samples`` times and its landmarks jittered."""
    if draws is None:
        return images, landmarks
    k = draws.samples
    images, landmarks = images.repeat_interleave(k, 0), landmarks.repeat_interleave(k, 0)
    if draws.options.jitter > 0:
        eyes = (landmarks[:, 1] - landmarks[:, 0]).norm(dim=-1).view(-1, 1, 1)
        noise = draws.landmark_noise.to(device=landmarks.device, dtype=landmarks.dtype)
        landmarks = landmarks + noise * (draws.options.jitter * eyes)
    return images, landmarks


def diversify(crops: torch.Tensor, draws: Optional[Draws]) -> torch.Tensor:
    """Aligned crops [B, 3, s, s] each randomly zoomed, shifted, rotated and mirrored with probability
    ``diversity`` (kornia's affine warp; edges replicated). The same draw serves every recogniser's crop."""
    if draws is None or draws.options.diversity <= 0:
        return crops
    import torch
    from kornia.geometry.transform import get_affine_matrix2d, warp_affine

    u = draws.crop.to(device=crops.device, dtype=torch.float32)
    b, side = crops.shape[0], crops.shape[-1]
    centre = torch.full((b, 2), (side - 1) / 2.0, device=crops.device)
    zoom = 1.0 + CROP_ZOOM * (2 * u[:, 1] - 1)
    mirror = torch.where(u[:, 5] < 0.5, -1.0, 1.0)
    matrix = get_affine_matrix2d(translations=CROP_SHIFT * side * (2 * u[:, 2:4] - 1), center=centre,
                                 scale=torch.stack([zoom * mirror, zoom], dim=1),
                                 angle=CROP_DEGREES * (2 * u[:, 4] - 1))
    warped = warp_affine(crops.float(), matrix[:, :2], dsize=(side, side), padding_mode="border")
    chosen = (u[:, 0] < draws.options.diversity).view(-1, 1, 1, 1)
    return torch.where(chosen, warped.to(crops.dtype), crops)


def steer(grad: torch.Tensor, options: Optional[TransferOptions], velocity: Optional[torch.Tensor] = None):
    """The direction whose sign the step takes: ``grad`` blurred (``smooth``), then accumulated into ``velocity``
    (MI-FGSM, updated in place: v <- mu v + g / mean|g| per image) when ``momentum`` > 0."""
    if options is None:
        return grad
    if options.smooth > 0:
        from kornia.filters import gaussian_blur2d

        size = 2 * math.ceil(3 * options.smooth) + 1
        grad = gaussian_blur2d(grad, (size, size), (options.smooth, options.smooth))
    if options.momentum > 0 and velocity is not None:
        scale = grad.abs().mean(dim=tuple(range(1, grad.dim())), keepdim=True).clamp_min(1e-12)
        velocity.mul_(options.momentum).add_(grad / scale)
        return velocity
    return grad
