"""`bench paper --faces CORPUS` (issue 26 item 3): the paper's table per identity of a corpus, mean +- sd over them,
R1/R5 against a gallery of every other corpus identity."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANG_S, ROOT, SHARED_FACES
from iddm_core.bench.paper_corpus import (aggregate, choose_identities, gallery_without, mean_sd, row_numbers,
                                          write_photo_set)
from iddm_core.errors import InputError

CONGRESS = SHARED_FACES / "congress"


def test_mean_sd_ignores_missing_values():
    assert mean_sd([1.0, 3.0, None, float("nan")]) == (2.0, math.sqrt(2.0), 2)
    assert mean_sd([None]) == (None, None, 0)
    assert mean_sd([0.5]) == (0.5, 0.0, 1)


def test_identities_need_two_photos_and_test_ids_come_first():
    layout = {"A": [Path("a1"), Path("a2")], "B": [Path("b1")], "C": [Path("c1"), Path("c2")]}
    assert choose_identities(layout, "all", None) == ["A", "C"]
    assert choose_identities(layout, "C,A", 1) == ["C"]
    with pytest.raises(InputError, match="Z"):
        choose_identities(layout, "A,Z", None)
    with pytest.raises(InputError, match="at least 2 photos"):
        choose_identities(layout, "B", None)
    assert gallery_without(layout, "A") == {"B": [Path("b1")], "C": [Path("c1"), Path("c2")]}


def test_photo_set_is_each_photo_and_its_mirror_without_names(tmp_path, small_faces_dir):
    import numpy as np
    from PIL import Image

    src = [small_faces_dir / "obama.jpg", small_faces_dir / "obama2.jpg"]
    write_photo_set(src, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00.png", "01.png", "02.png", "03.png"]
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("00.png", "01.png"))
    assert (a[:, ::-1] == b).all() and not (a == b).all()


def test_aggregate_is_mean_and_sd_over_identities_per_method():
    def row(method, fsr, ism, top1):
        return {"method": method, "fsr": fsr, "time_s": 1.0, "brisque": None,
                "recognizers": {"faceres": {"ism": ism, "match_rate": 0.0, "retrieval": {"top1": top1, "top5": 1.0}}}}

    table = aggregate({"A": [row("none", 1.0, 0.6, 1.0), row("iddm", 0.5, 0.4, 0.0)],
                       "B": [row("none", 0.5, 0.8, 0.0), row("iddm", 1.0, 0.2, 0.0)]})
    assert [r["method"] for r in table] == ["none", "iddm"]
    none = table[0]["stats"]
    assert none["fsr"]["mean"] == 0.75 and none["ism faceres"]["mean"] == pytest.approx(0.7)
    assert none["R1 faceres"] == {"mean": 0.5, "sd": pytest.approx(math.sqrt(0.5)), "n": 2}
    assert table[1]["stats"]["R1 faceres"]["mean"] == 0.0
    assert set(row_numbers(row("x", 1, 0.5, 1))) == {"fsr", "brisque", "ism faceres", "match faceres",
                                                      "R1 faceres", "R5 faceres", "psnr X'"}


@pytest.mark.skipif(not CONGRESS.is_dir(), reason="needs ../shared/faces/congress (CI has it)")
def test_corpus_mode_runs_per_identity_with_the_others_as_gallery(tmp_path):
    """Two test identities of a small corpus (both with two photos) plus three one-photo identities: every method
    per identity, the table over identities, and R1 against a gallery of the *other* identities (4 + the user)."""
    from iddm_core.demo.model.data import read_identity_list

    two = [i for i in read_identity_list() if len(list((CONGRESS / i).glob("*.jpg"))) >= 2][:2]
    others = sorted(d.name for d in CONGRESS.iterdir() if d.is_dir() and len(list(d.glob("*.jpg"))) == 1)[:3]
    corpus = tmp_path / "corpus"
    for ident in two + others:
        shutil.copytree(CONGRESS / ident, corpus / ident)
    out = tmp_path / "paper.json"
    proc = subprocess.run([sys.executable, "-m", "iddm_core.bench", "paper", "--faces", str(corpus), "--model", "tiny",
                           "--tiny-settings", "--anti-db", "none", "--rhos", "0.5", "--out-json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mean +- sd over 2 identities" in proc.stdout
    data = json.loads(out.read_text())
    assert data["identities"] == two
    assert [r["method"] for r in data["table"]] == ["DreamBooth (no defense)", "IDDM rho=0.5"]
    for rows in data["per_identity"].values():
        for r in rows:
            for entry in r["recognizers"].values():
                assert entry["retrieval"]["identities"] == 5      # the user + the 4 other corpus identities
    assert str(tmp_path) not in out.read_text()                   # no path of the photo sets in the results
