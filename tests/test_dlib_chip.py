"""dlib's chip extraction ported to torch (face/dlib_chip.py) against dlib's C++: chips pixel for pixel, descriptors
to 1e-3, on the sample photos and on variants that take every branch (image pyramid 0..3 levels deep, rotation,
chip partly outside the photo), plus synthetic images with random geometry."""
import json

import numpy as np
import pytest
import torch

from iddm_core.face import dlib_chip as dc
from iddm_core.face.base import Face
from iddm_core.face.landmarks import arcface_points, check_landmarks, dlib_parts
from iddm_core.face.dlib_files import RESNET, SHAPE_5, require_model
from iddm_core.images import load_rgb, to_tensor

dlib = pytest.importorskip("dlib")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def dlib_models():
    return (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(require_model(SHAPE_5))),
            dlib.face_recognition_model_v1(str(require_model(RESNET))))


@pytest.fixture(scope="module")
def model():
    from iddm_core.face.dlib_resnet import load_dlib_recognizer

    return load_dlib_recognizer()


def _parts(shape) -> np.ndarray:
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


def _rect(x0, y0, x1, y1):
    return dlib.rectangle(int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1)))


def _variant(rgb: np.ndarray, rect, kind: str):
    """(photo, face rectangle in it): ``up<f>`` bicubic upscale, ``down<f>`` downscale, ``rot<deg>`` rotation
    (expanded canvas), ``cut<frac>`` the photo cut off at ``frac`` of the face width from its left edge."""
    im = Image.fromarray(rgb)
    l, t, r, b = rect.left(), rect.top(), rect.right(), rect.bottom()
    if kind == "orig":
        return rgb, rect
    if kind.startswith(("up", "down")):
        f = float(kind[2:]) if kind.startswith("up") else 1.0 / float(kind[4:])
        out = im.resize((round(im.width * f), round(im.height * f)), Image.BICUBIC)
        return np.array(out), _rect(l * f, t * f, r * f, b * f)
    if kind.startswith("rot"):
        deg = float(kind[3:])
        out = im.rotate(deg, resample=Image.BICUBIC, expand=True)
        a = np.deg2rad(deg)                    # PIL turns counter-clockwise on screen (y down)
        cx, cy = (l + r) / 2 - im.width / 2, (t + b) / 2 - im.height / 2
        nx = np.cos(a) * cx + np.sin(a) * cy + out.width / 2
        ny = -np.sin(a) * cx + np.cos(a) * cy + out.height / 2
        half = (r - l) / 2
        return np.array(out), _rect(nx - half, ny - half, nx + half, ny + half)
    if kind.startswith("cut"):
        x = int(l + float(kind[3:]) * (r - l))
        return np.ascontiguousarray(rgb[:, x:]), _rect(l - x, t, r - x, b)
    raise ValueError(kind)


# photo -> variants; together: pyramid depths 0, 1, 2 and 3, rotations, small faces, chips cut by the border
VARIANTS = {
    "obama": ["orig", "down2", "rot25", "cut0.3"],
    "obama2": ["orig", "up2", "up4", "rot-40"],
    "biden": ["orig", "up2", "down3"],
    "astronaut": ["orig", "down2", "cut0.6"],
}


@pytest.fixture(scope="module")
def cases(faces_dir, dlib_models):
    """name -> (photo, dlib's 5-point shape in it), detected once per sample photo and re-fitted (shape predictor
    on the mapped face rectangle) in each variant."""
    detector, predictor, _ = dlib_models
    out = {}
    for stem, kinds in VARIANTS.items():
        path = next(faces_dir.glob(stem + ".*"))
        rgb = load_rgb(path)
        rect = max(detector(rgb, 1), key=lambda r: r.area())
        for kind in kinds:
            img, r = _variant(rgb, rect, kind)
            img = np.ascontiguousarray(img)
            out[f"{stem}/{kind}"] = (img, predictor(img, r))
    return out


@pytest.fixture(scope="module")
def chips(cases):
    """name -> (our chip as uint8 [150, 150, 3], dlib.get_face_chip's)."""
    out = {}
    for name, (img, shape) in cases.items():
        ours = dc.extract_face_chip(to_tensor(img), _parts(shape))
        ours = (ours * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        out[name] = (ours, dlib.get_face_chip(img, shape, 150, 0.25))
    return out


def _close_chips(diff: np.ndarray) -> bool:
    """At most 1 (8-bit units) anywhere and on at most 0.1 % of the values: a rounding flip at a tie, not a bias."""
    return diff.max() <= 1 and np.count_nonzero(diff) <= 1e-3 * diff.size


def test_variants_take_every_branch(cases):
    depths, angles, outside = set(), [], []
    for name, (img, shape) in cases.items():
        details = dc.get_face_chip_details(_parts(shape))
        depths.add(dc.pyramid_depth(details))
        angles.append(abs(details.angle))
        corners = np.array(dc.rotated_corners(details.rect, details.angle))
        h, w = img.shape[:2]
        outside.append(bool((corners < 0).any() or (corners[:, 0] > w - 1).any() or (corners[:, 1] > h - 1).any()))
    print("pyramid depths", sorted(depths), "max |angle|", round(max(angles), 3), "chips cut", sum(outside))
    assert {0, 1, 2, 3} <= depths
    assert max(angles) > 0.5 and sum(a > 0.3 for a in angles) >= 2
    assert sum(outside) >= 2


def test_chips_equal_dlib_get_face_chip(chips):
    diffs = {name: np.abs(ours.astype(int) - ref.astype(int)) for name, (ours, ref) in chips.items()}
    print("max abs chip difference (8-bit units):", {k: int(d.max()) for k, d in diffs.items()})
    # dlib's arithmetic is reproduced exactly; a floating-point tie may still round the other way on rare pixels
    assert all(_close_chips(d) for d in diffs.values())
    # the cut variants really have black where the photo ends
    for name in ("obama/cut0.3", "astronaut/cut0.6"):
        assert (chips[name][1].max(axis=2) == 0).any(), name


def test_descriptors_equal_dlib_compute_face_descriptor(cases, dlib_models, model):
    *_, net = dlib_models
    names = sorted(cases)
    ours_chips, native = [], []
    for name in names:
        img, shape = cases[name]
        landmarks = torch.from_numpy(Face((0, 0, 1, 1), np.zeros((5, 2), np.float32),
                                          dlib_parts=_parts(shape).astype(np.float32)).points())[None]
        with torch.no_grad():
            ours_chips.append(model.align(to_tensor(img)[None], landmarks))
        native.append(np.array(net.compute_face_descriptor(img, shape)))
    with torch.no_grad():
        ours = model(torch.cat(ours_chips)).double().numpy()
    diff = np.abs(ours - np.stack(native)).max(axis=1)
    print("max abs descriptor difference:", {n: float(f"{d:.2e}") for n, d in zip(names, diff)})
    assert diff.max() <= 1e-3


def test_random_geometry_on_synthetic_images():
    """Random sizes, scales (pyramid depth 0..3), angles and positions (partly or wholly outside the photo) on
    noise, saturated blocks and gradients, given as off-grid floats: every chip must equal dlib's."""
    rng, gen = np.random.default_rng(1), torch.Generator().manual_seed(1)
    worst, close = 0, True
    for i in range(40):
        h, w = (int(v) for v in rng.integers(6, 400, size=2))
        kind = i % 3
        if kind == 0:
            img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        elif kind == 1:
            blocks = rng.integers(0, 2, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8) * 255
            img = blocks.repeat(8, 0).repeat(8, 1)[:h, :w]
        else:
            yy, xx = np.mgrid[:h, :w]
            img = np.stack([(3 * xx + yy) % 256, (5 * yy) % 256, (xx * yy // 7) % 256], -1).astype(np.uint8)
        img = np.ascontiguousarray(img)
        scale = float(np.exp(rng.uniform(np.log(15), np.log(900))))
        angle = rng.uniform(-np.pi, np.pi) if i % 2 else rng.normal(0, 0.1)
        rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        centre = rng.uniform(-0.3, 1.3, size=2) * (w, h)
        pts = np.round((dc.MEAN_FACE_5 - 0.5) @ rot.T + centre + rng.normal(0, 0.02 * scale, (5, 2)))
        shape = dlib.full_object_detection(dlib.rectangle(0, 0, 1, 1), [dlib.point(int(x), int(y)) for x, y in pts])
        ref = dlib.get_face_chip(img, shape, 150, 0.25)
        # off-grid floats (as PGD makes them): the chip is that of the 8-bit photo they round to
        x = ((to_tensor(img) * 255 + torch.empty(3, h, w).uniform_(-0.45, 0.45, generator=gen)) / 255).clamp(0, 1)
        ours = (dc.extract_face_chip(x, pts) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        diff = np.abs(ours.astype(int) - ref.astype(int))
        worst, close = max(worst, int(diff.max())), close and _close_chips(diff)
    print("max abs chip difference on synthetic images (8-bit units):", worst)
    assert close


def test_pyramid_down_matches_dlib_filter():
    """One level by hand: floor(sum of the 5 x 5 binomial window at every other pixel / 256), size (n - 3) // 2."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(3, 13, 20)).astype(np.float64)
    down = dc.pyramid_down(torch.from_numpy(img)).numpy()
    assert down.shape == (3, 5, 8)
    k = np.array([1, 4, 6, 4, 1.0])
    k2 = np.outer(k, k)
    for r in range(5):
        for c in range(8):
            window = img[:, 2 * r:2 * r + 5, 2 * c:2 * c + 5]
            assert (down[:, r, c] == np.floor((window * k2).sum(axis=(1, 2)) / 256)).all()
    assert dc.pyramid_down(torch.zeros(3, 8, 40, dtype=torch.float64)).numel() == 0


def test_unscaled_unrotated_chip_is_a_plain_copy():
    """dlib copies pixels without resampling when the chip has the rectangle's size and no rotation."""
    values = torch.randint(0, 256, (3, 200, 180)).double()
    image = values / 255.0
    details = dc.ChipDetails((20.0, 30.0, 169.0, 179.0), 0.0, 150, 150)
    assert torch.equal(dc._extract(image, details), values[:, 30:180, 20:170])
    details = dc.ChipDetails((100.0, -10.0, 249.0, 139.0), 0.0, 150, 150)     # partly outside: black there
    chip = dc._extract(image, details)
    assert chip[:, :10].abs().sum() == 0 and chip[:, :, 80:].abs().sum() == 0
    assert torch.equal(chip[:, 10:, :80], values[:, :140, 100:])


def test_gradient_reaches_the_pixels_through_the_pyramid(cases, model):
    img, shape = cases["obama2/up2"]                        # two pyramid levels and a rotation
    parts = _parts(shape)
    assert dc.pyramid_depth(dc.get_face_chip_details(parts)) == 2
    image = to_tensor(img)[None].requires_grad_(True)
    landmarks = torch.from_numpy(np.concatenate([np.zeros((5, 2)), parts]).astype(np.float32))[None]
    emb = model.embed(image, landmarks)
    emb[0, :8].sum().backward()
    grad = image.grad[0].abs().sum(0)
    assert torch.isfinite(grad).all() and grad.sum() > 0
    ys, xs = torch.nonzero(grad, as_tuple=True)                # only around the face
    lo, hi = parts.min(axis=0), parts.max(axis=0)
    span = (hi - lo).max()
    assert xs.min() > lo[0] - 2 * span and xs.max() < hi[0] + 2 * span
    assert ys.min() > lo[1] - 2 * span and ys.max() < hi[1] + 2 * span


def test_face_embed_cli_equals_native_descriptor(faces_dir, capsys):
    from iddm_core.cli import main
    from iddm_core.face.attack import dlib_native_descriptor

    path = faces_dir / "obama2.jpg"
    assert main(["face-embed", "--model", "dlib", "--device", "cpu", str(path)]) == 0
    emb = np.array(json.loads(capsys.readouterr().out)["embedding"])
    native = dlib_native_descriptor(load_rgb(path))
    diff = float(np.abs(emb - native / np.linalg.norm(native)).max())
    print("face-embed vs dlib's normalised descriptor, max abs:", diff)
    assert diff <= 1e-3
    assert main(["face-embed", "--model", "dlib", "--raw", "--device", "cpu", str(path)]) == 0
    raw = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    diff = float(np.abs(np.array(raw["embedding"]) - native).max())
    print("face-embed --raw vs dlib's compute_face_descriptor, max abs:", diff)
    assert raw["normalised"] is False and diff <= 1e-3


def test_landmark_plumbing():
    lm = np.arange(10, dtype=np.float32).reshape(5, 2)
    parts = lm[::-1] + 100
    face = Face((0, 0, 10, 10), lm, 0.9, parts)
    assert face.points().shape == (10, 2) and np.array_equal(face.points()[5:], parts)
    assert Face((0, 0, 10, 10), lm).points().shape == (5, 2)
    moved = face.scaled(2.0, 1.0, 3.0)
    assert np.allclose(moved.dlib_parts, (parts - [1, 3]) * 2) and np.allclose(moved.landmarks, (lm - [1, 3]) * 2)
    t = torch.from_numpy(face.points())[None]
    assert torch.equal(arcface_points(t)[0], torch.from_numpy(lm)) and torch.equal(dlib_parts(t)[0],
                                                                                    torch.from_numpy(parts))
    assert dlib_parts(arcface_points(t)) is None
    check_landmarks(t, 1)
    with pytest.raises(ValueError):
        check_landmarks(torch.zeros(1, 7, 2))


def test_arcface_recognisers_ignore_dlib_parts():
    from iddm_core.face.align import ARCFACE_TEMPLATE_112, warp_to_template

    images = torch.rand(2, 3, 64, 64)
    lm5 = torch.tensor([[20.0, 25], [44, 25], [32, 36], [22, 48], [42, 48]]).expand(2, 5, 2)
    lm10 = torch.cat([lm5, torch.rand(2, 5, 2) * 64], dim=1)
    a = warp_to_template(images, lm5, ARCFACE_TEMPLATE_112, 112)
    assert torch.equal(a, warp_to_template(images, lm10, ARCFACE_TEMPLATE_112, 112))
