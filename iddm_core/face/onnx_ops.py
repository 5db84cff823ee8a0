"""The ONNX operators face/onnx_iresnet.py's graph interpreter knows, as torch functions (inference semantics).

Each operator takes (inputs, attributes) and returns a tensor or a tuple of tensors; missing optional inputs
(empty names in the graph) arrive as None. ``OPS`` maps an ONNX op type to its function: a graph using any
other operator is refused when it is loaded. :func:`registrar` (the ``@op`` decorator factory) is shared with the
TensorFlow.js interpreter (face/tfjs_ops.py).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelError

OpFn = Callable[[list, dict], object]
OPS: dict[str, OpFn] = {}

ONNX_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
               9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def registrar(table: dict):
    """``@op("Name", ...)`` decorators that file an op implementation under its graph names in ``table`` (the
    ONNX interpreter's here, the TF.js one's in tfjs_ops)."""
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


def check_auto_pad(at: dict) -> None:
    auto = at.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "VALID"):
        raise ModelError(f"auto_pad={auto} is not supported; re-export the model with explicit pads")


@op("Conv")
def _conv(ins, at):
    x, w = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    check_auto_pad(at)
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
    check_auto_pad(at)
    x, pad = _pool_padding(ins[0], at, float("-inf"))
    k = tuple(at["kernel_shape"])
    return F.max_pool2d(x, k, tuple(at.get("strides", k)), pad, tuple(at.get("dilations", [1, 1])),
                        ceil_mode=bool(at.get("ceil_mode", 0)))


@op("AveragePool")
def _avgpool(ins, at):
    check_auto_pad(at)
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
