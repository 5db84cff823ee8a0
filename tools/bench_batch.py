"""Throughput of `iddm batch` with 2 workers vs 1 on the same jobs (issue 28): prints both times and the ratio.

    python tools/bench_batch.py                   # 4 jobs, tiny model, CPU, a local Ray with 2 CPUs
    python tools/bench_batch.py --jobs 8 --K 3 --ft-steps 8

Each job is a small IDDM run on the tiny model with the package's sample photos (one identity folder per job, a
different seed each). Both batches start their own workers (so each time includes the workers' start and their one
model load) on one local Ray started once; the ratio is time(1 worker) / time(2 workers), i.e. how much more
throughput the second worker brings. A benchmark, not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make_identities(folder: Path, n: int) -> Path:
    """``n`` identity folders of the sample photos (two photos of one person and their mirror images) and a
    jobs.csv giving job i seed i."""
    from PIL import Image

    from iddm_core import FACES_DIR

    rows = ["id,photos,seed"]
    for i in range(n):
        person = folder / "people" / f"person{i}"
        person.mkdir(parents=True)
        for j, name in enumerate(("obama.jpg", "obama2.jpg")):
            im = Image.open(FACES_DIR / name).convert("RGB")
            im.save(person / f"{j}.jpg")
            im.transpose(Image.FLIP_LEFT_RIGHT).save(person / f"{j}_m.jpg")
        rows.append(f"job{i},{person},{i}")
    (folder / "jobs.csv").write_text("\n".join(rows) + "\n")
    return folder / "jobs.csv"


def run_once(jobs_csv: Path, work: Path, workers: int, train_args: list[str]) -> tuple[float, dict]:
    """Wall time of one batch with ``workers`` workers (fresh output and state folders) and its report."""
    from iddm_core.batch import BatchOptions, load_jobs, run_batch
    from iddm_core.cli import build_parser
    from iddm_core.cli.batch import defaults_from_args

    out, state = work / f"out{workers}", work / f"state{workers}"      # fresh: no job is already done
    args = build_parser().parse_args(["batch", "--jobs", str(jobs_csv), "--out", str(out), *train_args])
    options = BatchOptions(out=out, state_root=state, workers=workers, cpus_per_job=1, gpus_per_job=0)
    t0 = time.perf_counter()
    rc = run_batch(load_jobs(jobs_csv, out), defaults_from_args(args), options, stream=sys.stderr)
    elapsed = time.perf_counter() - t0
    report = json.loads((out / "batch_report.json").read_text())
    if rc != 0:
        raise SystemExit(f"the {workers}-worker batch failed: {report['counts']}")
    return elapsed, report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=4, help="identities (jobs) per batch (default 4)")
    p.add_argument("--K", type=int, default=2)
    p.add_argument("--T", type=int, default=3)
    p.add_argument("--ft-steps", type=int, default=6)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    p.add_argument("--repeat", type=int, default=1, help="measure each count this many times, take the median")
    args = p.parse_args(argv)

    import ray

    train_args = ["--model", "tiny", "--K", str(args.K), "--T", str(args.T), "--ft-steps", str(args.ft_steps),
                  "--resolution", str(args.resolution), "--no-prior"]
    work = Path(tempfile.mkdtemp(prefix="iddm-bench-batch-"))
    try:
        jobs_csv = make_identities(work, args.jobs)
        ray.init(num_cpus=args.cpus, num_gpus=0, include_dashboard=False, object_store_memory=100 * 2 ** 20,
                 logging_level=logging.WARNING)
        times = {1: [], 2: []}
        for r in range(args.repeat):
            for workers in ((1, 2) if r % 2 == 0 else (2, 1)):     # alternate the order: no warm-up bias
                elapsed, report = run_once(jobs_csv, work / f"r{r}", workers, train_args)
                times[workers].append(elapsed)
                train = sum(j.get("train_time_s", 0) for j in report["jobs"].values())
                print(f"{workers} worker(s): {args.jobs} jobs in {elapsed:.1f}s ({60 * args.jobs / elapsed:.1f} "
                      f"jobs/min; IDDM itself {train:.1f}s of it, summed over jobs)", flush=True)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t1, t2 = statistics.median(times[1]), statistics.median(times[2])
    print(f"throughput ratio 2 workers / 1 worker: {t1 / t2:.2f}x (median of {args.repeat}: {t1:.1f}s vs {t2:.1f}s; "
          f"{args.jobs} jobs, K={args.K} T={args.T} ft_steps={args.ft_steps} at {args.resolution}px, CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
