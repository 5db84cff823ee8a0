"""Sampling images from a bundle: deterministic DDIM (eta = 0) with classifier-free guidance.

Runs whatever LoRA adapters are active (wrap in ``lora.lora_disabled`` for the base model). Used for the
prior-preservation class images (finetune.py), the evaluation's portraits and the demo.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .conditioning import SDXLConditioning, cat_conditioning, encode_prompts, unet_conditioning


# 9 parameters: the sampler's settings, each a keyword with a default (evaluate, portraits, demo, class images)
@torch.no_grad()
def generate_images(bundle, prompt: str, n: int, seed: int = 0, steps: int = 20, guidance_scale: float = 7.5,
                    resolution: Optional[int] = None, batch: int = 4,
                    on_step: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Sample ``n`` images ``[n, 3, H, W]`` in [0, 1] from the bundle with deterministic DDIM (eta = 0) and
    classifier-free guidance. Runs whatever adapters are active: wrap in :func:`lora_disabled` for the base.
    ``on_step(done, total)``: after every sampler step of every batch (may raise to stop)."""
    return torch.cat(list(generate_image_batches(bundle, prompt, n, seed, steps, guidance_scale, resolution, batch,
                                                 on_step)))


# 9 parameters: those of generate_images, which it serves one batch at a time
def generate_image_batches(bundle, prompt: str, n: int, seed: int = 0, steps: int = 20, guidance_scale: float = 7.5,
                           resolution: Optional[int] = None, batch: int = 4,
                           on_step: Optional[Callable[[int, int], None]] = None):
    """:func:`generate_images` one batch at a time (``[m, 3, H, W]`` each; one noise stream for all), so a caller
    can report progress and cancel between batches; ``on_step(done, total)`` is called after every sampler step
    (``total`` = batches x steps) and may raise to stop within one UNet call."""
    from diffusers import DDIMScheduler

    res = resolution or bundle.resolution
    sched = DDIMScheduler.from_config(bundle.noise_scheduler.config)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    cond = encode_prompts(bundle, [prompt], res).float()
    uncond = cond.unconditional() if isinstance(cond, SDXLConditioning) else encode_prompts(bundle, [""]).float()
    dtype = next(bundle.unet.parameters()).dtype
    size = res // bundle.vae_scale_factor
    done, total = 0, -(-n // batch) * len(sched.timesteps)
    for start in range(0, n, batch):
        m = min(batch, n - start)
        latents = torch.randn((m, bundle.unet.config.in_channels, size, size), generator=gen)
        latents = latents.to(bundle.device) * sched.init_noise_sigma
        ctx = unet_conditioning(cat_conditioning([uncond.expand(m, -1, -1), cond.expand(m, -1, -1)]), dtype)
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([latents] * 2), t).to(dtype)
            pred_u, pred_c = bundle.unet(inp, t, **ctx).sample.float().chunk(2)
            pred = pred_u + guidance_scale * (pred_c - pred_u)
            latents = sched.step(pred, t, latents).prev_sample
            done += 1
            if on_step is not None:
                on_step(done, total)
        vae_dtype = next(bundle.vae.parameters()).dtype
        decoded = bundle.vae.decode((latents / bundle.scaling_factor).to(vae_dtype)).sample.float()
        yield ((decoded + 1) / 2).clamp(0, 1).cpu()
