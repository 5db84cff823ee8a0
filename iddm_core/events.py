"""One event stream for every long job (fine-tune, PGD, IDDM, evaluation).

A job takes ``callback: Callable[[Event], None] | None`` and calls it after every step. The callback may raise
(e.g. :class:`~iddm_core.errors.Cancelled`, or ComfyUI's interrupt exception) to stop the job between two
steps; jobs write their outputs only at the very end and atomically, so a stopped job leaves nothing behind.

Setup (checking, loading the model, class images, the trial memory steps) can take minutes on a real model before
the first training step, so it reports too: events of phase ``"setup"`` whose ``stage`` names the step (one of
:data:`SETUP_STAGES`) and whose ``message`` says it in words (no names, no paths). Every such event is a chance to
cancel: a front end's callback raises there as it does between training steps, so setup stops within one step.
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
    stage: Optional[str] = None     # PGD stage: "rec" (Stage I) | "id" (Stage II); phase "setup": SETUP_STAGES
    loss: Optional[float] = None
    similarity: dict = field(default_factory=dict)   # recogniser name -> cosine similarity
    linf: Optional[float] = None    # max |delta| over the protected images
    elapsed: float = 0.0            # seconds since the job started
    message: str = ""

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, "", {})}


Callback = Callable[[Event], None]

# The steps before training, in the order a run meets them (values: what a front end shows).
SETUP_STAGES = {"check": "checking the model and the photos", "free": "freeing the host's memory",
                "load": "loading the model", "resume": "checking for a resume state",
                "recognisers": "loading the face recognisers", "class_images": "making the class images",
                "encode": "encoding the photos", "trial": "trial steps (will it fit in memory?)"}


def report_setup(callback: Optional[Callback], stage: str, message: str = "", elapsed: float = 0.0) -> None:
    """Tell ``callback`` (if any) that setup step ``stage`` runs now: an :class:`Event` of phase ``"setup"`` with
    nothing done yet. The callback may raise to cancel, as after any step. ``message`` adds detail (numbers and
    fixed words only); by default it is the stage's own text."""
    if callback is not None:
        callback(Event(phase="setup", stage=stage, message=message or SETUP_STAGES.get(stage, stage),
                       elapsed=elapsed))


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

    def setup(self, stage: str, message: str = "") -> Event:
        """A ``"setup"`` event for step ``stage`` (see :func:`report_setup`), counting no step."""
        return self("setup", advance=0, stage=stage, message=message or SETUP_STAGES.get(stage, stage))

    def relay(self, event: Event) -> None:
        """Forward a setup event made deeper down (model loading, class images) with this job's step count and
        clock, so the front end sees one stream."""
        self("setup", advance=0, stage=event.stage, message=event.message)
