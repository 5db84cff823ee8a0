"""Checking that a model will load for training, without loading it: :func:`validate_model` -> :class:`ModelInfo`.

Front ends call it before long work (photo checks, PGD), so a wrong path, kind or tokenizer is reported in a second
with the same :class:`ModelError` message :func:`~iddm_core.diffusion.loading.load_model` would give later. It runs
the loaders' own setup code (single_file.single_file_setup / diffusers_folder.folder_setup) and builds the
architecture on the meta device only, which also counts the parameters the memory check needs (fit.py).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ..errors import ModelError
from .builtin import ASSET_DIR, DEMO_TITLE, DEMO_V2_TITLE, TOKENIZER_DIR, demo_weights
from .bundle import clean_config, native_resolution
from .diffusers_folder import FOLDER_WEIGHTS, folder_setup
from .kinds import PREDICTION_TYPES, SDXL_KINDS, check_kind, file_prediction_type
from .loading import model_not_found
from .reading import read_checkpoint_header, token_rows
from .single_file import check_state, single_file_parts, single_file_setup
from .tiny import TINY_RESOLUTION, TINY_SDXL_TITLE, TINY_TITLE, build_tiny_bundle
from .tokenizers import CLIP_VOCAB_SIZE, tiny_tokenizer_size


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`validate_model` found out about a model without loading its weights."""

    kind: str                # "sd1" | "sd2" | "sd2v" | "sdxl" | "sdxl-v"
    prediction_type: str     # "epsilon" | "v_prediction"
    resolution: int          # native training resolution in pixels
    title: str               # checkpoint stem / folder name (never a full path)
    vocab_size: int          # rows of the text encoder's token embedding (the tokenizer was checked against it)
    parameters: Mapping = field(default_factory=dict, compare=False)  # {"unet": n, "vae": n, ...}, counted on
                                                                      # the meta device (fit.check_weights_fit)


_PART_ATTRS = {"UNet": "unet", "VAE": "vae", "text encoder": "text_encoder", "text encoder 2": "text_encoder_2"}


def validate_model(path: str, kind: str | None = None, tokenizer: str | os.PathLike | None = None) -> ModelInfo:
    """Check that ``path`` will load for training, without loading it: call before long work.

    Same arguments and the same :class:`ModelError` messages as :func:`~iddm_core.diffusion.loading.load_model`.
    Checks that the model exists, its kind is known (or ``kind`` is valid), a tokenizer is found and fits the text
    encoder, and (single files) that every UNet / VAE / text-encoder weight the architecture needs is present with
    the right shape.

    Cost: no network is built with real memory. A ``.safetensors`` file: its header (plus a few KB of tensors)
    and the architecture built on the meta device, well under a second after the imports (diffusers and
    transformers take several seconds to import the first time). A pickle (``.ckpt``): memory-mapped when it
    is a zip pickle, else read whole. A diffusers folder: its JSON configs and tokenizer only (weights are not
    opened). ``"demo"``/``"demo-v2"``/``"tiny"``: constant.
    """
    check_kind(kind)
    if str(path) == "tiny":
        return _tiny_info(kind or "sd1")
    if str(path) in ("demo", "demo-v2"):
        return _demo_info(v2=str(path) == "demo-v2")
    p = Path(path)
    if p.is_dir():
        return _folder_info(p, kind, tokenizer)
    if not p.is_file():
        raise model_not_found(path)
    return _single_file_info(p, kind, tokenizer)


def _tiny_info(kind: str) -> ModelInfo:
    with torch.device("meta"):
        bundle = build_tiny_bundle(0, kind)
    parameters = {name: _parameter_count(getattr(bundle, name)) for name in _PART_ATTRS.values()
                  if getattr(bundle, name) is not None}
    title = TINY_SDXL_TITLE if kind in SDXL_KINDS else TINY_TITLE
    return ModelInfo(kind, PREDICTION_TYPES[kind], TINY_RESOLUTION, title, tiny_tokenizer_size(), parameters)


def _demo_info(v2: bool) -> ModelInfo:
    """The shipped demo model's file, checked as any single file (demo-v2: with its built-in tokenizer)."""
    info = validate_model(str(demo_weights(v2=v2)), kind="sd1", tokenizer=None if v2 else ASSET_DIR / TOKENIZER_DIR)
    return dataclasses.replace(info, title=DEMO_V2_TITLE if v2 else DEMO_TITLE)


def _folder_info(folder: Path, kind: str | None, tokenizer) -> ModelInfo:
    """A diffusers folder: its configs, tokenizer and that each part holds a weights file."""
    kind, configs, _ = folder_setup(folder, kind, tokenizer)
    weights = dict(FOLDER_WEIGHTS, **({"text_encoder_2": FOLDER_WEIGHTS["text_encoder"]}
                                      if kind in SDXL_KINDS else {}))
    for part, stems in weights.items():
        if not any((folder / part / f"{stem}{ext}").is_file() for stem in stems for ext in (".safetensors", ".bin")):
            raise ModelError(f"{folder}: {part}/ holds no weights file ({stems[0]}.safetensors)")
    return ModelInfo(kind, PREDICTION_TYPES[kind], native_resolution(configs["vae"], kind), folder.name,
                     int(configs["text_encoder"].get("vocab_size", CLIP_VOCAB_SIZE)),
                     _folder_parameters(configs, kind))


def _single_file_info(path: Path, kind: str | None, tokenizer) -> ModelInfo:
    """A single file: its header, every part's weights checked against the architecture built on the meta device."""
    state, metadata = read_checkpoint_header(path)
    kind, configs, _ = single_file_setup(path, state, metadata, kind, tokenizer)
    parameters = {}
    for part, factory, part_state in single_file_parts(path, state, configs, kind):
        with torch.device("meta"):
            module = factory()
        check_state(module.state_dict(), part_state, str(path), part, kind)
        parameters[_PART_ATTRS[part]] = _parameter_count(module)
    rows = token_rows(state, "conditioner.embedders.0." if kind in SDXL_KINDS else "cond_stage_model.") or \
        int(configs["text_encoder"].get("vocab_size", CLIP_VOCAB_SIZE))
    return ModelInfo(kind, file_prediction_type(kind, state, metadata), native_resolution(configs["vae"], kind),
                     path.stem, rows, parameters)


def _parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _folder_parameters(configs: Mapping, kind: str) -> dict:
    """Parameters per part of a diffusers folder's architecture, built from its configs on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel.from_config(clean_config(configs["unet"])),
                 "vae": AutoencoderKL.from_config(clean_config(configs["vae"])),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**clean_config(configs["text_encoder"])))}
        if kind in SDXL_KINDS:
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig(**clean_config(configs["text_encoder_2"])))
    return {name: _parameter_count(m) for name, m in parts.items()}
