"""``python -m iddm_core.bench waste``: how much of an IDDM run is overhead.

    waste ratio = IDDM wall time / (its fine-tune steps + its PGD steps, each timed in isolation)

Everything the loop adds around the two kinds of step (ensemble setup, reference prototypes, event plumbing,
resume-state writes, report, LoRA export) shows up as a ratio above 1. Class images are made beforehand and
passed in for both measurements (their generation is a one-off per model, cached on disk in real runs).
Both measurements run after a warm-up (imports, first PEFT injection, first recogniser pass). Target: <= 1.10.
"""
from __future__ import annotations

import time


def register(sub) -> None:
    p = sub.add_parser("waste", help="IDDM wall time / isolated fine-tune + PGD step time (target <= 1.10)")
    p.add_argument("--K", type=int, default=1, help="outer iterations (default 1)")
    p.add_argument("--T", type=int, default=4, help="PGD steps (default 4)")
    p.add_argument("--ft-steps", type=int, default=4, help="fine-tune steps per burst (default 4)")
    p.add_argument("--resolution", type=int, default=256, help="SD1.5-sized model resolution (default 256)")
    p.add_argument("--tiny-resolution", type=int, default=128, help="tiny model resolution (default 128)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.add_argument("--skip-full", action="store_true", help="only the tiny model")
    p.add_argument("--state", action="store_true", help="also write the per-iteration resume state")
    p.set_defaults(func=run)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(make_bundle, resolution: int, args, device) -> dict:
    import tempfile

    import torch

    from ..demo.story import demo_photos
    from ..face.detect import get_detector
    from ..training.finetune import DreamBoothTrainer, FinetuneConfig
    from ..protection.iddm import IDDMConfig, build_ensemble, run_iddm
    from ..training.lora import LoraSpec
    from ..protection.pgd import PGDConfig, pgd_two_stage
    from ..protection.refs import refs_from_photos

    refs = refs_from_photos(demo_photos(), resolution, get_detector("dlib"))
    ensemble = build_ensemble(["dlib"], 0.03, device)
    class_images = torch.rand(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    config = IDDMConfig(K=args.K, pgd=PGDConfig(T=args.T, rho=0.3), ft_steps=args.ft_steps, resolution=resolution)

    # 0. warm-up, so neither measurement pays first-call costs (imports, PEFT injection, first recogniser pass)
    from ..diffusion.tiny import build_tiny_bundle

    ensemble.set_references(*(t.to(device) for t in refs.reference()))
    DreamBoothTrainer(build_tiny_bundle(0).to(device), LoraSpec(rank=config.rank),
                      FinetuneConfig(prior_preservation=False)).train(torch.rand(1, 3, 64, 64), 1)

    # 1. the whole IDDM run
    bundle = make_bundle().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        _sync(device)
        t0 = time.perf_counter()
        result = run_iddm(bundle, refs, config, out_path=f"{tmp}/lora.safetensors", ensemble=ensemble,
                          class_images=class_images, checkpoint_dir=f"{tmp}/state" if args.state else None)
        _sync(device)
        wall = time.perf_counter() - t0
    del bundle

    # 2. the same steps in isolation, on a fresh model
    bundle = make_bundle().to(device)
    trainer = DreamBoothTrainer(bundle, LoraSpec(rank=config.rank),
                                FinetuneConfig(resolution=resolution, num_class_images=2), class_images=class_images)
    x_ref, lm_ref = (t.to(device) for t in refs.reference())
    x_prot, lm_prot = (t.to(device) for t in refs.protect())
    ensemble.set_references(x_ref, lm_ref)
    _sync(device)
    t0 = time.perf_counter()
    trainer.train(x_ref, 2 * config.K * config.ft_steps)
    _sync(device)
    ft = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    with torch.enable_grad():
        for _ in range(config.K):
            pgd_two_stage(bundle, ensemble, x_prot, lm_prot, trainer.prompt_embeds[0:1], config.pgd, gen,
                          runtime=trainer.runtime)
    _sync(device)
    pgd = time.perf_counter() - t0
    return {"wall": wall, "finetune": ft, "pgd": pgd, "ratio": wall / (ft + pgd),
            "loop_timings": result.report["timings"]}


def line(name: str, res: int, r: dict) -> str:
    return (f"{name:<14}{res:>5}px  IDDM {r['wall']:8.2f}s  isolated fine-tune {r['finetune']:7.2f}s + "
            f"PGD {r['pgd']:7.2f}s  ->  waste ratio {r['ratio']:.3f}")


def run(args) -> int:
    import torch

    from ..cli._common import pick_device
    from ..diffusion.tiny import build_tiny_bundle
    from .finetune import build_random_sd15

    device = pick_device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, K={args.K} T={args.T} "
          f"ft_steps={args.ft_steps} (x2 bursts)", flush=True)
    print(line("tiny", args.tiny_resolution, measure(lambda: build_tiny_bundle(0), args.tiny_resolution, args, device)),
          flush=True)
    if not args.skip_full:
        print(line("sd1.5-random", args.resolution, measure(build_random_sd15, args.resolution, args, device)))
    return 0
