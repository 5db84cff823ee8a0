"""Architecture of the demo model: SD1's classes and block layout, sized for 128 px on a CPU.

VAE: three levels (downsampling factor 4, so a 128 px image is a 32 x 32 x 16 latent: SD's f = 8 cannot keep a
face recognisable at this size, and SD's 4 latent channels kept only 25-26 dB PSNR of the held-out faces), no
mid-block attention (it costs without helping a convolutional code).
UNet: SD1's four down / up blocks with cross-attention on the first three, on the 32 x 32 latent; one attention
head per layer (8 heads made a training step 3x slower on 2 CPU cores: the 1024-token attention maps dominate).
Text encoder and tokenizer: the tiny CLIP of :mod:`iddm_core.diffusion.tiny` (frozen, random: its prompt embeddings only
need to differ). Scheduler: SD's scaled-linear DDPM rescaled to zero terminal SNR, v-prediction (the last
training phase; the earlier ones predict epsilon on SD's own schedule, see ``train.REFINE``).
"""
from __future__ import annotations

from ...offline import force_offline

force_offline()

import torch  # noqa: E402

from ...diffusion.kinds import ZERO_TERMINAL_SNR  # noqa: E402
from ...diffusion.tiny import SCHEDULER_CONFIG, _text_config, build_tiny_tokenizer  # noqa: E402
from ...diffusion.tiny import UNET_CONFIG as TINY_UNET_CONFIG, VAE_CONFIG as TINY_VAE_CONFIG  # noqa: E402
from . import DEMO_RESOLUTION, DEMO_TITLE  # noqa: E402

# SD1's layout as the tiny model writes it (tiny.py), with what differs at 128 px spelled out
VAE_CONFIG = {
    **TINY_VAE_CONFIG,
    "sample_size": DEMO_RESOLUTION,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 96],
    "norm_num_groups": 16,
    "mid_block_add_attention": False,
    "latent_channels": 16,          # 4 channels kept only 25-26 dB of the held-out faces; 16 reach 30-31 dB
    "scaling_factor": 1.0,          # set from the trained encoder's latent spread (1 / std) after VAE training
}

UNET_CONFIG = {
    **TINY_UNET_CONFIG,
    "sample_size": DEMO_RESOLUTION // 4,
    "in_channels": VAE_CONFIG["latent_channels"],
    "out_channels": VAE_CONFIG["latent_channels"],
    "block_out_channels": [32, 64, 128, 128],
    "attention_head_dim": 1,     # diffusers reads this as the number of heads (SD1's config quirk)
    "norm_num_groups": 16,
}


# The shipped model's schedule. On SD's own schedule t = 999 keeps sqrt(alpha_bar) = 0.068 of the latent, which on
# a 32 x 32 latent carries layout and colour the UNet learns to lean on; sampling from pure noise then gave faces
# under a colour speckle that dlib could not find (FSR 0/8). A zero terminal SNR (with v-prediction, which stays
# defined there) removes that gap between training and sampling (docs/DESIGN.md, "The demo model").
V_ZERO_SNR_SCHEDULER_CONFIG = {**SCHEDULER_CONFIG, **ZERO_TERMINAL_SNR, "prediction_type": "v_prediction"}


def build_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**VAE_CONFIG)


def build_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder(seed: int = 0):
    """(text_encoder, tokenizer): the tiny CLIP, as in :mod:`iddm_core.diffusion.tiny` (same seed -> same weights)."""
    from transformers import CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_config(len(tokenizer), "sd1"))
    return text_encoder.eval(), tokenizer


def build_scheduler(v_zero_snr: bool = True):
    """The shipped schedule (zero terminal SNR, v-prediction), or SD's own (epsilon) for the early phases."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(V_ZERO_SNR_SCHEDULER_CONFIG if v_zero_snr else SCHEDULER_CONFIG)


def assemble(unet, vae, text_encoder, tokenizer):
    """A :class:`~iddm_core.diffusion.bundle.ModelBundle` of trained parts (SD1 kind with v-prediction, title ``demo``)."""
    from ...diffusion.bundle import ModelBundle

    return ModelBundle(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                       noise_scheduler=build_scheduler(), kind="sd1", prediction_type="v_prediction",
                       resolution=DEMO_RESOLUTION, title=DEMO_TITLE)
