"""IDDMTrainLoRA (issue 12): resume after Cancel, a private state outside the loras folder, the text-encoder option,
the schedule in the summary, and saved workflows of the old node still lining up."""
from __future__ import annotations

import json
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch

from comfy_harness import REPO, InterruptProcessingException, load_pack, run_workflow, state_files, \
    tiny_comfy, unload_pack

PACK = "comfyui-iddm"
PRIVATE = "secret_bob"
API_WORKFLOW = REPO / "example_workflows" / "api" / "iddm_1_train_lora_api.json"
TRAIN = "4"                     # the train node's id in the example workflow
OLD_REQUIRED_WIDGETS = ["K", "ft_steps", "rank", "lr", "resolution", "train_seed", "lora_name", "overwrite",
                        "prior_preservation", "num_class_images"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_faces_dir):
    stubs = tiny_comfy(tmp_path_factory.mktemp("comfyui"), small_faces_dir, PRIVATE)
    pack = load_pack(PACK)
    yield stubs, pack
    stubs.uninstall()
    unload_pack(PACK)


@pytest.fixture
def clean(env, monkeypatch):
    stubs, pack = env
    monkeypatch.delenv("IDDM_CACHE_DIR", raising=False)
    stubs.progress.clear()
    stubs.messages.clear()
    stubs.interrupted, stubs.interrupt_after = False, None
    for f in (stubs.models / "loras").iterdir():
        f.unlink()
    shutil.rmtree(stubs.temp / "iddm_state", ignore_errors=True)
    return stubs, pack


def _train_module(pack):
    return sys.modules[pack.NODE_CLASS_MAPPINGS["IDDMTrainLoRA"].__module__]


def _workflow(lora_name, **train) -> dict:
    """The training example with the tiny model and tiny settings; the train node gets id TRAIN."""
    wf = json.loads(API_WORKFLOW.read_text())
    ids = {node["class_type"]: nid for nid, node in wf.items()}
    wf[ids["IDDMLoadPrivateRefs"]]["inputs"].update(folder="photos", resolution=64)
    wf[ids["IDDMPGDTwoStage"]]["inputs"].update(T=2, preset="fidelity")   # rho 0.5: 1 Stage I + 1 Stage II step
    wf[ids["IDDMTrainLoRA"]]["inputs"].update(dict(ckpt_name="tiny.safetensors", K=2, ft_steps=2, resolution=64,
                                                   prior_preservation=False, lora_name=lora_name), **train)
    assert ids["IDDMTrainLoRA"] == TRAIN
    return wf


def _lora(stubs, name):
    from iddm_core.training.kohya_check import read_kohya_lora

    return read_kohya_lora(stubs.models / "loras" / name)[0]


def test_new_widgets_are_appended_optional_after_the_old_ones(env):
    _, pack = env
    spec = pack.NODE_CLASS_MAPPINGS["IDDMTrainLoRA"].INPUT_TYPES()
    widgets = [k for k, v in spec["required"].items() if v[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")]
    assert widgets == OLD_REQUIRED_WIDGETS                  # positions of a saved workflow's values unchanged
    assert list(spec["optional"]) == ["resume", "train_text_encoder", "conv_rank"]
    assert spec["optional"]["resume"][:1] == ("BOOLEAN",) and spec["optional"]["resume"][1]["default"] is True
    assert spec["optional"]["train_text_encoder"][1]["default"] is False
    assert spec["optional"]["conv_rank"][:1] == ("INT",) and spec["optional"]["conv_rank"][1]["default"] == 0


def test_cancelled_run_resumes_to_the_same_lora(clean, one_thread):
    stubs, pack = clean
    results = run_workflow(pack, _workflow("uninterrupted"))
    summary = results[TRAIN][1]
    assert "PGD per iteration: 1 Stage I + 1 Stage II steps" in summary and "resumed" not in summary
    steps = [p for p in stubs.progress if p[0] == TRAIN]
    others = len(stubs.progress) - len(steps)
    assert sorted({p[1] for p in steps}) == list(range(1, 13)) and steps[6][1] == 7    # 2 x (2 x 2 + 2) steps
    assert state_files(stubs) == []                                          # no state left after success

    stubs.progress.clear()
    stubs.interrupt_after = others + 7        # Cancel during iteration 2 (iteration 1 = 6 steps)
    with pytest.raises(InterruptProcessingException):
        run_workflow(pack, _workflow("resumed"))
    assert sorted(p.name for p in (stubs.models / "loras").iterdir()) == ["uninterrupted.safetensors"]
    files = state_files(stubs)
    assert [f.name for f in files] == ["state.iddm"]                          # in temp/, not in models/loras
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600 and stat.S_IMODE(files[0].parent.stat().st_mode) == 0o700
    assert files[0].parent == _train_module(pack).train_state_dir(stubs.models / "loras" / "resumed.safetensors")

    stubs.progress.clear()
    stubs.interrupt_after = None
    results = run_workflow(pack, _workflow("resumed"))                       # queued again, same settings
    summary = results[TRAIN][1]
    assert "resumed after iteration 1 of 2" in summary and PRIVATE not in summary
    assert sorted({p[1] for p in stubs.progress if p[0] == TRAIN}) == list(range(7, 13))   # only iteration 2 ran
    assert state_files(stubs) == []
    a, b = _lora(stubs, "uninterrupted.safetensors"), _lora(stubs, "resumed.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # LoRA tensors bit-identical


def test_requeued_with_other_settings_starts_over_and_says_so(clean):
    stubs, pack = clean
    stubs.interrupt_after = 7
    with pytest.raises(InterruptProcessingException):
        run_workflow(pack, _workflow("changed"))
    assert len(state_files(stubs)) == 1
    stubs.interrupt_after = None
    stubs.progress.clear()
    summary = run_workflow(pack, _workflow("changed", train_seed=5))[TRAIN][1]
    assert "from a different run (settings differ (seed)): discarded, started over" in summary
    assert [p[1] for p in stubs.progress if p[0] == TRAIN][0] == 1 and state_files(stubs) == []


def test_resume_off_keeps_no_state(clean):
    stubs, pack = clean
    stubs.interrupt_after = 7
    with pytest.raises(InterruptProcessingException):
        run_workflow(pack, _workflow("no_resume", resume=False))
    assert state_files(stubs) == []


def test_text_encoder_option_trains_te_lora(clean):
    stubs, pack = clean
    from iddm_core.training.kohya_check import inspect_lora

    summary = run_workflow(pack, _workflow("with_te", train_text_encoder=True, K=1))[TRAIN][1]
    info = inspect_lora(stubs.models / "loras" / "with_te.safetensors")
    assert info["compatible"] and info["modules"]["te"] > 0 and info["modules"]["unet"] > 0
    assert "text encoder trained too" in summary


def test_state_root_prefers_env_then_comfy_system_user_folder(env, monkeypatch, tmp_path):
    stubs, pack = env
    module = _train_module(pack)
    env_module = sys.modules[module.__name__.rsplit(".", 1)[0] + ".comfy_env"]
    fp = stubs.modules["folder_paths"]
    monkeypatch.delenv("IDDM_CACHE_DIR", raising=False)
    assert env_module.state_root() == stubs.temp / "iddm_state"                 # harness: no user folder API
    monkeypatch.setattr(fp, "get_user_directory", lambda: str(tmp_path / "user"), raising=False)
    assert env_module.state_root() == tmp_path / "user" / "__iddm" / "state"
    monkeypatch.setattr(fp, "get_system_user_directory", lambda name="system": str(tmp_path / "user" / f"__{name}"),
                        raising=False)
    assert env_module.state_root() == tmp_path / "user" / "__iddm" / "state"
    monkeypatch.setenv("IDDM_CACHE_DIR", str(tmp_path / "cache"))
    assert env_module.state_root() == tmp_path / "cache" / "state"
    loras = Path(fp.get_folder_paths("loras")[0])
    assert loras not in module.train_state_dir(loras / "x.safetensors").parents
