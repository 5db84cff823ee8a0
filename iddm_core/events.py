"""One event stream for every long job (fine-tune, PGD, IDDM, evaluation).

A job takes ``callback: Callable[[Event], None] | None`` and calls it after every step. The callback may raise
(e.g. :class:`~iddm_core.errors.Cancelled`, or ComfyUI's interrupt exception) to stop the job between two
steps; jobs write their outputs only at the very end and atomically, so a stopped job leaves nothing behind.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional


@dataclass
class Event:
    phase: str                      # "setup" | "finetune" | "pgd" | "save" | "eval" | "done"
    done: int = 0                   # overall steps finished (for a progress bar)
    total: int = 0                  # overall steps planned
    k: Optional[int] = None         # outer IDDM iteration, 1-based
    t: Optional[int] = None         # PGD step, 1-based
    stage: Optional[str] = None     # PGD stage: "rec" (Stage I) | "id" (Stage II)
    loss: Optional[float] = None
    similarity: dict = field(default_factory=dict)   # recogniser name -> cosine similarity
    linf: Optional[float] = None    # max |delta| over the protected images
    elapsed: float = 0.0            # seconds since the job started
    message: str = ""

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, "", {})}


Callback = Callable[[Event], None]


class Emitter:
    """Small helper a job keeps: stamps elapsed time and forwards to the callback (if any)."""

    def __init__(self, callback: Optional[Callback], total: int = 0):
        self.callback = callback
        self.total = total
        self.done = 0
        self.start = time.perf_counter()

    def __call__(self, phase: str, advance: int = 1, **fields) -> Event:
        self.done += advance
        event = Event(phase=phase, done=self.done, total=self.total,
                      elapsed=time.perf_counter() - self.start, **fields)
        if self.callback is not None:
            self.callback(event)
        return event
