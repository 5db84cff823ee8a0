"""The two contracts the face stack is built on: a detected :class:`Face` and a :class:`Recognizer` module.

The landmark conventions both rely on (point order, [N, 5 | 10, 2] layouts) are in face/landmarks.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .align import warp_to_template


@dataclass
class Face:
    box: tuple[float, float, float, float]   # x0, y0, x1, y1 in pixels
    landmarks: np.ndarray                     # [5, 2] float32, landmarks.LANDMARK_NAMES order
    score: float = 1.0
    dlib_parts: np.ndarray | None = None      # [5, 2] float32, dlib's 5-point shape parts (dlib detector only)

    def scaled(self, scale: float, left: float = 0.0, top: float = 0.0) -> "Face":
        """The same face after cropping at (left, top) and resizing by ``scale`` (see images.crop_resize)."""
        x0, y0, x1, y1 = self.box
        box = ((x0 - left) * scale, (y0 - top) * scale, (x1 - left) * scale, (y1 - top) * scale)
        offset = np.array([left, top], dtype=np.float32)
        lm = (self.landmarks - offset) * scale
        parts = None if self.dlib_parts is None else ((self.dlib_parts - offset) * scale).astype(np.float32)
        return Face(box, lm.astype(np.float32), self.score, parts)

    def points(self) -> np.ndarray:
        """The landmark rows this face contributes to a landmark tensor: ``landmarks`` [5, 2], followed by
        ``dlib_parts`` ([10, 2] in all) when the detector gave them."""
        if self.dlib_parts is None:
            return np.array(self.landmarks, dtype=np.float32)
        return np.concatenate([self.landmarks, self.dlib_parts]).astype(np.float32)


class Recognizer(torch.nn.Module):
    """A differentiable face recogniser.

    Subclasses set ``name``, ``input_size`` (side of the aligned crop), ``template`` (the 5 landmark positions
    in crop pixels that alignment maps the face onto) and implement :meth:`forward` on aligned RGB crops in
    [0, 1]; colour order and normalisation are the subclass's own business.
    """

    name: str = "recognizer"
    input_size: int = 112
    template: np.ndarray = None  # [5, 2]

    def forward(self, crops: torch.Tensor) -> torch.Tensor:  # [N, 3, s, s] in [0, 1] -> [N, D]
        raise NotImplementedError

    def align(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] in [0, 1], landmarks [N, 5, 2] (or [N, 10, 2], see :func:`.landmarks.dlib_parts`;
        the first 5 are used) in those images' pixels -> crops [N, 3, s, s]."""
        return warp_to_template(images, landmarks, self.template, self.input_size)

    def embed(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Aligned, L2-normalised embeddings [N, D]; gradients flow back to ``images``."""
        return F.normalize(self(self.align(images, landmarks)), dim=-1)
