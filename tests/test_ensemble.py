import math

import numpy as np
import pytest
import torch

from iddm_core.errors import InputError, ModelError
from iddm_core.face.align import ARCFACE_TEMPLATE_112
from iddm_core.face.base import Recognizer
from iddm_core.face.ensemble import FaceEnsembleLoss, ensemble_weights
from iddm_core.face import registry


class ColourRecognizer(Recognizer):
    """Embedding = a fixed linear mix of the crop's mean colour: similarities are computable by hand."""

    input_size = 112
    template = ARCFACE_TEMPLATE_112

    def __init__(self, name, mix):
        super().__init__()
        self.name = name
        self.mix = torch.nn.Parameter(torch.tensor(mix, dtype=torch.float32))

    def forward(self, crops):
        return crops.mean(dim=(2, 3)) @ self.mix.T


class TinyRecognizer(Recognizer):
    """A small random conv net with batch norm (to check eval mode is kept)."""

    input_size = 32
    template = ARCFACE_TEMPLATE_112 * 32 / 112

    def __init__(self, name, seed):
        super().__init__()
        self.name = name
        g = torch.Generator().manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                       torch.nn.Flatten(), torch.nn.Linear(8 * 15 * 15, 16))
        for p in self.net.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.2

    def forward(self, crops):
        return self.net(crops)


MIXES = [np.eye(3), [[1, 0.5, 0], [0, 1, 0], [0, 0, 0.2]], [[0.2, 1, 0], [1, 0, 1], [0, 0.3, 1]]]
LM = torch.tensor(ARCFACE_TEMPLATE_112)[None]   # identity warp on 112 x 112 images


def flat(colour, n=1):
    return torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, 112, 112).clone()


def cos(a, b):
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def _common(s, thresholds, gaps):
    """The common scale by hand: dlib's threshold 0.911 and gap 0.964 - 0.839."""
    return 0.911 + (np.asarray(s) - np.asarray(thresholds)) * (0.125 / np.asarray(gaps))


@pytest.mark.parametrize("scale", ["calibrated", "cosine"])
def test_softmax_weighting_matches_hand_computation(scale):
    ref_colour, test_colour, tau = [0.8, 0.3, 0.1], [0.2, 0.5, 0.6], 0.05
    recs = [ColourRecognizer(f"c{i}", m) for i, m in enumerate(MIXES)]
    loss_fn = FaceEnsembleLoss(recs, tau=tau, scale=scale)
    loss_fn.set_references(flat(ref_colour, 2), LM.expand(2, 5, 2))
    loss, sims = loss_fn(flat(test_colour), LM)
    mix = [np.asarray(m, dtype=float) for m in MIXES]
    s = np.array([cos(m @ test_colour, m @ ref_colour) for m in mix])
    c = _common(s, [0.4] * 3, [0.5] * 3) if scale == "calibrated" else s     # uncalibrated names: 0.4, gap 0.5
    w = np.exp(c / tau) / np.exp(c / tau).sum()
    assert list(sims) == ["c0", "c1", "c2"]
    assert np.allclose([sims[f"c{i}"].item() for i in range(3)], s, atol=1e-5)
    assert math.isclose(loss.item(), 1 + (w * c).sum(), abs_tol=1e-5)
    # The soft maximum leans to the most similar recogniser: S lies between the mean and the max.
    assert c.mean() < loss.item() - 1 <= c.max() + 1e-6
    out = loss_fn.identity_loss(flat(test_colour), LM)
    assert np.allclose([out.weights[f"c{i}"].item() for i in range(3)], w, atol=1e-5)


def test_weights_are_detached():
    recs = [ColourRecognizer(f"c{i}", m) for i, m in enumerate(MIXES)]
    loss_fn = FaceEnsembleLoss(recs, tau=0.05)
    loss_fn.set_references(flat([0.8, 0.3, 0.1]), LM)
    x = flat([0.2, 0.5, 0.6]).requires_grad_(True)
    loss, _ = loss_fn(x, LM)
    (grad,) = torch.autograd.grad(loss, x)
    c = loss_fn.common(loss_fn.similarities(x, LM)[0])
    w = ensemble_weights(c.detach(), 0.05)
    expected = sum(w[m] * torch.autograd.grad(c[m], x, retain_graph=True)[0] for m in range(3))
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-10)
    attached = torch.autograd.grad((torch.softmax(c / 0.05, 0) * c).sum(), x)[0]
    assert (grad - attached).abs().max() > 0.05 * grad.abs().max()


def _named(*names):
    return FaceEnsembleLoss([TinyRecognizer(n, i) for i, n in enumerate(names)], tau=0.03)


def test_calibrated_scale_weighs_recognisers_on_different_cosine_scales():
    """dlib's same-person cosines sit near 0.97, mobileface's near 0.5: on raw cosines dlib took all the weight
    (mobileface < 1e-6, the issue's finding); on the common scale both count while both recognise the person."""
    loss_fn = _named("dlib", "mobileface")
    both_recognise = torch.tensor([[0.97, 0.50]])             # both above their thresholds (0.911, 0.379)
    w = loss_fn.weights(both_recognise)[0]
    assert w.sum().item() == pytest.approx(1.0)
    assert min(w.tolist()) > 0.2
    raw = FaceEnsembleLoss(list(loss_fn.recognizers), tau=0.03, scale="cosine").weights(both_recognise)[0]
    assert raw[1].item() < 1e-5                                 # the old weighting: mobileface ignored
    # dlib already fooled (below its threshold) while mobileface still recognises: dlib stops dominating.
    w = loss_fn.weights(torch.tensor([[0.90, 0.50]]))[0]
    assert w[1] > 0.75 > w[0]
    # and the other way round: mobileface fooled, dlib still above its threshold.
    w = loss_fn.weights(torch.tensor([[0.95, 0.30]]))[0]
    assert w[0] > 0.75 > w[1]


def test_a_dlib_only_ensemble_is_unchanged_by_the_common_scale():
    """The pack's default surrogate defines the common scale: its loss and gradient are bit for bit the raw
    cosine ones (IDDM's default LoRA does not change)."""
    g = torch.Generator().manual_seed(0)
    refs, x = torch.rand(2, 3, 112, 112, generator=g), torch.rand(1, 3, 112, 112, generator=g)
    out = {}
    for scale in ("calibrated", "cosine"):
        loss_fn = FaceEnsembleLoss([TinyRecognizer("dlib", 0)], scale=scale)
        loss_fn.set_references(refs, LM.expand(2, 5, 2))
        xs = x.clone().requires_grad_(True)
        loss, _ = loss_fn(xs, LM)
        out[scale] = (loss.detach(), torch.autograd.grad(loss, xs)[0])
    assert torch.equal(out["calibrated"][0], out["cosine"][0]) and torch.equal(out["calibrated"][1], out["cosine"][1])


def test_calibration_agrees_with_the_evaluation_thresholds():
    from iddm_core.evaluation.judges import MATCH_THRESHOLDS
    from iddm_core.face.ensemble import CALIBRATION

    shared = set(CALIBRATION) & set(MATCH_THRESHOLDS)
    assert {"dlib", "faceres", "mobileface"} <= shared
    for name in shared:
        cal = CALIBRATION[name]
        assert cal.threshold == MATCH_THRESHOLDS[name] and cal.different < cal.threshold < cal.same


def test_transfer_draws_average_over_samples():
    from iddm_core.face.transfer import TransferOptions, draw

    recs = [TinyRecognizer("dlib", 0), TinyRecognizer("mobileface", 1)]
    loss_fn = FaceEnsembleLoss(recs)
    g = torch.Generator().manual_seed(0)
    loss_fn.set_references(torch.rand(2, 3, 112, 112, generator=g), LM.expand(2, 5, 2))
    x = torch.rand(2, 3, 112, 112, generator=g)
    plain = loss_fn.identity_loss(x, LM.expand(2, 5, 2))
    # draws that change nothing (a crop transform practically never chosen, no jitter): the same numbers
    idle = TransferOptions(diversity=1e-9, samples=3)
    same = loss_fn.identity_loss(x, LM.expand(2, 5, 2), draw(idle, [torch.Generator() for _ in range(2)], 5))
    assert same.loss.item() == pytest.approx(plain.loss.item(), abs=1e-6)
    assert all(same.similarity[n].shape == (2,) and torch.allclose(same.similarity[n], plain.similarity[n], atol=1e-6)
               for n in ("dlib", "mobileface"))
    # real jitter and crop changes: other similarities, the same shapes
    busy = TransferOptions(diversity=1.0, jitter=0.05, samples=3)
    moved = loss_fn.identity_loss(x, LM.expand(2, 5, 2), draw(busy, [torch.Generator() for _ in range(2)], 5))
    assert moved.similarity["dlib"].shape == (2,) and moved.weights["dlib"].shape == (2,)
    assert not torch.allclose(moved.similarity["dlib"], plain.similarity["dlib"], atol=1e-4)


@pytest.mark.parametrize("count", [1, 3])
def test_one_or_three_recognisers_with_gradients(count):
    recs = [TinyRecognizer(f"r{i}", seed=i) for i in range(count)]
    loss_fn = FaceEnsembleLoss(recs, tau=0.03)
    loss_fn.train()   # must not put the recognisers in training mode
    assert all(not r.training for r in recs)
    g = torch.Generator().manual_seed(0)
    refs = torch.rand(3, 3, 112, 112, generator=g)
    loss_fn.set_references(refs, LM.expand(3, 5, 2))
    # The references' own mean is close to its prototype; an unrelated image is further away.
    x = torch.rand(2, 3, 112, 112, generator=g).requires_grad_(True)
    loss, sims = loss_fn(x, LM.expand(2, 5, 2))
    bounds = loss_fn.common(torch.tensor([[-1.0] * count, [1.0] * count]))       # cosines -1 and 1, common scale
    assert loss.dim() == 0 and 1 + bounds[0].min().item() <= loss.item() <= 1 + bounds[1].max().item()
    assert sorted(sims) == [f"r{i}" for i in range(count)] and all(v.shape == (2,) for v in sims.values())
    if count == 1:
        assert math.isclose(loss.item(), 1 + loss_fn.common(sims["r0"][:, None]).mean().item(), rel_tol=1e-5)
    loss.backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for r in recs for p in r.parameters())


def test_errors_are_clear():
    with pytest.raises(InputError, match="at least one"):
        FaceEnsembleLoss([])
    with pytest.raises(InputError, match="unique"):
        FaceEnsembleLoss([TinyRecognizer("a", 0), TinyRecognizer("a", 1)])
    with pytest.raises(InputError, match="tau"):
        FaceEnsembleLoss([TinyRecognizer("a", 0)], tau=0)
    with pytest.raises(InputError, match="scale"):
        FaceEnsembleLoss([TinyRecognizer("a", 0)], scale="zscore")
    loss_fn = FaceEnsembleLoss([TinyRecognizer("a", 0)])
    with pytest.raises(InputError, match="set_references"):
        loss_fn(torch.rand(1, 3, 112, 112), LM)
    with pytest.raises(InputError, match="landmarks"):
        loss_fn.set_references(torch.rand(2, 3, 112, 112), LM)


# --- registry ---------------------------------------------------------------------------------------------------

def test_discover_lists_installed_and_missing(tmp_path):
    (tmp_path / "insightface/models/buffalo_l").mkdir(parents=True)
    (tmp_path / "insightface/models/buffalo_l/w600k_r50.onnx").write_bytes(b"x")
    (tmp_path / "facerecognition").mkdir()
    (tmp_path / "facerecognition/20180402-114759-vggface2.pt").write_bytes(b"x")
    specs = {s.name: s for s in registry.discover([str(tmp_path / "nothing"), str(tmp_path)])}
    assert specs["dlib"].available and specs["dlib"].kind == "dlib"
    assert specs["arcface"].available and specs["arcface"].path.endswith("w600k_r50.onnx")
    assert specs["facenet_vggface2"].available and specs["facenet_vggface2"].kind == "zoo"
    assert not specs["facenet"].available
    assert not specs["irse50"].available
    assert "irse50.pth" in specs["irse50"].hint and "facerecognition" in specs["irse50"].hint
    assert "antelopev2" in specs["glintr100"].hint


def test_parse_surrogates(tmp_path):
    model = tmp_path / "my irse50.pth"
    model.write_bytes(b"x")
    specs = registry.parse_surrogates(f"dlib, irse50:{model}")
    assert [(s.name, s.kind, s.path) for s in specs] == [("dlib", "dlib", None), ("irse50", "zoo", str(model))]
    with pytest.raises(InputError, match="'vgg'"):
        registry.parse_surrogates("dlib,vgg")
    with pytest.raises(InputError, match="missing.pth"):
        registry.parse_surrogates(f"irse50:{tmp_path / 'missing.pth'}")
    with pytest.raises(InputError, match="ir152.pth"):
        registry.parse_surrogates("ir152", search_dirs=[str(tmp_path)])
    with pytest.raises(InputError, match=".onnx"):
        registry.parse_surrogates(f"arcface:{model}")
    with pytest.raises(InputError, match="twice"):
        registry.parse_surrogates("dlib,dlib")
    with pytest.raises(InputError):
        registry.parse_surrogates(" , ")


def test_load_unavailable_raises_model_error():
    spec = registry.find("ir152", [])
    with pytest.raises(ModelError, match="ir152"):
        registry.load_recognizer(spec)


def test_load_recognizer_from_a_saved_zoo_checkpoint(tmp_path):
    from iddm_core.face.zoo import build_zoo_model

    torch.manual_seed(0)
    original = build_zoo_model("mobileface_zoo")
    path = tmp_path / "facerecognition" / "mobile_face.pth"
    path.parent.mkdir()
    torch.save(original.state_dict(), path)
    (spec,) = registry.parse_surrogates("mobile_face", search_dirs=[str(tmp_path)])
    assert spec.path == str(path) and spec.name == "mobileface_zoo" and spec.kind == "zoo"
    model = registry.load_recognizer(spec, "cpu")
    assert model.name == "mobileface_zoo" and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    crops = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(model(crops), original(crops), atol=1e-5)
