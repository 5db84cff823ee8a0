"""Protect's attack: sign-PGD *ascent* on a surrogate's denoising loss, with CAP's ratio search on top.

    L_rec(x') = E_{t, eps} || eps - eps_theta(z_t(x'), t, c) ||^2
    x' <- clip01(x + clip(x' + alpha * sign(grad) - x, -eta, eta))

The heavy path (VAE encoder + UNet forward and backward) runs ``batch`` photos at a time; each photo owns its noise
stream (pgd.image_generators), so the result does not depend on ``batch``. A micro-batch whose gradient is not
finite under low precision is redone in fp32, then left out of the step. With CAP (``style_net`` given, from
``ProtectConfig.cap_first_step`` on) each step tries the ratios of ``config.ratio_grid()``: candidate
x'_r = step(grad L_rec - r grad L_style) (style.py), and keeps the one whose L_rec is largest (protect.py's
docstring says why the style term is subtracted and how ``ratio_probe`` draws the noise it scores on).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion.precision import FP32_CPU, LossScale, Precision, all_finite
from ..diffusion.runtime import Runtime
from .pgd import Noise, attacking, image_generators, rec_loss
from .style import relative_scale, style_gradient


@dataclass(frozen=True)
class AscentTarget:
    """What the ascent attacks: ``bundle`` (with the surrogate's LoRA active), conditioned on ``embeds`` (the
    instance prompt's), run as ``runtime`` says; ``style_net``: CAP's feature network (None: no CAP)."""

    bundle: object
    embeds: object
    runtime: Runtime
    style_net: object = None


def ascent_step(x_clean: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, alpha: float, eta: float) -> torch.Tensor:
    """One sign-PGD *ascent* step, projected to |x - x_clean|_inf <= eta and clipped to [0, 1]."""
    delta = (x + alpha * torch.sign(grad) - x_clean).clamp(-eta, eta)
    return (x_clean + delta).clamp(0.0, 1.0)


def _expand(embeds, n):
    return embeds.expand(n, *embeds.shape[1:]) if embeds.shape[0] == 1 else embeds


def _latent_shape(bundle, size: int) -> tuple:
    f = int(bundle.vae_scale_factor)
    return (int(bundle.vae.config.latent_channels), size // f, size // f)


def rec_values(bundle, x, embeds, noise_list, batch: int, precision) -> float:
    """Mean L_rec of images ``x`` over the draws in ``noise_list`` (one pgd.Noise per micro-batch), no gradient."""
    total, n = 0.0, x.shape[0]
    with torch.no_grad():
        for (lo, noise) in noise_list:
            xb = x[lo:lo + batch]
            with precision.autocast():
                _, value = rec_loss(bundle, xb, _expand(embeds, xb.shape[0]), noise, precision)
            total += float(value) * xb.shape[0]
    return total / n


def draw_noise(bundle, gens, batch: int, size: int) -> list:
    """One pgd.Noise per micro-batch, from each photo's own generator (t uniform over all training timesteps)."""
    n_train = int(bundle.noise_scheduler.config.num_train_timesteps)
    return [(lo, Noise.draw(gens[lo:lo + batch], _latent_shape(bundle, size), n_train, 1.0, bundle.device))
            for lo in range(0, len(gens), batch)]


def denoising_loss(bundle, images: torch.Tensor, embeds, seed: int = 1234, draws: int = 4, batch: int = 1,
                   precision=None) -> float:
    """L_rec of ``images`` averaged over ``draws`` fixed noise/timestep draws per photo (seeded by ``seed``): the
    same draws for any two image sets of the same size, so clean vs protected compare the images, not the noise."""
    precision = precision or FP32_CPU
    x = images.to(bundle.device).float()
    gens = image_generators(torch.Generator().manual_seed(seed), x.shape[0])
    values = [rec_values(bundle, x, embeds, draw_noise(bundle, gens, batch, x.shape[-1]), batch, precision)
              for _ in range(draws)]
    return sum(values) / len(values)


def _rec_gradient(bundle, x, embeds, noise_list, batch, precision, scale):
    """d L_rec / d x for every micro-batch (unscaled); non-finite micro-batches are redone in fp32, then zeroed.
    Returns (grad, mean L_rec, counts)."""
    grad = torch.zeros_like(x)
    total, counts = 0.0, {"redone_fp32": 0, "skipped": 0}
    for lo, noise in noise_list:
        xb0 = x[lo:lo + batch]
        emb = _expand(embeds, xb0.shape[0])

        def attempt(prec, sc):
            xb = xb0.detach().requires_grad_(True)
            with prec.autocast():
                loss, value = rec_loss(bundle, xb, emb, noise, prec)
            g, = torch.autograd.grad(loss.float() * sc.value, xb)
            return (g / sc.value if all_finite(g, value) else None), value

        g, value = attempt(precision, scale)
        scale.update(g is not None)
        if g is None and precision.dtype is not None:
            counts["redone_fp32"] += 1
            g, value = attempt(Precision(precision.device_type), LossScale(False))
        if g is None:
            counts["skipped"] += 1
        else:
            grad[lo:lo + batch] = g
        total += float(value) * xb0.shape[0]
    return grad, total / x.shape[0], counts


def pgd_ascent(target: AscentTarget, x_clean, x, config, generator, steps: range, on_step=None) -> torch.Tensor:
    """Sign-PGD ascent steps on L_rec, numbered ``steps`` (global PGD step numbers, 1-based), from ``x`` within
    ``config.eta`` of ``x_clean`` (``config``: a protect.ProtectConfig); CAP's ratio search from step
    ``config.cap_first_step`` on when ``target.style_net`` is given. ``on_step(record)`` after every step.
    Returns the new X'."""
    bundle, embeds, runtime = target.bundle, target.embeds, target.runtime
    n, size, batch = x.shape[0], x.shape[-1], config.batch
    gens = image_generators(generator, n)
    scale = LossScale(runtime.precision.scales_loss)
    x = x.detach().clone()
    with attacking(bundle, runtime.checkpointing):
        for s in steps:
            grad, value, counts = _rec_gradient(bundle, x, embeds, draw_noise(bundle, gens, batch, size), batch,
                                                runtime.precision, scale)
            record = {"t": s, "loss": value, **counts}
            if target.style_net is not None and s >= config.cap_first_step:
                x = _cap_step(target, x_clean, x, grad, config, gens, record)
            else:
                x = ascent_step(x_clean, x, grad, config.alpha, config.eta)
            record["linf"] = float((x - x_clean).abs().max())
            if on_step is not None:
                on_step(record)
    return x.detach()


def _cap_step(target: AscentTarget, x_clean, x, grad, config, gens, record: dict) -> torch.Tensor:
    """CAP's step: the candidate of the ratio grid with the largest L_rec (a static ratio: its one candidate);
    ``record`` gets the ratio kept, the set's style spread and the kept candidate's L_rec."""
    bundle, embeds, precision = target.bundle, target.embeds, target.runtime.precision
    size, batch = x.shape[-1], config.batch
    g_style, spread = style_gradient(target.style_net, x, batch)
    g_style = g_style * relative_scale(grad, g_style)
    grid = config.ratio_grid()
    shared = draw_noise(bundle, gens, batch, size) if config.ratio_probe == "shared" else None
    best = None
    for r in grid:
        cand = ascent_step(x_clean, x, grad - r * g_style, config.alpha, config.eta)
        if len(grid) == 1:                                 # a static ratio: nothing to compare
            best = (float("nan"), r, cand)
            break
        probe = shared if shared is not None else draw_noise(bundle, gens, batch, size)
        value_r = rec_values(bundle, cand, embeds, probe, batch, precision)
        if best is None or value_r > best[0]:
            best = (value_r, r, cand)
    record.update(ratio=best[1], style=spread, loss_after=None if len(grid) == 1 else best[0])
    return best[2]
