import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from iddm_core.errors import Cancelled, InputError
from iddm_core.face.align import ARCFACE_TEMPLATE_112
from iddm_core.face.attack import face_attack, sign_pgd_step
from iddm_core.face.base import Recognizer
from iddm_core.face.ensemble import FaceEnsembleLoss


class TinyRecognizer(Recognizer):
    input_size = 32
    template = ARCFACE_TEMPLATE_112 * 32 / 112
    name = "tiny"

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, 2), torch.nn.Tanh(), torch.nn.Flatten(),
                                       torch.nn.Linear(8 * 14 * 14, 16))
        for p in self.net.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    def forward(self, crops):
        return self.net(crops)


def test_sign_pgd_step_descends_projects_and_clips():
    x0 = torch.tensor([0.5, 0.5, 0.02, 0.99, 0.5])
    x = torch.tensor([0.5, 0.57, 0.02, 0.99, 0.43])
    grad = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0])
    out = sign_pgd_step(x0, x, grad, alpha=0.05, eta=0.08)
    # descend; project back to x0 +- eta; clip at 0 and 1; zero gradient: no move.
    assert torch.allclose(out, torch.tensor([0.45, 0.58, 0.0, 1.0, 0.43]), atol=1e-6)
    assert (out - x0).abs().max() <= 0.08 + 1e-7


def _tiny_loss(x_ref, lm):
    loss_fn = FaceEnsembleLoss([TinyRecognizer()], tau=0.03)
    loss_fn.set_references(x_ref, lm)
    return loss_fn


def test_face_attack_lowers_similarity_within_budget():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 3, 64, 64, generator=g)
    lm = torch.tensor(ARCFACE_TEMPLATE_112 * 0.5)[None] + 4.0
    loss_fn = _tiny_loss(x0, lm)            # the image is its own reference: similarity starts at 1
    events = []
    result = face_attack(x0, lm, loss_fn, eta=0.05, alpha=0.01, steps=6, callback=events.append)
    assert result.image.shape == x0.shape
    assert (result.image - x0).abs().max() <= 0.05 + 1e-6
    assert 0 <= result.image.min() and result.image.max() <= 1
    assert result.history[0]["similarity"]["tiny"] == pytest.approx(1.0, abs=1e-4)
    assert result.final["similarity"]["tiny"] < result.history[0]["similarity"]["tiny"] - 0.05
    assert [e.t for e in events] == list(range(1, 7)) and all(e.phase == "pgd" for e in events)
    assert events[-1].done == events[-1].total == 6 and "tiny" in events[-1].similarity


def test_face_attack_cancel_and_bad_budget():
    x0 = torch.rand(1, 3, 64, 64)
    lm = torch.tensor(ARCFACE_TEMPLATE_112 * 0.5)[None]
    loss_fn = _tiny_loss(x0, lm)

    def cancel(ev):
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        face_attack(x0, lm, loss_fn, steps=3, callback=cancel)
    with pytest.raises(InputError, match="alpha"):
        face_attack(x0, lm, loss_fn, eta=0.01, alpha=0.02)
    with pytest.raises(InputError, match="eta"):
        face_attack(x0, lm, loss_fn, eta=0.0)


def test_face_models_cli_lists_dlib_and_hints(tmp_path):
    out = subprocess.run([sys.executable, "-m", "iddm_core", "face-models", "--dir", str(tmp_path), "--json"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    specs = {s["name"]: s for s in json.loads(out.stdout)}
    assert specs["dlib"]["available"]
    assert not specs["irse50"]["available"] and str(tmp_path / "facerecognition" / "irse50.pth") in specs["irse50"]["hint"]
