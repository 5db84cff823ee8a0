"""Algorithm 1 of IDDM: alternate personalisation and two-stage PGD, then write the LoRA.

    Algorithm 1 (the paper)                                 here (_algorithm_1, below)
    split photos X into Xc (reference) and X0 (protection)  refs.PrivateRefs, before the run
    for k in 1..K:
        Θ'_k <- FT(Θ_{k-1}; Xc)                              run.finetune(Xc)       the "temporary model"
        X'   <- PGDTwoStage(Θ'_k; X0)                        run.pgd(from X')       floor(ρT) Stage I (L_rec)
                                                                                    steps, then Stage II (L_id)
        Θ_k  <- FT(Θ'_k; X')                                 run.finetune(X')       continues from Θ'_k
        X0   <- X'                                           (the next PGD starts from X'; its budget stays
                                                             |X' - clean| <= eta: pgd_two_stage's x_init)
                                                             run.end_iteration      report, resume state
    return Θ_K                                               run.finish             the kohya LoRA, the report

One set of LoRA adapters lives in the UNet for the whole run: "temporary" and "main" model are successive
states of it, so nothing is deep-copied or reloaded. Class images are made once; the prompt embeddings PGD
conditions on are made once too, unless the text encoder is trained (``train_text_encoder``): then every PGD call
takes them from the current, LoRA-trained text encoder, so PGD attacks the model that is being trained.
Stage I has floor(rho*T) steps per call, which is 0 for the paper's own rho 0.1, T 8: the run says so
(``schedule_text``, ``report["schedule"]``) instead of failing.

The loop's collaborators: :class:`IDDMRun` (made once: model, trainer, recognisers, photos, the runtime, progress;
its :meth:`~IDDMRun.prepare` also checks the resume state first and runs the memory trial, fit.py), and
iddm_report.py (the report with its timings) and training/checkpoint.py's RunState (the resume state).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..atomic import check_writable, write_text_atomic
from ..diffusion.fit import check_fits, trial_pgd_config
from ..diffusion.runtime import Runtime
from ..errors import InputError
from ..events import Emitter
from ..training import checkpoint as ckpt
from ..training.finetune import DreamBoothTrainer, FinetuneConfig, load_class_folder
from ..training.kohya import save_kohya_lora
from ..training.lora import LoraSpec
from .iddm_report import IDDMReport, final_similarity, nonfinite_counts
from .pgd import PGDConfig, pgd_two_stage

# What each preset fixes; smaller rho = more privacy. "fast" also swaps the paper's gradient for face + sds.
PRESETS = {"privacy": {"rho": 0.1}, "balanced": {"rho": 0.3}, "fidelity": {"rho": 0.5},
           "fast": {"rho": 0.3, "gradient": "fast"}}
PRESET_HELP = "privacy rho 0.1, balanced 0.3, fidelity 0.5, fast rho 0.3 with gradient 'fast' (face window + sds)"


def preset_values(name: str) -> dict:
    """The PGD settings a preset fixes (a copy); InputError naming the preset if it is unknown."""
    if name not in PRESETS:
        raise InputError(f"preset={name!r}: choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


@dataclass
class IDDMConfig:
    K: int = 10                     # outer iterations
    pgd: PGDConfig = field(default_factory=PGDConfig)
    tau: float = 0.03               # softmax temperature of the recogniser ensemble
    surrogates: tuple = ("dlib",)
    ft_steps: int = 40              # DreamBooth-LoRA steps per fine-tune burst (2 bursts per iteration)
    rank: int = 4
    lora_alpha: float | None = None  # default: = rank
    lr: float = 1e-4
    resolution: int | None = None   # default: the model's native resolution
    seed: int = 0
    prior_preservation: bool = True
    num_class_images: int = 8
    train_text_encoder: bool = False
    mixed_precision: str = "auto"   # auto | no | fp16 | bf16 (precision.choose_precision: bf16 only where native)
    gradient_checkpointing: str = "auto"   # auto (on for CUDA) | yes | no; for PGD and fine-tuning
    conv_rank: int = 0              # LoCon (kohya conv_dim): LoRA on the UNet's 3x3 convs too; 0 = off
    conv_alpha: float | None = None  # default: = conv_rank

    def validate(self) -> "IDDMConfig":
        self.pgd.validate()
        if not isinstance(self.K, int) or self.K < 1:
            raise InputError(f"K={self.K!r}: the number of outer iterations must be an integer >= 1 (paper 10)")
        if not self.tau > 0:
            raise InputError(f"tau={self.tau!r} must be > 0 (paper 0.03)")
        if not isinstance(self.ft_steps, int) or self.ft_steps < 1:
            raise InputError(f"ft_steps={self.ft_steps!r} must be an integer >= 1")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise InputError(f"rank={self.rank!r} must be an integer >= 1")
        if not isinstance(self.conv_rank, int) or self.conv_rank < 0:
            raise InputError(f"conv_rank={self.conv_rank!r} must be an integer >= 0 (0 = no conv LoRA)")
        if self.conv_alpha is not None and not (self.conv_rank and self.conv_alpha > 0):
            raise InputError(f"conv_alpha={self.conv_alpha!r} needs conv_rank >= 1 and must be > 0")
        if not self.lr > 0:
            raise InputError(f"lr={self.lr!r} must be > 0")
        if self.resolution is not None and (self.resolution < 32 or self.resolution % 8):
            raise InputError(f"resolution={self.resolution!r} must be a multiple of 8 and at least 32")
        if not self.surrogates:
            raise InputError("surrogates: name at least one face recogniser (e.g. dlib)")
        from ..diffusion.grad_checkpoint import check_setting
        from ..diffusion.precision import MODES

        if self.mixed_precision not in MODES:
            raise InputError(f"mixed_precision={self.mixed_precision!r}: use one of {', '.join(MODES)}")
        check_setting(self.gradient_checkpointing)
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["surrogates"] = [s.split(":", 1)[0] for s in self.surrogates]   # names only: no paths in reports
        return d


@dataclass
class IDDMResult:
    lora_path: Path | None
    report: dict
    protected: torch.Tensor          # the final X' batch, in [0, 1] (kept in memory; written only when asked)


def total_steps(config: IDDMConfig) -> int:
    return config.K * (2 * config.ft_steps + config.pgd.T)


# 17 parameters: the public, scripted signature (nodes, CLI, A1111 tab, batch and users' scripts call it by
# keyword); the run itself gets the keywords as one RunOptions
def run_iddm(bundle, refs, config: IDDMConfig, out_path=None, lora_name: str = "iddm_lora", ensemble=None,
             report_path=None, checkpoint_dir=None, resume: bool = False, overwrite: bool = False,
             callback=None, class_images=None, class_cache_dir=None, stop_after: int | None = None,
             check_memory: bool | None = None, model_source=None, on_mismatch: str = "error") -> IDDMResult:
    """Run IDDM on prepared ``refs`` (refs.PrivateRefs) and write the kohya LoRA to ``out_path``.

    ``callback(Event)`` is called after every step and at every setup step (phase "setup": resume check,
    recognisers, class images per sampler step, trial steps) and may raise to cancel: then no LoRA is written
    (the resume state of the last finished iteration stays in ``checkpoint_dir`` if one was given).
    ``stop_after=k`` ends the run after iteration k without writing a LoRA (tests use it to simulate an
    interruption). ``check_memory`` (default on; False skips it) tries one fine-tune step and one Stage II PGD
    step first (fit.py; on the CPU under an address-space cap, so running out of memory raises instead of the
    process being killed), so settings that cannot fit fail with advice before any training.

    Resume (checkpoint.py): with ``checkpoint_dir`` the state is saved after every iteration and deleted after
    success. ``resume=True`` continues a saved state only if it is the same run (base model — ``model_source``,
    the file or folder ``bundle`` was loaded from, is hashed; without it the loaded weights are —, photos, split,
    class images, settings). A state of another run raises :class:`~.checkpoint.StateMismatch` before any work
    (``on_mismatch="error"``), or is deleted and the run starts over (``"restart"``, the ComfyUI node's choice;
    ``report["resume"]["discarded"]`` says why). ``resume=False`` deletes any old state and starts over.
    """
    config.validate()
    ckpt.check_on_mismatch(on_mismatch)
    if out_path is not None:
        check_writable(out_path, overwrite)      # fail before hours of work, not after
    state = ckpt.ResumeOptions(checkpoint_dir, resume, on_mismatch, model_source, stop_after)
    opts = RunOptions(out_path=out_path, lora_name=lora_name, report_path=report_path, overwrite=overwrite,
                      state=state, callback=callback, ensemble=ensemble, class_images=class_images,
                      class_cache_dir=class_cache_dir, check_memory=check_memory)
    # ComfyUI runs nodes under inference_mode: switch it off and work on clones of the inputs.
    with torch.inference_mode(False), torch.enable_grad():
        return _run(bundle, refs, config, opts)


def schedule_text(config: IDDMConfig) -> str:
    """What a run will do, in one line per fact (printed by the CLI before a run, shown by the node)."""
    return (f"schedule: K={config.K} iterations, each 2 fine-tune bursts of {config.ft_steps} steps and "
            f"{config.pgd.T} PGD steps\n{config.pgd.schedule_text()}")


@dataclass(frozen=True)
class RunOptions:
    """:func:`run_iddm`'s keywords: outputs, resume, progress and the optional inputs (see its docstring)."""

    out_path: object = None
    lora_name: str = "iddm_lora"
    report_path: object = None
    overwrite: bool = False
    state: ckpt.ResumeOptions = ckpt.ResumeOptions()
    callback: object = None
    ensemble: object = None
    class_images: object = None
    class_cache_dir: object = None
    check_memory: bool | None = None


def _run(bundle, refs, config: IDDMConfig, opts: RunOptions) -> IDDMResult:
    run = IDDMRun.prepare(bundle, refs, config, opts)
    x_prot, start_k = run.resume()
    x_prot, finished = _algorithm_1(run, x_prot, start_k)
    return run.finish(x_prot) if finished else run.stopped(x_prot)


def _algorithm_1(run: "IDDMRun", x_prot: torch.Tensor, start_k: int):
    """Iterations ``start_k``..K of Algorithm 1 (module docstring); X' starts at ``x_prot`` (X0, or a resumed X').
    Returns (X', True), or (X', False) when ``stop_after`` ended the run before K."""
    for k in range(start_k, run.config.K + 1):
        record = {"k": k, "pgd": []}
        record["finetune_reference"] = run.finetune(run.ref_posterior, k, "reference")   # Θ'_k = FT(Θ_{k-1}; Xc)
        x_prot = run.pgd(x_prot, k, record)                                              # X' <- PGD(Θ'_k; X0), from X'
        record["finetune_protected"] = run.finetune(x_prot, k, "protected")             # Θ_k = FT(Θ'_k; X')
        run.end_iteration(k, record, x_prot)                                             # report, resume state
        if run.opts.state.stops_after(k):
            return x_prot, False
    return x_prot, True


@dataclass
class IDDMRun:
    """What one run works with, made once by :meth:`prepare`: the model, its trainer (the one LoRA, AdamW, RNG),
    the recognisers with the references set, Xc's latents, X0 and its landmarks, PGD's generator, the runtime,
    the report, the resume state and the progress emitter."""

    bundle: object
    config: IDDMConfig
    opts: RunOptions
    runtime: Runtime
    spec: LoraSpec
    trainer: DreamBoothTrainer
    ensemble: object
    ref_posterior: object            # Xc's VAE posterior: Xc never changes, so it is encoded once per run
    x_clean: torch.Tensor            # X0, the clean protection photos (PGD's budget is measured from them)
    lm_prot: torch.Tensor
    generator: torch.Generator
    report: IDDMReport
    state: ckpt.RunState
    emit: Emitter

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def resolution(self) -> int:
        return int(self.report.data["resolution"])

    @classmethod
    def prepare(cls, bundle, refs, config: IDDMConfig, opts: RunOptions) -> "IDDMRun":
        """Everything before iteration 1. The resume state is checked first (a state of another run is refused
        before any model or image work); every setup step reports first (the callback may cancel there)."""
        device = bundle.unet.device
        runtime = Runtime.for_settings(config, device)
        report = IDDMReport(config, refs, runtime)
        emit = Emitter(opts.callback, total=total_steps(config))
        class_images = opts.class_images
        if config.prior_preservation and class_images is not None and not isinstance(class_images, torch.Tensor):
            class_images = load_class_folder(class_images, refs.resolution)    # loaded once: hashed, then trained on
        state = ckpt.RunState()
        if opts.state.directory is not None:
            emit.setup("resume")
            fp = ckpt.run_fingerprint(bundle, refs, config, class_images if config.prior_preservation else None,
                                      opts.state.model_source)
            state = ckpt.RunState.open(opts.state, fp)
        report.resume_info = dict(state.info)
        ensemble = opts.ensemble
        if ensemble is None:
            emit.setup("recognisers")
            ensemble = build_ensemble(config.surrogates, config.tau, device)
        x_ref, lm_ref = (t.to(device).clone() for t in refs.reference())
        x_clean, lm_prot = (t.to(device).clone() for t in refs.protect())
        ensemble.set_references(x_ref, lm_ref)
        spec = LoraSpec(rank=config.rank, alpha=config.lora_alpha, train_text_encoder=config.train_text_encoder,
                        conv_rank=config.conv_rank, conv_alpha=config.conv_alpha)
        trainer = DreamBoothTrainer(bundle, spec, finetune_config(config, refs.resolution), class_images=class_images,
                                    class_cache_dir=opts.class_cache_dir, callback=emit.relay, runtime=runtime)
        emit.setup("encode")
        run = cls(bundle, config, opts, runtime, spec, trainer, ensemble, trainer.encode(x_ref), x_clean, lm_prot,
                  torch.Generator().manual_seed(config.seed + 1), report, state, emit)
        if opts.check_memory is not False:
            run.check_memory()
        return run

    def check_memory(self) -> None:
        """fit.check_fits: one fine-tune step and one Stage II PGD step on one micro-batch, before any training."""
        b = self.config.pgd.batch
        check_fits(lambda: self.trainer.trial_step(self.ref_posterior),
                   lambda: pgd_two_stage(self.bundle, self.ensemble, self.x_clean[:b], self.lm_prot[:b],
                                         self.trainer.instance_embeds(), trial_pgd_config(self.config.pgd),
                                         torch.Generator().manual_seed(0), runtime=self.runtime),
                   self.runtime, b, self.config.pgd.gradient, self.resolution, callback=self.emit.relay)

    def resume(self) -> tuple:
        """(X' to start from, first iteration): (X0, 1), or a saved state's X' and the iteration after it, with
        the trainer, the generators, the report and the progress count as they were then."""
        saved = self.state.saved
        if saved is None:
            return self.x_clean, 1
        self.trainer.load_state_dict(saved["trainer"])
        x_prot = saved["x_protect"].to(self.device)
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        self.report.restore(saved)
        self.emit.done = saved["k"] * (2 * self.config.ft_steps + self.config.pgd.T)
        return x_prot, saved["k"] + 1

    def finetune(self, images, k: int, which: str) -> list[float]:
        """A DreamBooth-LoRA burst of ``ft_steps`` steps on ``images`` (Xc's latents or X'); its losses."""
        relay = lambda ev: self.emit("finetune", k=k, loss=ev.loss, message=which)  # noqa: E731
        with self.report.timed("finetune", self.device):
            losses = self.trainer.train(images, self.config.ft_steps, callback=relay, k=k)
        return [float(v) for v in losses]

    def pgd(self, x_from: torch.Tensor, k: int, record: dict) -> torch.Tensor:
        """PGDTwoStage on X0 against the model as it is now, starting from ``x_from``; each step goes into
        ``record["pgd"]`` and out as a "pgd" event."""
        def on_step(step):
            step = {"k": k, **step}
            record["pgd"].append(step)
            self.emit("pgd", k=k, t=step["t"], stage=step["stage"], loss=step["loss"],
                      similarity=step["similarity"], linf=step["linf"])

        with self.report.timed("pgd", self.device):
            embeds = self.trainer.instance_embeds()   # c of the model now (the trained text encoder's, if trained)
            return pgd_two_stage(self.bundle, self.ensemble, self.x_clean, self.lm_prot, embeds, self.config.pgd,
                                 self.generator, on_step=on_step, runtime=self.runtime, x_init=x_from)

    def end_iteration(self, k: int, record: dict, x_prot: torch.Tensor) -> None:
        """Iteration ``k``'s record into the report, then the resume state (when the run keeps one)."""
        self.report.iterations.append(record)
        if self.state.kept:
            self.state.save(k=k, trainer=self.trainer.state_dict(), x_protect=x_prot.cpu(),
                            generator=self.generator.get_state(), torch_rng=torch.get_rng_state(),
                            **self.report.saved())

    def stopped(self, x_prot: torch.Tensor) -> IDDMResult:
        """The result of a run ended by ``stop_after``: no LoRA, and the resume state stays."""
        self.report.add_resume_info()
        return IDDMResult(None, self.report.data, x_prot.cpu())

    def finish(self, x_prot: torch.Tensor) -> IDDMResult:
        """Θ_K as a kohya LoRA (with ``out_path``), the report (with ``report_path``); the resume state deleted."""
        report, opts = self.report, self.opts
        report.close_timings()
        report.data["nonfinite"] = nonfinite_counts(report.iterations, self.trainer.skipped_steps)
        report.data["final_similarity"] = final_similarity(self.ensemble, x_prot, self.lm_prot)
        report.add_resume_info()
        lora_path = None
        if opts.out_path is not None:
            self.emit("save", advance=0, message="writing LoRA")
            lora_path = save_kohya_lora(opts.out_path, self.bundle, self.spec, output_name=opts.lora_name,
                                        comment=lora_comment(self.config), overwrite=opts.overwrite,
                                        resolution=self.resolution)
        if opts.report_path is not None:
            write_text_atomic(opts.report_path, json.dumps(report.data, indent=2))
        self.state.clear()
        self.emit("done", advance=0, message="finished")
        return IDDMResult(lora_path, report.data, x_prot.cpu())


def finetune_config(config: IDDMConfig, resolution: int):
    """The DreamBooth settings of every fine-tuning burst of an IDDM run (also used by the no-defense baseline)."""
    return FinetuneConfig(lr=config.lr, seed=config.seed, resolution=resolution,
                          prior_preservation=config.prior_preservation, num_class_images=config.num_class_images,
                          mixed_precision=config.mixed_precision, gradient_checkpointing=config.gradient_checkpointing)


def lora_comment(config: IDDMConfig) -> str:
    """The LoRA's ``ss_training_comment``: the settings and the surrogates' registry names (never a path), so that
    ``evaluate --lora`` can pick judges held out from them."""
    names = "+".join(s.split(":", 1)[0].strip() for s in config.surrogates)
    return (f"IDDM identity-decoupled LoRA: K={config.K} T={config.pgd.T} rho={config.pgd.rho} "
            f"eta={config.pgd.eta} alpha={config.pgd.alpha} tau={config.tau} surrogates={names}")


def surrogates_from_comment(comment: str) -> list[str]:
    """The surrogate names :func:`lora_comment` wrote (empty if the comment has none)."""
    for word in (comment or "").split():
        if word.startswith("surrogates="):
            return [n for n in word[len("surrogates="):].split("+") if n]
    return []


def build_ensemble(surrogates, tau: float, device):
    from ..face.ensemble import FaceEnsembleLoss
    from ..face.registry import load_recognizer, parse_surrogates

    specs = parse_surrogates(",".join(surrogates) if not isinstance(surrogates, str) else surrogates)
    return FaceEnsembleLoss([load_recognizer(s, device) for s in specs], tau=tau).to(device)
