"""dlib face detection with ArcFace-order landmarks, the 5-point estimate, and the detector factory."""
import numpy as np
import pytest

from iddm_core.errors import InputError
from iddm_core.face import detect as fd
from iddm_core.face.dlib_resnet import MEAN_FACE_5, mean_face_arcface_points
from iddm_core.images import list_images, load_rgb

pytest.importorskip("dlib")


@pytest.fixture(scope="module")
def detector():
    return fd.get_detector("dlib")


@pytest.fixture(scope="module")
def detector_5pt():
    return fd.DlibDetector(use_68=False)


@pytest.fixture(scope="module")
def photos(faces_dir):
    return {p.stem: load_rgb(p) for p in list_images(faces_dir)}


@pytest.fixture(scope="module")
def detections(detector, photos):
    return {k: detector.detect(rgb) for k, rgb in photos.items()}


def _iod(lm: np.ndarray) -> float:
    return float(np.linalg.norm(lm[1] - lm[0]))


def test_one_face_per_photo_with_plausible_landmarks(detector, detections, photos):
    assert detector.uses_68
    for name, faces in detections.items():
        assert len(faces) == 1, name
        face = faces[0]
        lm, (x0, y0, x1, y1) = face.landmarks, face.box
        assert lm.shape == (5, 2) and lm.dtype == np.float32
        assert face.score > 0.3 and 0 <= x0 < x1 <= photos[name].shape[1] and 0 <= y0 < y1 <= photos[name].shape[0]
        assert lm[0, 0] < lm[2, 0] < lm[1, 0], name                    # left eye | nose | right eye
        assert lm[3, 0] < lm[4, 0], name                               # mouth corners, image-left first
        assert max(lm[0, 1], lm[1, 1]) < lm[2, 1] < min(lm[3, 1], lm[4, 1]), name   # eyes / nose / mouth
        inside = (lm[:, 0] > x0 - 0.1 * (x1 - x0)) & (lm[:, 0] < x1 + 0.1 * (x1 - x0)) & (lm[:, 1] > y0)
        assert inside.all() and lm[:, 1].max() < y1 + 0.2 * (y1 - y0), name
        assert 0.25 < _iod(lm) / (x1 - x0) < 0.7, name                 # eye distance relative to the box
        assert face.shape5 is not None and face.shape5.num_parts == 5
        assert face.shape68 is not None and face.shape68.num_parts == 68


def test_faces_sorted_largest_first(detector, photos):
    # two copies of a face side by side, one half size: the larger must come first
    rgb = photos["obama"]
    h, w = rgb.shape[:2]
    small = rgb[::2, ::2]
    canvas = np.zeros((h, w + small.shape[1], 3), np.uint8)
    canvas[:, :w] = rgb
    canvas[:small.shape[0], w:] = small
    faces = detector.detect(canvas)
    assert len(faces) == 2
    assert fd.box_area(faces[0]) > 2 * fd.box_area(faces[1])   # ~4x, up to HOG pyramid quantisation
    assert faces[0].box[0] < w <= faces[1].box[0]


def test_no_face_on_blank_or_noise(detector):
    assert detector.detect(np.full((200, 240, 3), 128, np.uint8)) == []
    noise = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    assert detector.detect(noise) == []


def test_detect_one_and_input_errors_name_the_source(detector, photos):
    face = fd.detect_one(photos["biden"], detector, "biden.jpg")
    assert face.landmarks.shape == (5, 2)
    with pytest.raises(InputError, match="no face detected in holiday/IMG_0042.jpg"):
        fd.detect_one(np.zeros((120, 120, 3), np.uint8), detector, "holiday/IMG_0042.jpg")
    with pytest.raises(InputError, match="scan.png"):
        fd.detect_one(np.zeros((120, 120, 3), np.float32), detector, "scan.png")
    with pytest.raises(InputError, match="image"):
        detector.detect(np.zeros((120, 120), np.uint8))


def test_landmarks_from_68_definition():
    pts = np.random.default_rng(1).uniform(0, 100, (68, 2)).astype(np.float32)
    lm = fd.landmarks_from_68(pts)
    np.testing.assert_allclose(lm[0], pts[36:42].mean(0), rtol=1e-6)
    np.testing.assert_allclose(lm[1], pts[42:48].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(lm[2:], pts[[30, 48, 54]])


def test_landmarks_from_5_is_exact_on_the_mean_face():
    # dlib's mean face, rotated 20 degrees, scaled to 180 px and shifted: the estimate must land on the same
    # transform of the mean face's ArcFace points (eyes: corner midpoints, which differ slightly from the
    # contour means, so they get a looser tolerance).
    a = np.deg2rad(20)
    rot = 180 * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    shape5 = MEAN_FACE_5 @ rot.T + [300, 200]
    expected = mean_face_arcface_points() @ rot.T + [300, 200]
    lm = fd.landmarks_from_5(shape5)
    np.testing.assert_allclose(lm[2:], expected[2:], atol=1e-3)
    assert np.abs(lm[:2] - expected[:2]).max() < 0.01 * 180


def test_5_point_estimate_close_to_68_point_landmarks(detector_5pt, detections, photos):
    assert not detector_5pt.uses_68
    for name, rgb in photos.items():
        f5 = detector_5pt.detect(rgb)
        assert len(f5) == 1, name
        ref = detections[name][0].landmarks
        err = np.linalg.norm(f5[0].landmarks - ref, axis=1) / _iod(ref)
        print(name, "5-point estimate error / eye distance:", err.round(3))
        assert err[:2].max() < 0.06, name                 # eyes: measured
        assert err[2:].max() < 0.35, name                 # nose tip, mouth: estimated from the mean face


def test_cnn_detector_finds_small_faces(detections, photos):
    """dlib's MMOD detector (it judges small generated samples): one face per photo shrunk until the face is
    40 px wide (the demo model's samples: 25-35 px), its eyes where HOG + the 68-point model put them on the
    full photo; nothing on blank or noise."""
    from PIL import Image

    cnn = fd.get_detector("dlib-cnn")
    assert isinstance(cnn, fd.DlibCNNDetector) and not cnn.uses_68 and cnn is fd.get_detector("dlib-cnn")
    for name, rgb in photos.items():
        x0, _, x1, _ = detections[name][0].box
        scale = 40 / (x1 - x0)
        size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
        faces = cnn.detect(np.asarray(Image.fromarray(rgb).resize(size, Image.LANCZOS)))
        assert len(faces) == 1, name
        ref = detections[name][0].landmarks * scale
        err = np.linalg.norm(faces[0].landmarks[:2] - ref[:2], axis=1) / _iod(ref)
        print(name, "eye error / eye distance, face 40 px wide:", err.round(3), "confidence", round(faces[0].score, 2))
        assert err.max() < 0.15, name
    assert cnn.detect(np.full((128, 128, 3), 128, np.uint8)) == []
    assert cnn.detect(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)) == []


def test_get_detector_factory(tmp_path):
    assert fd.get_detector("dlib") is fd.get_detector("dlib")      # cached: loading the predictors is slow
    with pytest.raises(InputError, match="missing.onnx"):
        fd.get_detector(str(tmp_path / "missing.onnx"))
    with pytest.raises(InputError, match="mtcnn"):
        fd.get_detector("mtcnn")
    with pytest.raises(InputError, match="upsample"):
        fd.DlibDetector(upsample=1.5)
