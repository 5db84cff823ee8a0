"""`python -m iddm_core.bench verify --faces DIR`: how well each installed recogniser tells people apart.

    python -m iddm_core.bench verify --faces ../shared/faces/congress

``DIR`` is a folder-per-identity corpus (``DIR/<identity>/*.jpg``; a flat folder whose file names carry the
identity works too). Every photo's largest face (dlib HOG) is embedded by every installed recogniser; every pair
of photos of one identity is a *same* pair, every pair of photos of two identities a *different* pair. Per
recogniser it prints the ROC AUC, the equal error rate (EER) and its threshold, and the thresholds at which 1 % and
0.1 % of the different pairs are accepted (false accepts), with the share of same pairs accepted there (TAR).

Scores: the cosine of the L2-normalised embeddings (accept at or above the threshold), and for dlib also dlib's own
rule, the Euclidean distance of its raw 128-D descriptors (accept at or below; dlib documents 0.6). The shipped
match thresholds (``iddm_core.evaluation.judges.MATCH_THRESHOLDS``) are the 1 %-false-accept points this prints on the
congress corpus (docs/evaluation.md). Nothing printed names a photo or an identity.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass

import numpy as np

FARS = (0.01, 0.001)


def register(sub) -> None:
    p = sub.add_parser("verify", help="AUC / EER / 1 %% and 0.1 %% false-accept thresholds of every recogniser",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faces", required=True, help="folder-per-identity face corpus (or a flat folder, identity in "
                                                  "the file name)")
    p.add_argument("--recognizers", default="all", help="comma-separated recognisers (default: all installed)")
    p.add_argument("--max-identities", type=int, default=0,
                   help="use only the first N identities in sorted order (0 = all)")
    p.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                   help="models folder to search for recognisers (repeatable; $IDDM_MODEL_DIRS too)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out-json", default=None, help="also write the numbers as JSON")
    p.set_defaults(func=cmd_verify)


# ------------------------------------------------------------------------------------------ pure pieces

def pair_scores(values: np.ndarray, identities: list, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(same-pair scores, different-pair scores) over every unordered pair of rows of ``values`` [N, D].

    ``metric`` "cosine": rows are L2-normalised first, score = cosine (higher = same person); "euclidean":
    score = Euclidean distance (lower = same person)."""
    x = np.asarray(values, dtype=np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        scores = x @ x.T
    elif metric == "euclidean":
        sq = (x * x).sum(1)
        scores = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0))
    else:
        raise ValueError(f"metric={metric!r}: 'cosine' or 'euclidean'")
    ids = np.asarray(identities)
    i, j = np.triu_indices(len(x), k=1)
    same = ids[i] == ids[j]
    return scores[i, j][same], scores[i, j][~same]


def roc_auc(same: np.ndarray, diff: np.ndarray, higher_is_same: bool = True) -> float:
    """Probability that a random same pair scores as "more alike" than a random different pair (ties count half)."""
    from scipy.stats import rankdata

    s, d = (same, diff) if higher_is_same else (-np.asarray(same), -np.asarray(diff))
    ranks = rankdata(np.concatenate([s, d]))
    n_s, n_d = len(s), len(d)
    return float((ranks[:n_s].sum() - n_s * (n_s + 1) / 2) / (n_s * n_d))


def accept_rates(same: np.ndarray, diff: np.ndarray, threshold: float, higher_is_same: bool = True):
    """(true accept rate, false accept rate) of the rule "accept when the score is at or beyond ``threshold``"."""
    if higher_is_same:
        return float(np.mean(same >= threshold)), float(np.mean(diff >= threshold))
    return float(np.mean(same <= threshold)), float(np.mean(diff <= threshold))


def threshold_at_far(diff: np.ndarray, far: float, higher_is_same: bool = True) -> float:
    """The strictest-but-one threshold whose false accept rate is at most ``far``: with the different pairs' scores
    sorted from most to least alike, the first score beyond the ``floor(far * n)`` most alike ones (the accepted
    ones), moved by one float step so that score itself is refused."""
    d = np.sort(np.asarray(diff, dtype=np.float64))
    if higher_is_same:
        d = d[::-1]
    k = int(math.floor(far * len(d)))
    edge = d[min(k, len(d) - 1)]
    return float(np.nextafter(edge, np.inf if higher_is_same else -np.inf))


def equal_error_rate(same: np.ndarray, diff: np.ndarray, higher_is_same: bool = True) -> tuple[float, float]:
    """(EER, its threshold): the candidate threshold (every observed score) where the false accept rate and the
    false reject rate are closest; EER is their mean there."""
    sign = 1.0 if higher_is_same else -1.0
    s, d = np.sort(sign * np.asarray(same)), np.sort(sign * np.asarray(diff))
    candidates = np.unique(np.concatenate([s, d]))
    far = 1.0 - np.searchsorted(d, candidates, side="left") / len(d)        # share of diff >= t
    frr = np.searchsorted(s, candidates, side="left") / len(s)              # share of same < t
    best = int(np.argmin(np.abs(far - frr)))
    return float((far[best] + frr[best]) / 2), float(sign * candidates[best])


@dataclass
class Verification:
    metric: str
    higher_is_same: bool
    n_same: int
    n_different: int
    auc: float
    eer: float
    eer_threshold: float
    at_far: dict            # far -> {"threshold": t, "tar": true accept rate, "far": achieved false accept rate}
    same_mean: float
    different_mean: float

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["at_far"] = {f"{k:g}": v for k, v in self.at_far.items()}
        return out


def verification_stats(same: np.ndarray, diff: np.ndarray, metric: str, fars=FARS) -> Verification:
    higher = metric == "cosine"
    if len(same) == 0 or len(diff) == 0:
        from ..errors import InputError

        raise InputError("--faces: need at least one identity with two photos with a face and two identities")
    eer, eer_t = equal_error_rate(same, diff, higher)
    at = {}
    for far in fars:
        t = threshold_at_far(diff, far, higher)
        tar, achieved = accept_rates(same, diff, t, higher)
        at[far] = {"threshold": t, "tar": tar, "far": achieved}
    return Verification(metric, higher, len(same), len(diff), roc_auc(same, diff, higher), eer, eer_t, at,
                        float(np.mean(same)), float(np.mean(diff)))


# ------------------------------------------------------------------------------------------ the run

def corpus_faces(layout: dict, detector, max_identities: int = 0):
    """(uint8 photos, landmarks [1, P, 2] each, identity index per photo, photos without a face) over the corpus."""
    import torch

    from ..images import load_rgb

    photos, marks, ids, faceless = [], [], [], 0
    for index, identity in enumerate(sorted(layout)[: max_identities or None]):
        for path in layout[identity]:
            rgb = load_rgb(path)
            faces = detector.detect(rgb)
            if not faces:
                faceless += 1
                continue
            photos.append(rgb)
            marks.append(torch.as_tensor(faces[0].points(), dtype=torch.float32)[None])
            ids.append(index)
    return photos, marks, np.asarray(ids), faceless


def raw_descriptors(rec, photos, marks, device, batch: int = 32) -> np.ndarray:
    """The recogniser's raw (not normalised) outputs [N, D] of each photo's face: each face aligned on its own (the
    photos differ in size), the network run on batches of aligned crops."""
    import torch

    from ..images import to_tensor

    rows = []
    with torch.inference_mode():
        for start in range(0, len(photos), batch):
            crops = torch.cat([rec.align(to_tensor(rgb)[None].to(device), lm.to(device))
                               for rgb, lm in zip(photos[start:start + batch], marks[start:start + batch])])
            rows.append(rec(crops).float().cpu().numpy())
    return np.concatenate(rows)


def cmd_verify(args) -> int:
    from ..cli._common import pick_device
    from ..errors import InputError
    from ..evaluation.faces import gallery_layout
    from ..face.detect import get_detector
    from ..face.registry import default_search_dirs, discover, load_recognizer

    layout = gallery_layout(args.faces)
    dirs = list(args.models_dir) + default_search_dirs()
    installed = {s.name: s for s in discover(dirs) if s.available}
    wanted = list(installed) if args.recognizers == "all" else [n.strip() for n in args.recognizers.split(",") if n.strip()]
    missing = [n for n in wanted if n not in installed]
    if missing:
        raise InputError(f"--recognizers: not installed: {', '.join(missing)} (installed: {', '.join(installed)})")
    start = time.time()
    photos, marks, ids, faceless = corpus_faces(layout, get_detector("dlib"), args.max_identities)
    n_ids = len(set(ids.tolist()))
    print(f"corpus: {len(photos)} photos with a face of {n_ids} identities ({faceless} without a face); "
          f"detection {time.time() - start:.0f}s")
    device = pick_device(args.device)
    results = {}
    for name in wanted:
        t0 = time.time()
        rec = load_recognizer(installed[name], device).eval()
        raw = raw_descriptors(rec, photos, marks, device)
        metrics = ["cosine"] + (["euclidean"] if name == "dlib" else [])
        for metric in metrics:
            same, diff = pair_scores(raw, ids, metric)
            results[f"{name} ({metric})"] = verification_stats(same, diff, metric)
        print(f"  {name}: {time.time() - t0:.0f}s")
    print(format_table(results))
    if args.out_json:
        from ..atomic import write_text_atomic

        payload = {"photos": len(photos), "identities": n_ids, "faceless": faceless,
                   "recognizers": {k: v.to_dict() for k, v in results.items()}}
        write_text_atomic(args.out_json, json.dumps(payload, indent=2), overwrite=True)
    return 0


def format_table(results: dict) -> str:
    head = ("recogniser (score)", "same", "different", "AUC", "EER", "EER thr", "1% FA thr (TAR)",
            "0.1% FA thr (TAR)", "mean same / diff")
    rows = [head]
    for name, v in results.items():
        at1, at01 = v.at_far[0.01], v.at_far[0.001]
        rows.append((name, str(v.n_same), str(v.n_different), f"{v.auc:.4f}", f"{v.eer:.3f}", f"{v.eer_threshold:.3f}",
                     f"{at1['threshold']:.3f} ({at1['tar']:.2f})", f"{at01['threshold']:.3f} ({at01['tar']:.2f})",
                     f"{v.same_mean:.3f} / {v.different_mean:.3f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows)
