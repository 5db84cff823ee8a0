"""Private reference photos, prepared once: detected, face-centred, resized, landmarks mapped, split into Xc / X0.

Landmarks are detected on the full-resolution clean photo (small training crops are too small for detectors)
and carried through the crop; IDDM reuses them for every perturbed version and one-step prediction.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import InputError
from ..images import Photo, crop_resize, load_folder, to_tensor
from .split import Split, check_count, split_by_names, split_indices

if TYPE_CHECKING:
    import torch

# Face-centred crop side as a multiple of the detected box size: head and shoulders, like a portrait.
DEFAULT_CROP_FACTOR = 2.2


@dataclass
class PrivateRefs:
    images: "torch.Tensor"          # [N, 3, R, R] in [0, 1]
    landmarks: "torch.Tensor"       # [N, 5, 2] pixel coordinates in the R x R crops ([N, 10, 2]: + dlib's parts)
    split: Split
    names: list[str] = field(repr=False)   # for error messages and the user's own preview only; never written out
    # names of the photos left out because no face was found in them: for the user's own screen (terminal, error
    # messages), in memory only; never logged, never written to a LoRA, report or file
    skipped: list[str] = field(default_factory=list, repr=False)
    # whether the photos show one person (check_identity; None until checked): indices only, in memory
    identity: "IdentityCheck | None" = field(default=None, repr=False)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def reference(self):
        i = list(self.split.reference)
        return self.images[i], self.landmarks[i]

    def protect(self):
        i = list(self.split.protect)
        return self.images[i], self.landmarks[i]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        # the crops' pixels and the photos' names never go into a repr (a host may log or keep it)
        return (f"PrivateRefs({len(self)} photos at {self.resolution}px, {len(self.split.reference)} reference, "
                f"{len(self.split.protect)} protected, {len(self.skipped)} skipped)")


def skipped_note(skipped: list[str]) -> str:
    """One sentence naming the photos in which no face was found, for the user's own screen ("" when none).

    Shown in error messages and printed to the terminal only; never logged, never written to a file."""
    if not skipped:
        return ""
    return f"No face was found in {len(skipped)} photo(s), not used: {', '.join(skipped)}."


def _photo_label(photo: Photo) -> str:
    return str(getattr(photo, "path", None) or photo.name)


def _prepare(photos: list[Photo], resolution: int, detector, crop_factor: float, skip_faceless: bool):
    """Like :func:`prepare_photos`, but with no photo left the lists are empty instead of an error."""
    import torch

    images, landmarks, names, skipped, faceless = [], [], [], [], []
    for photo in photos:
        faces = detector.detect(photo.rgb)
        if not faces:
            skipped.append(photo.name)
            faceless.append(_photo_label(photo))
            continue
        face = faces[0]
        x0, y0, x1, y1 = face.box
        side = crop_factor * max(x1 - x0, y1 - y0)
        center = tuple(face.landmarks.mean(axis=0))
        crop, (scale, left, top) = crop_resize(photo.rgb, resolution, center=center, side=side)
        images.append(to_tensor(crop))
        landmarks.append(torch.from_numpy(face.scaled(scale, left, top).points()))
        names.append(photo.name)
    if faceless and not skip_faceless:
        # every faceless photo at once, so the user can fix the folder in one go
        raise InputError(f"no face detected in {', '.join(faceless)}")
    return images, landmarks, names, skipped


def prepare_photos(photos: list[Photo], resolution: int, detector, crop_factor: float = DEFAULT_CROP_FACTOR,
                   skip_faceless: bool = True):
    """Detect the largest face of each photo, crop around it, resize. Returns (images, landmarks, names, skipped).

    ``skipped``: the names of the photos in which no face was found (``skip_faceless=False``: an error naming
    all of them instead). No face in any photo is an error that names the photos."""
    import torch

    images, landmarks, names, skipped = _prepare(photos, resolution, detector, crop_factor, skip_faceless)
    if not images:
        raise InputError(f"no face detected in any photo of the folder ({', '.join(skipped)})")
    return torch.stack(images), torch.stack(landmarks), names, skipped


# 9 parameters: the photo folder's options (split, framing, faceless photos), each with a default, which the
# CLI, the nodes, the tab and the batch worker pass by name.
def load_private_refs(folder: str | os.PathLike, resolution: int, detector=None, seed: int = 0,
                      n_reference: int | None = None, reference_files: list[str] | None = None,
                      protect_files: list[str] | None = None, crop_factor: float = DEFAULT_CROP_FACTOR,
                      skip_faceless: bool = True) -> PrivateRefs:
    """Everything IDDM needs from the user's photo folder.

    Photos without a face are left out and their names kept in :attr:`PrivateRefs.skipped` (in memory only: show
    them to the user, e.g. with :func:`skipped_note`); ``skip_faceless=False`` makes any of them an error naming
    every such file. Fewer than 3 photos with a face is an error naming the folder and the photos left out."""
    if resolution < 32 or resolution % 8:   # before the detector is loaded
        raise InputError(f"resolution={resolution} must be a multiple of 8 and at least 32")
    photos = load_folder(folder)
    if detector is None:
        from ..face.detect import get_detector

        detector = get_detector("dlib")
    return refs_from_photos(photos, resolution, detector, seed, n_reference, reference_files, protect_files,
                            crop_factor, skip_faceless=skip_faceless, source=str(folder))


# 10 parameters: load_private_refs's, for photos already in memory, plus the folder named in errors.
def refs_from_photos(photos: list[Photo], resolution: int, detector, seed: int = 0, n_reference: int | None = None,
                     reference_files: list[str] | None = None, protect_files: list[str] | None = None,
                     crop_factor: float = DEFAULT_CROP_FACTOR, skip_faceless: bool = True,
                     source: str | None = None) -> PrivateRefs:
    """:func:`load_private_refs` on photos already in memory (``source``: the folder, named in errors)."""
    import torch

    if resolution < 32 or resolution % 8:
        raise InputError(f"resolution={resolution} must be a multiple of 8 and at least 32")
    if source is None:
        parents = {str(p.path.parent) for p in photos if getattr(p, "path", None) is not None}
        source = parents.pop() if len(parents) == 1 else None
    images, landmarks, names, skipped = _prepare(photos, resolution, detector, crop_factor, skip_faceless)
    note = skipped_note(skipped)
    check_count(len(names), f" in {source}" if source else "", note)
    listed = list(reference_files or []) + list(protect_files or [])
    faceless_listed = [n for n in listed if n in skipped]
    if faceless_listed:
        raise InputError(f"listed photo(s) {', '.join(faceless_listed)}: no face was found in them; remove them "
                         f"from the list or replace the photos")
    if reference_files:
        split = split_by_names(names, reference_files, protect_files)
    else:
        split = split_indices(len(names), seed=seed, n_reference=n_reference)
    return PrivateRefs(torch.stack(images), torch.stack(landmarks), split, names, skipped)


# ------------------------------------------------------------------------------------------ one person?
DLIB_SAME_PERSON = 0.6      # dlib's own threshold: descriptors closer than this are the same person


@dataclass
class IdentityCheck:
    """dlib's view of whether the prepared photos show one person. Indices refer to :class:`PrivateRefs`
    (``refs.names[i]``); nothing here holds a name, so it may be kept, but it is never written anywhere.

    ``majority``: more than half of the photos match one photo (and so, by dlib's threshold, one another's
    person); ``outliers``: the photos outside that majority (all of them when there is none)."""

    distances: "torch.Tensor" = field(repr=False)   # [N, N] Euclidean distances of dlib's descriptors
    outliers: list[int]
    majority: bool
    threshold: float = DLIB_SAME_PERSON

    @property
    def consistent(self) -> bool:
        return self.majority and not self.outliers


def check_identity(refs: PrivateRefs, recognizer=None, threshold: float = DLIB_SAME_PERSON,
                   chunk: int = 8) -> "IdentityCheck | None":
    """Compare every pair of prepared faces with dlib's descriptors (the crops and landmarks IDDM trains on) and
    find the photos that do not match the majority. Stores the result in ``refs.identity`` and returns it.

    A warning, never a refusal: the user decides (a photo may be theirs at another age). ``None`` (and nothing
    stored) when dlib's recognition model is not installed. See :func:`identity_note` for the user's message."""
    import torch

    from ..errors import ModelError

    if recognizer is None:
        from ..face.dlib_resnet import load_dlib_recognizer

        try:
            recognizer = load_dlib_recognizer()
        except ModelError:
            return None
    n = len(refs)
    with torch.no_grad():
        parts = []
        for lo in range(0, n, chunk):
            images = refs.images[lo:lo + chunk].float()
            parts.append(recognizer(recognizer.align(images, refs.landmarks[lo:lo + chunk].float())).float())
        descriptors = torch.cat(parts)
    distances = torch.cdist(descriptors, descriptors)
    match = distances < threshold
    match.fill_diagonal_(True)
    support = match.sum(dim=1)
    median = distances.median(dim=1).values
    # the photo matching the most others (ties: the one closest to the rest) and its matches form the majority
    anchor = min(range(n), key=lambda i: (-int(support[i]), float(median[i]), i))
    group = match[anchor]
    majority = 2 * int(group.sum()) > n
    outliers = [i for i in range(n) if not group[i]] if majority else list(range(n))
    refs.identity = IdentityCheck(distances, outliers, majority, threshold)
    return refs.identity


def folder_positions(refs: PrivateRefs, names: list[str]) -> tuple[str, int]:
    """("#2, #5", 7): the positions of photos ``names`` (used or skipped) in ``refs``' folder sorted by file name,
    and how many photos it holds. How a host that keeps what it shows (ComfyUI's /history) names a photo."""
    order = sorted(list(refs.names) + list(refs.skipped))
    return ", ".join(f"#{order.index(name) + 1}" for name in names), len(order)


def identity_note(refs: PrivateRefs, show_names: bool = True) -> str:
    """The warning for the user's screen ("" when the photos look like one person, or were not checked).

    ``show_names``: name a photo by its file name; False: by its position in the folder sorted by file name (for
    hosts that keep what they show, as ComfyUI's /history does). Never for a log, a report or a LoRA."""
    check = getattr(refs, "identity", None)
    if check is None or check.consistent:
        return ""
    if not check.majority:
        return (f"warning: these {len(refs)} photos do not look like one person to dlib (no photo matches more than "
                "half of the others): IDDM protects one person's photos; check that every photo shows you")
    names = [refs.names[i] for i in check.outliers]
    if show_names:
        which = ", ".join(names)
    else:
        positions, total = folder_positions(refs, names)
        which = f"{positions} (of the folder's {total} photos, sorted by file name)"
    return (f"warning: {len(check.outliers)} photo(s) do not look like the same person as the other "
            f"{len(refs) - len(check.outliers)} to dlib: {which}. IDDM protects one person's photos: remove "
            "them unless they show you")
