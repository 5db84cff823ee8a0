"""Differentiable face alignment: a 5-point similarity fit and an affine warp onto a recogniser's template.

Everything is plain torch (plus kornia's ``warp_affine``) so that a loss on a recogniser's embedding can be
back-propagated through the crop to the pixels of the full photo. The PGD attacks rely on that: landmarks are
detected once on the clean photo and kept fixed, the warp matrix is therefore a constant, and the crop is a
bilinear (hence linear) function of the pixels.
"""
from __future__ import annotations

import numpy as np
import torch

from .landmarks import arcface_points, check_landmarks

# The usual ArcFace / insightface 5-point template for a 112 x 112 crop, in LANDMARK_NAMES order (x, y).
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963],
     [73.5318, 51.5014],
     [56.0252, 71.7366],
     [41.5493, 92.3655],
     [70.7299, 92.2041]], dtype=np.float32)


def template_for(size: int, base: np.ndarray = ARCFACE_TEMPLATE_112, base_size: int = 112,
                 zoom: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The ``base`` template (made for ``base_size`` crops) rescaled for a ``size`` x ``size`` crop.

    ``zoom`` < 1 shows more context around the face (the points move towards the centre), > 1 less; ``shift``
    moves the points by a fraction of the crop side. Models trained on differently framed crops (FaceNet on
    160 px MTCNN crops, dlib's 150 px chips) need such adjustments to see faces framed the way they learnt.
    """
    base = np.asarray(base, dtype=np.float32)
    if base.shape != (5, 2):
        raise ValueError(f"template must be 5 x 2 points, got shape {base.shape}")
    if size <= 0 or base_size <= 0 or zoom <= 0:
        raise ValueError("template_for: size, base_size and zoom must be positive")
    centre = base_size / 2.0
    points = (base - centre) * zoom + centre
    points = points * (size / float(base_size))
    return (points + np.asarray(shift, dtype=np.float32) * size).astype(np.float32)


def umeyama(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transform (scale, rotation, translation; never a reflection) mapping ``src`` onto
    ``dst``: src [N, K, 2] (or [K, 2]), dst [K, 2] or [N, K, 2] -> matrices [N, 2, 3] with dst ~ M @ [x, y, 1].

    In 2-D, scale times rotation is the matrix [[a, -b], [b, a]], so Umeyama's problem is linear in (a, b) and
    has a closed form (the complex-number view: a + ib = <z_src, z_dst> / |z_src|^2 on centred points). That
    equals the SVD solution with the reflection excluded, but is smooth everywhere, whereas SVD gradients blow up
    on the repeated singular values that symmetric point sets produce.
    """
    src = torch.as_tensor(src)
    if src.dim() == 2:
        src = src.unsqueeze(0)
    dst = torch.as_tensor(dst, dtype=src.dtype, device=src.device)
    if dst.dim() == 2:
        dst = dst.unsqueeze(0).expand(src.shape[0], -1, -1)
    if src.shape[-1] != 2 or dst.shape != src.shape:
        raise ValueError(f"umeyama: src {tuple(src.shape)} and dst {tuple(dst.shape)} must be [N, K, 2] alike")
    mu_s, mu_d = src.mean(dim=1, keepdim=True), dst.mean(dim=1, keepdim=True)
    s, d = src - mu_s, dst - mu_d
    var = (s ** 2).sum(dim=(1, 2)).clamp_min(1e-12)
    a = (s[..., 0] * d[..., 0] + s[..., 1] * d[..., 1]).sum(dim=1) / var
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(dim=1) / var
    rot = torch.stack([torch.stack([a, -b], dim=-1), torch.stack([b, a], dim=-1)], dim=-2)   # [N, 2, 2]
    t = mu_d.squeeze(1) - (rot @ mu_s.squeeze(1).unsqueeze(-1)).squeeze(-1)                  # [N, 2]
    return torch.cat([rot, t.unsqueeze(-1)], dim=-1)


def apply_affine(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Points [N, K, 2] mapped by matrices [N, 2, 3]."""
    return points @ matrix[:, :, :2].transpose(1, 2) + matrix[:, :, 2].unsqueeze(1)


def warp_to_template(images: torch.Tensor, landmarks: torch.Tensor, template, size: int,
                     padding_mode: str = "zeros") -> torch.Tensor:
    """Aligned crops [N, 3, size, size] whose five landmarks sit on ``template`` (crop pixels).

    images [N, 3, H, W] in [0, 1]; landmarks [N, 5, 2] in those images' pixel coordinates (pixel centres at
    integers, as detectors and OpenCV report them), or [N, 10, 2] with dlib's parts after them (ignored here).
    Sampling is bilinear, so the crop is a linear function of the pixels and gradients reach ``images``. Outside
    the photo the crop is black (``padding_mode="zeros"``): that is what insightface's ``cv2.warpAffine`` and
    dlib's chip extractor give the recognisers at training time; ``"border"`` (edge replication) is available for
    photos cropped tightly around the face.
    The warp runs in float32 even under autocast: half precision coordinates are off by whole pixels on large
    photos.
    """
    from kornia.geometry.transform import warp_affine

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"warp_to_template: images must be [N, 3, H, W], got {tuple(images.shape)}")
    landmarks = torch.as_tensor(landmarks, device=images.device)
    if landmarks.dim() == 2:
        landmarks = landmarks.unsqueeze(0)
    try:
        check_landmarks(landmarks, images.shape[0])
    except ValueError as exc:
        raise ValueError(f"warp_to_template: {exc}") from None
    landmarks = arcface_points(landmarks)
    template = torch.as_tensor(np.asarray(template, dtype=np.float32), device=images.device)
    matrix = umeyama(landmarks.float(), template)
    with torch.autocast(device_type=images.device.type, enabled=False):
        return warp_affine(images.float(), matrix, dsize=(int(size), int(size)), mode="bilinear",
                           padding_mode=padding_mode, align_corners=True)
