"""Resumable IDDM runs: one state file, rewritten atomically after every outer iteration.

The state holds the LoRA and optimiser state, X' (the perturbed protection images), every RNG state and the report
so far. It contains derived private data, so it lives only where the user asked and is deleted after success.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from .atomic import atomic_write
from .errors import InputError

STATE_FILE = "iddm_state.pt"
FORMAT_VERSION = 1


def fingerprint(config: dict, images: torch.Tensor) -> str:
    """Identifies a run: its configuration and the exact prepared photos (a hash kept only in the local state)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_state(directory: str | Path, state: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return atomic_write(directory / STATE_FILE, lambda tmp: torch.save({"version": FORMAT_VERSION, **state}, tmp),
                        overwrite=True)


def load_state(directory: str | Path, expected_fingerprint: str) -> dict | None:
    """The saved state of the same run, or None when there is none. A state from another run is an error."""
    path = Path(directory) / STATE_FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise InputError(f"cannot read the resume state {path}: {exc.__class__.__name__}") from exc
    if state.get("version") != FORMAT_VERSION or state.get("fingerprint") != expected_fingerprint:
        raise InputError(f"the resume state in {directory} belongs to a different run (other photos or settings); "
                         "use the same settings, or delete that folder to start over")
    return state


def clear_state(directory: str | Path) -> None:
    directory = Path(directory)
    (directory / STATE_FILE).unlink(missing_ok=True)
    if directory.is_dir() and not any(directory.iterdir()):
        shutil.rmtree(directory, ignore_errors=True)
