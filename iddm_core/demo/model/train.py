"""Training of the demo model, in three stages, each a plain loop.

1. VAE: reconstruction (L1) + a tiny KL term on random patches (the VAE is convolutional, so small patches
   teach it the same code as whole images at a fraction of the cost), posterior sampled as in SD, in phases
   (``VAE_PHASES``; in the last, half the patches have permuted colour channels). Afterwards the latent scale is
   set SD-style: ``scaling_factor = 1 / std`` of the face latents.
2. UNet: epsilon prediction on the frozen VAE's latents of augmented face crops (prompts from the frozen tiny
   text encoder, 10 % empty for classifier-free guidance) and as many crops of the non-face images (empty
   prompt: they teach denoising in general, so the UNet does not merely memorise the training faces), min-SNR
   loss weighting, EMA of the weights.
3. Refine: further UNet phases from the previous weights with plain epsilon MSE, and last a switch to the
   shipped schedule: zero terminal SNR with v-prediction (``REFINE``).

Each stage writes its part to a work folder; :func:`export` writes the fp16 single file that ships.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...atomic import write_text_atomic
from . import TOKENIZER_DIR, weights_path

# "a photo of person" is the pipeline's DreamBooth class prompt: class images for prior preservation are faces.
MAN_PROMPTS = ("a photo of a man", "a photo of person", "a photo of a person", "a portrait of a man",
               "a close up photo of a person", "a high quality photo of a man", "a picture of a person")
WOMAN_PROMPTS = ("a photo of a woman", "a photo of person", "a photo of a person", "a portrait of a woman",
                 "a close up photo of a person", "a high quality photo of a woman", "a picture of a person")
# demo model v2's corpus (the congress portraits) has no gender labels: its crops get person prompts only
PERSON_PROMPTS = ("a photo of person", "a photo of a person", "a portrait of a person", "a close up photo of a person",
                  "a high quality photo of a person", "a picture of a person", "a photo of a face")
PROMPTS = {"man": MAN_PROMPTS, "woman": WOMAN_PROMPTS, "person": PERSON_PROMPTS}


def log(message: str) -> None:
    print(message, flush=True)


def warmup_cosine(opt, warmup: int, steps: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))


class PhaseClock:
    """When a training phase ends: after ``steps`` steps or, with ``seconds``, once that much wall time is spent,
    whichever comes first. ``progress`` (0..1, the larger of the step and the time fraction) drives the cosine
    decay, so a phase stopped by the clock still ends at learning rate 0; without ``seconds`` the schedule is
    exactly :func:`warmup_cosine`."""

    def __init__(self, steps: int, seconds: float | None = None):
        self.steps, self.seconds, self.start = steps, seconds, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def progress(self, step: int) -> float:
        p = step / self.steps
        if self.seconds is not None:
            p = max(p, self.elapsed() / self.seconds)
        return min(1.0, p)

    def done(self, step: int) -> bool:
        return step >= self.steps or (self.seconds is not None and self.elapsed() >= self.seconds)

    def schedule(self, opt, warmup: int):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * self.progress(s))))


class Budget:
    """A wall-clock budget shared by phases in proportion to ``weights``: each phase, when it starts, gets the
    time left times its weight over the weights still to come (so overheads and early finishes are absorbed).
    ``seconds`` None: no limit (``next`` gives None)."""

    def __init__(self, seconds: float | None, weights):
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.weights = list(weights)

    def left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def next(self) -> float | None:
        w = self.weights.pop(0)
        if self.deadline is None:
            return None
        return max(1.0, self.left() * w / (w + sum(self.weights)))


def autocast(device, amp: bool):
    """bf16 autocast on CUDA when ``amp`` (weights, optimiser and losses stay fp32), else nothing."""
    if amp and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def throughput(what: str, steps: int, batch: int, seconds: float) -> str:
    return (f"{what}: {steps} steps in {seconds:.1f}s ({steps / max(seconds, 1e-9):.2f} steps/s, "
            f"{steps * batch / max(seconds, 1e-9):.0f} images/s, batch {batch})")


# ------------------------------------------------------------------------------------------------ VAE
@dataclass
class VAETrainConfig:
    steps: int = 2500
    batch: int = 16
    patch: int = 48
    lr: float = 1e-3
    warmup: int = 100
    kl_weight: float = 1e-6
    channel_swap: float = 0.0   # share of patches with permuted RGB channels (data.PatchSampler)
    seed: int = 0


# The VAE's phases, each from the previous one's weights. Measured on the held-out demo crops (PSNR / dlib
# distance of the round trip): after phase 1 26.9 / 28.7 dB, 0.25 / 0.30; after phase 2 26.4 / 29.3 dB,
# 0.21 / 0.31; phase 3's permuted colour channels remove the colour cast that the mostly grey and brownish
# sources teach: 30.3 / 31.2 dB, 0.24 / 0.34 (docs/DESIGN.md, "The demo model").
VAE_PHASES = ({"steps": 2500, "lr": 1e-3, "warmup": 100, "seed": 0},
              {"steps": 2000, "lr": 5e-4, "warmup": 20, "seed": 1},
              {"steps": 1500, "lr": 5e-4, "warmup": 20, "seed": 2, "channel_swap": 0.5})


def vae_loss(vae, x: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None):
    """(loss, L1) of one batch in [-1, 1]: L1 of the sampled-posterior reconstruction + kl_weight * KL (both in
    fp32 under autocast)."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator)
    recon = vae.decode(z).sample
    l1 = (recon.float() - x).abs().mean()
    kl = posterior.kl().float().mean() / x[0].numel()
    return l1 + kl_weight * kl, l1


def train_vae(cfg: VAETrainConfig, sampler=None, device="cpu", vae=None, seconds: float | None = None,
              amp: bool = False, log_every: int = 100):
    """Train ``vae`` (default: a new one from the architecture) on random patches, for ``cfg.steps`` steps or
    until ``seconds`` are spent (:class:`PhaseClock`); ``amp``: bf16 autocast on CUDA."""
    from .architecture import build_vae
    from .data import PatchSampler

    torch.manual_seed(cfg.seed)
    sampler = sampler or PatchSampler(cfg.patch, seed=cfg.seed, channel_swap=cfg.channel_swap)
    vae = (vae if vae is not None else build_vae(cfg.seed)).to(device).train()
    vae.requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    clock = PhaseClock(cfg.steps, seconds)
    sched = clock.schedule(opt, cfg.warmup)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    start, running, step = time.time(), None, 0
    while not clock.done(step):
        step += 1
        with autocast(device, amp):
            loss, l1 = vae_loss(vae, sampler(cfg.batch).to(device), cfg.kl_weight, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        running = l1.item() if running is None else 0.98 * running + 0.02 * l1.item()
        if step % log_every == 0 or step == cfg.steps:
            log(f"vae step {step}/{cfg.steps}  L1 {running:.4f}  ({time.time() - start:.0f}s)")
    log(throughput(f"vae phase done, L1 {running:.4f}" + (" (time share spent)" if step < cfg.steps else ""),
                   step, cfg.batch, time.time() - start))
    return vae.eval()


@torch.no_grad()
def latent_scale(vae, images: torch.Tensor) -> float:
    """SD's rule: 1 / std of the (unscaled) posterior means of ``images`` in [0, 1]."""
    device = next(vae.parameters()).device
    means = torch.cat([vae.encode(images[i:i + 16].to(device) * 2 - 1).latent_dist.mean
                       for i in range(0, len(images), 16)])
    return float(1.0 / means.std())


# ----------------------------------------------------------------------------------------------- UNet
@dataclass
class UNetTrainConfig:
    steps: int = 3500
    batch: int = 8
    lr: float = 5e-4
    warmup: int = 100
    pool: int = 512             # augmented face crops encoded once
    scenes: int = 512           # non-face crops (data.scene_pool) encoded once, trained with the empty prompt
    uncond: float = 0.1         # share of empty prompts (classifier-free guidance)
    snr_gamma: float | None = 5.0   # min-SNR weighting (None: plain MSE)
    v_zero_snr: bool = False    # the shipped schedule (zero terminal SNR, v-prediction); else SD's, epsilon
    ema: float = 0.999
    seed: int = 0


# Further UNet phases, each from the previous one's weights: plain epsilon MSE (which weights the low-noise end SNR
# times more than min-SNR does) at lower rates. Measured on the shipped model's recipe (face + scene crops): the
# denoising error on the held-out photos at t = 10 / 50 / 100 fell from 0.625 / 0.332 / 0.252 after phase 1 to
# 0.441 / 0.277 / 0.223 after the two epsilon refine phases (``measure``), yet samples from pure noise carried a
# colour speckle (FSR 0/8). The third phase moves the UNet to zero terminal SNR + v-prediction (plain v MSE; the
# min-SNR weight would be 0 at the terminal step): after it samples are clean faces (docs/DESIGN.md).
REFINE = ({"steps": 1200, "lr": 2e-4, "warmup": 20, "snr_gamma": None, "seed": 1},
          {"steps": 2400, "lr": 1e-4, "warmup": 20, "snr_gamma": None, "seed": 2},
          {"steps": 2000, "lr": 2e-4, "warmup": 50, "snr_gamma": None, "seed": 0, "v_zero_snr": True})


# Demo model v2's recipe for a GPU (``train --recipe gpu``): the CPU recipe's phases with larger batches (VAE
# patches 64 px), a bigger latent pool (the corpus has ~1,100 people) and step counts that are only caps: a phase
# ends when its share of ``--budget-min`` is spent (``Budget``, ``PhaseClock``), its learning rate decayed to 0.
# Shares: the stages by STAGE_WEIGHTS, the phases within a stage by their ``weight``.
GPU_RECIPE = {
    "vae_phases": ({"steps": 60000, "batch": 64, "patch": 64, "lr": 1e-3, "warmup": 200, "seed": 0, "weight": 0.4},
                   {"steps": 60000, "batch": 64, "patch": 64, "lr": 5e-4, "warmup": 50, "seed": 1, "weight": 0.3},
                   {"steps": 60000, "batch": 64, "patch": 64, "lr": 5e-4, "warmup": 50, "seed": 2,
                    "channel_swap": 0.5, "weight": 0.3}),
    "vae_faces": 2048,         # augmented corpus crops the VAE's patches come from
    "vae_face_share": 0.7,     # share of VAE patches cut from faces (the rest: the non-face sources)
    "unet": {"steps": 100000, "batch": 128, "lr": 5e-4, "warmup": 200, "pool": 8192, "scenes": 2048},
    "refine": ({"steps": 100000, "batch": 128, "lr": 2e-4, "warmup": 50, "snr_gamma": None, "seed": 1,
                "weight": 0.25},
               {"steps": 100000, "batch": 128, "lr": 1e-4, "warmup": 50, "snr_gamma": None, "seed": 2,
                "weight": 0.4},
               {"steps": 100000, "batch": 128, "lr": 2e-4, "warmup": 100, "snr_gamma": None, "seed": 0,
                "v_zero_snr": True, "weight": 0.35}),
    "stage_weights": {"vae": 0.3, "unet": 0.35, "refine": 0.35},
    "log_every": 500,
}
CPU_STAGE_WEIGHTS = {"vae": 48.5, "unet": 27.4, "refine": 40.0}    # minutes the CPU recipe took (docs/DESIGN.md)


def snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float, v_prediction: bool = False) -> torch.Tensor:
    """The min-SNR weight per sample: min(SNR, gamma) / SNR of the epsilon loss, / (SNR + 1) of the v loss."""
    a = alphas_cumprod[t]
    snr = a / (1 - a)
    return torch.clamp(snr, max=gamma) / (snr + 1 if v_prediction else snr)


@torch.no_grad()
def encode_pool(vae, images: np.ndarray, scale: float, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the scaled posterior of uint8 images [N, H, W, 3]."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(images[i:i + chunk]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device)
        dist = vae.encode(x).latent_dist
        means.append(dist.mean * scale)
        stds.append(dist.std * scale)
    return torch.cat(means), torch.cat(stds)


def latent_pool(cfg: UNetTrainConfig, vae, corpus=None, chunk: int = 16):
    """(mean, std, words): the scaled VAE posteriors of ``cfg.pool`` augmented face crops (the public-domain
    faces, or with ``corpus`` (:class:`~.data.Corpus`) its crops) and ``cfg.scenes`` non-face crops."""
    from .data import face_pool, scene_pool

    start = time.time()
    scale = float(vae.config.scaling_factor)
    if corpus is None:
        images, words = face_pool(cfg.pool, 128, seed=cfg.seed + 2)
    else:
        images, words = corpus.face_pool(cfg.pool, 128, seed=cfg.seed + 2)
    if cfg.scenes:
        images = np.concatenate([images, scene_pool(cfg.scenes, 128, seed=cfg.seed + 3)])
        words = list(words) + ["scene"] * cfg.scenes
    mean, std = encode_pool(vae, images, scale, chunk)
    log(f"unet: {cfg.pool} augmented face crops and {cfg.scenes} other crops encoded; "
        f"latent std {float(mean.std()):.3f}" + (f" ({time.time() - start:.1f}s)" if corpus is not None else ""))
    return mean, std, list(words)


# 10 parameters: the phase's settings, the three frozen parts, the UNet and latent pool it starts from (each
# built here when None) and the run's clock, precision and log interval, which the stages pass per phase.
def train_unet(cfg: UNetTrainConfig, vae, text_encoder, tokenizer, unet=None, pool=None, corpus=None,
               seconds: float | None = None, amp: bool = False, log_every: int = 100):
    """Train ``unet`` (default: a new one from the architecture) on the VAE latents of augmented face crops
    (``pool`` from :func:`latent_pool`, built here when None), for ``cfg.steps`` steps or until ``seconds`` are
    spent; ``amp``: bf16 autocast on CUDA."""
    from diffusers.training_utils import EMAModel

    from ...training.conditioning import encode_prompts
    from .architecture import build_scheduler, build_unet, assemble

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = next(vae.parameters()).device
    mean, std, words = pool if pool is not None else latent_pool(cfg, vae, corpus,
                                                                 256 if device.type == "cuda" else 16)
    bundle = assemble(unet if unet is not None else build_unet(cfg.seed), vae, text_encoder, tokenizer)
    bundle.to(device)                                        # everything where the VAE is (--device)
    prompts = sorted(set(MAN_PROMPTS + WOMAN_PROMPTS + ("",) + (PERSON_PROMPTS if "person" in words else ())))
    with torch.no_grad():
        table = dict(zip(prompts, encode_prompts(bundle, prompts)))
    unet = bundle.unet.train()
    ema = EMAModel(unet.parameters(), decay=cfg.ema, use_ema_warmup=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=1e-2)
    clock = PhaseClock(cfg.steps, seconds)
    sched = clock.schedule(opt, cfg.warmup)
    noise_sched = build_scheduler(cfg.v_zero_snr)
    ac = noise_sched.alphas_cumprod.to(device)
    start, running, step = time.time(), None, 0
    while not clock.done(step):
        step += 1
        idx = torch.from_numpy(rng.integers(len(mean), size=cfg.batch)).to(device)
        z0 = mean[idx] + std[idx] * torch.randn_like(mean[idx])
        chosen = []
        for i in idx.tolist():
            if words[i] == "scene" or rng.random() < cfg.uncond:
                chosen.append("")
            else:
                pool_i = PROMPTS[words[i]]
                chosen.append(pool_i[rng.integers(len(pool_i))])
        ctx = torch.stack([table[p] for p in chosen])
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch,)).to(device)
        eps = torch.randn_like(z0)
        zt = noise_sched.add_noise(z0, eps, t)
        target = noise_sched.get_velocity(z0, eps, t) if cfg.v_zero_snr else eps
        with autocast(device, amp):
            pred = unet(zt, t, encoder_hidden_states=ctx).sample
        per = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per * snr_weights(ac, t, cfg.snr_gamma, cfg.v_zero_snr)).mean() if cfg.snr_gamma else per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        running = per.mean().item() if running is None else 0.98 * running + 0.02 * per.mean().item()
        if step % log_every == 0 or step == cfg.steps:
            log(f"unet step {step}/{cfg.steps}  {'v' if cfg.v_zero_snr else 'eps'}-MSE {running:.4f}  "
                f"({time.time() - start:.0f}s)")
    log(throughput(f"unet phase done, {'v' if cfg.v_zero_snr else 'eps'}-MSE {running:.4f}"
                   + (" (time share spent)" if step < cfg.steps else ""), step, cfg.batch, time.time() - start))
    ema.copy_to(unet.parameters())
    return unet.eval()


# --------------------------------------------------------------------------------------------- export
def export(bundle, folder: Path, overwrite: bool = True, data: dict | None = None) -> Path:
    """Write the shipped form: fp16 single file (original SD keys, architecture in metadata) + tokenizer files.
    ``data``: the face corpus it was trained on (demo model v2; the ``data.json`` that ``train --data`` writes
    into the work folder), named in the README."""
    import copy

    from ...diffusion.writing import save_single_file
    from ...diffusion.tiny import write_tiny_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(bundle).to(dtype=torch.float16)
    path = save_single_file(half, weights_path(folder), overwrite=overwrite)
    write_tiny_tokenizer(folder / TOKENIZER_DIR)
    write_text_atomic(folder / "README.md", readme_text(data), overwrite=True)
    return path


def readme_text(data: dict | None = None) -> str:
    """The README beside the weights: what they are, how they were made, every data source and its licence."""
    from .data import HELD_OUT, SOURCES

    rows = "\n".join(f"| {name} | {what} | {source} | {licence} |" for name, what, source, licence in SOURCES)
    load = ('`load_model("demo-v2")` (shipped in `iddm_core/assets/demo_model_v2/`)' if data
            else '`load_model("demo")` or `--model demo`')
    return f"""# IDDM demo model (generated by `python -m iddm_core.demo.model train`; do not edit by hand)

A small Stable-Diffusion-1-shaped model (diffusers AutoencoderKL with downsampling factor 4 and 16 latent
channels, UNet2DConditionModel
with cross-attention, the tiny CLIP text encoder and tokenizer, DDPM schedule rescaled to zero terminal SNR,
v-prediction) at 128 px, trained {"on a GPU from" if data else "on a CPU from"}
the public-domain / CC0 images below {"and the face corpus after them" if data else "only"}. `demo.safetensors`: fp16, original SD key layout, architecture in its
`iddm.configs` metadata; `tokenizer/`: the tiny CLIP tokenizer. Load it with {load}.

The demo identity ({", ".join(HELD_OUT)}) is held out of all training.

| image | shows | source | licence |
|---|---|---|---|
{rows}

Training: `python -m iddm_core.demo.model train` (VAE on random patches, then UNet on augmented face crops and
crops of the other images; see
`iddm_core/demo_model/train.py`). What it can do: `python -m iddm_core.demo.model measure`.
""" + (corpus_readme(data) if data else "")


def corpus_readme(data: dict) -> str:
    """The README section of demo model v2's face corpus."""
    return f"""
## Face corpus (demo model v2)

Also trained on {data['crops']} face crops of {data['identities']} people: the official portraits of members of
the US Congress (works of the US federal government, public domain; 2015/2016/2014 portraits from the Government
Printing Office's Congressional Pictorial Directory via the `unitedstates/images` project, 2024 member photos
published by congress.gov), cropped by `python -m iddm_core.demo.model prepare`. The {data['test_identities']}
test identities of `iddm_core/demo_model/test_identities.txt` are held out of all training. These are real
people: the model is for tests and demonstrations, not for making images of them. Recipe: `{data.get('recipe', '')}`.
"""
