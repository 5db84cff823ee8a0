"""The photo folder: faceless photos are reported by name (in memory and in errors, never written); too few
usable photos is a clear error naming the folder, before any model is involved (issue 12)."""
import io

import numpy as np
import pytest
from PIL import Image

from iddm_core.errors import InputError
from iddm_core.face.base import Face
from iddm_core.protection.refs import load_private_refs


class BrightFaceDetector:
    """Finds one centred face in bright images and none in dark ones (no dlib needed)."""

    def __init__(self):
        self.calls = 0

    def detect(self, rgb):
        self.calls += 1
        if rgb.mean() < 100:
            return []
        h, w = rgb.shape[:2]
        box = (w * 0.3, h * 0.3, w * 0.7, h * 0.7)
        lm = np.array([[0.4, 0.4], [0.6, 0.4], [0.5, 0.5], [0.42, 0.6], [0.58, 0.6]], dtype=np.float32) * [w, h]
        return [Face(box, lm.astype(np.float32))]


def _folder(tmp_path, faces, faceless):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in faces:
        Image.fromarray(np.full((80, 96, 3), 200, np.uint8)).save(folder / name)
    for name in faceless:
        Image.fromarray(np.full((80, 96, 3), 10, np.uint8)).save(folder / name)
    return folder


def test_one_usable_photo_says_how_many_are_needed_and_names_the_dropped_ones(tmp_path):
    folder = _folder(tmp_path, ["me.png"], ["cat.png", "sunset.png"])
    with pytest.raises(InputError) as err:
        load_private_refs(folder, 64, detector=BrightFaceDetector())
    msg = str(err.value)
    assert "need at least 3 photos with a face" in msg and f"found 1 in {folder}" in msg
    assert "cat.png" in msg and "sunset.png" in msg and "n_reference" not in msg


@pytest.mark.parametrize("faces, found", [([], 0), (["a.png", "b.png"], 2)])
def test_too_few_faces_names_folder_and_dropped_photos(tmp_path, faces, found):
    folder = _folder(tmp_path, faces, ["dark.png"])
    with pytest.raises(InputError, match=rf"found {found} in .*photos.*dark\.png"):
        load_private_refs(folder, 64, detector=BrightFaceDetector())


def test_skipped_names_are_kept_in_memory_only(tmp_path):
    folder = _folder(tmp_path, ["a.png", "b.png", "c.png"], ["holiday_beach.png"])
    from iddm_core.protection.refs import skipped_note

    refs = load_private_refs(folder, 64, detector=BrightFaceDetector())
    assert len(refs) == 3 and refs.skipped == ["holiday_beach.png"]
    assert "holiday_beach" not in repr(refs)
    assert skipped_note(refs.skipped) == "No face was found in 1 photo(s), not used: holiday_beach.png."
    assert skipped_note([]) == ""


def test_skip_faceless_off_names_every_faceless_file(tmp_path):
    folder = _folder(tmp_path, ["a.png", "b.png", "c.png"], ["x.png", "y.png"])
    with pytest.raises(InputError) as err:
        load_private_refs(folder, 64, detector=BrightFaceDetector(), skip_faceless=False)
    assert str(folder / "x.png") in str(err.value) and str(folder / "y.png") in str(err.value)


def test_listing_a_faceless_photo_says_so(tmp_path):
    folder = _folder(tmp_path, ["a.png", "b.png", "c.png"], ["x.png"])
    with pytest.raises(InputError, match="x.png: no face was found"):
        load_private_refs(folder, 64, detector=BrightFaceDetector(), reference_files=["a.png", "x.png"])


def test_bad_resolution_fails_before_the_detector_is_loaded(tmp_path, monkeypatch):
    import iddm_core.face.detect as detect

    def refuse(*args, **kwargs):
        raise AssertionError("face detector loaded before the resolution was checked")

    monkeypatch.setattr(detect, "get_detector", refuse)
    folder = _folder(tmp_path, ["a.png", "b.png", "c.png"], [])
    with pytest.raises(InputError, match="resolution=60"):
        load_private_refs(folder, 60)


def test_real_dlib_detector_reports_a_faceless_photo(tmp_path, small_faces_dir):
    import shutil

    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(small_faces_dir / "obama.jpg", folder / "obama.jpg")
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(folder / "wall.png")
    with pytest.raises(InputError, match=rf"found 1 in {folder}.*wall\.png"):
        load_private_refs(folder, 64)


def test_cli_prints_skipped_names_to_the_terminal():
    from iddm_core.cli._common import print_skipped

    out = io.StringIO()
    print_skipped(["x.png", "y.jpg"], "/home/me/photos", stream=out)
    assert out.getvalue() == "warning: /home/me/photos: No face was found in 2 photo(s), not used: x.png, y.jpg.\n"
    out = io.StringIO()
    print_skipped([], "/home/me/photos", stream=out)
    assert out.getvalue() == ""
