"""`python -m iddm_core.bench paper`: the IDDM paper's comparison table on your photos.

Runs plain DreamBooth-LoRA (no defense), the anti-personalisation baselines "Anti-DB (ASPL)" and "Anti-DB + CAP"
(protect.py perturbs the photos, then the same no-defense DreamBooth-LoRA trains on the perturbed photos) and IDDM
at rho in {0.1, 0.3, 0.5} from the same base model, seed and fine-tuning budget (the baselines train as many steps as
IDDM's fine-tune bursts do), then generates the same prompts with the same seed from each and evaluates them with
held-out recognisers:

    | method | FSR | ISM <rec> ... | BRISQUE | PSNR X' | time (s) | peak MB |

Defaults are small (``--tiny-settings`` makes them smaller still, for CI) and the default model is the embedded
demo model (``--model demo``, 128 px, trained on faces, so samples are faces and FSR means something); its
numbers show the mechanism on a toy. Use ``--model`` with a real SD 1.x/2.x/XL checkpoint and the paper's settings
(``--K 10 --T 8 --ft-steps 40 --n 8 --steps 50``) for meaningful ones.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

METHOD_BASELINE = "DreamBooth (no defense)"
ANTI_DB = {"aspl": "Anti-DB (ASPL)", "aspl+cap": "Anti-DB + CAP"}


def register(sub) -> None:
    from ..cli.evaluate import add_generation_args

    p = sub.add_parser("paper", help="no-defense DreamBooth vs IDDM at rho 0.1/0.3/0.5: FSR, ISM, BRISQUE, time",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--refs", help="folder with the user's photos (at least 3 with a face)")
    who.add_argument("--faces", metavar="CORPUS",
                     help="a folder-per-identity corpus (e.g. ../shared/faces/congress): run every method per "
                          "identity (its photos + mirror images) and print mean +- sd over identities, with R1/R5 "
                          "against a gallery of every other corpus identity (bench/paper_corpus.py)")
    p.add_argument("--identities", default=None,
                   help="with --faces: 'test' (default: the demo model's held-out test identities), 'all', or ids")
    p.add_argument("--max-identities", type=int, default=None, help="with --faces: at most this many identities")
    p.add_argument("--rhos", default="0.1,0.3,0.5", help="IDDM rho values (default 0.1,0.3,0.5)")
    p.add_argument("--K", type=int, default=2, help="IDDM outer iterations (default 2; paper 10)")
    p.add_argument("--T", type=int, default=4, help="PGD steps per iteration (default 4; paper 8)")
    p.add_argument("--ft-steps", type=int, default=5, help="fine-tune steps per burst (default 5; paper 40)")
    p.add_argument("--conv-rank", type=int, default=0,
                   help="LoCon for the no-defense and IDDM LoRAs: conv LoRA of this rank on the ResBlocks too "
                        "(default 0: attention only)")
    p.add_argument("--train-resolution", type=int, default=None, help="training size (default: model's native)")
    p.add_argument("--num-class-images", type=int, default=2, help="prior-preservation class images (default 2)")
    p.add_argument("--no-prior", action="store_true", help="disable prior preservation (no class images)")
    p.add_argument("--tiny-settings", action="store_true",
                   help="CI smoke settings: K=1, T=2, 1 fine-tune step per burst, no prior preservation, "
                        "1 image per prompt, 10 sampling steps, 2 prompts")
    p.add_argument("--anti-db", default="aspl,aspl+cap",
                   help="anti-personalisation baseline rows: aspl, aspl+cap, or none (default both)")
    p.add_argument("--protect-rounds", type=int, default=2, help="Anti-DB rounds (default 2; Anti-DreamBooth 50)")
    p.add_argument("--protect-pgd-steps", type=int, default=4, help="Anti-DB PGD steps per round (default 4; 6)")
    p.add_argument("--protect-surrogate-steps", type=int, default=2,
                   help="Anti-DB surrogate steps per round (default 2; Anti-DreamBooth 3)")
    p.add_argument("--out-json", default=None, help="also write all results as JSON")
    add_generation_args(p)
    p.set_defaults(func=cmd_paper, n=2, steps=10, model="demo")


def apply_tiny_settings(args) -> None:
    args.K, args.T, args.ft_steps, args.no_prior = 1, 2, 1, True
    args.protect_rounds, args.protect_pgd_steps, args.protect_surrogate_steps = 1, 2, 1
    args.n, args.steps, args.prompts = 1, 10, args.prompts[:2]


def parse_rhos(text: str) -> list[float]:
    from ..errors import InputError

    try:
        rhos = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--rhos={text!r}: expected comma-separated numbers such as 0.1,0.3,0.5") from None
    if not rhos or not all(0 < r < 1 for r in rhos):
        raise InputError(f"--rhos={text!r}: every rho must be in (0, 1)")
    return rhos


class PeakMemory:
    """Peak memory of one method: CUDA's allocator peak on a GPU; on CPU the process's peak resident set (a
    high-water mark over the whole process, so later rows can only grow; reported for orientation)."""

    def __init__(self, device):
        self.cuda = getattr(device, "type", "cpu") == "cuda"
        self.device = device

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        return False

    def megabytes(self) -> float:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10


def parse_anti_db(text: str) -> list[str]:
    from ..errors import InputError

    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if n not in ANTI_DB]
    if bad:
        raise InputError(f"--anti-db={text!r}: use aspl, aspl+cap (comma-separated) or none")
    return names


def protect_photos(args, refs, config, cap: bool, device):
    """Anti-DB: the photos perturbed by ASPL (+ CAP) against a fresh copy of the base model (its surrogate LoRA is
    dropped with it); returns the protected images at the training resolution."""
    from ..diffusion.loading import load_model
    from ..protection.protect import ProtectConfig, run_protect

    surrogate = load_model(args.model, kind=args.kind, tokenizer=args.tokenizer, device=device)
    pc = ProtectConfig(method="aspl", cap=cap, rounds=args.protect_rounds, pgd_steps=args.protect_pgd_steps,
                       surrogate_steps=args.protect_surrogate_steps, resolution=refs.resolution, seed=config.seed,
                       prior_preservation=config.prior_preservation, num_class_images=config.num_class_images,
                       lr=config.lr, rank=config.rank)
    result = run_protect(surrogate, refs.images, pc, check_memory=False)
    del surrogate
    return result.protected


def train_baseline(bundle, refs, args, config) -> None:
    """No defense: DreamBooth-LoRA on all clean photos, with IDDM's total fine-tuning step budget."""
    from ..training.finetune import DreamBoothTrainer, FinetuneConfig
    from ..training.lora import LoraSpec

    spec = LoraSpec(rank=config.rank, alpha=config.lora_alpha, conv_rank=config.conv_rank,
                    conv_alpha=config.conv_alpha)
    ft = FinetuneConfig(lr=config.lr, seed=config.seed, resolution=refs.resolution,
                        prior_preservation=config.prior_preservation, num_class_images=config.num_class_images)
    trainer = DreamBoothTrainer(bundle, spec, ft)
    trainer.train(refs.images.to(bundle.device), 2 * config.K * config.ft_steps)


def iddm_config(args, rho: float):
    from ..protection.iddm import IDDMConfig
    from ..protection.pgd import PGDConfig

    return IDDMConfig(K=args.K, pgd=PGDConfig(T=args.T, rho=rho), ft_steps=args.ft_steps,
                      resolution=args.train_resolution, num_class_images=args.num_class_images,
                      prior_preservation=not args.no_prior, conv_rank=args.conv_rank,
                      surrogates=tuple(s for s in args.surrogates.split(",") if s.strip()) or ("dlib",),
                      seed=args.seed).validate()


def run_method(name: str, args, clean, detector, rho: float | None, refs_cache: dict, anti_db: str | None = None) -> dict:
    """Train one method from a fresh base model, then generate + evaluate. Returns the evaluation + timings.
    ``refs_cache`` keeps the prepared photos per resolution (detected once, shared by every method). ``anti_db``
    ("aspl" | "aspl+cap"): the photos are protected first, then the no-defense DreamBooth trains on them (the
    time column counts both)."""
    import dataclasses

    import torch

    from ..cli._common import pick_device
    from ..cli.evaluate import evaluate_bundle
    from ..evaluation.metrics import fidelity_report
    from ..protection.iddm import run_iddm
    from ..diffusion.loading import load_model
    from ..protection.refs import load_private_refs

    device = pick_device(args.device)
    bundle = load_model(args.model, kind=args.kind, tokenizer=args.tokenizer, device=device)
    config = iddm_config(args, rho if rho is not None else 0.1)
    resolution = config.resolution or bundle.resolution
    if resolution not in refs_cache:
        refs_cache[resolution] = load_private_refs(args.refs, resolution, detector, seed=config.seed)
    refs = refs_cache[resolution]
    torch.manual_seed(config.seed)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        fidelity = None
        if anti_db is not None:
            protected = protect_photos(args, refs, config, anti_db == "aspl+cap", device)
            fidelity = fidelity_report(protected, refs.images)
            train_baseline(bundle, dataclasses.replace(refs, images=protected), args, config)
        elif rho is None:
            train_baseline(bundle, refs, args, config)
        else:
            result = run_iddm(bundle, refs, config)
            fidelity = fidelity_report(result.protected, refs.protect()[0])
        train_time = time.perf_counter() - t0
        evaluation, _ = evaluate_bundle(bundle, clean, args)
    row = {"method": name, "rho": rho, "time_s": train_time, "peak_mb": mem.megabytes(), **evaluation}
    if fidelity is not None:
        row["fidelity"] = fidelity
    return row


def format_table(rows: list[dict]) -> str:
    """The paper's layout: one row per method, one ISM column per evaluation recogniser."""
    def fmt(v, spec=".3f"):
        return "n/a" if v is None else format(v, spec)

    recs = list(rows[0]["recognizers"]) if rows else []
    header = ["method", "FSR"] + [f"ISM {r}" for r in recs] + ["BRISQUE", "PSNR X'", "SSIM X'", "time (s)", "peak MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        fid = row.get("fidelity") or {}
        cells = [row["method"], fmt(row["fsr"], ".2f")] + [fmt(row["recognizers"][r]["ism"]) for r in recs]
        cells += [fmt(row.get("brisque"), ".1f"), fmt(fid.get("psnr"), ".2f"), fmt(fid.get("ssim")),
                  f"{row['time_s']:.1f}", f"{row['peak_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_paper(args) -> int:
    import json

    from ..atomic import check_writable, write_text_atomic
    from ..cli.evaluate import check_generation_args, load_clean_refs
    from ..face.detect import get_detector

    if args.tiny_settings:
        apply_tiny_settings(args)
    check_generation_args(args)
    rhos = parse_rhos(args.rhos)
    anti = parse_anti_db(args.anti_db)
    if args.out_json:
        check_writable(args.out_json, overwrite=True)
    def methods(run_args, clean, detector, cache) -> list[dict]:     # every row, same seeds and budget
        rows = [run_method(METHOD_BASELINE, run_args, clean, detector, None, cache)]
        rows += [run_method(ANTI_DB[a], run_args, clean, detector, None, cache, anti_db=a) for a in anti]
        rows += [run_method(f"IDDM rho={rho:g}", run_args, clean, detector, rho, cache) for rho in rhos]
        return rows

    if args.faces:
        return corpus_table(args, methods)
    detector = get_detector("dlib")
    rows = methods(args, load_clean_refs(args.refs, detector), detector, {})
    print(format_table(rows))
    print(rows[0]["judges"])
    warnings = sorted({w for r in rows for w in r["warnings"]})
    for w in warnings:
        print(f"WARNING: {w}")
    if args.out_json:
        settings = {k: getattr(args, k) for k in ("K", "T", "ft_steps", "n", "steps", "seed", "prompts")}
        settings["model"] = Path(args.model).name          # the file name only, as LoRA metadata names a base
        write_text_atomic(args.out_json, json.dumps({"settings": settings, "methods": rows}, indent=2))
    return 0


def corpus_table(args, methods) -> int:
    """``--faces``: the table over identities (mean +- sd), each identity's own table, and the JSON."""
    import json

    from ..atomic import write_text_atomic
    from .paper_corpus import format_aggregate, run_corpus

    result = run_corpus(args, methods)
    for identity, rows in result["per_identity"].items():
        print(f"\n{identity}\n{format_table(rows)}")
    print(f"\nmean +- sd over {len(result['identities'])} identities "
          "(R1/R5: the user's rank among the gallery's identities, by each held-out judge)")
    print(format_aggregate(result["table"]))
    if args.out_json:
        settings = {k: getattr(args, k) for k in ("K", "T", "ft_steps", "n", "steps", "seed", "prompts")}
        settings["model"] = Path(args.model).name
        write_text_atomic(args.out_json, json.dumps({"settings": settings, **result}, indent=2))
    return 0
