"""Pieces shared by CLI commands (no register(): not a command module)."""
from __future__ import annotations

import sys
import time

# diffusion.kinds.KINDS, spelled out so `--help` needs no torch import (test_skeleton checks they agree)
KIND_CHOICES = ("sd1", "sd2", "sd2v", "sdxl", "sdxl-v")


def pick_device(name: str = "auto"):
    from ..diffusion.runtime import pick_device as pick

    return pick(name)


class ConsoleProgress:
    """Prints events as a one-line progress bar on stderr (a new line per phase change when not a terminal)."""

    def __init__(self, stream=None, width: int = 28):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self.last_print = 0.0
        self.last_phase = None

    def __call__(self, ev) -> None:
        now = time.perf_counter()
        phase_changed = (ev.phase, ev.k, ev.stage) != self.last_phase
        if not self.tty and not phase_changed and ev.done < ev.total and now - self.last_print < 5:
            return
        self.last_phase, self.last_print = (ev.phase, ev.k, ev.stage), now
        frac = ev.done / ev.total if ev.total else 0.0
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        parts = [f"[{bar}] {ev.done}/{ev.total}", ev.phase]
        if ev.k is not None:
            parts.append(f"k={ev.k}")
        if ev.t is not None:
            parts.append(f"t={ev.t} {ev.stage}")
        if ev.loss is not None:
            parts.append(f"loss={ev.loss:.4f}")
        parts += [f"{name}={s:.3f}" for name, s in ev.similarity.items()]
        if ev.linf is not None:
            parts.append(f"|d|inf={ev.linf:.4f}")
        parts.append(f"{ev.elapsed:.1f}s")
        line = " ".join(parts)
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(160))
            if ev.phase == "done":
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def print_skipped(skipped, folder, stream=None) -> None:
    """Tell the user, on the terminal (stderr), which photos of ``folder`` were left out because no face was found
    in them. Names go to the user's own screen only: never to a log file or an output."""
    if not skipped:
        return
    from ..protection.refs import skipped_note

    stream = stream or sys.stderr
    stream.write(f"warning: {folder}: {skipped_note(list(skipped))}\n")
    stream.flush()
