"""``python -m iddm_core.bench protect``: seconds per step and peak memory of photo protection (protect.py).

One ASPL round (surrogate fine-tune steps on the clean photo(s), PGD ascent steps, fine-tune steps on the perturbed
ones) on the full SD 1.5 architecture with random weights (``--model sd15-random``, default) or any model, at
``--resolution``; with ``--cap`` two photos (CAP compares photos) and CAP from the first PGD step. Photos go
through the heavy path one at a time (``batch`` 1). Each configuration runs in its own child process so that its
peak is its own: peak RSS (``ru_maxrss``) on the CPU, under ``fit.cpu_memory_cap`` (an out-of-memory is reported,
not the kernel killing the child), CUDA max allocated on a GPU.
"""
from __future__ import annotations

import contextlib
import json
import time


def register(sub) -> None:
    p = sub.add_parser("protect", help="s/step and peak memory of photo protection (ASPL, +CAP) for one photo")
    p.add_argument("--model", default="sd15-random", help="sd15-random (default), tiny, demo, or a checkpoint path")
    p.add_argument("--resolution", type=int, nargs="+", default=[512], help="pixels (default 512)")
    p.add_argument("--cap", nargs="+", default=["off", "on"], choices=["off", "on"], help="default: off on")
    p.add_argument("--checkpointing", nargs="+", default=["auto"], choices=["auto", "yes", "no"])
    p.add_argument("--steps", type=int, default=2, help="PGD steps timed (default 2); fine-tune steps: 1 + 1")
    p.add_argument("--precision", default="auto", choices=["auto", "no", "fp16", "bf16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--one", default=None, help=argparse_suppress())
    p.set_defaults(func=run)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def measure_one(cfg: dict) -> dict:
    import torch

    from ..cli._common import pick_device
    from ..diffusion.fit import GIB, available_bytes, cpu_memory_cap, is_out_of_memory
    from ..protection.protect import ProtectConfig, run_protect
    from .finetune import peak_rss_mib
    from .pgd import make_bundle

    device = pick_device(cfg["device"])
    bundle = make_bundle(cfg["model"], device)
    res, n = cfg["resolution"], 2 if cfg["cap"] == "on" else 1
    images = torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(0)).mul(255).round().div(255)
    config = ProtectConfig(rounds=1, surrogate_steps=1, pgd_steps=cfg["steps"], cap=cfg["cap"] == "on",
                           cap_start=0.0, ratio_steps=3, resolution=res, prior_preservation=False, batch=1,
                           mixed_precision=cfg["precision"], gradient_checkpointing=cfg["checkpointing"])
    stamps = []

    def on_event(ev):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append((time.perf_counter(), ev.phase))

    base = peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    have = available_bytes("cpu")
    t0 = time.perf_counter()
    try:
        with cpu_memory_cap() if device.type == "cpu" else contextlib.nullcontext():
            result = run_protect(bundle, images, config, callback=on_event, check_memory=False)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        return {**cfg, "error": f"OUT OF MEMORY ({(have or 0) / GIB:.1f} GiB RAM + swap available after loading)"}
    spans = {"finetune": [], "pgd": []}
    last = t0
    for t, phase in stamps:
        if phase in spans:
            spans[phase].append(t - last)
        last = t
    out = {**cfg, "photos": n, "precision_used": result.report["precision"],
           "checkpointing_used": result.report["gradient_checkpointing"],
           "s_per_finetune_step": sum(spans["finetune"]) / max(1, len(spans["finetune"])),
           "s_per_pgd_step": sum(spans["pgd"]) / max(1, len(spans["pgd"])),
           "peak_rss_mib": peak_rss_mib(), "base_rss_mib": base}
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def run_child(cfg: dict) -> dict:
    from .pgd import run_child as run_bench_child

    return run_bench_child(cfg, "protect")


def describe(r: dict) -> str:
    head = f"{r['resolution']:>4}px cap {r['cap']:<3} ckpt {r['checkpointing']:<4}"
    if "error" in r:
        return f"{head}  FAILED {r['error']}"
    mem = f"CUDA peak {r['cuda_peak_mib']:8.0f} MiB" if "cuda_peak_mib" in r else \
        f"peak RSS {r['peak_rss_mib']:8.0f} MiB (model+inputs {r['base_rss_mib']:.0f})"
    return (f"{head}  photos {r['photos']}  fine-tune {r['s_per_finetune_step']:7.2f} s/step  PGD "
            f"{r['s_per_pgd_step']:7.2f} s/step  {mem}  [{r['precision_used']}, checkpointing "
            f"{'on' if r['checkpointing_used'] else 'off'}]")


def run(args) -> int:
    if args.one:
        print("RESULT " + json.dumps(measure_one(json.loads(args.one))), flush=True)
        return 0
    print(f"bench protect: model {args.model}, device {args.device}, {args.steps} PGD step(s), batch 1, "
          "one process per configuration", flush=True)
    results = []
    for res in args.resolution:
        for ck in args.checkpointing:
            for cap in args.cap:
                cfg = {"model": args.model, "resolution": res, "cap": cap, "checkpointing": ck, "steps": args.steps,
                       "precision": args.precision, "device": args.device}
                results.append(run_child(cfg))
                print(describe(results[-1]), flush=True)
    if args.json:
        from ..atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(results, indent=2), overwrite=True)
    return 0
