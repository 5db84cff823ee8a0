"""`evaluate` command: generate portraits with a (LoRA-adapted) model and measure how much identity leaks.

    python -m iddm_core evaluate --model tiny --lora my.safetensors --refs photos/ --out-json r.json --sheet s.png

N images per prompt are sampled with the same fixed seed for every prompt (so two LoRAs evaluated with the same
seed see the same initial noise), scored by :func:`iddm_core.evaluation.evaluate.evaluate`, and written as a JSON report
and a contact sheet (rows = prompts), both atomically and only at the end.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import KIND_CHOICES

# The IDDM paper's evaluation prompts. "sks" is DreamBooth's rare identifier token for the user; the sentences
# read as ordinary captions ("a photo of <someone> wearing a hat") with the identifier standing in for a name.
PAPER_PROMPTS = (
    "a photo of sks person",
    "a dslr portrait of sks person",
    "a photo of sks person wearing a hat",
    "a photo of sks person with glasses",
    "a photo of sks person with red hair",
)
REF_RESOLUTION = 256     # face-centred crops of the clean photos used for the identity prototype


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="SD checkpoint (.safetensors), diffusers folder, "
                                                   "'demo' (small trained model) or 'tiny' (random)")
    p.add_argument("--kind", choices=KIND_CHOICES, default=None, help="override model-kind detection")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (for single-file checkpoints)")
    p.add_argument("--prompts", nargs="+", default=list(PAPER_PROMPTS), help="prompts (default: the paper's five)")
    p.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every prompt (default 0)")
    p.add_argument("--steps", type=int, default=30, help="DDIM steps (default 30)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the model's native)")
    p.add_argument("--eval-recognizers", default="auto",
                   help="comma-separated judges: dlib, faceres, arcface:PATH.onnx, ...; 'auto' (default) = every "
                        "installed recogniser that was not a surrogate of the protection")
    p.add_argument("--surrogates", default="",
                   help="recognisers the protection was optimised against (names; default: read from an IDDM "
                        "LoRA's metadata, else dlib, the pack's default): the judges are chosen outside them")
    p.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                   help="a models folder to search for recognisers (repeatable; $IDDM_MODEL_DIRS is searched too)")
    p.add_argument("--gallery", default=None, help="folder of distractor identities for top-k retrieval "
                                                   "(sub-folder per identity, or files named identity[_N].jpg)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="generate portraits and measure identity leakage (FSR, ISM, BRISQUE)",
                       description="Sample N images per prompt from a model (+ optional LoRA), then report the face "
                                   "detection rate (FSR), identity similarity to your clean photos (ISM) per "
                                   "held-out recogniser, optional gallery retrieval, and BRISQUE quality.")
    p.add_argument("--lora", default=None, help="kohya LoRA .safetensors to apply (default: the base model)")
    p.add_argument("--refs", required=True, help="folder with your clean photos (the identity to look for)")
    p.add_argument("--out-json", required=True, help="JSON report to write")
    p.add_argument("--sheet", default=None, help="contact-sheet PNG to write (rows = prompts)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_generation_args(p)
    p.set_defaults(func=cmd_evaluate)


def split_names(text: str) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def check_generation_args(args) -> None:
    from ..errors import InputError

    if args.n < 1:
        raise InputError(f"--n={args.n}: give at least one image per prompt")
    if args.steps < 1:
        raise InputError(f"--steps={args.steps} must be >= 1")
    if not args.prompts or not all(p.strip() for p in args.prompts):
        raise InputError("--prompts: give at least one non-empty prompt")
    if not split_names(args.eval_recognizers):
        raise InputError("--eval-recognizers: name at least one recogniser, e.g. faceres, or 'auto'")


# kept importable here for scripts written against the old place
from ..evaluation.portraits import apply_lora_file  # noqa: E402,F401


def generate_for_prompts(bundle, prompts, n: int, seed: int, steps: int, guidance: float = 7.5,
                         resolution: int | None = None, callback=None):
    """``(images [len(prompts) * n, 3, H, W], prompt index per image)``, every prompt sampled with ``seed``."""
    import torch

    from ..events import Emitter
    from ..training.sampling import generate_images

    emit = Emitter(callback, total=len(prompts))
    out, labels = [], []
    for i, prompt in enumerate(prompts):
        out.append(generate_images(bundle, prompt, n, seed=seed, steps=steps, guidance_scale=guidance,
                                   resolution=resolution))
        labels += [i] * n
        emit("generate", message=f"prompt {i + 1}/{len(prompts)}")
    return torch.cat(out), labels


def load_clean_refs(folder, detector, resolution: int = REF_RESOLUTION):
    """Face-centred crops + landmarks of every clean photo with a face (photos without one are skipped)."""
    from ..images import load_folder
    from ..protection.refs import prepare_photos
    from ._common import print_skipped

    images, landmarks, _, skipped = prepare_photos(load_folder(folder), resolution, detector)
    print_skipped(skipped, folder)            # to the terminal only: names never go into the report
    return images, landmarks


def sheet_tiles(images, result: dict) -> list:
    """Generated images as uint8 tiles labelled with the first evaluation recogniser's similarity."""
    from ..evaluation.faces import uint8_images as _uint8
    from ..evaluation.leak_render import annotate, enlarge, label_text, match_color

    name = result["eval_recognizers"][0]
    entry = result["recognizers"][name]      # red where the judge's own rule matched (dlib: distance <= 0.6)
    return [annotate(enlarge(rgb), label_text(s, name), match_color(m))
            for rgb, s, m in zip(_uint8(images), entry["similarity"], entry["matched"])]


def write_outputs(result: dict, images, n_columns: int, json_path, sheet_path=None, overwrite: bool = False) -> None:
    """Write the JSON report and (optionally) the contact sheet, each atomically."""
    from PIL import Image

    from ..atomic import atomic_write, check_writable, write_text_atomic
    from ..evaluation.leak_render import contact_sheet

    check_writable(json_path, overwrite)
    if sheet_path is not None:
        check_writable(sheet_path, overwrite)
        sheet = contact_sheet(sheet_tiles(images, result), n_columns)
        atomic_write(sheet_path, lambda tmp: Image.fromarray(sheet).save(tmp, "PNG"), overwrite=overwrite)
    write_text_atomic(json_path, json.dumps(result, indent=2), overwrite=overwrite)


def search_dirs(args) -> list[str]:
    from ..face.registry import default_search_dirs

    return list(getattr(args, "models_dir", None) or []) + default_search_dirs()


def run_surrogates(args) -> list[str]:
    """The protection's surrogates: ``--surrogates``, else those an IDDM LoRA names in its metadata, else dlib
    (the pack's default surrogate)."""
    given = split_names(getattr(args, "surrogates", ""))
    if given:
        return given
    lora = getattr(args, "lora", None)
    if lora:
        from ..protection.iddm import surrogates_from_comment
        from ..training.kohya_check import read_lora_metadata

        named = surrogates_from_comment(read_lora_metadata(lora).get("ss_training_comment", ""))
        if named:
            return named
    return ["dlib"]


def evaluate_bundle(bundle, clean, args, callback=None) -> tuple[dict, "torch.Tensor"]:
    """Generate with ``bundle`` (whatever adapters are active) and score (faces found by the sample detector for
    the samples' size, :func:`~iddm_core.evaluation.evaluate.sample_detector_name`); shared by the CLI and ``bench paper``."""
    from ..evaluation.evaluate import evaluate

    images, labels = generate_for_prompts(bundle, args.prompts, args.n, args.seed, args.steps, args.guidance,
                                          args.resolution, callback)
    result = evaluate(images, clean, eval_recognizers=args.eval_recognizers, surrogates=run_surrogates(args),
                      gallery=args.gallery, labels=[str(i) for i in labels],
                      device=bundle.device, callback=callback, search_dirs=search_dirs(args))
    result["prompts"] = list(args.prompts)
    result["settings"] = {"n": args.n, "seed": args.seed, "steps": args.steps, "guidance": args.guidance,
                          "resolution": int(images.shape[-1]), "model": bundle.title}
    return result, images


def cmd_evaluate(args) -> int:
    from ..atomic import check_writable
    from ..face.detect import get_detector
    from ..diffusion.loading import load_model
    from ._common import ConsoleProgress, pick_device

    check_generation_args(args)
    check_writable(args.out_json, args.overwrite)
    if args.sheet:
        check_writable(args.sheet, args.overwrite)
    detector = get_detector("dlib")
    clean = load_clean_refs(args.refs, detector)
    bundle = load_model(args.model, kind=args.kind, tokenizer=args.tokenizer, device=pick_device(args.device))
    if args.lora:
        apply_lora_file(bundle, args.lora)
    result, images = evaluate_bundle(bundle, clean, args, ConsoleProgress())
    result["settings"]["lora"] = bool(args.lora)
    write_outputs(result, images, args.n, args.out_json, args.sheet, args.overwrite)
    print(summary_line(result))
    print(result["judges"])
    for w in result["warnings"]:
        print(f"WARNING: {w}")
    return 0


def summary_line(result: dict) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    parts = [f"FSR {result['fsr']:.2f}"]
    parts += [f"ISM[{name}] {fmt(e['ism'])}" for name, e in result["recognizers"].items()]
    if result.get("brisque") is not None:
        parts.append(f"BRISQUE {result['brisque']:.1f}")
    return "  ".join(parts)
