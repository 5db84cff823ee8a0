"""The zoo architectures round-trip through checkpoint files and reject the wrong ones clearly."""
import numpy as np
import pytest
import torch

from iddm_core.errors import ModelError
from iddm_core.face.base import Recognizer
from iddm_core.face.zoo import (
    build_zoo_model,
    load_zoo_recognizer,
    read_state_dict,
    resize_and_normalise,
)

# name -> (input side, classifier classes stored in the file)
ZOO = {"irse50": (112, None), "ir152": (112, None), "mobileface_zoo": (112, None), "facenet": (160, 8631)}


def _randomise_norm_stats(model: torch.nn.Module, seed: int) -> None:
    """Random BN statistics and affine terms, so that a model that failed to load would give other outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", list(ZOO))
def test_roundtrip_strict_identical_outputs(name, tmp_path):
    size, classes = ZOO[name]
    torch.manual_seed(0)
    model = build_zoo_model(name, num_classes=classes)
    _randomise_norm_stats(model, 1)
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)

    loaded = load_zoo_recognizer(name, path)
    assert isinstance(loaded, Recognizer)
    assert loaded.name == name and loaded.input_size == size
    assert loaded.template.shape == (5, 2) and np.all(loaded.template > 0) and np.all(loaded.template < size)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())

    batch = 1 if name == "ir152" else 2  # IR-152 is big; one crop is enough to compare it
    crops = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = model(crops), loaded(crops)
    assert got.shape == (batch, 512)
    # The loader builds its module with fresh random weights; only a complete load reproduces the outputs.
    assert torch.equal(want, got)
    if batch > 1:
        assert not torch.allclose(got[0], got[1], atol=1e-4), "different crops must give different embeddings"


def test_gradients_reach_crops_through_frozen_model(tmp_path):
    model = build_zoo_model("mobileface_zoo")
    _randomise_norm_stats(model, 3)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    loaded = load_zoo_recognizer("mobile_face", tmp_path / "m.pth")
    crops = torch.rand(2, 3, 112, 112, requires_grad=True)
    emb = torch.nn.functional.normalize(loaded(crops), dim=-1)
    (emb[0] * emb[1]).sum().backward()
    assert crops.grad is not None and torch.isfinite(crops.grad).all() and crops.grad.abs().sum() > 0
    assert all(p.grad is None for p in loaded.parameters())


def test_facenet_gradients_and_resize():
    """FaceNet resizes other crop sizes to 160 itself, differentiably."""
    model = build_zoo_model("facenet")
    crops = torch.rand(1, 3, 112, 112, requires_grad=True)
    out = model(crops)
    assert out.shape == (1, 512)
    out.pow(2).sum().backward()
    assert crops.grad.abs().sum() > 0


def test_preprocessing_ranges():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    ir = resize_and_normalise(x, 4, 2.0, -1.0)
    assert torch.allclose(ir[0, :, 0, 0], torch.tensor([-1.0, 0.0, 1.0]))
    fn = resize_and_normalise(x, 8, 255.0 / 128.0, -127.5 / 128.0)
    assert fn.shape == (1, 3, 8, 8)
    assert torch.allclose(fn[0, :, 3, 3], (torch.tensor([0.0, 127.5, 255.0]) - 127.5) / 128.0)


def test_wrapped_prefixed_and_old_checkpoints_load(tmp_path):
    model = build_zoo_model("mobileface_zoo")
    _randomise_norm_stats(model, 4)
    # DataParallel prefix, {"state_dict": ...} wrapper, and no num_batches_tracked (pre-0.4.1 files)
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"epoch": 3, "arch": "mobilefacenet", "best_acc": 0.9, "optimizer": {"lr": 0.1}, "state_dict": state},
               tmp_path / "wrapped.pth")
    loaded = load_zoo_recognizer("mobileface_zoo", tmp_path / "wrapped.pth")
    crops = torch.rand(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(model(crops), loaded(crops))


def test_facenet_without_logits_loads(tmp_path):
    model = build_zoo_model("facenet")
    torch.save(model.state_dict(), tmp_path / "nologits.pt")
    loaded = load_zoo_recognizer("facenet_vggface2", tmp_path / "nologits.pt")
    assert loaded.name == "facenet_vggface2" and not hasattr(loaded, "logits")


def test_wrong_architecture_names_file_and_keys(tmp_path):
    path = tmp_path / "mobile_face.pth"
    torch.save(build_zoo_model("mobileface_zoo").state_dict(), path)
    with pytest.raises(ModelError) as info:
        load_zoo_recognizer("irse50", path)
    msg = str(info.value)
    assert str(path) in msg and "irse50" in msg
    assert "missing" in msg and "input_layer.0.weight" in msg
    assert "unexpected" in msg and "conv1.conv.weight" in msg
    assert "more)" in msg  # long lists are cut to the first few


def test_shape_mismatch_is_reported(tmp_path):
    state = build_zoo_model("mobileface_zoo").state_dict()
    state["linear.weight"] = torch.zeros(128, 512)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"shape mismatch: linear\.weight: file \(128, 512\) vs model \(512, 512\)"):
        load_zoo_recognizer("mobileface_zoo", path)


def test_unreadable_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="garbage.pth"):
        read_state_dict(garbage)
    with pytest.raises(ModelError, match="absent.pth"):
        load_zoo_recognizer("ir152", tmp_path / "absent.pth")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "notensors.pth")
    with pytest.raises(ModelError, match="notensors.pth"):
        read_state_dict(tmp_path / "notensors.pth")
    with pytest.raises(ModelError, match="unknown zoo recogniser"):
        build_zoo_model("resnet9000")
