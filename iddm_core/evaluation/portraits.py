"""Portraits from a model and a kohya LoRA, in the library: the CLI's ``evaluate``, the ComfyUI "IDDM Portraits"
node and anything else that needs samples from a LoRA use this one path.

Why a path of our own besides the hosts' samplers: the pack's demo and tiny models are SD1-*shaped* but not SD1
*sized*, so ComfyUI's Load Checkpoint cannot detect them ("Could not detect model type") and A1111 cannot load them;
a user who trained on the demo model could otherwise never see a portrait from the LoRA. Real checkpoints work here
too (slower than the host's own sampler, which remains the way to make pictures with them).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError, ModelError
from ..events import Emitter, report_setup


def apply_lora_file(bundle, path) -> None:
    """Load a kohya LoRA file into ``bundle``'s UNet/text encoder(s) in place, with diffusers' kohya reader (the
    same conversion front ends use), by wrapping the bundle's modules in a StableDiffusion(XL)Pipeline."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path)
    if not path.is_file():
        raise InputError(f"lora: file not found: {path}")
    scheduler = DDIMScheduler.from_config(bundle.noise_scheduler.config)
    if bundle.text_encoder_2 is not None:      # SDXL: lora_te1_ / lora_te2_ and the SGM UNet names
        pipe = StableDiffusionXLPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder,
                                         text_encoder_2=bundle.text_encoder_2, tokenizer=bundle.tokenizer,
                                         tokenizer_2=bundle.tokenizer_2, unet=bundle.unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
                                       unet=bundle.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    except Exception as exc:   # diffusers raises ValueError/KeyError/RuntimeError for foreign layouts
        raise ModelError(f"cannot apply LoRA {path.name}: {exc.__class__.__name__}: {exc}") from exc


def check_sampling(count: int, steps: int, guidance: float) -> None:
    """Clear errors for numbers a sampler cannot use, before the model is loaded."""
    if count < 1:
        raise InputError(f"count={count}: at least 1 image")
    if steps < 1:
        raise InputError(f"steps={steps}: at least 1 sampling step")
    if not guidance >= 0:
        raise InputError(f"guidance={guidance}: must be 0 or more")


# 9 parameters: the sampler's settings, each with a default, as the Portraits node and the tab pass them.
def portraits(bundle, prompt: str, count: int, seed: int = 0, steps: int = 25, guidance: float = 5.0,
              lora=None, callback=None, batch: int = 4):
    """``count`` images ``[count, 3, H, W]`` in [0, 1] of ``prompt`` from ``bundle`` with the kohya LoRA file
    ``lora`` applied in place (None: the base model as it is), deterministic DDIM from ``seed`` (the same images
    as :func:`~iddm_core.training.sampling.generate_images` with that seed). ``callback`` gets an event before the LoRA is
    applied (a setup event) and after each batch; it may raise to cancel."""
    import torch

    from ..training.sampling import generate_image_batches

    check_sampling(count, steps, guidance)
    emit = Emitter(callback, total=count)
    if lora is not None:
        report_setup(callback, "load", "applying the LoRA")
        apply_lora_file(bundle, lora)
    out = []
    with torch.no_grad():
        for images in generate_image_batches(bundle, prompt, count, seed=seed, steps=steps, guidance_scale=guidance,
                                             batch=batch):
            out.append(images)
            emit("generate", advance=len(images), message=f"image {sum(len(o) for o in out)}/{count}")
    return torch.cat(out)
