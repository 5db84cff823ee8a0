"""The report of an IDDM run, as its loop (protection/iddm.py) fills it.

:class:`IDDMReport` is the report as it grows: a header (settings, schedule, sizes, the runtime's precision and
checkpointing), one record per outer iteration, and at the end the timings, the low-precision failures and the
similarity of X' to the references. It is also the run's clock, and its part of the resume state.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class IDDMReport:
    """The report of one run (``data``, written as JSON) and its clock.

    The clock starts when the report is made, before any setup; a resumed run's total also counts the time of the
    part that was interrupted (``restore``)."""

    def __init__(self, config, refs, runtime):
        self.t_start = time.perf_counter()
        self.timings = {"finetune": 0.0, "pgd": 0.0}
        self.resume_info: dict = {}      # {"discarded": why} or {"resumed_after": k}; only when there is something
        self.data = {"config": config.to_dict(), "schedule": config.pgd.schedule(), "resolution": refs.resolution,
                     **runtime.describe(), "n_reference": len(refs.split.reference),
                     "n_protect": len(refs.split.protect), "iterations": []}

    @property
    def iterations(self) -> list:
        return self.data["iterations"]

    @contextmanager
    def timed(self, kind: str, device):
        """Adds the block's time (CUDA work included) to ``timings[kind]``."""
        t0 = time.perf_counter()
        yield
        self.timings[kind] += elapsed(t0, device)

    def saved(self) -> dict:
        """The report's part of the resume state."""
        return {"iterations": self.iterations, "timings": self.timings,
                "elapsed": time.perf_counter() - self.t_start}

    def restore(self, state: dict) -> None:
        """Continue the report of the run that wrote ``state``."""
        self.resume_info = {"resumed_after": int(state["k"])}
        self.data["iterations"] = state["iterations"]
        self.timings = state["timings"]
        self.t_start -= state["elapsed"]          # the report's total covers the interrupted part too

    def close_timings(self) -> None:
        total = time.perf_counter() - self.t_start
        other = max(0.0, total - self.timings["finetune"] - self.timings["pgd"])
        self.data["timings"] = {**self.timings, "other": other, "total": total}

    def add_resume_info(self) -> None:
        if self.resume_info:
            self.data["resume"] = self.resume_info


def nonfinite_counts(iterations: list, finetune_skipped: int) -> dict:
    """How often low precision failed: PGD micro-batches redone in fp32 or skipped, fine-tune steps skipped.
    (``finetune_skipped`` counts this process only: a resumed run does not know the interrupted part's.)"""
    steps = [s for it in iterations for s in it["pgd"]]
    return {"pgd_redone_fp32": sum(s.get("redone_fp32", 0) for s in steps),
            "pgd_skipped": sum(s.get("skipped", 0) for s in steps), "finetune_skipped": int(finetune_skipped)}


@torch.no_grad()
def final_similarity(ensemble, x, landmarks) -> dict:
    """The recognisers' mean similarity of X' itself to the references (the PGD steps' numbers are on x0_hat)."""
    _, sims = ensemble(x, landmarks)
    return {name: float(s.mean()) for name, s in sims.items()}


def elapsed(t0: float, device) -> float:
    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
