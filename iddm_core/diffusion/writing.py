"""Writing a :class:`ModelBundle`: as one original-layout ``.safetensors`` (the layout ComfyUI, A1111 and kohya read,
with the architecture in its metadata so single_file.load_single_file rebuilds non-standard models such as the tiny
and demo ones) or as a diffusers folder. Both are written atomically: nothing half-written is left behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import atomic_write, check_writable
from . import sd_keys
from .bundle import ModelBundle, clean_config
from .kinds import SDXL_KINDS
from .reading import CONFIGS_METADATA_KEY


def bundle_to_original(bundle: ModelBundle) -> dict:
    """The bundle's weights in the original SD single-file key layout (SD1: HF CLIP; SD2: OpenCLIP; SDXL: both,
    under ``conditioner.embedders.0/1``)."""
    state = {}
    state.update(sd_keys.unet_to_ldm(bundle.unet.state_dict(), bundle.unet.config))
    state.update(sd_keys.vae_to_ldm(bundle.vae.state_dict(), bundle.vae.config))
    text = bundle.text_encoder.state_dict()
    if bundle.kind in SDXL_KINDS:
        state.update(sd_keys.clip_to_ldm(text, prefix=sd_keys.SDXL_CLIP_PREFIX))
        state.update(sd_keys.clip_to_openclip(bundle.text_encoder_2.state_dict(), extra_last_layer=False,
                                              prefix=sd_keys.SDXL_OPENCLIP_PREFIX))
    elif bundle.kind == "sd1":
        state.update(sd_keys.clip_to_ldm(text))
    else:
        state.update(sd_keys.clip_to_openclip(text, bundle.text_encoder.config.projection_dim))
    if bundle.prediction_type == "v_prediction":
        state["v_pred"] = torch.tensor([])   # the marker ComfyUI/kohya read for v-prediction checkpoints
    if bundle.noise_scheduler.config.get("rescale_betas_zero_snr"):
        state["ztsnr"] = torch.tensor([])    # ... and for a zero-terminal-SNR schedule
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_single_file(bundle: ModelBundle, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``bundle`` as one original-layout ``.safetensors`` (atomically), architecture in its metadata."""
    state = bundle_to_original(bundle)
    configs = {"unet": clean_config(dict(bundle.unet.config)), "vae": clean_config(dict(bundle.vae.config)),
               "text_encoder": bundle.text_encoder.config.to_diff_dict(),
               "scheduler": clean_config(dict(bundle.noise_scheduler.config))}
    configs["text_encoder"].pop("transformers_version", None)
    if bundle.text_encoder_2 is not None:
        configs["text_encoder_2"] = bundle.text_encoder_2.config.to_diff_dict()
        configs["text_encoder_2"].pop("transformers_version", None)
    metadata = {CONFIGS_METADATA_KEY: json.dumps(configs, default=list), "iddm.kind": bundle.kind}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata), overwrite=overwrite)


def save_diffusers(bundle: ModelBundle, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``bundle`` as a diffusers folder: built under a temporary name, renamed into place at the end."""
    folder = check_writable(folder, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=str(folder.parent)))
    try:
        bundle.unet.save_pretrained(str(tmp / "unet"))
        bundle.vae.save_pretrained(str(tmp / "vae"))
        bundle.text_encoder.save_pretrained(str(tmp / "text_encoder"))
        bundle.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        bundle.noise_scheduler.save_pretrained(str(tmp / "scheduler"))
        index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
                 "safety_checker": [None, None], "feature_extractor": [None, None],
                 "requires_safety_checker": False}
        if bundle.text_encoder_2 is not None:   # SDXL
            bundle.text_encoder_2.save_pretrained(str(tmp / "text_encoder_2"))
            bundle.tokenizer_2.save_pretrained(str(tmp / "tokenizer_2"))
            index = {"_class_name": "StableDiffusionXLPipeline", "unet": index["unet"], "vae": index["vae"],
                     "text_encoder": index["text_encoder"], "tokenizer": index["tokenizer"],
                     "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                     "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": index["scheduler"],
                     "force_zeros_for_empty_prompt": True}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
