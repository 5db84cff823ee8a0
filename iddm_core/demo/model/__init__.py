"""The demo model: a small SD1-shaped diffusion model *trained here* on public-domain images.

Why: no Stable Diffusion weights can reach our machines, and a random model cannot show what IDDM does (its VAE
does not reconstruct and its one-step predictions are not faces). This model is the smallest one that behaves
like Stable Diffusion on faces at 128 px: an AutoencoderKL that reconstructs photos (f = 4), a cross-attention
UNet2DConditionModel that generates faces from prompts, the tiny CLIP text encoder, a DDPM schedule (rescaled to
zero terminal SNR, v-prediction).
Its weights ship in ``iddm_core/assets/demo_model/`` (fp16, original SD key layout, architecture in metadata) and
load with the ordinary single-file loader: ``load_model("demo")``. ``python -m iddm_core.demo.model train``
rebuilds them from scratch; ``python -m iddm_core.demo.model measure`` prints what the model can do.

The demo identity (the Barack Obama photos) is held out of every stage of training, so the demo really
personalises: the base model has only seen the other identities and non-face images.
"""
from __future__ import annotations

from pathlib import Path

DEMO_TITLE = "demo"
DEMO_RESOLUTION = 128
ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo_model"
# demo model v2 (issue 26): trained on a GPU on the congress portraits too; ships here once trained
DEMO_V2_TITLE = "demo-v2"
ASSET_DIR_V2 = ASSET_DIR.parent / "demo_model_v2"
WEIGHTS_NAME = "demo.safetensors"
TOKENIZER_DIR = "tokenizer"


def weights_path(folder: Path | None = None) -> Path:
    return (folder or ASSET_DIR) / WEIGHTS_NAME


def load_demo_bundle(folder: Path | None = None, title: str = DEMO_TITLE):
    """The shipped demo model as a float32 CPU :class:`~iddm_core.diffusion.models.ModelBundle` (title ``demo``): the
    single-file loader copies the fp16 weights into float32 modules in eval mode."""
    from ...errors import ModelError
    from ...diffusion.models import load_single_file

    folder = Path(folder or ASSET_DIR)
    path = weights_path(folder)
    if not path.is_file():
        raise ModelError(f"demo model weights missing: {path} (rebuild with `python -m iddm_core.demo.model train`)")
    bundle = load_single_file(path, kind="sd1", tokenizer=folder / TOKENIZER_DIR)
    bundle.title = title
    return bundle


def load_demo_v2_bundle(folder: Path | None = None):
    """Demo model v2 (``iddm_core/assets/demo_model_v2/``, title ``demo-v2``), as :func:`load_demo_bundle`."""
    from ...errors import ModelError

    folder = Path(folder or ASSET_DIR_V2)
    if not weights_path(folder).is_file():
        raise ModelError(f"demo model v2 weights missing: {weights_path(folder)} (train them with "
                         f"tools/gpu_train_demo_v2.sh, see docs/DESIGN.md)")
    return load_demo_bundle(folder, title=DEMO_V2_TITLE)
