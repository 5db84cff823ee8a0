"""Private reference photos, prepared once: detected, face-centred, resized, landmarks mapped, split into Xc / X0.

Landmarks are detected on the full-resolution clean photo (small training crops are too small for detectors)
and carried through the crop; IDDM reuses them for every perturbed version and one-step prediction.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import InputError
from .images import Photo, crop_resize, load_folder, to_tensor
from .split import Split, split_by_names, split_indices

if TYPE_CHECKING:
    import torch

# Face-centred crop side as a multiple of the detected box size: head and shoulders, like a portrait.
DEFAULT_CROP_FACTOR = 2.2


@dataclass
class PrivateRefs:
    images: "torch.Tensor"          # [N, 3, R, R] in [0, 1]
    landmarks: "torch.Tensor"       # [N, 5, 2] pixel coordinates in the R x R crops ([N, 10, 2]: + dlib's parts)
    split: Split
    names: list[str] = field(repr=False)   # for error messages and the user's own preview only; never written out
    skipped: list[str] = field(default_factory=list, repr=False)   # photos with no detectable face

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def reference(self):
        i = list(self.split.reference)
        return self.images[i], self.landmarks[i]

    def protect(self):
        i = list(self.split.protect)
        return self.images[i], self.landmarks[i]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def prepare_photos(photos: list[Photo], resolution: int, detector, crop_factor: float = DEFAULT_CROP_FACTOR,
                   skip_faceless: bool = True):
    """Detect the largest face of each photo, crop around it, resize. Returns (images, landmarks, names, skipped)."""
    import torch

    images, landmarks, names, skipped = [], [], [], []
    for photo in photos:
        faces = detector.detect(photo.rgb)
        if not faces:
            if skip_faceless:
                skipped.append(photo.name)
                continue
            raise InputError(f"no face detected in {getattr(photo, 'path', None) or photo.name}")
        face = faces[0]
        x0, y0, x1, y1 = face.box
        side = crop_factor * max(x1 - x0, y1 - y0)
        center = tuple(face.landmarks.mean(axis=0))
        crop, (scale, left, top) = crop_resize(photo.rgb, resolution, center=center, side=side)
        images.append(to_tensor(crop))
        landmarks.append(torch.from_numpy(face.scaled(scale, left, top).points()))
        names.append(photo.name)
    if not images:
        raise InputError("no face detected in any photo of the folder")
    return torch.stack(images), torch.stack(landmarks), names, skipped


def load_private_refs(folder: str | os.PathLike, resolution: int, detector=None, seed: int = 0,
                      n_reference: int | None = None, reference_files: list[str] | None = None,
                      protect_files: list[str] | None = None, crop_factor: float = DEFAULT_CROP_FACTOR) -> PrivateRefs:
    """Everything IDDM needs from the user's photo folder."""
    if detector is None:
        from .face.detect import get_detector

        detector = get_detector("dlib")
    photos = load_folder(folder)
    return refs_from_photos(photos, resolution, detector, seed, n_reference, reference_files, protect_files, crop_factor)


def refs_from_photos(photos: list[Photo], resolution: int, detector, seed: int = 0, n_reference: int | None = None,
                     reference_files: list[str] | None = None, protect_files: list[str] | None = None,
                     crop_factor: float = DEFAULT_CROP_FACTOR) -> PrivateRefs:
    if resolution < 32 or resolution % 8:
        raise InputError(f"resolution={resolution} must be a multiple of 8 and at least 32")
    images, landmarks, names, skipped = prepare_photos(photos, resolution, detector, crop_factor)
    if reference_files:
        split = split_by_names(names, reference_files, protect_files)
    else:
        split = split_indices(len(names), seed=seed, n_reference=n_reference)
    return PrivateRefs(images, landmarks, split, names, skipped)
