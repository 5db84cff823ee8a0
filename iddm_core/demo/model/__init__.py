"""The demo model: a small SD1-shaped diffusion model *trained here* on public-domain images.

Why: no Stable Diffusion weights can reach our machines, and a random model cannot show what IDDM does (its VAE
does not reconstruct and its one-step predictions are not faces). This model is the smallest one that behaves
like Stable Diffusion on faces at 128 px: an AutoencoderKL that reconstructs photos (f = 4), a cross-attention
UNet2DConditionModel that generates faces from prompts, the tiny CLIP text encoder, a DDPM schedule (rescaled to
zero terminal SNR, v-prediction).
Its weights ship in ``iddm_core/assets/demo_model/`` (fp16, original SD key layout, architecture in metadata) and
load with the ordinary single-file loader: ``load_model("demo")``. ``python -m iddm_core.demo.model train``
rebuilds them from scratch; ``python -m iddm_core.demo.model measure`` prints what the model can do.

The demo identity (the Barack Obama photos) is held out of every stage of training, so the demo really
personalises: the base model has only seen the other identities and non-face images.
"""
from __future__ import annotations

# where the shipped files lie is the diffusion side's to know (the loaders read them); the demo package trains them
from ...diffusion.builtin import (ASSET_DIR, ASSET_DIR_V2, DEMO_TITLE, DEMO_V2_TITLE, TOKENIZER_DIR,  # noqa: F401
                                  WEIGHTS_NAME, weights_path)

DEMO_RESOLUTION = 128


def __getattr__(name: str):
    """``load_demo_bundle`` / ``load_demo_v2_bundle`` live in diffusion.loading (they need torch and diffusers, which
    importing this package does not); they are still found here, as in iddm_core 0.2."""
    if name in ("load_demo_bundle", "load_demo_v2_bundle"):
        from ...diffusion import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
