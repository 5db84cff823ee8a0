"""Reading user photos: one place for folder listing, decoding and the square crop used for training.

Errors name the file at fault (they are shown to the user only; nothing here logs file names).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class Photo:
    name: str            # file name (never written into outputs)
    path: Path
    rgb: np.ndarray      # H x W x 3, uint8


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"photo folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {folder}")
    return files


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"cannot read image {path}: {exc.__class__.__name__}") from exc


def load_folder(folder: str | os.PathLike, min_count: int = 1) -> list[Photo]:
    photos = [Photo(p.name, p, load_rgb(p)) for p in list_images(folder)]
    if len(photos) < min_count:
        raise InputError(f"folder {folder} has {len(photos)} image(s); at least {min_count} are needed")
    return photos


def square_crop_box(height: int, width: int, center: tuple[float, float] | None = None,
                    side: float | None = None) -> tuple[int, int, int]:
    """A square inside the image (the largest one, or ``side`` pixels clamped to fit), centred on ``center`` (x, y)
    when given and shifted to stay inside: returns (left, top, side)."""
    side = int(round(min(side, height, width))) if side else min(height, width)
    cx, cy = center if center is not None else (width / 2, height / 2)
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, side


def crop_resize(rgb: np.ndarray, size: int, center: tuple[float, float] | None = None, side: float | None = None):
    """Square crop (optionally centred on a face, optionally ``side`` pixels wide) resized to ``size``.

    Returns ``(image uint8 [size,size,3], (scale, left, top))``; a point (x, y) in the original maps to
    ((x - left) * scale, (y - top) * scale) in the result.
    """
    from PIL import Image

    left, top, side = square_crop_box(rgb.shape[0], rgb.shape[1], center, side)
    crop = Image.fromarray(rgb[top:top + side, left:left + side])
    out = np.array(crop.resize((size, size), Image.BICUBIC if side < size else Image.LANCZOS))
    return out, (size / side, left, top)


def load_square_images(folder: str | os.PathLike, size: int):
    """Every image of ``folder``, centre square-cropped and resized to ``size`` -> float tensor [N, 3, size, size]."""
    import torch

    return torch.stack([to_tensor(crop_resize(p.rgb, size)[0]) for p in load_folder(folder)])


def to_tensor(rgb: np.ndarray):
    """uint8 H x W x 3 -> float tensor 3 x H x W in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div(255.0)


def to_uint8(x) -> np.ndarray:
    """float tensor 3 x H x W in [0, 1] -> uint8 H x W x 3 (rounded)."""
    return (x.detach().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
