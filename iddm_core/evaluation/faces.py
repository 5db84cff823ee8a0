"""Faces of an evaluation: finding them in a batch of samples, embedding them, and gallery folders of identities.

Generated samples are judged by the detector that finds faces at their size (:func:`sample_detector_name`); the
embeddings are the recognisers' L2-normalised ones (:func:`embed`), or their raw outputs (:func:`descriptors`)
for a judge that decides by distance (dlib). Nothing here logs or returns a file name.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..errors import InputError

# Generated samples up to this size are judged by dlib's CNN (MMOD) detector, larger ones by HOG (see
# face.detect.DlibCNNDetector: HOG misses the small, smooth faces of the 128 px demo model's samples).
SMALL_SAMPLE_PX = 256


def sample_detector_name(size: int) -> str:
    """The detector that finds faces in generated samples of ``size`` px: ``dlib-cnn`` up to
    :data:`SMALL_SAMPLE_PX`, else ``dlib`` (HOG; the CNN's cost grows with the pixel count)."""
    return "dlib-cnn" if size <= SMALL_SAMPLE_PX else "dlib"


# ------------------------------------------------------------------------------------------- faces -> embeddings


@dataclass
class FaceScan:
    """Which images of a batch have a face, and the landmarks [M, 5, 2] of those that do (in image pixels)."""

    found: list[bool]
    landmarks: torch.Tensor

    @property
    def index(self) -> list[int]:
        return [i for i, f in enumerate(self.found) if f]


def uint8_images(images: torch.Tensor) -> list[np.ndarray]:
    """uint8 H x W x 3 arrays of a [N, 3, H, W] batch in [0, 1]."""
    return [(x.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
            for x in images]


def scan_faces(images: torch.Tensor, detector) -> FaceScan:
    """Detect the largest face of every image ``[N, 3, H, W]`` in [0, 1] (the detector's first face)."""
    found, lms = [], []
    for rgb in uint8_images(images):
        faces = detector.detect(rgb)
        found.append(bool(faces))
        if faces:
            lms.append(torch.as_tensor(faces[0].points()))
    landmarks = torch.stack(lms) if lms else torch.zeros(0, 5, 2)
    return FaceScan(found, landmarks)


@torch.inference_mode()
def _in_chunks(recognizer, run, images: torch.Tensor, landmarks: torch.Tensor, chunk: int) -> torch.Tensor:
    """``run(images, landmarks)`` over chunks on the recogniser's device, gathered as float32 on the CPU."""
    if images.shape[0] == 0:
        return torch.zeros(0, 0)
    device = next(itertools.chain(recognizer.parameters(), recognizer.buffers())).device   # TF.js: buffers only
    out = [run(images[i:i + chunk].to(device).float(), landmarks[i:i + chunk].to(device).float()).float().cpu()
           for i in range(0, images.shape[0], chunk)]
    return torch.cat(out)


def embed(recognizer, images: torch.Tensor, landmarks: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Normalised embeddings ``[N, D]`` (float32, CPU) computed in chunks on the recogniser's device."""
    return _in_chunks(recognizer, recognizer.embed, images, landmarks, chunk)


def descriptors(recognizer, images: torch.Tensor, landmarks: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """The recogniser's raw outputs ``[N, D]`` (not normalised: dlib's descriptors, whose Euclidean distances dlib
    thresholds), computed like :func:`embed`."""
    return _in_chunks(recognizer, lambda x, lm: recognizer(recognizer.align(x, lm)), images, landmarks, chunk)


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


# ------------------------------------------------------------------------------------------------ gallery folders

# Prototype of each gallery identity per judge and detector, kept for the process: a gallery of 1,117 identities is embedded once,
# not once per evaluated method and identity (bench paper --faces). Keyed by the judge's name and the identity's
# files (resolved paths and modification times), so a changed file is embedded again.
_GALLERY_PROTOTYPES: dict[tuple, torch.Tensor | None] = {}


def gallery_prototype(recognizer, files: list[Path], detector) -> torch.Tensor | None:
    """The normalised mean embedding of one gallery identity's photos (None when no photo has a face), cached."""
    from ..images import load_rgb
    from .metrics import prototype

    key = (recognizer.name, type(detector).__name__, tuple((str(Path(p).resolve()), Path(p).stat().st_mtime_ns) for p in files))
    if key not in _GALLERY_PROTOTYPES:
        emb = embed_photos(recognizer, (load_rgb(p) for p in files), detector)
        _GALLERY_PROTOTYPES[key] = prototype(emb) if emb.numel() else None
    return _GALLERY_PROTOTYPES[key]


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

    if isinstance(folder, dict):                      # already a layout (bench paper --faces: corpus minus the user)
        return {str(k): [Path(p) for p in v] for k, v in folder.items()}
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
