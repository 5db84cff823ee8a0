"""Protect photos before posting (issue 15): ASPL / FSMG maximise a surrogate's denoising loss, CAP on top."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from iddm_core.cli import main
from iddm_core.errors import InputError
from iddm_core.protection.ascent import ascent_step
from iddm_core.protection.photo_files import load_photos, output_names, quantise
from iddm_core.protection.protect import ProtectConfig, run_protect
from iddm_core.protection.style import (VAEEncoderStyle, VGG19Style, gram, load_vgg19, measure_style_spread,
                                        style_gradient, style_spread)

PRIVATE = "secret_bob"          # a private-looking file name that must not reach any output


@pytest.fixture(scope="module")
def demo():
    from iddm_core.diffusion.loading import load_model

    return load_model("demo")


@pytest.fixture(scope="module")
def photos64(small_faces_dir):
    x, _ = load_photos(small_faces_dir, 64)
    return x[:3]


def _photo_dir(tmp_path: Path, src: Path, n: int = 2) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, f in enumerate(sorted(p for p in src.iterdir() if p.suffix in (".jpg", ".png"))[:n]):
        shutil.copy(f, folder / f"{PRIVATE}_{i}{f.suffix}")
    return folder


# ------------------------------------------------------------------------------------------------ pure pieces
def test_quantise_keeps_budget_after_8bit_round_trip():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (2, 3, 16, 16), generator=g).to(torch.uint8)
    eta = 0.05                                            # 12.75/255: rounding x could reach 13/255 without the clip
    x = clean.float() / 255 + (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1) * eta
    x = x.clamp(0, 1)
    q = quantise(x, clean, eta)
    assert q.dtype == torch.uint8
    assert (q.int() - clean.int()).abs().max() <= 12
    assert ((q.float() / 255) - clean.float() / 255).abs().max() <= eta + 1e-7
    # the plain rounding would break it: the test case does hit 13/255
    assert (x.mul(255).round() - clean.float()).abs().max() == 13


def test_ascent_step_goes_up_the_gradient_and_stays_in_the_ball():
    x0 = torch.full((1, 3, 4, 4), 0.5)
    grad = torch.randn(1, 3, 4, 4)
    x = x0
    for _ in range(5):
        x = ascent_step(x0, x, grad, 0.02, 0.05)
    assert torch.allclose((x - x0), 0.05 * torch.sign(grad))


def test_style_spread_and_its_gradient():
    """The micro-batched gradient (mean Gram held fixed) equals autograd through the whole set's loss."""
    torch.manual_seed(0)
    net = VGG19Style().eval().requires_grad_(False)
    x = torch.rand(3, 3, 16, 16)
    grad, value = style_gradient(net, x, batch=1)
    xr = x.clone().requires_grad_(True)
    full = style_spread([gram(f) for f in net(xr)])
    ref, = torch.autograd.grad(full, xr)
    assert value == pytest.approx(float(full.detach()), rel=1e-5)
    assert torch.allclose(grad, ref, atol=1e-6 * float(ref.abs().max()) + 1e-12)
    same = x[:1].expand(3, -1, -1, -1)
    assert measure_style_spread(net, same) == pytest.approx(0.0, abs=1e-12)


def test_vgg19_reads_torchvision_keys_without_torchvision(tmp_path):
    from safetensors.torch import save_file

    net = VGG19Style()
    state = {k: torch.randn_like(v) for k, v in net.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)                # a full file's other keys are ignored
    save_file(state, str(tmp_path / "vgg19.safetensors"))
    loaded = load_vgg19(tmp_path / "vgg19.safetensors")
    assert torch.equal(loaded.features[10].weight, state["features.10.weight"])
    assert sorted(k for k in net.state_dict()) == [f"features.{i}.{p}" for i in (0, 10, 2, 5, 7)
                                                   for p in ("bias", "weight")]
    del state["features.7.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(InputError, match=r"bad\.pth.*features\.7\.weight"):
        load_vgg19(tmp_path / "bad.pth")


def test_output_names():
    assert output_names("protected_{n:03d}.png", 2) == ["protected_001.png", "protected_002.png"]
    assert output_names("me_{n}", 1) == ["me_1.png"]
    assert output_names("x", 2, ["a.jpg", "b.webp"]) == ["a.png", "b.png"]
    for bad in ("same.png", "../{n}.png", "{n:q}.png"):
        with pytest.raises(InputError, match="names"):
            output_names(bad, 2)


def test_config_errors_name_the_parameter():
    for kwargs, word in (({"eta": 0}, "eta"), ({"alpha": 0.2}, "alpha"), ({"method": "x"}, "method"),
                         ({"rounds": 0}, "rounds"), ({"cap_start": 1.0}, "cap_start"),
                         ({"ratio_probe": "x"}, "ratio_probe")):
        with pytest.raises(InputError, match=word):
            ProtectConfig(**kwargs).validate()


# ------------------------------------------------------------------------------------------------ the attack
def test_aspl_raises_the_surrogates_denoising_loss(demo, photos64):
    """Measured on fixed draws (the same noise and timesteps for clean and protected), not on PGD's own noisy
    per-step values: both under the surrogate the last PGD attacked and under the base model."""
    cfg = ProtectConfig(rounds=2, surrogate_steps=1, pgd_steps=4, resolution=32, prior_preservation=False)
    result = run_protect(demo, photos64[:2, :, ::2, ::2].contiguous(), cfg, check_memory=False)
    d = result.report["denoising_loss"]
    for which in ("surrogate", "base"):
        assert d[which]["protected"] > d[which]["clean"] * 1.05, d
    assert result.report["linf"] <= cfg.eta + 1e-7
    assert len(result.report["rounds"]) == 2 and len(result.report["rounds"][0]["surrogate_clean"]) == 1


def test_cap_lowers_the_gram_spread_versus_aspl_alone(demo, small_faces_dir):
    """Same photos (the four package faces at 64 px), budget, seed and 12 PGD steps; the spread is measured with the
    features CAP used (the VAE encoder's). CAP as configured by default (dynamic ratio, each candidate scored on a
    fresh draw) and with the static ratio R both lower the spread, and the attack stays an attack."""
    from iddm_core.bench.cap import VARIANTS, measure

    x, _ = load_photos(small_faces_dir, 64)
    variants = [v for v in VARIANTS if v[0] in ("ASPL", "CAP fresh", "CAP static R")]
    assert variants[1][1] == {"cap": True, "ratio_probe": ProtectConfig().ratio_probe}      # the default
    aspl, dynamic, static = measure(demo, x, 64, 12, seed=0, variants=variants)
    assert dynamic["spread"] < aspl["spread"] and static["spread"] < aspl["spread"], (aspl, dynamic, static)
    assert len(dynamic["picks"]) == 6 and set(dynamic["picks"]) <= set(ProtectConfig().ratio_grid())
    assert static["picks"] == [1.0] * 6                                     # CAP from half of the 12 steps on
    for row in (aspl, dynamic, static):
        assert row["loss_protected"] > row["loss_clean"] * 1.05, row


def test_cap_shared_probe_and_report(demo, photos64):
    """The shared-probe search: one candidate kept per CAP step from the grid; the report's spread is the set's."""
    x = photos64[:, :, ::2, ::2].contiguous()                 # 32 px: the bookkeeping, cheaply
    cfg = ProtectConfig(method="fsmg", fsmg_steps=0, rounds=1, pgd_steps=4, resolution=32, prior_preservation=False,
                        cap=True, ratio_steps=3, ratio_probe="shared")
    result = run_protect(demo, x, cfg, check_memory=False)
    assert result.report["features"] == "vae-encoder"
    steps = result.report["rounds"][0]["pgd"]
    assert [s.get("ratio") is not None for s in steps] == [False, False, True, True]
    assert {s["ratio"] for s in steps[2:]} <= {0.0, 0.5, 1.0}
    assert all(s["loss_after"] > 0 for s in steps[2:])
    net = VAEEncoderStyle(demo.vae)
    assert result.report["style_spread"]["protected"] == pytest.approx(measure_style_spread(net, result.protected),
                                                                       rel=1e-5)
    assert (result.protected - x).abs().max() <= 0.05 + 1e-7


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_defaults_are_the_library_defaults():
    """The CLI once searched ratios up to 100 (the paper's raw R) while the library's R is relative (1)."""
    from iddm_core.cli import build_parser
    from iddm_core.cli.protect import config_from_args

    args = build_parser().parse_args(["protect", "--photos", "p", "--out", "o"])
    assert config_from_args(args) == ProtectConfig().validate()


def _cli(photos, out, *extra):
    return main(["protect", "--photos", str(photos), "--out", str(out), "--model", "tiny", "--rounds", "1",
                 "--surrogate-steps", "1", "--pgd-steps", "1", "--no-prior", "--resolution", "32", *extra])


def test_cli_writes_pngs_without_text_within_budget(tmp_path, small_faces_dir, capsys):
    import numpy as np
    from PIL import Image

    from iddm_core.images import crop_resize, load_rgb

    photos = _photo_dir(tmp_path, small_faces_dir)
    out = tmp_path / "out"
    assert _cli(photos, out) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["protected_001.png", "protected_002.png"]
    originals = sorted(photos.iterdir())
    for name, orig in zip(files, originals):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and not getattr(im, "text", {}) and not im.info, im.info
            got = np.asarray(im.convert("RGB")).astype(int)
        clean = crop_resize(load_rgb(orig), 32)[0].astype(int)
        assert np.abs(got - clean).max() <= int(0.05 * 255)
        assert np.abs(got - clean).max() > 0
        assert PRIVATE.encode() not in (out / name).read_bytes()
    printed = capsys.readouterr()
    assert PRIVATE not in printed.out + printed.err
    # refuses to overwrite, before loading anything; --keep-names uses the original stems
    assert _cli(photos, out) == 2
    assert "already exists" in capsys.readouterr().err
    assert _cli(photos, tmp_path / "kept", "--keep-names") == 0
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [f"{PRIVATE}_0.png", f"{PRIVATE}_1.png"]


def test_cli_bad_input_fails_before_loading_a_model(tmp_path, small_faces_dir, capsys, monkeypatch):
    import iddm_core.diffusion.loading as models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    photos = _photo_dir(tmp_path, small_faces_dir)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "protected_002.png").write_bytes(b"")
    cases = [(["--photos", str(tmp_path / "missing"), "--out", str(tmp_path / "o1")], "missing"),
             (["--photos", str(photos), "--out", str(tmp_path / "o2"), "--eta", "0"], "eta"),
             (["--photos", str(photos), "--out", str(tmp_path / "o3"), "--eta", "-0.1"], "eta"),
             (["--photos", str(photos), "--out", str(tmp_path / "out")], "protected_002.png already exists"),
             (["--photos", str(photos), "--out", str(tmp_path / "o4"), "--vgg19", str(tmp_path / "no.pth")], "vgg19")]
    for argv, word in cases:
        assert main(["protect", "--model", "tiny", *argv]) == 2, argv
        assert word in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_cancel_writes_nothing(tmp_path, small_faces_dir, monkeypatch):
    from iddm_core.cli import _common

    class Cancel:
        def __init__(self):
            self.n = 0

        def __call__(self, ev):
            self.n += 1
            if self.n >= 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(_common, "ConsoleProgress", Cancel)
    photos = _photo_dir(tmp_path, small_faces_dir)
    out = tmp_path / "out"
    assert _cli(photos, out, "--state-dir", str(tmp_path / "state")) == 130
    assert not out.exists() or not any(out.iterdir())


def test_resume_continues_the_same_run(tmp_path, photos64, one_thread):
    """Interrupted after round 1 and resumed = one uninterrupted run, bit for bit (CPU, one thread)."""
    from iddm_core.training.checkpoint import StateMismatch, has_state
    from iddm_core.diffusion.loading import load_model

    cfg = ProtectConfig(rounds=2, surrogate_steps=1, pgd_steps=1, resolution=32, prior_preservation=False)
    x = photos64[:2]
    whole = run_protect(load_model("tiny"), x, cfg, check_memory=False)
    state = tmp_path / "state"
    run_protect(load_model("tiny"), x, cfg, check_memory=False, checkpoint_dir=state, stop_after=1)
    assert has_state(state)
    with pytest.raises(StateMismatch, match="settings differ"):
        run_protect(load_model("tiny"), x, ProtectConfig(**{**cfg.to_dict(), "eta": 0.04}), check_memory=False,
                    checkpoint_dir=state, resume=True)
    resumed = run_protect(load_model("tiny"), x, cfg, check_memory=False, checkpoint_dir=state, resume=True)
    assert resumed.report["resume"] == {"resumed_after": 1}
    assert torch.equal(resumed.protected, whole.protected)
    assert not has_state(state)
