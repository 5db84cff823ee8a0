"""`batch`: one IDDM LoRA per identity on a Ray cluster, resumable per identity (docs/batch.md)."""
from __future__ import annotations

from pathlib import Path

from ._common import KIND_CHOICES

DESCRIPTION = """\
Train one IDDM LoRA per identity, each job a Ray task on one GPU (or on CPUs when the cluster has none).
--jobs is a jobs.csv (columns id, photos and any per-job setting: model, preset, K, rank, seed, ...) or a folder
of identity folders (one sub-folder of photos per person; optional iddm.json of settings in each). Each job
writes <out>/<job id>.safetensors (atomically) and <out>/<job id>.report.json; <out>/batch_report.json says how
every job went. Run the same command again to skip finished jobs and resume interrupted ones. Logs and reports
name jobs by id only, never by folder or photo name. Needs Ray: pip install -e '.[batch]'."""


def register(sub) -> None:
    from ..protection.options import add_algorithm_args

    p = sub.add_parser("batch", help="many identities: one IDDM LoRA each, on Ray (resumable per identity)",
                       description=DESCRIPTION)
    p.add_argument("--jobs", required=True,
                   help="jobs.csv (id,photos[,setting...]) or a folder of identity folders (job ids: keyed hashes "
                        "of the folder names, see --show-ids)")
    p.add_argument("--out", required=True, help="output folder (on a cluster: storage every node shares)")
    p.add_argument("--address", default=None,
                   help="Ray cluster: 'auto' (the cluster this machine is part of), ray://HOST:10001 (Ray Client), "
                        "'local'; default: RAY_ADDRESS if set, else a Ray started on this machine")
    p.add_argument("--gpus-per-job", type=float, default=None,
                   help="GPUs per job (default: 1 when the cluster has GPUs, else 0 = CPU)")
    p.add_argument("--cpus-per-job", type=int, default=1, help="CPUs per job, also its torch threads (default 1)")
    p.add_argument("--workers", type=int, default=None,
                   help="concurrent jobs (default: as many as the cluster's GPUs, or CPUs, allow)")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="attempts per job when its worker dies (default 3); a job with bad input is not retried")
    p.add_argument("--state-dir", default=None,
                   help="folder of the jobs' resume states (derived private images; deleted per job after success); "
                        "required on a multi-node cluster: storage every node shares. Default: "
                        "$IDDM_CACHE_DIR/state, else ~/.cache/iddm/state")
    p.add_argument("--on-mismatch", choices=["error", "restart"], default="error",
                   help="a job whose saved state belongs to other settings: fail it (error, default) or discard "
                        "the state and start it over (restart)")
    p.add_argument("--report", default=None, help="batch report path (default <out>/batch_report.json)")
    p.add_argument("--show-ids", action="store_true",
                   help="print which job id is which identity folder (on this terminal only) and exit")
    p.add_argument("--model", default="tiny", help="default SD checkpoint of every job (see `iddm train --help`)")
    p.add_argument("--kind", choices=KIND_CHOICES, default=None, help="override model-kind detection")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (for single-file checkpoints)")
    p.add_argument("--n-reference", type=int, default=None, help="size of the reference set Xc (default: half)")
    add_algorithm_args(p)
    p.set_defaults(func=cmd_batch)


def defaults_from_args(args) -> dict:
    """The settings every job starts from (a job's csv cells or iddm.json override them)."""
    from ..batch.jobs import override_types

    return {name: getattr(args, name) for name in override_types()}


def cmd_batch(args) -> int:
    from ..batch import BatchOptions, id_table, import_ray, load_jobs, run_batch
    from ..errors import InputError

    out = Path(args.out).expanduser()
    if not args.show_ids:
        import_ray()                                       # the missing extra is named before any work
    jobs = load_jobs(args.jobs, out)
    if args.show_ids:
        print(id_table(jobs))
        return 0
    if args.max_attempts < 1:
        raise InputError("--max-attempts must be >= 1")
    options = BatchOptions(out=out, state_root=Path(args.state_dir).expanduser() if args.state_dir else None,
                           address=args.address, gpus_per_job=args.gpus_per_job, cpus_per_job=args.cpus_per_job,
                           workers=args.workers, max_attempts=args.max_attempts, on_mismatch=args.on_mismatch,
                           report=Path(args.report) if args.report else None)
    return run_batch(jobs, defaults_from_args(args), options)
