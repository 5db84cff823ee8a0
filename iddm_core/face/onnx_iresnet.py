"""insightface ArcFace recognisers (``w600k_r50.onnx``, ``glintr100.onnx``, ...) made differentiable in PyTorch.

onnxruntime gives no gradients, and PGD needs the gradient of the embedding with respect to the pixels. The
files are plain feed-forward graphs (IResNet: Conv / BatchNormalization / PRelu / Add, then Flatten and a
Gemm), so instead of re-declaring the architecture we *interpret* the graph in torch: :class:`OnnxGraph`
keeps every initializer as a buffer and runs the nodes in their (topological) file order with torch ops.
That works for any depth (r18 ... r100), for exports that folded BatchNorm into the convolutions and for the
older MXNet conversions, and no weight renaming can go wrong. Only the operators listed in ``OPS`` (face/onnx_ops.py)
are known; an unknown one is reported, with the file, when the model is loaded — not halfway through a run.

Input convention (as insightface's ``ArcFaceONNX`` does it): the network takes RGB 112x112 crops as
``(pixel - 127.5) / 127.5``, unless the graph starts with its own ``Sub``/``Mul`` normalisation, in which
case it takes raw 0..255 pixels.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from .align import template_for
from .base import Recognizer
from .onnx_ops import OPS, check_auto_pad
from .zoo import resize_and_normalise

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
                    check_auto_pad(at)
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
