"""The user's photos in the IDDM tab: a folder and/or uploads, read into memory; gradio's copies of the uploads
deleted once a click has read them (run.py says when); the faces found and the split made (``prepare_refs``).

Photo names appear only in texts for the user's own screen, never in a log line.
"""
from __future__ import annotations

import os
from pathlib import Path


def upload_files(uploads) -> list[tuple[Path, str]]:
    """(path of gradio's copy, the file's own name) per uploaded file; gradio 3.41 gives temp-file objects
    (``.name`` the copy, ``.orig_name`` the user's name), gradio 4 paths (str subclasses)."""
    if not uploads:
        return []
    items = uploads if isinstance(uploads, (list, tuple)) else [uploads]
    out = []
    for item in items:
        if isinstance(item, dict):
            path, orig = item.get("path") or item.get("name"), item.get("orig_name")
        elif isinstance(item, (str, os.PathLike)):
            path, orig = os.fspath(item), None
        else:
            path, orig = getattr(item, "name", None), getattr(item, "orig_name", None)
        if path:
            out.append((Path(path), Path(orig or path).name))
    return out


UPLOADS_DELETED = ("the temporary copies of the uploaded photos were deleted and the upload box emptied: upload "
                   "them again for another run (or give a photo folder)")
UPLOADS_KEPT = "the uploaded photos are kept: correct it and press Train again"


def upload_copies(uploads) -> list[Path]:
    """Every file gradio wrote for the uploads: the file handed to the tab and, with gradio 3.41, the copy its
    /upload route wrote first (``orig_name`` of the temp-file object: ``<temp>/<random>/<name>``, beside the
    hashed copy ``<temp>/<sha>/<name>`` in ``name``). ``orig_name`` counts only when it is such a sibling path:
    for data sent inline it is the browser's bare file name, which must not be touched."""
    items = uploads if isinstance(uploads, (list, tuple)) else [uploads] if uploads else []
    copies = []
    for (path, _), item in zip(upload_files(uploads), [i for i in items if i]):
        copies.append(path)
        orig = getattr(item, "orig_name", None) if not isinstance(item, (str, os.PathLike, dict)) else None
        if orig and os.path.isabs(orig) and Path(orig) != path and Path(orig).parent.parent == path.parent.parent:
            copies.append(Path(orig))
    return copies


def delete_uploads(uploads) -> int:
    """Delete gradio's copies of the uploaded photos (the user's own files were never on this machine's disk
    under these paths: these are the copies gradio wrote when they were uploaded), and the per-upload folders
    gradio made for them once empty. Returns how many files were deleted."""
    deleted = 0
    for path in upload_copies(uploads):
        try:
            path.unlink()
            deleted += 1
        except OSError:
            pass
        try:
            path.parent.rmdir()             # only succeeds when empty: gradio makes one folder per upload
        except OSError:
            pass
    items = uploads if isinstance(uploads, (list, tuple)) else [uploads] if uploads else []
    for item in items:                      # gradio 3.41 hands over open (empty) temp-file objects
        close = getattr(item, "close", None)
        if callable(close):
            try:
                close()
            except Exception:               # noqa: BLE001 - closing is tidiness only
                pass
    return deleted


def load_photos(folder: str, uploads) -> tuple[list, str]:
    """The photos of ``folder`` and the uploaded ones, in memory, and how to name their source in messages."""
    from iddm_core.errors import InputError
    from iddm_core.images import Photo, load_folder, load_rgb

    photos, sources = [], []
    folder = (folder or "").strip()
    if folder:
        path = Path(folder).expanduser()
        photos += load_folder(path)
        sources.append(str(path))
    seen = {p.name for p in photos}
    files = upload_files(uploads)
    for path, name in files:
        unique, n = name, 2
        while unique in seen:
            stem, dot, ext = name.rpartition(".")
            unique = f"{stem} ({n}).{ext}" if dot else f"{name} ({n})"
            n += 1
        seen.add(unique)
        photos.append(Photo(unique, Path(unique), load_rgb(path)))
    if files:
        sources.append("the uploaded photos")
    if not photos:
        raise InputError("photos: give the folder of your photos, or upload them (3 or more photos of one person)")
    return photos, " and ".join(sources)


def prepare_refs(request, resolution: int):
    """The PrivateRefs of a :class:`~.request.TrainRequest`'s photos at ``resolution`` (split settings checked
    first; a photo set that may hold two people is noted, never refused)."""
    from iddm_core.face.detect import get_detector
    from iddm_core.frontend import check_number, parse_file_list
    from iddm_core.protection.refs import check_identity, refs_from_photos

    seed = check_number("split_seed", request.split_seed, (0, 0xFFFFFFFF, True, "seed of the reference split"))
    n_reference = check_number("n_reference", request.n_reference,
                               (0, 100000, True, "reference photos; 0 = half of them"))
    photos, source = load_photos(request.photos_folder, request.uploads)
    refs = refs_from_photos(photos, int(resolution), get_detector("dlib"), seed=seed,
                            n_reference=n_reference or None,
                            reference_files=parse_file_list(request.reference_files),
                            skip_faceless=bool(request.skip_faceless), source=source)
    check_identity(refs)               # one person? a warning in the photos text (refs_summary), never a refusal
    return refs
