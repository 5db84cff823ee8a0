"""`bench transfer`: its pure pieces, and one real run with dlib on the shared photos."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import HANG_S, ROOT


def test_parse_sets_skips_sets_with_missing_recognisers():
    from iddm_core.bench.transfer import parse_sets
    from iddm_core.errors import InputError

    sets, notes = parse_sets("dlib;ir152;dlib+irse50;all", ["dlib", "irse50"])
    assert sets == [("dlib",), ("dlib", "irse50")]                       # "all" = dlib+irse50, listed once
    assert notes == ["set ir152 skipped: ir152 not installed"]
    with pytest.raises(InputError, match="no set"):
        parse_sets("irse50", ["dlib"])
    with pytest.raises(InputError, match="--sets"):
        parse_sets("dlib;nosuchmodel", ["dlib"])


def test_trials_verification_and_face_box():
    from iddm_core.bench.transfer import box_slices, mean_of, trials_of, verified_share

    layout = {"a": ["a1", "a2"], "b": ["b1"], "c": ["c1", "c2", "c3"], "d": ["d1", "d2"]}
    assert trials_of(layout) == ["a", "c", "d"] and trials_of(layout, 2) == ["a", "c"]
    assert trials_of(layout, 1, skip=1) == ["c"] and trials_of(layout, skip=2) == ["d"]
    # a probe in which the judge finds no face (None) is not verified, and is left out of the mean cosine
    assert verified_share([0.7, 0.6, None, 0.62], 0.615) == pytest.approx(0.5)
    assert verified_share([], 0.615) == 0.0
    assert mean_of([0.5, None, 0.7]) == pytest.approx(0.6) and mean_of([None]) is None
    rows, cols = box_slices((250.4, -3.0, 300.0, 40.6), 256)            # cut by the border, still 11 px for SSIM
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 41, 245, 256)


def test_mirror_reference_and_other_photo_protocol(tmp_path, faces_dir):
    """One trial per identity with two photos: references = first photo + mirror, probe = the other photo."""
    from iddm_core.bench.transfer import load_trials
    from iddm_core.evaluation.faces import gallery_layout
    from iddm_core.face.detect import get_detector

    for name in ("obama.jpg", "obama2.jpg", "biden.jpg"):
        shutil.copy(faces_dir / name, tmp_path / name)
    layout = gallery_layout(tmp_path)
    trials = load_trials(layout, ["obama"], 160, get_detector("dlib"))
    faces = trials["obama"]
    assert faces.images.shape == (3, 3, 160, 160) and all(f is not None for f in faces.found)
    # the mirror of the reference photo, cropped around its own detection: close to the flipped crop
    mirrored = (faces.images[1] - faces.images[0].flip(-1)).abs().mean()
    assert mirrored < 0.5 * (faces.images[1] - faces.images[0]).abs().mean()
    assert (faces.images[2] - faces.images[0]).abs().mean() > 0.05       # the probe is another photo


def test_transfer_bench_runs_with_dlib(tmp_path, faces_dir):
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, "-m", "iddm_core.bench", "transfer", "--photos", str(faces_dir),
                           "--sets", "dlib;irse50", "--judges", "dlib,faceres", "--steps", "3",
                           "--resolution", "160", "--jitter", "0.02", "--out-json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=HANG_S,
                          env={**os.environ, "IDDM_MODEL_DIRS": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["settings"]["trials"] == 1 and data["settings"]["alpha"] is None     # L2 steps under the floor
    assert data["settings"]["psnr"] == 30.0
    assert data["settings"]["transfer"] == "diversity 1, jitter 0.02, 4 samples"   # defaults + flag
    cells = {c["judge"]: c for c in data["cells"]}                       # dlib and the packaged faceres judge
    assert set(cells) == {"dlib", "faceres"} and all(c["surrogates"] == ["dlib"] for c in cells.values())
    assert not cells["dlib"]["held_out"] and cells["faceres"]["held_out"]
    assert cells["dlib"]["after"] < cells["dlib"]["before"] - 0.05         # the attack works on its own surrogate
    assert cells["dlib"]["verified_before"] == 1.0                          # obama2 vs obama + mirror, clean
    (entry,) = data["sets"]
    assert entry["weights_last"] == {"dlib": 1.0} and 29.9 <= entry["psnr"] < 40 and 0 < entry["ssim"] < 1
    assert entry["linf"] <= 0.08 + 1e-6
    assert "irse50 not installed" in proc.stdout and "| dlib |" in proc.stdout and "PSNR" in proc.stdout
    assert "obama" not in proc.stdout and "biden" not in proc.stdout     # photos are never named
    assert "obama" not in out.read_text()


def test_iddm_train_and_batch_take_the_transfer_options():
    """`iddm train` (and so every `iddm batch` job, whose settings are train's options) reaches PGDConfig.transfer;
    off unless asked, so a default run and its resume fingerprint are those of 0.2; a bad value names itself."""
    from iddm_core.batch.jobs import override_types
    from iddm_core.cli import build_parser
    from iddm_core.cli.iddm import config_from_args
    from iddm_core.errors import InputError
    from iddm_core.face.transfer import TransferOptions

    base = ["train", "--refs", "x", "--out", "y.safetensors"]
    assert config_from_args(build_parser().parse_args(base)).pgd.transfer == TransferOptions()
    on = config_from_args(build_parser().parse_args(base + ["--momentum", "1", "--diversity", "0.5",
                                                            "--samples", "2"]))
    assert on.pgd.transfer == TransferOptions(momentum=1.0, diversity=0.5, samples=2)
    with pytest.raises(InputError, match="diversity"):
        config_from_args(build_parser().parse_args(base + ["--diversity", "2"]))
    assert {"momentum", "diversity", "jitter", "smooth", "samples"} <= set(override_types())
