"""`bench paper --faces CORPUS`: the paper's Table 1 over many identities of a folder-per-identity corpus.

For every chosen identity (default: the demo model's test identities, ``demo/model/test_identities.txt``, that have
at least two photos in the corpus) the identity's photos and their mirror images make the user's photo set (Xc and
X0 by the usual split); every method of ``bench paper`` trains from a fresh base model on them with the same seeds
and budget, and its samples are judged by held-out recognisers:

    per identity x method: FSR, ISM per judge, match rate at the calibrated threshold, R1 / R5 retrieval against a
    gallery of every *other* corpus identity (the user's prototype is added as the true identity), BRISQUE, PSNR X'
    per method: mean +- sd over identities

The gallery's embeddings are computed once per judge and reused for every identity and method (faces.py keeps them
in memory for the process). Identity folders are read from the corpus; the user's photo set is written to a private
temporary folder (0700) that is deleted after each identity. Results name identities by their corpus folder id only
(public corpora: the congress ids are Biographical Directory ids); nothing else of the photos goes into the JSON.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

MIN_PHOTOS = 2


def choose_identities(layout: dict[str, list[Path]], wanted: str | None, limit: int | None) -> list[str]:
    """``wanted``: None/"test" (the demo model's test identities), "all", or comma-separated ids. Keeps the ids
    with at least :data:`MIN_PHOTOS` photos, in the given order; ``limit``: the first that many."""
    from ..demo.model.data import read_identity_list
    from ..errors import InputError

    if wanted in (None, "", "test"):
        ids = read_identity_list()
    elif wanted == "all":
        ids = sorted(layout)
    else:
        ids = [t.strip() for t in wanted.split(",") if t.strip()]
        unknown = [i for i in ids if i not in layout]
        if unknown:
            raise InputError(f"--identities: {', '.join(unknown[:5])} not in the corpus folder")
    ids = [i for i in ids if len(layout.get(i, ())) >= MIN_PHOTOS]
    if limit is not None:
        ids = ids[:max(0, int(limit))]
    if not ids:
        raise InputError(f"--identities: no identity with at least {MIN_PHOTOS} photos in the corpus folder")
    return ids


def write_photo_set(files: list[Path], folder: Path) -> None:
    """The user's photo set of one identity: each photo and its mirror image, as numbered PNGs (no names)."""
    from PIL import Image, ImageOps

    for i, path in enumerate(files):
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        rgb.save(folder / f"{2 * i:02d}.png")
        ImageOps.mirror(rgb).save(folder / f"{2 * i + 1:02d}.png")


def private_folder():
    """A temporary folder only this user can read (tempfile.mkdtemp makes it 0700), deleted on exit."""
    return tempfile.TemporaryDirectory(prefix="iddm-bench-")


def row_numbers(row: dict) -> dict[str, float | None]:
    """The numbers of one method's row that are averaged over identities (flat keys)."""
    out: dict[str, float | None] = {"fsr": row.get("fsr"), "brisque": row.get("brisque")}
    for name, entry in (row.get("recognizers") or {}).items():
        out[f"ism {name}"] = entry.get("ism")
        out[f"match {name}"] = entry.get("match_rate")
        retrieval = entry.get("retrieval") or {}
        out[f"R1 {name}"] = retrieval.get("top1")
        out[f"R5 {name}"] = retrieval.get("top5")
    fidelity = row.get("fidelity") or {}
    out["psnr X'"] = fidelity.get("psnr")
    return out


def mean_sd(values) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation of the finite values (None where there are none), and their count."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, sd, len(xs)


def aggregate(per_identity: dict[str, list[dict]]) -> list[dict]:
    """Method rows (in the order of the first identity) with mean/sd/n per number over identities."""
    methods = [r["method"] for r in next(iter(per_identity.values()))]
    table = []
    for m in methods:
        rows = [r for rows in per_identity.values() for r in rows if r["method"] == m]
        numbers = [row_numbers(r) for r in rows]
        keys = list(dict.fromkeys(k for n in numbers for k in n))
        stats = {k: dict(zip(("mean", "sd", "n"), mean_sd(n.get(k) for n in numbers))) for k in keys}
        table.append({"method": m, "identities": len(rows), "stats": stats,
                      "time_s": mean_sd(r["time_s"] for r in rows)[0]})
    return table


def format_aggregate(table: list[dict]) -> str:
    """One line per method, ``mean +- sd`` for every number (n/a where no identity had a value)."""
    keys = list(dict.fromkeys(k for row in table for k in row["stats"]))
    header = ["method", "ids"] + keys + ["time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in table:
        cells = [row["method"], str(row["identities"])]
        for k in keys:
            s = row["stats"].get(k) or {}
            cells.append("n/a" if s.get("mean") is None else f"{s['mean']:.3f} +- {s['sd']:.3f}")
        cells.append(f"{row['time_s']:.1f}" if row["time_s"] is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gallery_without(layout: dict[str, list[Path]], identity: str) -> dict[str, list[Path]]:
    """The gallery of one identity's evaluation: every other corpus identity (the user enters as "user")."""
    return {k: v for k, v in layout.items() if k != identity}


def run_corpus(args, methods) -> dict:
    """``methods(args, clean, detector, cache) -> list of rows`` runs every method of ``bench paper`` on the photo
    set in ``args.refs``; this runs it per identity and aggregates. Returns {"identities", "per_identity", "table"}."""
    import copy

    from ..cli.evaluate import load_clean_refs
    from ..evaluation.faces import gallery_layout
    from ..face.detect import get_detector

    layout = gallery_layout(args.faces)
    ids = choose_identities(layout, args.identities, args.max_identities)
    detector = get_detector("dlib")
    per_identity: dict[str, list[dict]] = {}
    for n, identity in enumerate(ids, 1):
        print(f"identity {n}/{len(ids)}: {identity}", flush=True)
        with private_folder() as tmp:
            write_photo_set(layout[identity], Path(tmp))
            one = copy.copy(args)
            one.refs, one.gallery = tmp, gallery_without(layout, identity)
            clean = load_clean_refs(tmp, detector)
            per_identity[identity] = methods(one, clean, detector, {})
    return {"identities": ids, "per_identity": per_identity, "table": aggregate(per_identity)}
