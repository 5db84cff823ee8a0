"""insightface ArcFace recognisers (``w600k_r50.onnx``, ``glintr100.onnx``, ...) made differentiable in PyTorch.

onnxruntime gives no gradients, and PGD needs the gradient of the embedding with respect to the pixels. The
files are plain feed-forward graphs (IResNet: Conv / BatchNormalization / PRelu / Add, then Flatten and a
Gemm), so instead of re-declaring the architecture we *interpret* the graph in torch: :class:`OnnxGraph`
keeps every initializer as a buffer and runs the nodes in their (topological) file order with torch ops.
That works for any depth (r18 ... r100), for exports that folded BatchNorm into the convolutions and for the
older MXNet conversions, and no weight renaming can go wrong. Only the operators listed in ``OPS`` are
known; an unknown one is reported, with the file, when the model is loaded — not halfway through a run.

Input convention (as insightface's ``ArcFaceONNX`` does it): the network takes RGB 112x112 crops as
``(pixel - 127.5) / 127.5``, unless the graph starts with its own ``Sub``/``Mul`` normalisation, in which
case it takes raw 0..255 pixels.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .align import template_for
from .base import Recognizer
from .zoo import resize_and_normalise

# ------------------------------------------------------------------------------------------------ operators
# Each operator takes (inputs, attributes) and returns a tensor or a tuple of tensors. Missing optional inputs
# (empty names in the graph) arrive as None.

OpFn = Callable[[list, dict], object]
OPS: dict[str, OpFn] = {}

ONNX_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
               9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def registrar(table: dict):
    """``@op("Name", ...)`` decorators that file an op implementation under its graph names in ``table`` (the
    ONNX interpreter here, the TF.js one in tfjs_graph)."""
    def op(*names: str):
        def register(fn):
            for name in names:
                table[name] = fn
            return fn
        return register
    return op


op = registrar(OPS)


def _ints(t) -> list[int]:
    """A shape/axes operand (tensor, list or None) as Python ints."""
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def _axes(ins: list, at: dict, index: int = 1) -> list[int] | None:
    """``axes`` from the attribute (old opsets) or from input ``index`` (newer opsets); None when absent."""
    if "axes" in at:
        return list(at["axes"])
    if len(ins) > index and ins[index] is not None:
        return _ints(ins[index])
    return None


def _split_pads(pads: list[int], spatial: int) -> tuple[list[int], list[int]]:
    pads = pads or [0] * (2 * spatial)
    return pads[:spatial], pads[spatial:]


def _torch_pad(begin: list[int], end: list[int]) -> list[int]:
    """ONNX [b1, b2, e1, e2] -> F.pad's order (last dimension first)."""
    out = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


def _check_auto_pad(at: dict) -> None:
    auto = at.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "VALID"):
        raise ModelError(f"auto_pad={auto} is not supported; re-export the model with explicit pads")


@op("Conv")
def _conv(ins, at):
    x, w = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    _check_auto_pad(at)
    spatial = w.dim() - 2
    if spatial != 2:
        raise ModelError(f"only 2-D convolutions are supported, got a {spatial}-D one")
    begin, end = _split_pads(list(at.get("pads", [])), spatial)
    if begin != end:
        x, begin = F.pad(x, _torch_pad(begin, end)), [0] * spatial
    return F.conv2d(x, w, bias, stride=tuple(at.get("strides", [1, 1])), padding=tuple(begin),
                    dilation=tuple(at.get("dilations", [1, 1])), groups=int(at.get("group", 1)))


@op("BatchNormalization")
def _batchnorm(ins, at):
    x, scale, bias, mean, var = ins[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=float(at.get("epsilon", 1e-5)))


@op("PRelu")
def _prelu(ins, at):
    x, slope = ins
    return torch.where(x >= 0, x, x * slope)


@op("LeakyRelu")
def _leaky(ins, at):
    return F.leaky_relu(ins[0], float(at.get("alpha", 0.01)))


def _pool_padding(x, at, fill: float):
    begin, end = _split_pads(list(at.get("pads", [])), 2)
    if begin != end:
        return F.pad(x, _torch_pad(begin, end), value=fill), (0, 0)
    return x, tuple(begin)


@op("MaxPool")
def _maxpool(ins, at):
    _check_auto_pad(at)
    x, pad = _pool_padding(ins[0], at, float("-inf"))
    k = tuple(at["kernel_shape"])
    return F.max_pool2d(x, k, tuple(at.get("strides", k)), pad, tuple(at.get("dilations", [1, 1])),
                        ceil_mode=bool(at.get("ceil_mode", 0)))


@op("AveragePool")
def _avgpool(ins, at):
    _check_auto_pad(at)
    x, pad = _pool_padding(ins[0], at, 0.0)
    k = tuple(at["kernel_shape"])
    return F.avg_pool2d(x, k, tuple(at.get("strides", k)), pad, ceil_mode=bool(at.get("ceil_mode", 0)),
                        count_include_pad=bool(at.get("count_include_pad", 0)))


@op("GlobalAveragePool")
def _gap(ins, at):
    x = ins[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@op("Gemm")
def _gemm(ins, at):
    a, b = ins[0], ins[1]
    c = ins[2] if len(ins) > 2 else None
    a = a.transpose(0, 1) if at.get("transA", 0) else a
    b = b.transpose(0, 1) if at.get("transB", 0) else b
    y = float(at.get("alpha", 1.0)) * (a @ b)
    return y if c is None else y + float(at.get("beta", 1.0)) * c


def _integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


def _div(a, b):
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _integer(a) and _integer(b):
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


_ELEMENTWISE = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b, "Div": _div,
    "Pow": torch.pow, "MatMul": torch.matmul,
}
for _name, _fn in _ELEMENTWISE.items():
    OPS[_name] = (lambda f: lambda ins, at: f(ins[0], ins[1]))(_fn)

_UNARY = {"Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Sqrt": torch.sqrt, "Exp": torch.exp,
          "Neg": torch.neg, "Abs": torch.abs, "Floor": torch.floor}
for _name, _fn in _UNARY.items():
    OPS[_name] = (lambda f: lambda ins, at: f(ins[0]))(_fn)


@op("Identity", "Dropout")
def _identity(ins, at):
    return ins[0]


@op("Flatten")
def _flatten(ins, at):
    x = ins[0]
    axis = int(at.get("axis", 1)) % (x.dim() + 1) if x.dim() else 0
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return x.reshape(lead, -1)


@op("Reshape")
def _reshape(ins, at):
    x, shape = ins[0], _ints(ins[1])
    if not at.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@op("Transpose")
def _transpose(ins, at):
    x = ins[0]
    return x.permute(*at.get("perm", list(range(x.dim()))[::-1]))


@op("Concat")
def _concat(ins, at):
    return torch.cat([t for t in ins if t is not None], dim=int(at["axis"]))


@op("Shape")
def _shape(ins, at):
    x = ins[0]
    dims = list(x.shape)[int(at.get("start", 0)):at.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


@op("Gather")
def _gather(ins, at):
    x, idx = ins[0], ins[1].long()
    axis = int(at.get("axis", 0)) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    picked = torch.index_select(x, axis, idx.reshape(-1).to(x.device))
    return picked.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


@op("Unsqueeze")
def _unsqueeze(ins, at):
    x, axes = ins[0], _axes(ins, at)
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


@op("Squeeze")
def _squeeze(ins, at):
    x, axes = ins[0], _axes(ins, at)
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


@op("Cast")
def _cast(ins, at):
    return ins[0].to(ONNX_DTYPES[int(at["to"])])


@op("Slice")
def _slice(ins, at):
    x = ins[0]
    if "starts" in at:  # opset < 10
        starts, ends, axes, steps = list(at["starts"]), list(at["ends"]), at.get("axes"), None
    else:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else None
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else None
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st <= 0:
            raise ModelError("Slice with a non-positive step is not supported")
        index[a % x.dim()] = slice(s, e, st)
    return x[tuple(index)]


def _reduce(fn):
    def run(ins, at):
        x, axes = ins[0], _axes(ins, at)
        dims = tuple(range(x.dim())) if not axes else tuple(a % x.dim() for a in axes)
        return fn(x, dims, bool(at.get("keepdims", 1)))
    return run


OPS["ReduceMean"] = _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k))
OPS["ReduceSum"] = _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k))
OPS["ReduceL2"] = _reduce(lambda x, d, k: x.pow(2).sum(dim=d, keepdim=k).sqrt())


@op("Clip")
def _clip(ins, at):
    lo = ins[1] if len(ins) > 1 and ins[1] is not None else at.get("min")
    hi = ins[2] if len(ins) > 2 and ins[2] is not None else at.get("max")
    lo = float(lo) if lo is not None else None
    hi = float(hi) if hi is not None else None
    return torch.clamp(ins[0], lo, hi)


@op("Softmax")
def _softmax(ins, at):
    return torch.softmax(ins[0], dim=int(at.get("axis", -1)))


@op("Pad")
def _pad(ins, at):
    x = ins[0]
    mode = at.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = list(at["pads"]) if "pads" in at else _ints(ins[1])
    value = float(at.get("value", 0.0)) if len(ins) < 3 or ins[2] is None else float(ins[2])
    begin, end = pads[:x.dim()], pads[x.dim():]
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[mode]
    return F.pad(x, _torch_pad(begin, end), mode=torch_mode, value=value if torch_mode == "constant" else None)


@op("ConstantOfShape")
def _constant_of_shape(ins, at):
    fill = at.get("value")
    fill = fill if fill is not None else torch.zeros(1)
    return torch.full(_ints(ins[0]), fill.reshape(-1)[0].item(), dtype=fill.dtype, device=ins[0].device)


# -------------------------------------------------------------------------------------------- interpreter


def _attributes(node) -> dict:
    """Node attributes as Python values; tensor attributes become torch tensors."""
    from onnx import helper, numpy_helper

    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if hasattr(value, "dims"):  # TensorProto
            value = torch.from_numpy(np.array(numpy_helper.to_array(value)))
        out[attr.name] = value
    return out


def _constant_value(at: dict) -> torch.Tensor:
    if "value" in at:
        return at["value"]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in at:
            return torch.tensor(at[key], dtype=dtype)
    raise ModelError(f"unsupported Constant node attributes {sorted(at)}")


class OnnxGraph(nn.Module):
    """A torch module that evaluates an ONNX graph node by node (inference semantics, differentiable).

    Initializers and ``Constant`` nodes become buffers, so ``.to(device)`` moves the weights and the module
    can be saved as a normal state dict. ``forward(*inputs)`` takes the graph's real inputs in order.
    """

    def __init__(self, graph, source: str = "model"):
        super().__init__()
        from onnx import numpy_helper

        self._const: dict[str, str] = {}
        for tensor in graph.initializer:
            self._add_constant(tensor.name, torch.from_numpy(np.array(numpy_helper.to_array(tensor))))
        unknown = sorted({n.op_type for n in graph.node if n.op_type not in OPS and n.op_type != "Constant"})
        if unknown:
            raise ModelError(f"{source} uses ONNX operators this converter does not know: {', '.join(unknown)}")
        self._nodes = []
        for node in graph.node:
            at = _attributes(node)
            if node.op_type in ("Conv", "MaxPool", "AveragePool"):
                try:
                    _check_auto_pad(at)
                except ModelError as exc:
                    raise ModelError(f"{source}: node {node.name or node.op_type}: {exc}") from None
            if node.op_type == "Constant":
                self._add_constant(node.output[0], _constant_value(at))
                continue
            self._nodes.append((node.op_type, list(node.input), list(node.output), at))
        self.input_names = [i.name for i in graph.input if i.name not in self._const]
        self.output_names = [o.name for o in graph.output]
        self._release = self._release_plan()

    def _release_plan(self) -> list[list[str]]:
        """For each node, the intermediate values read for the last time there. Dropping them from the
        environment lets inference without gradients run in the memory of a few layers, not of all of them."""
        last_use = {}
        for index, (_, names_in, _, _) in enumerate(self._nodes):
            for name in names_in:
                last_use[name] = index
        keep = set(self.output_names) | set(self._const)
        plan = [[] for _ in self._nodes]
        for name, index in last_use.items():
            if name and name not in keep:
                plan[index].append(name)
        return plan

    def _add_constant(self, name: str, value: torch.Tensor) -> None:
        attr = f"const_{len(self._const)}"
        self.register_buffer(attr, value.clone() if not value.is_floating_point() else value.float())
        self._const[name] = attr

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise ValueError(f"graph takes {len(self.input_names)} inputs, got {len(inputs)}")
        env = dict(zip(self.input_names, inputs))
        for name, attr in self._const.items():
            env[name] = getattr(self, attr)
        for (op_type, names_in, names_out, at), release in zip(self._nodes, self._release):
            result = OPS[op_type]([env[n] if n else None for n in names_in], at)
            if isinstance(result, tuple):
                env.update(zip(names_out, result))
            else:
                env[names_out[0]] = result
            for name in release:
                env.pop(name, None)
        outs = tuple(env[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs


# --------------------------------------------------------------------------------------------- recogniser


def load_onnx_model(path: str | os.PathLike):
    """The ONNX ModelProto of ``path``, or a ModelError that names the file."""
    from ..requirements_check import require

    require("onnx")   # not installed (A1111 1.10 pins protobuf 3.20.0, which onnx 1.13+ refuses): says what to do
    import onnx

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"ONNX model {path} does not exist")
    try:
        return onnx.load(path)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelError(f"cannot read ONNX model {path}: {type(exc).__name__}: {exc}") from exc


def input_normalisation(graph) -> tuple[float, float]:
    """(mean, std) the caller must apply to 0..255 pixels, found the way insightface's ArcFaceONNX does:
    a graph that starts with its own Sub and Mul (MXNet-era exports) takes raw pixels, (0, 1); others expect
    (127.5, 127.5). Both node names and operator types are checked, since exporters differ in naming.
    """
    head = list(graph.node[:8])
    has_sub = any(n.op_type == "Sub" or n.name.startswith(("Sub", "_minus")) for n in head)
    has_mul = any(n.op_type == "Mul" or n.name.startswith(("Mul", "_mul")) for n in head)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


def graph_input_size(graph, source: str, default: int = 112) -> int:
    """Square input side from the first real input's NCHW shape (``default`` when the size is symbolic)."""
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"{source}: a recogniser must have one image input, found {len(inputs)}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] not in (3, None):
        raise ModelError(f"{source}: expected an NCHW input with 3 channels, got shape {dims}")
    h, w = dims[2], dims[3]
    if h is not None and w is not None and h != w:
        raise ModelError(f"{source}: expected a square input, got {h}x{w}")
    return h or w or default


class OnnxRecognizer(Recognizer):
    """An insightface ArcFace ONNX model as a differentiable Recognizer (RGB, ArcFace template)."""

    def __init__(self, graph: OnnxGraph, name: str, input_size: int, mean: float, std: float):
        super().__init__()
        self.graph = graph
        self.name = name
        self.input_size = int(input_size)
        self.template = template_for(self.input_size)
        self.mean, self.std = float(mean), float(std)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        crops = resize_and_normalise(crops, self.input_size, 1.0, 0.0)   # shape check + resize; exact
        return self.graph((crops * 255.0 - self.mean) / self.std)


def load_onnx_recognizer(path: str | os.PathLike, name: str | None = None,
                         device: str | torch.device = "cpu") -> OnnxRecognizer:
    """An insightface ArcFace ``.onnx`` file as a frozen, eval-mode torch Recognizer on ``device``.

    ``name`` defaults to the file's stem (e.g. "w600k_r50"), which names a public model, not a person.
    """
    model = load_onnx_model(path)
    source = os.fspath(path)
    graph = model.graph
    mean, std = input_normalisation(graph)
    size = graph_input_size(graph, source)
    module = OnnxGraph(graph, source)
    if len(module.output_names) != 1:
        raise ModelError(f"{source}: a recogniser must have one output, found {len(module.output_names)}")
    rec = OnnxRecognizer(module, name or Path(source).stem, size, mean, std)
    rec.requires_grad_(False)
    return rec.to(device).eval()
