"""FaceEnsembleLoss: how much an image still looks like the user to an ensemble of face recognisers.

For recogniser m with prototype e_m (the normalised mean embedding of the user's clean reference photos) and
an image x, s_m = cos(f_m(A_m(x)), e_m). Recognisers live on different cosine scales: on the congress portraits
(docs/evaluation.md) two photos of one person give dlib 0.964 and mobileface 0.571 on average, two people 0.839
and 0.086. A softmax over raw cosines therefore gives dlib all the weight whatever mobileface says.

**Common scale.** Each similarity is first mapped linearly onto one scale, dlib's cosine scale (the pack's default
surrogate), so that the recogniser's calibrated match threshold lands on dlib's and its same-person minus
different-people gap on dlib's gap:

    c_m = T_dlib + (s_m - T_m) * G_dlib / G_m        (T: 1 %-false-accept threshold, G: mean same - mean different)

c_m - T_dlib is how far recogniser m still is on the "same person" side of its own threshold, in units of how far
apart it puts people. dlib's, faceres's and mobileface's "same" means all land 0.40-0.46 G above their thresholds
and their "different" means 0.54-0.60 G below, so the scale is common in fact, not only by construction
(faceres-deep, which separates people least, sits at +0.13 G / -0.87 G). A dlib-only ensemble is unchanged
(c = s, bit for bit), as is the meaning of tau (a dlib cosine: 0.03 = 0.24 of its gap); other recognisers' c can
leave [-1, 1] (mobileface's cosine 1 is c = 1.07), so L_id can exceed 2. ``scale="cosine"`` keeps the raw cosines
(the weighting before this scale existed). A recogniser without a calibration gets :data:`UNCALIBRATED`.

**Weights.** S = sum_m w_m c_m with w = softmax(c / tau), a soft maximum: the weight goes to the recognisers that
still recognise the user most clearly, and a recogniser already below its threshold stops dominating, so
minimising L_id = 1 + S attacks the weakest links. The weights are **detached**. With them attached,
dS/dc_m = w_m (1 + (c_m - S) / tau), which is negative for every recogniser more than tau below the leader: the
attack would be rewarded for making those recognisers *more* confident (pulling S towards them by re-weighting).
Detached, the gradient is sum_m w_m grad c_m with all coefficients positive: every recogniser's similarity is
pushed down, the most confident one hardest. The loss value is the same either way.

**Transfer draws.** With a :class:`~.transfer.Draws` (random landmark jitter, crop diversity) every image is
scored ``samples`` times, each time cut from jittered landmarks and its crop transformed, and the loss averaged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError
from .transfer import Draws, diversify, expand

SCALES = ("calibrated", "cosine")


@dataclass(frozen=True)
class Calibration:
    """A recogniser's cosine levels on the congress portraits (``python -m iddm_core.bench verify``)."""

    threshold: float   # the 1 %-false-accept point: at or above, "still the same person"
    same: float        # mean cosine between two photos of one person
    different: float   # mean cosine between photos of two people

    @property
    def gap(self) -> float:
        return self.same - self.different


# docs/evaluation.md, "Match thresholds, calibrated"; evaluation.judges.MATCH_THRESHOLDS is read from here.
CALIBRATION = {"dlib": Calibration(0.911, 0.964, 0.839),
               "faceres": Calibration(0.615, 0.771, 0.430),
               "mobileface": Calibration(0.379, 0.571, 0.086),
               "faceres-deep": Calibration(0.784, 0.820, 0.548)}
COMMON = CALIBRATION["dlib"]
# Not measured here (arcface, irse50, ...): the evaluation's common 0.4 threshold and an ArcFace-like spread
# (same person about 0.6, different people about 0.1).
UNCALIBRATED = Calibration(0.4, 0.6, 0.1)


def calibration(name: str) -> Calibration:
    return CALIBRATION.get(name, UNCALIBRATED)


class IdentityLoss(NamedTuple):
    loss: torch.Tensor          # scalar: mean over the batch (and the draws) of 1 + S, differentiable
    similarity: dict            # recogniser name -> s_m per image [N] (mean over the draws), detached
    weights: dict               # recogniser name -> w_m per image [N] (mean over the draws)


class FaceEnsembleLoss(torch.nn.Module):
    def __init__(self, recognizers: Sequence[torch.nn.Module], tau: float = 0.03, scale: str = "calibrated"):
        super().__init__()
        recognizers = list(recognizers or [])
        if not recognizers:
            raise InputError("surrogates: FaceEnsembleLoss needs at least one face recogniser")
        if not tau > 0:
            raise InputError(f"tau must be > 0, got {tau}")
        if scale not in SCALES:
            raise InputError(f"scale={scale!r}: use one of {', '.join(SCALES)}")
        names = [r.name for r in recognizers]
        if len(set(names)) != len(names):
            raise InputError(f"surrogates: recogniser names must be unique, got {names}")
        self.recognizers = torch.nn.ModuleList(recognizers)
        for r in self.recognizers:
            r.eval()
            for p in r.parameters():
                p.requires_grad_(False)
        self.tau = float(tau)
        self.scale = scale
        self.prototypes: list[torch.Tensor] | None = None

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.recognizers]

    def train(self, mode: bool = True):
        """Recognisers stay in eval mode whatever the caller does (batch-norm statistics must not move)."""
        super().train(mode)
        for r in self.recognizers:
            r.eval()
        return self

    @torch.no_grad()
    def set_references(self, images: torch.Tensor, landmarks: torch.Tensor, chunk: int = 8) -> None:
        """Prototypes e_m = normalise(mean_i f_m(A_m(x_i))) over the clean references (no gradient).

        ``chunk`` bounds how many references go through a recogniser at once (memory on big photos)."""
        _check_batch(images, landmarks, "references")
        protos = []
        for r in self.recognizers:
            embs = [r.embed(images[i:i + chunk], landmarks[i:i + chunk]).float()
                    for i in range(0, images.shape[0], chunk)]
            protos.append(F.normalize(torch.cat(embs).mean(dim=0), dim=0))
        self.prototypes = protos

    def similarities(self, images: torch.Tensor, landmarks: torch.Tensor,
                     draws: Optional[Draws] = None) -> torch.Tensor:
        """Cosine similarities [N, M] of each image to each recogniser's prototype (with gradients); with
        ``draws``, [N * samples, M], image-major, each row from jittered landmarks and a diversified crop."""
        if self.prototypes is None:
            raise InputError("FaceEnsembleLoss: call set_references() with the clean reference photos first")
        _check_batch(images, landmarks, "images")
        images, landmarks = expand(images, landmarks, draws)
        cols = [F.normalize(r(diversify(r.align(images, landmarks), draws)), dim=-1).float() @ e.to(images.device)
                for r, e in zip(self.recognizers, self.prototypes)]   # as r.embed, with the crop diversified
        return torch.stack(cols, dim=1)

    def common(self, sims: torch.Tensor) -> torch.Tensor:
        """Similarities [..., M] on the common scale (see the module docstring); unchanged for ``cosine``."""
        cal = [calibration(n) for n in self.names]
        if self.scale == "cosine" or all(c == COMMON for c in cal):
            return sims
        thr = sims.new_tensor([c.threshold for c in cal])
        factor = sims.new_tensor([COMMON.gap / c.gap for c in cal])
        return COMMON.threshold + (sims - thr) * factor

    def weights(self, sims: torch.Tensor) -> torch.Tensor:
        """The ensemble weights [..., M] of raw similarities [..., M] (detached)."""
        return ensemble_weights(self.common(sims.detach()), self.tau)

    def identity_loss(self, images: torch.Tensor, landmarks: torch.Tensor,
                      draws: Optional[Draws] = None) -> IdentityLoss:
        """L_id with the similarities and weights behind it (see :class:`IdentityLoss`)."""
        s = self.similarities(images, landmarks, draws)
        w = self.weights(s)
        loss = (1.0 + (w * self.common(s)).sum(dim=1)).mean()
        k = 1 if draws is None else draws.samples
        s, w = s.detach().view(-1, k, s.shape[1]).mean(1), w.view(-1, k, w.shape[1]).mean(1)
        return IdentityLoss(loss, {n: s[:, m] for m, n in enumerate(self.names)},
                            {n: w[:, m] for m, n in enumerate(self.names)})

    def forward(self, images: torch.Tensor, landmarks: torch.Tensor, draws: Optional[Draws] = None):
        """-> (L_id = mean over the batch of 1 + S, {recogniser name: s_m [N] detached})."""
        out = self.identity_loss(images, landmarks, draws)
        return out.loss, out.similarity


def ensemble_weights(sims: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax(s / tau) over the recognisers (last dimension)."""
    return torch.softmax(sims / tau, dim=-1)


def _check_batch(images: torch.Tensor, landmarks: torch.Tensor, what: str) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise InputError(f"{what}: expected images [N, 3, H, W], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise InputError(f"{what}: no images given")
    n = images.shape[0]
    if landmarks.dim() != 3 or tuple(landmarks.shape) not in ((n, 5, 2), (n, 10, 2)):
        raise InputError(f"{what}: expected landmarks [{n}, 5, 2] (or [{n}, 10, 2] with dlib's parts), "
                         f"got {tuple(landmarks.shape)}")


def build_references(photos: Iterable, detector, size: int = 256, context: float = 2.2):
    """Clean reference photos -> (images [N, 3, size, size], landmarks [N, 5 or 10, 2]) ready for set_references.

    ``photos`` are :class:`~iddm_core.images.Photo` objects (or anything with ``name`` and ``rgb``). Each face is
    cut out as a square ``context`` times its box size around the face and resized to ``size``
    (:func:`~iddm_core.protection.refs.prepare_photos`), so photos of any resolution batch together and the
    recognisers' bilinear crops sample from a face of similar size (no aliasing from multi-megapixel originals).
    A photo without a face raises InputError naming the file.
    """
    from ..protection.refs import prepare_photos

    photos = list(photos)
    if not photos:
        raise InputError("references: no reference photos given")
    images, landmarks, _, _ = prepare_photos(photos, size, detector, crop_factor=context, skip_faceless=False)
    return images, landmarks
