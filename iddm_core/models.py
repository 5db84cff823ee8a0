"""Stable Diffusion loading, fully offline: the tiny model, diffusers folders and single-file checkpoints.

Everything downstream (LoRA injection, DreamBooth fine-tuning, PGD) works on a :class:`ModelBundle`, whatever
the model came from. Nothing here may reach a model hub: :func:`force_offline` runs at import, every
``from_pretrained`` gets ``local_files_only=True`` and configs ship in ``iddm_core/configs/<kind>/``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .offline import force_offline

force_offline()

import torch  # noqa: E402

from .errors import ModelError  # noqa: E402

KINDS = ("sd1", "sd2", "sd2v")
PREDICTION_TYPES = {"sd1": "epsilon", "sd2": "epsilon", "sd2v": "v_prediction"}
RESOLUTIONS = {"sd1": 512, "sd2": 512, "sd2v": 768}


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

    def to(self, device=None, dtype=None) -> "ModelBundle":
        """Move the three networks (in place) and return self, so ``bundle.to("cuda")`` chains."""
        for module in (self.unet, self.vae, self.text_encoder):
            if device is not None:
                module.to(device=device)
            # only cast when needed: diffusers warns on every dtype cast, even a no-op one
            if dtype is not None and next(module.parameters()).dtype != dtype:
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


def load_model(path: str, kind: str | None = None, tokenizer: str | None = None,
               device="cpu", dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Load a Stable Diffusion model for training.

    ``path``: ``"tiny"`` (the built-in tiny model, seed 0), a diffusers folder, or a single-file checkpoint
    (``.safetensors``; ``.ckpt``/``.pt`` only if ``torch.load(weights_only=True)`` accepts them) in the original
    SD key layout. ``kind`` overrides detection ("sd1" | "sd2" | "sd2v"). ``tokenizer`` is a folder holding
    ``vocab.json`` + ``merges.txt`` (needed for single files outside ComfyUI).
    """
    if kind is not None and kind not in KINDS:
        raise ModelError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    if str(path) == "tiny":
        from .tiny import build_tiny_bundle

        bundle = build_tiny_bundle(0)
        if kind is not None and kind != "sd1":
            raise ModelError(f"kind={kind!r}: the tiny model is sd1-shaped")
        return bundle.to(device, dtype)
    return _load_from_path(path, kind=kind, tokenizer=tokenizer).to(device, dtype)


def _load_from_path(path, kind=None, tokenizer=None) -> ModelBundle:
    raise ModelError(f"{path}: loading model files is not implemented yet")
