"""dlib's face-chip extraction (``get_face_chip_details`` + ``extract_image_chips``) as a differentiable torch function.

``dlib.get_face_chip(img, shape5)`` and ``compute_face_descriptor(img, shape5)`` cut the 150 x 150 chip the face
network sees in four steps, all reproduced here (dlib/image_transforms/interpolation.h, image_pyramid.h,
geometry/drectangle.h, geometry/point_transforms.h):

1. **Chip geometry** (:func:`get_face_chip_details`). dlib's 5-point mean face, padded
   (``p -> (padding + p) / (1 + 2 padding) * size``), is fitted onto the 5 detected parts by a least-squares
   similarity (:func:`find_similarity_transform`, chip -> image). Its rotation becomes ``angle`` and its scale
   and translation a ``drectangle`` centred on the image of the chip centre, ``size * scale`` wide. A dlib
   drectangle has *inclusive* corners: its width is ``right - left + 1``, so ``centered_drect`` spans
   ``width - 1`` between ``left`` and ``right``.
2. **Pyramid depth and bounding box** (:func:`pyramid_depth`, :func:`chip_bounding_box`). While the rectangle,
   shrunk once more by ``pyramid_down<2>::rect_down`` (``p / 2 - (1.25, 0.75)`` per corner), still covers more
   than ``rows * cols`` pixels, dlib goes one pyramid level deeper. The photo is only processed inside the
   rotated rectangle's bounding box, grown by 2, 6, 14, ... pixels (depth 0, 1, 2, ...), clipped to the photo and
   rounded (``std::lround``) to integers.
3. **Image pyramid** (:func:`pyramid_down`): a 5 x 5 binomial filter ``[1 4 6 4 1]^2 / 256`` evaluated at every
   other row and column without padding, so a ``h x w`` image becomes ``(h - 3) // 2 x (w - 3) // 2``; for
   RGB images the sum is integer and divided by 256 with integer division (a floor). Images of 8 rows or
   columns or fewer become empty.
4. **Resampling** (:func:`chip_sampling_grid`, :func:`interpolate_bilinear`). The affine map sends chip pixels
   (0, 0), (cols - 1, 0) and (0, rows - 1) to the rotated rectangle's corners at the chosen level (in the
   bounding box's frame). Each chip pixel is a bilinear mix of its 4 neighbours computed in double precision and
   truncated to uint8; a pixel whose 2 x 2 neighbourhood is not entirely inside the level image is black.

The roundings (input to uint8, every pyramid level, the chip) are applied in the forward pass and skipped by
the backward pass (straight-through estimator), so the chip equals dlib's up to floating-point ties while
gradients reach the photo's pixels: the map is piecewise linear in them.

The geometry (steps 1, 2 and the sampling positions) depends only on the landmarks and the photo size, which
the attacks keep fixed; it is computed with Python floats (IEEE doubles, ``math.sin``/``math.cos`` like
``std::sin``/``std::cos``) and carries no gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CHIP_SIZE = 150
CHIP_PADDING = 0.25

# dlib's 5-point mean face (get_face_chip_details), unit square; parts 0..4 of the 5-point shape predictor:
# image-right eye outer/inner corner, image-left eye outer/inner corner, nose base.
MEAN_FACE_5 = np.array([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
                        [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
                        [0.4901123135679, 0.6277975316475]])

# pyramid_down<2>'s separable filter; its outer product sums to 256.
_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)

Rect = tuple  # (left, top, right, bottom), inclusive corners like dlib's drectangle / rectangle


# ------------------------------------------------------------------------------------------------ rectangles


def lround(x: float) -> int:
    """``std::lround``: nearest integer, halves away from zero (Python's ``round`` sends halves to even)."""
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


def rect_is_empty(rect: Rect) -> bool:
    left, top, right, bottom = rect
    return top > bottom or left > right


def rect_area(rect: Rect) -> float:
    """drectangle::area: ``(right - left + 1) * (bottom - top + 1)``, 0 for an empty rectangle."""
    if rect_is_empty(rect):
        return 0.0
    left, top, right, bottom = rect
    return (right - left + 1) * (bottom - top + 1)


def centered_drect(cx: float, cy: float, width: float, height: float) -> Rect:
    """dlib's ``centered_drect``: inclusive corners, so the corners are ``width - 1`` apart."""
    width -= 1
    height -= 1
    return (cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2)


def rect_center(rect: Rect) -> tuple[float, float]:
    left, top, right, bottom = rect
    return ((left + right) / 2.0, (top + bottom) / 2.0)


def point_down(x: float, y: float) -> tuple[float, float]:
    """``pyramid_down<2>::point_down``: a point's position one pyramid level down."""
    return (x / 2.0 - 1.25, y / 2.0 - 0.75)


def rect_down(rect: Rect) -> Rect:
    """``pyramid_down<2>::rect_down``: both corners through :func:`point_down`."""
    left, top, right, bottom = rect
    return point_down(left, top) + point_down(right, bottom)


def rotate_point(center: tuple[float, float], point: tuple[float, float], angle: float) -> tuple[float, float]:
    """dlib's ``rotate_point``: ``point`` rotated by ``angle`` (radians, y axis down) about ``center``."""
    s, c = math.sin(angle), math.cos(angle)
    px, py = point[0] - center[0], point[1] - center[1]
    return (c * px - s * py + center[0], s * px + c * py + center[1])


def rotated_corners(rect: Rect, angle: float) -> list[tuple[float, float]]:
    """Top-left, top-right, bottom-left, bottom-right corners of ``rect`` rotated about its centre."""
    left, top, right, bottom = rect
    center = rect_center(rect)
    return [rotate_point(center, p, angle) for p in ((left, top), (right, top), (left, bottom), (right, bottom))]


# ------------------------------------------------------------------------------------------------ chip geometry


@dataclass(frozen=True)
class ChipDetails:
    """dlib's ``chip_details``: the chip is ``rect`` (inclusive corners, image pixels) rotated by ``angle`` about
    its centre, resampled to ``rows`` x ``cols``."""
    rect: Rect
    angle: float
    rows: int
    cols: int

    @property
    def size(self) -> int:
        return self.rows * self.cols


def find_similarity_transform(src, dst) -> tuple[float, float, float, float]:
    """Least-squares similarity (rotation, uniform scale, translation; never a reflection) sending ``src`` [K, 2]
    onto ``dst`` [K, 2], as ``(a, b, tx, ty)``: ``x' = a x - b y + tx``, ``y' = b x + a y + ty``.

    dlib solves Umeyama's problem with a 2 x 2 SVD; in 2-D its solution (reflection excluded) has the closed
    form ``a + ib = sum conj(zs) zd / sum |zs|^2`` over the centred points as complex numbers, which is what is
    computed here, in doubles (equal to dlib's up to rounding in the last bits)."""
    src = [(float(x), float(y)) for x, y in np.asarray(src, dtype=np.float64)]
    dst = [(float(x), float(y)) for x, y in np.asarray(dst, dtype=np.float64)]
    n = len(src)
    msx, msy = sum(p[0] for p in src) / n, sum(p[1] for p in src) / n
    mdx, mdy = sum(p[0] for p in dst) / n, sum(p[1] for p in dst) / n
    var = num_a = num_b = 0.0
    for (sx, sy), (dx, dy) in zip(src, dst):
        sx, sy, dx, dy = sx - msx, sy - msy, dx - mdx, dy - mdy
        var += sx * sx + sy * sy
        num_a += sx * dx + sy * dy
        num_b += sx * dy - sy * dx
    if var == 0:
        a, b = 1.0, 0.0
    else:
        a, b = num_a / var, num_b / var
    return a, b, mdx - (a * msx - b * msy), mdy - (b * msx + a * msy)


def get_face_chip_details(parts, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> ChipDetails:
    """dlib's ``get_face_chip_details`` for a 5-point shape: ``parts`` [5, 2] in the 5-point predictor's order
    (image pixels) -> the :class:`ChipDetails` of the ``size`` x ``size`` chip with ``padding``."""
    parts = np.asarray(parts, dtype=np.float64)
    if parts.shape != (5, 2):
        raise ValueError(f"get_face_chip_details: expected dlib's 5 parts [5, 2], got shape {parts.shape}")
    if size <= 0 or padding < 0:
        raise ValueError(f"get_face_chip_details: size must be > 0 and padding >= 0, got {size}, {padding}")
    chip_points = [((padding + x) / (2 * padding + 1) * size, (padding + y) / (2 * padding + 1) * size)
                   for x, y in MEAN_FACE_5]
    a, b, tx, ty = find_similarity_transform(chip_points, parts)
    # chip_details(chip_points, img_points, dims): the angle and scale of the similarity's linear part, and a
    # rectangle size * scale wide centred on the image of the chip centre.
    angle = math.atan2(b, a)
    scale = math.sqrt(a * a + b * b)
    half = size / 2.0
    cx, cy = a * half - b * half + tx, b * half + a * half + ty
    return ChipDetails(centered_drect(cx, cy, size * scale, size * scale), angle, int(size), int(size))


def pyramid_depth(details: ChipDetails) -> int:
    """How many ``pyramid_down<2>`` levels extract_image_chips builds for this chip: the number of further
    halvings after the first for which the rectangle still covers more than ``rows * cols`` pixels."""
    depth = 0
    rect = rect_down(details.rect)
    while rect_area(rect) > details.size:
        rect = rect_down(rect)
        depth += 1
    return depth


def chip_bounding_box(details: ChipDetails, depth: int, height: int, width: int):
    """The integer region (left, top, right, bottom; inclusive) of the photo that dlib processes: the rotated
    rectangle's bounding box grown by 2, 6, 14, ... pixels for depth 0, 1, 2, ..., clipped to the photo and
    rounded with lround. None when it is empty (the chip lies entirely outside the photo)."""
    grow = 2.0
    for _ in range(depth):
        grow = grow * 2 + 2
    corners = rotated_corners(details.rect, details.angle)
    xs, ys = [p[0] for p in corners], [p[1] for p in corners]
    box = (max(min(xs) - grow, 0.0), max(min(ys) - grow, 0.0),
           min(max(xs) + grow, float(width - 1)), min(max(ys) + grow, float(height - 1)))
    box = tuple(lround(v) for v in box)
    return None if rect_is_empty(box) else box


def chip_level(details: ChipDetails, box) -> tuple[int, Rect]:
    """(level, rect): the pyramid level the chip is sampled from (-1: the bounding box itself, k: k + 1 halvings)
    and the chip rectangle in that level's pixels (bounding box frame)."""
    left, top, right, bottom = details.rect
    rect = (left - box[0], top - box[1], right - box[0], bottom - box[1])
    level = -1
    while rect_area(rect_down(rect)) > details.size:
        level += 1
        rect = rect_down(rect)
    return level, rect


def chip_sampling_grid(details: ChipDetails, rect: Rect) -> tuple[np.ndarray, np.ndarray]:
    """Sampling positions (x, y), each [rows, cols] float64, of every chip pixel in the level image that holds
    ``rect``: the affine map sending chip pixels (0, 0), (cols - 1, 0), (0, rows - 1) onto ``rect``'s
    top-left, top-right and bottom-left corners rotated by ``details.angle`` about its centre (dlib fits it by
    least squares on those 3 pairs, which is exact)."""
    tl, tr, bl, _ = rotated_corners(rect, details.angle)
    cols, rows = details.cols, details.rows
    m00 = (tr[0] - tl[0]) / (cols - 1) if cols > 1 else 0.0
    m10 = (tr[1] - tl[1]) / (cols - 1) if cols > 1 else 0.0
    m01 = (bl[0] - tl[0]) / (rows - 1) if rows > 1 else 0.0
    m11 = (bl[1] - tl[1]) / (rows - 1) if rows > 1 else 0.0
    c = np.arange(cols, dtype=np.float64)[None, :]
    r = np.arange(rows, dtype=np.float64)[:, None]
    return (m00 * c + m01 * r) + tl[0], (m10 * c + m11 * r) + tl[1]


# ------------------------------------------------------------------------------------------------ pixels


def straight_through(x: torch.Tensor, quantised: torch.Tensor) -> torch.Tensor:
    """``quantised`` in the forward pass (bit-exact), the identity's gradient in the backward pass."""
    return quantised.detach() + (x - x.detach())


def pyramid_down(image: torch.Tensor) -> torch.Tensor:
    """dlib's ``pyramid_down<2>`` on an 8-bit RGB image held as integer-valued floats [C, h, w] -> [C, (h - 3) // 2,
    (w - 3) // 2]: the [1 4 6 4 1]^2 / 256 filter at every other pixel (no padding), floored like dlib's integer
    division (straight-through gradient). Images with 8 rows or columns or fewer give an empty image."""
    c, h, w = image.shape
    if h <= 8 or w <= 8:
        return image.new_zeros(c, 0, 0)
    k = torch.tensor(_BINOMIAL, dtype=image.dtype, device=image.device)
    kernel = (k[:, None] * k[None, :]).expand(c, 1, 5, 5)
    # The exact integer sum divided by 256 (a power of two: exact), then floored.
    mean = F.conv2d(image[None], kernel, stride=2, groups=c)[0] / 256.0
    return straight_through(mean, torch.floor(mean))


def interpolate_bilinear(image: torch.Tensor, xs: np.ndarray, ys: np.ndarray) -> torch.Tensor:
    """dlib's ``interpolate_bilinear`` into an 8-bit image: ``image`` [C, h, w] (integer-valued floats),
    positions ``xs``, ``ys`` [R, S] -> [C, R, S]. A position whose 2 x 2 neighbourhood is not entirely inside the
    image gives 0 (dlib's black background); the others get
    ``(1 - ty) ((1 - tx) tl + tx tr) + ty ((1 - tx) bl + tx br)`` truncated to an integer like the
    ``static_cast<unsigned char>`` of dlib's ``vector_to_pixel`` (straight-through gradient)."""
    c, h, w = image.shape
    left, top = np.floor(xs), np.floor(ys)
    valid = (left >= 0) & (top >= 0) & (left + 1 < w) & (top + 1 < h)
    shape = (c,) + xs.shape
    if not valid.any():
        return image.new_zeros(shape) + 0.0 * image.sum()
    tx, ty = np.where(valid, xs - left, 0.0), np.where(valid, ys - top, 0.0)
    idx = np.where(valid, top * w + left, 0).astype(np.int64)

    def const(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=image.device, dtype=image.dtype)

    flat = image.reshape(c, -1)
    index = torch.from_numpy(idx.reshape(-1)).to(image.device)

    def at(offset: int) -> torch.Tensor:
        return flat[:, index + offset].reshape(shape)

    tl, tr, bl, br = at(0), at(1), at(w), at(w + 1)
    one_tx, one_ty, tx, ty = const(1 - tx), const(1 - ty), const(tx), const(ty)
    value = one_ty * (one_tx * tl + tx * tr) + ty * (one_tx * bl + tx * br)
    value = value * const(valid.astype(np.float64))
    return straight_through(value, torch.trunc(value).clamp(0, 255))


def quantise_uint8(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> the 8-bit values dlib would be given (rounded, clipped to 0..255) as floats, with a
    straight-through gradient (of ``255 * image``)."""
    scaled = image * 255.0
    return straight_through(scaled, torch.round(scaled.clamp(0.0, 255.0)))


def _work_dtype(device: torch.device) -> torch.dtype:
    """dlib interpolates in double precision; float64 everywhere it exists (not on Apple's MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def extract_face_chip(image: torch.Tensor, parts, size: int = CHIP_SIZE,
                      padding: float = CHIP_PADDING) -> torch.Tensor:
    """dlib's face chip of one photo: ``image`` [3, H, W] RGB in [0, 1], ``parts`` [5, 2] dlib's 5-point shape
    (image pixels) -> chip [3, size, size] in [0, 1], equal to ``dlib.get_face_chip(uint8 photo, shape, size,
    padding)`` / 255 and differentiable with respect to ``image``."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"extract_face_chip: image must be [3, H, W], got {tuple(image.shape)}")
    parts = parts.detach().double().cpu().numpy() if torch.is_tensor(parts) else np.asarray(parts, np.float64)
    details = get_face_chip_details(parts, size, padding)
    out_dtype = image.dtype if image.is_floating_point() else torch.float32
    with torch.autocast(device_type=image.device.type, enabled=False):
        chip = _extract(image, details)
    return (chip / 255.0).to(out_dtype)


def _pixels(region: torch.Tensor) -> torch.Tensor:
    """A region of the [0, 1] photo as the 8-bit values dlib reads, in the working precision."""
    return quantise_uint8(region.to(_work_dtype(region.device)))


def _extract(image: torch.Tensor, details: ChipDetails) -> torch.Tensor:
    """The chip as integer-valued floats [3, rows, cols] (0..255); only the region dlib reads is converted."""
    height, width = image.shape[1:]
    left, top, right, bottom = details.rect
    if details.angle == 0 and details.rows == bottom - top + 1 and details.cols == right - left + 1:
        return _copy_chip(image, details)                  # dlib's basic_extract_image_chip: no resampling
    depth = pyramid_depth(details)
    box = chip_bounding_box(details, depth, height, width)
    if box is None:                                        # the whole chip is outside the photo: black
        return image.new_zeros(3, details.rows, details.cols, dtype=_work_dtype(image.device)) + 0.0 * image.sum()
    level_image = _pixels(image[:, box[1]:box[3] + 1, box[0]:box[2] + 1])
    level, rect = chip_level(details, box)
    for _ in range(level + 1):
        level_image = pyramid_down(level_image)
    xs, ys = chip_sampling_grid(details, rect)
    return interpolate_bilinear(level_image, xs, ys)


def _copy_chip(image: torch.Tensor, details: ChipDetails) -> torch.Tensor:
    """``impl::basic_extract_image_chip``: the rectangle (rounded to integers) copied, black outside the photo."""
    left, top = lround(details.rect[0]), lround(details.rect[1])
    pixels = _pixels(image)
    _, h, w = pixels.shape
    rows, cols = details.rows, details.cols
    pad_l, pad_t = max(0, -left), max(0, -top)
    padded = F.pad(pixels, (pad_l, max(0, left + cols - w), pad_t, max(0, top + rows - h)))
    return padded[:, top + pad_t:top + pad_t + rows, left + pad_l:left + pad_l + cols]


def extract_face_chips(images: torch.Tensor, parts: torch.Tensor, size: int = CHIP_SIZE,
                       padding: float = CHIP_PADDING) -> torch.Tensor:
    """:func:`extract_face_chip` over a batch: images [N, 3, H, W] in [0, 1], parts [N, 5, 2] -> [N, 3, size,
    size]. Each face has its own geometry (and pyramid depth), so the faces are processed one by one."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"extract_face_chips: images must be [N, 3, H, W], got {tuple(images.shape)}")
    parts = torch.as_tensor(parts)
    if parts.dim() == 2:
        parts = parts.unsqueeze(0)
    if tuple(parts.shape) != (images.shape[0], 5, 2):
        raise ValueError(f"extract_face_chips: parts must be [{images.shape[0]}, 5, 2], got {tuple(parts.shape)}")
    return torch.stack([extract_face_chip(img, p, size, padding) for img, p in zip(images, parts)])
