"""``python -m iddm_core.demo_model train|measure``: rebuild the demo model from scratch, or measure it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import ASSET_DIR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m iddm_core.demo_model",
                                     description="The demo model: train it from public-domain images, or measure it.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the demo model from scratch (2 CPU cores: about 90 minutes)")
    t.add_argument("--stage", choices=["vae", "unet", "refine", "export", "all"], default="all",
                   help="vae; unet (needs the VAE in --work); refine (second UNet phase); export (joins the parts "
                        "in --work into --out); all = the four in order (default)")
    t.add_argument("--work", default="demo_model_work", help="folder for the parts between stages")
    t.add_argument("--out", default=str(ASSET_DIR), help=f"where the fp16 model is written (default {ASSET_DIR})")
    t.add_argument("--vae-steps", type=int, default=None,
                   help="steps of each VAE phase (default: those of train.VAE_PHASES)")
    t.add_argument("--unet-steps", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the networks train")
    m = sub.add_parser("measure", help="print what the model can do: VAE round trip, one-step predictions, DreamBooth")
    m.add_argument("--model", default=None, help="model folder holding demo.safetensors (default: the shipped one)")
    m.add_argument("--dreambooth-steps", type=int, default=None)
    m.add_argument("--samples", type=int, default=8)
    m.add_argument("--full-dreambooth", type=int, default=0, metavar="STEPS",
                   help="also fine-tune the whole UNet for STEPS steps on the clean and on the IDDM-protected demo "
                        "photos and compare their samples (400: about 6 minutes on 2 cores)")
    return parser


def cmd_train(args) -> int:
    import torch

    from .architecture import assemble, build_text_encoder
    from .train import UNetTrainConfig, VAETrainConfig, export, latent_scale, log, train_unet, train_vae

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.stage in ("vae", "all"):
        from .data import face_pool

        from .train import VAE_PHASES

        vae = None
        for i, phase in enumerate(VAE_PHASES, start=1):
            steps = {"steps": args.vae_steps} if args.vae_steps else {}
            cfg = VAETrainConfig(**{**phase, "seed": args.seed + phase["seed"], **steps})
            log(f"vae phase {i}/{len(VAE_PHASES)}: {cfg}")
            vae = train_vae(cfg, device=args.device, vae=vae)
        faces, _ = face_pool(64, 128, seed=args.seed + 3)
        scale = latent_scale(vae, torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255)
        vae.register_to_config(scaling_factor=scale)
        vae.to("cpu").save_pretrained(str(work / "vae"))
        log(f"vae saved to {work / 'vae'} (scaling_factor {scale:.4f})")
    if args.stage in ("unet", "all"):
        vae = _load_vae(work / "vae").to(args.device)
        text_encoder, tokenizer = build_text_encoder(args.seed)
        cfg = UNetTrainConfig(seed=args.seed, **({"steps": args.unet_steps} if args.unet_steps else {}))
        train_unet(cfg, vae, text_encoder, tokenizer).to("cpu").save_pretrained(str(work / "unet"))
        log(f"unet saved to {work / 'unet'}")
    if args.stage in ("refine", "all"):
        from diffusers import UNet2DConditionModel

        from .train import REFINE

        vae = _load_vae(work / "vae").to(args.device)
        text_encoder, tokenizer = build_text_encoder(args.seed)
        source = work / "unet"
        for i, phase in enumerate(REFINE, start=1):
            target = work / f"unet_refined{i}"
            if target.is_dir():               # a finished phase of an earlier, interrupted run
                source = target
                continue
            unet = UNet2DConditionModel.from_pretrained(str(source), local_files_only=True)
            cfg = UNetTrainConfig(**{**phase, "seed": args.seed + phase["seed"]})
            train_unet(cfg, vae, text_encoder, tokenizer, unet=unet).to("cpu").save_pretrained(str(target))
            log(f"refine phase {i} saved to {target}")
            source = target
    if args.stage in ("export", "all"):
        from diffusers import UNet2DConditionModel

        vae = _load_vae(work / "vae")
        from .train import REFINE

        unet = UNet2DConditionModel.from_pretrained(str(work / f"unet_refined{len(REFINE)}"),
                                                    local_files_only=True).eval()
        text_encoder, tokenizer = build_text_encoder(args.seed)
        path = export(assemble(unet, vae, text_encoder, tokenizer), Path(args.out))
        log(f"demo model written: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
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
    from .measure import cmd_measure

    return cmd_measure(args)


if __name__ == "__main__":
    sys.exit(main())
