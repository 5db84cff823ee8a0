import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_FACES = ROOT.parent / "shared" / "faces"
PACKAGE_FACES = ROOT / "iddm_core" / "assets" / "faces"


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    """Full-size public-domain photos from ../shared/faces when present, else the package's small copies."""
    return SHARED_FACES if SHARED_FACES.is_dir() else PACKAGE_FACES


@pytest.fixture(scope="session")
def small_faces_dir() -> Path:
    """The package's own downsized copies (always present)."""
    return PACKAGE_FACES
