"""`python -m iddm_core.bench transfer`: does a pixel attack on some recognisers also fool the others?

    python -m iddm_core.bench transfer --photos ../shared/faces --models-dir DIR

Every photo of ``--photos`` (a flat folder whose file names carry the identity, ``obama.jpg`` and ``obama2.jpg``
being one person, or one sub-folder per identity) is cropped around its face as the pipeline crops a user's
photos, then protected by the face attack (sign-PGD on the pixels, the Stage II loss without the diffusion model)
against its identity's clean prototype, once per surrogate set: by default {dlib}, {mobileface},
{dlib, mobileface} and every installed recogniser. Each installed recogniser then judges the protected photo,
rounded to 8 bits as it would be saved: the cosine to the identity's clean prototype, before -> after.

The cosines only mean something beside the judge's own reference levels, measured on the same photos: the mean
cosine between two different photos of one person (``same``) and between photos of different people
(``different``). A judge that is held out from the surrogate set (marked ``*``) measures transfer; a judge inside
the set measures the attack itself. Sets naming a recogniser that is not installed are skipped, and said so.
Nothing written or printed names a photo.
"""
from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass

DEFAULT_SETS = "dlib;mobileface;dlib+mobileface;all"


def register(sub) -> None:
    p = sub.add_parser("transfer", help="face attack with each surrogate set, judged by every recogniser",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", required=True, help="folder of face photos of at least two identities "
                                                   "(identity in the file name, or one sub-folder per identity)")
    p.add_argument("--sets", default=DEFAULT_SETS,
                   help="surrogate sets: ';' between sets, '+' inside one, 'all' = every installed recogniser "
                        f"(default {DEFAULT_SETS!r})")
    p.add_argument("--judges", default="all", help="comma-separated recognisers that judge (default: all installed)")
    p.add_argument("--eta", type=float, default=0.08, help="L_inf budget (default 0.08)")
    p.add_argument("--alpha", type=float, default=0.01, help="step size (default 0.01)")
    p.add_argument("--steps", type=int, default=8, help="attack steps (default 8)")
    p.add_argument("--tau", type=float, default=0.03, help="ensemble softmax temperature (default 0.03)")
    p.add_argument("--resolution", type=int, default=256, help="face-centred crop size (default 256)")
    p.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                   help="models folder to search for recognisers (repeatable; $IDDM_MODEL_DIRS too)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out-json", default=None, help="also write the tables as JSON")
    p.set_defaults(func=cmd_transfer)


# ------------------------------------------------------------------------------------------ pure pieces

def parse_sets(text: str, installed: list[str]) -> tuple[list[tuple[str, ...]], list[str]]:
    """``"dlib;mobileface;dlib+mobileface;all"`` -> (sets of installed names, notes on the sets skipped)."""
    from ..errors import InputError
    from ..face.registry import canonical_name

    sets, notes = [], []
    for raw in [t.strip() for t in (text or "").split(";") if t.strip()]:
        if raw.lower() == "all":
            members = tuple(installed)
        else:
            try:
                members = tuple(dict.fromkeys(canonical_name(n) for n in raw.split("+") if n.strip()))
            except InputError as exc:
                raise InputError(f"--sets: {exc}") from None
        missing = [m for m in members if m not in installed]
        if not members:
            raise InputError(f"--sets: empty set in {text!r}")
        if missing:
            notes.append(f"set {'+'.join(members)} skipped: {', '.join(missing)} not installed")
        elif members not in sets:
            sets.append(members)
    if not sets:
        raise InputError(f"--sets={text!r}: no set has all its recognisers installed ({'; '.join(notes)})")
    return sets, notes


def reference_levels(embeddings, identities: list[str]) -> dict:
    """Mean cosine between different photos of one identity (``same``) and between photos of different
    identities (``different``), from L2-normalised embeddings [N, D]; None where no such pair exists."""
    same, diff = [], []
    for i, j in itertools.combinations(range(len(identities)), 2):
        cos = float(embeddings[i] @ embeddings[j])
        (same if identities[i] == identities[j] else diff).append(cos)
    return {"same": sum(same) / len(same) if same else None, "different": sum(diff) / len(diff) if diff else None,
            "same_pairs": len(same), "different_pairs": len(diff)}


def identity_similarity(embeddings, protos: dict, identities: list[str]) -> float:
    """Mean cosine of each photo's embedding to its own identity's prototype."""
    return sum(float(e @ protos[who]) for e, who in zip(embeddings, identities)) / len(identities)


def quantize(images):
    """As saved to an 8-bit file."""
    return images.clamp(0, 1).mul(255).round().div(255)


# ------------------------------------------------------------------------------------------ the run

@dataclass
class Cell:
    surrogates: tuple
    judge: str
    before: float
    after: float
    held_out: bool


def format_tables(levels: dict, cells: list[Cell], settings: dict) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    judges = list(levels)
    lines = [f"face attack: eta {settings['eta']}, alpha {settings['alpha']}, {settings['steps']} steps, "
             f"{settings['photos']} photos of {settings['identities']} identities, {settings['resolution']} px crops",
             "", "reference levels (mean cosine on the clean photos)",
             "| judge | same person | different people | margin |", "|---|---|---|---|"]
    for j in judges:
        lv = levels[j]
        margin = None if lv["same"] is None or lv["different"] is None else lv["same"] - lv["different"]
        lines.append(f"| {j} | {fmt(lv['same'])} ({lv['same_pairs']} pairs) | {fmt(lv['different'])} "
                     f"({lv['different_pairs']} pairs) | {fmt(margin)} |")
    lines += ["", "similarity to the identity's clean prototype, before -> after (* = judge held out from the set)",
              "| surrogates | " + " | ".join(judges) + " |", "|---|" + "---|" * len(judges)]
    for sset in dict.fromkeys(c.surrogates for c in cells):
        row = {c.judge: c for c in cells if c.surrogates == sset}
        lines.append(f"| {'+'.join(sset)} | " + " | ".join(
            f"{row[j].before:.3f} -> {row[j].after:.3f}{'*' if row[j].held_out else ''}" for j in judges) + " |")
    return "\n".join(lines)


def cmd_transfer(args) -> int:
    import torch

    from ..atomic import check_writable, write_text_atomic
    from ..cli._common import pick_device
    from ..errors import InputError
    from ..evaluation.evaluate import embed, gallery_layout, prototype
    from ..face.attack import check_budget, face_attack
    from ..face.detect import get_detector
    from ..face.ensemble import FaceEnsembleLoss
    from ..face.registry import default_search_dirs, discover, load_recognizer, parse_surrogates
    from ..images import Photo, load_rgb
    from ..protection.refs import prepare_photos

    check_budget(args.eta, args.alpha, args.steps)
    if args.out_json:
        check_writable(args.out_json, overwrite=True)
    dirs = list(args.models_dir) + default_search_dirs()
    installed = {s.name: s for s in discover(dirs) if s.available}
    sets, notes = parse_sets(args.sets, list(installed))
    if args.judges.strip().lower() == "all":
        judge_specs = list(installed.values())
    else:
        judge_specs = parse_surrogates(args.judges, dirs)

    layout = gallery_layout(args.photos)
    if len(layout) < 2:
        raise InputError(f"--photos {args.photos}: photos of at least two identities are needed, found {len(layout)}")
    photos, identities = [], []
    for who, files in layout.items():
        for i, path in enumerate(files):
            photos.append(Photo(f"{who}-{i}", path, load_rgb(path)))
            identities.append(who)
    images, landmarks, _, _ = prepare_photos(photos, args.resolution, get_detector("dlib"), skip_faceless=False)

    device = pick_device(args.device)
    models = {s.name: load_recognizer(s, device) for s in {**installed, **{s.name: s for s in judge_specs}}.values()}
    judges = [s.name for s in judge_specs]
    clean = {j: embed(models[j], images, landmarks) for j in judges}
    protos = {j: {who: prototype(clean[j][[k for k, w in enumerate(identities) if w == who]]) for who in layout}
              for j in judges}
    levels = {j: reference_levels(clean[j], identities) for j in judges}

    cells = []
    for sset in sets:
        loss_fn = FaceEnsembleLoss([models[n] for n in sset], tau=args.tau).to(device)
        protected = torch.empty_like(images)
        for who in layout:
            idx = [k for k, w in enumerate(identities) if w == who]
            x0, lm = images[idx].to(device), landmarks[idx].to(device)
            loss_fn.set_references(x0, lm)
            protected[idx] = quantize(face_attack(x0, lm, loss_fn, args.eta, args.alpha, args.steps).image).cpu()
        for j in judges:
            after = embed(models[j], protected, landmarks)
            cells.append(Cell(sset, j, identity_similarity(clean[j], protos[j], identities),
                              identity_similarity(after, protos[j], identities), j not in sset))
        print(f"set {'+'.join(sset)} done", flush=True)

    settings = {"eta": args.eta, "alpha": args.alpha, "steps": args.steps, "tau": args.tau,
                "resolution": args.resolution, "photos": len(photos), "identities": len(layout)}
    print(format_tables(levels, cells, settings))
    for note in notes:
        print(f"note: {note}")
    if args.out_json:
        data = {"settings": settings, "levels": levels, "skipped": notes,
                "cells": [{"surrogates": list(c.surrogates), "judge": c.judge, "before": c.before, "after": c.after,
                           "held_out": c.held_out} for c in cells]}
        write_text_atomic(args.out_json, json.dumps(data, indent=2))
    return 0
