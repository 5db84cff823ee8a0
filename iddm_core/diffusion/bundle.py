"""The :class:`ModelBundle` every downstream step works on, and the small config helpers that fill its fields.

Everything downstream (LoRA injection, DreamBooth fine-tuning, PGD) works on a :class:`ModelBundle`, whatever the
model came from (loading.load_model). Nothing here may reach a model hub: importing this module (which every
loader and writer does) runs :func:`~iddm_core.offline.force_offline` and checks that diffusers imports with this
torch, before anything imports diffusers or transformers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..offline import force_offline

force_offline()

import torch  # noqa: E402

from ..requirements_check import require  # noqa: E402
from .kinds import RESOLUTIONS  # noqa: E402

require("diffusers")   # a diffusers that cannot import with this torch fails here, naming the fix


@dataclass
class ModelBundle:
    """The five pieces DreamBooth-LoRA training needs, plus what the LoRA metadata must say about the base."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any          # DDPMScheduler configured for training
    kind: str                     # "sd1" | "sd2" | "sd2v"
    prediction_type: str          # "epsilon" | "v_prediction"
    resolution: int               # native training resolution in pixels
    title: str                    # checkpoint stem, shown in LoRA metadata (never a full path)
    text_encoder_2: Any = None    # SDXL only: OpenCLIP ViT-bigG (CLIPTextModelWithProjection)
    tokenizer_2: Any = None       # SDXL only: its tokenizer (CLIP vocabulary, pads with "!")

    def to(self, device=None, dtype=None) -> "ModelBundle":
        """Move the networks (in place) and return self, so ``bundle.to("cuda")`` chains."""
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is None:
                continue
            if device is not None:
                module.to(device=device)
            # only cast when needed: diffusers warns on every dtype cast, even a no-op one
            if dtype is not None and next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)
        return self

    def cast(self, dtypes: Mapping[str, torch.dtype]) -> "ModelBundle":
        """Cast parts by name (``{"unet": torch.bfloat16, ...}``, see ``precision.weight_dtypes``) in place."""
        for part, dtype in dtypes.items():
            module = getattr(self, part)
            if module is not None and next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: 2 per VAE downsampling, i.e. 8 for every SD model (and the tiny one)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        """Latent scale applied after ``vae.encode`` (0.18215 for SD 1/2)."""
        return float(self.vae.config.scaling_factor)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor


def clean_config(config: dict) -> dict:
    """A diffusers config without its private ``_class_name``/``_diffusers_version``-style entries."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def native_resolution(vae_config: Mapping, kind: str) -> int:
    """The model's training resolution in pixels: the VAE's sample size, else the kind's usual one."""
    size = vae_config.get("sample_size")
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if size else RESOLUTIONS[kind]


def training_scheduler(config: dict, prediction_type: str):
    """The DDPMScheduler a bundle trains with: ``config`` with the model's prediction type."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config({**clean_config(config), "prediction_type": prediction_type})
