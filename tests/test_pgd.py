"""PGDTwoStage: projection, stage schedule, and Stage II lowering the ensemble similarity on real photos."""
import math

import numpy as np
import pytest
import torch

from iddm_core.errors import InputError
from iddm_core.pgd import PGDConfig, one_step_clean, pgd_two_stage


@pytest.mark.parametrize("T,rho", [(8, 0.1), (8, 0.3), (8, 0.5), (10, 0.25), (3, 0.9)])
def test_stage_schedule(T, rho):
    cfg = PGDConfig(T=T, rho=rho).validate()
    stages = [cfg.stage(t) for t in range(1, T + 1)]
    n = math.floor(rho * T)
    assert stages == ["rec"] * n + ["id"] * (T - n)


@pytest.mark.parametrize("field,value", [("rho", 0.0), ("rho", 1.0), ("eta", 0.0), ("eta", -1), ("alpha", 0.5),
                                         ("T", 0), ("T", 2.5)])
def test_config_validation_names_the_parameter(field, value):
    with pytest.raises(InputError, match=field):
        PGDConfig(**{field: value}).validate()


def test_one_step_clean_inverts_noising():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([10, 500, 990])
    zt = sched.add_noise(z0, eps, t)
    ab = sched.alphas_cumprod[t]
    assert torch.allclose(one_step_clean(zt, eps, ab, "epsilon"), z0, atol=1e-3)
    v = sched.get_velocity(z0, eps, t)
    assert torch.allclose(one_step_clean(zt, v, ab, "v_prediction"), z0, atol=1e-4)


class _Sum(torch.nn.Module):
    """Stand-in ensemble for plumbing tests: 'similarity' = mean pixel value (differentiable, cheap)."""

    def forward(self, images, landmarks):
        s = images.mean(dim=(1, 2, 3))
        return 1 + s.mean(), {"fake": s}


def test_pgd_on_tiny_model_projection_and_stages():
    from iddm_core.models import load_model

    bundle = load_model("tiny")
    tok = bundle.tokenizer(["a photo of sks person"], padding="max_length", truncation=True,
                           max_length=bundle.tokenizer.model_max_length, return_tensors="pt")
    embeds = bundle.text_encoder(tok.input_ids)[0].detach()
    x0 = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cfg = PGDConfig(T=5, rho=0.4, eta=0.03, alpha=0.01)
    steps = []
    x = pgd_two_stage(bundle, _Sum(), x0, torch.zeros(2, 5, 2), embeds, cfg, torch.Generator().manual_seed(0),
                      on_step=steps.append)
    assert [s["stage"] for s in steps] == ["rec", "rec", "id", "id", "id"]
    assert all(s["linf"] <= cfg.eta + 1e-6 for s in steps)
    assert (x - x0).abs().max() <= cfg.eta + 1e-6 and x.min() >= 0 and x.max() <= 1
    assert (x - x0).abs().max() > 0.5 * cfg.eta          # it moved
    assert all(p.grad is None for p in bundle.unet.parameters())   # no parameter gradients accumulated
    assert all("fake" in s["similarity"] for s in steps if s["stage"] == "id")


def test_stage_two_lowers_dlib_similarity_on_real_photos(small_faces_dir):
    """With x0_hat := x' (no diffusion model), Stage II steps must push obama2 away from the obama prototype."""
    from iddm_core.face.detect import get_detector
    from iddm_core.face.dlib_resnet import load_dlib_recognizer
    from iddm_core.face.ensemble import FaceEnsembleLoss
    from iddm_core.images import load_rgb
    from iddm_core.refs import prepare_photos
    from iddm_core.images import Photo

    det = get_detector("dlib")
    photos = [Photo(n, small_faces_dir / n, load_rgb(small_faces_dir / n)) for n in ("obama.jpg", "obama2.jpg")]
    photos.append(Photo("m", small_faces_dir / "obama.jpg", np.ascontiguousarray(photos[0].rgb[:, ::-1])))
    images, landmarks, _, _ = prepare_photos(photos, 160, det)
    ens = FaceEnsembleLoss([load_dlib_recognizer()], tau=0.03)
    ens.set_references(images[[0, 2]], landmarks[[0, 2]])
    with torch.no_grad():
        before = float(ens(images[[1]], landmarks[[1]])[1]["dlib"])
    identity = lambda bundle, x, embeds, noise, precision, sds: x  # noqa: E731
    cfg = PGDConfig(T=6, rho=0.1, eta=0.08, alpha=0.008)
    steps = []

    from iddm_core.models import load_model

    bundle = load_model("tiny")     # its diffusion model is bypassed: x0_hat := x'

    cfg_id_only = PGDConfig(T=6, rho=0.1)   # floor(0.6) = 0 rec steps
    x = pgd_two_stage(bundle, ens, images[[1]], landmarks[[1]], torch.zeros(1, 1, 1), cfg_id_only,
                      torch.Generator().manual_seed(0), on_step=steps.append, predict_clean=identity)
    with torch.no_grad():
        after = float(ens(x, landmarks[[1]])[1]["dlib"])
    sims = [s["similarity"]["dlib"] for s in steps]
    print(f"dlib cosine to prototype: before {before:.3f}, per step {[round(s, 3) for s in sims]}, after {after:.3f}")
    assert after < before - 0.05
    assert (x - images[[1]]).abs().max() <= cfg.eta + 1e-6
