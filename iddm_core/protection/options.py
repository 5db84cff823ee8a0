"""The IDDM algorithm's command-line options, defined once: `iddm train`, `iddm batch` (and every job's settings,
parsed with these very definitions), and the transfer options of `face-attack` and `bench transfer`.

Argparse definitions and the one function that turns parsed options into a validated :class:`~.iddm.IDDMConfig`.
Nothing heavy is imported at module level, so ``--help`` stays instant.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .iddm import IDDMConfig


def add_algorithm_args(p: argparse.ArgumentParser) -> None:
    """The IDDM options of `iddm train` (and of every `iddm batch` job, whose settings are these options)."""
    from ..protection.iddm import PRESET_HELP, PRESETS
    from ..protection.pgd import GRADIENTS

    g = p.add_argument_group("IDDM algorithm (paper defaults)")
    g.add_argument("--K", type=int, default=10, help="outer iterations (default 10)")
    g.add_argument("--T", type=int, default=8, help="PGD steps per iteration (default 8)")
    g.add_argument("--preset", choices=list(PRESETS), help=PRESET_HELP + " (--rho / --gradient override it)")
    g.add_argument("--rho", type=float, default=None,
                   help="share of Stage I (fidelity) PGD steps, in (0,1); default 0.1; smaller = more privacy")
    g.add_argument("--eta", type=float, default=0.08, help="L_inf budget, pixels in [0,1] (default 0.08)")
    g.add_argument("--alpha", type=float, default=0.008, help="PGD step size (default 0.008)")
    g.add_argument("--psnr", type=float, default=None, metavar="DB",
                   help="also keep every protected photo at PSNR >= DB against its clean original (an L2 ball; "
                        "steps become normalised-gradient steps of alpha/eta of its radius); default: L_inf only")
    g.add_argument("--tau", type=float, default=0.03, help="ensemble softmax temperature (default 0.03)")
    g.add_argument("--surrogates", default="dlib",
                   help="comma-separated recognisers: dlib, arcface:PATH.onnx, irse50:PATH, ir152:PATH, "
                        "mobileface_zoo:PATH, facenet:PATH, mobileface:PATH.json, faceres:PATH.json "
                        "(default dlib)")
    from ..face.transfer import TransferOptions

    add_transfer_arguments(p.add_argument_group(
        "Stage II transfer to unseen recognisers (face/transfer.py; off by default in IDDM, face-attack uses "
        "--diversity 1 --samples 4)"), TransferOptions())
    m = p.add_argument_group("speed and memory")
    m.add_argument("--gradient", choices=GRADIENTS, default=None,
                   help="PGD gradient: full (paper, default), sds (no UNet backward), face (Stage II on a window "
                        "around the face), fast (face + sds)")
    m.add_argument("--pgd-batch", type=int, default=1,
                   help="protected photos per PGD forward/backward pass (default 1 = least memory; same result)")
    m.add_argument("--precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                   help="auto: bf16 on GPUs with compute capability >= 8.0, fp16 (loss-scaled, VAE in fp32) on "
                        "older GPUs, fp32 on CPU; no = fp32 everywhere")
    m.add_argument("--checkpointing", choices=["auto", "yes", "no"], default="auto",
                   help="activation checkpointing of UNet and VAE (auto: on for CUDA): less memory, ~30%% slower")
    f = p.add_argument_group("fine-tuning")
    f.add_argument("--ft-steps", type=int, default=40, help="DreamBooth-LoRA steps per burst, 2 bursts per iteration")
    f.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    f.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default = rank)")
    f.add_argument("--conv-rank", type=int, default=0,
                   help="LoCon: also put LoRA on the UNet's ResBlock and down/upsampler convolutions with this rank "
                        "(kohya conv_dim; default 0 = off)")
    f.add_argument("--conv-alpha", type=float, default=None, help="LoCon alpha (kohya conv_alpha; default = conv rank)")
    f.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    f.add_argument("--resolution", type=int, default=None, help="training size in pixels (default: model's native)")
    f.add_argument("--seed", type=int, default=0, help="seed for split, noise and training (default 0)")
    f.add_argument("--class-images", default=None, help="folder of class images for prior preservation "
                                                        "(default: generated once by the base model and cached)")
    f.add_argument("--num-class-images", type=int, default=8, help="class images to generate (default 8)")
    f.add_argument("--no-prior", action="store_true", help="disable prior preservation")
    f.add_argument("--train-text-encoder", action="store_true", help="also train text-encoder LoRA")


def add_transfer_arguments(p, defaults) -> None:
    """--momentum, --diversity, --jitter, --smooth, --samples (face/transfer.py): IDDM, face-attack, bench transfer."""
    p.add_argument("--momentum", type=float, default=defaults.momentum,
                   help=f"MI-FGSM momentum decay, 0 = off (default {defaults.momentum:g})")
    p.add_argument("--diversity", type=float, default=defaults.diversity,
                   help="probability of a random zoom/shift/rotation/mirror of each aligned crop per draw, 0 = off "
                        f"(default {defaults.diversity:g})")
    p.add_argument("--jitter", type=float, default=defaults.jitter,
                   help=f"landmark noise, share of the eye distance, 0 = off (default {defaults.jitter:g})")
    p.add_argument("--smooth", type=float, default=defaults.smooth,
                   help=f"Gaussian blur of the gradient in pixels (TI-FGSM), 0 = off (default {defaults.smooth:g})")
    p.add_argument("--samples", type=int, default=defaults.samples,
                   help=f"random draws per step, losses averaged (default {defaults.samples})")


def transfer_options(args):
    from ..face.transfer import TransferOptions

    return TransferOptions(momentum=args.momentum, diversity=args.diversity, jitter=args.jitter,
                           smooth=args.smooth, samples=args.samples).validate()


def config_from_args(args) -> "IDDMConfig":
    """The validated IDDMConfig of parsed :func:`add_algorithm_args` options (an InputError names a bad one)."""
    from ..protection.iddm import IDDMConfig, preset_values
    from ..protection.pgd import PGDConfig

    fixed = preset_values(args.preset) if args.preset else {}
    rho = args.rho if args.rho is not None else fixed.get("rho", 0.1)
    gradient = args.gradient or fixed.get("gradient", "full")
    pgd = PGDConfig(T=args.T, rho=rho, eta=args.eta, alpha=args.alpha, gradient=gradient, batch=args.pgd_batch,
                    transfer=transfer_options(args), psnr=args.psnr)
    return IDDMConfig(K=args.K, pgd=pgd, tau=args.tau, surrogates=tuple(s.strip() for s in args.surrogates.split(",")
                                                                      if s.strip()),
                      ft_steps=args.ft_steps, rank=args.rank, lora_alpha=args.lora_alpha, lr=args.lr,
                      resolution=args.resolution, seed=args.seed, prior_preservation=not args.no_prior,
                      num_class_images=args.num_class_images, train_text_encoder=args.train_text_encoder,
                      mixed_precision=args.precision, gradient_checkpointing=args.checkpointing,
                      conv_rank=args.conv_rank, conv_alpha=args.conv_alpha).validate()
