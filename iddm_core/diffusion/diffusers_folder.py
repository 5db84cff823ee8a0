"""Diffusers model folders (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL also
text_encoder_2/ and tokenizer_2/) -> :class:`ModelBundle`.

:func:`folder_setup` reads only the JSON configs and the tokenizer, so validation.validate_model checks a folder
with the same code without opening its weights. Every ``from_pretrained`` is ``local_files_only``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ModelError
from ..events import report_setup
from .bundle import ModelBundle, native_resolution, training_scheduler
from .kinds import PREDICTION_TYPES, SDXL_KINDS, folder_is_sdxl, folder_kind
from .tokenizers import check_text_encoder_fits, check_tokenizer_fits, resolve_tokenizer, resolve_tokenizer_2

_FOLDER_CONFIGS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                   "scheduler": "scheduler_config.json"}
# the weights file stems each part's subfolder may hold (with .safetensors or .bin)
FOLDER_WEIGHTS = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                  "text_encoder": ("model", "pytorch_model")}


def folder_configs(folder: Path) -> dict:
    """The four JSON configs of a diffusers folder (no weights read); a missing part is a :class:`ModelError`."""
    configs = {}
    for part, name in _FOLDER_CONFIGS.items():
        if not (folder / part).is_dir():
            raise ModelError(f"{folder}: not a diffusers model folder (no {part}/ subfolder)")
        try:
            configs[part] = json.loads((folder / part / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{folder}: cannot read {part}/{name} ({exc.__class__.__name__})") from exc
    if (folder / "text_encoder_2").is_dir():   # SDXL
        try:
            configs["text_encoder_2"] = json.loads((folder / "text_encoder_2" / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{folder}: cannot read text_encoder_2/config.json ({exc.__class__.__name__})") from exc
    return configs


def folder_setup(folder: Path, kind: str | None, tokenizer):
    """(kind, configs, tokenizer) of a diffusers folder, the tokenizer checked against the text encoder config.
    SDXL: the tokenizer is the pair (tokenizer, tokenizer_2)."""
    configs = folder_configs(folder)
    if folder_is_sdxl(configs):
        if kind is not None and kind not in SDXL_KINDS:
            raise ModelError(f"{folder}: kind={kind!r} does not fit this SDXL folder; pass kind='sdxl' or 'sdxl-v'")
        if "text_encoder_2" not in configs:
            raise ModelError(f"{folder}: SDXL folder without text_encoder_2/ (refiners are not supported)")
        predicted = configs["scheduler"].get("prediction_type")
        kind = kind or ("sdxl-v" if predicted == "v_prediction" else "sdxl")
    elif kind in SDXL_KINDS:
        raise ModelError(f"{folder}: kind={kind!r} does not fit this folder (not SDXL: no text_encoder_2/)")
    kind = kind or folder_kind(configs["unet"], configs["text_encoder"], configs["scheduler"])
    tok = resolve_tokenizer(kind, tokenizer, folder, str(folder))
    check_text_encoder_fits(tok, configs["text_encoder"], str(folder))
    if kind in SDXL_KINDS:   # tok becomes (tokenizer, tokenizer_2)
        tok = (tok, resolve_tokenizer_2(tokenizer, folder, str(folder)))
        check_text_encoder_fits(tok[1], configs["text_encoder_2"], str(folder))
    return kind, configs, tok


def _check_loaded_encoder(tok, encoder, folder: Path) -> None:
    """The tokenizer against the loaded text encoder's real embedding (its config may understate it)."""
    rows = int(encoder.get_input_embeddings().weight.shape[0])
    check_tokenizer_fits(tok, rows, encoder.config.eos_token_id, str(folder))


def load_diffusers(folder: str | os.PathLike, kind: str | None = None,
                   tokenizer: str | os.PathLike | None = None, callback=None) -> ModelBundle:
    """A diffusers folder -> :class:`ModelBundle` (float32, CPU). ``callback``: a setup event before each part (it
    may raise to cancel)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    kind, configs, tok = folder_setup(folder, kind, tokenizer)   # before any weights are read
    extra = {}
    try:
        report_setup(callback, "load", "loading the model: UNet")
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True)
        report_setup(callback, "load", "loading the model: VAE")
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", local_files_only=True)
        report_setup(callback, "load", "loading the model: text encoder")
        text_encoder = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", local_files_only=True)
        scheduler_config = DDPMScheduler.load_config(str(folder), subfolder="scheduler", local_files_only=True)
        if kind in SDXL_KINDS:
            from transformers import CLIPTextModelWithProjection

            report_setup(callback, "load", "loading the model: text encoder 2")
            extra["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                str(folder), subfolder="text_encoder_2", local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: cannot load the diffusers model ({exc})") from exc
    if kind in SDXL_KINDS:
        tok, extra["tokenizer_2"] = tok
        _check_loaded_encoder(extra["tokenizer_2"], extra["text_encoder_2"], folder)
    _check_loaded_encoder(tok, text_encoder, folder)
    prediction_type = PREDICTION_TYPES[kind]
    return ModelBundle(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tok,
                       noise_scheduler=training_scheduler(dict(scheduler_config), prediction_type), kind=kind,
                       prediction_type=prediction_type, resolution=native_resolution(vae.config, kind),
                       title=folder.name, **extra)
