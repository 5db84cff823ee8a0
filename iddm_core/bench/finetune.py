"""``python -m iddm_core.bench finetune``: seconds per DreamBooth-LoRA step and peak memory.

Two models: the tiny one (what tests and the demo run) and the full SD 1.5 architecture with random weights
(the shipped ``configs/sd1`` JSONs), so the cost of a real run can be estimated without any checkpoint. Random
weights cost the same per step as trained ones. Peak RSS is the process maximum so far (``ru_maxrss``): the tiny
model is measured first, so the SD 1.5 figure is that model's own peak.
"""
from __future__ import annotations

import resource
import sys
import time


def register(sub) -> None:
    p = sub.add_parser("finetune", help="seconds per fine-tune step + peak memory, tiny and SD1.5-sized models")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model (after 1 warm-up step; default 3)")
    p.add_argument("--resolution", type=int, default=256, help="training size for the SD1.5-sized model (default 256)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.add_argument("--skip-full", action="store_true", help="only the tiny model")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                   help="mixed precision (default auto: bf16 on compute capability >= 8.0, fp16 below, fp32 on CPU)")
    p.add_argument("--checkpointing", default="auto", choices=["auto", "yes", "no"],
                   help="activation checkpointing (default auto: on for CUDA)")
    p.set_defaults(func=run)


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def build_random_sd15():
    """SD 1.5-shaped bundle with random weights (the tiny tokenizer: token ids are valid in CLIP's vocabulary)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models import ModelBundle, shipped_configs
    from ..tiny import build_tiny_tokenizer

    cfg = {k: {n: v for n, v in c.items() if not n.startswith("_")} for k, c in shipped_configs("sd1").items()}
    return ModelBundle(unet=UNet2DConditionModel.from_config(cfg["unet"]), vae=AutoencoderKL.from_config(cfg["vae"]),
                       text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
                       tokenizer=build_tiny_tokenizer(), noise_scheduler=DDPMScheduler.from_config(cfg["scheduler"]),
                       kind="sd1", prediction_type="epsilon", resolution=512, title="random-sd15")


def time_steps(bundle, resolution: int, steps: int, rank: int, precision: str = "auto",
               checkpointing: str = "auto") -> dict:
    """One warm-up step, then ``steps`` timed steps of plain DreamBooth-LoRA (prior preservation on, batch 1+1)."""
    import torch

    from ..finetune import DreamBoothTrainer, FinetuneConfig
    from ..lora import LoraSpec

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, resolution, resolution, generator=gen)
    class_images = torch.rand(2, 3, resolution, resolution, generator=gen)
    trainer = DreamBoothTrainer(bundle, LoraSpec(rank=rank),
                                FinetuneConfig(resolution=resolution, mixed_precision=precision,
                                               gradient_checkpointing=checkpointing), class_images=class_images)
    if bundle.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train(images, 1)
    if bundle.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train(images, steps)
    if bundle.device.type == "cuda":
        torch.cuda.synchronize()
    result = {"s_per_step": (time.perf_counter() - start) / steps, "peak_rss_mib": peak_rss_mib(),
              "lora_params": sum(p.numel() for p in trainer.params), "precision": trainer.precision.name,
              "checkpointing": trainer.checkpointing}
    if bundle.device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def report(name: str, res: int, r: dict) -> str:
    line = (f"{name:<14} {res:>4}px  {r['s_per_step']:8.3f} s/step  peak RSS {r['peak_rss_mib']:8.0f} MiB  "
            f"LoRA params {r['lora_params']:,}  [{r['precision']}, checkpointing {'on' if r['checkpointing'] else 'off'}]")
    if "cuda_peak_mib" in r:
        line += f"  CUDA peak {r['cuda_peak_mib']:.0f} MiB"
    return line


def run(args) -> int:
    import torch

    from ..cli._common import pick_device
    from ..tiny import build_tiny_bundle

    device = pick_device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.steps} timed steps")
    tiny = build_tiny_bundle(0).to(device)
    opts = dict(precision=args.precision, checkpointing=args.checkpointing)
    print(report("tiny", tiny.resolution, time_steps(tiny, tiny.resolution, args.steps, args.rank, **opts)), flush=True)
    del tiny
    if not args.skip_full:
        t0 = time.perf_counter()
        full = build_random_sd15().to(device)
        print(f"(built random SD1.5 in {time.perf_counter() - t0:.1f} s)", flush=True)
        print(report("sd1.5-random", args.resolution, time_steps(full, args.resolution, args.steps, args.rank, **opts)))
    return 0
