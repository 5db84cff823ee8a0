"""``python -m iddm_core.bench pgd``: seconds per PGD step and peak memory, one process per configuration.

Grid: resolution x protected-set size N x gradient mode (full / sds / face / fast) x activation checkpointing,
on the full SD 1.5 architecture with random weights (``--model sd15-random``, default), SDXL base's
(``--model sdxl-random``) or the tiny model. Each
configuration runs in a fresh child process so its peak is its own: peak RSS (``ru_maxrss``) on CPU, CUDA max
allocated on a GPU. The parent prints one line per configuration, then ratios: mode time / full time, peak
memory N=max / N=1, checkpointing on / off.

``--quality`` measures what the faster modes give up, on the trained demo model by default (``--model demo``;
fast, 128 px): the mean fall per Stage II step of the dlib similarity of X' to the reference prototype, per mode
and as a ratio to ``full``, and how far a face-window VAE round trip differs from the full-image one inside the
recognisers' crops. (On ``--model tiny`` the one-step predictions are not faces and the drops say little.)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time

MODES = ("full", "sds", "face", "fast")


def register(sub) -> None:
    p = sub.add_parser("pgd", help="s/step and peak memory of PGD: resolution x N x mode x checkpointing")
    p.add_argument("--model", default="sd15-random", help="sd15-random (default), sdxl-random, tiny, demo, or a checkpoint path")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], help="default 256 512")
    p.add_argument("--n", type=int, nargs="+", default=[1, 4], help="protected-set sizes (default 1 4)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="gradient modes (default all)")
    p.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--steps", type=int, default=1, help="timed Stage II steps per configuration (default 1)")
    p.add_argument("--warmup", type=int, default=0, help="untimed Stage II steps first (default 0)")
    p.add_argument("--pgd-batch", type=int, default=1, help="micro-batch (default 1)")
    p.add_argument("--photo-offset", type=int, default=0,
                   help="which demo photos are protected: photo 1 + (i + offset) mod 3 (default 0; the face's "
                        "size in the crop decides the face window)")
    p.add_argument("--precision", default="auto", choices=["auto", "no", "fp16", "bf16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--quality", action="store_true", help="similarity drop per step and window decode error "
                                                          "per mode on the tiny model (instead of the grid)")
    p.add_argument("--quality-resolution", type=int, default=128)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)   # internal: run one configuration
    p.set_defaults(func=run)


# ---- the child: one configuration ----------------------------------------------------------------------------

def bench_images(resolution: int, n: int, offset: int = 0):
    """N protected images with landmarks: the demo's public-domain photos 1..3 (repeated if N > 3), photo 0 as the
    reference."""
    from ..demo.story import demo_photos
    from ..face.detect import get_detector
    from ..protection.refs import prepare_photos

    images, landmarks, _, _ = prepare_photos(demo_photos(), resolution, get_detector("dlib"))
    idx = [1 + ((i + offset) % (len(images) - 1)) for i in range(n)]
    return images[[0]], landmarks[[0]], images[idx], landmarks[idx]


def make_bundle(model: str, device):
    from ..diffusion.loading import load_model
    from .finetune import RANDOM_MODELS

    for name, build in RANDOM_MODELS.values():
        if model == name.replace("sd1.5", "sd15"):
            return build().to(device)
    return load_model(model, device=device)


def measure_one(cfg: dict) -> dict:
    import torch

    from ..cli._common import pick_device
    from ..training.conditioning import encode_prompts
    from ..diffusion.fit import GIB, available_bytes, cpu_memory_cap, is_out_of_memory
    from ..protection.iddm import build_ensemble
    from ..training.lora import LoraSpec, add_lora
    from ..protection.pgd import PGDConfig, pgd_two_stage
    from ..diffusion.runtime import Runtime
    from .finetune import peak_rss_mib

    device = pick_device(cfg["device"])
    bundle = make_bundle(cfg["model"], device)
    add_lora(bundle, LoraSpec(rank=4), seed=0)               # PGD runs against a LoRA-carrying temporary model
    ensemble = build_ensemble(["dlib"], 0.03, device)
    images = bench_images(cfg["resolution"], cfg["n"], cfg.get("photo_offset", 0))
    x_ref, lm_ref, x0, lm0 = (t.to(device) for t in images)
    ensemble.set_references(x_ref, lm_ref)
    with torch.no_grad():
        embeds = encode_prompts(bundle, ["a photo of sks person"]).detach()
    runtime = Runtime.decide(device, cfg["precision"], "yes" if cfg["checkpointing"] == "on" else "no")
    base_rss = peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    total = cfg["warmup"] + cfg["steps"]
    config = PGDConfig(T=total, rho=0.5 / total, gradient=cfg["mode"], batch=cfg["pgd_batch"])   # Stage II only
    stamps = []

    def on_step(record):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append((time.perf_counter(), record))

    have = available_bytes("cpu")
    t0 = time.perf_counter()
    try:          # on the CPU an out-of-memory is an exception under the cap, not the kernel killing the child
        with cpu_memory_cap() if device.type == "cpu" else contextlib.nullcontext():
            pgd_two_stage(bundle, ensemble, x0, lm0, embeds, config, torch.Generator().manual_seed(0),
                          on_step=on_step, runtime=runtime)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        return {**cfg, "error": f"OUT OF MEMORY ({(have or 0) / GIB:.1f} GiB of RAM + swap were available after loading; "
                                f"peak RSS {peak_rss_mib():.0f} MiB)"}
    times = [b[0] - a for a, b in zip([t0] + [s[0] for s in stamps[:-1]], stamps)]
    timed = times[cfg["warmup"]:]
    out = {**cfg, "s_per_step": sum(timed) / len(timed), "peak_rss_mib": peak_rss_mib(),
           "base_rss_mib": base_rss, "precision_used": runtime.precision.name,
           "nonfinite": sum(s[1]["redone_fp32"] + s[1]["skipped"] for s in stamps)}
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


# ---- the parent: the grid and its ratios ---------------------------------------------------------------------

def run_child(cfg: dict, command: str = "pgd") -> dict:
    """``python -m iddm_core.bench COMMAND --one CFG`` in a fresh process (its peak memory is its own); its RESULT
    line, or the configuration with an ``error``."""
    proc = subprocess.run([sys.executable, "-m", "iddm_core.bench", command, "--one", json.dumps(cfg)],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**cfg, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT "):])


def memory_of(r: dict) -> float:
    return r.get("cuda_peak_mib", r["peak_rss_mib"])


def describe(r: dict) -> str:
    head = f"{r['resolution']:>4}px N={r['n']} {r['mode']:<4} ckpt {r['checkpointing']:<3}"
    if "error" in r:
        return f"{head}  FAILED {r['error']}"
    mem = f"CUDA peak {r['cuda_peak_mib']:8.0f} MiB" if "cuda_peak_mib" in r else \
        f"peak RSS {r['peak_rss_mib']:8.0f} MiB (model+inputs {r['base_rss_mib']:.0f})"
    return f"{head}  {r['s_per_step']:8.2f} s/step  {mem}  [{r['precision_used']}]"


def ratios(results: list[dict]) -> list[str]:
    ok = [r for r in results if "error" not in r]
    key = {(r["resolution"], r["n"], r["mode"], r["checkpointing"]): r for r in ok}
    lines = []
    for (res, n, mode, ck), r in sorted(key.items()):
        full = key.get((res, n, "full", ck))
        if mode != "full" and full:
            lines.append(f"{res}px N={n} ckpt {ck}: {mode}/full time {r['s_per_step'] / full['s_per_step']:.2f}  "
                         f"(speed-up {full['s_per_step'] / r['s_per_step']:.2f}x), memory {memory_of(r) / memory_of(full):.2f}")
    ns = sorted({r["n"] for r in ok})
    if len(ns) > 1:
        for (res, n, mode, ck), r in sorted(key.items()):
            one = key.get((res, ns[0], mode, ck))
            if n == ns[-1] and one:
                lines.append(f"{res}px {mode} ckpt {ck}: peak memory N={n}/N={ns[0]} {memory_of(r) / memory_of(one):.3f}")
    for (res, n, mode, ck), r in sorted(key.items()):
        off = key.get((res, n, mode, "off"))
        if ck == "on" and off:
            lines.append(f"{res}px N={n} {mode}: checkpointing on/off memory {memory_of(r) / memory_of(off):.2f}, "
                         f"time {r['s_per_step'] / off['s_per_step']:.2f}")
    return lines


def run(args) -> int:
    if args.one:
        print("RESULT " + json.dumps(measure_one(json.loads(args.one))), flush=True)
        return 0
    if args.quality:
        return run_quality(args)
    import torch

    print(f"bench pgd: model {args.model}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"{args.steps} timed Stage II step(s) after {args.warmup} warm-up, pgd_batch {args.pgd_batch}, "
          "one process per configuration", flush=True)
    results = []
    for res in args.resolutions:
        for ck in args.checkpointing:
            for mode in args.modes:
                for n in args.n:
                    cfg = {"model": args.model, "resolution": res, "n": n, "mode": mode, "checkpointing": ck,
                           "steps": args.steps, "warmup": args.warmup, "pgd_batch": args.pgd_batch,
                           "precision": args.precision, "device": args.device, "photo_offset": args.photo_offset}
                    results.append(run_child(cfg))
                    print(describe(results[-1]), flush=True)
    print("ratios:")
    for line in ratios(results):
        print("  " + line)
    if args.json:
        from ..atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(results, indent=2), overwrite=True)
    return 0


# ---- quality: what the faster modes give up -------------------------------------------------------------------

def run_quality(args) -> int:
    import torch

    from ..cli._common import pick_device
    from ..training.conditioning import encode_prompts
    from ..training.latents import vae_posterior
    from ..protection.iddm import build_ensemble
    from ..protection.pgd import (PGDConfig, crop_support, cut_windows, decode_latents, face_windows, pgd_two_stage,
                       window_multiple)

    device = pick_device(args.device)
    res = args.quality_resolution
    model = "demo" if args.model == "sd15-random" else args.model     # a model whose x0_hat are faces
    bundle = make_bundle(model, device)
    ensemble = build_ensemble(["dlib"], 0.03, device)
    x_ref, lm_ref, x0, lm0 = (t.to(device) for t in bench_images(res, 3))
    ensemble.set_references(x_ref, lm_ref)
    with torch.no_grad():
        embeds = encode_prompts(bundle, ["a photo of sks person"]).detach()
        before = float(ensemble(x0, lm0)[1]["dlib"].mean())
    print(f"bench pgd --quality: model {model} at {res}px, 3 protected photos, 8 Stage II steps, dlib; "
          f"similarity before {before:.4f}")
    drops = {}
    for mode in args.modes:
        config = PGDConfig(T=8, rho=0.01, gradient=mode)
        t0 = time.perf_counter()
        x = pgd_two_stage(bundle, ensemble, x0, lm0, embeds, config, torch.Generator().manual_seed(0))
        with torch.no_grad():
            after = float(ensemble(x, lm0)[1]["dlib"].mean())
        drops[mode] = (before - after) / config.T
        ratio = f"{drops[mode] / drops['full']:.2f} of full" if "full" in drops and drops["full"] > 0 else "-"
        print(f"  {mode:<4} similarity after {after:.4f}, drop per step {drops[mode]:+.5f} ({ratio}), "
              f"{time.perf_counter() - t0:.1f}s")
    with torch.no_grad():                 # per photo, as PGD does with pgd_batch 1
        support = crop_support(ensemble, lm0, res, res)
        full = decode_latents(bundle, vae_posterior(bundle, x0)[0] * bundle.scaling_factor)
        s_full = ensemble(full, lm0)[1]["dlib"]
        diffs, s_win, sides = [], [], []
        for i in range(x0.shape[0]):
            side, corners = face_windows(support[i:i + 1], PGDConfig().face_margin, window_multiple(bundle))
            win = decode_latents(bundle, vae_posterior(bundle, cut_windows(x0[i:i + 1], side, corners))[0]
                                 * bundle.scaling_factor)
            mask = cut_windows(support[i:i + 1].unsqueeze(1).float(), side, corners)
            diffs.append(float(((win - cut_windows(full[i:i + 1], side, corners)).abs() * mask).amax()))
            offset = torch.tensor([[corners[0][1], corners[0][0]]], dtype=lm0.dtype, device=device)
            s_win.append(float(ensemble(win, lm0[i:i + 1] - offset)[1]["dlib"]))
            sides.append(side)
    print(f"  face windows {sides} px of {res}px: the VAE round trip inside the recognisers' crops differs from the "
          f"full image's by max {max(diffs):.4f}; dlib similarity of the round trip, full "
          f"{float(s_full.mean()):.4f} vs window {sum(s_win) / len(s_win):.4f}")
    if model == "tiny":
        print("  note: the tiny model is random; its one-step predictions are not faces, so these drops say little "
              "about a trained model")
    return 0
