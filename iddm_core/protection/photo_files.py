"""The protected photos as files: the 8-bit grid inside the budget, output names, PNG writing, photo loading.

The protected set is quantised once (:func:`quantise`: 8-bit, still within eta of the 8-bit originals after the
PNG round trip) and written as PNGs without any text, EXIF or ICC chunk, each atomically. Original file names stay
in memory (``--keep-names`` and error messages only).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import InputError


def quantise(x: torch.Tensor, clean_u8: torch.Tensor, eta: float) -> torch.Tensor:
    """``x`` [N, 3, H, W] in [0, 1] -> uint8 values (as a uint8 tensor) that stay within eta of the 8-bit clean
    photos ``clean_u8`` after the PNG round trip: round, then clip to the 8-bit eta ball, then to [0, 255]."""
    budget = math.floor(eta * 255 + 1e-6)
    q = x.detach().float().mul(255).round()
    o = clean_u8.float()
    q = torch.minimum(torch.maximum(q, o - budget), o + budget).clamp(0, 255)
    return q.to(torch.uint8)


DEFAULT_NAMES = "protected_{n:03d}.png"


def output_names(pattern: str, count: int, originals: list[str] | None = None) -> list[str]:
    """File names of the protected photos: ``pattern`` with ``{n}`` (1-based, format spec allowed, e.g.
    ``{n:03d}``), or with ``originals`` (``--keep-names``) each original stem + ``.png``."""
    if originals is not None:
        names = [Path(o).stem + ".png" for o in originals]
    else:
        if "{n" not in pattern:
            raise InputError(f"names={pattern!r} must contain {{n}} (the photo number), e.g. {DEFAULT_NAMES}")
        try:
            names = [pattern.format(n=i + 1) for i in range(count)]
        except (ValueError, KeyError, IndexError) as exc:
            raise InputError(f"names={pattern!r} is not a valid pattern ({exc}); e.g. {DEFAULT_NAMES}") from None
        names = [n if n.lower().endswith(".png") else n + ".png" for n in names]
    for n in names:
        if "/" in n or "\\" in n or n in (".png", "..png") or n.startswith("."):
            raise InputError(f"names={pattern!r}: {n!r} is not a plain file name")
    if len(set(names)) != len(names):
        raise InputError(f"names={pattern!r} gives the same file name twice; use {{n}} in it")
    return names


def check_outputs(folder, names: list[str], overwrite: bool) -> list[Path]:
    """The output paths; refuses (before any work) a folder that is a file, or existing files without overwrite."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out {folder} is a file, not a folder")
    paths = [folder / n for n in names]
    if not overwrite:
        existing = [p for p in paths if p.exists()]
        if existing:
            raise InputError(f"{existing[0]} already exists ({len(existing)} of the outputs do); choose another "
                             "--out or --names, or add --overwrite")
    return paths


def write_png(image: torch.Tensor, path, overwrite: bool = False) -> Path:
    """One image [3, H, W] on the 8-bit grid -> a PNG with no text, EXIF or ICC chunk, written atomically."""
    import numpy as np
    from PIL import Image

    from ..atomic import atomic_write

    rgb = image.detach().mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    rgb = np.ascontiguousarray(rgb)
    return atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG", pnginfo=None), overwrite)


def save_all(images: torch.Tensor, paths: list[Path], overwrite: bool = False) -> list[Path]:
    Path(paths[0]).parent.mkdir(parents=True, exist_ok=True)
    return [write_png(img, p, overwrite) for img, p in zip(images, paths)]


def load_photos(folder, resolution: int):
    """(images [N, 3, r, r] on the 8-bit grid, original file names): every image of ``folder``, centre square
    crop resized to ``resolution``. File names stay in memory (for --keep-names and error messages only)."""
    from ..images import crop_resize, load_folder, to_tensor

    photos = load_folder(folder)
    return torch.stack([to_tensor(crop_resize(p.rgb, resolution)[0]) for p in photos]), [p.name for p in photos]
