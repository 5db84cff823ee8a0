"""PGDTwoStage: sign-PGD on the protection set X0 against the frozen temporary model.

    x' = clip01(x0 + delta),  |delta|_inf <= eta,  step alpha,  t = 1..T
    t <= floor(rho*T):  minimise L_rec = E||eps - eps_theta(z_t, t, c)||^2        (Stage I, fidelity)
    otherwise:          minimise L_id  = 1 + sum_m w_m s_m on x0_hat              (Stage II, identity)

Stage I *minimises* the denoising loss (IDDM keeps X' easy to learn); Anti-DreamBooth maximises it — the
opposite sign, on purpose. x0_hat is the VAE-decoded one-step clean prediction from a noised latent of x'.

Memory and precision (see docs/DESIGN.md, "PGD at real size"):
- X0 is processed in micro-batches of ``PGDConfig.batch`` images. Every image owns a random stream (its VAE
  posterior noise, t and eps), so X' is the same whatever the micro-batch size.
- Activation checkpointing (grad_checkpoint.py) and the precision policy (precision.py) are passed in, as the
  run's diffusion.runtime.Runtime.
- A micro-batch whose gradient is not finite is redone in fp32 with the same noise, and skipped (left as it
  was) if it is still not finite; each case is counted in the step record. X' never becomes NaN.

Gradient modes (``PGDConfig.gradient``), the paper's ``full`` being the default:
- ``sds``: the UNet output is treated as a constant of its input (score distillation, RID's Adv-SDS): Stage I's
  latent gradient is the residual ``pred - target``, Stage II's x0_hat uses the UNet output without its backward.
- ``face``: Stage II encodes, denoises and decodes only a window around the face (what the recognisers' crops
  sample, plus ``face_margin`` pixels for the VAE's receptive field); the gradient lands on those pixels. The
  window is square, a multiple of the UNet's pixel stride, one per micro-batch (so with ``batch`` > 1 the
  window, hence X', can differ from ``batch`` = 1).
- ``fast``: ``face`` and ``sds`` together.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..face.attack import sign_pgd_step
from ..face.budget import check_psnr, l2_pgd_step, l2_radius
from ..face.transfer import Draws, TransferOptions, steer
from ..face.transfer import draw as draw_transfer
from ..training.conditioning import unet_conditioning
from ..training.latents import vae_posterior
from ..diffusion.grad_checkpoint import activation_checkpointing
from ..diffusion.precision import FP32_CPU, LossScale, Precision, all_finite
from ..diffusion.runtime import FP32, Runtime

STAGE_REC = "rec"
STAGE_ID = "id"
GRADIENTS = ("full", "sds", "face", "fast")
NO_STAGE_ONE = "no Stage I step (rho*T < 1)"


@dataclass
class PGDConfig:
    T: int = 8              # PGD steps per outer iteration
    rho: float = 0.1        # share of Stage I steps: the first floor(rho*T) steps minimise L_rec
    eta: float = 0.08       # L_inf budget in [0, 1] pixel units
    alpha: float = 0.008    # step size
    id_t_max: float = 1.0   # Stage II samples diffusion timesteps in [0, id_t_max * num_train_timesteps)
    gradient: str = "full"  # full (paper) | sds | face | fast (= face + sds)
    batch: int = 1          # micro-batch: protected images per forward/backward pass (memory ~ batch, not N)
    face_margin: int = 32   # face mode: pixels added around the recognisers' crops (VAE receptive field)
    # Stage II transfer options (momentum, crop diversity, landmark jitter, smoothing; face/transfer.py), all off
    transfer: TransferOptions = field(default_factory=TransferOptions)
    # PSNR floor of X' against the clean photos, dB (None: the L_inf budget alone). Set, the budget is also an L2
    # ball and every step is a normalised-gradient step of length alpha / eta of its radius (face/budget.py)
    psnr: float | None = None

    def validate(self) -> "PGDConfig":
        if not isinstance(self.T, int) or self.T < 1:
            raise InputError(f"T={self.T!r}: the number of PGD steps must be an integer >= 1")
        if not 0.0 < self.rho < 1.0:
            raise InputError(f"rho={self.rho!r} must be in (0, 1) (0.1 = paper/privacy, 0.3 = balanced)")
        if not 0.0 < self.eta <= 1.0:
            raise InputError(f"eta={self.eta!r}: the L_inf budget must be in (0, 1] (pixels in [0, 1]; paper 0.08)")
        if not 0.0 < self.alpha <= self.eta:
            raise InputError(f"alpha={self.alpha!r}: the step must be in (0, eta={self.eta}] (paper 0.008)")
        if not 0.0 < self.id_t_max <= 1.0:
            raise InputError(f"id_t_max={self.id_t_max!r} must be in (0, 1]")
        if self.gradient not in GRADIENTS:
            raise InputError(f"gradient={self.gradient!r}: use one of {', '.join(GRADIENTS)}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise InputError(f"pgd_batch={self.batch!r} must be an integer >= 1 (1 = least memory)")
        if not isinstance(self.face_margin, int) or self.face_margin < 0:
            raise InputError(f"face_margin={self.face_margin!r} must be an integer >= 0 (pixels)")
        if not isinstance(self.transfer, TransferOptions):
            raise InputError(f"transfer={self.transfer!r} must be a TransferOptions (face/transfer.py)")
        self.transfer.validate()
        check_psnr(self.psnr)
        return self

    @property
    def n_rec(self) -> int:
        """Stage I steps: floor(rho*T) (a 1e-9 slack so that e.g. rho 0.29, T 100 gives 29, not 28)."""
        return math.floor(self.rho * self.T + 1e-9)

    @property
    def n_id(self) -> int:
        """Stage II steps: the rest of the T."""
        return self.T - self.n_rec

    def schedule(self) -> dict:
        """Step counts per PGD call, for reports and messages; ``note`` only when there is no Stage I step."""
        out = {"stage1_steps": self.n_rec, "stage2_steps": self.n_id}
        if self.n_rec == 0:
            out["note"] = NO_STAGE_ONE
        return out

    def schedule_text(self) -> str:
        """One line, e.g. "PGD per iteration: 0 Stage I (L_rec) + 8 Stage II (L_id) steps (rho 0.1 x T 8 = 0.8)"."""
        text = (f"PGD per iteration: {self.n_rec} Stage I (L_rec) + {self.n_id} Stage II (L_id) steps "
                f"(rho {self.rho:g} x T {self.T} = {self.rho * self.T:g})")
        if self.n_rec == 0:
            text += f"; {NO_STAGE_ONE}: every PGD step attacks identity (the paper's defaults rho 0.1, T 8 " \
                    "give this; raise rho or T for Stage I steps)"
        return text

    @property
    def sds(self) -> bool:
        return self.gradient in ("sds", "fast")

    @property
    def face_window(self) -> bool:
        return self.gradient in ("face", "fast")

    def stage(self, t: int) -> str:
        """Stage of PGD step ``t`` (1-based)."""
        return STAGE_REC if t <= self.n_rec else STAGE_ID

    def to_dict(self) -> dict:
        return asdict(self)


# ---- per-image random streams --------------------------------------------------------------------------------

def image_generators(generator: torch.Generator, n: int) -> list[torch.Generator]:
    """One CPU generator per protected image, seeded from ``generator``: an image's noise does not depend on
    which micro-batch it lands in."""
    seeds = torch.randint(0, 2 ** 62, (n,), generator=generator)
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def randn_per_image(gens: list[torch.Generator], shape, device, dtype=torch.float32) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(device, dtype)


def randint_per_image(gens: list[torch.Generator], high: int, device) -> torch.Tensor:
    return torch.cat([torch.randint(0, high, (1,), generator=g) for g in gens]).to(device)


# ---- small pieces of diffusion math --------------------------------------------------------------------------

def decode_latents(bundle, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1] (differentiable; not clipped so gradients survive saturation)."""
    vae_dtype = next(bundle.vae.parameters()).dtype
    return (bundle.vae.decode((z / bundle.scaling_factor).to(vae_dtype)).sample.float() + 1.0) / 2.0


def add_noise(bundle, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return bundle.noise_scheduler.add_noise(z0, eps, t)


def training_target(bundle, z0, eps, t):
    if bundle.prediction_type == "v_prediction":
        return bundle.noise_scheduler.get_velocity(z0, eps, t)
    return eps


def one_step_clean(z_t: torch.Tensor, model_out: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str):
    """z0_hat from a single model evaluation. alpha_bar: cumulative alpha per sample, shape [N]."""
    a = alpha_bar.view(-1, 1, 1, 1).to(z_t.dtype)
    if prediction_type == "v_prediction":
        return a.sqrt() * z_t - (1 - a).sqrt() * model_out
    return (z_t - (1 - a).sqrt() * model_out) / a.sqrt()


def unet_predict(bundle, z_t: torch.Tensor, t: torch.Tensor, embeds) -> torch.Tensor:
    """UNet output in float32; inputs cast to the UNet's dtype (a half-precision bundle works without autocast).
    ``embeds``: hidden states, or for SDXL a conditioning.SDXLConditioning (pooled text embedding and time ids too)."""
    dtype = next(bundle.unet.parameters()).dtype
    return bundle.unet(z_t.to(dtype), t, **unet_conditioning(embeds, dtype)).sample.float()


@dataclass
class Noise:
    """The random draws of one PGD step for a micro-batch: posterior noise, timesteps, diffusion noise, and in
    Stage II the transfer options' landmark jitter and crop transforms (None when those are off)."""

    posterior: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    transfer: Draws | None = None

    @classmethod
    def draw(cls, gens, latent_shape, n_train: int, t_max: float, device) -> "Noise":
        high = max(1, int(round(t_max * n_train)))
        return cls(posterior=randn_per_image(gens, latent_shape, device),
                   t=randint_per_image(gens, high, device),
                   eps=randn_per_image(gens, latent_shape, device))


def noised_latents(bundle, x: torch.Tensor, noise: Noise, precision: Precision):
    """(z0, z_t) of images ``x``: z0 sampled from the VAE posterior with the given noise, then noised to t."""
    with precision.vae():
        mean, std = vae_posterior(bundle, x)
    z0 = (mean + std * noise.posterior) * bundle.scaling_factor
    return z0, add_noise(bundle, z0, noise.eps, noise.t)


def rec_loss(bundle, x, embeds, noise: Noise, precision: Precision = FP32_CPU, sds: bool = False):
    """Stage I: (loss to differentiate, L_rec value). L_rec = E||target - model(z_t, t, c)||^2, target = eps (or v).

    With ``sds`` the UNet is run without gradient and the differentiated loss is <stopgrad(pred - target), z_t>
    (scaled like the MSE's gradient): its gradient is the residual pushed through the encoder only.
    """
    z0, z_t = noised_latents(bundle, x, noise, precision)
    target = training_target(bundle, z0, noise.eps, noise.t)
    if not sds:
        loss = F.mse_loss(unet_predict(bundle, z_t, noise.t, embeds), target.float())
        return loss, loss.detach()
    with torch.no_grad():
        pred = unet_predict(bundle, z_t.detach(), noise.t, embeds)
        residual = pred - target.detach().float()
    value = residual.pow(2).mean()
    return (2.0 / residual.numel()) * (residual * z_t.float()).sum(), value


def predict_clean_image(bundle, x, embeds, noise: Noise, precision: Precision = FP32_CPU, sds: bool = False):
    """x0_hat = D(z0_hat(z_t)): the VAE-decoded one-step clean prediction of a noised latent of x."""
    _, z_t = noised_latents(bundle, x, noise, precision)
    if sds:
        with torch.no_grad():
            pred = unet_predict(bundle, z_t.detach(), noise.t, embeds)
    else:
        pred = unet_predict(bundle, z_t, noise.t, embeds)
    alpha_bar = bundle.noise_scheduler.alphas_cumprod.to(z_t.device)[noise.t]
    with precision.vae():
        return decode_latents(bundle, one_step_clean(z_t, pred, alpha_bar, bundle.prediction_type))


@contextmanager
def frozen(*modules):
    """Temporarily stop parameter gradients (PGD differentiates w.r.t. pixels only)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def attacking(bundle, checkpointing: bool = False):
    """The bundle as a fixed function of the pixels for the block: every network in eval mode, parameter
    gradients off, activation checkpointing when asked; the train/eval modes are restored after."""
    modules = tuple(m for m in (bundle.unet, bundle.vae, bundle.text_encoder, getattr(bundle, "text_encoder_2", None))
                    if m is not None)
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with frozen(*modules), activation_checkpointing(*modules, enabled=checkpointing):
            yield
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)


# ---- face windows --------------------------------------------------------------------------------------------

def crop_support(ensemble, landmarks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boolean mask [N, H, W] of the pixels any recogniser's aligned crop samples (from the warp's gradient)."""
    probe = torch.ones(landmarks.shape[0], 3, height, width, device=landmarks.device, requires_grad=True)
    with torch.enable_grad():
        total = sum(r.align(probe, landmarks).sum() for r in ensemble.recognizers)
        grad, = torch.autograd.grad(total, probe)
    return grad.abs().sum(dim=1) > 0


def face_windows(support: torch.Tensor, margin: int, multiple: int) -> tuple[int, list[tuple[int, int]]]:
    """One square window side (a multiple of ``multiple``, at most the image) and a (top, left) per image that
    covers each image's ``support`` plus ``margin`` pixels, kept inside the image."""
    n, height, width = support.shape
    limit = (min(height, width) // multiple) * multiple
    boxes = []
    for mask in support:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if ys.numel() == 0:
            boxes.append((0, height, 0, width))
            continue
        boxes.append((int(ys.min()) - margin, int(ys.max()) + 1 + margin,
                      int(xs.min()) - margin, int(xs.max()) + 1 + margin))
    need = max(max(b - a, d - c) for a, b, c, d in boxes)
    side = min(limit, multiple * math.ceil(need / multiple))
    corners = []
    for top, bottom, left, right in boxes:
        cy, cx = (top + bottom) / 2, (left + right) / 2
        y = int(min(max(round(cy - side / 2), 0), height - side))
        x = int(min(max(round(cx - side / 2), 0), width - side))
        corners.append((y, x))
    return side, corners


def window_multiple(bundle) -> int:
    """Pixel multiple a window must have: the VAE factor times the UNet's total downsampling."""
    return int(bundle.vae_scale_factor) * 2 ** (len(bundle.unet.config.down_block_types) - 1)


def cut_windows(x: torch.Tensor, side: int, corners) -> torch.Tensor:
    return torch.stack([img[:, y:y + side, x_:x_ + side] for img, (y, x_) in zip(x, corners)])


# ---- one gradient ---------------------------------------------------------------------------------------------

# 11 parameters, private to pgd_two_stage's step: one micro-batch (x, landmarks, embeds, noise, window), its stage, and
# the step's fixed parts (bundle, ensemble, config, precision, predict_clean), passed flat so the hot loop builds no object
def _stage_loss(bundle, ensemble, x, landmarks, embeds, stage, noise, config, precision, predict_clean, window):
    """(loss to differentiate, loss value, ({recogniser: similarities [n]}, {recogniser: weights [n]})) for one
    micro-batch (both empty in Stage I)."""
    if stage == STAGE_REC:
        loss, value = rec_loss(bundle, x, embeds, noise, precision, sds=config.sds)
        return loss, value, ({}, {})
    if window is not None:
        side, corners = window
        x = cut_windows(x, side, corners)
        offsets = torch.tensor([[c[1], c[0]] for c in corners], dtype=landmarks.dtype, device=landmarks.device)
        landmarks = landmarks - offsets.unsqueeze(1)
    x0_hat = predict_clean(bundle, x, embeds, noise, precision, config.sds)
    if not hasattr(ensemble, "identity_loss"):     # any (images, landmarks) -> (loss, similarities), e.g. a stand-in
        loss, sims = ensemble(x0_hat.float(), landmarks)
        return loss, loss.detach(), (sims, {})
    out = ensemble.identity_loss(x0_hat.float(), landmarks, noise.transfer)
    return out.loss, out.loss.detach(), (out.similarity, out.weights)


def _gradient(compute, x, precision: Precision, scale: LossScale):
    """d loss / d x with the loss scaled (fp16); returns (grad or None if not finite, loss value, sims)."""
    x = x.detach().requires_grad_(True)
    with precision.autocast():
        loss, value, sims = compute(x)
    grad, = torch.autograd.grad(loss.float() * scale.value, x)
    if not all_finite(grad, value):
        return None, value, sims
    return grad, value, sims


# ---- the two-stage attack ------------------------------------------------------------------------------------

# 11 parameters: the attack's inputs (model, recognisers, photos, landmarks, prompt, settings, noise), then
# optional keywords (progress, the run's runtime, a test's stand-in, IDDM's starting point)
def pgd_two_stage(bundle, ensemble, x0: torch.Tensor, landmarks: torch.Tensor, embeds,
                  config: PGDConfig, generator: torch.Generator, on_step=None, runtime: Runtime | None = None,
                  predict_clean=None, x_init: torch.Tensor | None = None) -> torch.Tensor:
    """Run T sign-PGD steps on the protected images ``x0`` (in micro-batches of ``config.batch``) and return X'.

    ``x_init`` (default ``x0``) is where the steps start: IDDM passes the previous iteration's X' ("X0 <- X'"),
    while ``x0`` stays the clean photos, so the budget |X' - clean|_inf <= eta holds over the whole run instead of
    growing by eta per outer iteration (the same choice as Anti-DreamBooth's ASPL).

    ``ensemble`` is a FaceEnsembleLoss whose references are already set; ``landmarks`` are those of the clean x0.
    ``embeds`` are the instance-prompt embeddings (batch 1 or N); for SDXL a conditioning.SDXLConditioning (its time ids
    are the training resolution's, also for a face window). ``on_step(record)`` is called after every step
    with {t, stage, loss, similarity, weights (Stage II), linf, redone_fp32, skipped}; it may raise to cancel.
    ``predict_clean(bundle, x, embeds, noise, precision, sds)`` replaces the one-step clean prediction (default
    :func:`predict_clean_image`; tests use x0_hat := x'). ``runtime`` (diffusion.runtime.Runtime: precision and
    activation checkpointing) defaults to fp32 without checkpointing.
    """
    predict_clean = predict_clean or predict_clean_image
    runtime = runtime or FP32
    precision = runtime.precision
    config.validate()
    x0 = x0.detach()
    x = (x0 if x_init is None else x_init.detach()).clone()
    landmarks = landmarks.to(x.device)
    n, _, height, width = x.shape
    if embeds.shape[0] == 1:
        embeds = embeds.expand(n, *embeds.shape[1:])
    gens = image_generators(generator, n)
    latent_shape = _latent_shape(bundle, height, width)
    n_train = int(bundle.noise_scheduler.config.num_train_timesteps)
    windows = {}
    if config.face_window:        # one window side per micro-batch: with pgd_batch 1 every photo gets its tightest
        support = crop_support(ensemble, landmarks, height, width)
        for lo in range(0, n, config.batch):
            windows[lo] = face_windows(support[lo:lo + config.batch], config.face_margin, window_multiple(bundle))
    scale = LossScale(precision.scales_loss)
    velocity = torch.zeros_like(x) if config.transfer.momentum > 0 else None     # MI-FGSM, Stage II steps only
    radius = None if config.psnr is None else l2_radius(torch.ones_like(x[:, :1]), x.shape[1], config.psnr)
    with attacking(bundle, runtime.checkpointing):
        for t in range(1, config.T + 1):
            stage = config.stage(t)
            transfer = config.transfer if stage == STAGE_ID else None
            values, sims, weights, counts = [], {}, {}, {"redone_fp32": 0, "skipped": 0}
            for lo in range(0, n, config.batch):
                sl = slice(lo, min(n, lo + config.batch))
                part_gens = gens[sl]
                states = [g.get_state() for g in part_gens]
                part_window = windows.get(lo) if stage == STAGE_ID else None
                shape = _latent_shape(bundle, part_window[0], part_window[0]) if part_window else latent_shape
                noise = Noise.draw(part_gens, shape, n_train,
                                   config.id_t_max if stage == STAGE_ID else 1.0, x.device)
                noise.transfer = draw_transfer(transfer, part_gens, landmarks.shape[1])

                def compute(xb, sl=sl, noise=noise, part_window=part_window, precision_=precision):
                    return _stage_loss(bundle, ensemble, xb, landmarks[sl], embeds[sl], stage, noise, config,
                                       precision_, predict_clean, part_window)

                grad, value, part_sims = _gradient(compute, x[sl], precision, scale)
                scale.update(grad is not None)
                if grad is None and precision.dtype is not None:      # redo in fp32 with the same noise
                    for g, s in zip(part_gens, states):
                        g.set_state(s)
                    counts["redone_fp32"] += 1
                    grad, value, part_sims = _gradient(lambda xb: compute(xb, precision_=_fp32(precision)),
                                                       x[sl], _fp32(precision), LossScale(False))
                if grad is None:
                    counts["skipped"] += 1
                else:
                    grad = steer(grad, transfer, None if velocity is None else velocity[sl])
                    if radius is None:
                        x[sl] = sign_pgd_step(x0[sl], x[sl], grad, config.alpha, config.eta)
                    else:
                        x[sl] = l2_pgd_step(x0[sl], x[sl], grad, radius[sl] * (config.alpha / config.eta),
                                            config.eta, radius[sl])
                values.append(float(value) * (sl.stop - sl.start))
                for into, got in zip((sims, weights), part_sims):
                    for name, v in got.items():
                        into.setdefault(name, []).append(v.detach().float())
            if on_step is not None:
                on_step({
                    "t": t, "stage": stage, "loss": sum(values) / n,
                    "similarity": _means(sims), **({"weights": _means(weights)} if weights else {}),
                    "linf": float((x - x0).abs().max()), **counts,
                })
    return x.detach()


def _means(parts: dict) -> dict:
    """{name: [tensors]} -> {name: mean over all of them}."""
    return {name: float(torch.cat(v).mean()) for name, v in parts.items()}


def _fp32(precision: Precision) -> Precision:
    return Precision(precision.device_type)


def _latent_shape(bundle, height: int, width: int) -> tuple:
    f = int(bundle.vae_scale_factor)
    return (int(bundle.vae.config.latent_channels), height // f, width // f)
