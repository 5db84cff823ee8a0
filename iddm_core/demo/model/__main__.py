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
    """Check the options, then run the stages asked for (demo/model/stages.py) in order."""
    import time

    from ...errors import InputError
    from .stages import (TrainRun, check_train_args, export_stage, load_corpus, refine_stage, stage_budget,
                         training_device, unet_stage, vae_stage)
    from .train import log

    started = time.monotonic()
    check_train_args(args)
    device, amp = training_device(args)
    work = Path(args.work)
    stages = ["vae", "unet", "refine"] if args.stage == "all" else [] if args.stage == "export" else [args.stage]
    data_file = work / "data.json"
    if args.stage in ("export", "all") and args.out is None and (args.data or data_file.is_file()):
        raise InputError("--out: give the folder for a model trained with --data (the default is the shipped "
                         f"demo model's, {ASSET_DIR}, which stays as it is)")
    out = Path(args.out) if args.out else ASSET_DIR
    work.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(args, data_file, stages)
    run = TrainRun(args, device, amp, work, corpus, stage_budget(args, stages, started))
    log(f"train: stages {', '.join(stages) or '-'}{', export' if args.stage in ('export', 'all') else ''}; "
        f"recipe {args.recipe}; device {device}{' (bf16 autocast)' if amp else ''}"
        + (f"; budget {args.budget_min:.2f} min" if args.budget_min else ""))
    if "vae" in stages and not run.skip("vae", work / "vae"):
        vae_stage(run)
    if "unet" in stages and not run.skip("unet", work / "unet", *sorted(work.glob("unet_refined*"))):
        unet_stage(run)
    if "refine" in stages:
        refine_stage(run)
    if args.stage in ("export", "all"):
        export_stage(work, out, args.seed)
    log(f"train: done in {time.monotonic() - started:.1f}s")
    return 0


def cmd_prepare(args) -> int:
    from .data import CROP_SIZE, prepare_crops, read_identity_list
    from .train import log

    test_ids = read_identity_list(args.test_identities)
    prepare_crops(args.faces, args.out, test_ids, size=args.size or CROP_SIZE, overwrite=args.overwrite,
                  progress=log)
    return 0


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
