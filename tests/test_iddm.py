"""The alternating IDDM loop on the tiny model with the real dlib surrogate."""
import json
import stat

import pytest
import torch

from iddm_core.errors import Cancelled, InputError
from iddm_core.protection.iddm import IDDMConfig, run_iddm
from iddm_core.protection.pgd import PGDConfig

RES = 64


@pytest.fixture(scope="module")
def refs():
    from iddm_core.demo.story import demo_photos
    from iddm_core.face.detect import get_detector
    from iddm_core.protection.refs import refs_from_photos

    return refs_from_photos(demo_photos(), RES, get_detector("dlib"), seed=0)


@pytest.fixture(scope="module")
def ensemble():
    from iddm_core.protection.iddm import build_ensemble

    return build_ensemble(["dlib"], 0.03, torch.device("cpu"))


def small_config(**kw):
    base = dict(K=2, pgd=PGDConfig(T=3, rho=0.34, eta=0.05, alpha=0.02), ft_steps=2, resolution=RES,
                num_class_images=1, seed=0)
    base.update(kw)
    return IDDMConfig(**base)


def fresh_model():
    from iddm_core.diffusion.loading import load_model

    return load_model("tiny")


def lora_tensors(path):
    from iddm_core.training.kohya_check import read_kohya_lora

    return read_kohya_lora(path)[0]


def test_refs_split_and_landmarks(refs):
    assert len(refs) == 4 and refs.images.shape[-1] == RES
    assert len(refs.split.reference) == 2 and len(refs.split.protect) == 2
    lm = refs.landmarks
    assert (lm[:, 0, 0] < lm[:, 1, 0]).all() and (lm[:, :2, 1].mean(1) < lm[:, 3:, 1].mean(1)).all()
    assert lm.min() >= 0 and lm.max() <= RES


def test_run_projection_schedule_report_and_lora(tmp_path, refs, ensemble):
    out, report_path = tmp_path / "me.safetensors", tmp_path / "report.json"
    events = []
    cfg = small_config()
    result = run_iddm(fresh_model(), refs, cfg, out_path=out, lora_name="me", ensemble=ensemble,
                      report_path=report_path, callback=events.append)
    report = json.loads(report_path.read_text())
    assert [it["k"] for it in report["iterations"]] == [1, 2]
    for it in report["iterations"]:
        assert [s["stage"] for s in it["pgd"]] == ["rec", "id", "id"]          # floor(0.34*3) = 1 rec step
        assert all(s["linf"] <= cfg.pgd.eta + 1e-6 for s in it["pgd"])
        assert all("dlib" in s["similarity"] for s in it["pgd"] if s["stage"] == "id")
        assert len(it["finetune_reference"]) == 2 and len(it["finetune_protected"]) == 2
    x0 = refs.protect()[0]
    assert (result.protected - x0).abs().max() <= cfg.pgd.eta + 1e-6
    assert result.protected.min() >= 0 and result.protected.max() <= 1
    assert set(report["timings"]) == {"finetune", "pgd", "other", "total"}
    assert report["precision"] == "fp32" and report["gradient_checkpointing"] is False       # CPU defaults
    assert report["nonfinite"] == {"pgd_redone_fp32": 0, "pgd_skipped": 0, "finetune_skipped": 0}
    # events: one per fine-tune step and PGD step, monotone progress
    steps = [e for e in events if e.phase in ("finetune", "pgd")]
    assert len(steps) == 2 * (2 * 2 + 3) and [e.done for e in steps] == list(range(1, len(steps) + 1))
    # the LoRA is a valid kohya file, and nothing private leaked into the outputs
    from iddm_core.training.kohya_check import inspect_lora

    assert inspect_lora(out)["compatible"]
    blob = out.read_bytes() + report_path.read_bytes()
    for name in refs.names:
        assert name.encode() not in blob
    assert b"obama" not in blob


def test_resume_gives_the_same_lora(tmp_path, refs, ensemble, one_thread):
    cfg = small_config()
    full = tmp_path / "full.safetensors"
    run_iddm(fresh_model(), refs, cfg, out_path=full, ensemble=ensemble)

    state = tmp_path / "state"
    partial = run_iddm(fresh_model(), refs, cfg, out_path=tmp_path / "resumed.safetensors", ensemble=ensemble,
                       checkpoint_dir=state, stop_after=1)                  # "interrupted" after k=1
    assert partial.lora_path is None and not (tmp_path / "resumed.safetensors").exists()
    assert (state / "state.iddm").exists()
    assert stat.S_IMODE((state / "state.iddm").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    resumed = run_iddm(fresh_model(), refs, cfg, out_path=tmp_path / "resumed.safetensors", ensemble=ensemble,
                       checkpoint_dir=state, resume=True)
    assert [it["k"] for it in resumed.report["iterations"]] == [1, 2]
    a, b = lora_tensors(full), lora_tensors(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not state.exists()                                                # cleaned after success

    with pytest.raises(InputError, match="different run"):                  # a state from other settings
        run_iddm(fresh_model(), refs, cfg, out_path=None, ensemble=ensemble, checkpoint_dir=state, stop_after=1)
        run_iddm(fresh_model(), refs, small_config(seed=5), out_path=None, ensemble=ensemble,
                 checkpoint_dir=state, resume=True)


def test_cancel_between_steps_writes_nothing(tmp_path, refs, ensemble):
    out = tmp_path / "cancelled.safetensors"
    seen = []

    def cancel_at_pgd(ev):
        seen.append(ev.phase)
        if ev.phase == "pgd" and ev.k == 2:
            raise Cancelled("user pressed cancel")

    with pytest.raises(Cancelled):
        run_iddm(fresh_model(), refs, small_config(), out_path=out, ensemble=ensemble, callback=cancel_at_pgd,
                 report_path=tmp_path / "r.json")
    assert "pgd" in seen
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_existing_output_refused_before_work(tmp_path, refs, ensemble):
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(InputError, match="exists.safetensors"):
        run_iddm(fresh_model(), refs, small_config(), out_path=out, ensemble=ensemble)
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("field,value", [("K", 0), ("tau", 0.0), ("ft_steps", 0), ("rank", 0), ("lr", -1.0),
                                         ("resolution", 60), ("surrogates", ()), ("mixed_precision", "fp8"),
                                         ("gradient_checkpointing", "maybe")])
def test_config_validation_names_the_parameter(field, value):
    with pytest.raises(InputError, match=field):
        small_config(**{field: value}).validate()
