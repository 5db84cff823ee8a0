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
candidate. Feature network: VGG-19's first layers from a user-supplied file, else the attacked model's VAE encoder
(style.py); the report says which.

Where the pieces are: style.py (the feature networks, Gram matrices, L_style), ascent.py (the PGD ascent and CAP's
ratio search; memory: ``batch`` photos at a time, each with its own noise stream, so the result does not depend on
``batch``), photo_files.py (8-bit quantisation, PNG writing, photo loading). This module holds the settings and
the run: :func:`run_protect`'s loop of rounds, whose collaborators are :class:`ProtectRun` (made once: surrogate
trainer, attack target, photos, report, progress) and training/checkpoint.py's RunState (resume: the state of the
last finished round, in checkpoint.py's private folder and fingerprint format).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..diffusion.fit import check_fits
from ..diffusion.runtime import Runtime
from ..errors import InputError
from ..events import Emitter, report_setup
from ..training import checkpoint as ckpt
from ..training.checkpoint import model_hash, tensor_digest
from ..training.finetune import DreamBoothTrainer, FinetuneConfig, check_images
from ..training.lora import LoraSpec, lora_disabled
from .ascent import AscentTarget, denoising_loss, pgd_ascent
from .photo_files import quantise
from .style import FEATURES_VAE, FEATURES_VGG, measure_style_spread, style_network

METHODS = ("aspl", "fsmg")
PROBES = ("fresh", "shared")     # how CAP's ratio search draws the noise it scores each candidate's L_rec on


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


def fingerprint(bundle, x_clean: torch.Tensor, config: ProtectConfig, style_name: str, style_net=None,
                model_source=None) -> dict:
    """checkpoint.py's fingerprint layout for a protect run: base model, photos (as a set), their order, class
    images ("generated by the base model" or "none"), settings (+ the feature network's weights)."""
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


# 12 parameters: the public, scripted signature (CLI, node, bench and users' scripts call it by keyword); the
# run itself gets the keywords as one ProtectOptions
def run_protect(bundle, images: torch.Tensor, config: ProtectConfig, callback=None, vgg19_path=None,
                checkpoint_dir=None, resume: bool = False, check_memory: bool | None = None, model_source=None,
                stop_after: int | None = None, class_cache_dir=None, on_mismatch: str = "error") -> ProtectResult:
    """Protect ``images`` ``[N, 3, H, W]`` in [0, 1] (at the training resolution, on the 8-bit grid) and return
    the protected set (quantised: see photo_files.quantise) and a report. Writes no image: the caller does, once.

    ``callback(Event)`` after every fine-tune and PGD step; it may raise to cancel (nothing is returned or written
    but the resume state of the last finished round, when ``checkpoint_dir`` is given). ``resume``: continue that
    state if it is the same run; a state of another run raises checkpoint.StateMismatch (``on_mismatch="error"``) or
    is deleted and the run starts over (``"restart"``, the node's choice; ``report["resume"]["discarded"]`` says
    why); ``resume=False`` deletes any old state.
    ``stop_after=k`` returns after round k (tests: an interruption). ``check_memory`` (default on) runs fit.py's
    trial fine-tune and PGD steps first."""
    config.validate()
    ckpt.check_on_mismatch(on_mismatch)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise InputError("images must be a tensor [N, 3, H, W] with N >= 1")
    if config.cap and images.shape[0] < 2:
        raise InputError("cap needs at least 2 photos: its loss compares the photos' styles with each other")
    state = ckpt.ResumeOptions(checkpoint_dir, resume, on_mismatch, model_source, stop_after)
    opts = ProtectOptions(callback=callback, vgg19_path=vgg19_path, state=state, class_cache_dir=class_cache_dir,
                          check_memory=check_memory)
    with torch.inference_mode(False), torch.enable_grad():
        return _run(bundle, images, config, opts)


@dataclass(frozen=True)
class ProtectOptions:
    """:func:`run_protect`'s keywords: progress, CAP's VGG-19 file, resume, the memory trial (see its docstring)."""

    callback: object = None
    vgg19_path: object = None
    state: ckpt.ResumeOptions = ckpt.ResumeOptions()
    class_cache_dir: object = None
    check_memory: bool | None = None


def _run(bundle, images, config: ProtectConfig, opts: ProtectOptions) -> ProtectResult:
    run = ProtectRun.prepare(bundle, images, config, opts)
    x, start = run.start()
    for k in range(start, config.rounds + 1):
        record = {"round": k, "pgd": []}
        theta = run.surrogate(k, record)       # ASPL: theta' <- FT(theta; X clean), theta kept
        x = run.ascent(x, k, record)           # X' <- PGD ascent(theta'; from X', |X' - X| <= eta)
        run.main(theta, x, k, record)          # ASPL: theta <- FT(theta; X')
        run.end_round(k, record, x)            # report, resume state
        if opts.state.stops_after(k):
            break
    return run.finish(x)


@dataclass
class ProtectRun:
    """What one protect run works with, made once by :meth:`prepare`: the surrogate's trainer (one LoRA, one
    AdamW), the attack target (model, prompt, runtime, CAP's feature network), the 8-bit clean photos and their
    latents, PGD's generator, the report, the resume state and the progress emitter."""

    config: ProtectConfig
    opts: ProtectOptions
    trainer: DreamBoothTrainer
    target: AscentTarget
    x_clean: torch.Tensor            # the 8-bit originals the budget is measured against
    clean_post: object               # their VAE posterior: the surrogate trains on the clean photos every round
    generator: torch.Generator
    report: dict
    state: ckpt.RunState
    emit: Emitter
    t_start: float

    @classmethod
    def prepare(cls, bundle, images, config: ProtectConfig, opts: ProtectOptions) -> "ProtectRun":
        """Everything before round 1; every setup step reports first (the callback may cancel there)."""
        resolution = int(config.resolution or bundle.resolution)
        runtime = Runtime.for_settings(config, bundle.device)
        if config.cap:
            report_setup(opts.callback, "load", "loading CAP's feature network")
        style_net = style_network(bundle, opts.vgg19_path) if config.cap else None
        style_name = (style_net.name if style_net is not None else (FEATURES_VGG if opts.vgg19_path else FEATURES_VAE))
        x_clean = check_images(images, resolution, "images").to(bundle.device)
        x_clean = x_clean.mul(255).round().div(255)        # the 8-bit original the budget is measured against
        t_start = time.perf_counter()
        emit = Emitter(opts.callback, total=config.total_events())
        state = ckpt.RunState()
        if opts.state.directory is not None:
            emit.setup("resume")
            fp = fingerprint(bundle, x_clean, config, style_name, style_net, opts.state.model_source)
            state = ckpt.RunState.open(opts.state, fp)
        ft = FinetuneConfig(instance_prompt=config.instance_prompt, lr=config.lr, seed=config.seed,
                            resolution=resolution, prior_preservation=config.prior_preservation,
                            num_class_images=config.num_class_images, mixed_precision=config.mixed_precision,
                            gradient_checkpointing=config.gradient_checkpointing)
        trainer = DreamBoothTrainer(bundle, LoraSpec(rank=config.rank), ft, class_cache_dir=opts.class_cache_dir,
                                    callback=emit.relay, runtime=runtime)
        emit.setup("encode")
        clean_post = trainer.encode(x_clean)
        target = AscentTarget(bundle, trainer.instance_embeds(), runtime, style_net)
        report = {"method": config.method, "cap": config.cap, "config": config.to_dict(), "resolution": resolution,
                  "n_photos": int(x_clean.shape[0]), **runtime.describe(),
                  "features": style_name if config.cap else None, "rounds": []}
        run = cls(config, opts, trainer, target, x_clean, clean_post, torch.Generator().manual_seed(config.seed + 1),
                  report, state, emit, t_start)
        if opts.check_memory is not False:
            run.check_memory()
        return run

    def check_memory(self) -> None:
        """fit.check_fits with one fine-tune step and one PGD ascent step on ``batch`` photos (the CAP search too)."""
        config, cap = self.config, self.target.style_net is not None
        b = config.batch
        trial = dataclasses.replace(config, rounds=1, pgd_steps=1, cap_start=0.0,
                                    ratio_steps=min(2, config.ratio_steps))
        xs = self.x_clean[:max(b, 2 if cap else 1)]
        check_fits(lambda: self.trainer.trial_step(self.clean_post),
                   lambda: pgd_ascent(self.target, xs, xs, trial, torch.Generator().manual_seed(0), range(1, 2)),
                   self.target.runtime, b, None, self.report["resolution"],
                   pgd_step="a PGD ascent step" + (" with CAP's ratio search" if cap else ""),
                   callback=self.emit.relay)

    def start(self) -> tuple:
        """(X' to start from, first round): the clean photos and round 1 (FSMG: once its fixed surrogate is
        trained on them), or a saved state's X' and the round after it, with everything as it was then."""
        saved, config = self.state.saved, self.config
        x, start = self.x_clean.clone(), 1
        if saved is not None:
            self.trainer.load_state_dict(saved["trainer"])
            x = saved["x"].to(self.x_clean.device)
            self.generator.set_state(saved["generator"])
            self.report["rounds"] = saved["rounds"]
            self.t_start -= saved["elapsed"]
            start = int(saved["round"]) + 1
            self.state.info["resumed_after"] = int(saved["round"])
            self.emit.done = saved["events_done"]
        elif config.method == "fsmg" and config.fixed_surrogate_steps:
            self.trainer.train(self.clean_post, config.fixed_surrogate_steps,
                               callback=lambda ev: self.emit("finetune", loss=ev.loss, message="surrogate (clean)"))
        if self.state.info:
            self.report["resume"] = self.state.info
        return x, start

    def _relay(self, message: str, k: int):
        return lambda ev: self.emit("finetune", k=k, loss=ev.loss, message=message)

    def surrogate(self, k: int, record: dict) -> dict | None:
        """ASPL: theta' <- ``surrogate_steps`` DreamBooth steps on the clean photos; returns theta (LoRA, AdamW) to
        come back to. FSMG (a fixed surrogate): nothing, None."""
        if self.config.method != "aspl":
            return None
        theta = self.trainer.state_dict()
        record["surrogate_clean"] = self.trainer.train(self.clean_post, self.config.surrogate_steps,
                                                       self._relay("surrogate", k))
        return theta

    def ascent(self, x: torch.Tensor, k: int, record: dict) -> torch.Tensor:
        """Round ``k``'s ``pgd_steps`` ascent steps against the surrogate as it is now; after the last round, the
        denoising loss under it (and under the base model) goes into the report."""
        def on_step(step):
            record["pgd"].append(step)
            self.emit("pgd", k=k, t=step["t"], stage="rec", loss=step["loss"], linf=step["linf"],
                      message=f"ratio {step['ratio']:g}" if "ratio" in step else "")

        n = self.config.pgd_steps
        steps = range((k - 1) * n + 1, k * n + 1)                  # global PGD step numbers
        x = pgd_ascent(self.target, self.x_clean, x, self.config, self.generator, steps, on_step)
        if k == self.config.rounds or self.opts.state.stops_after(k):
            self.report["denoising_loss"] = self.measure(x)
        return x

    def main(self, theta: dict | None, x: torch.Tensor, k: int, record: dict) -> None:
        """ASPL: theta (restored) <- ``surrogate_steps`` steps on X'. The trainer's random stream is not rewound,
        so theta does not reuse theta''s draws. FSMG (``theta`` None): nothing."""
        if theta is None:
            return
        theta["generator"] = self.trainer.generator.get_state()
        self.trainer.load_state_dict(theta)
        record["main_protected"] = self.trainer.train(x, self.config.surrogate_steps, self._relay("main", k))

    def end_round(self, k: int, record: dict, x: torch.Tensor) -> None:
        """Round ``k``'s record into the report, then the resume state (not after the last round)."""
        self.report["rounds"].append(record)
        if self.state.kept and k < self.config.rounds:
            self.state.save(round=k, trainer=self.trainer.state_dict(), x=x.cpu(),
                            generator=self.generator.get_state(), rounds=self.report["rounds"],
                            events_done=self.emit.done, elapsed=time.perf_counter() - self.t_start)

    def measure(self, x: torch.Tensor) -> dict:
        """L_rec on fixed draws, clean vs protected: under the surrogate the last PGD attacked and the base model."""
        t, batch = self.target, self.config.batch

        def clean_and_protected() -> dict:
            return {which: denoising_loss(t.bundle, images, t.embeds, batch=batch, precision=t.runtime.precision)
                    for which, images in (("clean", self.x_clean), ("protected", x))}

        out = {"surrogate": clean_and_protected()}
        with lora_disabled(t.bundle):
            out["base"] = clean_and_protected()
        return out

    def finish(self, x: torch.Tensor) -> ProtectResult:
        """The protected set on the 8-bit grid inside the budget, the report's final numbers; the resume state is
        deleted unless ``stop_after`` ended the run early."""
        config, report, x_clean = self.config, self.report, self.x_clean
        clean_u8 = x_clean.mul(255).round().to(torch.uint8)
        q = quantise(x, clean_u8, config.eta)
        protected = q.float().div(255)
        report["linf"] = float((protected - x_clean).abs().max())
        report["linf_8bit"] = int((q.int() - clean_u8.int()).abs().max())
        style_net = self.target.style_net
        if style_net is not None:
            report["style_spread"] = {"clean": measure_style_spread(style_net, x_clean, config.batch),
                                      "protected": measure_style_spread(style_net, protected, config.batch)}
        report["time_s"] = time.perf_counter() - self.t_start
        stop_after = self.opts.state.stop_after
        if not (stop_after is not None and stop_after < config.rounds):
            self.state.clear()
        self.emit("done", advance=0, message="finished")
        return ProtectResult(protected.cpu(), report)
