"""The Ray side of ``iddm batch``: one actor per worker (its CPUs and GPU), jobs handed to idle actors, retries.

The driver (this module) decides everything a job needs before it runs (settings, output and state paths) and
keeps the batch report; actors (worker.BatchWorker) only run jobs. Exactly once: a job's LoRA is written
atomically as ``<out>/<job id>.safetensors``, and a job whose LoRA exists is not run again. A job whose worker
died (process killed, node lost) is handed, up to ``max_attempts`` times in all, to a fresh actor, and resumes
from its last finished iteration (the state folder is on storage every node shares). A job that fails (bad
photos, bad settings) fails alone; Ctrl-C kills the actors (every state write is atomic, so each job keeps the
state of its last finished iteration) and the next run of the same command continues.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .jobs import Job
from .report import BatchReport, job_note, read_job_report
from .worker import BatchWorker, describe

EXTRA = "pip install -e '.[batch]'"
BUILTIN_MODELS = ("tiny", "demo", "demo-v2")
MARKER = ".iddm-batch"


STOP_WAIT_S = 1800     # waiting for killed workers' jobs to end: a hang guard, not a time limit


def import_ray():
    """``ray``, or an InputError naming the optional extra that brings it."""
    try:
        import ray
    except ImportError:
        raise InputError("iddm batch runs on Ray, which is not installed: install the 'batch' extra "
                         f"({EXTRA} in the IDDM checkout, or pip install 'ray[default]>=2.9')") from None
    return ray


@dataclass
class BatchOptions:
    out: Path                            # LoRAs, their reports, batch_report.json (shared storage on a cluster)
    state_root: Path | None = None       # resume states; None: this machine's cache (refused on a multi-node cluster)
    address: str | None = None           # None / "local": a Ray on this machine; "auto"; "ray://host:10001"
    gpus_per_job: float | None = None    # None: 1 when the cluster has a GPU, else 0
    cpus_per_job: int = 1                # also each worker's torch threads
    workers: int | None = None           # None: as many as the cluster's GPUs (CPUs) allow, at most one per job
    max_attempts: int = 3                # per job, counting the first; only a dead worker earns another
    on_mismatch: str = "error"           # a state of other settings: "error" (job fails) or "restart"
    report: Path | None = None           # default <out>/batch_report.json
    poll_s: float = 0.5


# ---------------------------------------------------------------------------------------------- preparation
def state_dir(options: BatchOptions, root: Path, job_id: str) -> Path:
    from ..training.checkpoint import state_dir_keyed

    return state_dir_keyed(f"{options.out.resolve()}\n{job_id}", root, namespace="batch")


def _absolute(settings: dict) -> dict:
    """Model, tokenizer and class-image paths made absolute (workers may start in another folder)."""
    out = dict(settings)
    for key in ("model", "tokenizer", "class_images"):
        value = out.get(key)
        if value and str(value) not in BUILTIN_MODELS and Path(str(value)).expanduser().exists():
            out[key] = str(Path(str(value)).expanduser().resolve())
    return out


def _check_settings(job: Job, settings: dict) -> str | None:
    """The job's settings error (the message of `iddm train`'s own check), or None."""
    from ..protection.options import config_from_args

    if job.error:
        return job.error
    try:
        config_from_args(argparse.Namespace(**settings))
    except InputError as exc:
        return describe(exc, job.id, job.photos)
    return None


def _write_markers(out: Path, root: Path) -> list:
    """A fresh token in the output and state folders; workers check they see it (worker.check_shared)."""
    from ..atomic import write_text_atomic

    token = secrets.token_hex(16)
    name = f"{MARKER}-{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]}"
    write_text_atomic(out / MARKER, token + "\n")
    write_text_atomic(root / name, token + "\n")
    return [(str((out / MARKER).resolve()), token, "output (--out)"),
            (str((root / name).resolve()), token, "state (--state-dir)")]


def prepare(jobs: list[Job], defaults: dict, options: BatchOptions, root: Path, report: BatchReport,
            local_paths: bool) -> dict:
    """{job id: spec} of the jobs to run; the others are marked failed (bad input) or already done in ``report``.
    ``local_paths``: photo folders can be checked from here (not through a Ray Client)."""
    from ..training import checkpoint as ckpt

    markers = _write_markers(options.out, root)
    specs = {}
    for job in jobs:
        lora, job_report = options.out / f"{job.id}.safetensors", options.out / f"{job.id}.report.json"
        state = state_dir(options, root, job.id)
        if lora.is_file():
            ckpt.clear_state(state)                     # finished, then stopped before its state was removed
            report.set(job.id, "already_done", write=False, output=lora.name,
                       report=job_report.name if job_report.is_file() else None, **read_job_report(job_report))
            continue
        settings = _absolute(job.settings(defaults))
        error = _check_settings(job, settings)
        if error is None and local_paths and not job.photos.is_dir():
            error = f"the photo folder of job {job.id} does not exist (or is not a folder)"
        if error:
            report.set(job.id, "failed", error, write=False, error=error)
            continue
        for name in (lora.name, job_report.name):              # writes cut short by a killed worker
            for leftover in options.out.glob(f".{name}.*.tmp"):
                leftover.unlink(missing_ok=True)
        specs[job.id] = {"job_id": job.id, "photos": str(job.photos.resolve()), "settings": settings,
                         "out": str(lora.resolve()), "report": str(job_report.resolve()), "state_dir": str(state),
                         "state_root": str(root), "on_mismatch": options.on_mismatch, "markers": markers}
    report.write()
    return specs


# ----------------------------------------------------------------------------------------------------- Ray
def connect(ray, address: str | None) -> bool:
    """Join (or start) Ray; True when this call started the connection (and so must end it)."""
    if ray.is_initialized():
        return False
    kwargs = {"address": address} if address else {}
    ray.init(logging_level=logging.WARNING, **kwargs)
    return True


def plan(ray, options: BatchOptions, n_jobs: int) -> tuple[float, int, int]:
    """(GPUs per job, CPUs per job, workers) for this cluster; InputError when a job could never be placed or
    the resume state would not be on shared storage."""
    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    gpj = options.gpus_per_job if options.gpus_per_job is not None else (1.0 if gpus >= 1 else 0.0)
    cpj = int(options.cpus_per_job)
    if gpj < 0 or cpj < 1:
        raise InputError("--gpus-per-job must be >= 0 and --cpus-per-job >= 1")
    if gpj > gpus:
        raise InputError(f"--gpus-per-job {gpj:g}: the Ray cluster has {gpus:g} GPU(s); use --gpus-per-job 0 to "
                         "train on CPUs")
    if cpj > cpus:
        raise InputError(f"--cpus-per-job {cpj}: the Ray cluster has {cpus:g} CPU(s)")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    remote = bool(options.address and str(options.address).startswith("ray://"))
    if options.state_root is None and (len(nodes) > 1 or remote):
        raise InputError(f"the Ray cluster has {len(nodes)} node(s){' (through Ray Client)' if remote else ''}: pass "
                         "--state-dir on storage every node shares (as --out must be), so that a job can resume "
                         "on another node")
    capacity = int(gpus // gpj) if gpj else int(cpus // cpj)
    workers = options.workers or max(1, min(capacity, n_jobs))
    return gpj, cpj, workers


def _outcome(ray, ref):
    """("result", dict) | ("died", exception class name) | ("error", exception class name)."""
    died = tuple(getattr(ray.exceptions, n) for n in ("RayActorError", "WorkerCrashedError", "NodeDiedError",
                                                        "ObjectLostError", "OwnerDiedError")
                 if hasattr(ray.exceptions, n))
    try:
        return "result", ray.get(ref)
    except died as exc:
        return "died", exc.__class__.__name__
    except ray.exceptions.RayError as exc:   # e.g. an exception that escaped the job (its text is not shown)
        return "error", exc.__class__.__name__


class Scheduler:
    """Hands jobs to idle actors, replaces dead ones and retries their jobs; ``run`` returns "finished" or
    "cancelled" (Ctrl-C)."""

    def __init__(self, ray, specs: dict, report: BatchReport, options: BatchOptions, gpj: float, cpj: int):
        self.ray, self.specs, self.report, self.options = ray, specs, report, options
        self.actor_class = ray.remote(BatchWorker).options(num_cpus=cpj, num_gpus=gpj, max_restarts=0,
                                                           max_task_retries=0)
        self.cpj, self.device = cpj, "cuda" if gpj > 0 else "cpu"   # Ray sets CUDA_VISIBLE_DEVICES per actor
        self.pending = deque(specs)
        self.idle, self.inflight, self.actors = [], {}, []
        self.attempts = {job_id: 0 for job_id in specs}

    def new_actor(self):
        actor = self.actor_class.remote(self.cpj, self.device)
        self.actors.append(actor)
        return actor

    def run(self, workers: int) -> str:
        try:
            self.idle = [self.new_actor() for _ in range(workers)]
            while self.pending or self.inflight:
                self._submit()
                ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=self.options.poll_s)
                for ref in ready:
                    self._collect(ref)
            return "finished"
        except KeyboardInterrupt:
            for job_id, _, t0 in list(self.inflight.values()):
                self._add_time(job_id, t0)
            for job_id, entry in self.report.jobs.items():
                if entry["status"] in ("running", "retrying"):
                    self.report.set(job_id, "interrupted", "cancelled; its state of the last finished iteration is "
                                    "kept: run the batch again to continue", write=False)
            return "cancelled"
        finally:
            self._stop_actors()

    def _stop_actors(self) -> None:
        """Kill every actor (not asked: a running job may be mid-iteration; its last saved state is whole), then
        wait until their running jobs have ended, so no worker writes after the batch returns (killed actors end at
        once; STOP_WAIT_S only stops a hang, and a second Ctrl-C ends the wait)."""
        refs = list(self.inflight)
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        if refs:
            try:
                self.ray.wait(refs, num_returns=len(refs), timeout=STOP_WAIT_S)
            except Exception:  # noqa: BLE001 - best effort
                pass
        self.inflight.clear()

    def _submit(self) -> None:
        while self.pending and self.idle:
            job_id, actor = self.pending.popleft(), self.idle.pop(0)
            self.attempts[job_id] += 1
            n = self.attempts[job_id]
            ref = actor.run.options(name=f"iddm-job:{job_id}").remote(self.specs[job_id])
            self.inflight[ref] = (job_id, actor, time.perf_counter())
            self.report.set(job_id, "running", f"attempt {n} of at most {self.options.max_attempts}", attempts=n)

    def _add_time(self, job_id: str, t0: float) -> None:
        entry = self.report.jobs[job_id]
        entry["time_s"] = round(entry.get("time_s", 0.0) + time.perf_counter() - t0, 3)

    def _collect(self, ref) -> None:
        job_id, actor, t0 = self.inflight.pop(ref)
        kind, value = _outcome(self.ray, ref)
        self._add_time(job_id, t0)
        n, most = self.attempts[job_id], self.options.max_attempts
        if kind == "died":
            try:                        # lost, not just slow: make sure it never writes again
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
            self.idle.append(self.new_actor())
            if n < most:
                self.pending.appendleft(job_id)
                self.report.set(job_id, "retrying", f"its worker died during attempt {n} ({value}); trying again")
            else:
                msg = (f"its worker died in each of its {n} attempt(s) (out of memory? the Ray logs of the worker "
                       "nodes say why); its state of the last finished iteration is kept")
                self.report.set(job_id, "failed", msg, error=msg)
            return
        self.idle.append(actor)
        if kind == "error":
            msg = f"worker error ({value})"
            self.report.set(job_id, "failed", msg, error=msg)
        elif value.get("status") == "done":
            self._done(job_id, value)
        else:
            self.report.set(job_id, "failed", value.get("error", "failed"), error=value.get("error", "failed"))

    def _done(self, job_id: str, result: dict) -> None:
        out = Path(self.specs[job_id]["out"])
        fields = {k: result.get(k) for k in ("resumed_from_iteration", "final_similarity", "train_time_s",
                                             "model_reused", "device", "discarded_state")}
        fields["warnings"] = result.get("warnings") or None
        fields.update(output=out.name, report=Path(self.specs[job_id]["report"]).name, error=None)
        entry = self.report.jobs[job_id]
        self.report.set(job_id, "done", job_note({**entry, **fields}), **fields)


# ---------------------------------------------------------------------------------------------------- batch
def run_batch(jobs: list[Job], defaults: dict, options: BatchOptions, stream=None) -> int:
    """Run ``jobs`` (jobs.load_jobs) with ``defaults`` (the `iddm train` settings a job does not override).
    Returns 0 when every job is done, 1 when one failed, 130 when cancelled; the report says which."""
    from ..training.checkpoint import _make_private_dirs, cache_root

    ray = import_ray()
    options.out.mkdir(parents=True, exist_ok=True)
    root = Path(options.state_root or cache_root() / "state").expanduser()
    _make_private_dirs(root)                                  # 0700: states hold derived private images
    report = BatchReport(options.report or options.out / "batch_report.json", [j.id for j in jobs], stream)
    remote = bool(options.address and str(options.address).startswith("ray://"))
    specs = prepare(jobs, defaults, options, root, report, local_paths=not remote)
    state = "finished"
    if specs:
        started = False
        try:
            started = connect(ray, options.address)
            gpj, cpj, workers = plan(ray, options, len(specs))
            report.meta.update(workers=workers, gpus_per_job=gpj, cpus_per_job=cpj)
            report.stream.write(f"batch: {len(specs)} job(s) to run on {workers} worker(s), {gpj:g} GPU + {cpj} CPU "
                                f"each; report: {report.path}\n")
            state = Scheduler(ray, specs, report, options, gpj, cpj).run(workers)
        except KeyboardInterrupt:              # before any job started: nothing to interrupt
            state = "cancelled"
        finally:
            if started:
                ray.shutdown()
    report.finish(state)
    counts = report.counts()
    summary = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items())
    report.stream.write(f"batch {state}: {summary}; report: {report.path}\n")
    if state == "cancelled":
        report.stream.write("cancelled: finished LoRAs are kept and every other job is resumable: run the same "
                            "command again to continue\n")
        return 130
    return 1 if counts.get("failed") else 0
