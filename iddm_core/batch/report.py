"""The batch report (JSON, rewritten atomically after every job state change) and the console progress.

Per job: ``status`` (:data:`STATUSES`), ``attempts`` (in this run), ``time_s`` (wall time of this run's attempts),
``output`` / ``report`` (file names in the output folder), ``final_similarity`` (recogniser -> cosine similarity of
the final protected photos to the reference prototype), ``resumed_from_iteration`` (the finished iteration whose
saved state the last attempt continued from; 0: it started from iteration 1), ``error``, ``warnings``. Jobs are
keyed by job id: no photo folder, photo name or path is ever written here or printed.
"""
from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

from ..atomic import write_text_atomic

FORMAT = 1
STATUSES = ("pending", "running", "retrying", "done", "already_done", "failed", "interrupted")
FINISHED = ("done", "already_done", "failed")


class BatchReport:
    """Job states of one batch run: every change is printed as one line (plus the overall bar) and written to
    ``path`` atomically, so the file is current even if the driver dies."""

    def __init__(self, path, job_ids: list[str], stream=None, width: int = 30):
        self.path = Path(path)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.start = time.perf_counter()
        self.meta = {"format": FORMAT, "state": "running",
                     "started": datetime.datetime.now().replace(microsecond=0).isoformat()}
        self.jobs = {j: {"status": "pending", "attempts": 0, "time_s": 0.0} for j in job_ids}

    # -- state changes
    def set(self, job_id: str, status: str, note: str = "", write: bool = True, **fields) -> None:
        """Job ``job_id`` is now ``status`` (``fields`` update its entry; None values remove a field); one line
        ``job <id>: <status>[: note]`` and the bar go to the console, the report to disk."""
        assert status in STATUSES, status
        entry = self.jobs[job_id]
        entry["status"] = status
        for key, value in fields.items():
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = value
        self._print(f"job {job_id}: {status.replace('_', ' ')}{': ' + note if note else ''}")
        if write:
            self.write()

    def counts(self) -> dict:
        out = {s: 0 for s in STATUSES}
        for entry in self.jobs.values():
            out[entry["status"]] += 1
        return {s: n for s, n in out.items() if n}

    def finish(self, state: str) -> None:
        """The batch ended: ``state`` is "finished" or "cancelled"."""
        self.meta["state"] = state
        self.write()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    # -- output
    def to_dict(self) -> dict:
        return {**self.meta, "elapsed_s": round(time.perf_counter() - self.start, 3), "counts": self.counts(),
                "jobs": self.jobs}

    def write(self) -> None:
        write_text_atomic(self.path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    def bar(self) -> str:
        total = len(self.jobs)
        counts = self.counts()
        finished = sum(counts.get(s, 0) for s in FINISHED)
        filled = int(self.width * finished / total) if total else self.width
        parts = [f"[{'#' * filled}{'-' * (self.width - filled)}] {finished}/{total} finished"]
        detail = [f"{counts[s]} {s.replace('_', ' ')}" for s in ("failed", "running", "retrying", "interrupted")
                  if counts.get(s)]
        if detail:
            parts.append(f"({', '.join(detail)})")
        parts.append(f"{time.perf_counter() - self.start:.0f}s")
        return " ".join(parts)

    def _print(self, line: str) -> None:
        if self.tty:        # the line above, the bar redrawn below it
            self.stream.write(f"\r\033[K{line}\n{self.bar()}")
        else:
            self.stream.write(f"{line}\nprogress {self.bar()}\n")
        self.stream.flush()


def job_note(result: dict) -> str:
    """What a finished job's line says: its time, where it resumed, its final similarities."""
    parts = [f"{result.get('time_s', 0):.1f}s"]
    if result.get("resumed_from_iteration"):
        parts.append(f"resumed after iteration {result['resumed_from_iteration']}")
    sims = result.get("final_similarity") or {}
    if sims:
        parts.append("similarity " + ", ".join(f"{k} {v:.3f}" for k, v in sims.items()))
    return ", ".join(parts)


def read_job_report(path) -> dict:
    """``final_similarity`` and the like from a finished job's own report (run_iddm's), {} when unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {}
    if isinstance(data.get("final_similarity"), dict):
        out["final_similarity"] = data["final_similarity"]
    resumed = (data.get("resume") or {}).get("resumed_after")
    if resumed:
        out["resumed_from_iteration"] = int(resumed)
    return out
