"""FaceEnsembleLoss: which face recognisers the PGD attacks, and the softmax temperature tau -> IDDM_LOSS.

One BOOLEAN per known recogniser (ComfyUI combos are single-choice, an ensemble is a set). The list and the
tooltips are rebuilt every time the browser asks for node definitions, so a model dropped into
``models/insightface`` or ``models/facerecognition`` shows up as "installed" after a page refresh.
"""
from __future__ import annotations

from .specs import CATEGORY, LOSS, LossSpec


def _discover():
    from ..iddm_core.face.registry import discover
    from .comfy_env import recogniser_search_dirs

    return discover(recogniser_search_dirs())


def _toggle_name(name: str) -> str:
    # an input name is a Python keyword argument of build() and a JS widget name: "faceres-deep" -> use_faceres_deep
    return "use_" + name.replace("-", "_")


# The recognisers the node offered when ``extra_surrogates`` was its last widget. ComfyUI's UI-format workflows
# store widget values by position, so toggles added later (the TF.js models) go *after* extra_surrogates: a
# workflow saved by an older version then keeps its values where they were.
FIRST_TOGGLES = ("dlib", "arcface", "glintr100", "irse50", "ir152", "mobileface_zoo", "facenet", "facenet_vggface2")


def selected_surrogates(specs, flags: dict, extra: str = "") -> tuple[str, ...]:
    """Registry tokens for the recognisers whose ``use_<name>`` toggle is on (iddm_core.frontend.selected_surrogates,
    shared with the A1111/Forge tab): "dlib" or "name:PATH"; a chosen recogniser that is not installed is an error
    that says which file to put where."""
    from ..iddm_core.frontend import selected_surrogates as select

    chosen = [spec.name for spec in specs if flags.get(_toggle_name(spec.name))]
    return select(specs, chosen, extra, field=_toggle_name)


class IDDMFaceEnsembleLoss:
    DESCRIPTION = ("The identity loss of PGD Stage II: an ensemble of face recognisers whose similarity to your "
                   "reference photos is pushed down (softmax-weighted, the most confident recogniser hardest).")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (LOSS,)
    RETURN_NAMES = ("loss",)
    OUTPUT_TOOLTIPS = ("Recogniser choice and tau; the models are loaded by the node that runs PGD.",)

    @classmethod
    def INPUT_TYPES(cls):
        # dlib (always installed) and tau are required; the other recognisers are optional toggles, so a saved
        # API-format workflow stays valid when a later version knows more recognisers.
        required, optional, later = {}, {}, {}
        for spec in _discover():
            status = "installed" if spec.available else f"not installed: {spec.hint}"
            target = required if spec.name == "dlib" else optional if spec.name in FIRST_TOGGLES else later
            target[_toggle_name(spec.name)] = ("BOOLEAN", {
                "default": spec.name == "dlib",
                "tooltip": f"Attack the {spec.name} face recogniser ({status})."})
        required["tau"] = ("FLOAT", {"default": 0.03, "min": 0.001, "max": 10.0, "step": 0.001, "round": 0.0001,
                                     "tooltip": "Softmax temperature over recognisers: small = attack the one that "
                                                "still recognises you best (paper 0.03)."})
        optional["extra_surrogates"] = ("STRING", {"default": "", "multiline": False,
                                                   "tooltip": "Optional: more recognisers as name:PATH, comma "
                                                              "separated (e.g. irse50:/models/irse50.pth)."})
        optional.update(later)
        return {"required": required, "optional": optional}

    @classmethod
    def VALIDATE_INPUTS(cls, tau):
        if not tau > 0:
            return f"tau must be > 0 (got {tau})"
        return True

    def build(self, tau, use_dlib=True, extra_surrogates="", **flags):
        flags["use_dlib"] = use_dlib
        return (LossSpec(surrogates=selected_surrogates(_discover(), flags, extra_surrogates), tau=float(tau)),)
