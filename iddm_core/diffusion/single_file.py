"""Single-file checkpoints (original SD key layout: ``.safetensors``, or a weights-only pickle) -> :class:`ModelBundle`.

Keys are converted with diffusers' public single-file conversion functions (pure functions on a dict; no hub
access). :func:`single_file_setup` (kind, architecture, tokenizer checked against the text encoder) and
:func:`single_file_parts` (the converted weights per part) work on meta tensors too, so validation.validate_model
checks a file with the same code without loading it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import ModelError
from ..events import report_setup
from .bundle import ModelBundle, clean_config, native_resolution, training_scheduler
from .kinds import SDXL_KINDS, ZERO_TERMINAL_SNR, detect_kind, file_prediction_type
from .reading import read_checkpoint, single_file_configs, token_rows
from .tokenizers import (carries_tiny_vocabulary, check_text_encoder_fits, resolve_tokenizer, resolve_tokenizer_2,
                         tiny_tokenizer)


def single_file_setup(path: Path, state: dict, metadata: dict, kind: str | None, tokenizer):
    """(kind, configs, tokenizer) of a single file, the tokenizer checked against the text encoder's embedding.

    Runs before any network is built, so a wrong tokenizer fails in a second, not after the UNet is loaded.
    SDXL: the tokenizer is the pair (tokenizer, tokenizer_2)."""
    kind = kind or detect_kind(state, str(path), metadata)
    sgm = any(k.startswith("conditioner.embedders.") for k in state)
    if (kind in SDXL_KINDS) != sgm:
        raise ModelError(f"{path}: kind={kind!r} does not fit this file ({'an SDXL' if sgm else 'not an SDXL'} "
                         f"checkpoint); pass kind=... matching the file, or none to detect it")
    configs = single_file_configs(path, metadata, kind)
    if "ztsnr" in state:   # ComfyUI's and Forge's marker of a zero-terminal-SNR schedule (with ``v_pred``)
        configs = {**configs, "scheduler": {**configs["scheduler"], **ZERO_TERMINAL_SNR}}
    own = tokenizer is None and carries_tiny_vocabulary(state, metadata, kind)
    tok = tiny_tokenizer(pad="!" if kind in ("sd2", "sd2v") else None) if own else \
        resolve_tokenizer(kind, tokenizer, None, str(path))
    if kind in SDXL_KINDS:
        tok = (tok, tiny_tokenizer(pad="!") if own else resolve_tokenizer_2(tokenizer, None, str(path)))
        for t, n, part in ((tok[0], 0, "text_encoder"), (tok[1], 1, "text_encoder_2")):
            check_text_encoder_fits(t, configs[part], str(path), token_rows(state, f"conditioner.embedders.{n}."))
        return kind, configs, tok
    check_text_encoder_fits(tok, configs["text_encoder"], str(path), token_rows(state))
    return kind, configs, tok


def single_file_parts(path: Path, state: dict, configs: dict, kind: str) -> list:
    """[(part, factory, converted state)] for the UNet, VAE and text encoder(s) of an original-layout state dict.

    Conversion is renaming and reshaping, so it also works on meta tensors (validation.validate_model)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet_config, vae_config = clean_config(configs["unet"]), clean_config(configs["vae"])
    try:
        unet_state = convert_ldm_unet_checkpoint(state, unet_config)
        vae_state = convert_ldm_vae_checkpoint(state, vae_config)
    except (KeyError, IndexError) as exc:  # the converters index keys blindly
        raise ModelError(f"{path}: the UNet/VAE weights do not fit the {kind} layout (missing {exc})") from exc
    text_parts = _sdxl_text_parts(state, configs) if kind in SDXL_KINDS else _text_part(state, configs)
    return [("UNet", lambda: UNet2DConditionModel.from_config(unet_config), unet_state),
            ("VAE", lambda: AutoencoderKL.from_config(vae_config), vae_state), *text_parts]


def _text_part(state: dict, configs: dict) -> list:
    """The SD1 (HF CLIP names under ``cond_stage_model.transformer.``) or SD2 (OpenCLIP under
    ``cond_stage_model.model.``) text encoder."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = dict(clean_config(configs["text_encoder"]))
    openclip = any(k.startswith("cond_stage_model.model.") for k in state)
    if openclip:
        blocks = {int(m[1]) for k in state
                  if (m := re.match(r"cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.", k))}
        # SD2 conditions on the penultimate block: the text model has one block fewer than the file
        text_config["num_hidden_layers"] = max(len(blocks) - 1, 1)
    text_cfg = CLIPTextConfig(**text_config)
    with torch.device("meta"):
        probe = CLIPTextModel(text_cfg)
    converted = convert_open_clip_checkpoint(probe, state) if openclip else convert_ldm_clip_checkpoint(state)
    return [("text encoder", lambda: CLIPTextModel(text_cfg), _match_text_prefix(probe, converted))]


def _sdxl_text_parts(state: dict, configs: dict) -> list:
    """The two SDXL text encoders: CLIP ViT-L (HF names under ``conditioner.embedders.0.transformer.``) and
    OpenCLIP ViT-bigG with its projection (``conditioner.embedders.1.model.``, every block used)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg_1 = CLIPTextConfig(**clean_config(configs["text_encoder"]))
    cfg_2 = CLIPTextConfig(**clean_config(configs["text_encoder_2"]))
    with torch.device("meta"):
        probe_1, probe_2 = CLIPTextModel(cfg_1), CLIPTextModelWithProjection(cfg_2)
    first = {k: v for k, v in state.items() if k.startswith("conditioner.embedders.0.transformer.")}
    second = convert_open_clip_checkpoint(probe_2, state, prefix="conditioner.embedders.1.model.")
    return [("text encoder", lambda: CLIPTextModel(cfg_1), _match_text_prefix(probe_1, convert_ldm_clip_checkpoint(first))),
            ("text encoder 2", lambda: CLIPTextModelWithProjection(cfg_2), second)]


def _match_text_prefix(module, state: dict) -> dict:
    """Make converted CLIP keys agree with the installed transformers on the ``text_model.`` level."""
    prefixed = any(k.startswith("text_model.") for k in module.state_dict())
    out = {}
    for k, v in state.items():
        bare = k[len("text_model."):] if k.startswith("text_model.") else k
        out["text_model." + bare if prefixed else bare] = v
    return out


def check_state(own: dict, state: dict, source: str, part: str, kind: str) -> None:
    """A missing or misshapen tensor is an error; keys the module has no use for are ignored."""
    missing = [k for k in own if k not in state and not k.endswith("position_ids")]
    if missing:
        raise ModelError(f"{source}: the {part} does not match the {kind} architecture ({len(missing)} weights "
                         f"missing, e.g. {missing[0]}); if the kind was guessed wrong pass kind=...")
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ModelError(f"{source}: the {part} does not match the {kind} architecture ({bad[0]} has shape "
                         f"{tuple(state[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}); pass kind=...")


def _build_loaded(factory, state: dict, source: str, part: str, kind: str):
    """``factory()`` with ``state`` loaded; the weights are checked on a meta-device copy first.

    Why meta first: a wrong guess of the architecture would otherwise allocate and randomly initialise a
    full-size network (seconds and gigabytes) only to fail.
    """
    with torch.device("meta"):
        check_state(factory().state_dict(), state, source, part, kind)
    module = factory()
    own = module.state_dict()
    module.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    return module.eval()


def load_single_file(path: str | os.PathLike, kind: str | None = None,
                     tokenizer: str | os.PathLike | None = None, callback=None) -> ModelBundle:
    """An original-layout SD checkpoint -> :class:`ModelBundle` (float32, CPU).

    The architecture comes from the file's ``iddm.configs`` metadata when present (files written by
    writing.save_single_file, e.g. the tiny model), else from ``iddm_core/diffusion/configs/<kind>/``. A tokenizer
    that does not fit the text encoder is a :class:`ModelError` before any network is built. ``callback``: a setup
    event before each part (it may raise to cancel there).
    """
    path = Path(path)
    state, metadata = read_checkpoint(path)
    kind, configs, tok = single_file_setup(path, state, metadata, kind, tokenizer)
    modules = []
    for part, factory, part_state in single_file_parts(path, state, configs, kind):
        report_setup(callback, "load", f"loading the model: {part}")     # ``callback`` may cancel between parts
        modules.append(_build_loaded(factory, part_state, str(path), part, kind))
    prediction_type = file_prediction_type(kind, state, metadata)
    extra = {}
    if kind in SDXL_KINDS:   # tok is (tokenizer, tokenizer_2), modules end with text_encoder_2
        tok, extra = tok[0], {"text_encoder_2": modules.pop(), "tokenizer_2": tok[1]}
    unet, vae, text_encoder = modules
    return ModelBundle(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                       noise_scheduler=training_scheduler(configs["scheduler"], prediction_type), kind=kind,
                       prediction_type=prediction_type, resolution=native_resolution(configs["vae"], kind),
                       title=path.stem, **extra)
