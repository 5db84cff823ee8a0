"""``python -m iddm_core.demo.model train|measure``: rebuild the demo model from scratch, or measure it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import ASSET_DIR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m iddm_core.demo.model",
                                     description="The demo model: train it from public-domain images, or measure it.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the demo model from scratch (2 CPU cores: about 90 minutes)")
    t.add_argument("--stage", choices=["vae", "unet", "refine", "export", "all"], default="all",
                   help="vae; unet (needs the VAE in --work); refine (second UNet phase); export (joins the parts "
                        "in --work into --out); all = the four in order (default)")
    t.add_argument("--work", default="demo_model_work", help="folder for the parts between stages")
    t.add_argument("--out", default=None, help=f"where the fp16 model is written (default {ASSET_DIR}; required "
                                                  "with --data)")
    t.add_argument("--vae-steps", type=int, default=None,
                   help="steps of each VAE phase (default: those of train.VAE_PHASES)")
    t.add_argument("--unet-steps", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the networks train")
    t.add_argument("--recipe", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: the shipped model's phases and step counts (default); gpu: larger batches and pools, "
                        "step counts only caps (train.GPU_RECIPE; use with --budget-min)")
    t.add_argument("--budget-min", type=float, default=None, metavar="MIN",
                   help="wall-clock minutes for the stages of this call: each phase stops when its share is spent "
                        "(its learning rate decayed to 0 by then) and saves its weights")
    t.add_argument("--data", default=None, metavar="CROPS",
                   help="demo model v2: also train on the face crops of `prepare` (folder with manifest.json)")
    t.add_argument("--test-identities", default=None,
                   help="identities that must not be in --data (default: iddm_core/demo_model/test_identities.txt)")
    t.add_argument("--refine-steps", type=int, default=None, help="steps of each refine phase (default: the recipe's)")
    t.add_argument("--pool", type=int, default=None, help="augmented face crops in the UNet's latent pool")
    t.add_argument("--scenes", type=int, default=None, help="non-face crops in the UNet's latent pool")
    t.add_argument("--vae-faces", type=int, default=None, help="with --data: augmented face crops the VAE's patches "
                                                               "come from (default 2048)")
    t.add_argument("--vae-batch", type=int, default=None, help="VAE batch (default: the recipe's)")
    t.add_argument("--unet-batch", type=int, default=None, help="UNet and refine batch (default: the recipe's)")
    t.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                   help="bf16 autocast on CUDA (auto: where the GPU supports bf16; fp32 weights either way)")
    t.add_argument("--refine-continue", action="store_true",
                   help="with --stage refine: train only the last refine phase (zero terminal SNR, v-prediction) "
                        "with the whole budget, from the newest UNet part in --work (unet_refinedN, else unet), "
                        "and save it as the last phase's part (continues a model already refined)")
    t.add_argument("--refine-lr", type=float, default=None, help="learning rate of the refine phases "
                                                                  "(default: the recipe's)")
    t.add_argument("--resume", action="store_true",
                   help="keep a vae / unet already in --work instead of training it again (refine phases found "
                        "there are always kept)")
    p = sub.add_parser("prepare", help="demo model v2: face-centred crops of a folder-per-identity corpus "
                                       "(DIR/<id>/*.jpg, e.g. the congress portraits), test identities skipped")
    p.add_argument("--faces", required=True, help="corpus folder: one sub-folder of photos per identity")
    p.add_argument("--out", required=True, help="crops folder to write (<id>/<n>.jpg + manifest.json)")
    p.add_argument("--test-identities", default=None,
                   help="file of identities to leave out, one per line (default: the shipped "
                        "iddm_core/demo_model/test_identities.txt)")
    p.add_argument("--size", type=int, default=None, help="stored crop side in px (default 160: 1.25 x the 128 px "
                                                          "face frame, margin for augmentation)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    m = sub.add_parser("measure", help="print what the model can do: VAE round trip, one-step predictions, DreamBooth")
    m.add_argument("--model", default=None, help="model folder holding demo.safetensors (default: the shipped one)")
    m.add_argument("--dreambooth-steps", type=int, default=None)
    m.add_argument("--samples", type=int, default=8)
    m.add_argument("--full-dreambooth", type=int, default=0, metavar="STEPS",
                   help="also fine-tune the whole UNet for STEPS steps on the clean and on the IDDM-protected demo "
                        "photos and compare their samples (400: about 6 minutes on 2 cores)")
    return parser


def cmd_train(args) -> int:
    import json
    import time

    import torch

    from ...errors import InputError, ModelError
    from .architecture import assemble, build_text_encoder
    from .train import (CPU_STAGE_WEIGHTS, GPU_RECIPE, REFINE, VAE_PHASES, Budget, UNetTrainConfig, VAETrainConfig,
                        export, latent_pool, latent_scale, log, train_unet, train_vae)

    started = time.monotonic()
    if args.budget_min is not None and not args.budget_min > 0:
        raise InputError(f"--budget-min must be > 0, got {args.budget_min}")
    for name in ("vae_steps", "unet_steps", "refine_steps", "pool", "scenes", "vae_faces", "vae_batch", "unet_batch"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "scenes" else 1):
            raise InputError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'scenes' else '>= 1'}, "
                             f"got {value}")
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
    gpu = args.recipe == "gpu"
    work = Path(args.work)
    stages = ["vae", "unet", "refine"] if args.stage == "all" else [] if args.stage == "export" else [args.stage]
    data_file = work / "data.json"
    if args.stage in ("export", "all") and args.out is None and (args.data or data_file.is_file()):
        raise InputError("--out: give the folder for a model trained with --data (the default is the shipped "
                         f"demo model's, {ASSET_DIR}, which stays as it is)")
    out = Path(args.out) if args.out else ASSET_DIR
    work.mkdir(parents=True, exist_ok=True)
    corpus = None
    if args.data and stages:
        from .data import Corpus, read_identity_list

        test_ids = read_identity_list(args.test_identities)
        t0 = time.time()
        corpus = Corpus.load(args.data, test_ids)
        log(f"data: {len(corpus.crops)} face crops of {len(set(corpus.identities))} identities and "
            f"{len(corpus.public)} public-domain faces ({time.time() - t0:.1f}s); {len(test_ids)} test identities "
            f"held out")
        from ...atomic import write_text_atomic

        write_text_atomic(data_file, json.dumps({"crops": len(corpus.crops),
                                                 "identities": len(set(corpus.identities)),
                                                 "test_identities": len(test_ids), "recipe": args.recipe}))
    elif stages and data_file.is_file():
        data_file.unlink()                  # these parts are trained on the public-domain sources only
    weights = GPU_RECIPE["stage_weights"] if gpu else CPU_STAGE_WEIGHTS
    budget = Budget(None if args.budget_min is None else args.budget_min * 60 - (time.monotonic() - started),
                    [weights[s] for s in stages])
    log_every = GPU_RECIPE["log_every"] if gpu else 100
    chunk = 256 if device.type == "cuda" else 16
    log(f"train: stages {', '.join(stages) or '-'}{', export' if args.stage in ('export', 'all') else ''}; "
        f"recipe {args.recipe}; device {device}{' (bf16 autocast)' if amp else ''}"
        + (f"; budget {args.budget_min:.2f} min" if args.budget_min else ""))

    def pool_cfg(base: dict, seed: int) -> UNetTrainConfig:
        over = {k: v for k, v in (("pool", args.pool), ("scenes", args.scenes), ("batch", args.unet_batch))
                if v is not None}
        return UNetTrainConfig(**{**base, "seed": seed, **over})

    def skip(stage: str, *folders: Path) -> bool:
        found = [f for f in folders if f.is_dir()]
        if args.resume and found:
            log(f"{stage}: {found[0]} exists, kept (--resume)")
            budget.next()
            return True
        return False

    if "vae" in stages and not skip("vae", work / "vae"):
        from .data import PatchSampler, face_pool

        phases = GPU_RECIPE["vae_phases"] if gpu else VAE_PHASES
        phase_budget = Budget(budget.next(), [p.get("weight", p["steps"]) for p in phases])
        faces = None
        if corpus is not None:
            faces, _ = corpus.face_pool(args.vae_faces or GPU_RECIPE["vae_faces"], 128, seed=args.seed + 1)
        vae = None
        for i, phase in enumerate(phases, start=1):
            steps = {"steps": args.vae_steps} if args.vae_steps else {}
            steps.update({"batch": args.vae_batch} if args.vae_batch else {})
            fields = {k: v for k, v in phase.items() if k != "weight"}
            cfg = VAETrainConfig(**{**fields, "seed": args.seed + phase["seed"], **steps})
            log(f"vae phase {i}/{len(phases)}: {cfg}")
            sampler = None if faces is None else PatchSampler(cfg.patch, seed=cfg.seed, channel_swap=cfg.channel_swap,
                                                              faces=faces, face_share=GPU_RECIPE["vae_face_share"])
            vae = train_vae(cfg, sampler, device=device, vae=vae, seconds=phase_budget.next(), amp=amp,
                            log_every=log_every)
        if faces is not None:                 # the corpus crops the VAE trained on set the latent scale
            scale_faces = faces[:256]
        else:
            scale_faces, _ = face_pool(64, 128, seed=args.seed + 3)
        scale = latent_scale(vae, torch.from_numpy(scale_faces).permute(0, 3, 1, 2).float() / 255)
        vae.register_to_config(scaling_factor=scale)
        vae.to("cpu").save_pretrained(str(work / "vae"))
        log(f"vae saved to {work / 'vae'} (scaling_factor {scale:.4f})")
    if "unet" in stages and not skip("unet", work / "unet", *sorted(work.glob("unet_refined*"))):
        seconds, t0 = budget.next(), time.monotonic()
        vae = _load_vae(work / "vae").to(device)
        text_encoder, tokenizer = build_text_encoder(args.seed)
        cfg = pool_cfg(GPU_RECIPE["unet"] if gpu else {}, args.seed)
        if args.unet_steps:
            cfg.steps = args.unet_steps
        pool = latent_pool(cfg, vae, corpus, chunk)
        seconds = None if seconds is None else max(1.0, seconds - (time.monotonic() - t0))
        unet = train_unet(cfg, vae, text_encoder, tokenizer, pool=pool, seconds=seconds, amp=amp, log_every=log_every)
        unet.to("cpu").save_pretrained(str(work / "unet"))
        log(f"unet saved to {work / 'unet'}")
    if "refine" in stages:
        from diffusers import UNet2DConditionModel

        phases = GPU_RECIPE["refine"] if gpu else REFINE
        first = 1
        if args.refine_continue:              # only the last phase, from the newest part, with the whole budget
            first = len(phases)
        phase_budget = Budget(budget.next(), [p.get("weight", p["steps"]) for p in phases[first - 1:]])
        vae = _load_vae(work / "vae").to(device)
        text_encoder, tokenizer = build_text_encoder(args.seed)
        source, pool = work / "unet", None
        done = max([i for i in range(1, len(phases) + 1) if (work / f"unet_refined{i}").is_dir()], default=0)
        if args.refine_continue:
            source = work / f"unet_refined{done}" if done else source
            if not source.is_dir():
                raise ModelError(f"--refine-continue needs a UNet part in {work} (unet or unet_refinedN)")
            log(f"refine: continuing the last phase from {source} (--refine-continue)")
            done = 0
        for i, phase in enumerate(phases, start=1):
            target = work / f"unet_refined{i}"
            if i < first:
                continue
            if i <= done:                     # a finished phase of an earlier, interrupted run (or one before it)
                log(f"refine phase {i}: {work / f'unet_refined{done}'} exists, kept")
                phase_budget.next()
                source = target
                continue
            unet = UNet2DConditionModel.from_pretrained(str(source), local_files_only=True)
            fields = {k: v for k, v in phase.items() if k != "weight"}
            cfg = pool_cfg(fields, args.seed + phase["seed"])
            if args.refine_steps:
                cfg.steps = args.refine_steps
            if args.refine_lr:
                cfg.lr = args.refine_lr
            if gpu:                           # one pool for all phases (fresh augmentations, not the unet stage's)
                pool = pool or latent_pool(pool_cfg(GPU_RECIPE["unet"], args.seed + 10), vae, corpus, chunk)
            else:                             # the CPU recipe: each phase its own pool, as it was trained
                pool = latent_pool(cfg, vae, corpus, chunk)
            train_unet(cfg, vae, text_encoder, tokenizer, unet=unet, pool=pool, seconds=phase_budget.next(), amp=amp,
                       log_every=log_every).to("cpu").save_pretrained(str(target))
            log(f"refine phase {i} saved to {target}")
            source = target
    if args.stage in ("export", "all"):
        from diffusers import UNet2DConditionModel

        final = work / f"unet_refined{len(REFINE)}"
        if not final.is_dir() or not (work / "vae").is_dir():
            raise ModelError(f"export needs {work / 'vae'} and {final} (the last refine phase): run train "
                             f"--stage vae / unet / refine first")
        vae = _load_vae(work / "vae")
        unet = UNet2DConditionModel.from_pretrained(str(final), local_files_only=True).eval()
        text_encoder, tokenizer = build_text_encoder(args.seed)
        data = json.loads(data_file.read_text(encoding="utf-8")) if data_file.is_file() else None
        path = export(assemble(unet, vae, text_encoder, tokenizer), out, data=data)
        log(f"demo model written: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    log(f"train: done in {time.monotonic() - started:.1f}s")
    return 0


def cmd_prepare(args) -> int:
    from .data import CROP_SIZE, prepare_crops, read_identity_list
    from .train import log

    test_ids = read_identity_list(args.test_identities)
    prepare_crops(args.faces, args.out, test_ids, size=args.size or CROP_SIZE, overwrite=args.overwrite,
                  progress=log)
    return 0


def _load_vae(folder: Path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True).eval()
    vae.requires_grad_(False)
    return vae


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return cmd_train(args)
    if args.command == "prepare":
        return cmd_prepare(args)
    from .measure import cmd_measure

    return cmd_measure(args)


if __name__ == "__main__":
    sys.exit(main())
