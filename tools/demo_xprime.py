"""IDDM's X' on the demo run, with and without the Stage II transfer options and the PSNR floor.

    python tools/demo_xprime.py [--variants default,transfer,psnr30,transfer+psnr30]

Runs the demo's IDDM (``iddm demo``'s model, photos and settings, ``demo.inputs.demo_config``) once per variant
and prints X''s PSNR against X0 and each judge's cosine of X0 and X' to the reference photos' prototype (dlib: the
surrogate; faceres, mobileface, faceres-deep where installed: held out), each judge finding the face again on the
8-bit X'. It measures what the protected photos look
like to recognisers; what a LoRA trained on them generates is `iddm demo` / `bench paper`'s question. Pass models
folders with --models-dir (mobileface and faceres-deep live outside the pack). CPU, ~30 s per variant on 2 cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

VARIANTS = {
    "default": {},
    "transfer": {"transfer": {"diversity": 1.0, "samples": 4}},
    "psnr30": {"psnr": 30.0},
    "transfer+psnr30": {"transfer": {"diversity": 1.0, "samples": 4}, "psnr": 30.0},
}


def main() -> int:
    import torch

    from iddm_core.bench.transfer import judge_cosines, judge_faces, mean_of, quantize
    from iddm_core.diffusion.loading import load_model
    from iddm_core.demo.inputs import demo_config, demo_photos
    from iddm_core.evaluation.faces import embed
    from iddm_core.evaluation.metrics import cosine_to, prototype, psnr
    from iddm_core.face.detect import get_detector
    from iddm_core.face.registry import default_search_dirs, discover, load_recognizer
    from iddm_core.face.transfer import TransferOptions
    from iddm_core.protection.iddm import run_iddm
    from iddm_core.protection.refs import refs_from_photos

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--models-dir", action="append", default=[], metavar="DIR")
    args = p.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; use {', '.join(VARIANTS)}")

    torch.manual_seed(0)
    detector = get_detector("dlib")
    base = demo_config().validate()
    refs = refs_from_photos(demo_photos(), base.resolution, detector, seed=base.seed)
    x_ref, lm_ref = refs.reference()
    x0, lm0 = refs.protect()
    judges = {s.name: load_recognizer(s, "cpu") for s in discover(list(args.models_dir) + default_search_dirs())
              if s.available and s.name in ("dlib", "faceres", "mobileface", "faceres-deep")}
    protos = {n: prototype(embed(r, x_ref, lm_ref)) for n, r in judges.items()}
    print(f"demo run: K {base.K}, T {base.pgd.T}, rho {base.pgd.rho}, eta {base.pgd.eta}, surrogates "
          f"{','.join(base.surrogates)}; {x0.shape[0]} protected photos; judges {', '.join(judges)}")
    print("| variant | PSNR X' | " + " | ".join(f"{n} X0 -> X'" for n in judges) + " | seconds |")
    print("|---|---|" + "---|" * len(judges) + "---|")
    for name in names:
        change = dict(VARIANTS[name])
        if "transfer" in change:
            change["transfer"] = TransferOptions(**change["transfer"])
        config = dataclasses.replace(base, pgd=dataclasses.replace(base.pgd, **change)).validate()
        t0 = time.perf_counter()
        result = run_iddm(load_model("demo"), refs, config)
        seconds = time.perf_counter() - t0
        saved = quantize(result.protected)
        found = judge_faces(saved, detector)          # a judge detects the face again on the saved X'
        cells = []
        for n, r in judges.items():
            before = float(cosine_to(embed(r, x0, lm0), protos[n]).mean())
            after = mean_of(judge_cosines(r, saved, found, [protos[n]] * len(found)))
            lost = sum(f is None for f in found)
            cells.append(f"{before:.3f} -> {'n/a' if after is None else f'{after:.3f}'}"
                         + (f" ({lost} no face)" if lost else ""))
        print(f"| {name} | {float(psnr(result.protected, x0).mean()):.1f} dB | " + " | ".join(cells) +
              f" | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
