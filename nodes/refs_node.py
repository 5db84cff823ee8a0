"""LoadPrivateRefs: the user's photo folder -> IDDM_REFS (+ the face crops in memory and a summary).

Nothing of the photos is written anywhere unless the user turns on ``preview_on_node`` (crops to ComfyUI's temp
folder, like a Preview Image node). No photo name or folder leaves this node: ComfyUI keeps every node's text and
outputs, and an error's input reprs, in its /history, so a photo left out is named by its position in the folder.
"""
from __future__ import annotations

import hashlib
import os

from .specs import CATEGORY, REFS, RefsHandle


# Shared with the A1111/Forge tab (iddm_core.frontend); the names stay importable here. summary_text: the counts
# and the photos left out, for the user's screen only (the node's text and its ``summary`` output).
from ..iddm_core.frontend import parse_file_list  # noqa: E402,F401
from ..iddm_core.frontend import refs_summary as summary_text  # noqa: E402,F401


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
                   "Xc and a protected set X0. Photo names stay in memory: the summary names a photo left out (no face "
                   "found) by its position in the folder, sorted by file name; no name goes into a LoRA, report, "
                   "log line or ComfyUI's history.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (REFS, "IMAGE", "STRING")
    RETURN_NAMES = ("refs", "faces", "summary")
    OUTPUT_TOOLTIPS = ("Prepared photos and their split, for PGD Two-Stage and IDDM Train LoRA.",
                       "The face-centred crops (reference set first), in memory. A Preview Image node would "
                       "write them to ComfyUI's temp folder (served over /view).",
                       "How many photos were used, per set, and the positions (sorted by file name) of the photos left "
                       "out (no face).")

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
                # appended last: UI workflows store widget values by position
                "preview_on_node": ("BOOLEAN", {"default": False,
                                                "tooltip": "Off (default): the face crops stay in memory (the "
                                                           "'faces' output). On: they are also shown on this node, "
                                                           "which writes them as PNG files to ComfyUI's temp "
                                                           "folder; the server serves that folder over /view to "
                                                           "anyone who can reach it, until ComfyUI restarts."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, folder, **kwargs):
        from .comfy_env import input_folder

        try:
            return folder_fingerprint(input_folder(folder))
        except Exception:          # let the run itself report the problem
            return float("nan")

    def load(self, folder, resolution, split_seed, n_reference, skip_faceless=True, reference_files="", protect_files="",
             preview_on_node=False):
        from .comfy_env import input_folder

        handle = RefsHandle(folder=str(input_folder(folder)), seed=int(split_seed),
                            n_reference=int(n_reference) or None,
                            reference_files=parse_file_list(reference_files),
                            protect_files=parse_file_list(protect_files), skip_faceless=bool(skip_faceless))
        refs = handle.at(int(resolution))
        if refs.identity is None:           # dlib: do the photos show one person? (a warning in the summary)
            from ..iddm_core.protection.refs import check_identity

            check_identity(refs)
        order = list(refs.split.reference) + list(refs.split.protect)
        preview = refs.images[order].permute(0, 2, 3, 1).contiguous().float().clamp(0, 1)
        summary = summary_text(refs, show_names=False)     # ComfyUI keeps node text and outputs in /history
        ui = {"text": [summary]}
        if preview_on_node:                 # the only path that writes crops to disk (temp), and only when asked
            import secrets

            from .save_node import save_images

            ui["images"] = save_images(preview, f"iddm_faces_{secrets.token_hex(4)}", temp=True)
        return {"ui": ui, "result": (handle, preview, summary)}
