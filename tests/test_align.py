import math

import numpy as np
import pytest
import torch

from iddm_core.face.align import (ARCFACE_TEMPLATE_112, apply_affine, template_for, umeyama,
                                  warp_to_template)
from iddm_core.images import load_rgb, to_tensor

TEMPLATE = torch.tensor(ARCFACE_TEMPLATE_112)


def similarity(points: torch.Tensor, scale: float, angle_deg: float, tx: float, ty: float) -> torch.Tensor:
    a = math.radians(angle_deg)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=points.dtype) * scale
    return points @ rot.T + torch.tensor([tx, ty], dtype=points.dtype)


def marker_centroids(img: torch.Tensor, points, radius: int = 5) -> list[tuple[float, float]]:
    """Centre of mass of the red-only marker blob around each expected point of a [3, H, W] image."""
    redness = (img[0] - img[1:].max(dim=0).values).clamp_min(0)
    out = []
    for x, y in np.asarray(points):
        x0, y0 = int(round(x)), int(round(y))
        win = redness[y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1]
        yy, xx = torch.meshgrid(torch.arange(y0 - radius, y0 + radius + 1.0),
                                torch.arange(x0 - radius, x0 + radius + 1.0), indexing="ij")
        out.append((float((win * xx).sum() / win.sum()), float((win * yy).sum() / win.sum())))
    return out


def test_umeyama_recovers_similarity_exactly():
    # A batch of three differently placed copies of the template: the fit must undo each one exactly.
    params = [(2.5, 17.0, 40.0, -12.0), (0.7, -130.0, 300.0, 220.0), (4.0, 0.0, 0.0, 0.0)]
    src = torch.stack([similarity(TEMPLATE.double(), *p) for p in params])
    m = umeyama(src, TEMPLATE.double())
    assert m.shape == (3, 2, 3)
    err = (apply_affine(m, src) - TEMPLATE.double()).abs().max()
    assert err < 1e-9
    # Scale of the recovered matrix is the inverse of the applied scale (no reflection: positive determinant).
    det = torch.linalg.det(m[:, :, :2])
    assert torch.allclose(det, torch.tensor([1 / p[0] ** 2 for p in params], dtype=det.dtype))


def test_umeyama_never_reflects():
    mirrored = TEMPLATE.clone()
    mirrored[:, 0] = 112 - mirrored[:, 0]
    m = umeyama(mirrored, TEMPLATE)
    assert torch.linalg.det(m[:, :, :2]).item() > 0
    assert (apply_affine(m, mirrored[None]) - TEMPLATE).abs().max() > 5   # a reflection would fit exactly


def test_template_for_scales_and_zooms():
    t160 = template_for(160)
    assert np.allclose(t160, ARCFACE_TEMPLATE_112 * 160 / 112, atol=1e-4)
    zoomed = template_for(112, zoom=0.5)
    centre = np.array([56.0, 56.0])
    assert np.allclose(zoomed - centre, (ARCFACE_TEMPLATE_112 - centre) * 0.5, atol=1e-4)
    with pytest.raises(ValueError):
        template_for(112, base=np.zeros((4, 2)))


def test_warp_puts_markers_of_a_real_photo_on_the_template(small_faces_dir):
    rgb = load_rgb(small_faces_dir / "obama.jpg")
    img = to_tensor(rgb)
    h, w = img.shape[1:]
    # Landmarks known by construction: the template mapped by a rotated, enlarged similarity into the photo.
    lm = similarity(TEMPLATE, 2.3, 12.0, 0.25 * w, 0.2 * h)
    assert lm[:, 0].max() < w - 8 and lm[:, 1].max() < h - 8
    for x, y in lm.numpy():
        xi, yi = int(round(x)), int(round(y))
        img[:, yi - 3:yi + 4, xi - 3:xi + 4] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    # The markers were drawn on rounded pixels: the expected crop positions are those of the drawn centres.
    drawn = torch.round(lm)
    m = umeyama(lm[None], TEMPLATE)
    expected = apply_affine(m, drawn[None])[0]
    crop = warp_to_template(img[None], lm[None], ARCFACE_TEMPLATE_112, 112)
    assert crop.shape == (1, 3, 112, 112)
    found = np.array(marker_centroids(crop[0], expected.numpy(), radius=4))
    assert np.abs(found - expected.numpy()).max() < 1.0
    assert np.abs(found - ARCFACE_TEMPLATE_112).max() < 1.0


def test_warp_is_differentiable_and_zero_padded():
    img = torch.rand(2, 3, 64, 80, requires_grad=True)
    lm = torch.stack([similarity(TEMPLATE, 0.4, 5.0, 10.0, 8.0), similarity(TEMPLATE, 0.3, -20.0, -8.0, -6.0)])
    crop = warp_to_template(img, lm, template_for(96), 96)
    crop.sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    # The second face sits in the photo's corner: its crop must show the black surround of a zero-padded warp.
    assert crop[1, :, 0, :].abs().max() == 0
    border = warp_to_template(img.detach(), lm, template_for(96), 96, padding_mode="border")
    assert border[1, :, 0, :].abs().max() > 0


def test_warp_rejects_bad_shapes():
    with pytest.raises(ValueError):
        warp_to_template(torch.rand(1, 3, 32, 32), torch.rand(1, 4, 2), ARCFACE_TEMPLATE_112, 112)
    with pytest.raises(ValueError):
        warp_to_template(torch.rand(3, 32, 32), torch.rand(1, 5, 2), ARCFACE_TEMPLATE_112, 112)
