"""DreamBooth-LoRA fine-tuning in short, repeatable bursts on one loaded model.

IDDM alternates "perturb the photos" and "fine-tune on the perturbed photos" thousands of times, so the trainer
is built once per model: adapters injected once, AdamW created once, prompt embeddings and prior-preservation
class images computed once; :meth:`DreamBoothTrainer.train` then runs ``steps`` optimisation steps on whatever
images it is given. All randomness (batch choice, noise, timesteps, VAE sampling) comes from one CPU generator
owned by the trainer, so ``train(x, 3); train(x, 3)`` equals ``train(x, 6)`` and the same seed gives the same
LoRA on CPU. The loss follows diffusers' ``train_dreambooth_lora.py``: MSE to the noise (epsilon models) or to
the velocity (v-prediction), plus ``prior_loss_weight`` times the same loss on class images.

How it runs (precision, activation checkpointing) is the run's diffusion.runtime.Runtime. The conditioning of
every UNet call comes from conditioning.py (SDXL: both encoders, pooled embedding, size ids; ``train_text_encoder``
trains the LoRA that lora.add_lora puts on both encoders), image latents from latents.py, class images from
sampling.py.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..diffusion.grad_checkpoint import activation_checkpointing, check_setting
from ..diffusion.precision import MODES
from ..diffusion.runtime import Runtime
from ..errors import InputError
from ..events import Emitter, Event, report_setup
from .conditioning import cat_conditioning, is_sdxl, sdxl_conditioning, unet_conditioning
from .latents import Posterior, encode_posterior
from .lora import LoraSpec, add_lora, get_lora_state, lora_disabled, lora_parameters, set_lora_state
from .sampling import generate_images


@dataclass
class FinetuneConfig:
    instance_prompt: str = "a photo of sks person"
    class_prompt: str = "a photo of person"
    prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    num_class_images: int = 4          # tiny default; real runs use 50-200 (diffusers' default is 100)
    class_sampler_steps: int = 20      # DDIM steps per generated class image
    class_guidance_scale: float = 7.5
    lr: float = 1e-4
    weight_decay: float = 1e-2         # AdamW, as in diffusers' DreamBooth script
    batch_size: int = 1
    resolution: Optional[int] = None   # None: the model's native resolution
    seed: int = 0
    mixed_precision: str = "auto"      # "auto" | "no" | "fp16" | "bf16" (precision.choose_precision)
    gradient_checkpointing: str = "auto"  # "auto" (CUDA only) | "yes" | "no"
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.mixed_precision not in MODES:
            raise InputError(f"mixed_precision={self.mixed_precision!r}: use auto, no, fp16 or bf16")
        check_setting(self.gradient_checkpointing)
        for name in ("lr", "batch_size", "num_class_images", "class_sampler_steps"):
            if getattr(self, name) <= 0 and not (name == "num_class_images" and not self.prior_preservation):
                raise InputError(f"{name} must be > 0 (got {getattr(self, name)})")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise InputError(f"resolution must be a multiple of 8 (got {self.resolution})")


# ---------------------------------------------------------------- inputs

def class_cache_key(title: str, prompt: str, n: int, resolution: int, seed: int, steps: int) -> str:
    """File-name-safe key for cached class images (hashed: the title and prompt are not echoed to disk)."""
    text = "\n".join([title, prompt, str(n), str(resolution), str(seed), str(steps)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def load_class_folder(folder, resolution: int) -> torch.Tensor:
    """User-supplied class images: square-cropped and resized like the instance photos."""
    from ..images import load_square_images

    return load_square_images(folder, resolution)


def check_images(images, resolution: int, name: str = "images") -> torch.Tensor:
    """Validate ``[N, 3, H, W]`` in [0, 1]; returns a detached float32 clone resized to ``resolution``."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"{name} must be a tensor [N, 3, H, W] with N >= 1 (got {shape})")
    x = images.detach().clone().float()
    if not torch.isfinite(x).all() or x.min() < -1e-4 or x.max() > 1 + 1e-4:
        raise InputError(f"{name} must hold values in [0, 1]")
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


# ---------------------------------------------------------------- the trainer

class DreamBoothTrainer:
    """Owns the LoRA, its AdamW state and the RNG of one DreamBooth-LoRA run on ``bundle``.

    ``class_images``: a tensor ``[M, 3, H, W]`` in [0, 1], a folder of images, or None to sample
    ``config.num_class_images`` from the base model once (cached on disk under ``class_cache_dir`` if given).
    ``callback(Event)``: setup events while class images are made (after every sampler step; it may raise to
    cancel, and then nothing is cached). ``runtime``: the run's diffusion.runtime.Runtime (default: decided from
    ``config.mixed_precision`` / ``config.gradient_checkpointing`` and the bundle's device).
    """

    def __init__(self, bundle, lora_spec: LoraSpec, config: FinetuneConfig | None = None,
                 class_images: torch.Tensor | str | None = None, class_cache_dir=None,
                 callback: Optional[Callable[[Event], None]] = None, runtime: Runtime | None = None):
        xl = is_sdxl(bundle)
        self.bundle, self.spec = bundle, lora_spec
        self.config = config = config or FinetuneConfig()
        self.resolution = int(config.resolution or bundle.resolution)
        self.device = bundle.device
        self.steps_done = 0
        with torch.inference_mode(False), torch.enable_grad():
            self.params = add_lora(bundle, lora_spec, seed=config.seed)
            self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.runtime = runtime or Runtime.for_settings(config, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.runtime.precision.scales_loss else None
        self.skipped_steps = 0           # optimiser steps skipped because the gradient was not finite
        self.input_ids = bundle.tokenizer(
            [config.instance_prompt, config.class_prompt], padding="max_length", truncation=True,
            max_length=bundle.tokenizer.model_max_length, return_tensors="pt").input_ids.to(self.device)
        with torch.inference_mode(False), torch.no_grad(), lora_disabled(bundle):
            if xl:      # both prompts' SDXL conditioning at the training resolution
                self.prompt_embeds = sdxl_conditioning(bundle, self._prompts(1, 1), self.resolution).detach().clone()
            else:
                self.prompt_embeds = bundle.text_encoder(self.input_ids)[0].detach().clone()
        self.class_images = None
        self.class_posterior = None
        if config.prior_preservation:
            self.class_images = self._class_images(class_images, class_cache_dir, callback)
            self.class_posterior = self.encode(self.class_images)     # class images never change: encode once

    # -- setup helpers

    def _class_images(self, given, cache_dir, callback=None) -> torch.Tensor:
        cfg, res = self.config, self.resolution
        if isinstance(given, torch.Tensor):
            return check_images(given, res, "class_images")
        if given is not None:
            return load_class_folder(given, res)
        key = class_cache_key(self.bundle.title, cfg.class_prompt, cfg.num_class_images, res, cfg.seed,
                              cfg.class_sampler_steps)
        path = Path(cache_dir) / f"class_{key}.safetensors" if cache_dir else None
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            return load_file(str(path))["images"].float().div(255)
        n = cfg.num_class_images
        report_setup(callback, "class_images", f"making {n} class images with the base model")

        def on_step(done, total):
            report_setup(callback, "class_images", f"making {n} class images: sampler step {done}/{total}")

        with torch.inference_mode(False), lora_disabled(self.bundle):
            images = generate_images(self.bundle, cfg.class_prompt, n, seed=cfg.seed,
                                     steps=cfg.class_sampler_steps, guidance_scale=cfg.class_guidance_scale,
                                     resolution=res, on_step=on_step if callback is not None else None)
        # Written only now, when every class image exists (a cancelled run raised above and caches nothing; the
        # last chance to cancel is just before the write), and atomically (temp file + rename): never a partial set.
        report_setup(callback, "class_images", f"{n} class images made")
        if path is not None:
            from safetensors.torch import save_file

            from ..atomic import atomic_write

            as_bytes = images.mul(255).round().to(torch.uint8).contiguous()
            atomic_write(path, lambda tmp: save_file({"images": as_bytes}, tmp), overwrite=True)
            images = as_bytes.float().div(255)  # identical whether generated now or read from the cache
        return images

    def encode(self, images) -> Posterior:
        """Posterior of a fixed image set, to pass to :meth:`train` instead of the images: a set that does not
        change between bursts (the references Xc, the class images) is encoded once per run, not once per step."""
        if isinstance(images, Posterior):
            return images
        with torch.inference_mode(False), self.runtime.precision.vae():
            x = check_images(images, self.resolution).to(self.device)
            return encode_posterior(self.bundle, x)

    # -- training

    def _pick(self, n: int) -> torch.Tensor:
        return torch.randint(0, n, (self.config.batch_size,), generator=self.generator)

    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).to(self.device)

    def _sample(self, posterior: Posterior) -> torch.Tensor:
        """Scaled latents of ``batch_size`` images drawn from an encoded set (pick, then posterior noise)."""
        idx = self._pick(len(posterior)).to(self.device)
        mean, std = posterior.mean[idx], posterior.std[idx]
        return (mean + std * self._randn(mean.shape)) * self.bundle.scaling_factor

    def _batch(self, posterior: Posterior):
        """Latents and text conditioning for one step: instance images first, then class images."""
        bs = self.config.batch_size
        latents = self._sample(posterior)
        cond = self.prompt_embeds[0:1].expand(bs, -1, -1)
        if self.class_posterior is not None:
            latents = torch.cat([latents, self._sample(self.class_posterior)])
            cond = cat_conditioning([cond, self.prompt_embeds[1:2].expand(bs, -1, -1)])
        return latents, cond

    def instance_embeds(self):
        """Instance-prompt embeddings ``[1, 77, D]`` of the model as it is *now* (what PGD conditions on); for SDXL
        the :class:`SDXLConditioning` at the training resolution.

        Without a text-encoder LoRA these are the base embeddings computed once. With one they are recomputed
        from the current (LoRA-trained) text encoder, in eval mode and without gradient (PGD differentiates
        w.r.t. pixels only), so PGD attacks the model that is being trained."""
        if not self.spec.train_text_encoder:
            return self.prompt_embeds[0:1]
        encoders = self._text_encoders()
        modes = [te.training for te in encoders]
        for te in encoders:
            te.eval()
        try:
            with torch.inference_mode(False), torch.no_grad():
                if is_sdxl(self.bundle):
                    return sdxl_conditioning(self.bundle, self._prompts(1, 0), self.resolution).detach().clone()
                return self.bundle.text_encoder(self.input_ids[0:1])[0].detach().clone()
        finally:
            for te, mode in zip(encoders, modes):
                te.train(mode)

    def _prompts(self, n_inst: int, n_class: int) -> list[str]:
        return [self.config.instance_prompt] * n_inst + [self.config.class_prompt] * n_class

    def _text_encoders(self) -> list:
        return [te for te in (self.bundle.text_encoder, getattr(self.bundle, "text_encoder_2", None)) if te is not None]

    def _text_conditioning(self, n_inst: int, n_class: int):
        if not self.spec.train_text_encoder:
            return None
        if is_sdxl(self.bundle):     # the LoRA is on both encoders (lora.add_lora): conditioning with gradient
            return sdxl_conditioning(self.bundle, self._prompts(n_inst, n_class), self.resolution)
        ids = torch.cat([self.input_ids[0:1].expand(n_inst, -1), self.input_ids[1:2].expand(n_class, -1)])
        return self.bundle.text_encoder(ids)[0]

    def _loss(self, posterior: Posterior) -> torch.Tensor:
        bundle, sched = self.bundle, self.bundle.noise_scheduler
        latents, cond = self._batch(posterior)
        noise = self._randn(latents.shape)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],),
                          generator=self.generator).to(self.device)
        noisy = sched.add_noise(latents, noise, t)
        target = sched.get_velocity(latents, noise, t) if bundle.prediction_type == "v_prediction" else noise
        with self.runtime.precision.autocast():
            te_cond = self._text_conditioning(self.config.batch_size, latents.shape[0] - self.config.batch_size)
            cond = te_cond if te_cond is not None else cond
            unet_dtype = next(p for p in bundle.unet.parameters() if not p.requires_grad).dtype
            pred = bundle.unet(noisy.to(unet_dtype), t, **unet_conditioning(cond, unet_dtype)).sample.float()
        if self.class_posterior is None:
            return F.mse_loss(pred, target)
        pred_i, pred_c = pred.chunk(2)
        target_i, target_c = target.chunk(2)
        return F.mse_loss(pred_i, target_i) + self.config.prior_loss_weight * F.mse_loss(pred_c, target_c)

    def _step(self, posterior: Posterior) -> float:
        loss = self._loss(posterior)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm and self.config.max_grad_norm > 0 \
            else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        finite = bool(torch.isfinite(norm)) and bool(torch.isfinite(loss.detach()))
        if self.scaler is not None:          # GradScaler skips a non-finite step itself and lowers its scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.skipped_steps += not finite
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return float(loss.detach())

    def train(self, images, steps: int, callback: Optional[Callable[[Event], None]] = None,
              k: Optional[int] = None) -> list[float]:
        """Run ``steps`` optimisation steps on ``images`` ``[N, 3, H, W]`` in [0, 1] (encoded once for the whole
        burst) or on a :class:`Posterior` from :meth:`encode`; returns the losses.

        Works under ComfyUI's ``inference_mode`` (it is switched off here and inputs are cloned). A callback
        that raises stops training after the current step; the raised exception propagates.
        """
        if int(steps) < 0:
            raise InputError(f"steps must be >= 0 (got {steps})")
        emit = Emitter(callback, total=int(steps))
        losses = []
        posterior = self.encode(images)
        with self._training():
            for _ in range(int(steps)):
                losses.append(self._step(posterior))
                emit("finetune", loss=losses[-1], k=k)
        return losses

    def trial_step(self, posterior: Posterior) -> None:
        """Forward and backward of one step, then everything undone (gradients, RNG): the memory a step needs,
        measured before a long run so that an out-of-memory error comes first, not an hour in."""
        state = self.generator.get_state()
        try:
            with self._training():
                loss = self._loss(posterior)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.generator.set_state(state)

    @contextlib.contextmanager
    def _training(self):
        """Gradients on (also under ComfyUI's inference_mode), trained modules in train mode, checkpointing."""
        with torch.inference_mode(False), torch.enable_grad():
            unet, encoders = self.bundle.unet, self._text_encoders()
            modes = [m.training for m in (unet, *encoders)]
            unet.train()
            trained = [unet]
            if self.spec.train_text_encoder:
                for te in encoders:
                    te.train()
                trained += encoders
            try:
                with activation_checkpointing(*trained, enabled=self.runtime.checkpointing):
                    yield
            finally:
                for m, mode in zip((unet, *encoders), modes):
                    m.train(mode)

    # -- checkpoints

    def state_dict(self) -> dict:
        """LoRA weights, AdamW moments and RNG state (cloned): enough to resume bit-identically on CPU."""
        state = {
            "lora": get_lora_state(self.bundle),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "generator": self.generator.get_state().clone(),
            "steps_done": self.steps_done,
            "lora_spec": asdict(self.spec),
            "config": asdict(self.config),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        for key in ("lora", "optimizer", "generator"):
            if key not in state:
                raise InputError(f"trainer state has no {key!r} entry")
        set_lora_state(self.bundle, state["lora"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.generator.set_state(state["generator"].clone())
        self.steps_done = int(state.get("steps_done", 0))
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    @property
    def lora_parameters(self):
        return lora_parameters(self.bundle)
