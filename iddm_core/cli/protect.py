"""`protect` command: perturb photos before posting them so that DreamBooth on them fails (ASPL / FSMG, + CAP)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import KIND_CHOICES


def register(sub) -> None:
    p = sub.add_parser("protect", help="protect photos you post: anti-personalisation (Anti-DreamBooth ASPL/FSMG, "
                                       "optionally + CAP)",
                       description="Adds a small perturbation (|delta|_inf <= eta) to each photo that maximises a "
                                   "surrogate DreamBooth model's denoising loss, so that fine-tuning a model on the "
                                   "posted photos learns a damaged concept. Writes PNGs with no metadata. "
                                   "See docs/protect.md.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--photos", required=True, help="folder with the photos to protect (centre square crop)")
    p.add_argument("--out", required=True, help="folder for the protected PNGs")
    p.add_argument("--model", default="demo", help="SD checkpoint (.safetensors), diffusers folder, 'demo' or 'tiny'")
    p.add_argument("--kind", choices=KIND_CHOICES, default=None, help="override model-kind detection")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (for single-file checkpoints)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--names", default="protected_{n:03d}.png",
                   help="output file names, {n} = photo number (1-based; format spec allowed)")
    p.add_argument("--keep-names", action="store_true",
                   help="name each output after its original file (stem + .png) instead of --names")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    a = p.add_argument_group("attack (Anti-DreamBooth defaults)")
    a.add_argument("--method", choices=["aspl", "fsmg"], default="aspl",
                   help="aspl: surrogate re-trained every round; fsmg: surrogate trained once on the clean photos")
    a.add_argument("--eta", type=float, default=0.05, help="L_inf budget, pixels in [0,1]")
    a.add_argument("--alpha", type=float, default=0.005, help="PGD step size")
    a.add_argument("--rounds", type=int, default=50, help="rounds of surrogate training + PGD")
    a.add_argument("--surrogate-steps", type=int, default=3, help="DreamBooth-LoRA steps per round (each model)")
    a.add_argument("--pgd-steps", type=int, default=6, help="PGD steps per round")
    a.add_argument("--fsmg-steps", type=int, default=None,
                   help="fsmg: surrogate steps on the clean photos (default rounds x surrogate-steps)")
    c = p.add_argument_group("CAP (cross-image consistency)")
    c.add_argument("--cap", action="store_true", help="add CAP's style-consistency loss with its ratio search")
    c.add_argument("--ratio-max", type=float, default=1.0,
                   help="R: ratios searched in [0, R]; relative: r = 1 weighs the style gradient like the "
                        "reconstruction gradient")
    c.add_argument("--ratio-steps", type=int, default=5, help="number of ratios tried per step (1 = static ratio R)")
    c.add_argument("--ratio-probe", choices=["fresh", "shared"], default="fresh",
                   help="fresh: each candidate's L_rec on its own noise draw (the paper's Algorithm 1); shared: one "
                        "draw for all candidates (then the plain step, r = 0, nearly always wins)")
    c.add_argument("--cap-start", type=float, default=0.5, help="share of the PGD steps before CAP starts")
    c.add_argument("--vgg19", default=None,
                   help="VGG-19 state dict (torchvision key names, .pth or .safetensors) for the style features; "
                        "default: the model's VAE encoder")
    f = p.add_argument_group("surrogate fine-tuning and memory")
    f.add_argument("--rank", type=int, default=4, help="surrogate LoRA rank")
    f.add_argument("--lr", type=float, default=1e-4, help="surrogate learning rate")
    f.add_argument("--resolution", type=int, default=None, help="size in pixels (default: the model's native)")
    f.add_argument("--seed", type=int, default=0, help="seed of noise and training")
    f.add_argument("--no-prior", action="store_true", help="no prior preservation (no class images)")
    f.add_argument("--num-class-images", type=int, default=8, help="class images generated for prior preservation")
    f.add_argument("--batch", type=int, default=1, help="photos per PGD pass (1 = least memory; same result)")
    f.add_argument("--precision", choices=["auto", "no", "fp16", "bf16"], default="auto", help="mixed precision")
    f.add_argument("--checkpointing", choices=["auto", "yes", "no"], default="auto",
                   help="activation checkpointing (auto: on for CUDA)")
    r = p.add_argument_group("resume")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run for this --out")
    r.add_argument("--fresh", action="store_true", help="discard an interrupted run's state and start over")
    r.add_argument("--state-dir", default=None, help="folder of the resume state (default: a private cache folder)")
    p.set_defaults(func=cmd_protect)


def config_from_args(args):
    from ..protection.protect import ProtectConfig

    return ProtectConfig(method=args.method, eta=args.eta, alpha=args.alpha, rounds=args.rounds,
                         surrogate_steps=args.surrogate_steps, pgd_steps=args.pgd_steps, fsmg_steps=args.fsmg_steps,
                         cap=args.cap, ratio_max=args.ratio_max, ratio_steps=args.ratio_steps,
                         ratio_probe=args.ratio_probe, cap_start=args.cap_start,
                         rank=args.rank, lr=args.lr, resolution=args.resolution, seed=args.seed,
                         prior_preservation=not args.no_prior, num_class_images=args.num_class_images,
                         batch=args.batch, mixed_precision=args.precision,
                         gradient_checkpointing=args.checkpointing).validate()


def cmd_protect(args) -> int:
    import sys

    from ..training import checkpoint as ckpt
    from ..errors import InputError
    from ..diffusion.fit import check_model_fits
    from ..images import list_images
    from ..diffusion.loading import load_model
    from ..diffusion.validation import validate_model
    from ..diffusion.runtime import Runtime
    from ..protection.photo_files import check_outputs, load_photos, output_names, save_all
    from ..protection.protect import run_protect
    from ._common import ConsoleProgress, pick_device

    config = config_from_args(args)                        # parameter errors first
    if args.resume and args.fresh:
        raise InputError("--resume and --fresh contradict each other: choose one")
    if args.vgg19 and not Path(args.vgg19).is_file():
        raise InputError(f"--vgg19: file not found: {args.vgg19}")
    files = list_images(args.photos)                       # a missing/empty folder fails here
    if config.cap and len(files) < 2:
        raise InputError(f"--cap needs at least 2 photos in {args.photos}")
    names = output_names(args.names, len(files), [f.name for f in files] if args.keep_names else None)
    out = Path(args.out)
    paths = check_outputs(out, names, args.overwrite)
    state_dir = Path(args.state_dir) if args.state_dir else ckpt.state_dir_for(out, namespace="protect")
    if ckpt.has_state(state_dir) and not (args.resume or args.fresh):
        raise InputError(f"an interrupted run left its resume state for {out} (in {state_dir}): add --resume to "
                         "continue it, or --fresh to discard it and start over")
    info = validate_model(args.model, kind=args.kind, tokenizer=args.tokenizer)
    resolution = config.resolution or info.resolution
    images, _ = load_photos(args.photos, resolution)
    device = pick_device(args.device)
    runtime = Runtime.for_settings(config, device)                  # what run_protect decides from the same settings
    check_model_fits(info, runtime)
    print(f"protecting {len(files)} photo(s) at {resolution}px: {config.method}"
          + (" + CAP" if config.cap else "") + f", eta {config.eta:g}, alpha {config.alpha:g}, {config.rounds} rounds "
          f"x {config.pgd_steps} PGD steps", file=sys.stderr)
    bundle = load_model(args.model, kind=args.kind, tokenizer=args.tokenizer, device=device,
                        weight_dtypes=runtime.weight_dtypes)
    result = run_protect(bundle, images, config, callback=ConsoleProgress(), vgg19_path=args.vgg19,
                         checkpoint_dir=state_dir, resume=args.resume, model_source=args.model)
    save_all(result.protected, paths, overwrite=args.overwrite)
    r = result.report
    print(f"wrote {len(paths)} protected PNG(s) (no metadata) to {out}")
    print(f"max |delta| after 8-bit rounding: {r['linf_8bit']}/255 (eta {config.eta:g} = {config.eta * 255:.2f}/255)")
    d = r.get("denoising_loss", {})
    for which in ("surrogate", "base"):
        if which in d:
            print(f"denoising loss ({which} model, fixed draws): clean {d[which]['clean']:.4f} -> protected "
                  f"{d[which]['protected']:.4f}")
    if "style_spread" in r:
        s = r["style_spread"]
        print(f"Gram spread ({r['features']} features): clean {s['clean']:.4g} -> protected {s['protected']:.4g}")
    print(f"time: {r['time_s']:.1f}s")
    return 0
