"""IdentityLeakMeter: how much of the user's identity a batch of images still carries, drawn on the images.

Inputs: an IMAGE batch (e.g. from a KSampler + VAE Decode with the trained LoRA), the IDDM_REFS of the user's
photos and one face recogniser. Outputs: the batch with each image's similarity drawn on it (red = the recogniser
still matches the user, green = it does not, grey = no face), a summary STRING (FSR, ISM, match rate) and a bar
chart IMAGE. Module level imports only the standard library (ComfyUI imports every pack at start-up).
"""
from __future__ import annotations

from .specs import CATEGORY, REFS

REF_RESOLUTION = 256      # face-centred crops used for the user's prototype


def _recogniser_choices() -> list[str]:
    """Installed recognisers ("dlib" always first); falls back to ["dlib"] outside ComfyUI."""
    try:
        from ..iddm_core.face.registry import discover
        from .comfy_env import recogniser_search_dirs

        names = [s.name for s in discover(recogniser_search_dirs()) if s.available]
    except Exception:            # no ComfyUI folder_paths (plain import): dlib is always there
        names = []
    return names or ["dlib"]


def _recogniser_token(name: str) -> str:
    """Registry token ("dlib" or "name:PATH") for a recogniser chosen by name."""
    from ..iddm_core.errors import InputError
    from ..iddm_core.face.registry import find

    try:
        from .comfy_env import recogniser_search_dirs
        dirs = recogniser_search_dirs()
    except Exception:
        dirs = []
    spec = find(name, dirs)
    if not spec.available:
        raise InputError(f"recognizer: {name!r} is not installed; {spec.hint}")
    return spec.name if spec.path is None else f"{spec.name}:{spec.path}"


def _clean_refs(refs):
    """(images, landmarks) of every clean photo: an IDDM_REFS handle (``.at(resolution)``) or a PrivateRefs."""
    if hasattr(refs, "at"):
        refs = refs.at(REF_RESOLUTION)
    return refs.images, refs.landmarks


def summary_text(result: dict, name: str, threshold: float) -> str:
    """Counts and averages only (the text may be saved with the workflow)."""
    entry = result["recognizers"][name]
    n, faces = result["n_images"], sum(result["faces_found"])
    ism = "n/a (no face)" if entry["ism"] is None else f"{entry['ism']:.3f}"
    lines = [f"FSR {result['fsr']:.2f} ({faces}/{n} images with a face)",
             f"ISM [{name}] {ism}"]
    if entry["ism"] is not None:
        matched = round(entry["match_rate"] * faces)
        lines.append(f"recognised as the user (cosine >= {threshold:.2f}): {matched}/{faces}")
    lines += [f"WARNING: {w}" for w in result.get("warnings", [])]
    return "\n".join(lines)


class IdentityLeakMeter:
    DESCRIPTION = ("Measures identity leakage: detects the face in each image and compares it with your clean "
                   "photos using a face recogniser. Use a recogniser the protection was NOT optimised against.")
    CATEGORY = CATEGORY
    FUNCTION = "measure"
    RETURN_TYPES = ("IMAGE", "STRING", "IMAGE")
    RETURN_NAMES = ("annotated", "summary", "chart")
    OUTPUT_TOOLTIPS = ("The input images with each one's similarity to you drawn on it (red = recognised).",
                       "Face detection rate (FSR), mean identity similarity (ISM) and how many faces match you.",
                       "SimilarityChart: one bar per image, with the match threshold as a dashed line.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Images to check, e.g. portraits generated with your LoRA."}),
                "refs": (REFS, {"tooltip": "Your clean photos (Load Private Refs): the identity to look for."}),
                "recognizer": (_recogniser_choices(), {
                    "tooltip": "Face recogniser used as the judge. For a fair test pick one that was not a "
                               "surrogate of the protection (installed models only; dlib is always available)."}),
                "threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.005,
                                        "tooltip": "Cosine similarity at or above which a face counts as you "
                                                   "(red). 0 = the recogniser's default (dlib 0.907, others 0.4)."}),
            },
            "optional": {
                "surrogates": ("STRING", {"default": "", "multiline": False,
                                          "tooltip": "Optional: recognisers the protection was optimised against "
                                                     "(comma separated names); a warning is shown if the judge is "
                                                     "one of them."}),
            },
        }

    def measure(self, images, refs, recognizer, threshold=0.0, surrogates=""):
        import numpy as np
        import torch

        from ..iddm_core.evaluate import _uint8, evaluate, match_threshold, recognizer_name
        from ..iddm_core.face.detect import get_detector
        from ..iddm_core.leak_render import annotate, bar_chart, label_text, verdict_color
        from .comfy_env import torch_device

        with torch.inference_mode():
            batch = images.permute(0, 3, 1, 2).float().clamp(0, 1)       # ComfyUI [B,H,W,C] -> [B,3,H,W]
            if batch.shape[1] == 4:
                batch = batch[:, :3]
            token = _recogniser_token(recognizer)
            name = recognizer_name(token)
            thr = float(threshold) or match_threshold(name)
            result = evaluate(batch, _clean_refs(refs), eval_recognizers=[token],
                              surrogates=[s.strip() for s in (surrogates or "").split(",") if s.strip()],
                              detector=get_detector("dlib"), quality=False, device=torch_device())
            sims = result["recognizers"][name]["similarity"]
            annotated = [annotate(rgb, label_text(s, name), verdict_color(s, thr))
                         for rgb, s in zip(_uint8(batch), sims)]
            out = torch.from_numpy(np.stack(annotated)).float().div(255.0)
            chart = torch.from_numpy(np.array(bar_chart(sims, thr, f"{name} similarity"))).float().div(255.0)[None]
        return (out, summary_text(result, name, thr), chart)


NODE_CLASS_MAPPINGS = {"IDDMIdentityLeakMeter": IdentityLeakMeter}
NODE_DISPLAY_NAME_MAPPINGS = {"IDDMIdentityLeakMeter": "Identity Leak Meter (IDDM)"}
