"""Protect photos before posting them: anti-personalisation (Anti-DreamBooth's ASPL / FSMG, optionally with CAP).

IDDM protects what a *personal model* outputs; this module protects the photos themselves, so that whoever
DreamBooths them learns a damaged concept. It *maximises* a surrogate model's denoising loss

    L_rec(x') = E_{t, eps} || eps - eps_theta(z_t(x'), t, c) ||^2        (c: "a photo of sks person")

by sign-PGD ascent, x' <- clip01(x + clip(x' + alpha * sign(grad) - x, -eta, eta)), with the surrogate a
DreamBooth-LoRA on the model being attacked (``DreamBoothTrainer``: one LoRA, one AdamW).

ASPL, the variant implemented (Anti-DreamBooth's alternating surrogate and perturbation learning), per round:
    1. theta' <- theta, then ``surrogate_steps`` DreamBooth steps of theta' on the CLEAN photos;
    2. ``pgd_steps`` sign-PGD ascent steps of X' against theta' (X' carries over between rounds, always inside the
       eta ball of the clean photos);
    3. theta (restored: LoRA weights and AdamW moments of before step 1) gets ``surrogate_steps`` steps on X'.
   The trainer's random stream is not rewound in 3, so theta does not reuse theta''s noise draws. Anti-DreamBooth
   fine-tunes the whole UNet (and text encoder) at lr 5e-7 with a fresh optimiser per burst; here the surrogate is
   a LoRA (rank 4, lr 1e-4 by default) whose AdamW state persists within theta's line.
FSMG (fixed surrogate): theta' = ``fsmg_steps`` DreamBooth steps on the clean photos, once; then only PGD
   (``rounds`` x ``pgd_steps`` steps, in rounds so that progress and resume work the same way).
Defaults follow Anti-DreamBooth's ASPL script as the CAP paper restates it: eta 0.05, alpha 0.005 (pixels in [0, 1],
the issue's and CAP's unit), 50 rounds of 3 surrogate steps + 6 PGD steps (300 PGD steps), at the model's resolution.

CAP (cross-image consistency, ``cap=True``): from the ``cap_start`` share of all PGD steps on (the paper: half),
each step also uses the style-consistency loss of the set

    L_style = 1/N sum_i sum_l || G^l(x'_i) - mean_j G^l(x'_j) ||_F^2,   G^l = F F^T / (C H W)   (F: [C, H W])

of a feature network's first layers, and a dynamic ratio: for each r of ``ratio_grid`` (``ratio_steps`` values in
[0, ``ratio_max``]) the candidate x'_r = step(grad L_rec - r grad L_style) is made, its L_rec is evaluated and the
candidate with the largest L_rec is kept; ``ratio_probe`` "fresh" (default) scores each candidate on its own new
draw, as the paper's Algorithm 1 evaluates L_cond anew per candidate, "shared" scores all on one draw (then r = 0
wins nearly always: docs/protect.md has the measurements). The
sign: the paper's text says the style loss is *minimised* ("encourages all perturbed images to exhibit a unified
style"), while its Algorithm 1 writes L_re + r L_consistency inside an ascent step; we follow the text (ascend
L_rec - r L_style), which is also what makes the set's Gram spread shrink. r = 0 (the plain step) is always a
candidate. Feature network: VGG-19's first five conv layers (ReLU outputs of conv1_1, conv1_2, conv2_1, conv2_2,
conv3_1, ImageNet normalisation) from a user-supplied state dict read without torchvision, else the attacked
model's VAE encoder (conv_in and the resnets of its first down block); the report says which.

Memory: the heavy path (VAE encoder + UNet forward and backward) runs ``batch`` photos at a time (default 1); each
photo owns its noise stream (pgd.image_generators), so the result does not depend on ``batch``. The Gram gradient of
photo i needs only G_i and the set's mean Gram, so it is micro-batched too (the mean is computed first, without
gradient). Resume: the state of the last finished round, in checkpoint.py's private folder and fingerprint format.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import InputError
from ..events import Emitter, report_setup

METHODS = ("aspl", "fsmg")
PROBES = ("fresh", "shared")     # how CAP's ratio search draws the noise it scores each candidate's L_rec on
FEATURES_VGG, FEATURES_VAE = "vgg19", "vae-encoder"
# torchvision's vgg19().features indices: conv layers at 0, 2, 5, 7, 10 (the first five); ReLU right after each.
VGG19_LAYOUT = (("conv", 3, 64), ("relu",), ("conv", 64, 64), ("relu",), ("pool",),
                ("conv", 64, 128), ("relu",), ("conv", 128, 128), ("relu",), ("pool",),
                ("conv", 128, 256), ("relu",))
VGG19_STYLE_OUTPUTS = (1, 3, 6, 8, 11)          # ReLU outputs of conv1_1, conv1_2, conv2_1, conv2_2, conv3_1
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ProtectConfig:
    method: str = "aspl"            # aspl | fsmg
    eta: float = 0.05               # L_inf budget, pixels in [0, 1]
    alpha: float = 0.005            # PGD step
    rounds: int = 50                # ASPL rounds (Anti-DreamBooth's max_train_steps)
    surrogate_steps: int = 3        # DreamBooth steps of each of theta', theta per round (max_f_train_steps)
    pgd_steps: int = 6              # PGD steps per round (max_adv_train_steps)
    fsmg_steps: int | None = None   # FSMG: steps of the fixed surrogate on clean photos (default rounds * surrogate_steps)
    cap: bool = False
    ratio_max: float = 1.0          # R of CAP's ratio search, relative: r = 1 weighs both gradients equally
    ratio_steps: int = 5            # candidates 0, R/(n-1), ..., R; 1 = a static ratio R (no search)
    ratio_probe: str = "fresh"      # fresh: a new draw per candidate (the paper's Alg. 1); shared: one draw for all
    cap_start: float = 0.5          # CAP from this share of the PGD steps on (paper: half)
    rank: int = 4
    lr: float = 1e-4
    resolution: int | None = None   # default: the model's
    seed: int = 0
    prior_preservation: bool = True
    num_class_images: int = 8
    batch: int = 1                  # photos per PGD forward/backward pass
    mixed_precision: str = "auto"
    gradient_checkpointing: str = "auto"
    instance_prompt: str = "a photo of sks person"

    def validate(self) -> "ProtectConfig":
        if self.method not in METHODS:
            raise InputError(f"method={self.method!r}: use one of {', '.join(METHODS)}")
        if not isinstance(self.eta, (int, float)) or not 0.0 < self.eta <= 1.0:
            raise InputError(f"eta={self.eta!r}: the L_inf budget must be in (0, 1] (pixels in [0, 1]; default 0.05)")
        if not isinstance(self.alpha, (int, float)) or not 0.0 < self.alpha <= self.eta:
            raise InputError(f"alpha={self.alpha!r}: the PGD step must be in (0, eta={self.eta}] (default 0.005)")
        for name in ("rounds", "pgd_steps", "rank", "batch", "ratio_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name}={value!r} must be an integer >= 1")
        if not isinstance(self.surrogate_steps, int) or self.surrogate_steps < 0:
            raise InputError(f"surrogate_steps={self.surrogate_steps!r} must be an integer >= 0")
        if self.fsmg_steps is not None and (not isinstance(self.fsmg_steps, int) or self.fsmg_steps < 0):
            raise InputError(f"fsmg_steps={self.fsmg_steps!r} must be an integer >= 0")
        if self.ratio_probe not in PROBES:
            raise InputError(f"ratio_probe={self.ratio_probe!r}: use one of {', '.join(PROBES)}")
        if not self.ratio_max >= 0:
            raise InputError(f"ratio_max={self.ratio_max!r} must be >= 0")
        if not 0.0 <= self.cap_start < 1.0:
            raise InputError(f"cap_start={self.cap_start!r} must be in [0, 1) (share of the PGD steps; paper 0.5)")
        if not self.lr > 0:
            raise InputError(f"lr={self.lr!r} must be > 0")
        if self.resolution is not None and (self.resolution < 32 or self.resolution % 8):
            raise InputError(f"resolution={self.resolution!r} must be a multiple of 8 and at least 32")
        if self.prior_preservation and (not isinstance(self.num_class_images, int) or self.num_class_images < 1):
            raise InputError(f"num_class_images={self.num_class_images!r} must be >= 1 with prior preservation")
        from ..diffusion.grad_checkpoint import check_setting
        from ..diffusion.precision import MODES

        if self.mixed_precision not in MODES:
            raise InputError(f"mixed_precision={self.mixed_precision!r}: use one of {', '.join(MODES)}")
        check_setting(self.gradient_checkpointing)
        return self

    @property
    def total_pgd_steps(self) -> int:
        return self.rounds * self.pgd_steps

    @property
    def fixed_surrogate_steps(self) -> int:
        return self.rounds * self.surrogate_steps if self.fsmg_steps is None else self.fsmg_steps

    @property
    def cap_first_step(self) -> int:
        """1-based global PGD step from which CAP's style term is used (k-hat of the paper)."""
        return math.floor(self.cap_start * self.total_pgd_steps + 1e-9) + 1

    def ratio_grid(self) -> list[float]:
        """The ratios tried per CAP step: 0, R/(n-1), ..., R; ``ratio_steps`` 1 = the static ratio R."""
        if self.ratio_steps == 1:
            return [float(self.ratio_max)]
        return [self.ratio_max * i / (self.ratio_steps - 1) for i in range(self.ratio_steps)]

    def total_events(self) -> int:
        if self.method == "fsmg":
            return self.fixed_surrogate_steps + self.total_pgd_steps
        return self.rounds * (2 * self.surrogate_steps + self.pgd_steps)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProtectResult:
    protected: torch.Tensor     # [N, 3, H, W] in [0, 1], already on the 8-bit grid inside the eta ball
    report: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- small pure math

def gram(features: torch.Tensor) -> torch.Tensor:
    """Gram matrices ``[B, C, C]`` of feature maps ``[B, C, H, W]``, normalised by C*H*W (float32)."""
    b, c, h, w = features.shape
    f = features.float().reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def style_spread(grams: list[torch.Tensor]) -> torch.Tensor:
    """L_style of a set: per layer ``[N, C, C]``, mean over images of ||G_i - mean G||_F^2, summed over layers."""
    return sum(((g - g.mean(0, keepdim=True)) ** 2).sum(dim=(1, 2)).mean() for g in grams)


def ascent_step(x_clean: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, alpha: float, eta: float) -> torch.Tensor:
    """One sign-PGD *ascent* step, projected to |x - x_clean|_inf <= eta and clipped to [0, 1]."""
    delta = (x + alpha * torch.sign(grad) - x_clean).clamp(-eta, eta)
    return (x_clean + delta).clamp(0.0, 1.0)


def relative_scale(grad_rec: torch.Tensor, grad_style: torch.Tensor) -> float:
    """Factor that gives the style gradient the reconstruction gradient's mean absolute value (over the set), so
    that ratio r = 1 weighs both equally whatever the feature network, resolution and Gram normalisation."""
    den = float(grad_style.abs().mean())
    return float(grad_rec.abs().mean()) / den if den > 0 else 0.0


def quantise(x: torch.Tensor, clean_u8: torch.Tensor, eta: float) -> torch.Tensor:
    """``x`` [N, 3, H, W] in [0, 1] -> uint8 values (as a uint8 tensor) that stay within eta of the 8-bit clean
    photos ``clean_u8`` after the PNG round trip: round, then clip to the 8-bit eta ball, then to [0, 255]."""
    budget = math.floor(eta * 255 + 1e-6)
    q = x.detach().float().mul(255).round()
    o = clean_u8.float()
    q = torch.minimum(torch.maximum(q, o - budget), o + budget).clamp(0, 255)
    return q.to(torch.uint8)


# ---------------------------------------------------------------------------------------------- feature networks

class VGG19Style(nn.Module):
    """The first layers of torchvision's ``vgg19().features`` (same indices, same ``features.N.weight`` keys),
    built in plain torch; ``forward`` returns the ReLU outputs of its first five conv layers."""

    name = FEATURES_VGG

    def __init__(self):
        super().__init__()
        layers = []
        for spec in VGG19_LAYOUT:
            if spec[0] == "conv":
                layers.append(nn.Conv2d(spec[1], spec[2], 3, padding=1))
            elif spec[0] == "relu":
                layers.append(nn.ReLU())
            else:
                layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x.float() - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG19_STYLE_OUTPUTS:
                out.append(h)
        return out


def load_vgg19(path, device="cpu") -> VGG19Style:
    """VGG19Style with the weights of a torchvision-layout VGG-19 state dict file (``.pth``/``.pt`` read with
    ``torch.load(weights_only=True)``, or ``.safetensors``); keys ``features.N.weight|bias``, others ignored."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"VGG-19 weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot read VGG-19 weights {path}: {exc.__class__.__name__}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{path} is not a state dict (expected keys like features.0.weight)")
    net = VGG19Style()
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise InputError(f"{path} is not a torchvision VGG-19 state dict: missing {', '.join(missing[:4])}")
    wrong = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise InputError(f"{path}: {k} has shape {tuple(state[k].shape)}, VGG-19 has {tuple(own[k].shape)}")
    net.load_state_dict({k: state[k].float() for k in own})
    return net.to(device).eval().requires_grad_(False)


class VAEEncoderStyle(nn.Module):
    """Early features of the attacked model's VAE encoder: conv_in, then each resnet of its first down block."""

    name = FEATURES_VAE

    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.encoder

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        dtype = next(self.encoder.parameters()).dtype
        h = self.encoder.conv_in((x * 2 - 1).to(dtype))
        out = [h]
        for resnet in self.encoder.down_blocks[0].resnets:
            h = resnet(h, None)
            out.append(h)
        return out


def style_network(bundle, vgg19_path=None):
    """The CAP feature network: VGG-19 from ``vgg19_path`` when given, else the VAE encoder's early layers."""
    if vgg19_path:
        return load_vgg19(vgg19_path, bundle.device)
    return VAEEncoderStyle(bundle.vae)


def set_grams(net, x: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Per layer ``[N, C, C]`` Gram matrices of a set, ``batch`` images at a time, without gradient."""
    per_layer = None
    with torch.no_grad():
        for lo in range(0, x.shape[0], batch):
            grams = [gram(f) for f in net(x[lo:lo + batch])]
            per_layer = [[g] for g in grams] if per_layer is None else [p + [g] for p, g in zip(per_layer, grams)]
    return [torch.cat(p) for p in per_layer]


def style_gradient(net, x: torch.Tensor, batch: int):
    """(d L_style / d x, L_style): photo i's gradient is that of 1/N sum_l ||G_i - mean G||^2 with the mean held
    fixed (the mean's own terms cancel, since sum_i (G_i - mean G) = 0), so it is computed ``batch`` at a time."""
    grams = set_grams(net, x, batch)
    means = [g.mean(0, keepdim=True) for g in grams]
    n = x.shape[0]
    grad = torch.zeros_like(x)
    for lo in range(0, n, batch):
        xb = x[lo:lo + batch].detach().requires_grad_(True)
        loss = sum(((gram(f) - m) ** 2).sum() for f, m in zip(net(xb), means)) / n
        grad[lo:lo + batch], = torch.autograd.grad(loss, xb)
    return grad, float(style_spread(grams))


def measure_style_spread(net, x: torch.Tensor, batch: int = 1) -> float:
    """L_style (the Gram-matrix spread across the set) of images ``x``; no gradient."""
    with torch.inference_mode(False):
        return float(style_spread(set_grams(net, x, batch)))


# ---------------------------------------------------------------------------------------------- denoising loss

def _expand(embeds, n):
    return embeds.expand(n, *embeds.shape[1:]) if embeds.shape[0] == 1 else embeds


def _latent_shape(bundle, size: int) -> tuple:
    f = int(bundle.vae_scale_factor)
    return (int(bundle.vae.config.latent_channels), size // f, size // f)


def rec_values(bundle, x, embeds, noise_list, batch: int, precision) -> float:
    """Mean L_rec of images ``x`` over the draws in ``noise_list`` (one pgd.Noise per micro-batch), no gradient."""
    from .pgd import rec_loss

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
    from .pgd import Noise

    n_train = int(bundle.noise_scheduler.config.num_train_timesteps)
    return [(lo, Noise.draw(gens[lo:lo + batch], _latent_shape(bundle, size), n_train, 1.0, bundle.device))
            for lo in range(0, len(gens), batch)]


def denoising_loss(bundle, images: torch.Tensor, embeds, seed: int = 1234, draws: int = 4, batch: int = 1,
                   precision=None) -> float:
    """L_rec of ``images`` averaged over ``draws`` fixed noise/timestep draws per photo (seeded by ``seed``): the
    same draws for any two image sets of the same size, so clean vs protected compare the images, not the noise."""
    from .pgd import image_generators
    from ..diffusion.precision import FP32_CPU

    precision = precision or FP32_CPU
    x = images.to(bundle.device).float()
    gens = image_generators(torch.Generator().manual_seed(seed), x.shape[0])
    values = [rec_values(bundle, x, embeds, draw_noise(bundle, gens, batch, x.shape[-1]), batch, precision)
              for _ in range(draws)]
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------- PGD ascent

def _rec_gradient(bundle, x, embeds, noise_list, batch, precision, scale):
    """d L_rec / d x for every micro-batch (unscaled); non-finite micro-batches are redone in fp32, then zeroed.
    Returns (grad, mean L_rec, counts)."""
    from .pgd import rec_loss
    from ..diffusion.precision import LossScale, Precision, all_finite

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


def pgd_ascent(bundle, x_clean, x, embeds, config: ProtectConfig, generator, steps: int, step0: int,
               precision, checkpointing: bool = False, style_net=None, on_step=None) -> torch.Tensor:
    """``steps`` sign-PGD ascent steps on L_rec (CAP's ratio search from step ``config.cap_first_step`` on when
    ``style_net`` is given); ``step0``: global PGD steps done before. Returns the new X'."""
    from .pgd import attacking, image_generators
    from ..diffusion.precision import LossScale

    n, size, batch = x.shape[0], x.shape[-1], config.batch
    gens = image_generators(generator, n)
    scale = LossScale(precision.scales_loss)
    x = x.detach().clone()
    with attacking(bundle, checkpointing):
        for s in range(step0 + 1, step0 + steps + 1):
            grad, value, counts = _rec_gradient(bundle, x, embeds, draw_noise(bundle, gens, batch, size), batch,
                                                precision, scale)
            record = {"t": s, "loss": value, **counts}
            if style_net is not None and s >= config.cap_first_step:
                g_style, spread = style_gradient(style_net, x, batch)
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
                x = best[2]
                record.update(ratio=best[1], style=spread, loss_after=None if len(grid) == 1 else best[0])
            else:
                x = ascent_step(x_clean, x, grad, config.alpha, config.eta)
            record["linf"] = float((x - x_clean).abs().max())
            if on_step is not None:
                on_step(record)
    return x.detach()


# ---------------------------------------------------------------------------------------------- the run

def fingerprint(bundle, x_clean: torch.Tensor, config: ProtectConfig, style_name: str, style_net=None,
                model_source=None) -> dict:
    """checkpoint.py's fingerprint layout for a protect run: base model, photos (as a set), their order, class
    images ("generated by the base model" or "none"), settings (+ the feature network's weights)."""
    import hashlib
    import json

    from ..training.checkpoint import model_hash, tensor_digest

    digests = [tensor_digest(img.float()) for img in x_clean]
    settings = {**config.to_dict(), "features": style_name if config.cap else None}
    s = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    if config.cap and style_name == FEATURES_VGG and style_net is not None:
        s.update(tensor_digest(*[p for p in style_net.parameters()]).encode())
    classes = "generated by the base model" if config.prior_preservation else "none"
    parts = {"base model": model_hash(bundle, model_source),
             "photos": hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest(),
             "split": hashlib.sha256("\n".join(digests).encode()).hexdigest(),
             "class images": hashlib.sha256(classes.encode()).hexdigest(),
             "settings": s.hexdigest()}
    return {"parts": parts, "settings": settings}


def run_protect(bundle, images: torch.Tensor, config: ProtectConfig, callback=None, vgg19_path=None,
                checkpoint_dir=None, resume: bool = False, check_memory: bool | None = None, model_source=None,
                stop_after: int | None = None, class_cache_dir=None, on_mismatch: str = "error") -> ProtectResult:
    """Protect ``images`` ``[N, 3, H, W]`` in [0, 1] (at the training resolution, on the 8-bit grid) and return
    the protected set (quantised: see :func:`quantise`) and a report. Writes no image: the caller does, once.

    ``callback(Event)`` after every fine-tune and PGD step; it may raise to cancel (nothing is returned or written
    but the resume state of the last finished round, when ``checkpoint_dir`` is given). ``resume``: continue that
    state if it is the same run; a state of another run raises checkpoint.StateMismatch (``on_mismatch="error"``) or
    is deleted and the run starts over (``"restart"``, the node's choice; ``report["resume"]["discarded"]`` says
    why); ``resume=False`` deletes any old state.
    ``stop_after=k`` returns after round k (tests: an interruption). ``check_memory`` (default on) runs fit.py's
    trial fine-tune and PGD steps first."""
    from ..training.checkpoint import check_on_mismatch

    config.validate()
    check_on_mismatch(on_mismatch)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise InputError("images must be a tensor [N, 3, H, W] with N >= 1")
    if config.cap and images.shape[0] < 2:
        raise InputError("cap needs at least 2 photos: its loss compares the photos' styles with each other")
    with torch.inference_mode(False), torch.enable_grad():
        return _run(bundle, images, config, callback, vgg19_path, checkpoint_dir, resume, check_memory,
                    model_source, stop_after, class_cache_dir, on_mismatch)


def _run(bundle, images, config, callback, vgg19_path, checkpoint_dir, resume, check_memory, model_source,
         stop_after, class_cache_dir, on_mismatch) -> ProtectResult:
    from ..training import checkpoint as ckpt
    from ..training.finetune import DreamBoothTrainer, FinetuneConfig, check_images
    from ..training.lora import LoraSpec

    resolution = int(config.resolution or bundle.resolution)
    device = bundle.device
    if config.cap:
        report_setup(callback, "load", "loading CAP's feature network")     # setup reports; the callback may cancel
    style_net = style_network(bundle, vgg19_path) if config.cap else None
    style_name = (style_net.name if style_net is not None else (FEATURES_VGG if vgg19_path else FEATURES_VAE))
    x_clean = check_images(images, resolution, "images").to(device)
    x_clean = x_clean.mul(255).round().div(255)        # the 8-bit original the budget is measured against
    clean_u8 = x_clean.mul(255).round().to(torch.uint8)
    t_start = time.perf_counter()
    emit = Emitter(callback, total=config.total_events())

    state, resume_info = None, {}
    if checkpoint_dir is not None:
        emit.setup("resume")
        fp = fingerprint(bundle, x_clean, config, style_name, style_net, model_source)
        state, resume_info = ckpt.open_state(checkpoint_dir, resume, fp, on_mismatch)

    ft = FinetuneConfig(instance_prompt=config.instance_prompt, lr=config.lr, seed=config.seed, resolution=resolution,
                        prior_preservation=config.prior_preservation, num_class_images=config.num_class_images,
                        mixed_precision=config.mixed_precision, gradient_checkpointing=config.gradient_checkpointing)
    trainer = DreamBoothTrainer(bundle, LoraSpec(rank=config.rank), ft, class_cache_dir=class_cache_dir,
                                callback=emit.relay)
    emit.setup("encode")
    clean_post = trainer.encode(x_clean)
    embeds = trainer.instance_embeds()
    generator = torch.Generator().manual_seed(config.seed + 1)
    precision, checkpointing = trainer.precision, trainer.checkpointing
    if check_memory is not False:
        _check_memory(bundle, trainer, clean_post, x_clean, embeds, config, resolution, style_net, emit.relay)

    report = {"method": config.method, "cap": config.cap, "config": config.to_dict(), "resolution": resolution,
              "n_photos": int(x_clean.shape[0]), "precision": precision.name, "gradient_checkpointing": checkpointing,
              "features": style_name if config.cap else None, "rounds": []}
    x = x_clean.clone()
    start = 1
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        x = state["x"].to(device)
        generator.set_state(state["generator"])
        report["rounds"] = state["rounds"]
        t_start -= state["elapsed"]
        start = int(state["round"]) + 1
        resume_info["resumed_after"] = int(state["round"])
        emit.done = state["events_done"]
    elif config.method == "fsmg" and config.fixed_surrogate_steps:
        trainer.train(clean_post, config.fixed_surrogate_steps,
                      callback=lambda ev: emit("finetune", loss=ev.loss, message="surrogate (clean)"))
    if resume_info:
        report["resume"] = resume_info

    def relay(message, k):
        return lambda ev: emit("finetune", k=k, loss=ev.loss, message=message)

    for k in range(start, config.rounds + 1):
        record = {"round": k, "pgd": []}
        main_state = None
        if config.method == "aspl":
            main_state = trainer.state_dict()                                  # theta
            record["surrogate_clean"] = trainer.train(clean_post, config.surrogate_steps, relay("surrogate", k))

        def on_step(step, k=k, record=record):
            record["pgd"].append(step)
            emit("pgd", k=k, t=step["t"], stage="rec", loss=step["loss"], linf=step["linf"],
                 message=f"ratio {step['ratio']:g}" if "ratio" in step else "")

        x = pgd_ascent(bundle, x_clean, x, embeds, config, generator, config.pgd_steps, (k - 1) * config.pgd_steps,
                       precision, checkpointing, style_net, on_step)
        if k == config.rounds or (stop_after is not None and k >= stop_after):
            report["denoising_loss"] = _measure(bundle, x_clean, x, embeds, config, precision)
        if config.method == "aspl":
            main_state["generator"] = trainer.generator.get_state()            # theta' draws are not reused
            trainer.load_state_dict(main_state)
            record["main_protected"] = trainer.train(x, config.surrogate_steps, relay("main", k))
        report["rounds"].append(record)
        if checkpoint_dir is not None and k < config.rounds:
            ckpt.save_state(checkpoint_dir, {
                "fingerprint": fp, "round": k, "trainer": trainer.state_dict(), "x": x.cpu(),
                "generator": generator.get_state(), "rounds": report["rounds"], "events_done": emit.done,
                "elapsed": time.perf_counter() - t_start})
        if stop_after is not None and k >= stop_after:
            break

    q = quantise(x, clean_u8, config.eta)
    protected = q.float().div(255)
    report["linf"] = float((protected - x_clean).abs().max())
    report["linf_8bit"] = int((q.int() - clean_u8.int()).abs().max())
    if style_net is not None:
        report["style_spread"] = {"clean": measure_style_spread(style_net, x_clean, config.batch),
                                  "protected": measure_style_spread(style_net, protected, config.batch)}
    report["time_s"] = time.perf_counter() - t_start
    if checkpoint_dir is not None and not (stop_after is not None and stop_after < config.rounds):
        ckpt.clear_state(checkpoint_dir)
    emit("done", advance=0, message="finished")
    return ProtectResult(protected.cpu(), report)


def _measure(bundle, x_clean, x, embeds, config, precision) -> dict:
    """L_rec on fixed draws, clean vs protected: under the surrogate the last PGD attacked and the base model."""
    from ..training.lora import lora_disabled

    out = {"surrogate": {"clean": denoising_loss(bundle, x_clean, embeds, batch=config.batch, precision=precision),
                         "protected": denoising_loss(bundle, x, embeds, batch=config.batch, precision=precision)}}
    with lora_disabled(bundle):
        out["base"] = {"clean": denoising_loss(bundle, x_clean, embeds, batch=config.batch, precision=precision),
                       "protected": denoising_loss(bundle, x, embeds, batch=config.batch, precision=precision)}
    return out


def _check_memory(bundle, trainer, clean_post, x_clean, embeds, config, resolution, style_net, callback=None) -> None:
    """fit.check_fits with one fine-tune step and one PGD ascent step on ``batch`` photos (the CAP search too)."""
    import dataclasses

    from ..diffusion.fit import check_fits

    b = config.batch
    trial = dataclasses.replace(config, rounds=1, pgd_steps=1, cap_start=0.0, ratio_steps=min(2, config.ratio_steps))
    xs = x_clean[:max(b, 2 if style_net is not None else 1)]
    check_fits(lambda: trainer.trial_step(clean_post),
               lambda: pgd_ascent(bundle, xs, xs, embeds, trial, torch.Generator().manual_seed(0), 1, 0,
                                  trainer.precision, trainer.checkpointing, style_net),
               b, None, trainer.precision.name, trainer.checkpointing, resolution, bundle.device,
               pgd_step="a PGD ascent step" + (" with CAP's ratio search" if style_net is not None else ""),
               callback=callback)


# ---------------------------------------------------------------------------------------------- writing

DEFAULT_NAMES = "protected_{n:03d}.png"


def output_names(pattern: str, count: int, originals: list[str] | None = None) -> list[str]:
    """File names of the protected photos: ``pattern`` with ``{n}`` (1-based, format spec allowed, e.g.
    ``{n:03d}``), or with ``originals`` (``--keep-names``) each original stem + ``.png``."""
    if originals is not None:
        names = [Path(o).stem + ".png" for o in originals]
    else:
        if "{n" not in pattern:
            raise InputError(f"names={pattern!r} must contain {{n}} (the photo number), e.g. {DEFAULT_NAMES}")
        try:
            names = [pattern.format(n=i + 1) for i in range(count)]
        except (ValueError, KeyError, IndexError) as exc:
            raise InputError(f"names={pattern!r} is not a valid pattern ({exc}); e.g. {DEFAULT_NAMES}") from None
        names = [n if n.lower().endswith(".png") else n + ".png" for n in names]
    for n in names:
        if "/" in n or "\\" in n or n in (".png", "..png") or n.startswith("."):
            raise InputError(f"names={pattern!r}: {n!r} is not a plain file name")
    if len(set(names)) != len(names):
        raise InputError(f"names={pattern!r} gives the same file name twice; use {{n}} in it")
    return names


def check_outputs(folder, names: list[str], overwrite: bool) -> list[Path]:
    """The output paths; refuses (before any work) a folder that is a file, or existing files without overwrite."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out {folder} is a file, not a folder")
    paths = [folder / n for n in names]
    if not overwrite:
        existing = [p for p in paths if p.exists()]
        if existing:
            raise InputError(f"{existing[0]} already exists ({len(existing)} of the outputs do); choose another "
                             "--out or --names, or add --overwrite")
    return paths


def write_png(image: torch.Tensor, path, overwrite: bool = False) -> Path:
    """One image [3, H, W] on the 8-bit grid -> a PNG with no text, EXIF or ICC chunk, written atomically."""
    import numpy as np
    from PIL import Image

    from ..atomic import atomic_write

    rgb = image.detach().mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    rgb = np.ascontiguousarray(rgb)
    return atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG", pnginfo=None), overwrite)


def save_all(images: torch.Tensor, paths: list[Path], overwrite: bool = False) -> list[Path]:
    Path(paths[0]).parent.mkdir(parents=True, exist_ok=True)
    return [write_png(img, p, overwrite) for img, p in zip(images, paths)]


def load_photos(folder, resolution: int):
    """(images [N, 3, r, r] on the 8-bit grid, original file names): every image of ``folder``, centre square
    crop resized to ``resolution``. File names stay in memory (for --keep-names and error messages only)."""
    from ..images import crop_resize, load_folder, to_tensor

    photos = load_folder(folder)
    return torch.stack([to_tensor(crop_resize(p.rgb, resolution)[0]) for p in photos]), [p.name for p in photos]
