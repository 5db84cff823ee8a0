"""``python -m iddm_core.bench finetune``: seconds per DreamBooth-LoRA step and peak memory.

The tiny model (what tests and the demo run), then full-size architectures with random weights (``--arch``:
SD 1.5 from the shipped ``configs/sd1`` JSONs, SDXL base from ``configs/sdxl``), so the cost of a real run can be
estimated without any checkpoint. Random weights cost the same per step as trained ones. Peak RSS is the process
maximum so far (``ru_maxrss``), so it is only a model's own peak when that model is the largest measured yet:
measure one full-size architecture per process (``--arch sdxl``) for its own figure.
"""
from __future__ import annotations

import resource
import sys
import time


def register(sub) -> None:
    p = sub.add_parser("finetune", help="seconds per fine-tune step + peak memory, tiny and SD1.5-sized models")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model (after 1 warm-up step; default 3)")
    p.add_argument("--resolution", type=int, default=256, help="training size for the full-size models (default 256)")
    p.add_argument("--arch", nargs="+", default=["sd15"], choices=sorted(RANDOM_MODELS),
                   help="full-size architectures with random weights (default sd15)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.add_argument("--skip-full", action="store_true", help="only the tiny model")
    p.add_argument("--skip-tiny", action="store_true", help="only the full-size models")
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


def _random_configs(kind: str) -> dict:
    from ..diffusion.reading import shipped_configs

    return {k: {n: v for n, v in c.items() if not n.startswith("_")} for k, c in shipped_configs(kind).items()}


def build_random_sd15():
    """SD 1.5-shaped bundle with random weights (the tiny tokenizer: token ids are valid in CLIP's vocabulary)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..diffusion.bundle import ModelBundle
    from ..diffusion.tiny import build_tiny_tokenizer

    cfg = _random_configs("sd1")
    return ModelBundle(unet=UNet2DConditionModel.from_config(cfg["unet"]), vae=AutoencoderKL.from_config(cfg["vae"]),
                       text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
                       tokenizer=build_tiny_tokenizer(), noise_scheduler=DDPMScheduler.from_config(cfg["scheduler"]),
                       kind="sd1", prediction_type="epsilon", resolution=512, title="random-sd15")


def build_random_sdxl():
    """SDXL-base-shaped bundle with random weights (``configs/sdxl``: 2.6 G UNet parameters, CLIP ViT-L + OpenCLIP
    ViT-bigG text towers); both tokenizers are the tiny one (its ids are valid rows of CLIP's vocabulary; the
    towers' special-token ids are set to the tiny tokenizer's, so pooling finds its end-of-text token)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..diffusion.bundle import ModelBundle
    from ..diffusion.tiny import build_tiny_tokenizer

    cfg = _random_configs("sdxl")
    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_tokenizer()
    tokenizer_2.pad_token = "!"
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return ModelBundle(unet=UNet2DConditionModel.from_config(cfg["unet"]), vae=AutoencoderKL.from_config(cfg["vae"]),
                       text_encoder=CLIPTextModel(CLIPTextConfig(**{**cfg["text_encoder"], **ids})),
                       text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**{**cfg["text_encoder_2"], **ids})),
                       tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                       noise_scheduler=DDPMScheduler.from_config(cfg["scheduler"]), kind="sdxl",
                       prediction_type="epsilon", resolution=1024, title="random-sdxl")


RANDOM_MODELS = {"sd15": ("sd1.5-random", build_random_sd15), "sdxl": ("sdxl-random", build_random_sdxl)}


def time_steps(bundle, resolution: int, steps: int, rank: int, precision: str = "auto",
               checkpointing: str = "auto") -> dict:
    """One warm-up step, then ``steps`` timed steps of plain DreamBooth-LoRA (prior preservation on, batch 1+1)."""
    import torch

    from ..training.finetune import DreamBoothTrainer, FinetuneConfig
    from ..training.lora import LoraSpec

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
              "lora_params": sum(p.numel() for p in trainer.params), "precision": trainer.runtime.precision.name,
              "checkpointing": trainer.runtime.checkpointing}
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
    from ..diffusion.tiny import build_tiny_bundle

    device = pick_device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.steps} timed steps")
    opts = dict(precision=args.precision, checkpointing=args.checkpointing)
    if not args.skip_tiny:
        tiny = build_tiny_bundle(0).to(device)
        print(report("tiny", tiny.resolution, time_steps(tiny, tiny.resolution, args.steps, args.rank, **opts)),
              flush=True)
        del tiny
    if not args.skip_full:
        for arch in args.arch:
            name, build = RANDOM_MODELS[arch]
            t0 = time.perf_counter()
            full = build().to(device)
            print(f"(built {name} in {time.perf_counter() - t0:.1f} s, {parameter_count(full) / 1e9:.2f} G "
                  "parameters)", flush=True)
            print(guarded(name, args.resolution, lambda: time_steps(full, args.resolution, args.steps, args.rank,
                                                                     **opts)), flush=True)
            del full
    return 0


def guarded(name: str, res: int, measure) -> str:
    """``report`` of ``measure()``, or the out-of-memory it ran into: on the CPU under ``fit.cpu_memory_cap`` (an
    exception instead of the kernel killing the benchmark), on CUDA the allocator's own error."""
    import torch

    from ..diffusion.fit import GIB, available_bytes, cpu_memory_cap, is_out_of_memory

    have = available_bytes("cpu")
    try:
        with cpu_memory_cap():
            return report(name, res, measure())
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        avail = f"{have / GIB:.1f} GiB of RAM + swap were available" if have is not None else "no figure"
        return f"{name:<14} {res:>4}px  OUT OF MEMORY ({avail} after loading; peak RSS {peak_rss_mib():.0f} MiB)"


def parameter_count(bundle) -> int:
    return sum(p.numel() for m in (bundle.unet, bundle.vae, bundle.text_encoder, bundle.text_encoder_2)
               if m is not None for p in m.parameters())
