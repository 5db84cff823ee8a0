"""IDDM — Identity-Decoupled personalized Diffusion Models.

A plain library (never imports ComfyUI). Importing this package is cheap: heavy modules
(torch, diffusers, dlib) are imported by the submodules that need them.
"""
from pathlib import Path

__version__ = "0.1.0"
# the public-domain face photos shipped with the package (demo identity, benches, the demo model's data)
FACES_DIR = Path(__file__).resolve().parent / "assets" / "faces"

# modules that moved into sub-packages in 0.3.0 stay importable by their old names (_moved.py)
from . import _moved  # noqa: E402

_moved.install(__name__)
