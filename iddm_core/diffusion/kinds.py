"""The model kinds the pack trains (SD 1.x, SD 2.x epsilon / v, SDXL epsilon / v) and how a checkpoint's kind is told.

:func:`detect_kind` reads an original-layout state dict (tensors, or only their shapes): the text encoder layout and
the UNet's cross-attention width give the family, declared markers (or, for SD2, a weight heuristic) the prediction
type. A diffusers folder's kind comes from its configs (:func:`folder_kind`). Light: torch only; importing it puts
the process offline (offline.force_offline), as every module that reads these names (LoRA export, the loaders) may
import transformers or peft next.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from ..offline import force_offline

force_offline()

import torch  # noqa: E402

from ..errors import ModelError  # noqa: E402

KINDS = ("sd1", "sd2", "sd2v", "sdxl", "sdxl-v")
SDXL_KINDS = ("sdxl", "sdxl-v")
PREDICTION_TYPES = {"sd1": "epsilon", "sd2": "epsilon", "sd2v": "v_prediction", "sdxl": "epsilon",
                    "sdxl-v": "v_prediction"}
# a zero-terminal-SNR schedule (Lin et al. 2024) in diffusers' scheduler settings; sampling starts at t = T - 1
ZERO_TERMINAL_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
RESOLUTIONS = {"sd1": 512, "sd2": 512, "sd2v": 768, "sdxl": 1024, "sdxl-v": 1024}

_CROSS_ATTN_K = re.compile(r"model\.diffusion_model\..*\.attn2\.to_k\.weight$")
# the last output block's first LayerNorm bias: the tensor the SD2 v-prediction heuristic reads (also when only a
# checkpoint's header is read, see reading.read_checkpoint_header)
OUT_NORM1_BIAS = re.compile(r"model\.diffusion_model\.output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias$")
# ComfyUI's SD2 heuristic: v-prediction fine-tunes move this LayerNorm bias far more than epsilon ones do
V_PRED_STD_THRESHOLD = 0.09
_SDXL_PARTS = (("model.diffusion_model.", "UNet"), ("conditioner.embedders.0.transformer.", "CLIP ViT-L text encoder"),
               ("conditioner.embedders.1.model.", "OpenCLIP ViT-bigG text encoder"))


def check_kind(kind: str | None) -> None:
    """A :class:`ModelError` unless ``kind`` is None (detect it) or one of :data:`KINDS`."""
    if kind is not None and kind not in KINDS:
        raise ModelError(f"kind={kind!r} is not one of {', '.join(KINDS)}")


def shape_of(value) -> tuple:
    """The shape of a tensor, or ``value`` itself as a tuple when it already is a shape."""
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def detect_kind(state: Mapping[str, Any], source: str = "checkpoint", metadata: Mapping[str, str] | None = None) -> str:
    """"sd1" | "sd2" | "sd2v" from an original-layout state dict (values: tensors, or shapes).

    The family comes from real distinguishing tensors: the text encoder layout (HF CLIP under
    ``cond_stage_model.transformer.`` = SD1, OpenCLIP under ``cond_stage_model.model.`` = SD2) and the UNet
    cross-attention context width (768 = SD1, 1024 = SD2). SD2 files carry no prediction flag, so v-prediction
    is inferred like ComfyUI/kohya do: an explicit ``v_pred`` key or modelspec metadata, else the spread of the
    last output block's ``norm1.bias`` (> 0.09 for the 768-v models). Pass ``kind=`` to override a wrong guess.
    """
    keys = list(state.keys())
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return _detect_sdxl(keys, state, source, metadata or {})
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelError(f"{source}: unknown checkpoint layout (no model.diffusion_model.* UNet weights); "
                         "expected an original-layout Stable Diffusion 1.x/2.x/XL checkpoint")
    conv_in = state.get("model.diffusion_model.input_blocks.0.0.weight")
    latent = _latent_channels(state)
    if conv_in is not None and shape_of(conv_in)[1] != latent:
        raise ModelError(f"{source}: UNet takes {shape_of(conv_in)[1]} input channels for {latent}-channel latents; "
                         "inpainting/depth models are not supported")
    has_clip = any(k.startswith("cond_stage_model.transformer.") for k in keys)
    has_openclip = any(k.startswith("cond_stage_model.model.") for k in keys)
    context = {shape_of(state[k])[-1] for k in keys if _CROSS_ATTN_K.match(k)}
    if has_openclip or (not has_clip and 1024 in context):
        family = "sd2"
    elif has_clip or 768 in context:
        family = "sd1"
    else:
        raise ModelError(f"{source}: cannot tell SD1 from SD2 (no text encoder weights, cross-attention width "
                         f"{sorted(context) or 'unknown'}); pass kind='sd1', 'sd2' or 'sd2v'")
    if family == "sd1":
        return "sd1"
    return "sd2v" if _is_v_prediction(state, metadata or {}) else "sd2"


def _latent_channels(state: Mapping[str, Any]) -> int:
    """Latent channels of the file's VAE (its post-quant conv), 4 (SD's) when the file has no VAE. A UNet that
    takes more input channels than that is an inpainting/depth model (latents + mask/image/depth channels)."""
    post_quant = state.get("first_stage_model.post_quant_conv.weight")
    return int(shape_of(post_quant)[1]) if post_quant is not None else 4


def _detect_sdxl(keys: list, state: Mapping[str, Any], source: str, metadata: Mapping[str, str]) -> str:
    """"sdxl" | "sdxl-v" for an SGM-layout (``conditioner.embedders.*``) checkpoint; refiners, inpainting and
    incomplete files are refused. SDXL has no reliable weight heuristic for v-prediction, so only an explicit
    ``v_pred`` key or prediction-type metadata makes it ``sdxl-v`` (else pass kind="sdxl-v")."""
    for prefix, part in _SDXL_PARTS:
        if not any(k.startswith(prefix) for k in keys):
            raise ModelError(f"{source}: incomplete or unsupported SDXL checkpoint (no {prefix}* {part} weights; "
                             f"SDXL refiner checkpoints are not supported)")
    conv_in = state.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and shape_of(conv_in)[1] != 4:
        raise ModelError(f"{source}: SDXL UNet takes {shape_of(conv_in)[1]} input channels; inpainting models "
                         "are not supported")
    return "sdxl-v" if _declared_v_prediction(state, metadata) else "sdxl"


def _declared_v_prediction(state: Mapping[str, Any], metadata: Mapping[str, str]) -> bool | None:
    """True/False when the file says (a ``v_pred`` key, prediction-type metadata), else None."""
    if "v_pred" in state:
        return True
    declared = str(metadata.get("modelspec.prediction_type", metadata.get("prediction_type", ""))).lower()
    if declared:
        return declared.startswith("v")
    return None


def file_prediction_type(kind: str, state: Mapping[str, Any], metadata: Mapping[str, str]) -> str:
    """The kind's prediction type; an SD1 file that declares v-prediction (a ``v_pred`` key or prediction-type
    metadata, which ComfyUI reads too) is v-prediction (e.g. the demo model)."""
    if kind == "sd1" and _declared_v_prediction(state, metadata):
        return "v_prediction"
    return PREDICTION_TYPES[kind]


def _is_v_prediction(state: Mapping[str, Any], metadata: Mapping[str, str]) -> bool:
    declared = _declared_v_prediction(state, metadata)
    if declared is not None:
        return declared
    norms = sorted(((int(m[1]), k) for k in state if (m := OUT_NORM1_BIAS.match(k))))
    if not norms or not isinstance(state[norms[-1][1]], torch.Tensor):
        return False
    bias = state[norms[-1][1]].float()
    return bool(torch.std(bias, unbiased=False) > V_PRED_STD_THRESHOLD)


def folder_kind(unet_config: Mapping, text_config: Mapping, scheduler_config: Mapping) -> str:
    """"sd1" | "sd2" | "sd2v" of a (non-SDXL) diffusers folder, from its UNet, text encoder and scheduler configs."""
    sd2 = unet_config.get("cross_attention_dim") == 1024 or text_config.get("hidden_act", "") == "gelu"
    if not sd2:
        return "sd1"
    return "sd2v" if scheduler_config.get("prediction_type") == "v_prediction" else "sd2"


def folder_is_sdxl(configs: Mapping) -> bool:
    """Whether a diffusers folder's configs (diffusers_folder.folder_configs) describe an SDXL model."""
    return "text_encoder_2" in configs or configs["unet"].get("addition_embed_type") == "text_time"
