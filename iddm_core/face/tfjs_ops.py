"""The TensorFlow operators face/tfjs_graph.py's interpreter knows, as torch functions on NHWC tensors.

Each operator takes (inputs, attributes) and returns a tensor. Inputs arrive in graph order (control inputs
dropped); integer operands (shapes, axes, paddings) are tensors too and read with ``_ints``. Attributes are decoded
from tfjs' JSON encoding by :func:`node_attributes`. An operator that meets something it cannot do raises
:class:`OpError`, which the interpreter re-raises as a ModelError naming the file and the node.

Layout: TensorFlow's. Tensors are NHWC and every operator follows TensorFlow's semantics (axes of ``Mean``,
``Squeeze``, ``Reshape`` and ``Pad`` refer to NHWC); convolutions permute to torch's NCHW around the call only.
``SAME`` padding is TensorFlow's: the total padding ``max((ceil(n/s) - 1) * s + (k - 1) * d + 1 - n, 0)`` is
split with the odd pixel at the end (bottom/right), which matters for even kernels and strided layers.
"""
from __future__ import annotations

import base64
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .onnx_ops import registrar


class OpError(Exception):
    """An operator met something it cannot do; re-raised as ModelError with the file and node named."""


# ------------------------------------------------------------------------------------------------ attributes


def _attr_value(value: dict):
    """One TF AttrValue in tfjs' JSON encoding -> a Python value (strings decoded, ints as int)."""
    if "list" in value:
        lst = value["list"] or {}
        if "i" in lst:
            return [int(v) for v in lst["i"]]
        if "f" in lst:
            return [float(v) for v in lst["f"]]
        if "s" in lst:
            return [base64.b64decode(v).decode("utf-8", "replace") for v in lst["s"]]
        if "b" in lst:
            return [bool(v) for v in lst["b"]]
        if "type" in lst:
            return list(lst["type"])
        return []
    if "s" in value:
        return base64.b64decode(value["s"]).decode("utf-8", "replace")
    if "i" in value:
        return int(value["i"])
    if "f" in value:
        return float(value["f"])
    if "b" in value:
        return bool(value["b"])
    if "type" in value:
        return value["type"]
    if "shape" in value:
        shape = value["shape"] or {}
        return None if shape.get("unknownRank") else [int(d.get("size", -1)) for d in shape.get("dim", [])]
    return None  # tensors and functions: not needed by the operators below


def node_attributes(node: dict) -> dict:
    """A graph node's ``attr`` map decoded to Python values."""
    return {k: _attr_value(v) for k, v in (node.get("attr") or {}).items()}


# ------------------------------------------------------------------------------------------------ operators

OpFn = Callable[[list, dict], torch.Tensor]
OPS: dict[str, OpFn] = {}
op = registrar(OPS)


def _ints(t) -> list[int]:
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in np.asarray(t).reshape(-1)]


def _nhwc(at: dict) -> None:
    fmt = at.get("data_format", "NHWC") or "NHWC"
    if fmt != "NHWC":
        raise OpError(f"data_format {fmt} is not supported (TensorFlow.js graphs are NHWC)")


def _same_pads(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's SAME padding of one spatial dimension: (before, after), the odd pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _spatial_pads(x: torch.Tensor, at: dict, kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) for an NHWC input under the node's ``padding`` attribute."""
    padding = at.get("padding", "VALID")
    if padding == "VALID":
        return 0, 0, 0, 0
    if padding == "SAME":
        top, bottom = _same_pads(x.shape[1], kernel[0], strides[0], dilations[0])
        left, right = _same_pads(x.shape[2], kernel[1], strides[1], dilations[1])
        return top, bottom, left, right
    if padding == "EXPLICIT":
        pads = list(at.get("explicit_paddings") or [])
        if len(pads) != 8:
            raise OpError(f"EXPLICIT padding needs 8 explicit_paddings, got {pads}")
        if pads[0] or pads[1] or pads[6] or pads[7]:
            raise OpError(f"explicit padding of the batch or channel dimension is not supported: {pads}")
        return pads[2], pads[3], pads[4], pads[5]
    raise OpError(f"padding {padding!r} is not supported")


def _hw(values, default: int = 1) -> tuple[int, int]:
    """The H and W entries of a 4-vector NHWC attribute (strides, dilations, ksize)."""
    values = list(values or [])
    if len(values) == 4:
        return int(values[1]), int(values[2])
    if len(values) == 2:
        return int(values[0]), int(values[1])
    if len(values) == 1:
        return int(values[0]), int(values[0])
    return default, default


def _to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _conv(x: torch.Tensor, filt: torch.Tensor, at: dict, depthwise: bool) -> torch.Tensor:
    _nhwc(at)
    if x.dim() != 4 or filt.dim() != 4:
        raise OpError(f"expected a 4-D input and filter, got {tuple(x.shape)} and {tuple(filt.shape)}")
    kh, kw, cin, cout = filt.shape
    strides, dilations = _hw(at.get("strides")), _hw(at.get("dilations"))
    top, bottom, left, right = _spatial_pads(x, at, (kh, kw), strides, dilations)
    if depthwise:  # [kh, kw, in, multiplier] -> [in * multiplier, 1, kh, kw]; TF orders outputs c * m + j
        weight, groups = filt.permute(2, 3, 0, 1).reshape(cin * cout, 1, kh, kw), cin
    else:
        if x.shape[3] % cin:
            raise OpError(f"input has {x.shape[3]} channels, filter expects {cin}")
        weight, groups = filt.permute(3, 2, 0, 1), x.shape[3] // cin
    y = _to_nchw(x)
    if top or bottom or left or right:
        y = F.pad(y, (left, right, top, bottom))
    y = F.conv2d(y, weight, None, stride=strides, dilation=dilations, groups=groups)
    return _to_nhwc(y)


def _activation(name: str, x: torch.Tensor, alpha, at: dict) -> torch.Tensor:
    key = name.lower()
    if key == "relu":
        return F.relu(x)
    if key == "relu6":
        return torch.clamp(x, 0.0, 6.0)
    if key == "elu":
        return F.elu(x)
    if key == "sigmoid":
        return torch.sigmoid(x)
    if key == "tanh":
        return torch.tanh(x)
    if key == "prelu":
        return torch.where(x >= 0, x, x * alpha)
    if key == "leakyrelu":
        return F.leaky_relu(x, float(at.get("leakyrelu_alpha", 0.2)))
    raise OpError(f"fused activation {name!r} is not supported")


def _fused(x: torch.Tensor, extra: list, at: dict) -> torch.Tensor:
    """Apply ``fused_ops`` (BiasAdd, then an optional activation) the way tfjs' fused kernels do:
    extra[0] is the bias, extra[1] the PReLU slopes."""
    ops = list(at.get("fused_ops") or [])
    if not ops:
        return x
    if ops[0] != "BiasAdd":
        raise OpError(f"fused_ops {ops} are not supported (only BiasAdd followed by an activation)")
    if not extra:
        raise OpError("fused BiasAdd without a bias operand")
    x = x + extra[0]
    if len(ops) > 2:
        raise OpError(f"fused_ops {ops} are not supported")
    if len(ops) == 2:
        x = _activation(ops[1], x, extra[1] if len(extra) > 1 else None, at)
    return x


@op("Conv2D")
def _conv2d(ins, at):
    return _conv(ins[0], ins[1], at, depthwise=False)


@op("DepthwiseConv2dNative", "DepthwiseConv2d")
def _depthwise(ins, at):
    return _conv(ins[0], ins[1], at, depthwise=True)


@op("_FusedConv2D")
def _fused_conv2d(ins, at):
    return _fused(_conv(ins[0], ins[1], at, depthwise=False), ins[2:], at)


@op("FusedDepthwiseConv2dNative")
def _fused_depthwise(ins, at):
    return _fused(_conv(ins[0], ins[1], at, depthwise=True), ins[2:], at)


def _matmul(ins, at):
    a, b = ins[0], ins[1]
    if at.get("transpose_a"):
        a = a.transpose(-1, -2)
    if at.get("transpose_b"):
        b = b.transpose(-1, -2)
    return a @ b


OPS["MatMul"] = _matmul
OPS["BatchMatMul"] = OPS["BatchMatMulV2"] = lambda ins, at: _matmul(ins, {"transpose_a": at.get("adj_x"),
                                                                          "transpose_b": at.get("adj_y")})
OPS["_FusedMatMul"] = lambda ins, at: _fused(_matmul(ins, at), ins[2:], at)


def _pool(ins, at, kind: str):
    _nhwc(at)
    x = ins[0]
    kernel, strides = _hw(at.get("ksize")), _hw(at.get("strides"))
    top, bottom, left, right = _spatial_pads(x, at, kernel, strides, (1, 1))
    y = _to_nchw(x)
    if kind == "max":
        if top or bottom or left or right:
            y = F.pad(y, (left, right, top, bottom), value=float("-inf"))
        return _to_nhwc(F.max_pool2d(y, kernel, strides))
    # TensorFlow averages over the window's pixels inside the image only.
    if not (top or bottom or left or right):
        return _to_nhwc(F.avg_pool2d(y, kernel, strides))
    pads = (left, right, top, bottom)
    total = F.avg_pool2d(F.pad(y, pads), kernel, strides)
    ones = torch.ones((1, 1) + tuple(y.shape[2:]), dtype=y.dtype, device=y.device)
    count = F.avg_pool2d(F.pad(ones, pads), kernel, strides)
    return _to_nhwc(total / count)


OPS["MaxPool"] = lambda ins, at: _pool(ins, at, "max")
OPS["AvgPool"] = lambda ins, at: _pool(ins, at, "avg")


def _div(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="floor")
    return a / b


_BINARY = {
    "Add": torch.add, "AddV2": torch.add, "BiasAdd": torch.add, "Sub": torch.sub, "Mul": torch.mul,
    "RealDiv": torch.div, "Div": _div, "Maximum": torch.maximum, "Minimum": torch.minimum,
    "SquaredDifference": lambda a, b: (a - b) * (a - b), "Pow": torch.pow,
}
for _name, _fn in _BINARY.items():
    OPS[_name] = (lambda f: lambda ins, at: f(ins[0], ins[1]))(_fn)

_UNARY = {
    "Relu": F.relu, "Relu6": lambda x: torch.clamp(x, 0.0, 6.0), "Elu": F.elu, "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh, "Abs": torch.abs, "Neg": torch.neg, "Square": torch.square, "Sqrt": torch.sqrt,
    "Rsqrt": torch.rsqrt, "Exp": torch.exp, "Log": torch.log, "Identity": lambda x: x,
}
for _name, _fn in _UNARY.items():
    OPS[_name] = (lambda f: lambda ins, at: f(ins[0]))(_fn)


@op("Prelu")
def _prelu(ins, at):
    return torch.where(ins[0] >= 0, ins[0], ins[0] * ins[1])


@op("LeakyRelu")
def _leaky(ins, at):
    return F.leaky_relu(ins[0], float(at.get("alpha", 0.2)))


@op("Softmax")
def _softmax(ins, at):
    return torch.softmax(ins[0], dim=-1)


@op("Pad", "PadV2")
def _pad(ins, at):
    x, pads = ins[0], _ints(ins[1])
    if len(pads) != 2 * x.dim():
        raise OpError(f"paddings {pads} do not fit a rank-{x.dim()} input")
    value = float(ins[2].reshape(-1)[0]) if len(ins) > 2 else 0.0
    order = []
    for d in reversed(range(x.dim())):  # F.pad lists the last dimension first
        order += [pads[2 * d], pads[2 * d + 1]]
    return F.pad(x, order, value=value)


@op("Reshape")
def _reshape(ins, at):
    return ins[0].reshape(_ints(ins[1]))


@op("Squeeze")
def _squeeze(ins, at):
    x = ins[0]
    dims = list(at.get("squeeze_dims") or at.get("axis") or [])
    if not dims:
        return x.reshape([s for s in x.shape if s != 1])
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        if x.shape[d] != 1:
            raise OpError(f"cannot squeeze dimension {d} of size {x.shape[d]}")
        x = x.squeeze(d)
    return x


@op("ExpandDims")
def _expand_dims(ins, at):
    x, axis = ins[0], _ints(ins[1])[0]
    return x.unsqueeze(axis % (x.dim() + 1))


@op("Transpose")
def _transpose(ins, at):
    return ins[0].permute(*_ints(ins[1]))


@op("ConcatV2")
def _concat(ins, at):
    axis = _ints(ins[-1])[0]
    return torch.cat(list(ins[:-1]), dim=axis)


def _reduce(fn):
    def run(ins, at):
        x = ins[0]
        axes = _ints(ins[1]) if len(ins) > 1 else list(range(x.dim()))
        dims = tuple(sorted({a % x.dim() for a in axes})) if x.dim() else ()
        if not dims:
            return x
        return fn(x, dims, bool(at.get("keep_dims", False)))
    return run


OPS["Mean"] = _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k))
OPS["Sum"] = _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k))
OPS["Max"] = _reduce(lambda x, d, k: x.amax(dim=d, keepdim=k))
OPS["Min"] = _reduce(lambda x, d, k: x.amin(dim=d, keepdim=k))


@op("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
def _batchnorm(ins, at):
    _nhwc(at)
    x, scale, offset, mean, var = ins[:5]
    eps = float(at.get("epsilon", 1e-3))
    return (x - mean) * torch.rsqrt(var + eps) * scale + offset
