"""Reading single-file checkpoints without building a network: their tensors (all, or only the header's shapes)
and their architecture (the ``iddm.configs`` metadata the pack writes, else the JSONs shipped per kind in
``iddm_core/diffusion/configs/<kind>/``).

Pickles (``.ckpt``/``.pt``) load only with ``torch.load(weights_only=True)``: one that would run code is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import ModelError
from .kinds import OUT_NORM1_BIAS, SDXL_KINDS, shape_of

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIGS_METADATA_KEY = "iddm.configs"   # safetensors metadata: architecture of non-standard (e.g. tiny) files
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(state dict, metadata) of a single-file checkpoint, on CPU. Pickles load only with ``weights_only``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
            raise ModelError(f"{path}: not a readable .safetensors file ({exc})") from exc
        return state, metadata
    if suffix in _PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"{path}: refused to load this pickle checkpoint: it does not load with "
                             f"torch.load(weights_only=True) and could run code. Convert it to .safetensors "
                             f"first. ({type(exc).__name__})") from exc
        state = _tensors(obj)
        if state is None:
            raise ModelError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
        return state, {}
    raise ModelError(f"{path}: unsupported model file type {suffix or '(none)'}; use .safetensors or a "
                     "diffusers folder")


def _tensors(obj) -> dict | None:
    """The tensors of a loaded pickle (a state dict, or a Lightning checkpoint holding one); None if it is neither."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        return None
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_checkpoint_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """(state dict of *meta* tensors with the file's shapes, metadata) of a single-file checkpoint.

    ``.safetensors``: only the header is read, plus the few small tensors kind detection looks at (the last
    ``norm1.bias`` of the UNet's output blocks, for the SD2 v-prediction heuristic), which are real tensors.
    Pickles cannot be read partially: they are loaded memory-mapped where possible (else fully, into RAM).
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        state = _load_pickle_mmap(path)
        return (state, {}) if state is not None else read_checkpoint(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state = {}
            for k in f.keys():
                sl = f.get_slice(k)
                dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float32)
                state[k] = torch.empty(tuple(sl.get_shape()), dtype=dtype, device="meta")
            for k in [k for k in state if OUT_NORM1_BIAS.match(k)]:
                state[k] = f.get_tensor(k)
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
        raise ModelError(f"{path}: not a readable .safetensors file ({exc})") from exc
    return state, metadata


def _load_pickle_mmap(path: Path) -> dict | None:
    """A zip pickle's tensors, memory-mapped; None when it cannot be read that way (read_checkpoint then gives the
    proper error, or loads an old, non-zip pickle whole)."""
    if path.suffix.lower() not in _PICKLE_SUFFIXES or not path.is_file():
        return None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return _tensors(obj)


def token_rows(state: Mapping[str, Any], prefix: str = "cond_stage_model.") -> int | None:
    """Rows of the text encoder's token embedding in an original-layout state dict (SD1 and SD2 keys; SDXL:
    ``prefix`` ``conditioner.embedders.0.`` / ``.1.``)."""
    for k, v in state.items():
        if k.startswith(prefix) and k.endswith("token_embedding.weight"):
            return int(shape_of(v)[0])
    return None


def shipped_configs(kind: str) -> dict:
    """The architecture JSONs in ``iddm_core/diffusion/configs/<kind>/`` (unet, vae, text_encoder, scheduler; SDXL
    also text_encoder_2). ``sdxl-v`` shares ``sdxl/`` (only the prediction type differs, set by the loader)."""
    folder = CONFIG_DIR / ("sdxl" if kind in SDXL_KINDS else kind)
    names = ("unet", "vae", "text_encoder", "scheduler") + (("text_encoder_2",) if kind in SDXL_KINDS else ())
    return {name: json.loads((folder / f"{name}.json").read_text(encoding="utf-8")) for name in names}


def single_file_configs(path: Path, metadata: Mapping[str, str], kind: str) -> dict:
    """A single file's architecture: its ``iddm.configs`` metadata (files the pack wrote), else the shipped configs."""
    if CONFIGS_METADATA_KEY in metadata:
        try:
            return json.loads(metadata[CONFIGS_METADATA_KEY])
        except ValueError as exc:
            raise ModelError(f"{path}: corrupt {CONFIGS_METADATA_KEY} metadata") from exc
    return shipped_configs(kind)
