"""Identity-leak evaluation: metrics on known cases, dlib on real public-domain faces, CLI and benchmark runs."""
import json
import math
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from conftest import HANG_S, ROOT

from iddm_core.errors import InputError
from iddm_core.evaluation import brisque, faces, judges, metrics
from iddm_core.evaluation.evaluate import evaluate


# ------------------------------------------------------------------------------------------ fixtures (real dlib)

@pytest.fixture(scope="module")
def detector():
    from iddm_core.face.detect import get_detector

    return get_detector("dlib")


@pytest.fixture(scope="module")
def dlib_rec():
    from iddm_core.face.registry import load_recognizer, parse_surrogates

    return load_recognizer(parse_surrogates("dlib")[0])


@pytest.fixture(scope="module")
def photos(small_faces_dir):
    from iddm_core.images import load_rgb

    return {p.stem: load_rgb(p) for p in sorted(small_faces_dir.glob("*.jpg"))}


@pytest.fixture(scope="module")
def crops(photos, detector):
    """Face-centred 160 px crops of the four sample photos + their landmarks, keyed by person."""
    from iddm_core.images import Photo
    from iddm_core.protection.refs import prepare_photos

    names = ["obama", "obama2", "biden", "astronaut"]
    images, landmarks, _, skipped = prepare_photos([Photo(n, None, photos[n]) for n in names], 160, detector)
    assert not skipped
    return {n: (images[i:i + 1], landmarks[i:i + 1]) for i, n in enumerate(names)}


# ------------------------------------------------------------------------------------------------ pure metrics

def test_fsr_and_ism_helpers():
    assert metrics.face_success_rate([True, False, True, True]) == 0.75
    assert metrics.face_success_rate([]) == 0.0
    assert metrics.identity_score([0.5, None, 0.7]) == pytest.approx(0.6)
    assert metrics.identity_score([None, None]) is None
    assert judges.match_rate([0.95, 0.5, None], 0.9) == 0.5
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    proto = metrics.prototype(emb)
    assert torch.allclose(proto, torch.tensor([2 ** -0.5, 2 ** -0.5]))
    assert metrics.cosine_to(emb, proto).tolist() == pytest.approx([2 ** -0.5] * 2)


def test_retrieval_ranks_and_top_k():
    protos = torch.eye(3)
    probes = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.9, 0.0], [0.1, 0.3, 0.8]])
    ranks = metrics.retrieval_ranks(probes, protos, target=0)
    assert ranks == [1, 2, 3]
    assert metrics.top_k_rate(ranks, 1) == pytest.approx(1 / 3)
    assert metrics.top_k_rate(ranks, 2) == pytest.approx(2 / 3)
    assert metrics.top_k_rate([], 1) is None


def test_gallery_layouts(tmp_path, small_faces_dir):
    assert faces.identity_from_stem("obama2") == "obama"
    assert faces.identity_from_stem("Biden_03") == "biden"
    assert faces.identity_from_stem("2024") == "2024"
    flat = tmp_path / "flat"
    flat.mkdir()
    for n in ("obama.jpg", "obama2.jpg", "biden.jpg"):
        shutil.copy(small_faces_dir / n, flat / n)
    layout = faces.gallery_layout(flat)
    assert {k: len(v) for k, v in layout.items()} == {"obama": 2, "biden": 1}
    nested = tmp_path / "nested"
    (nested / "person_a").mkdir(parents=True)
    (nested / "person_b").mkdir()
    shutil.copy(small_faces_dir / "obama.jpg", nested / "person_a" / "x1.jpg")
    shutil.copy(small_faces_dir / "biden.jpg", nested / "person_b" / "x1.jpg")
    assert sorted(faces.gallery_layout(nested)) == ["person_a", "person_b"]
    with pytest.raises(InputError, match="missing_gallery"):
        faces.gallery_layout(tmp_path / "missing_gallery")


def test_psnr_known_cases():
    g = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(2, 3, 32, 32, generator=g)
    assert torch.isinf(metrics.psnr(x, x)).all()
    d = 0.05
    sign = torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)
    y = x + d * sign                                   # |error| = d everywhere -> MSE = d^2
    assert metrics.psnr(y, x).tolist() == pytest.approx([-20 * math.log10(d)] * 2, abs=1e-4)
    # half the pixels off by d, the rest exact: MSE = d^2 / 2
    mask = (torch.arange(32 * 32).reshape(32, 32) % 2).float()
    z = x + d * mask
    assert metrics.psnr(z, x).tolist() == pytest.approx([10 * math.log10(2 / d ** 2)] * 2, abs=1e-4)
    with pytest.raises(InputError, match="psnr"):
        metrics.psnr(x, x[:, :, :16])


def test_ssim_known_cases():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 40, 40, generator=g)
    assert metrics.ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)
    # two flat images: variances and covariance vanish, SSIM = luminance term only
    a, b = (torch.full((1, 1, 16, 16), v, dtype=torch.float64) for v in (0.5, 0.6))
    c1 = (0.01) ** 2
    assert metrics.ssim(a, b).item() == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1), abs=1e-9)
    # an independent implementation with the same (Gaussian 11x11, sigma 1.5, population covariance) settings
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ref = structural_similarity(x[0].numpy(), y[0].numpy(), data_range=1.0, channel_axis=0, gaussian_weights=True,
                                sigma=1.5, use_sample_covariance=False)
    ours = metrics.ssim(y, x).item()
    assert ours == pytest.approx(ref, abs=1e-6)
    assert 0.3 < ours < 0.95
    w = metrics.gaussian_window()
    assert w.shape == (11, 11) and w.sum().item() == pytest.approx(1.0)


def test_fidelity_report_handles_identical_images():
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    y = x.clone()
    y[1] = (y[1] + 0.02).clamp(0, 1)
    rep = metrics.fidelity_report(y, x)
    assert rep["identical"] == 1 and rep["psnr_per_image"][0] is None
    assert rep["psnr"] == pytest.approx(rep["psnr_per_image"][1]) and 30 < rep["psnr"] < 40
    json.dumps(rep)


# --------------------------------------------------------------------------------------------------- BRISQUE

def test_brisque_matches_package_features_and_ranks_noise(monkeypatch, photos):
    """Our features equal the `brisque` package's (given the same half-scale resize; the package itself needs
    OpenCV, replaced here by a stand-in), and added noise makes the score clearly worse."""
    fake_cv2 = types.ModuleType("cv2")
    fake_cv2.INTER_CUBIC = 2
    fake_cv2.resize = lambda img, dsize, fx, fy, interpolation: brisque.half_scale(img)
    monkeypatch.setitem(sys.modules, "cv2", fake_cv2)
    monkeypatch.delitem(sys.modules, "brisque.brisque", raising=False)
    from brisque.brisque import BRISQUE

    package = BRISQUE(url=False)
    scorer = brisque.BrisqueScorer()
    rgb = photos["astronaut"]
    gray = brisque.to_gray(rgb)
    theirs = np.concatenate([[float(np.ravel(v)[0]) for v in package.calculate_brisque_features(g, 7, 7 / 6)]
                             for g in (gray, brisque.half_scale(gray))])
    ours = scorer.features(rgb)
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4)
    assert scorer.score_features(ours) == pytest.approx(package.calculate_image_quality_score(theirs), abs=0.05)
    clean = scorer(rgb)
    noisy = np.clip(rgb + np.random.default_rng(0).normal(0, 25, rgb.shape), 0, 255).astype(np.uint8)
    assert clean < 30 < scorer(noisy)


# ------------------------------------------------------------------------------------------ dlib on real faces

def test_fsr_real_faces_and_blank_images(faces_dir, crops, detector):
    from iddm_core.images import list_images, load_rgb, to_tensor

    found = [faces.scan_faces(to_tensor(load_rgb(p))[None], detector).found[0] for p in list_images(faces_dir)]
    assert len(found) == 4 and metrics.face_success_rate(found) == 1.0          # full-size photos, one at a time
    batch = torch.cat([crops[n][0] for n in ("obama", "obama2", "biden", "astronaut")])
    assert metrics.face_success_rate(faces.scan_faces(batch, detector).found) == 1.0
    blank = torch.cat([torch.zeros(1, 3, 256, 256), torch.full((1, 3, 256, 256), 0.5), torch.ones(1, 3, 256, 256)])
    scan = faces.scan_faces(blank, detector)
    assert metrics.face_success_rate(scan.found) == 0.0 and scan.landmarks.shape == (0, 5, 2)


def test_ism_equals_hand_computation_and_dlib_cpp(crops, detector, dlib_rec):
    from iddm_core.face.attack import dlib_native_descriptor

    ref_images = torch.cat([crops["obama"][0], crops["obama"][0].flip(-1)])
    ref_landmarks = torch.cat([crops["obama"][1], crops["obama"][1]])
    ref_landmarks[1, :, 0] = 159 - ref_landmarks[1, :, 0]          # mirror: x -> W - 1 - x, and swap sides
    # ArcFace points swap sides; so do dlib's parts (eye corners 0/1 <-> 2/3) when the detector gave them
    ref_landmarks[1] = ref_landmarks[1][[1, 0, 2, 4, 3, 7, 8, 5, 6, 9][:ref_landmarks.shape[1]]]
    probes = torch.cat([crops[n][0] for n in ("obama2", "biden", "astronaut")] + [torch.zeros(1, 3, 160, 160)])
    result = evaluate(probes, (ref_images, ref_landmarks), eval_recognizers=[dlib_rec], detector=detector,
                         quality=False, device="cpu")
    sims = result["recognizers"]["dlib"]["similarity"]
    assert result["faces_found"] == [True, True, True, False] and result["fsr"] == 0.75
    assert sims[3] is None

    # by hand, from the same recogniser: prototype = normalise(mean(embeddings)), ISM = mean over faces of cosines
    with torch.no_grad():
        proto = torch.nn.functional.normalize(dlib_rec.embed(ref_images, ref_landmarks).mean(0), dim=0)
        scan = faces.scan_faces(probes, detector)
        hand = (dlib_rec.embed(probes[scan.index], scan.landmarks) @ proto).tolist()
    assert sims[:3] == pytest.approx(hand, abs=1e-5)
    assert result["recognizers"]["dlib"]["ism"] == pytest.approx(sum(hand) / 3, abs=1e-5)
    assert sims[0] > 0.907 > max(sims[1], sims[2])                   # same person above dlib's threshold only

    # dlib's own C++ pipeline (its detector, chip and descriptor): same cosines within 0.03
    def native(img):
        d = dlib_native_descriptor(faces.uint8_images(img[None])[0])
        return d / np.linalg.norm(d)

    native_proto = sum(native(x) for x in ref_images)
    native_proto /= np.linalg.norm(native_proto)
    native_sims = [float(native(probes[i]) @ native_proto) for i in range(3)]
    assert sims[:3] == pytest.approx(native_sims, abs=0.03)


def test_dlib_matches_by_its_own_distance(crops, detector, dlib_rec):
    """dlib's match decision is its own rule: the Euclidean distance of its raw descriptors to the mean raw
    descriptor of the clean photos, <= 0.6 (not the cosine stand-in); the cosines are reported as before."""
    from iddm_core.face.attack import dlib_distance, dlib_prototype

    refs = crops["obama"]
    probes = torch.cat([crops[n][0] for n in ("obama2", "biden", "astronaut")] + [torch.zeros(1, 3, 160, 160)])
    entry = evaluate(probes, refs, eval_recognizers=[dlib_rec], detector=detector, quality=False,
                     device="cpu")["recognizers"]["dlib"]
    assert entry["match"] == {"score": "distance", "threshold": 0.6}
    with torch.no_grad():                                  # by hand: raw (unnormalised) descriptors, their mean
        centre = dlib_rec(dlib_rec.align(*refs)).mean(0)
        scan = faces.scan_faces(probes, detector)
        hand = (dlib_rec(dlib_rec.align(probes[scan.index], scan.landmarks)) - centre).norm(dim=1).tolist()
    assert entry["distance"][:3] == pytest.approx(hand, abs=1e-4) and entry["distance"][3] is None
    assert entry["distance"][0] < 0.6 < min(entry["distance"][1:3])
    assert entry["matched"] == [True, False, False, None] and entry["match_rate"] == pytest.approx(1 / 3)
    # dlib's own C++ pipeline measures the same distances (within its detector's and chip's differences)
    native = [dlib_distance(rgb, dlib_prototype(faces.uint8_images(refs[0])))
              for rgb in faces.uint8_images(probes[:3])]
    assert entry["distance"][:3] == pytest.approx(native, abs=0.05)


class _StubFace:
    def __init__(self):
        from iddm_core.face.align import ARCFACE_TEMPLATE_112

        self.points = lambda: ARCFACE_TEMPLATE_112


class _StubDetector:
    def detect(self, rgb):
        return [_StubFace()]


def _stub_dlib():
    """A 'dlib' whose raw descriptor is a fixed direction scaled by the image's brightness: every cosine is 1."""
    from iddm_core.face.base import Recognizer

    class Scaled(Recognizer):
        name = "dlib"

        def __init__(self):
            super().__init__()
            self.register_buffer("direction", torch.tensor([0.6, 0.8]))

        def align(self, images, landmarks):
            return images

        def forward(self, crops):
            return 4 * crops.mean(dim=(1, 2, 3))[:, None] * self.direction

    return Scaled()


def test_match_rule_decides_where_cosine_and_distance_disagree():
    rule = judges.match_rule("dlib")
    assert (rule.score, rule.threshold) == ("distance", 0.6)
    assert [rule.accepts(v) for v in (0.59, 0.6, 0.61, None)] == [True, True, False, None]
    assert rule.rate([0.5, 0.7, None]) == 0.5 and rule.rate([None]) is None
    assert judges.match_rule("faceres") == judges.MatchRule("cosine", judges.MATCH_THRESHOLDS["faceres"])
    assert judges.match_rule("arcface").threshold == judges.DEFAULT_MATCH_THRESHOLD
    assert judges.match_rate([0.95, 0.5, None], 0.9) == 0.5

    refs = (torch.full((2, 3, 32, 32), 0.5), torch.zeros(2, 5, 2))             # raw descriptors 2 * direction
    probes = torch.stack([torch.full((3, 32, 32), v) for v in (0.55, 1.0)])     # distances 0.2 and 2.0
    entry = evaluate(probes, refs, eval_recognizers=[_stub_dlib()], detector=_StubDetector(), quality=False,
                     device="cpu")["recognizers"]["dlib"]
    assert entry["similarity"] == pytest.approx([1.0, 1.0]) and entry["threshold"] == judges.MATCH_THRESHOLDS["dlib"]
    assert entry["distance"] == pytest.approx([0.2, 2.0], abs=0.01)
    assert entry["matched"] == [True, False] and entry["match_rate"] == 0.5      # the cosine would accept both


def test_retrieval_ranks_obama2_with_obama(tmp_path, photos, small_faces_dir, detector, dlib_rec, crops):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for n in ("obama.jpg", "biden.jpg", "astronaut.jpg"):
        shutil.copy(small_faces_dir / n, gallery / n)
    layout = faces.gallery_layout(gallery)
    names = sorted(layout)
    protos = torch.stack([metrics.prototype(faces.embed_photos(dlib_rec, [photos[n]], detector)) for n in names])
    probe = faces.embed_photos(dlib_rec, [photos["obama2"]], detector)
    sims = metrics.cosine_to(protos, probe[0])
    assert names[int(sims.argmax())] == "obama"
    assert metrics.retrieval_ranks(probe, protos, names.index("obama")) == [1]
    assert metrics.retrieval_ranks(probe, protos, names.index("biden"))[0] > 1

    # through evaluate(): user = obama (refs), distractors = biden + astronaut; probes = obama2 and biden
    (gallery / "obama.jpg").unlink()
    probes = torch.cat([crops["obama2"][0], crops["biden"][0]])
    result = evaluate(probes, crops["obama"], eval_recognizers=[dlib_rec], detector=detector, gallery=gallery,
                         quality=False, device="cpu")
    r = result["recognizers"]["dlib"]["retrieval"]
    assert r["identities"] == 3 and r["top1"] == 0.5 and r["mean_rank"] > 1.5
    assert "gallery" not in json.dumps(result) and "biden" not in json.dumps(result)


def test_held_out_warning(crops, detector, dlib_rec):
    images, landmarks = crops["obama2"]
    with pytest.warns(UserWarning, match="also an attack surrogate"):
        result = evaluate(images, crops["obama"], eval_recognizers=[dlib_rec], surrogates=["dlib"],
                             detector=detector, quality=False, device="cpu")
    assert len(result["warnings"]) == 1 and "dlib" in result["warnings"][0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = evaluate(images, crops["obama"], eval_recognizers=[dlib_rec], surrogates=["arcface"],
                            detector=detector, quality=False, device="cpu")
    assert clean["warnings"] == []


# ------------------------------------------------------------------------------------------ rendering and CLIs

def test_render_colours_and_chart():
    from iddm_core.evaluation.leak_render import GREEN, GREY, RED, annotate, bar_chart, verdict_color

    assert verdict_color(0.95, 0.9) == RED and verdict_color(0.5, 0.9) == GREEN and verdict_color(None, 0.9) == GREY
    img = annotate(np.zeros((64, 64, 3), np.uint8), "sim 0.950", RED)
    assert img.shape == (64, 64, 3) and tuple(img[-1, -1]) == RED and img[:40].max() == 0
    chart = bar_chart([0.95, 0.2, None], 0.9, "dlib")
    assert chart.shape == (256, 512, 3)
    assert (chart == np.array(RED)).all(-1).sum() > 100 and (chart == np.array(GREEN)).all(-1).sum() > 100


def _run(args, timeout=HANG_S):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_evaluate_cli_writes_json_and_sheet(tmp_path, small_faces_dir):
    from PIL import Image

    refs = tmp_path / "my_private_photos"
    refs.mkdir()
    shutil.copy(small_faces_dir / "obama.jpg", refs / "secret_name.jpg")
    out, sheet = tmp_path / "r.json", tmp_path / "s.png"
    proc = _run(["-m", "iddm_core", "evaluate", "--model", "tiny", "--refs", str(refs), "--n", "2", "--steps", "2",
                 "--prompts", "a photo of sks person", "a photo of sks person with glasses",
                 "--surrogates", "dlib", "--out-json", str(out), "--sheet", str(sheet)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["n_images"] == 4 and len(result["faces_found"]) == 4 and result["labels"] == ["0", "0", "1", "1"]
    assert result["fsr"] == 0.0 and result["recognizers"]["faceres"]["ism"] is None  # random tiny model: no faces
    assert result["held_out"] and "held-out recognisers: faceres" in proc.stdout   # dlib was the surrogate
    assert math.isfinite(result["brisque"])
    with Image.open(sheet) as im:
        assert im.size == (4 + 2 * 132, 4 + 2 * 132)                             # 2 x 2 tiles of 128 px + gaps
    text = out.read_text() + proc.stdout + proc.stderr
    assert "secret_name" not in text and "my_private_photos" not in text
    again = _run(["-m", "iddm_core", "evaluate", "--model", "tiny", "--refs", str(refs), "--out-json", str(out)])
    assert again.returncode == 2 and "already exists" in again.stderr


def test_bench_paper_runs_end_to_end(tmp_path, small_faces_dir):
    refs = tmp_path / "refs"
    refs.mkdir()
    for n in ("obama.jpg", "obama2.jpg"):
        shutil.copy(small_faces_dir / n, refs / n)
        shutil.copy(small_faces_dir / n, refs / ("b_" + n))
    out = tmp_path / "bench.json"
    proc = _run(["-m", "iddm_core.bench", "paper", "--refs", str(refs), "--tiny-settings", "--out-json", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    assert "FSR" in header and "ISM faceres" in header and "BRISQUE" in header and "peak" in header
    assert "judged by held-out recognisers: faceres" in proc.stdout
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| method")
            and not line.startswith("|--")]
    # the paper's Table 1 layout: no defense, the anti-personalisation baselines (issue 15), then IDDM's rho sweep
    assert [r.split("|")[1].strip() for r in rows] == ["DreamBooth (no defense)", "Anti-DB (ASPL)", "Anti-DB + CAP",
                                                       "IDDM rho=0.1", "IDDM rho=0.3", "IDDM rho=0.5"]
    data = json.loads(out.read_text())
    assert len(data["methods"]) == 6 and all(m["time_s"] > 0 for m in data["methods"])
    assert "fidelity" not in data["methods"][0]
    assert all("fidelity" in m for m in data["methods"][1:])  # X' vs X0: protected photos / IDDM's X'
    assert all(20 < m["fidelity"]["psnr"] < 80 for m in data["methods"][1:])   # perturbed, within the budget
    # the default model is the trained demo model (its samples are still too rough for dlib: FSR stays 0, see
    # docs/DESIGN.md "The demo model")
    assert data["settings"]["model"] == "demo"


# ----------------------------------------------------------------------------------------------- ComfyUI node

def test_leak_meter_node(tmp_path, crops):
    """Loaded as ComfyUI loads the pack (stub ComfyUI): no heavy import (torch is ComfyUI's own), tooltips, and
    a real measurement."""
    import importlib

    from comfy_harness import ComfyStubs, load_pack, node_problems

    code = ("import sys, tempfile; sys.path.insert(0, %r)\n"
            "from comfy_harness import ComfyStubs, load_pack\n"
            "ComfyStubs(tempfile.mkdtemp()).install(); load_pack('comfyui-iddm-lm')\n"
            "import importlib; importlib.import_module('comfyui-iddm-lm.nodes.leak_meter')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'dlib', '_dlib_pybind11', 'kornia'}))\n"
            ) % str(ROOT / "tests")
    proc = _run(["-c", code], timeout=HANG_S)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-1500:]

    stubs = ComfyStubs(tmp_path / "comfyui")
    stubs.install()
    try:
        load_pack("comfyui-iddm-lm")
        mod = importlib.import_module("comfyui-iddm-lm.nodes.leak_meter")
        cls = mod.NODE_CLASS_MAPPINGS["IDDMIdentityLeakMeter"]
        assert set(mod.NODE_DISPLAY_NAME_MAPPINGS) == set(mod.NODE_CLASS_MAPPINGS)
        assert node_problems("IDDMIdentityLeakMeter", cls) == [] and cls.CATEGORY == "IDDM"
        assert "dlib" in cls.INPUT_TYPES()["required"]["recognizer"][0]
        refs = types.SimpleNamespace(images=crops["obama"][0], landmarks=crops["obama"][1])
        batch = torch.cat([crops["obama2"][0], crops["biden"][0], torch.zeros(1, 3, 160, 160)]).permute(0, 2, 3, 1)
        with pytest.warns(UserWarning, match="also an attack surrogate"):
            returned = cls().measure(batch, refs, "dlib", 0.0, "dlib")
            annotated, summary, chart = returned["result"]
            assert returned["ui"] == {"text": [summary]}            # drawn on the node by web/iddm.js
        choices = cls.INPUT_TYPES()["required"]["recognizer"][0]
        assert choices[0] == mod.AUTO_CHOICE
        assert cls.INPUT_TYPES()["optional"]["surrogates"][1]["default"] == "dlib"   # the pack's default surrogate
        _, auto_summary, _ = cls().measure(batch, refs, mod.AUTO_CHOICE, 0.0, "dlib")["result"]   # faceres judges
        with pytest.warns(UserWarning, match="no held-out recogniser"):
            _, fallback_summary, _ = cls().measure(batch, refs, mod.AUTO_CHOICE, 0.0, "dlib,faceres")["result"]
    finally:
        stubs.uninstall()
    assert annotated.shape == batch.shape and chart.shape[0] == 1 and chart.shape[-1] == 3
    bottom = (annotated[:, -1, -1] * 255).round().tolist()
    assert bottom == [[200, 40, 40], [30, 150, 60], [110, 110, 110]]   # obama2 red, biden green, blank grey
    assert "FSR 0.67" in summary and "1/2" in summary and "WARNING" in summary
    assert "ISM [faceres]" in auto_summary and "held-out" in auto_summary and "WARNING" not in auto_summary
    assert "recognised as the user by faceres" in auto_summary
    assert "WARNING: no held-out recogniser" in fallback_summary


# ------------------------------------------------------------------------------------------ held-out judges

def _installed(tmp_path, *rel_paths):
    """A models folder in which the registry finds these files (discovery only checks that they exist)."""
    for rel in rel_paths:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    return [str(tmp_path)]


def test_auto_judges_are_held_out_from_the_surrogates(tmp_path):
    dirs = _installed(tmp_path, "facerecognition/irse50.pth", "facerecognition/ir152.pth")
    chosen = judges.choose_judges("auto", ["dlib", "irse50"], dirs)
    assert chosen.names == ["ir152", "faceres"] and chosen.held_out and chosen.warning is None  # faceres: packaged
    assert "held-out" in chosen.note and str(tmp_path) not in chosen.note           # names, never paths
    assert chosen.tokens[0] == f"ir152:{tmp_path / 'facerecognition/ir152.pth'}"
    everything = judges.choose_judges(None, ["ir152"], dirs)                            # dlib is always installed
    assert everything.names == ["dlib", "irse50", "faceres"] and everything.held_out


def test_auto_judges_fall_back_to_the_surrogates_loudly(tmp_path):
    only = judges.choose_judges("auto", ["dlib", "faceres"], [])
    assert only.names == ["dlib", "faceres"] and not only.held_out
    assert only.warning and "no held-out recogniser" in only.warning
    unknown = judges.choose_judges("auto", [], _installed(tmp_path, "facerecognition/irse50.pth"))
    assert unknown.names == ["dlib", "irse50", "faceres"] and not unknown.held_out and "not given" in unknown.note


def test_explicit_judges_are_used_as_given():
    chosen = judges.choose_judges("dlib", ["arcface"], [])
    assert chosen.names == ["dlib"] and chosen.tokens == ["dlib"] and chosen.held_out
    assert not judges.choose_judges(["dlib"], ["dlib"], []).held_out


def test_evaluate_judges_with_the_packaged_held_out_recogniser(crops, detector):
    """With dlib as the surrogate, faceres (shipped with the pack) judges by default, and it tells obama2 (same
    man) from biden; with both as surrogates the fallback warns."""
    images = torch.cat([crops["obama2"][0], crops["biden"][0]])
    result = evaluate(images, crops["obama"], surrogates=["dlib"], detector=detector, quality=False,
                         device="cpu", search_dirs=[])
    assert result["eval_recognizers"] == ["faceres"] and result["held_out"] is True and result["warnings"] == []
    same, other = result["recognizers"]["faceres"]["similarity"]
    assert same > judges.match_threshold("faceres") > other
    with pytest.warns(UserWarning, match="no held-out recogniser"):
        fallback = evaluate(images, crops["obama"], surrogates=["dlib", "faceres"], detector=detector,
                               quality=False, device="cpu", search_dirs=[])
    assert fallback["eval_recognizers"] == ["dlib", "faceres"] and fallback["warnings"] == [fallback["judges"]]


def test_lora_comment_names_the_surrogates_without_paths():
    from iddm_core.protection.iddm import IDDMConfig, lora_comment, surrogates_from_comment

    comment = lora_comment(IDDMConfig(surrogates=("dlib", "faceres:/home/me/models/faceres.json")))
    assert surrogates_from_comment(comment) == ["dlib", "faceres"] and "/home/me" not in comment
    assert surrogates_from_comment("trained by hand") == []
