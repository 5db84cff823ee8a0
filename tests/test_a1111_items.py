"""Issue 24, items 11-13: host memory given back after a run, uploads deleted after Preview and kept after a
settings error, LoRA labels web UIs cannot mistake for a real SD1 checkpoint's, the run's resolution in the LoRA,
the one-person check on the photos, the final similarity's label, numbers checked instead of clamped.

The tab tests reuse test_a1111's stub web UI (its ``webui`` / ``tab`` fixtures and helpers)."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from conftest import HANG_S
from test_a1111 import (LORA, PRIVATE, TINY, _click, _full_folder, _gradio, _last, _leftovers, _run_module,  # noqa: F401
                        _texts, tab, webui)

from iddm_core.errors import InputError


# ------------------------------------------------------------------------------------------------- memory
def _glibc() -> bool:
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim")
    except OSError:
        return False


def test_release_host_memory_gives_freed_heap_back():
    """In a fresh process: 240 MB of heap blocks freed (every 64th kept, so the heap cannot just shrink from the
    top) stay resident until release_host_memory, which hands them back (glibc) or only collects (elsewhere)."""
    code = (
        "import os, sys\n"
        "sys.path.insert(0, %r)\n"
        "from iddm_core.memory import release_host_memory\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20\n"
        "blocks = [bytearray(8192) for _ in range(30000)]\n"
        "keep = blocks[::64]\n"
        "del blocks\n"
        "before = rss()\n"
        "trimmed = release_host_memory()\n"
        "print(before, rss(), trimmed)\n"
    ) % str(Path(__file__).resolve().parents[1])
    if not sys.platform.startswith("linux"):
        from iddm_core.memory import release_host_memory

        assert release_host_memory() is False           # garbage collected, nothing else to do here
        return
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, trimmed = out.stdout.split()
    assert trimmed == str(_glibc())
    if _glibc():
        assert float(before) - float(after) > 150, out.stdout     # most of the 240 MB went back to the system


def test_tab_releases_host_memory_after_a_failed_run(tab, monkeypatch):
    import iddm_core.memory

    calls = []
    monkeypatch.setattr(iddm_core.memory, "release_host_memory", lambda: calls.append(1) or True)
    tab.stubs.state.fail_at_step = 1
    updates = _click(tab, "iddm_train", photos_folder=str(_full_folder(tab)), **TINY)
    assert _last(updates, "iddm_status").startswith("error: RuntimeError: simulated failure")
    assert calls == [1] and _leftovers(tab) == []


# ------------------------------------------------------------------------------------------------ uploads
def _gradio_uploads(tmp_path: Path, faces: Path, names=("obama.jpg", "obama2.jpg", "biden.jpg")):
    """What gradio 3.41 hands a function for a File(file_count="multiple") input after an upload: its /upload
    route writes <temp>/<random>/<name>, File.preprocess copies that to <temp>/<sha>/<name> and returns temp-file
    objects (.name the hashed copy, .orig_name the upload path). Returns (objects, every file gradio wrote)."""
    gr = _gradio()
    temp = tmp_path / "gradio_temp"
    component = gr.File(file_count="multiple")
    component.DEFAULT_TEMP_DIR = str(temp)
    payload = []
    for i, name in enumerate(names):
        upload = temp / f"upload{i:040d}" / f"{PRIVATE}_{name}"
        upload.parent.mkdir(parents=True)
        upload.write_bytes((faces / name).read_bytes())
        payload.append({"name": str(upload), "data": None, "is_file": True})
    objects = component.preprocess(payload)
    written = sorted(p for p in temp.rglob("*") if p.is_file() and p.stat().st_size)
    assert len(written) == 2 * len(names)                  # gradio 3.41 keeps two copies of each photo
    return objects, written


def test_preview_deletes_every_gradio_copy_and_empties_the_box(tab, tmp_path, faces_dir):
    objects, written = _gradio_uploads(tmp_path, faces_dir)
    updates = _click(tab, "iddm_preview", uploads=objects, resolution=64)
    photos = updates[0]["iddm_photos"]
    assert photos.startswith("3 photos with a face at 64px"), photos
    assert "temporary copies of the uploaded photos were deleted" in photos
    assert updates[0]["iddm_uploads"] is None
    assert not any(p.exists() for p in written) and not any(p.parent.exists() for p in written)
    assert tab.stubs.calls == []


def test_preview_deletes_uploads_on_an_error_too(tab, tmp_path, faces_dir):
    objects, written = _gradio_uploads(tmp_path, faces_dir, names=("obama.jpg",))
    updates = _click(tab, "iddm_preview", uploads=objects, resolution=50)
    photos = updates[0]["iddm_photos"]
    assert photos.startswith("error: resolution=50") and "uploaded photos were deleted" in photos
    assert not any(p.exists() for p in written) and updates[0]["iddm_uploads"] is None


def test_settings_error_keeps_the_uploads_and_names_the_parameter(tab, tmp_path, faces_dir):
    """eta typed as 5: an error naming eta and its range before anything starts (no clamping to the old slider's
    0.25), and the uploaded photos stay for the next click (box and files)."""
    gr = _gradio()
    assert isinstance(tab.c["iddm_eta"], gr.Number) and isinstance(tab.c["iddm_T"], gr.Number)
    objects, written = _gradio_uploads(tmp_path, faces_dir)
    updates = _click(tab, "iddm_train", uploads=objects, **dict(TINY, eta=5))
    status = _last(updates, "iddm_status")
    assert status.startswith("error: eta=5 is out of range: give a number from 0.001 to 1"), status
    assert "uploaded photos are kept" in status and "not touched" in status
    assert all("iddm_uploads" not in u for u in updates)
    assert all(p.exists() for p in written)
    assert tab.stubs.calls == [] and tab.stubs.state.calls == [] and _leftovers(tab) == []
    # a typo in the LoRA name, also unrelated to the photos: still kept
    updates = _click(tab, "iddm_train", uploads=objects, **dict(TINY, lora_name="../x"))
    assert "lora_name='../x'" in _last(updates, "iddm_status") and all(p.exists() for p in written)
    from test_a1111 import _run_module as run_module

    run_module().delete_uploads(objects)
    assert not any(p.exists() for p in written)


def test_train_consumes_the_uploads_and_says_so(tab, tmp_path, faces_dir):
    """A run that read the uploads deletes both of gradio's copies and empties the box, and says so; the LoRA of
    the tiny model carries custom labels and the run's resolution (128 px here, the tiny model's own is 64)."""
    from iddm_core.training.kohya_check import inspect_lora

    objects, written = _gradio_uploads(tmp_path, faces_dir, names=("obama.jpg", "obama2.jpg"))
    updates = _click(tab, "iddm_train", photos_folder=str(tab.photos), uploads=objects,
                     **dict(TINY, resolution=128))
    status = _last(updates, "iddm_status")
    assert status.startswith("finished:") and "temporary copies of the uploaded photos were deleted" in status
    assert _last(updates, "iddm_uploads") is None and not any(p.exists() for p in written)
    info = inspect_lora(tab.stubs.lora_dir / f"{LORA}.safetensors")
    meta = info["metadata"]
    assert meta["modelspec.resolution"] == "128x128" and info["custom_base"] and info["compatible"]
    assert _a1111_version(meta) == "SD2" and _forge_version(meta) != "SD1"
    summary = _last(updates, "iddm_summary")
    assert "face similarity of the protected photos X' after the last iteration" in summary
    assert "one-step denoised reconstruction" in summary and PRIVATE not in summary


# ------------------------------------------------------------------------------------------ LoRA labels
def _a1111_version(meta: dict) -> str:
    """A1111 1.10.1's reading of a LoRA's metadata (extensions-builtin/Lora/network.py, detect_version), restated:
    an "sdxl_" base version is SDXL, else ss_v2 "True" is SD2, else any metadata means SD1."""
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


def _forge_version(meta: dict) -> str:
    """Forge's reading: its SDXL architecture string first, then as A1111, SD1 only for SD1's architecture."""
    if meta.get("modelspec.architecture") == "stable-diffusion-xl-v1-base/lora":
        return "SDXL"
    version = _a1111_version(meta)
    if version == "SD1" and meta.get("modelspec.architecture") != "stable-diffusion-v1/lora":
        return "Unknown"
    return version


def _stub_bundle(kind: str, channels, context: int, prediction="epsilon"):
    return types.SimpleNamespace(kind=kind, prediction_type=prediction, resolution=512,
                                 unet=types.SimpleNamespace(config={"block_out_channels": list(channels),
                                                                    "cross_attention_dim": context}))


@pytest.mark.parametrize("kind, channels, context, version, web_ui", [
    ("sd1", (320, 640, 1280, 1280), 768, "sd_v1", "SD1"),
    ("sd2", (320, 640, 1280, 1280), 1024, "sd_v2", "SD2"),
    ("sdxl", (320, 640, 1280), 2048, "sdxl_base_v1-0", "SDXL"),
])
def test_real_checkpoints_keep_their_labels(kind, channels, context, version, web_ui):
    from iddm_core.training.kohya import build_metadata, is_standard_base
    from iddm_core.training.lora import LoraSpec

    bundle = _stub_bundle(kind, channels, context)
    meta = build_metadata(bundle, LoraSpec(rank=4), "x", resolution=768)
    assert is_standard_base(bundle) and meta["ss_base_model_version"] == version
    assert _a1111_version(meta) == web_ui == _forge_version(meta)
    assert meta["modelspec.resolution"] == "768x768"


@pytest.mark.parametrize("kind, prediction", [("sd1", "epsilon"), ("sd1", "v_prediction"), ("sd2v", "v_prediction")])
def test_demo_and_tiny_shaped_bases_are_not_filed_as_sd1(kind, prediction):
    """The demo model's shape (widths 32/64/128/128, context 32) and the tiny one's: A1111 and Forge must not
    list the LoRA next to real SD1 checkpoints (every layer would fail: "Networks with errors")."""
    from iddm_core.training.kohya import build_metadata, is_standard_base
    from iddm_core.training.lora import LoraSpec

    for channels in ((32, 64, 128, 128), (32, 32, 64, 64)):
        bundle = _stub_bundle(kind, channels, 32, prediction)
        meta = build_metadata(bundle, LoraSpec(rank=4), "x", resolution=128)
        assert not is_standard_base(bundle)
        assert _a1111_version(meta) == "SD2" and _forge_version(meta) == "SD2"
        assert meta["ss_base_model_version"].startswith("iddm_custom_sd_v")
        assert meta["modelspec.architecture"].startswith("iddm-custom-stable-diffusion-v")
        assert meta["modelspec.prediction_type"] == ("v" if prediction == "v_prediction" else "epsilon")
        assert meta["modelspec.resolution"] == "128x128"


def test_demo_model_lora_labels_and_comfy_keys(tmp_path):
    """The real demo model: custom labels, still a valid kohya file by its tensor names (what ComfyUI reads)."""
    from iddm_core.training.kohya import save_kohya_lora
    from iddm_core.training.kohya_check import inspect_lora
    from iddm_core.training.lora import LoraSpec, add_lora
    from iddm_core.diffusion.loading import load_model

    bundle = load_model("demo")
    spec = LoraSpec(rank=2)
    add_lora(bundle, spec)
    info = inspect_lora(save_kohya_lora(tmp_path / "d.safetensors", bundle, spec, "d", resolution=96))
    meta = info["metadata"]
    assert info["compatible"] and info["kind"] == "sd1" and info["custom_base"], info["problems"]
    assert _a1111_version(meta) != "SD1" and _forge_version(meta) != "SD1"
    assert meta["modelspec.resolution"] == "96x96" and meta["modelspec.prediction_type"] == "v"


# ------------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("field, value, message", [
    ("eta", 5, "eta=5 is out of range: give a number from 0.001 to 1"),
    ("T", 2.5, "T=2.5: give a whole number from 1 to 1000"),
    ("alpha", None, "alpha=None: give a number"),
    ("eta", float("nan"), "eta=nan: give a number"),
    ("pgd_batch", 0, "pgd_batch=0 is out of range"),
])
def test_pgd_config_names_out_of_range_numbers(field, value, message):
    from iddm_core.frontend import pgd_config

    values = dict(preset="custom", T=8, rho=0.1, eta=0.08, alpha=0.008, gradient="full", pgd_batch=1)
    values[field] = value
    with pytest.raises(InputError) as err:
        pgd_config(**values)
    assert str(err.value).startswith(message), str(err.value)


def test_iddm_config_checks_numbers_and_ignores_unused_fields():
    from iddm_core.frontend import iddm_config, pgd_config

    pgd = pgd_config("privacy", 8, None, 0.08, 0.008)            # the preset fixes rho: the field is not used
    assert pgd.rho == 0.1
    args = dict(K=1, ft_steps=1, rank=4, lr=1e-4, resolution=0, seed=0, prior_preservation=False,
                num_class_images=0, surrogates=("dlib",), tau=0.03)
    assert iddm_config(pgd, **args).num_class_images == 1     # no prior preservation: the count is not used
    for field, value, message in (("num_class_images", 0, "num_class_images=0 is out of range"),
                                  ("K", 0.5, "K=0.5: give a whole number"), ("lr", 1.0, "lr=1 is out of range"),
                                  ("resolution", 4096, "resolution=4096 is out of range"),
                                  ("tau", -1, "tau=-1 is out of range")):
        bad = {**args, "prior_preservation": True, "num_class_images": 8, field: value}
        with pytest.raises(InputError, match=message.replace("(", r"\(")):
            iddm_config(pgd, **bad)


# --------------------------------------------------------------------------------------------- one person
def _refs(faces_dir: Path, names, resolution=64):
    from PIL import Image

    from iddm_core.face.detect import get_detector
    from iddm_core.images import Photo, load_rgb
    from iddm_core.protection.refs import refs_from_photos

    photos = []
    for i, name in enumerate(names):
        rgb = load_rgb(faces_dir / name)
        if name in names[:i]:                              # a second copy of a photo: its mirror image
            import numpy as np

            rgb = np.ascontiguousarray(np.asarray(Image.fromarray(rgb).transpose(Image.FLIP_LEFT_RIGHT)))
        photos.append(Photo(f"{PRIVATE}_{i}_{name}", Path(f"{PRIVATE}_{i}_{name}"), rgb))
    return refs_from_photos(photos, resolution, get_detector("dlib"), source="test")


def test_identity_check_names_the_photo_of_someone_else(faces_dir):
    from iddm_core.frontend import refs_summary
    from iddm_core.protection.refs import check_identity, identity_note

    refs = _refs(faces_dir, ["obama.jpg", "obama2.jpg", "obama.jpg", "biden.jpg"])
    check = check_identity(refs)
    assert check.majority and [refs.names[i] for i in check.outliers] == [f"{PRIVATE}_3_biden.jpg"]
    assert float(check.distances[0, 1]) < 0.6 < float(check.distances[0, 3])
    note = identity_note(refs)
    assert note.startswith("warning: 1 photo(s) do not look like the same person as the other 3")
    assert f"{PRIVATE}_3_biden.jpg" in note and note in refs_summary(refs)
    hidden = refs_summary(refs, show_names=False)                 # ComfyUI: positions only
    assert PRIVATE not in hidden and "#4 (of the folder's 4 photos, sorted by file name)" in hidden
    assert PRIVATE not in repr(refs) and PRIVATE not in repr(check)


def test_identity_check_four_people_and_one_person(faces_dir):
    from iddm_core.protection.refs import check_identity, identity_note

    mixed = _refs(faces_dir, ["obama.jpg", "biden.jpg", "astronaut.png", "obama2.jpg"])
    # the two photos of Obama are only half of the four: no majority
    check = check_identity(mixed)
    assert not check.majority and not check.consistent
    assert identity_note(mixed).startswith("warning: these 4 photos do not look like one person")
    same = _refs(faces_dir, ["obama.jpg", "obama2.jpg", "obama.jpg"])
    assert check_identity(same).consistent and identity_note(same) == ""


def test_preview_warns_about_a_mixed_set(tab, faces_dir):
    folder = tab.root / "mixed"
    if not folder.exists():
        import shutil

        folder.mkdir()
        for name in ("obama.jpg", "obama2.jpg", "biden.jpg", "astronaut.png"):
            shutil.copy(faces_dir / name, folder / f"{PRIVATE}_{name}")
    photos = _click(tab, "iddm_preview", photos_folder=str(folder), resolution=64)[0]["iddm_photos"]
    assert "do not look like one person" in photos, photos


def test_result_summary_says_what_the_similarity_measures():
    from iddm_core.frontend import result_summary

    text = result_summary("a.safetensors", {"config": {"K": 1, "pgd": {"T": 2}}, "resolution": 64,
                                            "final_similarity": {"dlib": 0.5}})
    assert "face similarity of the protected photos X' after the last iteration" in text and "dlib 0.500" in text
    assert "mean cosine similarity to your clean reference photos" in text
