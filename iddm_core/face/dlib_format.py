"""dlib's serialised face network (``dlib_face_recognition_resnet_model_v1.dat``): reading it, checked layer by layer.

File format (dlib/serialize.h, dlib/dnn/core.h): integers are one control byte (low nibble: byte count, bit 7:
sign) followed by little-endian magnitude bytes; strings are a length then raw bytes; bools are the characters
'1'/'0'; doubles are a mantissa and a base-2 exponent, both such integers; tensors are version 2, four dims,
then raw little-endian float32. A network is written outermost layer first, but each ``add_layer`` writes its
sub-network *before* its own details, so the layer details appear in forward order after a prefix of version
numbers. :func:`parse_dlib_net` walks that structure against the expected architecture (:data:`LEVELS`,
:func:`forward_ops`) and fails with a :class:`ModelError` on anything else; face/dlib_resnet.py builds the
torch module and copies the parsed weights into it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ModelError

# (channels, blocks, first block is a down block) per level, in forward order.
LEVELS = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


# --------------------------------------------------------------------------------------------------------------
# dlib's serialisation primitives


class _Reader:
    """Sequential reader of dlib's binary serialisation; every error names the file."""

    def __init__(self, data: bytes, source: str):
        self.data, self.pos, self.source = data, 0, source

    def fail(self, what: str):
        raise ModelError(f"{self.source}: not a dlib face recognition model ({what} at byte {self.pos})")

    def byte(self) -> int:
        if self.pos >= len(self.data):
            self.fail("unexpected end of file")
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self) -> int:
        control = self.byte()
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            self.fail("bad integer")
        raw = self.data[self.pos:self.pos + size]
        if len(raw) != size:
            self.fail("unexpected end of file")
        self.pos += size
        value = int.from_bytes(raw, "little")
        return -value if control & 0x80 else value

    def string(self, max_len: int = 256) -> str:
        n = self.int()
        if not 0 <= n <= max_len:
            self.fail("bad string length")
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            self.fail("bad string")

    def bool(self) -> bool:
        ch = self.byte()
        if ch not in (0x30, 0x31):
            self.fail("bad bool")
        return ch == 0x31

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        special = {32000: float("inf"), 32001: float("-inf"), 32002: float("nan")}
        return special[exponent] if exponent in special else float(mantissa) * 2.0 ** exponent

    def tensor(self) -> np.ndarray:
        if self.int() != 2:
            self.fail("unsupported tensor version")
        dims = tuple(self.int() for _ in range(4))
        if min(dims) < 0:
            self.fail("bad tensor shape")
        n = int(np.prod(dims))
        end = self.pos + 4 * n
        if end > len(self.data):
            self.fail("truncated tensor")
        arr = np.frombuffer(self.data, dtype="<f4", count=n, offset=self.pos).reshape(dims).astype(np.float32)
        self.pos = end
        return arr

    def alias_tensor(self) -> tuple[int, int, int, int]:
        if self.int() != 1:
            self.fail("unsupported alias_tensor version")
        return tuple(self.int() for _ in range(4))

    def expect(self, *versions: str) -> str:
        v = self.string()
        if v not in versions:
            self.fail(f"expected layer {'/'.join(versions)}, found {v!r}")
        return v


# --------------------------------------------------------------------------------------------------------------
# layer details (dlib/dnn/layers.h, input.h, loss.h)


@dataclass
class LayerDetails:
    kind: str                      # "con" | "affine" | "relu" | "max_pool" | "avg_pool" | "add_prev" | "fc"
    arrays: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)


def _read_con(r: _Reader) -> LayerDetails:
    version = r.expect("con_4", "con_5", "con_6")
    params = r.tensor()
    attrs = dict(num_filters=r.int(), nr=r.int(), nc=r.int(), stride_y=r.int(), stride_x=r.int(),
                 padding_y=r.int(), padding_x=r.int())
    filters, _biases = r.alias_tensor(), r.alias_tensor()
    for _ in range(4):                                   # learning-rate / weight-decay multipliers
        r.float()
    use_bias = r.bool() if version in ("con_5", "con_6") else True
    if version == "con_6" and r.bool():
        r.fail("con_ with fused relu is not supported")
    flat = params.reshape(-1)
    n_w = int(np.prod(filters))
    if flat.size != n_w + (attrs["num_filters"] if use_bias else 0) or filters[0] != attrs["num_filters"]:
        r.fail("con_ parameter size mismatch")
    arrays = {"weight": flat[:n_w].reshape(filters)}
    arrays["bias"] = flat[n_w:] if use_bias else np.zeros(attrs["num_filters"], np.float32)
    return LayerDetails("con", arrays, attrs)


def _read_affine(r: _Reader) -> LayerDetails:
    version = r.expect("affine_", "affine_2", "bn_con2")
    params = r.tensor().reshape(-1)
    gamma_shape, _beta_shape = r.alias_tensor(), r.alias_tensor()
    n = int(np.prod(gamma_shape))
    if params.size != 2 * n:
        r.fail("affine_ parameter size mismatch")
    gamma, beta = params[:n], params[n:]
    if version == "bn_con2":                             # fold running statistics, as affine_(const bn_&) does
        _means, _invstds, running_means, running_vars = r.tensor(), r.tensor(), r.tensor(), r.tensor()
        r.int(), r.int()                                 # num_updates, running_stats_window_size
        for _ in range(4):
            r.float()
        eps = r.float()
        gamma = gamma / np.sqrt(running_vars.reshape(-1) + eps)
        beta = beta - gamma * running_means.reshape(-1)
    else:
        if r.int() != 0:                                 # layer_mode: CONV_MODE = 0 (per channel), FC_MODE = 1
            r.fail("affine_ not in convolution mode")
        if version == "affine_2" and r.bool():
            gamma, beta = np.ones_like(gamma), np.zeros_like(beta)   # a disabled affine is the identity
    return LayerDetails("affine", {"gamma": gamma.astype(np.float32), "beta": beta.astype(np.float32)})


def _read_relu(r: _Reader) -> LayerDetails:
    if r.expect("relu_", "relu_2") == "relu_2" and r.bool():
        r.fail("disabled relu_ is not supported")
    return LayerDetails("relu")


def _read_pool(kind: str):
    def read(r: _Reader) -> LayerDetails:
        r.expect(f"{kind}_2")
        attrs = dict(nr=r.int(), nc=r.int(), stride_y=r.int(), stride_x=r.int(), padding_y=r.int(),
                     padding_x=r.int())
        return LayerDetails(kind, attrs=attrs)
    return read


def _read_add_prev(r: _Reader) -> LayerDetails:
    r.expect("add_prev_")
    return LayerDetails("add_prev")


def _read_fc(r: _Reader) -> LayerDetails:
    version = r.expect("fc_2", "fc_3")
    num_outputs, num_inputs = r.int(), r.int()
    params = r.tensor().reshape(-1)
    r.alias_tensor(), r.alias_tensor()
    bias_mode = r.int()                                  # FC_HAS_BIAS = 0, FC_NO_BIAS = 1
    for _ in range(4):
        r.float()
    use_bias = (r.bool() if version == "fc_3" else True) and bias_mode == 0
    n_w = num_inputs * num_outputs
    if params.size != n_w + (num_outputs if bias_mode == 0 else 0):
        r.fail("fc_ parameter size mismatch")
    arrays = {"weight": params[:n_w].reshape(num_inputs, num_outputs).T.copy()}
    arrays["bias"] = params[n_w:n_w + num_outputs] if use_bias else np.zeros(num_outputs, np.float32)
    return LayerDetails("fc", arrays, dict(num_inputs=num_inputs, num_outputs=num_outputs))


READERS = {"con": _read_con, "affine": _read_affine, "relu": _read_relu, "max_pool": _read_pool("max_pool"),
           "avg_pool": _read_pool("avg_pool"), "add_prev": _read_add_prev, "fc": _read_fc}


def forward_ops() -> list[str]:
    """The network as dlib nests it, in forward order, without the input layer: layer kinds plus the "tag" and
    "skip" wrappers, which serialise as a bare version number."""
    ops = ["con", "affine", "relu", "max_pool"]
    for _channels, blocks, first_down in LEVELS:
        for b in range(blocks):
            down = first_down and b == 0
            ops += ["tag", "con", "affine", "relu", "con", "affine"]
            ops += ["tag", "skip", "avg_pool"] if down else []
            ops += ["add_prev", "relu"]
    return ops + ["avg_pool", "fc"]


@dataclass
class ParsedNet:
    means: tuple[float, float, float]
    size: int
    layers: list[LayerDetails]     # forward order, wrappers removed


def _read_input(r: _Reader) -> tuple[tuple[float, float, float], int]:
    r.expect("input_rgb_image_sized")
    means = (r.float(), r.float(), r.float())
    nr, nc = r.int(), r.int()
    if nr != nc:
        r.fail("non-square input")
    return means, nr


def _read_layer_trailer(r: _Reader, version: int, bottom: bool):
    """The bookkeeping each add_layer writes after its details (flags and usually-empty gradient tensors)."""
    for _ in range(3):
        r.bool()
    r.tensor(), r.tensor()                               # x_grad, cached_output
    if bottom:
        r.tensor()                                       # grad_final
        if version >= 3:
            r.int()                                      # _sample_expansion_factor
    elif version >= 2:
        r.tensor()                                       # params_grad


def parse_dlib_net(data: bytes, source: str = "model") -> ParsedNet:
    """Parse dlib's serialised ``loss_metric<fc_no_bias<128, ...>>`` face network (see module docstring)."""
    r = _Reader(data, source)
    if r.int() != 1:
        r.fail("unsupported add_loss_layer version")
    if r.expect("loss_metric_", "loss_metric_2") == "loss_metric_2":
        r.float(), r.float()                             # margin, distance threshold
    ops = forward_ops()
    versions = []
    for op in reversed(ops[1:]):                         # outermost first: version numbers only
        v = r.int()
        ok = v == 1 if op in ("tag", "skip") else v in (1, 2)
        if not ok:
            r.fail(f"unexpected version {v} of a {op} wrapper")
        versions.append(v)
    bottom_version = r.int()
    if bottom_version not in (2, 3):
        r.fail("unexpected version of the input layer")
    means, size = _read_input(r)
    layers = [READERS["con"](r)]
    _read_layer_trailer(r, bottom_version, bottom=True)
    for op, v in zip(ops[1:], reversed(versions)):      # innermost first: details in forward order
        if op in ("tag", "skip"):
            continue
        layers.append(READERS[op](r))
        _read_layer_trailer(r, v, bottom=False)
    if r.pos != len(data):
        r.fail(f"{len(data) - r.pos} trailing bytes")
    return ParsedNet(means, size, layers)
