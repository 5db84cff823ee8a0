"""SCRFD decoding, checked on a stand-in ONNX model whose outputs are planted by hand."""
import numpy as np
import pytest
import torch
from torch import nn

from iddm_core.errors import InputError, ModelError
from iddm_core.face.scrfd import ScrfdDetector, anchor_centers, letterbox, nms

# The stand-in models are exported with the TorchScript exporter (no onnxscript here); its deprecation
# notice is expected.
pytestmark = [pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")]

SIDE = 160  # canvas of the stand-in model
STRIDES = (8, 16, 32)

# Planted detections: (stride, row, col, anchor, score, box distances l/t/r/b and 5 keypoint offsets in canvas px)
KPS = np.array([[-10, -8], [10, -8], [0, 4], [-8, 16], [8, 16]], dtype=np.float32)
MAIN = (16, 4, 6, 1, 0.9, (20, 24, 22, 30), KPS)              # centre (96, 64)
OVERLAP = (8, 8, 12, 0, 0.7, (18, 22, 24, 28), KPS * 0.9)     # same centre, a slightly different box
SMALL = (32, 1, 1, 0, 0.6, (10, 10, 10, 10), KPS * 0.5)       # centre (32, 32), far from MAIN
WEAK = (8, 15, 3, 1, 0.3, (8, 8, 8, 8), KPS * 0.3)            # below the default threshold
PLANTED = (MAIN, OVERLAP, SMALL, WEAK)


def _row(stride, row, col, anchor):
    return (row * (SIDE // stride) + col) * 2 + anchor


def _planted_outputs():
    outs = {k: [] for k in ("score", "bbox", "kps")}
    for stride in STRIDES:
        n = (SIDE // stride) ** 2 * 2
        score, bbox, kps = np.full((n, 1), 0.01, np.float32), np.ones((n, 4), np.float32), np.zeros((n, 10), np.float32)
        for s, r, c, a, sc, dist, pts in PLANTED:
            if s == stride:
                i = _row(s, r, c, a)
                score[i, 0], bbox[i], kps[i] = sc, np.array(dist) / s, pts.reshape(-1) / s
        outs["score"].append(score), outs["bbox"].append(bbox), outs["kps"].append(kps)
    return outs["score"] + outs["bbox"] + outs["kps"]


class StandIn(nn.Module):
    """SCRFD's output signature (scores x3, boxes x3, keypoints x3) with planted values; the outputs touch the
    input (times zero) so that the exporter keeps a real input."""

    def __init__(self, batched):
        super().__init__()
        self.batched = batched
        for i, o in enumerate(_planted_outputs()):
            self.register_buffer(f"o{i}", torch.from_numpy(o))

    def forward(self, x):
        zero = x.mean() * 0
        outs = [getattr(self, f"o{i}") + zero for i in range(9)]
        return tuple(o.unsqueeze(0) for o in outs) if self.batched else tuple(outs)


def _export(path, batched=False, n_outputs=9):
    model = StandIn(batched).eval()
    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in STRIDES][:n_outputs]

    class Cut(nn.Module):
        def forward(self, x):
            return model(x)[:n_outputs]

    torch.onnx.export(Cut(), (torch.zeros(1, 3, SIDE, SIDE),), str(path), dynamo=False,
                      input_names=["input.1"], output_names=names, opset_version=11)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("scrfd")
    return _export(d / "det.onnx"), _export(d / "det_batched.onnx", batched=True)


def _expected(planted, scale):
    s, r, c, a, score, dist, pts = planted
    cx, cy = c * s, r * s
    box = np.array([cx - dist[0], cy - dist[1], cx + dist[2], cy + dist[3]]) / scale
    return box, (np.array([cx, cy]) + pts) / scale, score


@pytest.mark.parametrize("batched", [False, True])
def test_decodes_planted_faces_in_photo_pixels(models, batched):
    det = ScrfdDetector(models[batched], det_size=640)
    assert det.input_size == (SIDE, SIDE)  # a fixed-size model keeps its own size
    photo = np.zeros((240, 320, 3), np.uint8)  # letterboxed into 160 x 120: scale 0.5
    faces = det.detect(photo)
    assert len(faces) == 2, "OVERLAP is suppressed by NMS and WEAK is under the threshold"
    for face, planted in zip(faces, (MAIN, SMALL)):
        box, lm, score = _expected(planted, 0.5)
        np.testing.assert_allclose(face.box, box, atol=1e-3)
        np.testing.assert_allclose(face.landmarks, lm, atol=1e-3)
        assert face.landmarks.shape == (5, 2) and face.landmarks.dtype == np.float32
        assert face.score == pytest.approx(score)
    # ArcFace order survives: left eye left of right eye, mouth below the nose
    lm = faces[0].landmarks
    assert lm[0, 0] < lm[1, 0] and lm[3, 1] > lm[2, 1]


def test_threshold_and_max_faces(models):
    low = ScrfdDetector(models[0], threshold=0.2)
    faces = low.detect(np.zeros((SIDE, SIDE, 3), np.uint8))
    assert [round(f.score, 2) for f in faces] == [0.9, 0.6, 0.3]  # score order; OVERLAP still suppressed
    assert len(low.detect(np.zeros((SIDE, SIDE, 3), np.uint8), max_faces=1)) == 1
    loose = ScrfdDetector(models[0], nms_threshold=0.99)
    assert len(loose.detect(np.zeros((SIDE, SIDE, 3), np.uint8))) == 3  # no suppression -> OVERLAP back


def test_letterbox_layout_and_normalisation():
    rgb = np.zeros((50, 100, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    blob, scale = letterbox(rgb, (64, 64))
    assert blob.shape == (1, 3, 64, 64) and blob.dtype == np.float32 and scale == pytest.approx(0.64)
    inside, pad = blob[0, :, 10, 10], blob[0, :, 40, 10]
    np.testing.assert_allclose(inside, [(255 - 127.5) / 128, -127.5 / 128, -127.5 / 128])  # RGB order kept
    np.testing.assert_allclose(pad, [-127.5 / 128] * 3)  # black padding below the 64 x 32 image


def test_anchor_centres_order():
    c = anchor_centers(2, 3, 8, 2)
    assert c.shape == (12, 2)
    np.testing.assert_array_equal(c[:6], [[0, 0], [0, 0], [8, 0], [8, 0], [16, 0], [16, 0]])
    np.testing.assert_array_equal(c[6], [0, 8])


def test_nms():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]], np.float32)
    scores = np.array([0.5, 0.9, 0.8, 0.4], np.float32)
    assert nms(boxes, scores, 0.4) == [1, 2]
    assert nms(boxes, scores, 0.95) == [1, 2, 0, 3]


def test_bad_models_and_images(models, tmp_path):
    with pytest.raises(ModelError, match="no_kps.onnx"):
        ScrfdDetector(_export(tmp_path / "no_kps.onnx", n_outputs=6))
    with pytest.raises(ModelError, match="missing.onnx"):
        ScrfdDetector(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ModelError, match="junk.onnx"):
        ScrfdDetector(tmp_path / "junk.onnx")
    det = ScrfdDetector(models[0])
    with pytest.raises(InputError):
        det.detect(np.zeros((10, 10), np.uint8))
    faces = det.detect(torch.zeros(3, 240, 320))  # tensors in [0, 1] are accepted too
    assert len(faces) == 2


def test_detect_module_finds_this_detector(models):
    """face/detect.py's get_detector(path.onnx) builds this class (it looks it up by name)."""
    from iddm_core.face.detect import get_detector

    det = get_detector(str(models[0]))
    assert isinstance(det, ScrfdDetector)
    assert len(det.detect(np.zeros((SIDE, SIDE, 3), np.uint8))) == 2
