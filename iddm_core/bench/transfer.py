"""`python -m iddm_core.bench transfer`: does a pixel attack on some recognisers also fool the others?

    python -m iddm_core.bench transfer --photos ../shared/faces/congress --models-dir DIR --identities 30

Judged the way a stranger with other photos of the person would judge. Every identity of ``--photos`` (one
sub-folder per identity, or a flat folder whose file names carry it: ``obama.jpg`` and ``obama2.jpg`` are one
person) with at least two photos gives one trial: its first photo and that photo's mirror image are the
*references* (what the stranger already has), its last photo is the one the person protects (the *probe*). Each
photo is cropped around its face as the pipeline crops a user's photos. The probe is protected by the face attack
(PGD on the pixels: IDDM's Stage II loss without the diffusion model; by default L2 steps under a 30 dB PSNR floor
on the face box and on the rest, within eta) against a prototype of the probe itself and its mirror (all the person
needs), once per surrogate set, then rounded to 8 bits as it would be saved. ``--skip N`` leaves out the first N
identities, so settings chosen on some identities can be checked on the others.

Each judge (every installed recogniser by default) then **detects the face again** on the saved probe (dlib's
detector, as a judge would: not the clean landmarks the attack used), embeds it and compares it with the prototype
of the references. A probe is *verified* when that cosine reaches the judge's calibrated 1 %-false-accept
threshold (evaluation.judges.MATCH_THRESHOLDS); a probe in which no face is found counts as not verified and is
counted apart. The table gives, per surrogate set and judge, the mean cosine and the verified share before -> after
(``*``: judge held out from the set, i.e. transfer), and per set the ensemble weights at the first and last step
and PSNR / SSIM on the probe's face box. The clean levels beside it compare every clean probe with the other
trials' references too (other people). Identities with one photo are not used. Nothing written or printed names
a photo.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field

DEFAULT_SETS = "dlib;mobileface;dlib+mobileface;all"


def register(sub) -> None:
    from ..face.budget import DEFAULT_PSNR
    from ..face.transfer import DEFAULT_STEPS, DEFAULT_TRANSFER
    from ..protection.options import add_transfer_arguments

    p = sub.add_parser("transfer", help="face attack with each surrogate set, judged by every recogniser",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", required=True, help="folder of face photos, at least one identity with two photos "
                                                   "(identity in the file name, or one sub-folder per identity)")
    p.add_argument("--identities", type=int, default=0,
                   help="use the first N identities with two photos, in folder order (default 0: all)")
    p.add_argument("--sets", default=DEFAULT_SETS,
                   help="surrogate sets: ';' between sets, '+' inside one, 'all' = every installed recogniser "
                        f"(default {DEFAULT_SETS!r})")
    p.add_argument("--judges", default="all", help="comma-separated recognisers that judge (default: all installed)")
    p.add_argument("--eta", type=float, default=0.08, help="L_inf budget (default 0.08)")
    p.add_argument("--alpha", type=float, default=None,
                   help="sign step size with --psnr 0 (default 2.5 eta / steps: reaches eta)")
    p.add_argument("--psnr", type=float, default=DEFAULT_PSNR,
                   help="keep the face box, and the rest of the photo, each at PSNR >= this many dB (L2 balls, "
                        f"L2-PGD steps) inside the L_inf budget (default {DEFAULT_PSNR:g}; 0: L_inf sign-PGD alone)")
    p.add_argument("--skip", type=int, default=0,
                   help="leave out the first N identities with two photos (e.g. those settings were chosen on)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"attack steps (default {DEFAULT_STEPS})")
    p.add_argument("--tau", type=float, default=0.03, help="ensemble softmax temperature (default 0.03)")
    p.add_argument("--scale", default="calibrated", choices=("calibrated", "cosine"),
                   help="ensemble weights on the common calibrated scale (default) or on raw cosines")
    add_transfer_arguments(p, DEFAULT_TRANSFER)
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


def trials_of(layout: dict, limit: int = 0, skip: int = 0) -> list[str]:
    """The identities with two photos or more, in folder order, after the first ``skip``, the first ``limit`` of
    them (0: all)."""
    paired = [who for who, files in layout.items() if len(files) >= 2][skip:]
    return paired[:limit] if limit else paired


def verified_share(sims: list, threshold: float) -> float:
    """Share of probes whose cosine reaches ``threshold``; a probe without a face (None) is not verified."""
    return sum(s is not None and s >= threshold for s in sims) / len(sims) if sims else 0.0


def mean_of(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def quantize(images):
    """As saved to an 8-bit file."""
    return images.clamp(0, 1).mul(255).round().div(255)


def box_slices(box, size: int) -> tuple[slice, slice]:
    """(rows, columns) of a detector box (x0, y0, x1, y1) inside a size x size image, at least 11 px each (SSIM)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0 = max(0, min(x0, size - 11)), max(0, min(y0, size - 11))
    return slice(y0, max(y0 + 11, min(size, y1))), slice(x0, max(x0 + 11, min(size, x1)))


# ------------------------------------------------------------------------------------------ the photos

@dataclass
class Faces:
    """Crops [N, 3, R, R] with the attack's landmarks (carried from the full photo) and, per crop, the face a judge
    finds on the crop itself (None: none found)."""

    images: object
    landmarks: object
    found: list = field(default_factory=list)


def judge_faces(images, detector) -> list:
    """The largest face the detector finds on each 8-bit image (None where it finds none)."""
    from ..evaluation.faces import uint8_images

    return [next(iter(detector.detect(rgb)), None) for rgb in uint8_images(images)]


def load_trials(layout: dict, paired: list[str], resolution: int, detector) -> dict:
    """{identity: Faces of [reference, its mirror, probe]}; a trial is dropped (never named) when a face is
    missing in one of them."""
    import numpy as np

    from ..images import Photo, load_rgb
    from ..protection.refs import prepare_photos

    trials = {}
    for who in paired:
        files = layout[who]
        photos = [Photo("reference", files[0], load_rgb(files[0]))]
        photos.append(Photo("mirror", files[0], np.ascontiguousarray(photos[0].rgb[:, ::-1])))
        photos.append(Photo("probe", files[-1], load_rgb(files[-1])))
        images, landmarks, names, _ = _prepare_quietly(prepare_photos, photos, resolution, detector)
        if len(names) != len(photos):
            continue
        faces = Faces(images, landmarks, judge_faces(images, detector))
        if all(f is not None for f in faces.found):
            trials[who] = faces
    return trials


def _prepare_quietly(prepare, photos, resolution, detector):
    from ..errors import InputError

    try:
        return prepare(photos, resolution, detector, skip_faceless=True)
    except InputError:                   # no face in any of them: the message would name the files
        return None, None, [], []


# ------------------------------------------------------------------------------------------ judging

def _landmarks(faces: list):
    import torch

    return torch.stack([torch.as_tensor(f.points()) for f in faces])


def judge_prototypes(model, groups: dict) -> dict:
    """{identity: the judge's prototype of the reference and its mirror, as the judge detects them}."""
    from ..evaluation.faces import embed
    from ..evaluation.metrics import prototype

    return {who: prototype(embed(model, f.images[:2], _landmarks(f.found[:2]))) for who, f in groups.items()}


def judge_cosines(model, images, found: list, protos: list) -> list:
    """Cosine of each image (its face as detected, ``found``) to the prototype beside it; None without a face."""
    from ..evaluation.faces import embed

    index = [i for i, f in enumerate(found) if f is not None]
    out = [None] * len(found)
    if index:
        emb = embed(model, images[index], _landmarks([found[i] for i in index]))
        for row, i in enumerate(index):
            out[i] = float(emb[row] @ protos[i])
    return out


def clean_levels(model, threshold: float, trials: dict, protos: dict) -> dict:
    """The judge on the clean probes: mean cosine and verified share with the person's references (``same``),
    and with every other identity's references (``different``: mean cosine and false-accept share)."""
    import torch

    names = list(trials)
    probes = torch.cat([trials[w].images[2:3] for w in names])
    same = judge_cosines(model, probes, [trials[w].found[2] for w in names], [protos[w] for w in names])
    diff = []
    for who in protos:
        others = [w for w in names if w != who]
        if others:
            diff += judge_cosines(model, torch.cat([trials[w].images[2:3] for w in others]),
                                  [trials[w].found[2] for w in others], [protos[who]] * len(others))
    return {"threshold": threshold, "same": mean_of(same), "verified": verified_share(same, threshold),
            "different": mean_of(diff), "false_accepts": verified_share(diff, threshold) if diff else None,
            "trials": len(same), "different_pairs": len(diff), "probe_cosines": same}


# ------------------------------------------------------------------------------------------ attacking

@dataclass
class Protected:
    images: object                 # [T, 3, R, R], 8-bit values
    weights_first: dict            # mean ensemble weight per surrogate at the first step
    weights_last: dict             # ... of the protected probes
    own_view: dict                 # the attack's own similarity after (clean landmarks), mean per surrogate
    psnr: float                    # face box, mean over the trials
    ssim: float
    linf: float


def attack_set(loss_fn, trials: dict, detector, args, transfer, device) -> Protected:
    """Protect every trial's probe against a prototype of itself and its mirror."""
    import torch

    from ..evaluation.metrics import psnr, ssim
    from ..face.attack import face_attack
    from ..face.budget import box_regions

    out, first, last, own, quality = [], [], [], [], []
    for f in trials.values():
        probe, lm = f.images[2:3], f.landmarks[2:3]
        mirror = probe.flip(-1)
        mirror_face = judge_faces(mirror, detector)[0]
        refs = probe if mirror_face is None else torch.cat([probe, mirror])
        ref_lm = lm if mirror_face is None else torch.cat([lm, _landmarks([mirror_face]).to(lm.dtype)])
        loss_fn.set_references(refs.to(device), ref_lm.to(device))
        regions = box_regions([f.found[2].box], *probe.shape[-2:]) if args.psnr is not None else None
        result = face_attack(probe.to(device), lm.to(device), loss_fn, args.eta, args.alpha, args.steps,
                             transfer=transfer, psnr=args.psnr, regions=regions)
        x = quantize(result.image).cpu()
        rows, cols = box_slices(f.found[2].box, probe.shape[-1])
        a, b = x[..., rows, cols], probe[..., rows, cols]
        quality.append((float(psnr(a, b)[0]), float(ssim(a, b)[0]), float((x - probe).abs().max())))
        out.append(x)
        first.append(result.history[0]["weights"])
        last.append(result.final["weights"])
        own.append(result.final["similarity"])
    names = loss_fn.names
    avg = lambda rows: {n: mean_of(r[n] for r in rows) for n in names}  # noqa: E731
    return Protected(torch.cat(out), avg(first), avg(last), avg(own), mean_of(q[0] for q in quality),
                     mean_of(q[1] for q in quality), max(q[2] for q in quality))


@dataclass
class Cell:
    surrogates: tuple
    judge: str
    before: float | None
    after: float | None
    verified_before: float
    verified_after: float
    no_face: int
    held_out: bool


# ------------------------------------------------------------------------------------------ the report

def _f(v, digits=3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _weights(w: dict) -> str:
    return ", ".join(f"{n} {_f(v, 2)}" for n, v in w.items())


def format_tables(settings: dict, levels: dict, cells: list[Cell], protected: dict) -> str:
    judges = list(levels)
    budget = f"eta {settings['eta']}, alpha {settings['alpha']:.4g}" if settings.get("psnr") is None else \
        f"eta {settings['eta']} and PSNR >= {settings['psnr']:g} dB on the face box and on the rest (L2-PGD)"
    lines = [f"face attack: {budget}, {settings['steps']} steps, tau "
             f"{settings['tau']} ({settings['scale']} scale), transfer options: {settings['transfer']}",
             f"{settings['trials']} trials (references: one photo of the person + its mirror; probe: another photo), "
             f"{settings['resolution']} px crops; every judge detects the face again on the saved probe",
             "", "clean probes, as each judge sees them",
             "| judge | threshold | same person: mean cosine, verified | other people: mean cosine, accepted |",
             "|---|---|---|---|"]
    for j in judges:
        lv = levels[j]
        lines.append(f"| {j} | {lv['threshold']:g} | {_f(lv['same'])}, {_pct(lv['verified'])} ({lv['trials']}) | "
                     f"{_f(lv['different'])}, {_pct(lv['false_accepts'])} ({lv['different_pairs']} pairs) |")
    lines += ["", "protected probes: mean cosine to the person's references, verified share, before -> after "
                  "(* = judge held out from the set)",
              "| surrogates | " + " | ".join(judges) + " |", "|---|" + "---|" * len(judges)]
    for sset in protected:
        row = {c.judge: c for c in cells if c.surrogates == sset}
        lines.append(f"| {'+'.join(sset)} | " + " | ".join(_cell_text(row[j]) for j in judges) + " |")
    lines += ["", "| surrogates | ensemble weights, first step -> last | attack's own similarity after (clean "
                  "landmarks) | face-box PSNR | SSIM | L_inf |", "|---|---|---|---|---|---|"]
    for sset, p in protected.items():
        lines.append(f"| {'+'.join(sset)} | {_weights(p.weights_first)} -> {_weights(p.weights_last)} | "
                     f"{_weights(p.own_view)} | {_f(p.psnr, 1)} dB | {_f(p.ssim)} | {_f(p.linf, 4)} |")
    return "\n".join(lines)


def _cell_text(c: Cell) -> str:
    mark = "*" if c.held_out else ""
    text = (f"{_f(c.before)} -> {_f(c.after)}{mark}, "
            f"{_pct(c.verified_before)} -> {_pct(c.verified_after)}{mark}")
    return text + (f" ({c.no_face} no face)" if c.no_face else "")


def json_report(settings: dict, levels: dict, cells: list[Cell], protected: dict, notes: list[str]) -> dict:
    return {"settings": settings, "skipped": notes,
            "levels": {j: {k: v for k, v in lv.items() if k != "probe_cosines"} for j, lv in levels.items()},
            "cells": [{**asdict(c), "surrogates": list(c.surrogates)} for c in cells],
            "sets": [{"surrogates": list(s), **{k: v for k, v in asdict(p).items() if k != "images"}}
                     for s, p in protected.items()]}


# ------------------------------------------------------------------------------------------ the run

def cmd_transfer(args) -> int:
    from ..atomic import check_writable, write_text_atomic
    from ..errors import InputError
    from ..evaluation.faces import gallery_layout
    from ..face.attack import check_budget, step_size
    from ..face.budget import psnr_option
    from ..face.detect import get_detector
    from ..protection.options import transfer_options

    check_budget(args.eta, args.alpha, args.steps)
    args.psnr = psnr_option(args.psnr, args.alpha)
    transfer = transfer_options(args)
    if args.identities < 0:
        raise InputError(f"--identities must be >= 0 (0 = all), got {args.identities}")
    if args.skip < 0:
        raise InputError(f"--skip must be >= 0, got {args.skip}")
    if args.out_json:
        check_writable(args.out_json, overwrite=True)
    models, sets, judges, notes, device = _load_models(args)
    layout = gallery_layout(args.photos)
    paired = trials_of(layout, args.identities, args.skip)
    detector = get_detector("dlib")
    trials = load_trials(layout, paired, args.resolution, detector)
    if not trials:
        raise InputError(f"--photos {args.photos}: no identity with two photos in which a face is found")
    if len(trials) < len(paired):
        notes.append(f"{len(paired) - len(trials)} of {len(paired)} trials left out: a face was not found")
    protos = {j: judge_prototypes(models[j], trials) for j in judges}
    levels = {j: clean_levels(models[j], _threshold(j), trials, protos[j]) for j in judges}

    cells, protected = [], {}
    for sset in sets:
        loss_fn = _ensemble([models[n] for n in sset], args, device)
        p = protected[sset] = attack_set(loss_fn, trials, detector, args, transfer, device)
        found = judge_faces(p.images, detector)
        for j in judges:
            after = judge_cosines(models[j], p.images, found, [protos[j][w] for w in trials])
            lv = levels[j]
            cells.append(Cell(sset, j, lv["same"], mean_of(after), lv["verified"],
                              verified_share(after, lv["threshold"]), sum(a is None for a in after), j not in sset))
        print(f"set {'+'.join(sset)} done", flush=True)

    alpha = step_size(args.eta, args.steps, args.alpha) if args.psnr is None else None   # L2 steps: no sign step
    settings = {"eta": args.eta, "alpha": alpha, "psnr": args.psnr,
                "steps": args.steps,
                "tau": args.tau, "scale": args.scale, "transfer": transfer.text(), "transfer_options": asdict(transfer),
                "resolution": args.resolution, "trials": len(trials), "skipped_identities": args.skip}
    print(format_tables(settings, levels, cells, protected))
    for note in notes:
        print(f"note: {note}")
    if args.out_json:
        write_text_atomic(args.out_json, json.dumps(json_report(settings, levels, cells, protected, notes), indent=2))
    return 0


def _threshold(name: str) -> float:
    from ..evaluation.judges import match_threshold

    return match_threshold(name)


def _ensemble(recognizers, args, device):
    from ..face.ensemble import FaceEnsembleLoss

    return FaceEnsembleLoss(recognizers, tau=args.tau, scale=args.scale).to(device)


def _load_models(args):
    """(models by name, surrogate sets, judge names, notes, device): every installed recogniser a set or judge needs."""
    from ..diffusion.runtime import pick_device
    from ..face.registry import default_search_dirs, discover, load_recognizer, parse_surrogates

    dirs = list(args.models_dir) + default_search_dirs()
    installed = {s.name: s for s in discover(dirs) if s.available}
    sets, notes = parse_sets(args.sets, list(installed))
    judge_specs = list(installed.values()) if args.judges.strip().lower() == "all" \
        else parse_surrogates(args.judges, dirs)
    device = pick_device(args.device)
    needed = {s.name: s for s in judge_specs}
    needed.update({n: installed[n] for sset in sets for n in sset})
    models = {name: load_recognizer(spec, device) for name, spec in needed.items()}
    return models, sets, [s.name for s in judge_specs], notes, device
