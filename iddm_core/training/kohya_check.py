"""Reading kohya-ss LoRA files and checking them: would ComfyUI, A1111/Forge and diffusers apply every tensor?

The module names a file may hold are the ones kohya-ss writes for the base family its metadata declares (SD1/SD2:
the diffusers UNet and ``lora_te_``; SDXL: the original SGM UNet and ``lora_te1_`` / ``lora_te2_``), attention,
projection and feed-forward layers plus, for LoCon files, the ResBlock and sampler layers.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..diffusion.kinds import SDXL_KINDS
from ..errors import InputError, ModelError
from .kohya import (BASE_INFO, CUSTOM_BASE_PREFIX, METADATA_KEYS, OPTIONAL_METADATA_KEYS, TE1_PREFIX, TE2_PREFIX,
                    TE_PREFIX, UNET_PREFIX)

KOHYA_KEY = re.compile(r"^lora_(unet|te|te1|te2)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
_TRANSFORMER = r"(proj_in|proj_out|transformer_blocks_\d+_(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))"
_TE = r"text_model_encoder_layers_\d+_(self_attn_(q_proj|k_proj|v_proj|out_proj)|mlp_fc[12])"
# what kohya-ss would name on an SD1/SD2 diffusers UNet / CLIP text encoder (module paths with "." -> "_")
KOHYA_UNET_MODULE = re.compile(
    rf"^lora_unet_((down_blocks_\d+|mid_block|up_blocks_\d+)_attentions_\d+_{_TRANSFORMER}"
    r"|(down_blocks_\d+|mid_block|up_blocks_\d+)_resnets_\d+_(conv1|conv2|conv_shortcut|time_emb_proj)"
    r"|down_blocks_\d+_downsamplers_0_conv|up_blocks_\d+_upsamplers_0_conv)$")
KOHYA_TE_MODULE = re.compile(rf"^lora_te_{_TE}$")
# SDXL (kohya's SGM UNet): original module paths; attention sits at slot 1 of an input/output block, the ResBlock
# at slot 0 (middle block: 0 and 2), the downsampler at input slot 0 (op), the upsampler at output slot 1 or 2
KOHYA_SDXL_UNET_MODULE = re.compile(
    rf"^lora_unet_((input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)_{_TRANSFORMER}"
    r"|(input_blocks_\d+_0|middle_block_[02]|output_blocks_\d+_0)_"
    r"(in_layers_2|out_layers_3|emb_layers_1|skip_connection)"
    r"|input_blocks_\d+_0_op|output_blocks_\d+_[12]_conv)$")
KOHYA_SDXL_TE_MODULE = re.compile(rf"^lora_te[12]_{_TE}$")
# the 3x3 convolutions among them (LoCon's conv_dim layers): their lora_down must keep the 3x3 kernel
KOHYA_CONV3_MODULE = re.compile(r"^lora_unet_\w+_(conv1|conv2|downsamplers_0_conv|upsamplers_0_conv|in_layers_2|"
                                r"out_layers_3|\d+_op|\d+_conv)$")


def read_kohya_lora(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` LoRA; :class:`ModelError` naming the file if unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"cannot read LoRA {path}: {exc.__class__.__name__}: {exc}") from exc
    return tensors, metadata


def read_lora_metadata(path) -> dict[str, str]:
    """The metadata of a ``.safetensors`` LoRA without loading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"cannot read LoRA {path}: {exc.__class__.__name__}: {exc}") from exc


def _modules(tensors) -> dict[str, dict[str, torch.Tensor]]:
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, rest = key.partition(".")
        mods.setdefault(name, {})[rest] = value
    return mods


def _base_version(metadata: dict[str, str]) -> str:
    """ss_base_model_version without the custom-base prefix (the family's own value)."""
    version = metadata.get("ss_base_model_version", "")
    return version[len(CUSTOM_BASE_PREFIX):] if version.startswith(CUSTOM_BASE_PREFIX) else version


def _is_sdxl_file(metadata: dict[str, str]) -> bool:
    return _base_version(metadata).startswith("sdxl")


def _is_conv(parts: dict[str, torch.Tensor]) -> bool:
    """A LoCon module: its lora_down has a kernel over 1x1."""
    down = parts.get("lora_down.weight")
    return down is not None and down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)


def _name_problem(name: str, sdxl: bool) -> str | None:
    if sdxl:
        if not (KOHYA_SDXL_UNET_MODULE.match(name) or KOHYA_SDXL_TE_MODULE.match(name)):
            return f"{name}: not an SDXL kohya module name"
    elif name.startswith((TE1_PREFIX, TE2_PREFIX)) or \
            name.startswith(UNET_PREFIX) and not KOHYA_UNET_MODULE.match(name) or \
            name.startswith(TE_PREFIX) and not KOHYA_TE_MODULE.match(name):
        return f"{name}: not an SD1/SD2 kohya module name"
    return None


def _tensor_problems(name: str, parts: dict[str, torch.Tensor]) -> list[str]:
    down, up, alpha = parts.get("lora_down.weight"), parts.get("lora_up.weight"), parts.get("alpha")
    if down is None or up is None:
        return [f"{name}: lora_down/lora_up missing"]
    problems = []
    if alpha is None or alpha.numel() != 1:
        problems.append(f"{name}: alpha missing or not a scalar")
    if down.dim() != up.dim() or down.dim() not in (2, 4) or up.shape[1] != down.shape[0] or \
            (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
        problems.append(f"{name}: up {tuple(up.shape)} and down {tuple(down.shape)} do not chain")
    elif KOHYA_CONV3_MODULE.match(name) and not (down.dim() == 4 and tuple(down.shape[2:]) == (3, 3)):
        problems.append(f"{name}: a 3x3 conv whose lora_down {tuple(down.shape)} is not 3x3")
    elif _is_conv(parts) and not KOHYA_CONV3_MODULE.match(name):
        problems.append(f"{name}: a conv kernel {tuple(down.shape[2:])} on a layer that is not a 3x3 conv")
    return problems


def check_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[str]:
    """Problems that would stop kohya-format readers (ComfyUI, A1111, diffusers) from applying the LoRA.

    The module names must fit the base model the metadata declares: SD1/SD2 files name the diffusers UNet and
    ``lora_te_``; SDXL files the original (SGM) UNet and ``lora_te1_`` / ``lora_te2_``.
    """
    problems = []
    bad = [k for k in tensors if not KOHYA_KEY.match(k)]
    if bad:
        problems.append(f"{len(bad)} key(s) not in kohya form, e.g. {bad[0]}")
    sdxl = _is_sdxl_file(metadata)
    for name, parts in _modules(tensors).items():
        problem = _name_problem(name, sdxl)
        problems += [problem] if problem else []
        problems += _tensor_problems(name, parts)
    missing = [k for k in METADATA_KEYS if k not in metadata]
    if missing:
        problems.append(f"metadata missing {', '.join(missing)}")
    extra = [k for k in metadata if k not in METADATA_KEYS + OPTIONAL_METADATA_KEYS]
    if extra:
        problems.append(f"unexpected metadata {', '.join(sorted(extra))}")
    if not tensors:
        problems.append("no tensors")
    return problems


def _one_or_list(values: set):
    values = sorted(values)
    return values[0] if len(values) == 1 else values


def _ranks_alphas(mods: dict, conv: bool) -> tuple:
    """(rank(s), alpha(s)) of the conv (LoCon) or the other modules: a number when all agree, else a list."""
    chosen = [p for p in mods.values() if "lora_down.weight" in p and _is_conv(p) == conv]
    ranks = {int(p["lora_down.weight"].shape[0]) for p in chosen}
    alphas = {round(float(p["alpha"].float().reshape(-1)[0]), 6) for p in chosen
              if "alpha" in p and p["alpha"].numel() == 1}
    return _one_or_list(ranks), _one_or_list(alphas)


def _file_kind(metadata: dict[str, str]) -> str:
    kinds = {(v[0], v[3]): k for k, v in BASE_INFO.items()}
    version = _base_version(metadata)
    kind = kinds.get((version, metadata.get("modelspec.prediction_type", "")))
    if kind is None:   # SD1/SD2 versions name the kind on their own
        kind = {v[0]: k for k, v in BASE_INFO.items() if k not in SDXL_KINDS}.get(version, "unknown")
    return kind


def inspect_lora(path) -> dict:
    """A summary of a LoRA file and a compatibility verdict (``compatible`` + ``problems``).
    ``conv_rank`` / ``conv_alpha``: LoCon's 3x3 layers (0 / None in a file without them)."""
    tensors, metadata = read_kohya_lora(path)
    mods = _modules(tensors)
    rank, alpha = _ranks_alphas(mods, conv=False)
    conv_rank, conv_alpha = _ranks_alphas(mods, conv=True)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    problems = check_kohya(tensors, metadata)
    modules = {"unet": sum(n.startswith(UNET_PREFIX) for n in mods),
               "te": sum(n.startswith((TE_PREFIX, TE1_PREFIX, TE2_PREFIX)) for n in mods)}
    if _is_sdxl_file(metadata) or any(n.startswith((TE1_PREFIX, TE2_PREFIX)) for n in mods):
        modules.update(te1=sum(n.startswith(TE1_PREFIX) for n in mods), te2=sum(n.startswith(TE2_PREFIX) for n in mods))
    return {
        "kind": _file_kind(metadata),   # the base's family; "custom_base": a demo/tiny-shaped base, not a real one
        "custom_base": metadata.get("ss_base_model_version", "").startswith(CUSTOM_BASE_PREFIX),
        "rank": rank,
        "alpha": alpha,
        "conv_rank": conv_rank if conv_rank != [] else 0,
        "conv_alpha": conv_alpha if conv_alpha != [] else None,
        "modules": modules,
        "tensors": len(tensors),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "size_bytes": os.path.getsize(path),
        "metadata": metadata,
        "compatible": not problems,
        "problems": problems,
    }
