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


def test_softmax_weighting_matches_hand_computation():
    ref_colour, test_colour, tau = [0.8, 0.3, 0.1], [0.2, 0.5, 0.6], 0.05
    recs = [ColourRecognizer(f"c{i}", m) for i, m in enumerate(MIXES)]
    loss_fn = FaceEnsembleLoss(recs, tau=tau)
    loss_fn.set_references(flat(ref_colour, 2), LM.expand(2, 5, 2))
    loss, sims = loss_fn(flat(test_colour), LM)
    mix = [np.asarray(m, dtype=float) for m in MIXES]
    s = np.array([cos(m @ test_colour, m @ ref_colour) for m in mix])
    w = np.exp(s / tau) / np.exp(s / tau).sum()
    assert list(sims) == ["c0", "c1", "c2"]
    assert np.allclose([sims[f"c{i}"].item() for i in range(3)], s, atol=1e-5)
    assert math.isclose(loss.item(), 1 + (w * s).sum(), abs_tol=1e-5)
    # The soft maximum leans to the most similar recogniser: S lies between the mean and the max.
    assert s.mean() < loss.item() - 1 <= s.max() + 1e-6


def test_weights_are_detached():
    recs = [ColourRecognizer(f"c{i}", m) for i, m in enumerate(MIXES)]
    loss_fn = FaceEnsembleLoss(recs, tau=0.05)
    loss_fn.set_references(flat([0.8, 0.3, 0.1]), LM)
    x = flat([0.2, 0.5, 0.6]).requires_grad_(True)
    loss, _ = loss_fn(x, LM)
    (grad,) = torch.autograd.grad(loss, x)
    s = loss_fn.similarities(x, LM)[0]
    w = ensemble_weights(s.detach(), 0.05)
    expected = sum(w[m] * torch.autograd.grad(s[m], x, retain_graph=True)[0] for m in range(3))
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-10)
    attached = torch.autograd.grad((torch.softmax(s / 0.05, 0) * s).sum(), x)[0]
    assert (grad - attached).abs().max() > 0.05 * grad.abs().max()


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
    assert loss.dim() == 0 and 0.0 <= loss.item() <= 2.0
    assert sorted(sims) == [f"r{i}" for i in range(count)] and all(v.shape == (2,) for v in sims.values())
    if count == 1:
        assert math.isclose(loss.item(), 1 + sims["r0"].mean().item(), rel_tol=1e-5)
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
