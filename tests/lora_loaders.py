"""What ComfyUI's and A1111's built-in LoRA loaders do with the names of a kohya file, restated for the tests
(in our words: neither application is installed here).

ComfyUI, Comfy-Org/ComfyUI at a125cd84b054a57729b5eecab930ca9408719832 (2025-10-12). LoraLoader ->
comfy/sd.py load_lora_for_models: comfy/lora_convert.py convert_lora leaves a kohya file as it is; the names it
can apply come from comfy/lora.py model_lora_keys_unet and model_lora_keys_clip; comfy/lora.py load_lora then takes,
for each such name X, ``X.alpha`` and (comfy/weight_adapter/lora.py LoRAAdapter.load) ``X.lora_up.weight`` with
``X.lora_down.weight`` (and ``X.lora_mid.weight`` when present), and logs "lora key not loaded" for every other key.
- UNet names: for each weight ``diffusion_model.P.weight`` of the model (the original, LDM/SGM layout)
  ``lora_unet_`` + P with "." -> "_"; and for each diffusers path D of comfy/utils.py unet_to_diffusers (derived
  from the block layout: num_res_blocks, channel_mult, transformer depths) ``lora_unet_`` + D with "." -> "_".
- Text-encoder names: ``lora_te_`` / ``lora_te1_`` + ``text_model_encoder_layers_<i>_<m>`` for the first CLIP, and
  ``lora_te2_`` for SDXL's second, m one of mlp_fc1/2, self_attn_q/k/v/out_proj (LORA_CLIP_MAP).
- Applying (LoRAAdapter.calculate_weight, no lora_mid): ``weight += alpha / rank * (up.flatten(1) @
  down.flatten(1)).reshape(weight.shape)``, rank = ``down.shape[0]``.

A1111 1.10 (AUTOMATIC1111/stable-diffusion-webui extensions-builtin/Lora/networks.py load_network and
convert_diffusers_name_to_compvis; network_lora.py): a diffusers-named SD1/SD2 UNet module is renamed by fixed rules
for SD's own layout (two ResBlocks per down level, three per up level); an unconverted ``lora_unet_`` name is tried
with ``diffusion_model`` in its place (how SDXL's SGM names land). A module's lora_down on a conv with a 3x3 kernel
becomes a conv with the layer's kernel, stride and padding, lora_up a 1x1 conv; ``lora_mid`` is optional.
"""
from __future__ import annotations

import re

import torch

RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
          "conv_shortcut": "skip_connection"}
BLOCK_LEAVES = tuple(f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")) + \
    ("ff.net.0.proj", "ff.net.2")
CLIP_LEAVES = ("mlp_fc1", "mlp_fc2", "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj")
LORA_PARTS = ("alpha", "lora_up.weight", "lora_down.weight", "lora_mid.weight")


def _per_level(value, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def comfy_unet_to_diffusers(config) -> dict[str, str]:
    """comfy/utils.py unet_to_diffusers at module level, for a diffusers UNet config: diffusers module path ->
    original module path (ResBlock layers, attention projections and transformer-block layers, samplers)."""
    levels = len(config["block_out_channels"])
    res = _per_level(config["layers_per_block"], levels)
    depth = _per_level(config.get("transformer_layers_per_block") or 1, levels)
    out: dict[str, str] = {}

    def resnet(diff: str, orig: str) -> None:
        out.update({f"{diff}.{d}": f"{orig}.{o}" for d, o in RESNET.items()})

    def attention(diff: str, orig: str, blocks: int) -> None:
        out.update({f"{diff}.{leaf}": f"{orig}.{leaf}" for leaf in ("proj_in", "proj_out")})
        out.update({f"{diff}.transformer_blocks.{t}.{leaf}": f"{orig}.transformer_blocks.{t}.{leaf}"
                    for t in range(blocks) for leaf in BLOCK_LEAVES})

    n = 1
    for x, kind in enumerate(config["down_block_types"]):
        for i in range(res[x]):
            resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0")
            if "CrossAttn" in kind:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", depth[x])
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"   # also past the last level
        n += 1
    attention("mid_block.attentions.0", "middle_block.1", depth[-1])
    resnet("mid_block.resnets.0", "middle_block.0")
    resnet("mid_block.resnets.1", "middle_block.2")
    n = 0
    for x, kind in enumerate(config["up_block_types"]):
        blocks = res[::-1][x] + 1
        for i in range(blocks):
            resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0")
            slot = 1
            if "CrossAttn" in kind:
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", depth[::-1][x])
                slot = 2
            if i == blocks - 1:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{slot}.conv"
            n += 1
    return out


def comfy_key_map(unet_weight_paths, config, te_layers: dict[str, int], sdxl: bool) -> dict[str, tuple[str, str]]:
    """ComfyUI's kohya name -> (part, module path) for a model whose UNet weights sit at ``unet_weight_paths``
    (original layout, without ``diffusion_model.`` and ``.weight``); ``te_layers``: encoder layers per part."""
    key_map = {"lora_unet_" + p.replace(".", "_"): ("unet", p) for p in unet_weight_paths}
    for diff, orig in comfy_unet_to_diffusers(config).items():
        key_map["lora_unet_" + diff.replace(".", "_")] = ("unet", orig)
    clip_prefixes = {"text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",) if sdxl else ()}
    for part, layers in te_layers.items():
        for prefix in clip_prefixes[part]:
            for i in range(layers):
                for leaf in CLIP_LEAVES:
                    key_map[f"{prefix}text_model_encoder_layers_{i}_{leaf}"] = (part, f"layers.{i}.{leaf}")
    return key_map


def comfy_unloaded(tensors: dict, key_map: dict) -> list[str]:
    """The keys ComfyUI's load_lora leaves unloaded ("lora key not loaded")."""
    loaded = set()
    for name in key_map:
        if f"{name}.lora_up.weight" in tensors and f"{name}.lora_down.weight" in tensors:
            loaded.update(f"{name}.{part}" for part in LORA_PARTS if f"{name}.{part}" in tensors)
    return sorted(set(tensors) - loaded)


def comfy_delta(tensors: dict, name: str, weight_shape) -> torch.Tensor:
    """The weight change ComfyUI applies for module ``name`` (strength 1)."""
    up, down = tensors[f"{name}.lora_up.weight"].float(), tensors[f"{name}.lora_down.weight"].float()
    alpha = float(tensors[f"{name}.alpha"])
    return alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(weight_shape)


_A1111_RULES = (   # (pattern, compvis name from the groups) for SD's own layout, as networks.py converts
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
               f"{_suffix(m[2], m[4])}"),
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{_suffix(m[1], m[3])}"),
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{_suffix(m[2], m[4])}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"input_blocks_{3 + int(m[1]) * 3}_0_op"),
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
     lambda m: f"output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
)


def _suffix(kind: str, leaf: str) -> str:
    return {k: v.replace(".", "_") for k, v in RESNET.items()}.get(leaf, leaf) if kind == "resnets" else leaf


def a1111_unet_module(name: str, compvis_modules: set[str]) -> str | None:
    """The compvis UNet module (``diffusion_model_...``) A1111 applies kohya UNet module ``name`` to, or None."""
    for pattern, convert in _A1111_RULES:
        m = re.fullmatch(pattern, name)
        if m and "diffusion_model_" + convert(m) in compvis_modules:
            return "diffusion_model_" + convert(m)
    fallback = name.replace("lora_unet", "diffusion_model")
    return fallback if fallback in compvis_modules else None
