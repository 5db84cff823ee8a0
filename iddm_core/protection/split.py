"""Reference split: photos X -> reference set Xc (for prototypes and the temporary model) and protection set X0.

Pure functions over indices; deterministic from a seed; a user may name the files of each set instead.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import InputError

MIN_REFERENCE = 2
MIN_PROTECT = 1
MIN_PHOTOS = MIN_REFERENCE + MIN_PROTECT


def check_count(n: int, where: str = "", note: str = "") -> None:
    """Fewer than :data:`MIN_PHOTOS` usable photos is an :class:`InputError` saying how many are needed and how
    many were found (``where``: e.g. " in <folder>", right after the count; ``note``: a sentence added after)."""
    if n < MIN_PHOTOS:
        raise InputError(
            f"need at least {MIN_PHOTOS} photos with a face ({MIN_REFERENCE} reference + {MIN_PROTECT} protected); "
            f"found {n}{where}. {note + ' ' if note else ''}Add more photos of the person.")


@dataclass(frozen=True)
class Split:
    reference: tuple[int, ...]   # indices of Xc
    protect: tuple[int, ...]     # indices of X0


def _check_sizes(n_ref: int, n_protect: int) -> None:
    if n_ref < MIN_REFERENCE or n_protect < MIN_PROTECT:
        raise InputError(
            f"IDDM needs at least {MIN_REFERENCE} reference and {MIN_PROTECT} protected photos with a detectable "
            f"face ({MIN_REFERENCE + MIN_PROTECT} in all); got {n_ref} + {n_protect}. Add more photos of the person.")


def split_indices(n: int, seed: int = 0, n_reference: int | None = None) -> Split:
    """Shuffle ``n`` photos with ``seed`` and take ``n_reference`` of them as Xc (default: half, rounded down, as
    the paper's 4 + 4), the rest as X0."""
    check_count(n)
    if n_reference is None:
        n_reference = max(MIN_REFERENCE, n // 2)
    if n_reference < MIN_REFERENCE or n - n_reference < MIN_PROTECT:
        raise InputError(f"n_reference={n_reference} must be between {MIN_REFERENCE} and {n - MIN_PROTECT}: {n} "
                         f"usable photos, of which at least {MIN_REFERENCE} reference and {MIN_PROTECT} protected")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return Split(tuple(sorted(order[:n_reference])), tuple(sorted(order[n_reference:])))


def split_by_names(names: list[str], reference: list[str], protect: list[str] | None = None) -> Split:
    """User override: ``reference`` file names form Xc; ``protect`` (default: all others) form X0."""
    index = {name: i for i, name in enumerate(names)}
    for wanted in list(reference) + list(protect or []):
        if wanted not in index:
            raise InputError(f"listed photo {wanted!r} is not among the usable photos of the folder")
    ref = sorted({index[n] for n in reference})
    prot = sorted({index[n] for n in protect}) if protect else [i for i in range(len(names)) if i not in ref]
    overlap = set(ref) & set(prot)
    if overlap:
        raise InputError(f"photo(s) {sorted(names[i] for i in overlap)} listed as both reference and protected")
    _check_sizes(len(ref), len(prot))
    return Split(tuple(ref), tuple(prot))
