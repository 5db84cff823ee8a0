"""The import paths of iddm_core 0.2 keep working after the regrouping of issue 25 (iddm_core/_moved.py)."""
import importlib
import subprocess
import sys
import warnings

import pytest

from conftest import HANG_S, ROOT

# every public name iddm_core/models.py defined in 0.2 (commit 78c0c9b) -> the module of iddm_core.diffusion that
# holds it now
OLD_MODELS = {
    "KINDS": "kinds", "SDXL_KINDS": "kinds", "PREDICTION_TYPES": "kinds", "ZERO_TERMINAL_SNR": "kinds",
    "RESOLUTIONS": "kinds", "V_PRED_STD_THRESHOLD": "kinds", "detect_kind": "kinds",
    "ModelBundle": "bundle",
    "load_model": "loading",
    "CONFIG_DIR": "reading", "CONFIGS_METADATA_KEY": "reading", "read_checkpoint": "reading",
    "read_checkpoint_header": "reading", "shipped_configs": "reading",
    "CLIP_CONTEXT_LENGTH": "tokenizers", "CLIP_VOCAB_SIZE": "tokenizers", "comfy_tokenizer_dir": "tokenizers",
    "resolve_tokenizer": "tokenizers", "resolve_tokenizer_2": "tokenizers", "check_tokenizer_fits": "tokenizers",
    "load_single_file": "single_file",
    "load_diffusers": "diffusers_folder",
    "ModelInfo": "validation", "validate_model": "validation",
    "bundle_to_original": "writing", "save_single_file": "writing", "save_diffusers": "writing",
}


def _old(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return importlib.import_module(name)


@pytest.mark.parametrize("name", sorted(OLD_MODELS))
def test_every_public_name_of_the_old_models_module_is_the_new_object(name):
    new = importlib.import_module(f"iddm_core.diffusion.{OLD_MODELS[name]}")
    assert getattr(_old("iddm_core.models"), name) is getattr(new, name)


def test_from_import_of_the_old_paths():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from iddm_core.iddm import run_iddm
        from iddm_core.models import ModelBundle, load_model, validate_model
        from iddm_core.tiny import build_tiny_bundle
    from iddm_core.diffusion import bundle, loading, tiny, validation
    from iddm_core.protection import iddm

    assert run_iddm is iddm.run_iddm and build_tiny_bundle is tiny.build_tiny_bundle
    assert (ModelBundle, load_model, validate_model) == (bundle.ModelBundle, loading.load_model,
                                                         validation.validate_model)
    with pytest.raises(AttributeError, match="no_such_name.*diffusion.loading"):
        _old("iddm_core.models").no_such_name


def test_the_demo_loaders_are_still_found_in_the_demo_package():
    """They moved to the diffusion side (the demo package only calls downward, no import circle)."""
    from iddm_core.diffusion import loading

    demo = _old("iddm_core.demo_model")
    assert demo.load_demo_bundle is loading.load_demo_bundle
    assert demo.load_demo_v2_bundle is loading.load_demo_v2_bundle
    with pytest.raises(AttributeError):
        demo.no_such_loader


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)


def test_old_models_path_warns_naming_the_new_modules():
    run = _python("import warnings; warnings.simplefilter('always')\n"
                  "with warnings.catch_warnings(record=True) as seen:\n"
                  "    import iddm_core.models\n"
                  "print([str(w.message) for w in seen if w.category is DeprecationWarning])")
    assert run.returncode == 0, run.stderr
    assert "iddm_core.models moved to iddm_core.diffusion.loading / iddm_core.diffusion.validation" in run.stdout


def test_package_inits_stay_light():
    """``iddm_core.diffusion`` and the demo package import no torch: `--help` and the built-in names stay cheap."""
    run = _python("import sys, iddm_core.diffusion, iddm_core.diffusion.builtin, iddm_core.demo.model\n"
                  "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_old_demo_model_command_runs():
    run = subprocess.run([sys.executable, "-m", "iddm_core.demo_model", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=HANG_S)
    assert run.returncode == 0, run.stderr
    assert "usage:" in run.stdout and "train" in run.stdout


def test_a_module_reached_by_its_old_path_keeps_its_own_spec():
    """CI of the regrouping failed here (then with iddm_core.evaluate): importlib gave the moved module the alias spec, so a relative import inside
    one of its functions raised ImportWarning (__package__ != __spec__.parent) under ``-W error``."""
    run = _python("import warnings\n"
                  "with warnings.catch_warnings():\n"
                  "    warnings.simplefilter('ignore', DeprecationWarning)\n"
                  "    import iddm_core.fit as old\n"
                  "warnings.simplefilter('error')\n"
                  "import iddm_core.diffusion.fit as new\n"
                  "assert old is new and new.__spec__.name == 'iddm_core.diffusion.fit', new.__spec__\n"
                  "exec('from ..events import Emitter', vars(new))\n"
                  "print('ok')")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"
