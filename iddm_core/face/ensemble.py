"""FaceEnsembleLoss: how much an image still looks like the user to an ensemble of face recognisers.

For recogniser m with prototype e_m (the normalised mean embedding of the user's clean reference photos) and
an image x, s_m = cos(f_m(A_m(x)), e_m). The ensemble similarity is S = sum_m w_m s_m with
w = softmax(s / tau), a soft maximum: with a small tau nearly all the weight goes to the recogniser that still
recognises the user best, so minimising L_id = 1 + S attacks the weakest link instead of the average.

The weights are **detached**. With them attached, dS/ds_m = w_m (1 + (s_m - S) / tau), which is negative for
every recogniser more than tau below the leader: the attack would be rewarded for making those recognisers
*more* confident (pulling S towards them by re-weighting). Detached, the gradient is sum_m w_m grad s_m with
all coefficients positive: every recogniser's similarity is pushed down, the most confident one hardest. The
loss value is the same either way.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError


class FaceEnsembleLoss(torch.nn.Module):
    def __init__(self, recognizers: Sequence[torch.nn.Module], tau: float = 0.03):
        super().__init__()
        recognizers = list(recognizers or [])
        if not recognizers:
            raise InputError("surrogates: FaceEnsembleLoss needs at least one face recogniser")
        if not tau > 0:
            raise InputError(f"tau must be > 0, got {tau}")
        names = [r.name for r in recognizers]
        if len(set(names)) != len(names):
            raise InputError(f"surrogates: recogniser names must be unique, got {names}")
        self.recognizers = torch.nn.ModuleList(recognizers)
        for r in self.recognizers:
            r.eval()
            for p in r.parameters():
                p.requires_grad_(False)
        self.tau = float(tau)
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

    def similarities(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Cosine similarities [N, M] of each image to each recogniser's prototype (with gradients)."""
        if self.prototypes is None:
            raise InputError("FaceEnsembleLoss: call set_references() with the clean reference photos first")
        _check_batch(images, landmarks, "images")
        cols = [r.embed(images, landmarks).float() @ e.to(images.device)
                for r, e in zip(self.recognizers, self.prototypes)]
        return torch.stack(cols, dim=1)

    def forward(self, images: torch.Tensor, landmarks: torch.Tensor):
        """-> (L_id = mean over the batch of 1 + S, {recogniser name: s_m [N] detached})."""
        s = self.similarities(images, landmarks)
        w = ensemble_weights(s.detach(), self.tau)
        loss = (1.0 + (w * s).sum(dim=1)).mean()
        return loss, {name: s[:, m].detach() for m, name in enumerate(self.names)}


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
    (:func:`~iddm_core.protection.refs.prepare_photos`), so photos of any resolution batch together and the recognisers' bilinear crops sample from a face of similar size
    (no aliasing from multi-megapixel originals). A photo without a face raises InputError naming the file.
    """
    from ..protection.refs import prepare_photos

    photos = list(photos)
    if not photos:
        raise InputError("references: no reference photos given")
    images, landmarks, _, _ = prepare_photos(photos, size, detector, crop_factor=context, skip_faceless=False)
    return images, landmarks
