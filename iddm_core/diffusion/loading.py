"""Stable Diffusion loading, fully offline: :func:`load_model`, the one entry point, and the built-in models.

``load_model`` takes a built-in name (``"demo"``, ``"demo-v2"``: the small models trained here, see builtin.py;
``"tiny"``: the tiny random model, tiny.py), a diffusers folder (diffusers_folder.py) or a single-file checkpoint
(single_file.py), and returns a :class:`~iddm_core.diffusion.bundle.ModelBundle` in the asked dtypes on the asked
device. SDXL (``sdxl`` / ``sdxl-v``) loads into a bundle with ``text_encoder_2``/``tokenizer_2``. To check a model
before long work without loading it: validation.validate_model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..errors import ModelError
from ..events import report_setup
from .builtin import ASSET_DIR_V2, DEMO_TITLE, DEMO_V2_TITLE, TOKENIZER_DIR, demo_weights
from .bundle import ModelBundle
from .diffusers_folder import load_diffusers
from .kinds import check_kind
from .single_file import load_single_file
from .tiny import build_tiny_bundle


def load_model(path: str, kind: str | None = None, tokenizer: str | None = None,
               device="cpu", dtype: torch.dtype = torch.float32,
               weight_dtypes: Mapping[str, torch.dtype] | None = None, callback=None) -> ModelBundle:
    """Load a Stable Diffusion model for training.

    ``path``: ``"demo"`` (the small trained model shipped in ``iddm_core/assets/demo_model``, 128 px), ``"tiny"``
    (the built-in tiny random model, seed 0, built in memory), a diffusers folder, or a single-file checkpoint
    (``.safetensors``; ``.ckpt``/``.pt`` only if ``torch.load(weights_only=True)`` accepts them) in the original
    SD key layout. ``kind`` overrides detection ("sd1" | "sd2" | "sd2v" | "sdxl" | "sdxl-v"). ``tokenizer`` is a
    folder holding ``vocab.json`` + ``merges.txt`` (needed for single files outside ComfyUI; for SDXL it serves
    both text encoders). ``weight_dtypes`` (``precision.weight_dtypes``) overrides ``dtype`` per part; the cast
    happens on the CPU, before the move to ``device``, so the device never holds an fp32 copy. ``callback(Event)``:
    a ``"setup"`` event (stage ``"load"``) before reading, between the parts and before the move; it may raise to
    cancel the load there (events.report_setup).
    """
    report_setup(callback, "load", "loading the model: reading the weights")
    check_kind(kind)
    builtin = _BUILTIN.get(str(path))
    if builtin is not None:
        return builtin(kind).to(None, dtype).cast(weight_dtypes or {}).to(device)
    p = Path(path)
    if p.is_dir():
        bundle = load_diffusers(p, kind=kind, tokenizer=tokenizer, callback=callback)
    elif p.is_file():
        bundle = load_single_file(p, kind=kind, tokenizer=tokenizer, callback=callback)
    else:
        raise model_not_found(path)
    bundle = bundle.to(None, dtype).cast(weight_dtypes or {})
    report_setup(callback, "load", f"loading the model: moving it to {torch.device(device).type}")
    return bundle.to(device)


def model_not_found(path) -> ModelError:
    """The error for a path that is neither a built-in name, a folder nor a file."""
    return ModelError(f"model not found: {path} (expected 'demo', 'tiny', a diffusers folder or a .safetensors file)")


def load_demo_bundle(folder: Path | None = None, title: str = DEMO_TITLE) -> ModelBundle:
    """The shipped demo model (or the one in ``folder``) as a float32 CPU :class:`ModelBundle` (title ``demo``): the
    single-file loader copies the fp16 weights into float32 modules in eval mode."""
    path = demo_weights(folder)
    bundle = load_single_file(path, kind="sd1", tokenizer=path.parent / TOKENIZER_DIR)
    bundle.title = title
    return bundle


def load_demo_v2_bundle(folder: Path | None = None) -> ModelBundle:
    """Demo model v2 (``iddm_core/assets/demo_model_v2/``, title ``demo-v2``), as :func:`load_demo_bundle`."""
    folder = Path(folder or ASSET_DIR_V2)
    demo_weights(folder, v2=True)
    return load_demo_bundle(folder, title=DEMO_V2_TITLE)


# the built-in names load_model accepts -> the bundle for a ``kind`` argument (which only the tiny model reads)
_BUILTIN = {
    "demo": lambda kind: load_demo_bundle(),
    "demo-v2": lambda kind: load_demo_v2_bundle(),   # issue 26's first cut, trained on the congress portraits
    # kind="sd2"/"sd2v" gives the SD2-flavoured tiny variant (e.g. to exercise v-prediction training);
    # "sdxl"/"sdxl-v" the SDXL-shaped one
    "tiny": lambda kind: build_tiny_bundle(0, kind or "sd1"),
}
