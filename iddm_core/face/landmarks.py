"""Landmark conventions of the face stack: the point order, the two tensor layouts and their accessors.

A leaf module (numpy-free, torch-free): face/base.py (the :class:`~.base.Face` record), face/align.py (the warp) and
the recognisers all read landmarks through these helpers.
"""
from __future__ import annotations

# Landmark order used everywhere in this package (the ArcFace / insightface order), in image pixel coords (x, y):
# 0 left eye, 1 right eye, 2 nose tip, 3 left mouth corner, 4 right mouth corner — "left" meaning the image's left.
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

# Landmark tensors are [N, 5, 2] (the ArcFace points above) or [N, 10, 2]: the ArcFace points, then the 5 parts of
# dlib's 5-point shape predictor (image-right eye outer/inner corner, image-left eye outer/inner corner, nose
# base) when the detector has them. Only dlib's recogniser uses the extra parts (it cuts dlib's own chip from them,
# face/dlib_chip.py); every other consumer reads the first 5 points (:func:`arcface_points`).
ARCFACE_POINTS = 5
WITH_DLIB_PARTS = 10


def check_landmarks(landmarks, n: int | None = None) -> None:
    """ValueError unless ``landmarks`` is [n, 5, 2] or [n, 10, 2] (``n`` unchecked when None)."""
    shape = tuple(landmarks.shape)
    ok = len(shape) == 3 and shape[1] in (ARCFACE_POINTS, WITH_DLIB_PARTS) and shape[2] == 2
    if not ok or (n is not None and shape[0] != n):
        want = "N" if n is None else n
        raise ValueError(f"landmarks must be [{want}, 5, 2] or [{want}, 10, 2], got {shape}")


def arcface_points(landmarks):
    """The ArcFace-order points [N, 5, 2] of a landmark tensor [N, 5 or 10, 2]."""
    return landmarks[:, :ARCFACE_POINTS]


def dlib_parts(landmarks):
    """dlib's 5 shape parts [N, 5, 2] of a landmark tensor, or None when it has only the ArcFace points."""
    return landmarks[:, ARCFACE_POINTS:] if landmarks.shape[1] == WITH_DLIB_PARTS else None
