"""The torch port of dlib's face-recognition ResNet against dlib's C++ implementation, on real photos."""
import io

import numpy as np
import pytest
import torch

from iddm_core.errors import ModelError
from iddm_core.face import dlib_format, dlib_resnet as dr
from iddm_core.face.detect import get_detector
from iddm_core.face.dlib_files import RESNET, require_model
from iddm_core.images import list_images, load_rgb, to_tensor

dlib = pytest.importorskip("dlib")


@pytest.fixture(scope="module")
def model():
    return dr.load_dlib_recognizer()


@pytest.fixture(scope="module")
def photos(faces_dir):
    """name -> (rgb, DlibFace) for every sample photo (one detection pass shared by the tests below)."""
    detector = get_detector("dlib")
    out = {}
    for path in list_images(faces_dir):
        rgb = load_rgb(path)
        out[path.stem] = (rgb, detector.detect(rgb)[0])
    return out


@pytest.fixture(scope="module")
def dlib_reference(photos):
    """dlib's chips (get_face_chip, 150 px, padding 0.25) and dlib's descriptors of them."""
    net = dlib.face_recognition_model_v1(str(require_model(RESNET)))
    chips = {k: dlib.get_face_chip(rgb, face.shape5, 150, 0.25) for k, (rgb, face) in photos.items()}
    desc = {k: np.array(net.compute_face_descriptor(c)) for k, c in chips.items()}
    return chips, desc


def _dist(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))


def test_parsed_architecture_matches_dlib_example():
    parsed = dlib_format.parse_dlib_net(require_model(RESNET).read_bytes())
    kinds = [layer.kind for layer in parsed.layers]
    assert kinds.count("con") == 29 and kinds.count("add_prev") == 14 and kinds[-1] == "fc"
    assert parsed.size == 150
    np.testing.assert_allclose(parsed.means, dr.DEFAULT_MEANS, atol=1e-4)
    fc = parsed.layers[-1]
    assert (fc.attrs["num_inputs"], fc.attrs["num_outputs"]) == (256, 128)
    assert not np.any(fc.arrays["bias"])                 # fc_no_bias
    strided = [l.attrs for l in parsed.layers if l.kind == "con" and l.attrs["stride_y"] == 2]
    assert len(strided) == 5 and all(a["padding_y"] == 0 for a in strided)   # stem + 4 down blocks, unpadded


def test_port_reproduces_dlib_descriptors_on_dlib_chips(model, dlib_reference):
    chips, desc = dlib_reference
    names = sorted(chips)
    x = torch.stack([to_tensor(chips[k]) for k in names])
    with torch.no_grad():
        ours = model(x).numpy()
    diff = np.abs(ours - np.stack([desc[k] for k in names])).max(axis=1)
    print("max abs difference per descriptor:", dict(zip(names, diff.round(8))))
    assert diff.max() <= 1e-3
    # and the identity structure dlib is known for: the same person close, different people far
    d = {k: v for k, v in zip(names, ours)}
    assert abs(_dist(d["obama"], d["obama2"]) - _dist(desc["obama"], desc["obama2"])) < 1e-3
    assert 0.25 < _dist(d["obama"], d["obama2"]) < 0.45
    assert 0.75 < _dist(d["obama"], d["biden"]) < 0.95


def test_full_pipeline_with_our_alignment_stays_close_to_dlib(model, photos, dlib_reference):
    """detect -> Face.landmarks -> differentiable align -> port, against dlib's own chip + network."""
    _, desc = dlib_reference
    ours = {}
    for k, (rgb, face) in photos.items():
        with torch.no_grad():
            crop = model.align(to_tensor(rgb)[None], torch.from_numpy(face.landmarks)[None])
            ours[k] = model(crop)[0].numpy()
    gap = {k: round(_dist(ours[k], desc[k]), 3) for k in ours}
    print("distance ours-vs-dlib per photo:", gap)
    assert max(gap.values()) < 0.25
    assert _dist(ours["obama"], ours["obama2"]) < 0.6
    for a, b in [("obama", "biden"), ("obama2", "biden"), ("obama", "astronaut"), ("biden", "astronaut")]:
        assert _dist(ours[a], ours[b]) > 0.6, (a, b)


def test_embed_is_normalised_and_differentiable(model, photos):
    rgb, face = photos["obama"]
    image = to_tensor(rgb)[None].requires_grad_(True)
    emb = model.embed(image, torch.from_numpy(face.landmarks)[None])
    assert emb.shape == (1, 128)
    assert abs(float(emb.detach().norm()) - 1.0) < 1e-5
    emb[0, :8].sum().backward()
    grad = image.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # only pixels around the face receive gradient (the crop is a local function of the photo)
    x0, y0, x1, y1 = (int(v) for v in face.box)
    ys, xs = torch.nonzero(grad[0].abs().sum(0)).unbind(1)
    w = x1 - x0
    assert xs.min() > x0 - w and xs.max() < x1 + w and ys.min() > y0 - w and ys.max() < y1 + w


def test_template_matches_where_dlib_chips_put_the_landmarks(photos, dlib_reference):
    """The template is derived from dlib's constants; check it against landmarks detected on dlib's own chips.
    Eyes must sit on it (dlib's chip is fitted on them); nose tip and mouth vary with the person and expression
    (dlib's chip ignores the mouth and uses the nose base), but must not be biased overall."""
    chips, _ = dlib_reference
    detector = get_detector("dlib")
    offsets = []
    for chip in chips.values():
        faces = detector.detect(chip)
        assert len(faces) == 1
        offsets.append(faces[0].landmarks - dr.chip_template())
    offsets = np.array(offsets)                          # [photos, 5, 2] pixels
    errors = np.linalg.norm(offsets, axis=-1)
    print("template error (px) per photo x point:\n", errors.round(1))
    print("mean offset (px) per point:\n", offsets.mean(0).round(1))
    assert errors[:, :2].max() < 4.0                     # dlib landmarks are whole pixels
    assert errors.max() < 16.0                           # ~0.3 of the chip's eye distance (52 px)
    assert np.abs(offsets.mean(0)).max() < 8.0


def test_template_agrees_with_dlib_5_point_chip_constants():
    t = dr.chip_template()
    five = 150 * (0.25 + dr.MEAN_FACE_5) / 1.5
    corner_mid = np.stack([five[2:4].mean(0), five[0:2].mean(0)])
    assert np.abs(t[:2] - corner_mid).max() < 1.5       # contour-mean vs corner-midpoint eye centres
    assert t[0, 0] < t[1, 0] and t[1, 1] < t[2, 1] < t[3, 1] and abs(t[3, 1] - t[4, 1]) < 1e-4
    assert np.all((t > 0) & (t < 150))


def test_pad_add_zero_extends_like_dlib_add_prev():
    a = torch.arange(2 * 3 * 3, dtype=torch.float32).view(1, 2, 3, 3)
    b = torch.ones(1, 4, 4, 4)
    out = dr.pad_add(a, b)
    expected = np.ones((1, 4, 4, 4), np.float32)
    expected[:, :2, :3, :3] += a.numpy()
    np.testing.assert_array_equal(out.numpy(), expected)


def test_forward_rejects_wrong_crop_size(model):
    with pytest.raises(ValueError, match="150"):
        model(torch.zeros(1, 3, 112, 112))


# ---- error handling and the bn_con2 branch, on synthetic files -------------------------------------------------


class _Writer:
    """A minimal writer of dlib's serialisation (the inverse of dlib_format._Reader) for synthetic models."""

    def __init__(self):
        self.buf = io.BytesIO()

    def int(self, v: int):
        mag = abs(int(v)).to_bytes(8, "little").rstrip(b"\0") or b"\0"
        self.buf.write(bytes([len(mag) | (0x80 if v < 0 else 0)]) + mag)

    def str(self, s: str):
        self.int(len(s))
        self.buf.write(s.encode())

    def bool(self, b: bool):
        self.buf.write(b"1" if b else b"0")

    def float(self, v: float):
        m, e = np.frexp(v)
        self.int(int(m * 2 ** 30)), self.int(int(e) - 30)

    def tensor(self, a: np.ndarray, dims=None):
        a = np.asarray(a, np.float32)
        dims = dims or (a.size, 1, 1, 1)
        self.int(2), [self.int(d) for d in dims]
        self.buf.write(a.astype("<f4").tobytes())

    def alias(self, dims):
        self.int(1), [self.int(d) for d in dims]


def _synthetic_model_bytes(rng, use_bn: bool) -> tuple[bytes, dict]:
    """A dlib-format file of the face-network architecture with random weights; affines written as bn_con2 when
    ``use_bn`` (a training net). Returns the bytes and the expected (gamma, beta) of the first affine layer."""
    w = _Writer()
    w.int(1), w.str("loss_metric_2"), w.float(0.04), w.float(0.6)
    ops = dlib_format.forward_ops()
    for op in reversed(ops[1:]):
        w.int(1 if op in ("tag", "skip") else 2)
    w.int(3), w.str("input_rgb_image_sized")
    for v in dr.DEFAULT_MEANS:
        w.float(v)
    w.int(150), w.int(150)
    model = dr.DlibResNet()
    slots = iter(model.slots())
    expected_first_affine = None

    def trailer(bottom):
        [w.bool(False) for _ in range(3)]
        w.tensor(np.zeros(0), (0, 0, 0, 0)), w.tensor(np.zeros(0), (0, 0, 0, 0)), w.tensor(np.zeros(0), (0, 0, 0, 0))
        if bottom:
            w.int(1)

    for i, (kind, target) in enumerate(slots):
        if kind == "con":
            cout, cin, k, _ = target.weight.shape
            s = target.stride[0]
            w.str("con_4"), w.tensor(rng.normal(0, 0.05, cout * cin * k * k + cout))
            w.int(cout), w.int(k), w.int(k), w.int(s), w.int(s), w.int(dr.dlib_padding(k, s)), w.int(dr.dlib_padding(k, s))
            w.alias((cout, cin, k, k)), w.alias((1, cout, 1, 1))
            [w.float(1.0) for _ in range(4)]
        elif kind == "affine":
            c = target.gamma.numel()
            g, b = rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c)
            if use_bn:
                mean, var, eps = rng.normal(0, 0.1, c), rng.uniform(0.5, 2.0, c), 1e-5
                w.str("bn_con2"), w.tensor(np.concatenate([g, b])), w.alias((1, c, 1, 1)), w.alias((1, c, 1, 1))
                w.tensor(np.zeros(c)), w.tensor(np.zeros(c)), w.tensor(mean), w.tensor(var)
                w.int(100), w.int(1000)
                [w.float(1.0) for _ in range(4)]
                w.float(eps)
                g_eff = g / np.sqrt(var + eps)
                expect = (g_eff, b - g_eff * mean)
            else:
                w.str("affine_2"), w.tensor(np.concatenate([g, b])), w.alias((1, c, 1, 1)), w.alias((1, c, 1, 1))
                w.int(0), w.bool(False)
                expect = (g, b)
            expected_first_affine = expected_first_affine or expect
        elif kind == "relu":
            w.str("relu_2"), w.bool(False)
        elif kind in ("max_pool", "avg_pool"):
            window, s = target
            pad = dr.dlib_padding(window, s) if window else 0
            w.str(f"{kind}_2"), w.int(window), w.int(window), w.int(s), w.int(s), w.int(pad), w.int(pad)
        elif kind == "add_prev":
            w.str("add_prev_")
        elif kind == "fc":
            w.str("fc_3"), w.int(128), w.int(256), w.tensor(rng.normal(0, 0.05, 256 * 128))
            w.alias((256, 128, 1, 1)), w.alias((1, 128, 1, 1)), w.int(1)
            [w.float(1.0) for _ in range(4)]
            w.bool(False)
        trailer(bottom=i == 0)
    return w.buf.getvalue(), expected_first_affine


@pytest.mark.parametrize("use_bn", [False, True])
def test_synthetic_file_round_trip(tmp_path, use_bn):
    rng = np.random.default_rng(0)
    data, (gamma, beta) = _synthetic_model_bytes(rng, use_bn)
    path = tmp_path / "tiny_dlib.dat"
    path.write_bytes(data)
    model = dr.load_dlib_recognizer(path)
    np.testing.assert_allclose(model.stem_affine.gamma.detach().numpy(), gamma, rtol=1e-5)
    np.testing.assert_allclose(model.stem_affine.beta.detach().numpy(), beta, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 150, 150))
    assert out.shape == (2, 128) and torch.isfinite(out).all()


def test_bad_files_raise_model_error_naming_the_file(tmp_path):
    good = require_model(RESNET).read_bytes()
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelError, match="truncated.dat"):
        dr.load_dlib_recognizer(truncated)
    wrong = tmp_path / "shape_predictor.dat"
    wrong.write_bytes(require_model("shape_predictor_5_face_landmarks.dat").read_bytes()[:4096])
    with pytest.raises(ModelError, match="shape_predictor.dat"):
        dr.load_dlib_recognizer(wrong)
    with pytest.raises(ModelError, match="missing.dat"):
        dr.load_dlib_recognizer(tmp_path / "missing.dat")
