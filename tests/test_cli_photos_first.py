"""`iddm train` examines the photo folder before it loads any model, and names every photo it leaves out on the
terminal (issue 12). Needs cmd_train (iddm_core/cli/iddm.py) to load the photos first, at the resolution
`validate_model` reports, and to call `_common.print_skipped`."""
import shutil

import numpy as np
import pytest
from PIL import Image

from iddm_core.cli import main
from iddm_core.errors import ModelError


def _photos(tmp_path, src, faces):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in faces:
        shutil.copy(src / name, folder / name)
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(folder / "wall.png")
    return folder


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    import iddm_core.diffusion.loading as models

    def refuse(*args, **kwargs):
        raise ModelError("stopped: the model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setenv("IDDM_CACHE_DIR", str(tmp_path / "cache"))


def test_one_usable_photo_fails_before_any_model_is_loaded(tmp_path, small_faces_dir, no_model, capsys):
    folder = _photos(tmp_path, small_faces_dir, ["obama.jpg"])
    rc = main(["train", "--refs", str(folder), "--out", str(tmp_path / "me.safetensors"), "--model", "tiny"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"need at least 3 photos with a face (2 reference + 1 protected); found 1 in {folder}" in err
    assert "wall.png" in err and "the model was loaded" not in err
    assert not (tmp_path / "me.safetensors").exists()


def test_faceless_photos_are_named_on_the_terminal(tmp_path, small_faces_dir, no_model, capsys):
    folder = _photos(tmp_path, small_faces_dir, ["obama.jpg", "obama2.jpg", "biden.jpg"])
    rc = main(["train", "--refs", str(folder), "--out", str(tmp_path / "me.safetensors"), "--model", "tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and "the model was loaded" in err      # got as far as the model, after the photos
    assert f"warning: {folder}: No face was found in 1 photo(s), not used: wall.png." in err


def test_sdxl_checkpoint_is_checked_from_its_header_then_the_photos(tmp_path, small_faces_dir, no_model, capsys):
    """An SDXL checkpoint passes `train`'s header check (no model load) and the photos are read before the model
    is loaded."""
    assert main(["tiny-model", "--kind", "sdxl", str(tmp_path / "m")]) == 0
    ckpt = tmp_path / "m" / "tiny-sdxl"                      # the diffusers folder (it brings its tokenizers)
    folder = _photos(tmp_path, small_faces_dir, ["obama.jpg", "obama2.jpg", "biden.jpg"])
    capsys.readouterr()
    rc = main(["train", "--refs", str(folder), "--out", str(tmp_path / "me.safetensors"), "--model", str(ckpt)])
    err = capsys.readouterr().err
    assert rc == 2 and "the model was loaded" in err                     # it got as far as the load
    assert err.index("wall.png") < err.index("the model was loaded")     # photos first
