"""IdentityLeakMeter: how much of the user's identity a batch of images still carries, drawn on the images.

Inputs: an IMAGE batch (e.g. from a KSampler + VAE Decode with the trained LoRA), the IDDM_REFS of the user's
photos and one face recogniser. Outputs: the batch with each image's similarity drawn on it (red = the recogniser
still matches the user, green = it does not, grey = no face), a summary STRING (FSR, ISM, match rate) and a bar
chart IMAGE. Module level imports only the standard library (ComfyUI imports every pack at start-up).
"""
from __future__ import annotations

from .specs import CATEGORY, REFS

REF_RESOLUTION = 256      # face-centred crops used for the user's prototype
AUTO_CHOICE = "auto (held out)"   # every installed recogniser that is not one of the surrogates


def _recogniser_choices() -> list[str]:
    """"auto (held out)", then the installed recognisers ("dlib" always); dlib only outside ComfyUI."""
    try:
        from ..iddm_core.face.registry import discover
        from .comfy_env import recogniser_search_dirs

        names = [s.name for s in discover(recogniser_search_dirs()) if s.available]
    except Exception:            # no ComfyUI folder_paths (plain import): dlib is always there
        names = []
    return [AUTO_CHOICE] + (names or ["dlib"])


def _search_dirs() -> list[str]:
    try:
        from .comfy_env import recogniser_search_dirs
        return recogniser_search_dirs()
    except Exception:
        return []


def _recogniser_token(name: str) -> str:
    """Registry token ("dlib" or "name:PATH") for a recogniser chosen by name."""
    from ..iddm_core.errors import InputError
    from ..iddm_core.face.registry import find

    spec = find(name, _search_dirs())
    if not spec.available:
        raise InputError(f"recognizer: {name!r} is not installed; {spec.hint}")
    return spec.name if spec.path is None else f"{spec.name}:{spec.path}"


def _clean_refs(refs):
    """(images, landmarks) of every clean photo: an IDDM_REFS handle (``.at(resolution)``) or a PrivateRefs."""
    if hasattr(refs, "at"):
        refs = refs.at(REF_RESOLUTION)
    return refs.images, refs.landmarks


def resolve_threshold(threshold: float, name: str) -> tuple[float, str]:
    """The match threshold in effect and where it comes from: the widget's value, or with 0 (auto) the judge's
    own (iddm_core.evaluation.judges.MATCH_THRESHOLDS)."""
    from ..iddm_core.evaluation.judges import match_threshold

    if float(threshold) > 0:
        return float(threshold), "set on the node"
    return float(match_threshold(name)), f"{name}'s own; threshold 0 = auto"


def threshold_help() -> str:
    """Each known recogniser's own threshold, for the widget's tooltip."""
    from ..iddm_core.evaluation.judges import DEFAULT_MATCH_THRESHOLD, MATCH_THRESHOLDS

    own = ", ".join(f"{name} {value:g}" for name, value in MATCH_THRESHOLDS.items())
    return f"{own}, others {DEFAULT_MATCH_THRESHOLD:g}"


def verdicts(entry: dict, threshold: float, source: str) -> list:
    """Per image: recognised as the user (True), not (False), no face (None). A threshold set on the node is a
    cosine level; with 0 (auto) the judge's own rule decides, as in ``evaluate`` (dlib: its distance <= 0.6)."""
    if source == "set on the node" or "matched" not in entry:
        return [None if s is None else s >= threshold for s in entry["similarity"]]
    return list(entry["matched"])


def rule_text(entry: dict, threshold: float, source: str) -> str:
    """How a match is decided, in words: the cosine level, or the judge's own distance rule."""
    rule = entry.get("match") or {}
    if source != "set on the node" and rule.get("score") == "distance":
        return f"distance <= {rule['threshold']:g}"
    return f"cosine >= {threshold:g}"


def summary_text(result: dict, name: str, threshold: float, source: str = "set on the node") -> str:
    """Counts and averages only (the text may be saved with the workflow). ``name`` is the judge drawn on the
    images; every judge's ISM is listed. ``threshold`` is the one in effect (stated in full, with ``source``)."""
    entry = result["recognizers"][name]
    n, faces = result["n_images"], sum(result["faces_found"])
    lines = [f"FSR {result['fsr']:.2f} ({faces}/{n} images with a face)"]
    for judge, e in result["recognizers"].items():
        lines.append(f"ISM [{judge}] " + ("n/a (no face)" if e["ism"] is None else f"{e['ism']:.3f}"))
    rule = rule_text(entry, threshold, source)
    lines.append(f"match rule [{name}]: {rule} ({source})")
    if rule.startswith("distance"):
        lines.append(f"(the bars show cosine; {name}'s cosine level {threshold:g} is drawn for reference)")
    if entry["ism"] is not None:
        matched = sum(v is True for v in verdicts(entry, threshold, source))
        lines.append(f"recognised as the user by {name} ({rule}): {matched}/{faces}")
    if result.get("judges"):
        lines.append(result["judges"])
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
                    "tooltip": "Face recogniser used as the judge. 'auto (held out)' uses every installed "
                               "recogniser that is not one of the surrogates below (a fair test); if only the "
                               "surrogates are installed it says so loudly. dlib is always available."}),
                "threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.005,
                                        "tooltip": "Cosine similarity at or above which a face counts as you "
                                                   "(red). 0 = auto: the judge's own threshold ("
                                                   + threshold_help() + "); the summary states the value "
                                                   "in effect."}),
            },
            "optional": {
                "surrogates": ("STRING", {"default": "dlib", "multiline": False,
                                          "tooltip": "Recognisers the protection was optimised against (comma "
                                                     "separated names; the pack's default is dlib). 'auto' judges "
                                                     "with the others; a warning is shown if a judge is one of "
                                                     "them."}),
            },
        }

    def measure(self, images, refs, recognizer, threshold=0.0, surrogates="dlib"):
        import numpy as np
        import torch

        from ..iddm_core.evaluation.evaluate import evaluate
        from ..iddm_core.evaluation.faces import uint8_images as _uint8
        from ..iddm_core.evaluation.leak_render import annotate, bar_chart, label_text, match_color
        from .comfy_env import torch_device

        with torch.inference_mode():
            batch = images.permute(0, 3, 1, 2).float().clamp(0, 1)       # ComfyUI [B,H,W,C] -> [B,3,H,W]
            if batch.shape[1] == 4:
                batch = batch[:, :3]
            judges = "auto" if recognizer == AUTO_CHOICE else [_recogniser_token(recognizer)]
            result = evaluate(batch, _clean_refs(refs), eval_recognizers=judges,
                              surrogates=[s.strip() for s in (surrogates or "").split(",") if s.strip()],
                              quality=False, device=torch_device(),
                              search_dirs=_search_dirs())
            name = result["eval_recognizers"][0]
            thr, source = resolve_threshold(threshold, name)
            sims = result["recognizers"][name]["similarity"]
            matched = verdicts(result["recognizers"][name], thr, source)
            annotated = [annotate(rgb, label_text(s, name), match_color(m))
                         for rgb, s, m in zip(_uint8(batch), sims, matched)]
            out = torch.from_numpy(np.stack(annotated)).float().div(255.0)
            chart = bar_chart(sims, thr, f"{name} similarity", matched=matched)
            chart = torch.from_numpy(np.array(chart)).float().div(255.0)[None]
        summary = summary_text(result, name, thr, source)
        return {"ui": {"text": [summary]}, "result": (out, summary, chart)}     # the text is drawn on the node


NODE_CLASS_MAPPINGS = {"IDDMIdentityLeakMeter": IdentityLeakMeter}
NODE_DISPLAY_NAME_MAPPINGS = {"IDDMIdentityLeakMeter": "Identity Leak Meter (IDDM)"}
