"""Where the pack's shipped demo models lie: the asset folders, the weights and tokenizer inside them, their titles.

``load_model`` / ``validate_model`` accept three built-in names besides a path: ``"demo"`` and ``"demo-v2"`` (the
small models trained here, whose files are described below) and ``"tiny"`` (built in memory, see tiny.py). A leaf
(it imports only the shared errors module), so the demo package that trains these models and the diffusion loaders
that read them both import it without importing each other.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ModelError

DEMO_TITLE = "demo"            # the built-in name, and the title its LoRAs' metadata names as the base
ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo_model"
# demo model v2 (issue 26): trained on a GPU on the congress portraits too; ships here once trained
DEMO_V2_TITLE = "demo-v2"
ASSET_DIR_V2 = ASSET_DIR.parent / "demo_model_v2"
WEIGHTS_NAME = "demo.safetensors"
TOKENIZER_DIR = "tokenizer"


def weights_path(folder: Path | None = None) -> Path:
    return (folder or ASSET_DIR) / WEIGHTS_NAME


def demo_weights(folder: Path | None = None, v2: bool = False) -> Path:
    """The weights file of a demo model folder (default: the shipped demo, or demo-v2, model); a
    :class:`ModelError` naming the file and how to make it when it is missing."""
    path = weights_path(Path(folder or (ASSET_DIR_V2 if v2 else ASSET_DIR)))
    if not path.is_file():
        if v2:
            raise ModelError(f"demo model v2 weights missing: {path} (train them with tools/gpu_train_demo_v2.sh, "
                             f"see docs/DESIGN.md)")
        raise ModelError(f"demo model weights missing: {path} (rebuild with `python -m iddm_core.demo.model train`)")
    return path
