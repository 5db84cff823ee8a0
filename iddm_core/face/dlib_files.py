"""Where dlib's model files (.dat) live.

The pack ships no dlib weights of its own: it uses the four files of the ``face_recognition_models`` package
(HOG-detector companions: the 5- and 68-point shape predictors, the ResNet recogniser, the MMOD detector).
That package is located with ``importlib.util.find_spec`` and never imported, because its ``__init__`` needs
``pkg_resources``, which modern environments no longer have. ``$IDDM_DLIB_MODELS`` (a folder) takes precedence,
for installations that keep the .dat files elsewhere.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import ModelError

ENV_DIR = "IDDM_DLIB_MODELS"
SHAPE_5 = "shape_predictor_5_face_landmarks.dat"
SHAPE_68 = "shape_predictor_68_face_landmarks.dat"
RESNET = "dlib_face_recognition_resnet_model_v1.dat"
MMOD = "mmod_human_face_detector.dat"


def models_dirs() -> list[Path]:
    """Candidate folders, in priority order: ``$IDDM_DLIB_MODELS``, then the package's ``models`` folder."""
    dirs = []
    if os.environ.get(ENV_DIR):
        dirs.append(Path(os.environ[ENV_DIR]))
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is not None and spec.submodule_search_locations:
        dirs.append(Path(list(spec.submodule_search_locations)[0]) / "models")
    return dirs


def find_model(filename: str) -> Path | None:
    """The first existing ``filename`` among :func:`models_dirs`, or None."""
    for d in models_dirs():
        candidate = d / filename
        if candidate.is_file():
            return candidate
    return None


def require_model(filename: str) -> Path:
    """Like :func:`find_model`, but a missing file is a :class:`ModelError` that says how to get it."""
    path = find_model(filename)
    if path is None:
        raise ModelError(f"dlib model file {filename} not found; install the 'face_recognition_models' package "
                         f"or put the file in a folder named by ${ENV_DIR}")
    return path
