"""bench verify (issue 26 item 2): the verification statistics against brute force, and the command on real faces."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import PACKAGE_FACES
from iddm_core.bench import verify as v


def test_pair_scores_split_every_pair_once():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5))
    ids = np.array([0, 0, 1, 2, 2, 2])
    for metric in ("cosine", "euclidean"):
        same, diff = v.pair_scores(x, ids, metric)
        assert len(same) == 1 + 3 and len(diff) == 15 - 4
    same, _ = v.pair_scores(x, ids, "euclidean")
    assert np.isclose(same[0], np.linalg.norm(x[0] - x[1]))
    same, _ = v.pair_scores(x, ids, "cosine")
    assert np.isclose(same[0], x[0] @ x[1] / np.linalg.norm(x[0]) / np.linalg.norm(x[1]))


def test_auc_matches_counting_pairs():
    rng = np.random.default_rng(1)
    same, diff = rng.normal(1.0, 1.0, 40).round(1), rng.normal(0.0, 1.0, 300).round(1)    # with ties
    brute = np.mean([(s > d) + 0.5 * (s == d) for s in same for d in diff])
    assert v.roc_auc(same, diff) == pytest.approx(brute)
    assert v.roc_auc(-same, -diff, higher_is_same=False) == pytest.approx(brute)
    assert v.roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert v.roc_auc(np.array([0.0]), np.array([1.0])) == 0.0


@pytest.mark.parametrize("higher", [True, False])
def test_threshold_at_far_accepts_at_most_that_share(higher):
    rng = np.random.default_rng(2)
    diff = rng.normal(size=5000)
    same = rng.normal(2.0 if higher else -2.0, 1.0, size=200)
    for far in (0.01, 0.001):
        t = v.threshold_at_far(diff, far, higher)
        tar, achieved = v.accept_rates(same, diff, t, higher)
        assert achieved <= far and achieved >= far - 1.5 / len(diff)      # as many false accepts as allowed
        looser = t - 1e-6 if higher else t + 1e-6
        assert v.accept_rates(same, diff, looser, higher)[1] > far          # any looser threshold lets one more in


def test_equal_error_rate_against_a_sweep():
    rng = np.random.default_rng(3)
    same, diff = rng.normal(1.5, 1.0, 300), rng.normal(0.0, 1.0, 3000)
    eer, t = v.equal_error_rate(same, diff)
    sweep = np.linspace(-3, 4, 7001)
    far = np.array([np.mean(diff >= x) for x in sweep])
    frr = np.array([np.mean(same < x) for x in sweep])
    best = np.argmin(np.abs(far - frr))
    assert eer == pytest.approx((far[best] + frr[best]) / 2, abs=0.01)
    assert t == pytest.approx(sweep[best], abs=0.1)
    d_eer, d_t = v.equal_error_rate(-same, -diff, higher_is_same=False)     # the same in distance form
    assert d_eer == pytest.approx(eer) and d_t == pytest.approx(-t)


def test_verify_command_prints_and_writes_json(tmp_path):
    """The package's four photos (obama twice, biden, astronaut): one same pair, five different pairs; dlib judged
    by cosine and by its own Euclidean distance, the same pair the most alike under both; no name printed."""
    import subprocess
    import sys

    from conftest import HANG_S, ROOT

    out = tmp_path / "v.json"
    run = subprocess.run([sys.executable, "-m", "iddm_core.bench", "verify", "--faces", str(PACKAGE_FACES),
                          "--recognizers", "dlib", "--out-json", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=HANG_S)
    assert run.returncode == 0, run.stderr
    assert "dlib (euclidean)" in run.stdout and "obama" not in run.stdout
    data = json.loads(out.read_text())
    assert data["photos"] == 4 and data["identities"] == 3
    for key, higher in (("dlib (cosine)", True), ("dlib (euclidean)", False)):
        r = data["recognizers"][key]
        assert r["n_same"] == 1 and r["n_different"] == 5 and r["higher_is_same"] == higher
        assert r["auc"] == 1.0                       # obama-obama2 is the most alike pair either way
    assert data["recognizers"]["dlib (euclidean)"]["same_mean"] < 0.6 < data["recognizers"]["dlib (euclidean)"]["different_mean"]
