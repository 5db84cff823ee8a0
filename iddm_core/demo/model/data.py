"""Training data of the demo model: public-domain images that ship with this repo or with scikit-image.

Every source and its licence is listed in ``SOURCES`` (and in the README beside the weights). The demo
identity (``HELD_OUT``: the two Barack Obama photos the demo personalises on) is never used for training.

Faces are cropped the way :func:`iddm_core.protection.refs.prepare_photos` crops a user's photos (a square of 2.2 x the
detected face box around the landmarks' centre) so the base model generates faces where the pipeline expects
them, then augmented (scale, shift, small rotation, mirror, colour). The VAE also sees patches of non-face
photos and textures, at several scales, so its code is a general image code and not a face memory.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import FACES_DIR as FACE_DIR

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
        from ...images import load_rgb

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
    from ...protection.refs import DEFAULT_CROP_FACTOR

    if detector is None:
        from ...face.detect import get_detector

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
                 channel_swap: float = 0.0, faces: np.ndarray | None = None, face_share: float | None = None):
        """``faces`` (uint8 [N, H, W, 3]): face crops to use instead of ``face_crops`` augmented public-domain
        ones (demo model v2: ``Corpus.face_pool``); ``face_share``: draw a face for that share of the patches
        (default: every image, face or not, equally likely)."""
        self.patch = patch
        self.channel_swap = channel_swap
        self.rng = np.random.default_rng(seed)
        images = []
        for name, *_ in SOURCES:
            images.extend(scale_pyramid(load_source(name), 128, 512))
        if faces is None:
            faces, _ = face_pool(face_crops, face_size, seed=seed + 1, detector=detector)
        self.face_share = face_share
        if face_share is None:
            images.extend(list(faces))
            self.images = [im for im in images if min(im.shape[:2]) >= patch]
        else:
            self.images = [im for im in images if min(im.shape[:2]) >= patch]
            self.faces = [im for im in faces if min(im.shape[:2]) >= patch]

    def __call__(self, batch: int):
        import torch

        if self.face_share is None:
            out = np.stack([random_crop(self.images, self.patch, self.rng, self.channel_swap) for _ in range(batch)])
        else:
            out = np.stack([random_crop(self.faces if self.rng.random() < self.face_share else self.images,
                                        self.patch, self.rng, self.channel_swap) for _ in range(batch)])
        return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ------------------------------------------------------------------------------ demo model v2: a face corpus
# A folder-per-identity corpus (the congress portraits of ../shared/faces/congress: DIR/<id>/*.jpg) is turned
# once, with dlib, into face-centred crops (``prepare_crops``); training then reads only the crops folder, so it
# runs where dlib is missing (the GPU machine). Each stored crop is CROP_MARGIN x the pipeline's face crop (2.2 x
# the face box around the landmarks' centre, as ``face_sources``), so augmentation (scale, shift, rotation) has
# real pixels around the frame; outside the photo the edge pixels repeat, as in ``edge_crop``.
TEST_IDENTITIES_FILE = Path(__file__).with_name("test_identities.txt")
CROPS_MANIFEST = "manifest.json"
CROPS_FORMAT = "iddm-demo-crops/1"
CROP_MARGIN = 1.25
CROP_SIZE = 160                   # stored px: the pipeline's 128 px frame is its central 128 px
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def read_identity_list(path=None) -> list[str]:
    """The identities listed in ``path`` (default: the shipped test identities), one per line, ``#`` comments."""
    from ...errors import InputError

    path = Path(path or TEST_IDENTITIES_FILE)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"--test-identities: cannot read {path}: {exc.__class__.__name__}") from exc
    ids = [ln.split("#", 1)[0].strip() for ln in lines]
    ids = [i for i in ids if i]
    bad = [i for i in ids if not _ID_RE.match(i)]
    if bad:
        raise InputError(f"--test-identities: {path} has malformed identity {bad[0]!r}")
    if len(set(ids)) != len(ids):
        raise InputError(f"--test-identities: {path} lists an identity twice")
    return ids


def _identity_folders(faces_dir: Path, out_dir: Path, size: int, overwrite: bool) -> list[Path]:
    """The identity folders of ``faces_dir``, or an InputError naming the option at fault."""
    from ...errors import InputError

    if not faces_dir.is_dir():
        raise InputError(f"--faces: {faces_dir} is not a folder")
    folders = sorted(p for p in faces_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"--faces: {faces_dir} has no identity folders (expected DIR/<id>/*.jpg)")
    bad = [p.name for p in folders if not _ID_RE.match(p.name)]
    if bad:
        raise InputError(f"--faces: identity folder name {bad[0]!r} has characters other than A-Z a-z 0-9 _ . -")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"--out: {out_dir} is not empty (pass --overwrite to replace its crops)")
    if not 64 <= size <= 512:
        raise InputError(f"--size must be 64..512, got {size}")
    return folders


def _crop_identity(folder: Path, out_dir: Path, detector, size: int, margin: float, quality: int):
    """Write the face crops of one identity folder: (manifest entries, "id/photo" names without a face)."""
    from PIL import Image

    from ...atomic import atomic_write
    from ...images import load_rgb
    from ...protection.refs import DEFAULT_CROP_FACTOR

    entries, no_face = [], []
    photos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _PHOTO_SUFFIXES)
    for photo in photos:
        rgb = load_rgb(photo)
        faces = detector.detect(rgb)
        if not faces:
            no_face.append(f"{folder.name}/{photo.name}")
            continue
        face = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        x0, y0, x1, y1 = face.box
        side = DEFAULT_CROP_FACTOR * max(x1 - x0, y1 - y0) * margin
        cx, cy = face.landmarks.mean(axis=0)
        big = int(round(side))
        crop = edge_crop(rgb, int(round(cx - big / 2)), int(round(cy - big / 2)), big)
        img = Image.fromarray(crop).resize((size, size), Image.LANCZOS)
        rel = f"{folder.name}/{len(entries)}.jpg"
        (out_dir / folder.name).mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / rel, lambda tmp: img.save(tmp, format="JPEG", quality=quality), overwrite=True)
        entries.append({"identity": folder.name, "file": rel, "source": photo.name,
                        "face_px": round(float(max(x1 - x0, y1 - y0)), 1), "score": round(float(face.score), 3)})
    return entries, no_face


# 9 parameters: the `prepare` command's options (corpus, output, held-out identities, framing, JPEG quality),
# each with a default, plus the detector and progress hooks the tests replace.
def prepare_crops(faces_dir, out_dir, test_ids=(), detector=None, size: int = CROP_SIZE,
                  margin: float = CROP_MARGIN, quality: int = 93, overwrite: bool = False, progress=None) -> dict:
    """Write ``out_dir/<id>/<n>.jpg`` (``size`` px, JPEG) for every photo of ``faces_dir/<id>/`` in which dlib finds
    a face (the largest), skipping ``test_ids`` entirely, plus ``manifest.json``: the crops, the framing, the
    counts, and the detected boxes of the public-domain training faces (so training needs no detector)."""
    import json

    from ...atomic import write_text_atomic
    from ...errors import InputError
    from ...protection.refs import DEFAULT_CROP_FACTOR

    faces_dir, out_dir = Path(faces_dir), Path(out_dir)
    folders = _identity_folders(faces_dir, out_dir, size, overwrite)
    test_ids = set(test_ids)
    if detector is None:
        from ...face.detect import get_detector

        detector = get_detector("dlib")
    log = progress or (lambda msg: None)
    entries, skipped, no_face, start = [], 0, [], time.time()
    for k, folder in enumerate(folders, start=1):
        if k % 100 == 0:
            log(f"prepare: {k}/{len(folders)} identity folders, {len(entries)} crops ({time.time() - start:.0f}s)")
        if folder.name in test_ids:
            skipped += 1
            continue
        found, faceless = _crop_identity(folder, out_dir, detector, size, margin, quality)
        entries += found
        no_face += faceless
    if not entries:
        raise InputError(f"--faces: no face found in any photo of {faces_dir}")
    public = {}
    for src_name, src in zip(FACES, face_sources(detector)):
        public[src_name] = {"center": [round(float(c), 3) for c in src.center], "side": round(float(src.side), 3)}
    manifest = {"format": CROPS_FORMAT, "size": size, "margin": margin, "crop_factor": DEFAULT_CROP_FACTOR,
                "identities": len({e["identity"] for e in entries}), "crops": entries,
                "test_identities_skipped": skipped, "no_face": no_face, "public_faces": public,
                "seconds": round(time.time() - start, 1)}
    write_text_atomic(out_dir / CROPS_MANIFEST, json.dumps(manifest, indent=1), overwrite=True)
    log(f"prepare: {len(entries)} crops of {manifest['identities']} identities, {skipped} test identities skipped, "
        f"{len(no_face)} photos without a face ({manifest['seconds']:.0f}s)")
    return manifest


@dataclass
class Corpus:
    """The crops folder of ``prepare_crops``, loaded: each crop as a :class:`FaceSource` (word ``person``) and
    the public-domain training faces (words man / woman) framed by the boxes in the manifest."""
    crops: list            # FaceSource per crop
    identities: list       # identity per crop
    public: list           # FaceSource of the public-domain faces (FACES)

    @classmethod
    def load(cls, crops_dir, test_ids=None) -> "Corpus":
        import json

        from ...errors import InputError
        from ...images import load_rgb

        crops_dir = Path(crops_dir)
        path = crops_dir / CROPS_MANIFEST
        if not path.is_file():
            raise InputError(f"--data: {crops_dir} has no {CROPS_MANIFEST} (make it with "
                             f"`python -m iddm_core.demo.model prepare`)")
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != CROPS_FORMAT:
            raise InputError(f"--data: {path} is not a crops manifest of format {CROPS_FORMAT}")
        held = set(read_identity_list() if test_ids is None else test_ids)
        leaked = sorted({e["identity"] for e in manifest["crops"]} & held)
        if leaked:
            raise InputError(f"--data: {crops_dir} holds crops of {len(leaked)} test identities (e.g. {leaked[0]}); "
                             f"prepare it again with the test identities skipped")
        size, margin = int(manifest["size"]), float(manifest["margin"])
        crops, ids = [], []
        for e in manifest["crops"]:
            rgb = load_rgb(crops_dir / e["file"])
            if rgb.shape[:2] != (size, size):
                raise InputError(f"--data: {e['file']} is {rgb.shape[1]} x {rgb.shape[0]}, not {size} px")
            crops.append(FaceSource(rgb, (size / 2, size / 2), size / margin, "person"))
            ids.append(e["identity"])
        public = [FaceSource(load_source(name), tuple(box["center"]), float(box["side"]), FACES[name])
                  for name, box in manifest["public_faces"].items()]
        return cls(crops, ids, public)

    def face_pool(self, n: int, size: int, seed: int = 0, public_share: float = 0.05,
                  threads: int | None = None) -> tuple[np.ndarray, list[str]]:
        """``n`` augmented face crops [n, size, size, 3] uint8 and their words: a share ``public_share`` of the
        public-domain faces, the rest every corpus crop in turn (shuffled), each with its own random stream, so
        the pool is the same for any number of ``threads``."""
        from concurrent.futures import ThreadPoolExecutor

        order = np.random.default_rng(seed).permutation(len(self.crops))

        def one(i):
            rng = np.random.default_rng([seed, i])
            if self.public and rng.random() < public_share:
                src = self.public[int(rng.integers(len(self.public)))]
            else:
                src = self.crops[order[i % len(order)]]
            return augment_face(src, size, rng), src.word

        with ThreadPoolExecutor(threads or min(16, os.cpu_count() or 1)) as pool:
            out = list(pool.map(one, range(n)))
        return np.stack([im for im, _ in out]), [w for _, w in out]
