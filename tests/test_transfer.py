"""`bench transfer`: its pure pieces, and one real run with dlib on the shared photos."""
import json
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


def test_reference_levels_and_identity_similarity():
    from iddm_core.bench.transfer import identity_similarity, reference_levels

    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=-1)
    levels = reference_levels(e, ["a", "a", "b"])
    assert levels["same"] == pytest.approx(0.8) and levels["different"] == pytest.approx((0.0 + 0.6) / 2)
    assert levels["same_pairs"] == 1 and levels["different_pairs"] == 2
    protos = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0])}
    assert identity_similarity(e, protos, ["a", "a", "b"]) == pytest.approx((1.0 + 0.8 + 1.0) / 3)


def test_transfer_bench_runs_with_dlib(tmp_path, faces_dir):
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, "-m", "iddm_core.bench", "transfer", "--photos", str(faces_dir),
                           "--sets", "dlib;irse50", "--steps", "3", "--resolution", "160", "--out-json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=HANG_S,
                          env={**__import__("os").environ, "IDDM_MODEL_DIRS": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    cells = {c["judge"]: c for c in data["cells"]}                       # dlib and the packaged faceres judge
    assert set(cells) == {"dlib", "faceres"} and all(c["surrogates"] == ["dlib"] for c in cells.values())
    assert not cells["dlib"]["held_out"] and cells["faceres"]["held_out"]
    assert cells["dlib"]["after"] < cells["dlib"]["before"] - 0.05         # the attack works on its own surrogate
    for judge in cells:
        levels = data["levels"][judge]
        assert levels["same"] > levels["different"]                       # obama-obama2 vs the other pairs
    assert "irse50 not installed" in proc.stdout and "| dlib |" in proc.stdout
    assert "obama" not in proc.stdout and "biden" not in proc.stdout     # photos are never named
