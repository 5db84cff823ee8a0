"""Demo model v2 (issue 26): face crops of a folder-per-identity corpus (`prepare`), the fixed test identities kept
out of them, and `train --data` on the crops (a few steps, no dlib), the wall-clock budget of a phase."""
import csv
import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

CONGRESS = Path(os.environ.get("IDDM_CONGRESS_DIR",
                               Path(__file__).resolve().parents[1].parent / "shared" / "faces" / "congress"))
needs_corpus = pytest.mark.skipif(not (CONGRESS / "index.csv").is_file(),
                                  reason=f"congress corpus not found at {CONGRESS} (set IDDM_CONGRESS_DIR)")


def two_photo_identities():
    with open(CONGRESS / "index.csv", newline="") as f:
        counts = Counter(row["identity"] for row in csv.DictReader(f))
    return {i for i, n in counts.items() if n == 2}


def test_test_identities_file_is_40_distinct_ids():
    from iddm_core.demo.model.data import FACES, HELD_OUT, TEST_IDENTITIES_FILE, read_identity_list

    ids = read_identity_list()
    assert len(ids) == 40 and len(set(ids)) == 40
    assert all(i.isalnum() and i.upper() == i for i in ids)
    assert not set(ids) & (set(FACES) | set(HELD_OUT))
    assert "sha256" in TEST_IDENTITIES_FILE.read_text()          # the rule is written down beside the list


@needs_corpus
def test_test_identities_follow_the_documented_rule():
    """The first 40 two-photo identities by sha256 of the id, in that order."""
    from iddm_core.demo.model.data import read_identity_list

    two = two_photo_identities()
    assert len(two) == 137
    expected = sorted(two, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:40]
    assert read_identity_list() == expected


def test_identity_list_rejects_malformed_files(tmp_path):
    from iddm_core.demo.model.data import read_identity_list
    from iddm_core.errors import InputError

    bad = tmp_path / "ids.txt"
    bad.write_text("A000001\n../etc\n")
    with pytest.raises(InputError, match="malformed"):
        read_identity_list(bad)
    bad.write_text("A000001\nA000001\n")
    with pytest.raises(InputError, match="twice"):
        read_identity_list(bad)
    with pytest.raises(InputError, match="--test-identities"):
        read_identity_list(tmp_path / "missing.txt")


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """`prepare` on 3 congress identities, one of them a test identity (a two-photo one)."""
    if not (CONGRESS / "index.csv").is_file():
        pytest.skip(f"congress corpus not found at {CONGRESS}")
    from iddm_core.demo.model.__main__ import main
    from iddm_core.demo.model.data import read_identity_list

    test_id = read_identity_list()[0]
    train_ids = sorted(two_photo_identities() - set(read_identity_list()))[:1] + ["A000014"]
    faces = tmp_path_factory.mktemp("faces")
    for i in train_ids + [test_id]:
        (faces / i).symlink_to(CONGRESS / i, target_is_directory=True)
    out = tmp_path_factory.mktemp("crops") / "crops"
    assert main(["prepare", "--faces", str(faces), "--out", str(out)]) == 0
    return out, train_ids, test_id


def test_prepare_writes_face_centred_crops_and_skips_test_identities(crops):
    from iddm_core.demo.model.data import CROP_MARGIN, CROP_SIZE
    from iddm_core.face.detect import get_detector
    from iddm_core.images import load_rgb

    out, train_ids, test_id = crops
    manifest = json.loads((out / "manifest.json").read_text())
    assert not (out / test_id).exists()
    assert test_id not in {e["identity"] for e in manifest["crops"]}
    assert manifest["test_identities_skipped"] == 1
    assert sorted({e["identity"] for e in manifest["crops"]}) == sorted(train_ids)
    assert len(manifest["crops"]) == 3                                # one two-photo identity + one single
    assert set(manifest["public_faces"]) == {"biden.jpg", "astronaut.jpg"}
    detector = get_detector("dlib")
    frame = CROP_SIZE / CROP_MARGIN                                   # the pipeline's 128 px frame inside
    for e in manifest["crops"]:
        rgb = load_rgb(out / e["file"])
        assert rgb.shape == (CROP_SIZE, CROP_SIZE, 3)
        faces = detector.detect(rgb)
        assert len(faces) == 1
        x0, y0, x1, y1 = faces[0].box
        centre = faces[0].landmarks.mean(axis=0)
        assert np.abs(centre - CROP_SIZE / 2).max() < 0.06 * CROP_SIZE
        # the same framing as the pipeline's crops: face box = frame / 2.2 (face ~ 1/2 of the 128 px frame)
        assert 0.8 < max(x1 - x0, y1 - y0) * 2.2 / frame < 1.25


def test_prepare_refuses_bad_input_before_work(tmp_path, crops):
    from iddm_core.demo.model.__main__ import main
    from iddm_core.errors import InputError

    with pytest.raises(InputError, match="--faces"):
        main(["prepare", "--faces", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    with pytest.raises(InputError, match="--out"):
        main(["prepare", "--faces", str(CONGRESS), "--out", str(crops[0])])     # not empty


def test_training_data_refuses_crops_of_test_identities(crops, tmp_path):
    from iddm_core.demo.model.data import Corpus
    from iddm_core.errors import InputError

    out, train_ids, _ = crops
    corpus = Corpus.load(out)
    assert len(corpus.crops) == 3 and {s.word for s in corpus.crops} == {"person"}
    images, words = corpus.face_pool(6, 128, seed=0, public_share=0.0)
    assert images.shape == (6, 128, 128, 3) and set(words) == {"person"}
    again, _ = corpus.face_pool(6, 128, seed=0, public_share=0.0, threads=1)
    assert np.array_equal(images, again)                             # same pool for any number of threads
    with pytest.raises(InputError, match="test identities"):
        Corpus.load(out, test_ids=[train_ids[0]])
    with pytest.raises(InputError, match="--data"):
        Corpus.load(tmp_path)


def test_train_with_data_runs_a_few_steps_without_dlib(crops, tmp_path, monkeypatch):
    """Stages vae / unet / refine / export on the crops, on the CPU, with dlib unimportable (as on the GPU
    machine): every part lands in --work, the export in --out with a README naming the corpus."""
    from iddm_core.demo.model.__main__ import main
    from iddm_core.errors import InputError

    out, _, _ = crops
    monkeypatch.setitem(sys.modules, "dlib", None)                   # `import dlib` raises ImportError
    work, model = tmp_path / "work", tmp_path / "model"
    small = ["--vae-steps", "2", "--unet-steps", "2", "--refine-steps", "2", "--pool", "6", "--scenes", "2",
             "--vae-faces", "6", "--vae-batch", "2", "--unet-batch", "2", "--threads", "2"]
    with pytest.raises(InputError, match="--out"):                   # v1's asset folder is never the default
        main(["train", "--data", str(out), "--work", str(work)] + small)
    assert main(["train", "--data", str(out), "--work", str(work), "--out", str(model), "--recipe", "gpu",
                 "--budget-min", "30"] + small) == 0
    for part in ("vae", "unet", "unet_refined1", "unet_refined2", "unet_refined3"):
        assert (work / part / "diffusion_pytorch_model.safetensors").is_file(), part
    assert json.loads((work / "data.json").read_text())["crops"] == 3
    assert (model / "demo.safetensors").is_file() and (model / "tokenizer" / "vocab.json").is_file()
    assert "US Congress" in (model / "README.md").read_text()


def test_phase_clock_stops_on_time_and_decays_the_rate():
    from iddm_core.demo.model.train import Budget, PhaseClock, warmup_cosine

    # without a time limit the schedule is exactly the CPU recipe's warmup_cosine
    p1, p2 = [torch.nn.Parameter(torch.zeros(1))], [torch.nn.Parameter(torch.zeros(1))]
    o1, o2 = torch.optim.SGD(p1, lr=1.0), torch.optim.SGD(p2, lr=1.0)
    s1, s2 = warmup_cosine(o1, 5, 40), PhaseClock(40).schedule(o2, 5)
    for _ in range(45):
        o1.step(), o2.step(), s1.step(), s2.step()
        assert o1.param_groups[0]["lr"] == o2.param_groups[0]["lr"]
    clock = PhaseClock(10 ** 9, seconds=0.05)
    step = 0
    while not clock.done(step):
        step += 1
    assert step < 10 ** 9 and clock.progress(step) == 1.0
    budget = Budget(100.0, [1, 3])                                   # a phase gets its share of the time left:
    assert 24 < budget.next() <= 25 and 99 < budget.next() <= 100   # what the first did not spend goes on
    assert Budget(None, [1]).next() is None


def test_shipped_v2_loads_by_name_and_its_vae_reconstructs_an_unseen_face():
    """The first GPU cut of v2 (tools/gpu_train_demo_v2.sh, 8 minutes on an H200): it loads as "demo-v2"
    (v-prediction, zero terminal SNR, 16 latent channels, 128 px) and its VAE, trained on 1,075 congress faces,
    reconstructs the held-out demo photos (measured 30.74 / 31.43 dB; v1's VAE 30.3 / 31.2). Its UNet is not
    trained enough for samples from noise to be faces yet (measure: FSR 0/8), which is why v1 still drives the demo."""
    from iddm_core.demo.model.measure import demo_crops, vae_round_trip
    from iddm_core.evaluation.metrics import psnr
    from iddm_core.diffusion.loading import load_model
    from iddm_core.diffusion.validation import validate_model

    info = validate_model("demo-v2")
    assert (info.title, info.prediction_type, info.resolution) == ("demo-v2", "v_prediction", 128)
    bundle = load_model("demo-v2")
    assert bundle.unet.config.in_channels == 16 and float(bundle.noise_scheduler.alphas_cumprod[-1]) < 1e-6
    images, _ = demo_crops(128)
    assert float(psnr(vae_round_trip(bundle, images), images).min()) >= 29.0
