"""Issue 12: a resume state can only continue the run that wrote it, lives privately outside the output folder and
goes away after success; PGD conditions on the trained text encoder; the PGD schedule says what it does."""
import dataclasses
import json
import stat

import pytest
import torch

from iddm_core.training import checkpoint as ckpt
from iddm_core.errors import InputError
from iddm_core.protection.iddm import IDDMConfig, run_iddm
from iddm_core.protection.pgd import PGDConfig

from test_iddm import RES, ensemble, refs  # noqa: F401  (the same demo photos and dlib ensemble fixtures)
from test_iddm import fresh_model as tiny


def small_config(**kw):
    base = dict(K=2, pgd=PGDConfig(T=2, rho=0.5, eta=0.05, alpha=0.02), ft_steps=1, resolution=RES,
                num_class_images=1, seed=0)
    base.update(kw)
    return IDDMConfig(**base)


CLASS = torch.rand(1, 3, RES, RES, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------- another run is refused
@pytest.fixture(scope="module")
def saved_state(tmp_path_factory, refs, ensemble):
    """The state an interrupted run (after iteration 1 of 2) leaves."""
    state = tmp_path_factory.mktemp("resume") / "state"
    run_iddm(tiny(), refs, small_config(), ensemble=ensemble, checkpoint_dir=state, class_images=CLASS.clone(),
             stop_after=1)
    assert ckpt.has_state(state)
    return state


def _other_photos(refs):
    images = refs.images.clone()
    images[refs.split.protect[0]] = images[refs.split.protect[0]].flip(-1)       # one photo is another photo
    return dataclasses.replace(refs, images=images)


def _other_split(refs):
    from iddm_core.protection.split import Split

    return dataclasses.replace(refs, split=Split(reference=refs.split.protect, protect=refs.split.reference))


def _other_model():
    bundle = tiny()                                  # the same architecture, one weight different
    with torch.no_grad():
        next(bundle.unet.parameters()).view(-1)[0] += 1e-3
    return bundle


@pytest.mark.parametrize("change,expected", [
    ("model", r"base model differs"),
    ("photos", r"photos differ"),
    ("split", r"split differs"),
    ("class", r"class images differ"),
    ("settings", r"settings differ \(lr, seed\)"),
])
def test_resume_of_another_run_is_refused_before_any_work(saved_state, refs, ensemble, change, expected):
    from iddm_core.training.lora import has_lora

    bundle = _other_model() if change == "model" else tiny()
    run_refs = {"photos": _other_photos, "split": _other_split}.get(change, lambda r: r)(refs)
    classes = CLASS.flip(-2) if change == "class" else CLASS.clone()
    config = small_config(seed=1, lr=2e-4) if change == "settings" else small_config()
    events = []
    with pytest.raises(ckpt.StateMismatch, match=r"^resume state belongs to a different run: " + expected) as info:
        run_iddm(bundle, run_refs, config, ensemble=ensemble, checkpoint_dir=saved_state, resume=True,
                 class_images=classes, callback=events.append)
    assert isinstance(info.value, InputError) and len(info.value.reasons) == 1      # only what differs is named
    # no step, not even the LoRA injection: only the "checking for a resume state" setup event
    assert [e.stage for e in events] == ["resume"] and not has_lora(bundle)
    assert ckpt.has_state(saved_state)                       # the user's interrupted run is not destroyed
    for name in refs.names:                                  # the message names no photo
        assert name not in str(info.value)


def test_restart_on_mismatch_discards_the_old_state_and_says_why(tmp_path, refs, ensemble):
    state = tmp_path / "state"
    run_iddm(tiny(), refs, small_config(K=1), ensemble=ensemble, checkpoint_dir=state, class_images=CLASS.clone(),
             stop_after=0)                 # a state is written after k=1 even though stop_after=0 ends the run
    result = run_iddm(tiny(), refs, small_config(K=1, seed=4), ensemble=ensemble, checkpoint_dir=state, resume=True,
                      class_images=CLASS.clone(), on_mismatch="restart")
    assert result.report["resume"] == {"discarded": "settings differ (seed)"}
    assert [it["k"] for it in result.report["iterations"]] == [1]
    assert not state.exists()


def test_base_model_file_hash_is_kohya_style_and_computed_once(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(tensors, str(a), metadata={"title": "one"})
    save_file(tensors, str(b), metadata={"title": "another title, longer header"})
    save_file({"w": torch.arange(6.0).reshape(2, 3) + 1}, str(c))
    assert ckpt.file_hash(a) == ckpt.file_hash(b) != ckpt.file_hash(c)       # tensor bytes, not the header
    calls = []
    real = ckpt._stream_sha256
    monkeypatch.setattr(ckpt, "_stream_sha256", lambda *args: calls.append(args) or real(*args))
    ckpt._FILE_HASHES.clear()
    for _ in range(3):
        ckpt.file_hash(a)
    assert len(calls) == 1                                                  # large files: hashed once per process


def test_state_is_private_outside_the_output_folder_and_gone_after_success(tmp_path, refs, ensemble, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("IDDM_CACHE_DIR", str(cache))
    out = tmp_path / "loras" / "me.safetensors"
    state = ckpt.state_dir_for(out)
    assert state.parent == cache / "state" and out.parent not in state.parents
    assert ckpt.state_dir_for(out) == state != ckpt.state_dir_for(out.with_name("other.safetensors"))
    assert "me" not in state.name and "loras" not in str(state.relative_to(cache))   # hashed, not echoed
    seen = {}

    def watch(ev):
        if ckpt.has_state(state) and not seen:
            path = ckpt.state_path(state)
            seen.update(file=stat.S_IMODE(path.stat().st_mode), dirs=[stat.S_IMODE(d.stat().st_mode)
                                                                      for d in (cache, cache / "state", state)])
            seen["listing"] = sorted(p.name for p in out.parent.iterdir())

    run_iddm(tiny(), refs, small_config(), out_path=out, ensemble=ensemble, checkpoint_dir=state,
             class_images=CLASS.clone(), callback=watch)
    assert seen["file"] == 0o600 and seen["dirs"] == [0o700, 0o700, 0o700]
    assert seen["listing"] == []                       # nothing beside the LoRA while the run went on
    assert ckpt.state_path(state).name == "state.iddm"  # no model extension a model list would show
    assert sorted(p.name for p in out.parent.iterdir()) == ["me.safetensors"]
    assert not state.exists()                          # removed after success


# --------------------------------------------------------------------------------- text-encoder conditioning
@pytest.mark.parametrize("train_te", [False, True])
def test_pgd_conditions_on_the_trained_text_encoder(monkeypatch, refs, ensemble, train_te):
    import iddm_core.protection.iddm as iddm_mod
    from iddm_core.training.conditioning import encode_prompts
    from iddm_core.training.finetune import FinetuneConfig

    bundle = tiny()
    with torch.no_grad():
        base = encode_prompts(bundle, [FinetuneConfig().instance_prompt]).clone()
    seen = []
    real = iddm_mod.pgd_two_stage

    def spy(bundle_, ens, x0, lm, embeds, *args, **kw):
        te = bundle_.text_encoder
        te.eval()
        with torch.no_grad():
            now = encode_prompts(bundle_, [FinetuneConfig().instance_prompt])
        seen.append((embeds.detach().clone(), now.clone()))
        return real(bundle_, ens, x0, lm, embeds, *args, **kw)

    monkeypatch.setattr(iddm_mod, "pgd_two_stage", spy)
    run_iddm(bundle, refs, small_config(lr=1e-3, train_text_encoder=train_te, prior_preservation=False),
             ensemble=ensemble, check_memory=False)     # the pre-flight trial would be one more PGD call
    assert len(seen) == 2
    (e1, now1), (e2, now2) = seen
    if train_te:
        # after each fine-tune burst PGD gets the current (LoRA-trained) text encoder's embeddings
        assert torch.equal(e1, now1) and torch.equal(e2, now2)
        assert not torch.equal(e1, base) and not torch.equal(e2, e1)
    else:
        assert torch.equal(e1, base) and torch.equal(e2, base)


# ------------------------------------------------------------------------------------------- schedule messages
def test_schedule_counts_and_no_stage_one_note():
    from iddm_core.protection.iddm import schedule_text

    paper = PGDConfig(T=8, rho=0.1)
    assert paper.schedule() == {"stage1_steps": 0, "stage2_steps": 8, "note": "no Stage I step (rho*T < 1)"}
    assert PGDConfig(T=10, rho=0.3).schedule() == {"stage1_steps": 3, "stage2_steps": 7}
    assert PGDConfig(T=100, rho=0.29).n_rec == 29                # 0.29 * 100 is 28.999999999999996 in floats
    text = schedule_text(IDDMConfig(pgd=paper))
    assert "0 Stage I (L_rec) + 8 Stage II (L_id)" in text and "no Stage I step (rho*T < 1)" in text
    assert "no Stage I" not in schedule_text(IDDMConfig(pgd=PGDConfig(T=10, rho=0.3)))


def test_report_has_the_schedule(refs, ensemble):
    config = small_config(K=1, pgd=PGDConfig(T=2, rho=0.1, eta=0.05, alpha=0.02), prior_preservation=False)
    report = run_iddm(tiny(), refs, config, ensemble=ensemble).report
    assert report["schedule"] == {"stage1_steps": 0, "stage2_steps": 2, "note": "no Stage I step (rho*T < 1)"}
    assert [s["stage"] for s in report["iterations"][0]["pgd"]] == ["id", "id"]


# ------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def photos(tmp_path, small_faces_dir):
    from conftest import write_private_photos

    write_private_photos(tmp_path / "photos", small_faces_dir, "private")
    return tmp_path / "photos"


def _cli(*argv):
    from iddm_core.cli import main

    return main(list(argv))


def _train_args(photos, out, *extra):
    return ("train", "--refs", str(photos), "--out", str(out), "--K", "2", "--T", "2", "--rho", "0.1",
            "--ft-steps", "1", "--resolution", str(RES), "--no-prior", "--device", "cpu", *extra)


def test_cli_says_the_schedule_resumes_only_the_same_run_and_cleans_up(tmp_path, photos, monkeypatch, capsys):
    from iddm_core.cli import build_parser
    from iddm_core.cli.iddm import config_from_args
    from iddm_core.diffusion.loading import load_model
    from iddm_core.protection.refs import load_private_refs

    monkeypatch.setenv("IDDM_CACHE_DIR", str(tmp_path / "cache"))
    out, report = tmp_path / "out" / "me.safetensors", tmp_path / "report.json"
    state = ckpt.state_dir_for(out)
    # an interrupted CLI run: the same inputs through the library, stopped after iteration 1
    args = build_parser().parse_args(list(_train_args(photos, out)))
    config = config_from_args(args)
    run_iddm(load_model("tiny"), load_private_refs(photos, RES, seed=0), config, checkpoint_dir=state,
             model_source="tiny", stop_after=1)
    assert ckpt.has_state(state)

    assert _cli(*_train_args(photos, out)) == 2                  # neither --resume nor --fresh: refused
    assert "--resume" in capsys.readouterr().err
    assert _cli(*_train_args(photos, out, "--resume", "--lr", "0.0002")) == 2     # another run: refused
    err = capsys.readouterr().err
    assert "resume state belongs to a different run: settings differ (lr)" in err
    assert ckpt.has_state(state) and not out.exists()

    assert _cli(*_train_args(photos, out, "--resume", "--report", str(report))) == 0
    captured = capsys.readouterr()
    first = captured.out.splitlines()[0:2]
    assert first[0].startswith("schedule: K=2 iterations")                       # said before the run
    assert "0 Stage I (L_rec) + 2 Stage II (L_id)" in first[1] and "no Stage I step (rho*T < 1)" in first[1]
    assert "warning: no Stage I step (rho*T < 1)" in captured.err
    assert "resumed after iteration 1 of 2" in captured.out
    data = json.loads(report.read_text())
    assert data["schedule"] == {"stage1_steps": 0, "stage2_steps": 2, "note": "no Stage I step (rho*T < 1)"}
    assert data["resume"] == {"resumed_after": 1} and [it["k"] for it in data["iterations"]] == [1, 2]
    assert out.is_file() and not state.exists()                     # state removed after success
    assert sorted(p.name for p in out.parent.iterdir()) == ["me.safetensors"]    # nothing beside the LoRA
    assert "private_" not in report.read_text()
