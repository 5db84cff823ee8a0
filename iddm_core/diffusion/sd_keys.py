"""diffusers -> original Stable Diffusion ("LDM") key layout, for writing single-file checkpoints.

Why: the loaders must be tested on single-file checkpoints, and none can be downloaded, so we write our own
(from the tiny model) in exactly the layout that SD 1.x / 2.x ``.safetensors`` files use. The mapping is
derived from the block structure, generic over ``layers_per_block`` and the number of blocks:

* UNet: ``input_blocks`` hold, per down block, ``layers_per_block`` (resnet, attention) pairs then one
  downsampler; ``output_blocks`` hold ``layers_per_block + 1`` pairs per up block, the upsampler riding in the
  last one; ``middle_block`` is resnet, attention, resnet.
* VAE: ``encoder.down.i.block.j`` / ``decoder.up.(n-1-i).block.j`` (the decoder's up list is stored reversed),
  mid attention as 1x1 convolutions named q/k/v/proj_out.
* Text encoder: SD1 keeps the HF CLIP names under ``cond_stage_model.transformer.``; SD2 uses OpenCLIP names
  under ``cond_stage_model.model.`` with fused ``in_proj`` attention weights and one extra final block (SD2
  conditions on the penultimate layer, so the last block is unused; we write a copy of the previous one).
* SDXL: the UNet adds ``label_emb.0.*`` (the ``text_time`` embedding); CLIP ViT-L goes under
  ``conditioner.embedders.0.transformer.`` and OpenCLIP ViT-bigG under ``conditioner.embedders.1.model.``
  (all of its blocks, and its real text projection).
"""
from __future__ import annotations

import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."   # SDXL: CLIP ViT-L, HF names
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."      # SDXL: OpenCLIP ViT-bigG, with text projection

_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             # SDXL's "text_time" added embedding (pooled text + size/crop conditioning)
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _rename_inner(rest: str, table) -> str:
    for new, old in table:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_key_to_ldm(key: str, config) -> str:
    """One diffusers UNet2DConditionModel key -> its ``model.diffusion_model.*`` name."""
    lpb = config["layers_per_block"]
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    for new, old in _UNET_TOP.items():
        if key.startswith(new + "."):
            return UNET_PREFIX + old + key[len(new):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = (lpb + 1) * i + j + 1
        if kind == "resnets":
            return f"{UNET_PREFIX}input_blocks.{index}.0.{_rename_inner(rest, _UNET_RESNET)}"
        return f"{UNET_PREFIX}input_blocks.{index}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"{UNET_PREFIX}input_blocks.{(lpb + 1) * (int(m[1]) + 1)}.0.op.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        if m[1] == "attentions":
            return f"{UNET_PREFIX}middle_block.1.{m[3]}"
        return f"{UNET_PREFIX}middle_block.{2 * int(m[2])}.{_rename_inner(m[3], _UNET_RESNET)}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = (lpb + 1) * i + j
        if kind == "resnets":
            return f"{UNET_PREFIX}output_blocks.{index}.0.{_rename_inner(rest, _UNET_RESNET)}"
        return f"{UNET_PREFIX}output_blocks.{index}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if m:
        i = int(m[1])
        slot = 2 if up_has_attn[i] else 1
        return f"{UNET_PREFIX}output_blocks.{(lpb + 1) * i + lpb}.{slot}.conv.{m[2]}"
    raise KeyError(f"no original-layout name for UNet key {key}")


_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def vae_key_to_ldm(key: str, config) -> str:
    """One diffusers AutoencoderKL key -> its ``first_stage_model.*`` name."""
    n_up = len(config["up_block_types"])
    m = re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key)
    if m:
        return f"{VAE_PREFIX}{m[1]}.norm_out.{m[2]}"
    m = re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key)
    if m:
        return f"{VAE_PREFIX}encoder.down.{m[1]}.block.{m[2]}.{_rename_inner(m[3], _VAE_RESNET)}"
    m = re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"{VAE_PREFIX}encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key)
    if m:
        return f"{VAE_PREFIX}decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_rename_inner(m[3], _VAE_RESNET)}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"{VAE_PREFIX}decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key)
    if m:
        return f"{VAE_PREFIX}{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_inner(m[3], _VAE_RESNET)}"
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key)
    if m:
        return f"{VAE_PREFIX}{m[1]}.mid.attn_1.{_rename_inner(m[2], _VAE_ATTN)}"
    if re.match(r"(encoder|decoder)\.conv_(in|out)\.|(post_)?quant_conv\.", key):
        return VAE_PREFIX + key
    raise KeyError(f"no original-layout name for VAE key {key}")


def unet_to_ldm(state: dict, config) -> dict:
    return {unet_key_to_ldm(k, config): v for k, v in state.items()}


def vae_to_ldm(state: dict, config) -> dict:
    out = {}
    for k, v in state.items():
        new = vae_key_to_ldm(k, config)
        # the original VAE attention uses 1x1 convolutions where diffusers uses linear layers
        if ".mid.attn_1." in new and new.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out[new] = v
    return out


def with_text_model_prefix(state: dict) -> dict:
    """CLIPTextModel keys as SD files spell them (``text_model.embeddings...``).

    transformers 5 dropped the ``text_model.`` level from CLIPTextModel's own state dict; SD checkpoints (and
    diffusers' converters) keep it, so we normalise to the prefixed form when writing.
    """
    return {(k if k.startswith("text_model.") or k == "text_projection.weight" else "text_model." + k): v
            for k, v in state.items()}


def clip_to_ldm(state: dict, prefix: str = CLIP_PREFIX) -> dict:
    """SD1: the HF CLIPTextModel state dict under ``cond_stage_model.transformer.text_model.`` (SDXL: ``prefix``)."""
    return {prefix + k: v for k, v in with_text_model_prefix(state).items() if not k.endswith("position_ids")}


_OPENCLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                   ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))


def clip_to_openclip(state: dict, projection_dim: int | None = None, extra_last_layer: bool = True,
                     prefix: str = OPENCLIP_PREFIX) -> dict:
    """SD2: an HF CLIPTextModel state dict in OpenCLIP layout under ``cond_stage_model.model.``.

    q/k/v projections are fused into ``attn.in_proj_weight``/``in_proj_bias``. With ``extra_last_layer`` a
    final block (a copy of the last one) is appended, as SD2 files carry one block more than they use. SDXL's
    second encoder (a CLIPTextModelWithProjection) goes under ``prefix`` with no extra block; its real
    ``text_projection.weight`` [proj, width] is written transposed, as OpenCLIP multiplies ``x @ proj``.
    """
    p = prefix
    state = with_text_model_prefix(state)
    out: dict = {}
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    width = state["text_model.final_layer_norm.weight"].shape[0]
    out[p + "token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out[p + "positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out[p + "ln_final.weight"] = state["text_model.final_layer_norm.weight"]
    out[p + "ln_final.bias"] = state["text_model.final_layer_norm.bias"]
    if "text_projection.weight" in state:
        out[p + "text_projection"] = state["text_projection.weight"].T.contiguous()
    else:
        out[p + "text_projection"] = torch.eye(width, projection_dim or width)
    sources = layers + ([layers[-1]] if extra_last_layer else [])
    for target, i in enumerate(sources):
        src = f"text_model.encoder.layers.{i}."
        dst = f"{p}transformer.resblocks.{target}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [state[src + f"self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")], dim=0)
            for new, old in _OPENCLIP_LAYER:
                out[dst + f"{old}.{kind}"] = state[src + f"{new}.{kind}"].clone()
    return out
