"""face/budget.py: the PSNR floor (an L2 ball on a region) beside the L_inf box, and the face attack under it."""
import math

import pytest
import torch

from iddm_core.errors import InputError
from iddm_core.evaluation.metrics import psnr
from iddm_core.face.align import ARCFACE_TEMPLATE_112
from iddm_core.face.attack import face_attack
from iddm_core.face.budget import box_mask, box_regions, check_psnr, l2_pgd_step, l2_radius, mse_limit, project
from test_face_attack import _tiny_loss


def test_mse_limit_is_the_psnr_definition():
    assert mse_limit(30) == pytest.approx(1e-3)
    assert 10 * math.log10(1 / mse_limit(27.5)) == pytest.approx(27.5)
    check_psnr(None)
    check_psnr(30)
    with pytest.raises(InputError, match="psnr"):
        check_psnr(5)


def test_box_mask_rounds_clips_and_rejects_a_box_outside():
    m = box_mask([(2.4, 1.6, 5.5, 4.0), (-3, -3, 100, 2)], 6, 8)
    assert m.shape == (2, 1, 6, 8)
    assert m[0, 0].nonzero().min(0).values.tolist() == [2, 2] and m[0, 0].nonzero().max(0).values.tolist() == [3, 5]
    assert m[1, 0, :2].all() and not m[1, 0, 2:].any()
    with pytest.raises(InputError, match="outside"):
        box_mask([(10, 10, 20, 20)], 6, 8)


def test_project_keeps_the_region_the_box_and_the_ball():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(2, 3, 10, 10, generator=g) * 0.2
    mask = box_mask([(2, 2, 8, 8), (0, 0, 10, 10)], 10, 10)
    radius = l2_radius(mask, 3, 30.0)
    assert radius[:, 0].tolist() == pytest.approx([math.sqrt(108 * 1e-3), math.sqrt(300 * 1e-3)])
    out = project(delta, 0.05, radius, mask)
    assert not out[0][(mask[0].expand(3, -1, -1) == 0)].any()
    assert out.abs().max() <= 0.05 + 1e-7
    assert (out.flatten(1).norm(dim=1) <= radius[:, 0] * (1 + 1e-6)).all()
    two = torch.cat([mask, 1 - mask], 1)                 # the box and the rest: each its own ball
    radius2 = l2_radius(two, 3, 30.0)
    out2 = project(delta, 0.05, radius2, two)
    for r in range(2):
        assert ((out2 * two[:, r:r + 1]).flatten(1).norm(dim=1) <= radius2[:, r] * (1 + 1e-6)).all()
    # inside the ball already: only the box applies
    small = torch.full((1, 3, 10, 10), 0.001)
    assert torch.equal(project(small, 0.05, torch.tensor([1.0])), small)


def test_l2_step_moves_the_given_length_against_the_direction():
    x0 = torch.full((1, 1, 4, 4), 0.5)
    direction = torch.zeros_like(x0)
    direction[0, 0, 1, 1] = 3.0
    mask = torch.ones_like(x0)
    out = l2_pgd_step(x0, x0.clone(), direction, torch.tensor([0.1]), 0.2, torch.tensor([[1.0]]), mask)
    assert out[0, 0, 1, 1] == pytest.approx(0.4)
    assert (out - x0).abs().sum() == pytest.approx(0.1)
    # the box still binds
    out = l2_pgd_step(x0, x0.clone(), direction, torch.tensor([0.5]), 0.08, torch.tensor([[1.0]]), mask)
    assert out[0, 0, 1, 1] == pytest.approx(0.42)


def test_face_attack_under_a_psnr_floor_changes_only_the_region_and_keeps_the_floor():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 3, 64, 64, generator=g)
    lm = torch.tensor(ARCFACE_TEMPLATE_112 * 0.5)[None] + 4.0
    region = box_mask([(8, 8, 56, 56)], 64, 64)
    result = face_attack(x0, lm, _tiny_loss(x0, lm), eta=0.08, steps=10, psnr=32.0, regions=region)
    inside = (slice(None), slice(None), slice(8, 56), slice(8, 56))
    changed = (result.image - x0).abs()
    assert changed[inside].sum() > 0 and float((changed * (1 - region)).max()) == 0.0
    box_psnr = float(psnr(result.image[inside], x0[inside])[0])
    assert box_psnr >= 32.0 - 1e-3
    assert box_psnr < 32.5          # 2.5 radius / steps reaches the edge of the ball
    assert changed.max() <= 0.08 + 1e-6
    assert result.final["similarity"]["tiny"] < result.history[0]["similarity"]["tiny"] - 0.05
    with pytest.raises(InputError, match="psnr"):
        face_attack(x0, lm, _tiny_loss(x0, lm), psnr=200.0)


def test_face_box_and_the_rest_each_keep_the_floor():
    """box_regions: the face box and the rest of the photo are two balls; the attack may change both, and each
    stays at PSNR >= the floor (so the whole photo does too)."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(1, 3, 64, 64, generator=g)
    lm = torch.tensor(ARCFACE_TEMPLATE_112 * 0.5)[None] + 4.0
    regions = box_regions([(20, 20, 44, 44)], 64, 64)
    assert regions.shape == (1, 2, 64, 64) and torch.equal(regions.sum(1), torch.ones(1, 64, 64))
    result = face_attack(x0, lm, _tiny_loss(x0, lm), eta=0.08, steps=10, psnr=30.0, regions=regions)
    changed = (result.image - x0).abs()
    box = (slice(None), slice(None), slice(20, 44), slice(20, 44))
    rest = regions[:, 1:] > 0
    assert float(psnr(result.image[box], x0[box])[0]) >= 30.0 - 1e-3
    rest_mse = float(((result.image - x0) ** 2 * regions[:, 1:]).sum() / (3 * rest.sum()))
    assert rest_mse <= mse_limit(30.0) * (1 + 1e-4)
    assert float((changed * regions[:, 1:]).max()) > 0          # the crop reaches outside the box: it is used
    assert float(psnr(result.image, x0)[0]) >= 30.0 - 1e-3


def test_iddm_pgd_under_a_psnr_floor(one_thread):
    """PGDConfig.psnr: X' keeps PSNR >= the floor against the clean photos in every step, whether it starts from
    the clean photos or from an earlier X' (IDDM's carried X'), the identity loss still falls, and without it the
    L_inf path is unchanged."""
    from iddm_core.diffusion.loading import load_model
    from iddm_core.protection.pgd import PGDConfig, pgd_two_stage
    from test_face_attack import TinyRecognizer

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 64, 64, generator=g)
    lm = (torch.tensor(ARCFACE_TEMPLATE_112 * 0.5)[None] + 4.0).expand(2, 5, 2)
    ens = _tiny_loss(x0, lm)
    bundle = load_model("tiny")                   # bypassed: x0_hat := x'
    identity = lambda bundle, x, embeds, noise, precision, sds: x  # noqa: E731

    def run(cfg, x_init=None):
        steps = []
        x = pgd_two_stage(bundle, ens, x0, lm, torch.zeros(1, 1, 1), cfg, torch.Generator().manual_seed(0),
                          on_step=steps.append, predict_clean=identity, x_init=x_init)
        return x, steps

    floor = 34.0
    x, steps = run(PGDConfig(T=6, eta=0.08, alpha=0.02, psnr=floor))
    assert (psnr(x, x0) >= floor - 1e-3).all() and (psnr(x, x0) < floor + 1.0).all()
    assert steps[-1]["similarity"]["tiny"] < steps[0]["similarity"]["tiny"] - 0.05
    far = (x0 + 0.08 * torch.sign(torch.randn(x0.shape, generator=g))).clamp(0, 1)   # an X' far outside the ball
    x2, _ = run(PGDConfig(T=2, eta=0.08, alpha=0.02, psnr=floor), x_init=far)
    assert (psnr(x2, x0) >= floor - 1e-3).all()
    plain, _ = run(PGDConfig(T=6, eta=0.08, alpha=0.02))
    assert float(psnr(plain, x0).min()) < floor - 3       # the sign steps spend the L_inf box, not a PSNR
    with pytest.raises(InputError, match="psnr"):
        PGDConfig(psnr=1.0).validate()


def test_resume_fingerprint_leaves_the_default_psnr_out():
    """A resume state written before PGDConfig.psnr existed still matches a run without a floor; a floor is
    another run."""
    import dataclasses

    from iddm_core.protection.iddm import IDDMConfig
    from iddm_core.training import checkpoint as ckpt
    from test_lora import build_tiny_bundle

    class Refs:
        def reference(self):
            return torch.zeros(1, 3, 8, 8), torch.zeros(1, 5, 2)

        protect = reference

    class OldConfig(IDDMConfig):          # what to_dict gave before the floor existed
        def to_dict(self):
            d = super().to_dict()
            d["pgd"] = {k: v for k, v in d["pgd"].items() if k != "psnr"}
            return d

    bundle = build_tiny_bundle(0)
    old = ckpt.run_fingerprint(bundle, Refs(), OldConfig())
    assert "psnr" in IDDMConfig().to_dict()["pgd"]
    assert ckpt.run_fingerprint(bundle, Refs(), IDDMConfig()) == old
    base = IDDMConfig()
    floor = ckpt.run_fingerprint(bundle, Refs(), dataclasses.replace(base, pgd=dataclasses.replace(base.pgd,
                                                                                                  psnr=30.0)))
    assert floor["parts"]["settings"] != old["parts"]["settings"] and floor["settings"]["pgd"]["psnr"] == 30.0
