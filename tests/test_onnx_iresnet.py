"""A small random insightface-style IResNet, exported to ONNX, must come back as a torch Recognizer that
matches onnxruntime and lets gradients reach the pixels."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from iddm_core.errors import ModelError
from iddm_core.face.onnx_iresnet import OnnxGraph, input_normalisation, load_onnx_recognizer

# The stand-in models are exported with the TorchScript exporter (no onnxscript here); its deprecation
# notice is expected.
pytestmark = [pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")]


class IBlock(nn.Module):
    """insightface's IBasicBlock: BN-Conv-BN-PReLU-Conv(stride)-BN plus a (strided 1x1 conv + BN) shortcut."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)
        self.bn2, self.prelu = nn.BatchNorm2d(c_out), nn.PReLU(c_out)
        self.conv2, self.bn3 = nn.Conv2d(c_out, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x)))))) + self.down(x)


class TinyIResNet(nn.Module):
    """Stem conv-BN-PReLU, three stride-2 blocks, then BN-Dropout-Flatten-FC-BN1d features (16-D)."""

    def __init__(self, baked_normalisation=False, view_flatten=False):
        super().__init__()
        self.baked, self.view_flatten = baked_normalisation, view_flatten
        self.conv1, self.bn1, self.prelu = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.PReLU(8)
        self.layers = nn.Sequential(IBlock(8, 8, 2), IBlock(8, 16, 2), IBlock(16, 16, 2))
        self.bn2, self.dropout = nn.BatchNorm2d(16), nn.Dropout(0.4)
        self.fc, self.features = nn.Linear(16 * 14 * 14, 16), nn.BatchNorm1d(16)

    def forward(self, x):
        if self.baked:  # MXNet-era exports normalise inside the graph and take 0..255 pixels
            x = (x - 127.5) * 0.0078125
        x = self.layers(self.prelu(self.bn1(self.conv1(x))))
        x = self.dropout(self.bn2(x))
        x = x.view(x.shape[0], -1) if self.view_flatten else torch.flatten(x, 1)
        return self.features(self.fc(x))


def _random_model(seed, **kw):
    torch.manual_seed(seed)
    model = TinyIResNet(**kw)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
        if isinstance(m, nn.PReLU):
            m.weight.data.uniform_(0.05, 0.4)
    return model.eval()


def _export(model, path):
    torch.onnx.export(model, (torch.rand(1, 3, 112, 112) * 255,), str(path), dynamo=False,
                      input_names=["input.1"], output_names=["embedding"], dynamic_axes={"input.1": {0: "None"}},
                      opset_version=11)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    plain = _export(_random_model(0), d / "w600k_tiny.onnx")
    baked = _export(_random_model(1, baked_normalisation=True, view_flatten=True), d / "baked.onnx")
    return plain, baked


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy().astype(np.float32)})[0]


@pytest.mark.parametrize("which", ["plain", "baked"])
def test_matches_onnxruntime(exported, which):
    path = exported[0] if which == "plain" else exported[1]
    rec = load_onnx_recognizer(path)
    assert rec.input_size == 112 and rec.template.shape == (5, 2)
    crops = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(5))
    if which == "plain":
        assert (rec.mean, rec.std) == (127.5, 127.5)
        net_in = (crops * 255 - 127.5) / 127.5
    else:
        assert (rec.mean, rec.std) == (0.0, 1.0)
        net_in = crops * 255
    want = _ort(path, net_in)
    with torch.no_grad():
        got = rec(crops).numpy()
    assert got.shape == (3, 16)
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(want).max() > 0.1  # a non-trivial output, so the comparison means something


def test_normalisation_detection(exported):
    plain, baked = (onnx.load(str(p)).graph for p in exported)
    assert input_normalisation(plain) == (127.5, 127.5)
    assert input_normalisation(baked) == (0.0, 1.0)
    ops = {n.op_type for n in baked.node}
    assert {"Shape", "Gather", "Reshape"} & ops, "the view() export should exercise the shape operators"


def test_gradients_reach_input(exported):
    rec = load_onnx_recognizer(exported[0], name="arc")
    assert rec.name == "arc" and not any(p.requires_grad for p in rec.parameters())
    crops = torch.rand(2, 3, 112, 112, requires_grad=True)
    emb = torch.nn.functional.normalize(rec(crops), dim=-1)
    (emb[0] @ emb[1]).backward()
    assert torch.isfinite(crops.grad).all() and crops.grad.abs().sum() > 0


def test_default_name_is_file_stem_and_resizes(exported):
    rec = load_onnx_recognizer(exported[0])
    assert rec.name == "w600k_tiny"
    crops = torch.rand(1, 3, 128, 128)
    small = torch.nn.functional.interpolate(crops, size=(112, 112), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.allclose(rec(crops), rec(small))


def test_state_dict_roundtrip(exported):
    """The interpreted graph keeps weights as buffers: a saved state dict restores them."""
    a, b = load_onnx_recognizer(exported[0]), load_onnx_recognizer(exported[0])
    for buf in b.buffers():
        if buf.is_floating_point():
            buf.add_(1.0)
    crops = torch.rand(1, 3, 112, 112)
    with torch.no_grad():
        assert not torch.allclose(a(crops), b(crops))
        b.load_state_dict(a.state_dict())
        assert torch.equal(a(crops), b(crops))


def _graph_with(op_type, path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 112, 112])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 112, 112])
    node = helper.make_node(op_type, ["x"], ["y"], size=3)
    onnx.save(helper.make_model(helper.make_graph([node], "g", [x], [y])), str(path))
    return path


def test_unknown_operator_and_bad_files(tmp_path):
    path = _graph_with("LRN", tmp_path / "odd.onnx")
    with pytest.raises(ModelError, match=r"odd\.onnx.*LRN"):
        load_onnx_recognizer(path)
    with pytest.raises(ModelError, match="absent.onnx"):
        load_onnx_recognizer(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01 definitely not protobuf" * 10)
    with pytest.raises(ModelError, match="junk.onnx"):
        load_onnx_recognizer(tmp_path / "junk.onnx")


def test_interpreter_misc_ops():
    """Operators IResNet exports use besides the convolution stack, checked against torch directly."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Constant", [], ["slope"], value=helper.make_tensor("s", TensorProto.FLOAT, [4, 1, 1],
                                                                          [0.1, 0.2, 0.3, 0.4])),
        helper.make_node("PRelu", ["x", "slope"], ["p"]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Transpose", ["f"], ["t"], perm=[1, 0]),
        helper.make_node("Gemm", ["f", "t"], ["y"], transB=0, alpha=2.0),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y])
    module = OnnxGraph(graph)
    inp = torch.randn(2, 4, 3, 3)
    slope = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(4, 1, 1)
    f = torch.where(inp >= 0, inp, inp * slope).mean(dim=(2, 3))
    assert torch.allclose(module(inp), 2.0 * f @ f.T, atol=1e-6)
