"""PGDTwoStage: sign-PGD on the protection set X0 against the frozen temporary model.

    x' = clip01(x0 + delta),  |delta|_inf <= eta,  step alpha,  t = 1..T
    t <= floor(rho*T):  minimise L_rec = E||eps - eps_theta(z_t, t, c)||^2        (Stage I, fidelity)
    otherwise:          minimise L_id  = 1 + sum_m w_m s_m on x0_hat              (Stage II, identity)

Stage I *minimises* the denoising loss (IDDM keeps X' easy to learn); Anti-DreamBooth maximises it — the
opposite sign, on purpose. x0_hat is the VAE-decoded one-step clean prediction from a noised latent of x'.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from .errors import InputError
from .face.attack import sign_pgd_step
from .finetune import sample_latents

STAGE_REC = "rec"
STAGE_ID = "id"


@dataclass
class PGDConfig:
    T: int = 8              # PGD steps per outer iteration
    rho: float = 0.1        # share of Stage I steps: the first floor(rho*T) steps minimise L_rec
    eta: float = 0.08       # L_inf budget in [0, 1] pixel units
    alpha: float = 0.008    # step size
    id_t_max: float = 1.0   # Stage II samples diffusion timesteps in [0, id_t_max * num_train_timesteps)

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
        return self

    @property
    def n_rec(self) -> int:
        return math.floor(self.rho * self.T)

    def stage(self, t: int) -> str:
        """Stage of PGD step ``t`` (1-based)."""
        return STAGE_REC if t <= self.n_rec else STAGE_ID

    def to_dict(self) -> dict:
        return asdict(self)


# ---- small pieces of diffusion math --------------------------------------------------------------------------

def decode_latents(bundle, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1] (differentiable; not clipped so gradients survive saturation)."""
    vae_dtype = next(bundle.vae.parameters()).dtype
    return (bundle.vae.decode((z / bundle.scaling_factor).to(vae_dtype)).sample.float() + 1.0) / 2.0


def sample_noising(bundle, z0: torch.Tensor, generator: torch.Generator, t_max: float = 1.0):
    """Sample t ~ U[0, t_max*T_train) and eps ~ N(0, I); return (z_t, eps, t)."""
    n_train = bundle.noise_scheduler.config.num_train_timesteps
    high = max(1, int(round(t_max * n_train)))
    t = torch.randint(0, high, (z0.shape[0],), generator=generator).to(z0.device)
    eps = torch.randn(z0.shape, generator=generator, dtype=z0.dtype).to(z0.device)
    return bundle.noise_scheduler.add_noise(z0, eps, t), eps, t


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


def rec_loss(bundle, x, embeds, generator, t_max: float = 1.0) -> torch.Tensor:
    """L_rec = E||target - model(z_t, t, c)||^2 (target = eps, or v for v-prediction models)."""
    z0 = sample_latents(bundle, x, generator)
    z_t, eps, t = sample_noising(bundle, z0, generator, t_max)
    pred = bundle.unet(z_t, t, encoder_hidden_states=embeds).sample
    return torch.nn.functional.mse_loss(pred.float(), training_target(bundle, z0, eps, t).float())


def predict_clean_image(bundle, x, embeds, generator, t_max: float = 1.0) -> torch.Tensor:
    """x0_hat = D(z0_hat(z_t)): the VAE-decoded one-step clean prediction of a noised latent of x."""
    z0 = sample_latents(bundle, x, generator)
    z_t, _, t = sample_noising(bundle, z0, generator, t_max)
    pred = bundle.unet(z_t, t, encoder_hidden_states=embeds).sample
    alpha_bar = bundle.noise_scheduler.alphas_cumprod.to(z0.device)[t]
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


# ---- the two-stage attack ------------------------------------------------------------------------------------

def pgd_two_stage(bundle, ensemble, x0: torch.Tensor, landmarks: torch.Tensor, embeds: torch.Tensor,
                  config: PGDConfig, generator: torch.Generator, on_step=None, autocast=None,
                  predict_clean=None, x_init: torch.Tensor | None = None) -> torch.Tensor:
    """Run T sign-PGD steps on the batch ``x0`` (all protected images at once) and return X'.

    ``x_init`` (default ``x0``) is where the steps start: IDDM passes the previous iteration's X' ("X0 <- X'"),
    while ``x0`` stays the clean photos, so the budget |X' - clean|_inf <= eta holds over the whole run instead of
    growing by eta per outer iteration (the same choice as Anti-DreamBooth's ASPL).

    ``ensemble`` is a FaceEnsembleLoss whose references are already set; ``landmarks`` are those of the clean x0.
    ``embeds`` are the instance-prompt embeddings (batch 1 or N). ``on_step(record)`` is called after every step
    with {t, stage, loss, similarity, linf}; it may raise to cancel. ``predict_clean(bundle, x, embeds, generator,
    t_max)`` replaces the one-step clean prediction (default :func:`predict_clean_image`; tests use x0_hat := x').
    """
    predict_clean = predict_clean or predict_clean_image
    config.validate()
    x0 = x0.detach()
    x = (x0 if x_init is None else x_init.detach()).clone()
    if embeds.shape[0] != x.shape[0]:
        embeds = embeds.expand(x.shape[0], *embeds.shape[1:])
    autocast = autocast or _no_autocast
    was_training = bundle.unet.training
    bundle.unet.eval()
    try:
        with frozen(bundle.unet, bundle.vae, bundle.text_encoder):
            for t in range(1, config.T + 1):
                stage = config.stage(t)
                x.requires_grad_(True)
                with autocast():
                    if stage == STAGE_REC:
                        loss, sims = rec_loss(bundle, x, embeds, generator), {}
                    else:
                        x0_hat = predict_clean(bundle, x, embeds, generator, config.id_t_max)
                        loss, sims = ensemble(x0_hat.float(), landmarks)
                grad, = torch.autograd.grad(loss.float(), x)
                x = sign_pgd_step(x0, x.detach(), grad, config.alpha, config.eta)
                if on_step is not None:
                    on_step({
                        "t": t, "stage": stage, "loss": float(loss.detach()),
                        "similarity": {name: float(s.detach().float().mean()) for name, s in sims.items()},
                        "linf": float((x - x0).abs().max()),
                    })
    finally:
        bundle.unet.train(was_training)
    return x.detach()


@contextmanager
def _no_autocast():
    yield
