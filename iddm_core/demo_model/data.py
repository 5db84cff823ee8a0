"""Training data of the demo model: public-domain images that ship with this repo or with scikit-image.

Every source and its licence is listed in ``SOURCES`` (and in the README beside the weights). The demo
identity (``HELD_OUT``: the two Barack Obama photos the demo personalises on) is never used for training.

Faces are cropped the way :func:`iddm_core.refs.prepare_photos` crops a user's photos (a square of 2.2 x the
detected face box around the landmarks' centre) so the base model generates faces where the pipeline expects
them, then augmented (scale, shift, small rotation, mirror, colour). The VAE also sees patches of non-face
photos and textures, at several scales, so its code is a general image code and not a face memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import FACES_DIR as FACE_DIR

# (file, what it shows, where it comes from, licence)
SOURCES = (
    ("biden.jpg", "Joe Biden (face)", "test images of the face_recognition 1.3.0 source package (PyPI)",
     "US government work, public domain"),
    ("astronaut.jpg", "Eileen Collins (face)", "scikit-image data.astronaut()", "NASA, public domain"),
    ("skimage:camera", "cameraman", "scikit-image data.camera()", "CC0 (Lav Varshney)"),
    ("skimage:coffee", "cup of coffee", "scikit-image data.coffee()", "CC0 (Rachel Michetti)"),
    ("skimage:chelsea", "cat", "scikit-image data.chelsea()", "CC0 (Stefan van der Walt)"),
    ("skimage:rocket", "rocket launch", "scikit-image data.rocket()", "SpaceX, public domain"),
    ("skimage:horse", "horse silhouette", "scikit-image data.horse()", "CC0 (Andreas Preuss)"),
    ("skimage:brick", "brick texture", "scikit-image data.brick()", "CC0 (CC0Textures)"),
    ("skimage:grass", "grass texture", "scikit-image data.grass()", "CC0 (CC0Textures)"),
    ("skimage:gravel", "gravel texture", "scikit-image data.gravel()", "CC0 (CC0Textures)"),
    ("skimage:hubble_deep_field", "galaxies", "scikit-image data.hubble_deep_field()", "NASA, public domain"),
    ("skimage:retina", "retina", "scikit-image data.retina()", "CC0"),
    ("skimage:coins", "coins", "scikit-image data.coins()", "no known copyright restrictions"),
    ("skimage:immunohistochemistry", "stained tissue", "scikit-image data.immunohistochemistry()",
     "no known copyright restrictions"),
)
FACES = {"biden.jpg": "man", "astronaut.jpg": "woman"}
HELD_OUT = ("obama.jpg", "obama2.jpg")      # the demo identity: never in the base model's training data


def load_source(name: str) -> np.ndarray:
    """uint8 H x W x 3 of one entry of ``SOURCES`` (grey images repeated to three channels)."""
    if name in HELD_OUT:
        raise ValueError(f"{name} is the demo identity, held out of training")
    if name.startswith("skimage:"):
        import skimage.data

        rgb = getattr(skimage.data, name.split(":", 1)[1])()
    else:
        from ..images import load_rgb

        rgb = load_rgb(FACE_DIR / name)
    rgb = np.asarray(rgb)
    if rgb.dtype == bool:
        rgb = rgb.astype(np.uint8) * 255
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    return np.ascontiguousarray(rgb[..., :3].astype(np.uint8))


@dataclass
class FaceSource:
    rgb: np.ndarray          # whole photo
    center: tuple            # (x, y) of the landmarks' centre
    side: float              # crop side of the pipeline's face crop (2.2 x the face box)
    word: str                # "man" | "woman"


def face_sources(detector=None) -> list[FaceSource]:
    """The training faces with the crop the pipeline would take of them."""
    from ..refs import DEFAULT_CROP_FACTOR

    if detector is None:
        from ..face.detect import get_detector

        detector = get_detector("dlib")
    out = []
    for name, word in FACES.items():
        rgb = load_source(name)
        faces = detector.detect(rgb)
        if not faces:
            raise RuntimeError(f"no face found in training photo {name}")
        x0, y0, x1, y1 = faces[0].box
        out.append(FaceSource(rgb, tuple(faces[0].landmarks.mean(axis=0)),
                              DEFAULT_CROP_FACTOR * max(x1 - x0, y1 - y0), word))
    return out


def augment_face(src: FaceSource, size: int, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """One augmented face crop (uint8 size x size x 3): scale, shift, rotation, mirror, brightness/contrast/colour."""
    from PIL import Image, ImageEnhance

    side = src.side * (1 + strength * rng.uniform(-0.12, 0.12))
    cx = src.center[0] + strength * rng.uniform(-0.05, 0.05) * side
    cy = src.center[1] + strength * rng.uniform(-0.05, 0.05) * side
    angle = strength * rng.uniform(-8, 8)
    # rotate a larger square around the face centre, then take the central crop
    big = int(round(side * 1.5))
    left, top = int(round(cx - big / 2)), int(round(cy - big / 2))
    img = Image.fromarray(edge_crop(src.rgb, left, top, big))
    img = img.rotate(angle, resample=Image.BICUBIC)
    inner = (big - side) / 2
    img = img.crop((int(round(inner)), int(round(inner)), int(round(inner + side)), int(round(inner + side))))
    img = img.resize((size, size), Image.LANCZOS)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(1 + strength * rng.uniform(-0.15, 0.15))
    img = ImageEnhance.Contrast(img).enhance(1 + strength * rng.uniform(-0.15, 0.15))
    img = ImageEnhance.Color(img).enhance(1 + strength * rng.uniform(-0.2, 0.2))
    return np.asarray(img)


def edge_crop(rgb: np.ndarray, left: int, top: int, side: int) -> np.ndarray:
    """The ``side`` x ``side`` square at (left, top) of ``rgb``; outside the photo its edge pixels are repeated."""
    h, w = rgb.shape[:2]
    pads = (max(0, -top), max(0, top + side - h)), (max(0, -left), max(0, left + side - w))
    padded = np.pad(rgb, (*pads, (0, 0)), mode="edge")
    y, x = top + pads[0][0], left + pads[1][0]
    return padded[y:y + side, x:x + side]


def face_pool(n: int, size: int, seed: int = 0, detector=None) -> tuple[np.ndarray, list[str]]:
    """``n`` augmented face crops [n, size, size, 3] uint8 (alternating identities) and their words."""
    rng = np.random.default_rng(seed)
    sources = face_sources(detector)
    images, words = [], []
    for i in range(n):
        src = sources[i % len(sources)]
        images.append(augment_face(src, size, rng))
        words.append(src.word)
    return np.stack(images), words


def scene_pool(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` random ``size`` px crops [n, size, size, 3] uint8 of the non-face sources at several scales, mirrored
    and with permuted colour channels at random: what teaches the UNet denoising in general, so that it does not
    just memorise the few training faces (a UNet trained on faces alone predicted the held-out person's noise
    worse than predicting zero at small timesteps, and DreamBooth on it diverged)."""
    rng = np.random.default_rng(seed)
    images = [im for name, *_ in SOURCES if name not in FACES
              for im in scale_pyramid(load_source(name), size, 512) if min(im.shape[:2]) >= size]
    return np.stack([random_crop(images, size, rng, channel_swap=0.5) for _ in range(n)])


def random_crop(images: list[np.ndarray], size: int, rng: np.random.Generator, channel_swap: float) -> np.ndarray:
    """A ``size`` px square at a random place of a random one of ``images``, mirrored half the time, its RGB
    channels permuted with probability ``channel_swap``."""
    im = images[rng.integers(len(images))]
    y, x = rng.integers(im.shape[0] - size + 1), rng.integers(im.shape[1] - size + 1)
    crop = im[y:y + size, x:x + size]
    crop = crop[:, ::-1] if rng.random() < 0.5 else crop
    return crop[..., rng.permutation(3)] if rng.random() < channel_swap else crop


def scale_pyramid(rgb: np.ndarray, min_side: int, max_side: int, count: int = 3) -> list[np.ndarray]:
    """``rgb`` resized so its shorter side takes ``count`` values from ``min_side`` to ``max_side``."""
    from PIL import Image

    out = []
    short = min(rgb.shape[:2])
    for target in np.geomspace(min_side, max_side, count):
        scale = min(1.0, float(target) / short)
        h, w = max(1, int(round(rgb.shape[0] * scale))), max(1, int(round(rgb.shape[1] * scale)))
        out.append(np.asarray(Image.fromarray(rgb).resize((w, h), Image.LANCZOS)))
    return out


class PatchSampler:
    """Random square patches (float [-1, 1], N x 3 x p x p) of every source image at several scales, plus
    augmented face crops: the VAE's training data. ``channel_swap``: share of patches whose RGB channels are
    randomly permuted (most sources are grey or brownish, and without it the VAE learns their colour cast)."""

    def __init__(self, patch: int, seed: int = 0, face_crops: int = 64, face_size: int = 128, detector=None,
                 channel_swap: float = 0.0):
        self.patch = patch
        self.channel_swap = channel_swap
        self.rng = np.random.default_rng(seed)
        images = []
        for name, *_ in SOURCES:
            images.extend(scale_pyramid(load_source(name), 128, 512))
        faces, _ = face_pool(face_crops, face_size, seed=seed + 1, detector=detector)
        images.extend(list(faces))
        self.images = [im for im in images if min(im.shape[:2]) >= patch]

    def __call__(self, batch: int):
        import torch

        out = np.stack([random_crop(self.images, self.patch, self.rng, self.channel_swap) for _ in range(batch)])
        return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
