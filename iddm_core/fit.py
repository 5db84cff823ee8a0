"""Will it fit? One trial step of each heavy kind before a long run, so an out-of-memory error comes first.

IDDM's first Stage II PGD step comes after a whole fine-tune burst; on a card that is too small it would fail
there, minutes to hours in. :func:`check_fits` runs one fine-tune forward/backward (nothing updated) and one
Stage II PGD step on one micro-batch (result thrown away, its own random generator) before anything else, and
turns an out-of-memory error into an :class:`InputError` that says what to change. The run's results are the
same with or without the check.
"""
from __future__ import annotations

import dataclasses

import torch

from .errors import InputError


def advice(config, precision_name: str, checkpointing: bool, resolution: int) -> list[str]:
    """What would lower memory, given what is already set (most effective first)."""
    tips = []
    if config.pgd.batch > 1:
        tips.append("pgd_batch 1")
    if not checkpointing:
        tips.append("gradient checkpointing on (--checkpointing yes)")
    if precision_name == "fp32":
        tips.append("mixed precision (--precision auto on a GPU)")
    if config.pgd.gradient in ("full", "sds"):
        tips.append("gradient 'fast' (Stage II on a window around the face)")
    if resolution > 256:
        tips.append(f"a lower resolution than {resolution}")
    return tips


def memory_text(device) -> str:
    if torch.device(device).type != "cuda":
        return ""
    free, total = torch.cuda.mem_get_info(device)
    return f" ({free / 2 ** 30:.1f} of {total / 2 ** 30:.1f} GiB were free before the run)"


def check_fits(trial_finetune, trial_pgd, config, precision_name: str, checkpointing: bool, resolution: int,
               device) -> None:
    """Run the two trial steps; raise InputError with advice if either runs out of memory."""
    before = memory_text(device)
    for what, trial in (("a fine-tune step", trial_finetune), ("a Stage II PGD step", trial_pgd)):
        try:
            trial()
        except torch.OutOfMemoryError:
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            tips = advice(config, precision_name, checkpointing, resolution)
            raise InputError(
                f"not enough memory for these settings: {what} ran out of memory at {resolution}px, "
                f"pgd_batch {config.pgd.batch}, precision {precision_name}, checkpointing "
                f"{'on' if checkpointing else 'off'}, gradient {config.pgd.gradient}{before}. Nothing was trained. "
                + (f"Try: {'; '.join(tips)}." if tips else "")) from None
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def trial_pgd_config(pgd_config):
    """One Stage II step (floor(rho * 1) = 0 Stage I steps): the heaviest kind."""
    return dataclasses.replace(pgd_config, T=1)
