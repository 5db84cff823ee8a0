"""Algorithm 1 of IDDM: alternate personalisation and two-stage PGD, then write the LoRA.

    split photos X into Xc (reference) and X0 (protection)                  -> refs.PrivateRefs
    for k in 1..K:
        Θ'_k <- FT(Θ_{k-1}; Xc)          short DreamBooth-LoRA burst on the references (the "temporary model")
        X'   <- PGDTwoStage(Θ'_k; X0)    Stage I (L_rec) for floor(ρT) steps, then Stage II (L_id)
        Θ_k  <- FT(Θ'_k; X')             IDDM continues from the temporary model
        X0   <- X'                        (the next PGD starts from X'; its budget stays |X' - clean| <= eta)
    write Θ_K as a kohya LoRA

One set of LoRA adapters lives in the UNet for the whole run: "temporary" and "main" model are successive
states of it, so nothing is deep-copied or reloaded. Class images are made once; the prompt embeddings PGD
conditions on are made once too, unless the text encoder is trained (``train_text_encoder``): then every PGD call
takes them from the current, LoRA-trained text encoder, so PGD attacks the model that is being trained.
Stage I has floor(rho*T) steps per call, which is 0 for the paper's own rho 0.1, T 8: the run says so
(``schedule_text``, ``report["schedule"]``) instead of failing. Resume state: checkpoint.py.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..events import Emitter
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


def run_iddm(bundle, refs, config: IDDMConfig, out_path=None, lora_name: str = "iddm_lora", ensemble=None,
             report_path=None, checkpoint_dir=None, resume: bool = False, overwrite: bool = False,
             callback=None, class_images=None, class_cache_dir=None, stop_after: int | None = None,
             check_memory: bool | None = None, model_source=None, on_mismatch: str = "error") -> IDDMResult:
    """Run IDDM on prepared ``refs`` (refs.PrivateRefs) and write the kohya LoRA to ``out_path``.

    ``callback(Event)`` is called after every step and at every setup step (phase "setup": resume check,
    recognisers, class images per sampler step, trial steps) and may raise to cancel: then no LoRA is written
    (the resume state of the last finished iteration stays in ``checkpoint_dir`` if one was given). ``stop_after=k`` ends the
    run after iteration k without writing a LoRA (tests use it to simulate an interruption). ``check_memory``
    (default on; False skips it) tries one fine-tune step and one Stage II PGD step first (fit.py; on the CPU
    under an address-space cap, so running out of memory raises instead of the process being killed), so
    settings that cannot fit fail with advice before any training.

    Resume (checkpoint.py): with ``checkpoint_dir`` the state is saved after every iteration and deleted after
    success. ``resume=True`` continues a saved state only if it is the same run (base model — ``model_source``,
    the file or folder ``bundle`` was loaded from, is hashed; without it the loaded weights are —, photos, split,
    class images, settings). A state of another run raises :class:`~.checkpoint.StateMismatch` before any work
    (``on_mismatch="error"``), or is deleted and the run starts over (``"restart"``, the ComfyUI node's choice;
    ``report["resume"]["discarded"]`` says why). ``resume=False`` deletes any old state and starts over.
    """
    from ..atomic import check_writable
    from ..training.checkpoint import check_on_mismatch

    config.validate()
    check_on_mismatch(on_mismatch)
    if out_path is not None:
        check_writable(out_path, overwrite)      # fail before hours of work, not after
    # ComfyUI runs nodes under inference_mode: switch it off and work on clones of the inputs.
    with torch.inference_mode(False), torch.enable_grad():
        return _run(bundle, refs, config, out_path, lora_name, ensemble, report_path, checkpoint_dir, resume,
                    overwrite, callback, class_images, class_cache_dir, stop_after, check_memory, model_source,
                    on_mismatch)


def schedule_text(config: IDDMConfig) -> str:
    """What a run will do, in one line per fact (printed by the CLI before a run, shown by the node)."""
    return (f"schedule: K={config.K} iterations, each 2 fine-tune bursts of {config.ft_steps} steps and "
            f"{config.pgd.T} PGD steps\n{config.pgd.schedule_text()}")


def _run(bundle, refs, config, out_path, lora_name, ensemble, report_path, checkpoint_dir, resume, overwrite,
         callback, class_images, class_cache_dir, stop_after, check_memory, model_source, on_mismatch) -> IDDMResult:
    from ..training import checkpoint as ckpt
    from ..atomic import write_text_atomic
    from ..training.finetune import DreamBoothTrainer, load_class_folder
    from ..training.lora import LoraSpec, save_kohya_lora

    device = bundle.unet.device
    resolution = refs.resolution
    timings = {"finetune": 0.0, "pgd": 0.0}
    t_start = time.perf_counter()
    emit = Emitter(callback, total=total_steps(config))

    # The resume state is checked first: a state of another run is refused before any model or image work.
    if config.prior_preservation and class_images is not None and not isinstance(class_images, torch.Tensor):
        class_images = load_class_folder(class_images, resolution)    # loaded once: hashed, then trained on
    state, resume_info = None, {}
    if checkpoint_dir is not None:
        emit.setup("resume")                     # every setup step reports first: the callback may cancel there
        fp = ckpt.run_fingerprint(bundle, refs, config, class_images if config.prior_preservation else None,
                                  model_source)
        state, resume_info = ckpt.open_state(checkpoint_dir, resume, fp, on_mismatch)

    if ensemble is None:
        emit.setup("recognisers")
        ensemble = build_ensemble(config.surrogates, config.tau, device)
    x_ref, lm_ref = (t.to(device).clone() for t in refs.reference())
    x_clean, lm_prot = (t.to(device).clone() for t in refs.protect())
    x_prot = x_clean
    ensemble.set_references(x_ref, lm_ref)

    spec = LoraSpec(rank=config.rank, alpha=config.lora_alpha, train_text_encoder=config.train_text_encoder)
    trainer = DreamBoothTrainer(bundle, spec, finetune_config(config, resolution), class_images=class_images,
                                class_cache_dir=class_cache_dir, callback=emit.relay)
    emit.setup("encode")
    ref_posterior = trainer.encode(x_ref)        # Xc never changes: its latents are encoded once per run
    generator = torch.Generator().manual_seed(config.seed + 1)
    if check_memory is not False:
        from ..diffusion.fit import check_fits, trial_pgd_config

        b = config.pgd.batch
        check_fits(lambda: trainer.trial_step(ref_posterior),
                   lambda: pgd_two_stage(bundle, ensemble, x_clean[:b], lm_prot[:b], trainer.instance_embeds(),
                                         trial_pgd_config(config.pgd), torch.Generator().manual_seed(0),
                                         precision=trainer.precision, checkpointing=trainer.checkpointing),
                   b, config.pgd.gradient, trainer.precision.name, trainer.checkpointing, resolution, device,
                   callback=emit.relay)

    report = {"config": config.to_dict(), "schedule": config.pgd.schedule(), "resolution": resolution,
              "precision": trainer.precision.name, "gradient_checkpointing": trainer.checkpointing,
              "n_reference": len(refs.split.reference), "n_protect": len(refs.split.protect), "iterations": []}
    start_k = 1
    if state is not None:
        resume_info = {"resumed_after": int(state["k"])}
        trainer.load_state_dict(state["trainer"])
        x_prot = state["x_protect"].to(device)
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        report["iterations"] = state["iterations"]
        timings = state["timings"]
        t_start -= state["elapsed"]                # the report's total covers the interrupted part too
        start_k = state["k"] + 1
        emit.done = (start_k - 1) * (2 * config.ft_steps + config.pgd.T)

    def finetune(images, k, which):
        t0 = time.perf_counter()
        relay = lambda ev: emit("finetune", k=k, loss=ev.loss, message=which)  # noqa: E731
        losses = trainer.train(images, config.ft_steps, callback=relay, k=k)
        timings["finetune"] += _elapsed(t0, device)
        return [float(v) for v in losses]

    for k in range(start_k, config.K + 1):
        record = {"k": k, "pgd": []}
        record["finetune_reference"] = finetune(ref_posterior, k, "reference")  # Θ'_k = FT(Θ_{k-1}; Xc)

        def on_pgd_step(step, k=k, record=record):
            step = {"k": k, **step}
            record["pgd"].append(step)
            emit("pgd", k=k, t=step["t"], stage=step["stage"], loss=step["loss"],
                 similarity=step["similarity"], linf=step["linf"])

        t0 = time.perf_counter()
        embeds = trainer.instance_embeds()       # c of the model now: the trained text encoder's when it is trained
        x_prot = pgd_two_stage(bundle, ensemble, x_clean, lm_prot, embeds, config.pgd, generator,   # X' <- PGD(Θ'_k; X0)
                               on_step=on_pgd_step, precision=trainer.precision, checkpointing=trainer.checkpointing,
                               x_init=x_prot)
        timings["pgd"] += _elapsed(t0, device)
        record["finetune_protected"] = finetune(x_prot, k, "protected")         # Θ_k = FT(Θ'_k; X')
        report["iterations"].append(record)
        if checkpoint_dir is not None:
            ckpt.save_state(checkpoint_dir, {
                "fingerprint": fp, "k": k, "trainer": trainer.state_dict(), "x_protect": x_prot.cpu(),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                "iterations": report["iterations"], "timings": timings, "elapsed": time.perf_counter() - t_start})
        if stop_after is not None and k >= stop_after:
            if resume_info:
                report["resume"] = resume_info
            return IDDMResult(None, report, x_prot.cpu())

    total = time.perf_counter() - t_start
    report["timings"] = {**timings, "other": max(0.0, total - timings["finetune"] - timings["pgd"]), "total": total}
    report["nonfinite"] = nonfinite_counts(report["iterations"], trainer.skipped_steps)
    report["final_similarity"] = _final_similarity(ensemble, x_prot, lm_prot)
    if resume_info:
        report["resume"] = resume_info
    lora_path = None
    if out_path is not None:
        emit("save", advance=0, message="writing LoRA")
        lora_path = save_kohya_lora(out_path, bundle, spec, output_name=lora_name, comment=lora_comment(config),
                                    overwrite=overwrite, resolution=resolution)
    if report_path is not None:
        import json

        write_text_atomic(report_path, json.dumps(report, indent=2))
    if checkpoint_dir is not None:
        ckpt.clear_state(checkpoint_dir)
    emit("done", advance=0, message="finished")
    return IDDMResult(lora_path, report, x_prot.cpu())


def finetune_config(config: IDDMConfig, resolution: int):
    """The DreamBooth settings of every fine-tuning burst of an IDDM run (also used by the no-defense baseline)."""
    from ..training.finetune import FinetuneConfig

    return FinetuneConfig(lr=config.lr, seed=config.seed, resolution=resolution,
                          prior_preservation=config.prior_preservation, num_class_images=config.num_class_images,
                          mixed_precision=config.mixed_precision, gradient_checkpointing=config.gradient_checkpointing)


def nonfinite_counts(iterations: list, finetune_skipped: int) -> dict:
    """How often low precision failed: PGD micro-batches redone in fp32 or skipped, fine-tune steps skipped.
    (``finetune_skipped`` counts this process only: a resumed run does not know the interrupted part's.)"""
    steps = [s for it in iterations for s in it["pgd"]]
    return {"pgd_redone_fp32": sum(s.get("redone_fp32", 0) for s in steps),
            "pgd_skipped": sum(s.get("skipped", 0) for s in steps), "finetune_skipped": int(finetune_skipped)}


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


@torch.no_grad()
def _final_similarity(ensemble, x, landmarks) -> dict:
    _, sims = ensemble(x, landmarks)
    return {name: float(s.mean()) for name, s in sims.items()}


def _elapsed(t0: float, device) -> float:
    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
