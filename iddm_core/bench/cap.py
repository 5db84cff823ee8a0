"""``python -m iddm_core.bench cap``: does CAP make the protected set's styles more alike than ASPL alone?

For each seed, the same photos, model and PGD budget are protected four ways: ASPL alone, and CAP with the
dynamic ratio search scored on fresh draws per candidate (the default, as the paper's Algorithm 1 evaluates L_rec
anew for each candidate), on one draw shared by the candidates, and with the static ratio R. Printed per run:
the Gram-matrix spread of the protected set (measured with the features CAP used), its ratio to ASPL's, the
denoising loss of the protected set under the base model on fixed draws (clean -> protected: the attack's
strength, which CAP should keep), and how often each candidate ratio was picked. The surrogate is fixed (FSMG
with no surrogate training, i.e. the model itself) so that the runs differ only in the PGD.
"""
from __future__ import annotations

import collections
import json


def register(sub) -> None:
    p = sub.add_parser("cap", help="Gram-matrix spread of the protected set: ASPL vs CAP (dynamic, static)")
    p.add_argument("--model", default="demo", help="demo (default), tiny, or a checkpoint path")
    p.add_argument("--photos", default=None, help="folder of photos (default: the package's four public-domain faces)")
    p.add_argument("--resolution", type=int, default=64, help="pixels (default 64)")
    p.add_argument("--steps", type=int, default=12, help="PGD steps (default 12; CAP from half of them on)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds (default 0 1 2)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=run)


VARIANTS = (("ASPL", {}), ("CAP fresh", {"cap": True, "ratio_probe": "fresh"}),
            ("CAP shared", {"cap": True, "ratio_probe": "shared"}), ("CAP static R", {"cap": True, "ratio_steps": 1}))


def measure(bundle, photos, resolution: int, steps: int, seed: int, variants=VARIANTS) -> list[dict]:
    """One row per variant (the first is the reference of ``spread_vs_aspl``)."""
    from ..protection.protect import ProtectConfig, run_protect
    from ..protection.style import measure_style_spread, style_network

    net = style_network(bundle)
    clean_spread = measure_style_spread(net, photos)
    rows = []
    for name, extra in variants:
        cfg = ProtectConfig(method="fsmg", fsmg_steps=0, rounds=1, pgd_steps=steps, resolution=resolution,
                            prior_preservation=False, seed=seed, **extra)
        result = run_protect(bundle, photos, cfg, check_memory=False)
        picks = [s["ratio"] for s in result.report["rounds"][0]["pgd"] if "ratio" in s]
        base = result.report["denoising_loss"]["base"]
        rows.append({"variant": name, "seed": seed, "spread": measure_style_spread(net, result.protected),
                     "clean_spread": clean_spread, "loss_clean": base["clean"],
                     "loss_protected": base["protected"], "picks": picks})
    for row in rows:
        row["spread_vs_aspl"] = row["spread"] / rows[0]["spread"]
    return rows


def describe(row: dict) -> str:
    counts = collections.Counter(row["picks"])
    picks = " ".join(f"{r:g}x{n}" for r, n in sorted(counts.items())) or "-"
    return (f"seed {row['seed']}  {row['variant']:12s} spread {row['spread']:.4g} (clean {row['clean_spread']:.4g}, "
            f"x{row['spread_vs_aspl']:.3f} of ASPL)  L_rec {row['loss_clean']:.4f} -> {row['loss_protected']:.4f}  "
            f"ratios picked {picks}")


def run(args) -> int:
    import torch

    from ..diffusion.loading import load_model
    from ..protection.photo_files import load_photos

    from .. import FACES_DIR

    photos, _ = load_photos(args.photos or FACES_DIR, args.resolution)
    bundle = load_model(args.model)
    print(f"bench cap: model {args.model}, {photos.shape[0]} photos at {args.resolution} px, {args.steps} PGD steps, "
          f"FSMG on the model itself, threads {torch.get_num_threads()}", flush=True)
    rows = []
    for seed in args.seeds:
        for row in measure(bundle, photos, args.resolution, args.steps, seed):
            rows.append(row)
            print(describe(row), flush=True)
    for name, _ in VARIANTS[1:]:
        ratios = [r["spread_vs_aspl"] for r in rows if r["variant"] == name]
        print(f"{name:12s} spread / ASPL's: mean {sum(ratios) / len(ratios):.3f}, "
              f"lower in {sum(x < 1 for x in ratios)}/{len(ratios)} seeds", flush=True)
    if args.json:
        from ..atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(rows, indent=2), overwrite=True)
    return 0
