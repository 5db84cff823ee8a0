"""DreamBoothTrainer: repeatable, resumable bursts; the finetune/inspect CLI and its error handling."""
import hashlib
import shutil

import pytest
import torch

from iddm_core.errors import Cancelled, InputError
from iddm_core.training.finetune import DreamBoothTrainer, FinetuneConfig
from iddm_core.training.sampling import generate_images
from iddm_core.training.lora import LoraSpec, get_lora_state
from iddm_core.diffusion.tiny import build_tiny_bundle

IMAGES = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(7))
CLASS = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))


def make(seed=0, lr=1e-2, bundle=None, **cfg):
    bundle = bundle or build_tiny_bundle(0)
    cfg.setdefault("prior_preservation", True)
    trainer = DreamBoothTrainer(bundle, LoraSpec(rank=4), FinetuneConfig(lr=lr, seed=seed, **cfg),
                                class_images=CLASS if cfg["prior_preservation"] else None)
    return bundle, trainer


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_lora_and_bursts_equal_one_run(one_thread):
    bundle_a, a = make()
    params_before = [id(p) for p in a.params]
    optimizer = a.optimizer
    losses_a = a.train(IMAGES, 2) + a.train(IMAGES, 2)  # two bursts, no reload
    assert [id(p) for p in a.params] == params_before and a.optimizer is optimizer
    bundle_b, b = make()
    losses_b = b.train(IMAGES, 4)
    assert losses_a == losses_b
    assert same_state(get_lora_state(bundle_a), get_lora_state(bundle_b))
    ups = [v for k, v in get_lora_state(bundle_a).items() if k.endswith("lora_B")]
    assert max(float(u.abs().max()) for u in ups) > 1e-3  # the LoRA actually moved
    bundle_c, c = make(seed=1)
    assert c.train(IMAGES, 2) != losses_a[:2]


def test_state_dict_resume_is_exact(one_thread):
    bundle_a, a = make(prior_preservation=False)
    a.train(IMAGES, 1)
    saved = a.state_dict()
    snapshot = {k: v.clone() for k, v in saved["lora"].items()}
    a.train(IMAGES, 2)
    assert same_state(saved["lora"], snapshot)  # the saved state is a copy, not a view
    bundle_c, c = make(prior_preservation=False)
    c.load_state_dict(saved)
    c.train(IMAGES, 2)
    assert same_state(get_lora_state(bundle_c), get_lora_state(bundle_a))
    assert c.steps_done == 3


def test_callback_events_and_cancel():
    _, trainer = make(prior_preservation=False)
    events = []

    def cb(event):
        events.append(event)
        if event.done == 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        trainer.train(IMAGES, 5, callback=cb, k=3)
    assert [e.done for e in events] == [1, 2] and trainer.steps_done == 2
    assert all(e.phase == "finetune" and e.k == 3 and e.total == 5 and e.loss > 0 for e in events)


def test_works_under_inference_mode_and_resizes():
    bundle, trainer = make(prior_preservation=False)
    before = get_lora_state(bundle)
    with torch.inference_mode():
        images = torch.rand(2, 3, 80, 80)  # an inference tensor, wrong size: cloned and resized
        losses = trainer.train(images, 2)
    assert len(losses) == 2 and not same_state(before, get_lora_state(bundle))
    with pytest.raises(InputError):
        trainer.train(torch.rand(2, 64, 64), 1)
    with pytest.raises(InputError):
        trainer.train(IMAGES * 3, 1)


def test_v_prediction_uses_velocity_target():
    bundle = build_tiny_bundle(0)
    _, eps = make(bundle=bundle, prior_preservation=False)
    eps_losses = eps.train(IMAGES, 2)
    bundle_v = build_tiny_bundle(0)
    bundle_v.prediction_type = "v_prediction"
    bundle_v.noise_scheduler.register_to_config(prediction_type="v_prediction")
    _, v = make(bundle=bundle_v, prior_preservation=False)
    v_losses = v.train(IMAGES, 2)
    assert all(torch.isfinite(torch.tensor(v_losses))) and v_losses != eps_losses


def test_class_images_generated_once_and_cached(tmp_path, monkeypatch):
    bundle = build_tiny_bundle(0)
    cfg = FinetuneConfig(num_class_images=2, class_sampler_steps=3)
    first = DreamBoothTrainer(bundle, LoraSpec(rank=2), cfg, class_cache_dir=tmp_path)
    assert first.class_images.shape == (2, 3, 64, 64)
    cached = list(tmp_path.iterdir())
    assert len(cached) == 1 and "person" not in cached[0].name

    import iddm_core.training.finetune as ft

    monkeypatch.setattr(ft, "generate_images", lambda *a, **k: pytest.fail("regenerated despite the cache"))
    second = DreamBoothTrainer(build_tiny_bundle(0), LoraSpec(rank=2), cfg, class_cache_dir=tmp_path)
    assert torch.equal(first.class_images, second.class_images)


def test_generate_images_is_deterministic():
    bundle = build_tiny_bundle(0)
    a = generate_images(bundle, "a photo of person", 2, seed=3, steps=3)
    b = generate_images(bundle, "a photo of person", 2, seed=3, steps=3)
    assert a.shape == (2, 3, 64, 64) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    assert not torch.equal(a, generate_images(bundle, "a photo of person", 2, seed=4, steps=3))


# ---------------------------------------------------------------- CLI

def run_cli(*argv):
    from iddm_core.cli import main

    return main(list(argv))


@pytest.fixture
def private_refs(tmp_path, small_faces_dir):
    refs = tmp_path / "holiday_alice_private"
    refs.mkdir()
    for i, src in enumerate(sorted(small_faces_dir.glob("*.jpg"))[:2]):
        shutil.copy(src, refs / f"alice_secret_{i}.jpg")
    return refs


def test_cli_finetune_writes_clean_kohya_file(private_refs, tmp_path, capsys):
    out = tmp_path / "lora" / "my_avatar.safetensors"
    assert run_cli("finetune", "--refs", str(private_refs), "--out", str(out), "--steps", "2", "--no-prior",
                   "--device", "cpu") == 0
    data = out.read_bytes()
    for secret in [b"alice", b"holiday", str(private_refs).encode(), str(tmp_path).encode()]:
        assert secret not in data
    for photo in private_refs.iterdir():
        assert hashlib.sha256(photo.read_bytes()).hexdigest().encode() not in data
    capsys.readouterr()
    assert run_cli("inspect", str(out)) == 0
    report = capsys.readouterr().out
    assert "compatible with kohya readers: yes" in report and "ss_output_name: my_avatar" in report


def test_cli_errors_name_the_file_and_write_nothing(private_refs, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("finetune", "--refs", str(empty), "--out", str(out)) == 2
    assert str(empty) in capsys.readouterr().err
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(next(private_refs.iterdir()), one / "only.jpg")
    assert run_cli("finetune", "--refs", str(one), "--out", str(out)) == 2
    assert "at least 2" in capsys.readouterr().err
    (one / "broken.jpg").write_bytes(b"not an image")
    assert run_cli("finetune", "--refs", str(one), "--out", str(out)) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert not out.exists()
    out.write_bytes(b"old")
    assert run_cli("finetune", "--refs", str(private_refs), "--out", str(out)) == 2
    assert "o.safetensors" in capsys.readouterr().err and out.read_bytes() == b"old"


def test_cli_cancel_leaves_no_file(private_refs, tmp_path, monkeypatch):
    import iddm_core.cli._common as common

    class Interrupting:
        def __call__(self, event):
            raise Cancelled("user pressed stop")

    monkeypatch.setattr(common, "ConsoleProgress", Interrupting)
    out = tmp_path / "c.safetensors"
    assert run_cli("finetune", "--refs", str(private_refs), "--out", str(out), "--steps", "3", "--no-prior",
                   "--device", "cpu") == 2
    assert list(tmp_path.glob("*.safetensors*")) == [] and list(tmp_path.glob(".c.safetensors*")) == []


def test_images_encoded_once_per_burst_and_fixed_sets_once_per_run():
    bundle, trainer = make(prior_preservation=False)
    calls = []
    encode = bundle.vae.encode
    bundle.vae.encode = lambda x, *a, **kw: (calls.append(x.shape[0]), encode(x, *a, **kw))[1]
    trainer.train(IMAGES, 5)
    assert calls == [3]                               # 3 images encoded once for 5 steps, not once per step
    calls.clear()
    posterior = trainer.encode(IMAGES)
    trainer.train(posterior, 3)
    trainer.train(posterior, 3)
    assert calls == [3]                               # a fixed set (Xc, class images) is encoded once


def test_non_finite_step_is_skipped_and_counted():
    bundle, trainer = make(prior_preservation=False)
    before = {k: v.clone() for k, v in get_lora_state(bundle).items()}
    loss = trainer._loss
    trainer._loss = lambda posterior: loss(posterior) * float("nan")
    trainer.train(IMAGES, 1)
    assert trainer.skipped_steps == 1 and same_state(get_lora_state(bundle), before)
    trainer._loss = loss
    trainer.train(IMAGES, 1)
    assert trainer.skipped_steps == 1 and not same_state(get_lora_state(bundle), before)


def test_trial_step_changes_nothing(one_thread):
    bundle_a, a = make()
    a.trial_step(a.encode(IMAGES))
    assert all(p.grad is None for p in a.params)
    bundle_b, b = make()
    assert a.train(IMAGES, 2) == b.train(IMAGES, 2)
    assert same_state(get_lora_state(bundle_a), get_lora_state(bundle_b))
