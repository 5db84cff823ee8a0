"""`train` (IDDM) and `demo` commands."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..protection.options import add_algorithm_args
from ..protection.options import config_from_args  # noqa: F401 (cmd_train below; tests)
from ._common import KIND_CHOICES


def _add_io_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="SD checkpoint (.safetensors), diffusers folder, "
                                                   "'demo' (small trained model) or 'tiny' (random)")
    p.add_argument("--kind", choices=KIND_CHOICES, default=None, help="override model-kind detection")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (for single-file checkpoints)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def register(sub) -> None:
    p = sub.add_parser("train", help="IDDM: train an identity-decoupled LoRA from your photos",
                       description="Train a DreamBooth LoRA with IDDM's two-stage PGD protection (Algorithm 1).")
    p.add_argument("--refs", required=True, help="folder with your photos (at least 3 with a detectable face)")
    p.add_argument("--out", required=True, help="output LoRA file (.safetensors, kohya format)")
    p.add_argument("--report", default=None, help="write a JSON report (config, per-step losses/similarities, timings)")
    p.add_argument("--name", default=None, help="LoRA name stored in metadata (default: output file stem)")
    p.add_argument("--n-reference", type=int, default=None, help="size of the reference set Xc (default: half)")
    p.add_argument("--reference-files", default=None, help="comma-separated file names forming Xc (overrides split)")
    p.add_argument("--protect-files", default=None, help="comma-separated file names forming X0 (default: the rest)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the state saved after its last finished iteration; "
                        "refused if the base model, photos, split, class images or settings differ")
    p.add_argument("--fresh", action="store_true",
                   help="discard the saved state of an interrupted run for this output and start over")
    p.add_argument("--state-dir", default=None,
                   help="folder of the resume state (holds derived private images; default: a private folder "
                        "under $IDDM_CACHE_DIR/state, else ~/.cache/iddm/state, one per output); deleted after "
                        "success")
    p.add_argument("--save-protected", default=None, help="also write the final protected images X' to this folder")
    _add_io_args(p)
    add_algorithm_args(p)
    p.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="no-defense LoRA vs IDDM LoRA on the embedded demo model (~1 min, CPU)",
                       description="IDDM end to end on the small trained demo model and public-domain sample photos: "
                                   "a no-defense LoRA and an IDDM LoRA on the same photos and seeds, scored by dlib.")
    d.add_argument("--out-dir", default="iddm_demo",
                   help="folder for the two LoRAs, report.json and contact_sheet.png")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    d.set_defaults(func=cmd_demo)


def _split_list(text):
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def cmd_train(args) -> int:
    import sys

    from ..training import checkpoint as ckpt
    from ..atomic import check_writable
    from ..errors import InputError
    from ..protection.iddm import run_iddm, schedule_text
    from ..diffusion.fit import check_model_fits
    from ..diffusion.loading import load_model
    from ..diffusion.validation import validate_model
    from ..diffusion.runtime import Runtime
    from ..protection.refs import check_identity, identity_note, load_private_refs
    from ._common import ConsoleProgress, pick_device, print_skipped

    config = config_from_args(args)                       # parameter errors before anything is loaded
    out = Path(args.out)
    check_writable(out, args.overwrite)
    if args.resume and args.fresh:
        raise InputError("--resume and --fresh contradict each other: choose one")
    state_dir = Path(args.state_dir) if args.state_dir else ckpt.state_dir_for(out)
    legacy = out.with_name(out.name + ".iddm-state")
    if (legacy / "iddm_state.pt").is_file():
        print(f"warning: {legacy} holds the resume state of an older version (derived private images beside "
              "your output); this version cannot resume it: delete that folder", file=sys.stderr)
    if ckpt.has_state(state_dir) and not (args.resume or args.fresh):
        raise InputError(f"an interrupted run left its resume state for {out} (in {state_dir}): add --resume to "
                         "continue it, or --fresh to discard it and start over")
    if args.resume and not ckpt.has_state(state_dir):
        print(f"no resume state for {out}: starting from iteration 1", file=sys.stderr)
    text = schedule_text(config)
    print(text)
    if config.pgd.n_rec == 0:
        print(f"warning: {config.pgd.schedule()['note']}", file=sys.stderr)
    info = validate_model(args.model, kind=args.kind, tokenizer=args.tokenizer)   # header only: seconds, not minutes
    resolution = config.resolution or info.resolution
    refs = load_private_refs(args.refs, resolution, seed=config.seed, n_reference=args.n_reference,
                             reference_files=_split_list(args.reference_files),
                             protect_files=_split_list(args.protect_files))
    print_skipped(refs.skipped, args.refs)
    if check_identity(refs) is not None and identity_note(refs):     # names for the user's terminal only
        print(identity_note(refs), file=sys.stderr)
    device = pick_device(args.device)
    runtime = Runtime.for_settings(config, device)                  # what run_iddm decides from the same settings
    check_model_fits(info, runtime)                                 # weights vs free memory, before loading
    bundle = load_model(args.model, kind=args.kind, tokenizer=args.tokenizer, device=device,
                        weight_dtypes=runtime.weight_dtypes)
    result = run_iddm(bundle, refs, config, out_path=out, lora_name=args.name or out.stem, report_path=args.report,
                      checkpoint_dir=state_dir, resume=args.resume, overwrite=args.overwrite,
                      callback=ConsoleProgress(), class_images=args.class_images, model_source=args.model)
    if args.save_protected:
        save_protected(result.protected, args.save_protected)
    _print_summary(result)
    return 0


def save_protected(images, folder) -> None:
    from PIL import Image

    from ..atomic import atomic_write
    from ..images import to_uint8

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        atomic_write(folder / f"protected_{i:02d}.png", lambda tmp, x=x: Image.fromarray(to_uint8(x)).save(tmp, "PNG"),
                     overwrite=True)


def _print_summary(result) -> None:
    r = result.report
    t = r["timings"]
    sims = ", ".join(f"{k} {v:.3f}" for k, v in r.get("final_similarity", {}).items())
    print(f"LoRA written: {result.lora_path}")
    if r.get("resume", {}).get("resumed_after"):
        print(f"resumed after iteration {r['resume']['resumed_after']} of {r['config']['K']}")
    s = r.get("schedule", {})
    print(f"PGD per iteration: {s.get('stage1_steps')} Stage I + {s.get('stage2_steps')} Stage II steps"
          + (f" ({s['note']})" if s.get("note") else ""))
    print(f"time: total {t['total']:.1f}s (fine-tune {t['finetune']:.1f}s, PGD {t['pgd']:.1f}s, other {t['other']:.1f}s)")
    print(f"similarity of X' to the reference prototype: {sims}")


def cmd_demo(args) -> int:
    from ..demo.story import DEMO_NOTE, format_result, run_demo
    from ._common import ConsoleProgress, pick_device

    result = run_demo(args.out_dir, device=pick_device(args.device), callback=ConsoleProgress())
    print(format_result(result))
    print(f"LoRAs and report: {args.out_dir}")
    print(DEMO_NOTE)
    return 0
