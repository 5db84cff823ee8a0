"""Face detection with 5 ArcFace-order landmarks: dlib's HOG detector (default), dlib's CNN (MMOD) detector (it judges
small generated samples) or an SCRFD .onnx (face/scrfd.py).

dlib's shape predictors do not give the ArcFace points directly: the 5-point model marks the eye *corners* and
the nose *base*, and no mouth. The 68-point model (shipped in the same ``face_recognition_models`` package) has
everything, so it is used when present:

* eye centre   = mean of the 6 eye-contour points (36-41 image-left eye, 42-47 image-right eye);
* nose tip     = point 30;
* mouth corners = points 48 (image left) and 54.

Without it, :func:`landmarks_from_5` estimates the points from the 5-point shape: eye centres are the corner
midpoints, and the nose tip and mouth corners are where dlib's own mean face puts them once that mean face is
fitted (least-squares similarity) onto the 4 eye corners and the nose base. That is the same mean face dlib uses to
cut its chips (face/dlib_resnet.py), so the estimate is exact for an average frontal face and degrades with
expression (open mouth, smile) and strong yaw. The nose *tip* is estimated rather than taking the nose base
because every recogniser template (ArcFace, dlib's chip) places the tip.

Each dlib face also carries dlib's 5-point shape: its parts as ``Face.dlib_parts`` (kept by ``Face.scaled`` and
appended to landmark tensors by ``Face.points()``; dlib's recogniser cuts dlib's own chip from them,
face/dlib_chip.py) and the raw ``full_object_detection`` (``shape5``) for ``dlib.get_face_chip`` and
``compute_face_descriptor``.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .base import Face
from .dlib_files import MMOD, SHAPE_5, SHAPE_68, find_model, require_model
from .dlib_chip import MEAN_FACE_5
from .dlib_resnet import mean_face_arcface_points


@dataclass
class DlibFace(Face):
    """A :class:`Face` (with ``dlib_parts`` set) plus dlib's raw landmark shapes (``dlib.full_object_detection``;
    not kept by ``scaled``)."""
    shape5: object = field(default=None, repr=False)
    shape68: object = field(default=None, repr=False)


def check_rgb(rgb, name: str = "image") -> np.ndarray:
    """A C-contiguous uint8 H x W x 3 array (what dlib's detector accepts), or InputError naming ``name``."""
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        desc = f"{rgb.dtype} array of shape {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise InputError(f"{name}: expected an RGB uint8 H x W x 3 array, got {desc}")
    return np.ascontiguousarray(rgb)


def shape_points(shape) -> np.ndarray:
    """A dlib ``full_object_detection`` as float32 [K, 2] pixel coordinates."""
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)


def landmarks_from_68(points: np.ndarray) -> np.ndarray:
    """ArcFace-order 5 points [5, 2] from the 68-point iBUG layout."""
    points = np.asarray(points, dtype=np.float32)
    return np.stack([points[36:42].mean(axis=0), points[42:48].mean(axis=0),
                     points[30], points[48], points[54]]).astype(np.float32)


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (no reflection) mapping ``src`` [K, 2] onto ``dst`` [K, 2] as a 2 x 3 matrix.
    In 2-D, scale x rotation is a complex number: z = <src_c, dst_c> / |src_c|^2 on centred points."""
    s, d = src - src.mean(axis=0), dst - dst.mean(axis=0)
    zs, zd = s[:, 0] + 1j * s[:, 1], d[:, 0] + 1j * d[:, 1]
    z = np.sum(np.conj(zs) * zd) / max(np.sum(np.abs(zs) ** 2), 1e-12)
    rot = np.array([[z.real, -z.imag], [z.imag, z.real]])
    return np.concatenate([rot, (dst.mean(axis=0) - rot @ src.mean(axis=0))[:, None]], axis=1)


def landmarks_from_5(points: np.ndarray) -> np.ndarray:
    """ArcFace-order 5 points [5, 2] from dlib's 5-point shape (0/1: image-right eye outer/inner corner, 2/3:
    image-left eye outer/inner corner, 4: nose base). Eye centres are measured (corner midpoints); nose tip and
    mouth corners are dlib's mean face mapped by the similarity that fits its 5 points onto ``points``."""
    points = np.asarray(points, dtype=np.float64)
    m = _similarity(MEAN_FACE_5, points)
    estimate = mean_face_arcface_points() @ m[:, :2].T + m[:, 2]
    left_eye, right_eye = points[2:4].mean(axis=0), points[0:2].mean(axis=0)
    return np.stack([left_eye, right_eye, estimate[2], estimate[3], estimate[4]]).astype(np.float32)


def box_area(face: Face) -> float:
    x0, y0, x1, y1 = face.box
    return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)


class DlibDetector:
    """dlib's HOG frontal face detector + shape predictors. ``upsample`` doubles the image that many times before
    detecting (finds faces down to ~40 px instead of ~80 px, at 4x the cost per step).

    ``min_score`` is dlib's ``adjust_threshold``: detections scoring below it are dropped. dlib's own default, 0,
    keeps weak hits on textures once the image is upsampled (the sample astronaut photo gives a 0.12 hit on the
    mission patch on the suit, as large as the real face, which scores 1.16); real frontal faces here score above
    0.5.
    """

    name = "dlib"

    def __init__(self, upsample: int = 1, use_68: bool = True, min_score: float = 0.3):
        import dlib

        if int(upsample) != upsample or not 0 <= upsample <= 3:
            raise InputError(f"upsample must be an integer in 0..3, got {upsample!r}")
        self.upsample = int(upsample)
        self.min_score = float(min_score)
        self._detector = dlib.get_frontal_face_detector()
        self._sp5 = dlib.shape_predictor(str(require_model(SHAPE_5)))
        path68 = find_model(SHAPE_68) if use_68 else None
        self._sp68 = dlib.shape_predictor(str(path68)) if path68 is not None else None

    @property
    def uses_68(self) -> bool:
        return self._sp68 is not None

    def detect(self, rgb: np.ndarray) -> list[DlibFace]:
        """Faces in ``rgb`` (uint8 H x W x 3), largest first."""
        rgb = check_rgb(rgb)
        rects, scores, _ = self._detector.run(rgb, self.upsample, self.min_score)
        faces = [self._face(rgb, rect, score) for rect, score in zip(rects, scores)]
        return sorted(faces, key=box_area, reverse=True)

    def _face(self, rgb: np.ndarray, rect, score: float) -> DlibFace:
        h, w = rgb.shape[:2]
        box = (float(max(rect.left(), 0)), float(max(rect.top(), 0)),
               float(min(rect.right() + 1, w)), float(min(rect.bottom() + 1, h)))
        shape5 = self._sp5(rgb, rect)
        if self._sp68 is not None:
            shape68 = self._sp68(rgb, rect)
            landmarks = landmarks_from_68(shape_points(shape68))
        else:
            shape68, landmarks = None, landmarks_from_5(shape_points(shape5))
        return DlibFace(box, landmarks, float(score), dlib_parts=shape_points(shape5), shape5=shape5,
                        shape68=shape68)


class DlibCNNDetector(DlibDetector):
    """dlib's CNN (MMOD) face detector with the 5-point shape predictor (trained for both of dlib's detectors).

    Judges generated samples of small models: on 16 + 16 of the demo model's 128 px samples, whose faces are
    25-35 px wide and smooth, HOG found 3 + 4 (upsampled once) or 6 + 3 (twice), MMOD 16 + 15 (docs/DESIGN.md,
    "The demo model"). It costs 0.27 s per 128 px image on 2 CPU cores (upsampled once; HOG 0.006 s), growing with
    the pixel count, so photos and large samples stay with HOG.
    ``min_score`` is MMOD's confidence (dlib keeps > 0).
    """

    name = "dlib-cnn"

    def __init__(self, upsample: int = 1, min_score: float = 0.0):
        import dlib

        super().__init__(upsample=upsample, use_68=False, min_score=min_score)
        self._cnn = dlib.cnn_face_detection_model_v1(str(require_model(MMOD)))

    def detect(self, rgb: np.ndarray) -> list[DlibFace]:
        rgb = check_rgb(rgb)
        found = [d for d in self._cnn(rgb, self.upsample) if d.confidence > self.min_score]
        faces = [self._face(rgb, d.rect, d.confidence) for d in found]
        return sorted(faces, key=box_area, reverse=True)


def _load_scrfd(path: str):
    from . import scrfd  # written separately; imported only when an .onnx detector is asked for

    cls = getattr(scrfd, "SCRFDDetector", None) or getattr(scrfd, "SCRFD")
    return cls(path)


@functools.lru_cache(maxsize=4)
def get_detector(name: str = "dlib"):
    """``"dlib"`` (HOG), ``"dlib-cnn"`` (MMOD) or the path of an SCRFD ``.onnx`` file -> a detector with ``.detect(rgb) -> list[Face]``.
    Cached: the 68-point predictor alone is a 100 MB file."""
    if name is None or str(name).strip().lower() in ("", "dlib"):
        return DlibDetector()
    if str(name).strip().lower() == "dlib-cnn":
        return DlibCNNDetector()
    path = os.fspath(name)
    if not path.lower().endswith(".onnx"):
        raise InputError(f"detector: expected 'dlib', 'dlib-cnn' or the path of an SCRFD .onnx file, got {name!r}")
    if not os.path.isfile(path):
        raise InputError(f"detector: SCRFD model not found: {path}")
    return _load_scrfd(path)


def detect_one(rgb: np.ndarray, detector, source_name: str) -> Face:
    """The largest face in ``rgb``; ``InputError("no face detected in <source_name>")`` when there is none."""
    faces = detector.detect(check_rgb(rgb, source_name))
    if not faces:
        raise InputError(f"no face detected in {source_name}")
    return faces[0]
