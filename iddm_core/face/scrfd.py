"""SCRFD face detection (insightface's ``det_10g.onnx`` / ``scrfd_*_kps.onnx``) with onnxruntime.

SCRFD is anchor-free in practice: every cell of the stride-8/16/32 feature maps (2 "anchors" per cell for the
3-level models, 1 for the 5-level ones) predicts a face score, the distances from the cell centre to the four
box sides and the offsets of the five keypoints, all in units of the stride. The ONNX outputs come grouped by
kind — scores for every level, then boxes for every level, then keypoints — which is the layout decoded here.
The keypoints are already in ArcFace order (left eye, right eye, nose, left and right mouth corner), so the
detections feed the ArcFace-template alignment directly.

Detection needs no gradients (landmarks are found once, on clean photos), hence onnxruntime and numpy.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import InputError, ModelError
from .base import Face

PIXEL_MEAN, PIXEL_STD = 127.5, 128.0  # SCRFD's training normalisation, applied to RGB

# number of outputs -> (strides, anchors per cell, has keypoints)
LAYOUTS = {
    6: ((8, 16, 32), 2, False),
    9: ((8, 16, 32), 2, True),
    10: ((8, 16, 32, 64, 128), 1, False),
    15: ((8, 16, 32, 64, 128), 1, True),
}


def as_rgb_uint8(image) -> np.ndarray:
    """An RGB photo as an [H, W, 3] uint8 array: accepts such arrays, float arrays in [0, 1], PIL images and
    torch tensors [3, H, W] in [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        image = np.asarray(image.convert("RGB"))
    elif hasattr(image, "detach"):  # torch
        t = image.detach().float().cpu()
        if t.dim() != 3 or t.shape[0] != 3:
            raise InputError(f"image tensor must be [3, H, W], got {tuple(t.shape)}")
        image = t.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise InputError(f"image must be an RGB array [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        image = (np.clip(image.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    return image


def letterbox(rgb: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Resize ``rgb`` keeping its aspect ratio into the top-left of a black ``size`` = (width, height) canvas.

    Returns the network blob [1, 3, h, w] float32 normalised as SCRFD was trained, ``(x - 127.5) / 128`` in
    RGB, and the scale from photo pixels to canvas pixels (detections are divided by it).
    """
    from PIL import Image

    height, width = rgb.shape[:2]
    out_w, out_h = size
    if height / width > out_h / out_w:
        new_h = out_h
        new_w = max(1, int(new_h * width / height))
    else:
        new_w = out_w
        new_h = max(1, int(new_w * height / width))
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR))
    canvas = np.zeros((out_h, out_w, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    blob = (canvas.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD
    return blob.transpose(2, 0, 1)[None].copy(), new_h / height


def anchor_centers(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """Cell centres [height * width * num_anchors, 2] (x, y) in input pixels, row-major, each repeated for its
    anchors — the order of the rows of SCRFD's per-level outputs."""
    ys, xs = np.mgrid[:height, :width]
    centers = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centers, num_anchors, axis=0)


def distance_to_boxes(centers: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """(left, top, right, bottom) distances from the centres -> boxes [N, 4] (x0, y0, x1, y1)."""
    return np.concatenate([centers - dist[:, :2], centers + dist[:, 2:4]], axis=1)


def distance_to_points(centers: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Keypoint offsets [N, 2K] from the centres -> points [N, K, 2]."""
    return centers[:, None, :] + dist.reshape(len(dist), -1, 2)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression: indices of kept boxes, highest score first."""
    x0, y0, x1, y1 = boxes.T
    areas = np.maximum(x1 - x0, 0) * np.maximum(y1 - y0, 0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]))
        h = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]))
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return keep


def decode(outputs: list[np.ndarray], input_hw: tuple[int, int], strides, num_anchors: int,
           threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw SCRFD outputs (scores per level, then boxes, then keypoints; a leading batch axis of 1 is allowed)
    -> boxes [M, 4], scores [M], keypoints [M, 5, 2] in input (canvas) pixels, for scores >= threshold."""
    levels = len(strides)
    boxes, scores, points = [], [], []
    for i, stride in enumerate(strides):
        score, dist, kps = (np.asarray(outputs[i + k * levels]) for k in range(3))
        if score.ndim == 3:  # batched export [1, N, C]
            score, dist, kps = score[0], dist[0], kps[0]
        centers = anchor_centers(input_hw[0] // stride, input_hw[1] // stride, stride, num_anchors)
        if len(centers) != len(score):
            raise ModelError(f"SCRFD level {stride} has {len(score)} rows, expected {len(centers)}")
        hit = np.where(score.reshape(-1) >= threshold)[0]
        scores.append(score.reshape(-1)[hit])
        boxes.append(distance_to_boxes(centers[hit], dist[hit] * stride))
        points.append(distance_to_points(centers[hit], kps[hit] * stride))
    return (np.concatenate(boxes).astype(np.float32), np.concatenate(scores).astype(np.float32),
            np.concatenate(points).astype(np.float32))


def _providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class ScrfdDetector:
    """``ScrfdDetector(path).detect(rgb) -> list[Face]``, best score first.

    ``det_size`` is the square canvas side for models exported with a dynamic input size; models with a fixed
    input size use theirs. ``threshold`` is the minimum face score, ``nms_threshold`` the IoU above which the
    weaker of two boxes is dropped (insightface uses 0.4).
    """

    def __init__(self, onnx_path: str | os.PathLike, det_size: int | tuple[int, int] = 640,
                 threshold: float = 0.5, nms_threshold: float = 0.4):
        import onnxruntime as ort

        path = os.fspath(onnx_path)
        if not os.path.isfile(path):
            raise ModelError(f"SCRFD model {path} does not exist")
        if not 0.0 <= threshold <= 1.0:
            raise InputError(f"threshold must be in [0, 1], got {threshold}")
        try:
            self.session = ort.InferenceSession(path, providers=_providers())
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"cannot load SCRFD model {path}: {type(exc).__name__}: {exc}") from exc
        outputs = self.session.get_outputs()
        layout = LAYOUTS.get(len(outputs))
        if layout is None or not layout[2]:
            raise ModelError(f"{path} is not an SCRFD model with keypoints "
                             f"(it has {len(outputs)} outputs; 9 or 15 expected)")
        self.strides, self.num_anchors, _ = layout
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_names = [o.name for o in outputs]
        self.input_size = self._input_size(inp.shape, det_size)
        self.threshold, self.nms_threshold = float(threshold), float(nms_threshold)

    @staticmethod
    def _input_size(shape, det_size) -> tuple[int, int]:
        """(width, height): the model's own when fixed, else ``det_size`` (rounded to a multiple of 32)."""
        if len(shape) == 4 and isinstance(shape[2], int) and isinstance(shape[3], int):
            return int(shape[3]), int(shape[2])
        w, h = (det_size, det_size) if np.isscalar(det_size) else det_size
        if int(w) < 32 or int(h) < 32:
            raise InputError(f"det_size must be at least 32, got {det_size}")
        return int(w) // 32 * 32, int(h) // 32 * 32

    def detect(self, rgb, max_faces: int | None = None) -> list[Face]:
        """Faces in ``rgb`` (see :func:`as_rgb_uint8` for accepted types), in photo pixels."""
        image = as_rgb_uint8(rgb)
        blob, scale = letterbox(image, self.input_size)
        outputs = self.session.run(self.output_names, {self.input_name: blob})
        boxes, scores, points = decode(outputs, blob.shape[2:], self.strides, self.num_anchors, self.threshold)
        keep = nms(boxes, scores, self.nms_threshold)[: max_faces or None]
        return [Face(tuple(float(v) for v in boxes[i] / scale), (points[i] / scale).astype(np.float32),
                     float(scores[i])) for i in keep]


# The name face/detect.py looks up (insightface calls its class SCRFD).
SCRFDDetector = ScrfdDetector
