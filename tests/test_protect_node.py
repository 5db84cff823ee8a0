"""The "Protect Photos for Posting" node (issue 15), run the way ComfyUI runs it, against tests/comfy_harness stubs."""
from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

from comfy_harness import ComfyStubs, InterruptProcessingException, comfy_error_type, load_pack, node_problems, \
    png_chunk_types, state_files, unload_pack

PACK = "comfyui-iddm"
NAME = "IDDMProtectPhotos"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Stub ComfyUI with the tiny model as a single-file checkpoint (+ ComfyUI's tokenizer folder)."""
    from iddm_core.diffusion.tiny import write_tiny_model, write_tiny_tokenizer

    stubs = ComfyStubs(tmp_path_factory.mktemp("comfyui"))
    _, single = write_tiny_model(stubs.root / "scratch")
    shutil.move(str(single), stubs.models / "checkpoints" / "tiny.safetensors")
    write_tiny_tokenizer(stubs.comfy_dir / "sd1_tokenizer")
    stubs.install()
    pack = load_pack(PACK)
    yield stubs, pack
    stubs.uninstall()
    unload_pack(PACK)


def _photos(small_faces_dir, n=2):
    """ComfyUI IMAGE batch [n, 40, 48, 3] (not square: the node crops) on the 8-bit grid."""
    import torch
    from PIL import Image

    files = sorted(p for p in small_faces_dir.iterdir() if p.suffix in (".jpg", ".png"))[:n]
    arrays = [np.asarray(Image.open(f).convert("RGB").resize((48, 40))) for f in files]
    return torch.from_numpy(np.stack(arrays)).float() / 255


def _run(pack, images, **kw):
    args = dict(ckpt_name="tiny.safetensors", method="aspl", cap=False, eta=0.05, alpha=0.01, rounds=1,
                surrogate_steps=1, pgd_steps=2, protect_seed=0, resolution=32, prior_preservation=False, unique_id="7")
    args.update(kw)
    return pack.NODE_CLASS_MAPPINGS[NAME]().protect(images, **args)


def test_registered_with_tooltips(env):
    _, pack = env
    cls = pack.NODE_CLASS_MAPPINGS[NAME]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS[NAME] == "Protect Photos for Posting"
    assert node_problems(NAME, cls) == []
    spec = cls.INPUT_TYPES()
    for group in ("required", "optional"):
        for name, entry in spec[group].items():
            assert entry[1].get("tooltip"), name
    assert cls.RETURN_TYPES == ("IMAGE", "STRING")


def test_protects_a_batch_then_save_node_writes_no_metadata(env, small_faces_dir):
    import torch
    from PIL import Image

    stubs, pack = env
    stubs.progress.clear()
    images = _photos(small_faces_dir)
    out = _run(pack, images, cap=True, ratio_steps=2)
    protected, text = out["result"]
    assert tuple(protected.shape) == (2, 32, 32, 3)
    # the node's input after its crop + resize, as the reference for the budget
    node_mod = sys.modules[f"{PACK}.nodes.protect_node"]
    clean = node_mod.images_to_tensor(images, 32).permute(0, 2, 3, 1)
    delta = (protected - clean).abs().max()
    assert 0 < float(delta) <= 0.05 + 1e-6
    assert "aspl + CAP" in text and "vae-encoder" in text
    assert [p[1] for p in stubs.progress if p[0] == "7"][-1] == 4            # 1 round: 1 + 2 PGD + 1 steps
    shown = pack.NODE_CLASS_MAPPINGS["IDDMSaveImageNoMetadata"]().save(protected, "posted/me")["ui"]["images"]
    for entry, image in zip(shown, protected):
        path = stubs.output / "posted" / entry["filename"]
        assert set(png_chunk_types(path)) == {"IHDR", "IDAT", "IEND"}
        with Image.open(path) as im:
            back = torch.from_numpy(np.array(im)).float() / 255
        assert torch.equal(back, image)                                     # already on the 8-bit grid


def test_bad_input_and_cancel(env, small_faces_dir):
    stubs, pack = env
    images = _photos(small_faces_dir)
    with pytest.raises(Exception) as caught:
        _run(pack, images, eta=0.01, alpha=0.02)
    assert comfy_error_type(caught.type) == "InputError" and "alpha" in str(caught.value)
    with pytest.raises(Exception) as caught:
        _run(pack, images[:1], cap=True)
    assert comfy_error_type(caught.type) == "InputError" and "2 photos" in str(caught.value)
    stubs.progress.clear()
    stubs.interrupted, stubs.interrupt_after = False, 1
    try:
        with pytest.raises(InterruptProcessingException):
            _run(pack, images)
    finally:
        stubs.interrupted, stubs.interrupt_after = False, None
    assert len([p for p in stubs.progress if p[0] == "7"]) == 1


# ------------------------------------------------------------------------------------------------ resume
@pytest.fixture
def clean(env, monkeypatch):
    stubs, pack = env
    monkeypatch.delenv("IDDM_CACHE_DIR", raising=False)
    stubs.progress.clear()
    stubs.interrupted, stubs.interrupt_after = False, None
    shutil.rmtree(stubs.temp / "iddm_state", ignore_errors=True)
    yield stubs, pack
    stubs.interrupted, stubs.interrupt_after = False, None


def test_new_widgets_are_appended_optional(env):
    _, pack = env
    spec = pack.NODE_CLASS_MAPPINGS[NAME].INPUT_TYPES()
    assert list(spec["optional"])[-1] == "resume" and spec["optional"]["resume"][1]["default"] is True


def test_cancelled_run_resumes_to_the_same_photos(clean, small_faces_dir, one_thread):
    import stat

    import torch

    stubs, pack = clean
    images = _photos(small_faces_dir)
    settings = dict(rounds=2, unique_id="8")                                  # 2 x (1 + 2 + 1) = 8 steps
    whole, text = _run(pack, images, **settings)["result"]
    assert "resumed" not in text and state_files(stubs) == []

    stubs.progress.clear()
    stubs.interrupt_after = 5                                                 # Cancel during round 2
    with pytest.raises(InterruptProcessingException):
        _run(pack, images, **settings)
    files = state_files(stubs)
    assert [f.name for f in files] == ["state.iddm"]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600 and stat.S_IMODE(files[0].parent.stat().st_mode) == 0o700
    node_mod = sys.modules[f"{PACK}.nodes.protect_node"]
    assert files[0].parent == node_mod.protect_state_dir(node_mod.images_to_tensor(images, 32))

    stubs.progress.clear()
    stubs.interrupt_after = None
    resumed, text = _run(pack, images, **settings)["result"]                 # queued again, same photos and settings
    assert "resumed after round 1 of 2" in text
    assert sorted({p[1] for p in stubs.progress if p[0] == "8"}) == [5, 6, 7, 8]    # only round 2 ran
    assert torch.equal(resumed, whole) and state_files(stubs) == []


def test_requeued_with_other_settings_starts_over_and_says_so(clean, small_faces_dir):
    stubs, pack = clean
    images = _photos(small_faces_dir)
    stubs.interrupt_after = 5
    with pytest.raises(InterruptProcessingException):
        _run(pack, images, rounds=2)
    assert len(state_files(stubs)) == 1
    stubs.interrupt_after = None
    text = _run(pack, images, rounds=2, protect_seed=5)["result"][1]
    assert "discarded" in text and "started over" in text and "seed" in text and "resumed" not in text
    assert state_files(stubs) == []


def test_resume_off_keeps_no_state(clean, small_faces_dir):
    stubs, pack = clean
    stubs.interrupt_after = 5
    with pytest.raises(InterruptProcessingException):
        _run(pack, _photos(small_faces_dir), rounds=2, resume=False)
    assert state_files(stubs) == []
