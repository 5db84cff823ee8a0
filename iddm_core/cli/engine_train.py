"""`finetune` (plain DreamBooth-LoRA, the "no defense" baseline) and `inspect` (check a kohya LoRA file)."""
from __future__ import annotations

import json

from ._common import KIND_CHOICES


def register(sub) -> None:
    p = sub.add_parser(
        "finetune", help="plain DreamBooth-LoRA on your photos (no protection: the baseline IDDM is compared with)",
        description="Train a DreamBooth LoRA on a folder of photos WITHOUT identity protection and save it in "
                    "kohya format. Photos are square-cropped (centre) and resized to the training resolution.")
    p.add_argument("--refs", required=True, help="folder of photos of one person (at least 2 images)")
    p.add_argument("--model", default="tiny",
                   help="base model: SD 1.x/2.x .safetensors checkpoint, diffusers folder, 'demo' (small trained "
                        "model) or 'tiny' (random; default)")
    p.add_argument("--out", required=True, help="output LoRA (.safetensors, kohya format); its stem is the LoRA name")
    p.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank / network dim (default 4)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha; strength scale is alpha/rank (default = rank)")
    p.add_argument("--conv-rank", type=int, default=0,
                   help="LoCon: also put LoRA on the UNet's ResBlock and down/upsampler convolutions with this rank "
                        "(kohya conv_dim; default 0 = off)")
    p.add_argument("--conv-alpha", type=float, default=None, help="LoCon alpha (kohya conv_alpha; default = conv rank)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--resolution", type=int, default=None,
                   help="training size in pixels, multiple of 8 (default: the model's native size)")
    p.add_argument("--seed", type=int, default=0, help="seed for LoRA init, noise, timesteps and class images (default 0)")
    p.add_argument("--instance-prompt", default="a photo of sks person", help="prompt for your photos")
    p.add_argument("--class-prompt", default="a photo of person", help="prompt for the prior-preservation class")
    p.add_argument("--class-images", default=None,
                   help="folder of class images for prior preservation (default: generated once by the base model)")
    p.add_argument("--num-class-images", type=int, default=8, help="class images to generate (default 8)")
    p.add_argument("--class-cache", default=None, help="folder to cache generated class images between runs")
    p.add_argument("--no-prior", action="store_true", help="disable prior preservation (no class images)")
    p.add_argument("--train-text-encoder", action="store_true", help="also train LoRA on the CLIP text encoder")
    p.add_argument("--include-proj", action="store_true", help="also put LoRA on proj_in/proj_out")
    p.add_argument("--include-ff", action="store_true", help="also put LoRA on the transformer feed-forward layers")
    p.add_argument("--save-dtype", choices=["fp16", "fp32", "bf16"], default="fp16",
                   help="dtype of the saved LoRA tensors (default fp16)")
    p.add_argument("--comment", default="", help="ss_training_comment metadata (do not put private names here)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (needed for single-file checkpoints)")
    p.add_argument("--kind", choices=KIND_CHOICES, default=None, help="override model-kind detection")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    p.set_defaults(func=cmd_finetune)

    i = sub.add_parser("inspect", help="summarise a LoRA file and check it is kohya-compatible",
                       description="Print kind, rank, alpha, module counts, metadata and a compatibility verdict.")
    i.add_argument("file", help="LoRA .safetensors file")
    i.add_argument("--json", action="store_true", help="print the full result as JSON")
    i.set_defaults(func=cmd_inspect)


def load_training_photos(folder, resolution: int):
    """Centre square crop + resize of every photo in ``folder`` -> ``[N, 3, R, R]``; fewer than 2 is an error."""
    from ..errors import InputError
    from ..images import load_square_images

    images = load_square_images(folder, resolution)
    if len(images) < 2:
        raise InputError(f"folder {folder} has only {len(images)} image; DreamBooth on one photo just copies it, "
                         f"and IDDM needs photos to split into reference and protected sets: give at least 2")
    return images


def cmd_finetune(args) -> int:
    from pathlib import Path

    from ..atomic import check_writable
    from ..errors import InputError
    from ._common import ConsoleProgress, pick_device

    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise InputError(f"--out {out} must end in .safetensors")
    check_writable(out, args.overwrite)  # before any heavy work
    if args.steps < 1:
        raise InputError(f"--steps must be >= 1 (got {args.steps})")

    import torch

    from ..training.finetune import DreamBoothTrainer, FinetuneConfig
    from ..training.kohya import save_kohya_lora
    from ..training.lora import LoraSpec
    from ..diffusion.fit import check_model_fits
    from ..diffusion.loading import load_model
    from ..diffusion.validation import validate_model
    from ..diffusion.runtime import Runtime

    spec = LoraSpec(rank=args.rank, alpha=args.alpha, include_proj=args.include_proj, include_ff=args.include_ff,
                    train_text_encoder=args.train_text_encoder, conv_rank=args.conv_rank, conv_alpha=args.conv_alpha)
    config = FinetuneConfig(instance_prompt=args.instance_prompt, class_prompt=args.class_prompt,
                            prior_preservation=not args.no_prior, num_class_images=args.num_class_images,
                            lr=args.lr, resolution=args.resolution, seed=args.seed)
    device = pick_device(args.device)
    runtime = Runtime.for_settings(config, device)
    check_model_fits(validate_model(args.model, kind=args.kind, tokenizer=args.tokenizer), runtime)
    bundle = load_model(args.model, kind=args.kind, tokenizer=args.tokenizer, device=device,
                        weight_dtypes=runtime.weight_dtypes)
    images = load_training_photos(args.refs, config.resolution or bundle.resolution)
    progress = ConsoleProgress()
    trainer = DreamBoothTrainer(bundle, spec, config, class_images=args.class_images,
                                class_cache_dir=args.class_cache, runtime=runtime)
    losses = trainer.train(images, args.steps, callback=progress)
    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[args.save_dtype]
    save_kohya_lora(out, bundle, spec, output_name=out.stem, comment=args.comment, overwrite=args.overwrite,
                    dtype=dtype, resolution=config.resolution or bundle.resolution)
    print(f"saved {out} ({len(images)} photos, {args.steps} steps, final loss {losses[-1]:.4f})")
    return 0


def format_report(info: dict) -> str:
    lines = [f"kind: {info['kind']}", f"rank: {info['rank']}  alpha: {info['alpha']}  dtype: {info['dtype']}"
             + (f"  conv rank: {info['conv_rank']}  conv alpha: {info['conv_alpha']}" if info["conv_rank"] else ""),
             f"modules: unet {info['modules']['unet']}, text encoder {info['modules']['te']} "
             f"({info['tensors']} tensors, {info['size_bytes']} bytes)", "metadata:"]
    lines += [f"  {k}: {v}" for k, v in sorted(info["metadata"].items())]
    lines.append("compatible with kohya readers: " + ("yes" if info["compatible"] else "NO"))
    lines += [f"  problem: {p}" for p in info["problems"]]
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    from ..training.kohya_check import inspect_lora

    info = inspect_lora(args.file)
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_report(info))
    return 0 if info["compatible"] else 1


