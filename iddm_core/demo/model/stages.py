"""The stages of ``python -m iddm_core.demo.model train``: the VAE, the UNet, the refine phases and the export.

Each stage is a function over one :class:`TrainRun` (the settings every stage shares: device, precision, work
folder, optional corpus, the wall-clock budget), reads the parts earlier stages left in the work folder and
writes its own there; demo/model/__main__.py checks the options and calls them in order. The training loops
themselves are in demo/model/train.py.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import InputError, ModelError
from .architecture import assemble, build_text_encoder
from .train import (CPU_STAGE_WEIGHTS, GPU_RECIPE, REFINE, VAE_PHASES, Budget, UNetTrainConfig, VAETrainConfig,
                    export, latent_pool, latent_scale, log, train_unet, train_vae)

_COUNT_OPTIONS = ("vae_steps", "unet_steps", "refine_steps", "pool", "scenes", "vae_faces", "vae_batch", "unet_batch")


def check_train_args(args: argparse.Namespace) -> None:
    """Clear errors for numeric options no stage can use, before any work."""
    if args.budget_min is not None and not args.budget_min > 0:
        raise InputError(f"--budget-min must be > 0, got {args.budget_min}")
    for name in _COUNT_OPTIONS:
        value = getattr(args, name)
        if value is not None and value < (0 if name == "scenes" else 1):
            raise InputError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'scenes' else '>= 1'}, "
                             f"got {value}")


def training_device(args: argparse.Namespace) -> tuple[torch.device, bool]:
    """(device, bf16 autocast on) for ``--device``/``--amp``/``--threads``; TF32 and cuDNN autotuning on CUDA."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no CUDA device")
    amp = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    return device, amp


def load_corpus(args: argparse.Namespace, data_file: Path, stages: list[str]):
    """The ``--data`` crops (test identities refused) when a stage trains, noted in ``data_file`` for the export;
    None otherwise (a stale ``data_file`` is removed: these parts are trained on the public-domain sources only)."""
    if not (args.data and stages):
        if stages and data_file.is_file():
            data_file.unlink()
        return None
    from ...atomic import write_text_atomic
    from .data import Corpus, read_identity_list

    test_ids = read_identity_list(args.test_identities)
    t0 = time.time()
    corpus = Corpus.load(args.data, test_ids)
    log(f"data: {len(corpus.crops)} face crops of {len(set(corpus.identities))} identities and "
        f"{len(corpus.public)} public-domain faces ({time.time() - t0:.1f}s); {len(test_ids)} test identities "
        f"held out")
    write_text_atomic(data_file, json.dumps({"crops": len(corpus.crops), "identities": len(set(corpus.identities)),
                                             "test_identities": len(test_ids), "recipe": args.recipe}))
    return corpus


@dataclass
class TrainRun:
    """What every stage of one ``train`` call shares."""

    args: argparse.Namespace
    device: torch.device
    amp: bool
    work: Path
    corpus: object            # data.Corpus of --data, or None
    budget: Budget            # one share per stage of this call

    @property
    def gpu(self) -> bool:
        return self.args.recipe == "gpu"

    @property
    def log_every(self) -> int:
        return GPU_RECIPE["log_every"] if self.gpu else 100

    @property
    def chunk(self) -> int:
        return 256 if self.device.type == "cuda" else 16

    def pool_cfg(self, base: dict, seed: int) -> UNetTrainConfig:
        """A UNet phase's settings: ``base``, then ``--pool``/``--scenes``/``--unet-batch`` where given."""
        over = {k: v for k, v in (("pool", self.args.pool), ("scenes", self.args.scenes),
                                  ("batch", self.args.unet_batch)) if v is not None}
        return UNetTrainConfig(**{**base, "seed": seed, **over})

    def skip(self, stage: str, *folders: Path) -> bool:
        """True (and the stage's share of the budget passed on) when ``--resume`` keeps a part already there."""
        found = [f for f in folders if f.is_dir()]
        if self.args.resume and found:
            log(f"{stage}: {found[0]} exists, kept (--resume)")
            self.budget.next()
            return True
        return False

    def frozen_parts(self):
        """The trained VAE of the work folder (on the device) and the fixed random text encoder + tokenizer."""
        vae = load_vae(self.work / "vae").to(self.device)
        text_encoder, tokenizer = build_text_encoder(self.args.seed)
        return vae, text_encoder, tokenizer


def stage_budget(args: argparse.Namespace, stages: list[str], started: float) -> Budget:
    """The wall-clock budget of this call (``--budget-min`` less what setting up took), shared by the stages in
    the proportions of the recipe."""
    weights = GPU_RECIPE["stage_weights"] if args.recipe == "gpu" else CPU_STAGE_WEIGHTS
    seconds = None if args.budget_min is None else args.budget_min * 60 - (time.monotonic() - started)
    return Budget(seconds, [weights[s] for s in stages])


def vae_stage(run: TrainRun) -> None:
    """The VAE phases on random patches (of the corpus crops too with --data), then the SD-style latent scale."""
    from .data import PatchSampler, face_pool

    args = run.args
    phases = GPU_RECIPE["vae_phases"] if run.gpu else VAE_PHASES
    phase_budget = Budget(run.budget.next(), [p.get("weight", p["steps"]) for p in phases])
    faces = None
    if run.corpus is not None:
        faces, _ = run.corpus.face_pool(args.vae_faces or GPU_RECIPE["vae_faces"], 128, seed=args.seed + 1)
    vae = None
    for i, phase in enumerate(phases, start=1):
        steps = {"steps": args.vae_steps} if args.vae_steps else {}
        steps.update({"batch": args.vae_batch} if args.vae_batch else {})
        fields = {k: v for k, v in phase.items() if k != "weight"}
        cfg = VAETrainConfig(**{**fields, "seed": args.seed + phase["seed"], **steps})
        log(f"vae phase {i}/{len(phases)}: {cfg}")
        sampler = None if faces is None else PatchSampler(cfg.patch, seed=cfg.seed, channel_swap=cfg.channel_swap,
                                                          faces=faces, face_share=GPU_RECIPE["vae_face_share"])
        vae = train_vae(cfg, sampler, device=run.device, vae=vae, seconds=phase_budget.next(), amp=run.amp,
                        log_every=run.log_every)
    if faces is not None:                 # the corpus crops the VAE trained on set the latent scale
        scale_faces = faces[:256]
    else:
        scale_faces, _ = face_pool(64, 128, seed=args.seed + 3)
    scale = latent_scale(vae, torch.from_numpy(scale_faces).permute(0, 3, 1, 2).float() / 255)
    vae.register_to_config(scaling_factor=scale)
    vae.to("cpu").save_pretrained(str(run.work / "vae"))
    log(f"vae saved to {run.work / 'vae'} (scaling_factor {scale:.4f})")


def unet_stage(run: TrainRun) -> None:
    """The first UNet phase, from scratch, on the latent pool of augmented crops."""
    seconds, t0 = run.budget.next(), time.monotonic()
    vae, text_encoder, tokenizer = run.frozen_parts()
    cfg = run.pool_cfg(GPU_RECIPE["unet"] if run.gpu else {}, run.args.seed)
    if run.args.unet_steps:
        cfg.steps = run.args.unet_steps
    pool = latent_pool(cfg, vae, run.corpus, run.chunk)
    seconds = None if seconds is None else max(1.0, seconds - (time.monotonic() - t0))
    unet = train_unet(cfg, vae, text_encoder, tokenizer, pool=pool, seconds=seconds, amp=run.amp,
                      log_every=run.log_every)
    unet.to("cpu").save_pretrained(str(run.work / "unet"))
    log(f"unet saved to {run.work / 'unet'}")


def _refine_start(run: TrainRun, phases) -> tuple[int, Path, int]:
    """(first phase to train, the UNet part it starts from, phases already finished in the work folder)."""
    work = run.work
    done = max([i for i in range(1, len(phases) + 1) if (work / f"unet_refined{i}").is_dir()], default=0)
    if not run.args.refine_continue:
        return 1, work / "unet", done
    source = work / f"unet_refined{done}" if done else work / "unet"     # only the last phase, from the newest part
    if not source.is_dir():
        raise ModelError(f"--refine-continue needs a UNet part in {work} (unet or unet_refinedN)")
    log(f"refine: continuing the last phase from {source} (--refine-continue)")
    return len(phases), source, 0


def refine_stage(run: TrainRun) -> None:
    """The refine phases, each from the previous part (the last: zero terminal SNR with v-prediction); phases an
    interrupted run finished are kept."""
    from diffusers import UNet2DConditionModel

    args = run.args
    phases = GPU_RECIPE["refine"] if run.gpu else REFINE
    first, source, done = _refine_start(run, phases)
    phase_budget = Budget(run.budget.next(), [p.get("weight", p["steps"]) for p in phases[first - 1:]])
    vae, text_encoder, tokenizer = run.frozen_parts()
    pool = None
    for i, phase in enumerate(phases[first - 1:], start=first):
        target = run.work / f"unet_refined{i}"
        if i <= done:                     # a finished phase of an earlier, interrupted run (or one before it)
            log(f"refine phase {i}: {run.work / f'unet_refined{done}'} exists, kept")
            phase_budget.next()
            source = target
            continue
        unet = UNet2DConditionModel.from_pretrained(str(source), local_files_only=True)
        cfg = run.pool_cfg({k: v for k, v in phase.items() if k != "weight"}, args.seed + phase["seed"])
        if args.refine_steps:
            cfg.steps = args.refine_steps
        if args.refine_lr:
            cfg.lr = args.refine_lr
        if run.gpu:                       # one pool for all phases (fresh augmentations, not the unet stage's)
            pool = pool or latent_pool(run.pool_cfg(GPU_RECIPE["unet"], args.seed + 10), vae, run.corpus, run.chunk)
        else:                             # the CPU recipe: each phase its own pool, as it was trained
            pool = latent_pool(cfg, vae, run.corpus, run.chunk)
        train_unet(cfg, vae, text_encoder, tokenizer, unet=unet, pool=pool, seconds=phase_budget.next(),
                   amp=run.amp, log_every=run.log_every).to("cpu").save_pretrained(str(target))
        log(f"refine phase {i} saved to {target}")
        source = target


def export_stage(work: Path, out: Path, seed: int) -> None:
    """Join the VAE and the last refine phase of ``work`` into the fp16 model file in ``out``."""
    from diffusers import UNet2DConditionModel

    final = work / f"unet_refined{len(REFINE)}"
    if not final.is_dir() or not (work / "vae").is_dir():
        raise ModelError(f"export needs {work / 'vae'} and {final} (the last refine phase): run train "
                         f"--stage vae / unet / refine first")
    vae = load_vae(work / "vae")
    unet = UNet2DConditionModel.from_pretrained(str(final), local_files_only=True).eval()
    text_encoder, tokenizer = build_text_encoder(seed)
    data_file = work / "data.json"
    data = json.loads(data_file.read_text(encoding="utf-8")) if data_file.is_file() else None
    path = export(assemble(unet, vae, text_encoder, tokenizer), out, data=data)
    log(f"demo model written: {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def load_vae(folder: Path):
    """A VAE part of the work folder, frozen, in eval mode."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True).eval()
    vae.requires_grad_(False)
    return vae
