"""Images as the UNet sees them: the VAE posterior of an image set, encoded once and sampled every step."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Posterior:
    """VAE posterior (mean, std) of a fixed image set, unscaled, float32: computed once, sampled every step."""

    mean: torch.Tensor
    std: torch.Tensor

    def __len__(self) -> int:
        return int(self.mean.shape[0])


def vae_posterior(bundle, images: torch.Tensor):
    """(mean, std) of the VAE posterior of ``images`` in [0, 1], float32, differentiable."""
    vae = bundle.vae
    dist = vae.encode((images * 2 - 1).to(bundle.device, next(vae.parameters()).dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


@torch.no_grad()
def encode_posterior(bundle, images: torch.Tensor, chunk: int = 4) -> Posterior:
    """Posterior of ``images`` in [0, 1], a few images at a time (the encoder's activations are large)."""
    parts = [vae_posterior(bundle, c) for c in images.split(chunk)]
    return Posterior(torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts]))
