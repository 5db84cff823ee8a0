"""LoadPrivateRefs: the user's photo folder -> IDDM_REFS (+ a preview of the face crops and a count summary)."""
from __future__ import annotations

import hashlib
import os

from .specs import CATEGORY, REFS, RefsHandle


def parse_file_list(text: str) -> list[str] | None:
    """"a.jpg, b.jpg" or one name per line -> ["a.jpg", "b.jpg"]; empty -> None (use the seeded split)."""
    names = [s.strip() for chunk in (text or "").splitlines() for s in chunk.split(",")]
    names = [s for s in names if s]
    return names or None


def summary_text(refs) -> str:
    """Counts only: the preview text may be saved with the workflow, so it never names a photo."""
    n_ref, n_prot = len(refs.split.reference), len(refs.split.protect)
    lines = [f"{len(refs)} photos with a face at {refs.resolution}px: {n_ref} reference (Xc), {n_prot} protected (X0)"]
    if refs.skipped:
        lines.append(f"{len(refs.skipped)} photo(s) without a detectable face were skipped")
    return "\n".join(lines)


def folder_fingerprint(folder) -> str:
    """Changes when a photo in the folder is added, removed or modified (ComfyUI's IS_CHANGED cache key).

    Kept in memory by ComfyUI only; it is a hash, so no name leaks through it."""
    h = hashlib.sha256()
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return "missing"
    for e in entries:
        if e.is_file():
            st = e.stat()
            h.update(f"{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class LoadPrivateRefs:
    DESCRIPTION = ("Loads your photos, finds the face in each (dlib), crops and splits them into a reference set "
                   "Xc and a protected set X0. Photo names never leave this node.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (REFS, "IMAGE", "STRING")
    RETURN_NAMES = ("refs", "faces", "summary")
    OUTPUT_TOOLTIPS = ("Prepared photos and their split, for PGD Two-Stage and IDDM Train LoRA.",
                       "The face-centred crops (reference set first), for a Preview Image node.",
                       "How many photos were used, per set (counts only).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": ("STRING", {"default": "iddm_photos", "multiline": False,
                                      "tooltip": "Folder with 3+ photos of one person: relative to ComfyUI's input "
                                                 "folder, or an absolute path."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8,
                                       "tooltip": "Side of the face crops for the preview (the training node "
                                                  "re-crops at its own resolution if different)."}),
                "split_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF,
                                       "tooltip": "Seed of the random reference/protected split (not named "
                                                  "'seed', so ComfyUI does not randomise it after each run)."}),
                "n_reference": ("INT", {"default": 0, "min": 0, "max": 1000,
                                        "tooltip": "How many photos form the reference set Xc; 0 = half of them "
                                                   "(at least 2). The rest are protected (X0)."}),
                "skip_faceless": ("BOOLEAN", {"default": True,
                                              "tooltip": "Skip photos where no face is found; off = stop with an "
                                                         "error naming the photo."}),
            },
            "optional": {
                "reference_files": ("STRING", {"default": "", "multiline": True,
                                               "tooltip": "Optional: file names (comma or newline separated) that "
                                                          "form Xc, overriding the seeded split."}),
                "protect_files": ("STRING", {"default": "", "multiline": True,
                                             "tooltip": "Optional: file names that form X0 (default: all photos not "
                                                        "in reference_files)."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, folder, **kwargs):
        from .comfy_env import input_folder

        try:
            return folder_fingerprint(input_folder(folder))
        except Exception:          # let the run itself report the problem
            return float("nan")

    def load(self, folder, resolution, split_seed, n_reference, skip_faceless=True, reference_files="", protect_files=""):
        from .comfy_env import input_folder

        handle = RefsHandle(folder=str(input_folder(folder)), seed=int(split_seed),
                            n_reference=int(n_reference) or None,
                            reference_files=parse_file_list(reference_files),
                            protect_files=parse_file_list(protect_files), skip_faceless=bool(skip_faceless))
        refs = handle.at(int(resolution))
        order = list(refs.split.reference) + list(refs.split.protect)
        preview = refs.images[order].permute(0, 2, 3, 1).contiguous().float().clamp(0, 1)
        return (handle, preview, summary_text(refs))
