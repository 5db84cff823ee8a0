"""SaveImageNoMetadata: PNG files in ComfyUI's output folder that carry pixels only.

ComfyUI's own Save Image embeds the prompt and the whole workflow (every widget value of every node) as PNG
text chunks unless ComfyUI runs with ``--disable-metadata``. A graph that trains on the user's photos would put
the photo folder and file names into every portrait. This node writes no text chunk at all, whatever the
server flags, so its files can be posted as they are. Module level imports only the standard library.
"""
from __future__ import annotations

from .specs import CATEGORY


def to_uint8(images):
    """ComfyUI IMAGE [B, H, W, C] floats in [0, 1] -> uint8 numpy [B, H, W, C] (C = 3, or 4 with alpha)."""
    import numpy as np

    array = images.detach().float().clamp(0, 1).mul(255).round().to("cpu").numpy().astype(np.uint8)
    if array.ndim == 3:                      # one image without the batch axis
        array = array[None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


def write_png(rgb, path) -> None:
    """Encode one uint8 H x W x 3|4 array as a PNG at ``path``: pixels only, no text, EXIF or ICC chunk."""
    from PIL import Image

    Image.fromarray(rgb).save(path, format="PNG", compress_level=4)


def save_images(images, filename_prefix: str, temp: bool = False) -> list[dict]:
    """Write each image as ``<prefix>_<counter:05>_.png`` (ComfyUI's naming) into the output (or temp) folder,
    each file atomically (temp file + rename; an existing file is never replaced). Returns ComfyUI's ``ui``
    entries ({filename, subfolder, type}) so the frontend shows the images."""
    from ..iddm_core.atomic import atomic_write
    from ..iddm_core.errors import InputError
    from .comfy_env import image_target

    arrays = to_uint8(images)
    height, width = arrays.shape[1:3]
    folder, stem, counter, subfolder, kind = image_target(filename_prefix, width, height, temp)
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for rgb in arrays:
        while True:
            name = f"{stem}_{counter:05}_.png"
            counter += 1
            if (folder / name).exists():
                continue
            try:
                atomic_write(folder / name, lambda tmp, rgb=rgb: write_png(rgb, tmp), overwrite=False)
            except InputError:
                if (folder / name).exists():     # another save took the name meanwhile: next counter
                    continue
                raise
            break
        saved.append({"filename": name, "subfolder": subfolder, "type": kind})
    return saved


class SaveImageNoMetadata:
    DESCRIPTION = ("Saves images as PNG files in ComfyUI's output folder with no metadata: unlike Save Image, no "
                   "prompt and no workflow are embedded (whatever --disable-metadata says), so nothing about how "
                   "they were made, and no photo folder or file name, travels with the files.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save, e.g. from VAE Decode."}),
                "filename_prefix": ("STRING", {"default": "iddm_portrait",
                                               "tooltip": "File name prefix in ComfyUI's output folder; may "
                                                          "contain a sub-folder (portraits/me), like Save "
                                                          "Image's."}),
            },
        }

    def save(self, images, filename_prefix="iddm_portrait"):
        return {"ui": {"images": save_images(images, filename_prefix)}}
