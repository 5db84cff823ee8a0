"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) as a differentiable torch module.

dlib's network cannot be back-propagated from Python, so the IDDM attacks need it in torch. Nothing converted is
shipped: :func:`load_dlib_recognizer` reads dlib's own binary file at run time.

The architecture (dlib's ``dnn_face_recognition_ex.cpp``), in forward order::

    input_rgb_image_sized<150>          (pixel - channel mean) / 256, RGB planes
    con 32 7x7 /2 -> affine -> relu -> max_pool 3x3 /2
    5 levels of residual blocks          32 x3 | 64: down + 3 | 128: down + 2 | 256: down + 2 | 256: down
    avg_pool_everything -> fc_no_bias 128

A block is ``relu(add_prev(affine(con3x3(relu(affine(con3x3 /s(x))))), shortcut))``; a "down" block uses
stride 2 in its first conv and ``avg_pool 2x2 /2`` of ``x`` as shortcut. dlib conventions reproduced exactly:

* ``con_`` and the pooling layers pad ``size // 2`` only when their stride is 1; a strided layer does not pad.
* ``add_prev_`` adds tensors of different shapes by zero-extending the smaller one at the end of each axis
  (extra channels, bottom rows, right columns). That happens in every down block (channels double; at 8x8 the
  conv gives 3x3 but the pool 4x4) and the zeros are included in the final global average.
* ``affine_`` is the test-time form of batch norm: ``x * gamma + beta`` per channel. A file may hold ``bn_con``
  layers instead (a training net); dlib then folds running statistics into gamma/beta, and so do we.
* ``fc_`` computes ``x @ W`` with ``W`` stored as (inputs x outputs).

File format (dlib/serialize.h, dlib/dnn/core.h): integers are one control byte (low nibble: byte count, bit 7:
sign) followed by little-endian magnitude bytes; strings are a length then raw bytes; bools are the characters
'1'/'0'; doubles are a mantissa and a base-2 exponent, both such integers; tensors are version 2, four dims,
then raw little-endian float32. A network is written outermost layer first, but each ``add_layer`` writes its
sub-network *before* its own details, so the layer details appear in forward order after a prefix of version
numbers. :func:`parse_dlib_net` walks that structure against the expected architecture and fails with a
:class:`ModelError` on anything else.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .base import Recognizer, arcface_points, check_landmarks, dlib_parts
from .dlib_chip import MEAN_FACE_5, extract_face_chips  # noqa: F401  (MEAN_FACE_5 re-exported)

INPUT_SIZE = 150
CHIP_PADDING = 0.25
EMBED_DIM = 128
DEFAULT_MEANS = (122.782, 117.001, 104.298)

# (channels, blocks, first block is a down block) per level, in forward order.
LEVELS = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))

# --------------------------------------------------------------------------------------------------------------
# template: where dlib's 150 px chip (padding 0.25) puts the 5 ArcFace-order points.
#
# get_face_chip_details() (dlib/image_transforms/interpolation.h) maps a unit-square "mean face" onto the chip
# with p_chip = size * (padding + p) / (1 + 2 * padding). For 5-point shapes it uses eye corners and the nose
# base; its 68-point branch lists the mean-face positions of points 17..67, of which the ones below give the
# ArcFace points the way detect.py computes them on real faces (eye centre = mean of the 6 eye-contour points,
# nose tip = 30, mouth corners = 48 and 54). The two constant sets share one frame: the 5-point corners are
# within 0.003 of points 36, 39, 42, 45 and the nose base within 0.0003 of point 33.
MEAN_FACE_68 = {  # index -> (x, y), values from dlib's mean_face_shape_x/_y
    30: (0.490127, 0.515625),
    36: (0.121737, 0.216423), 37: (0.187122, 0.178758), 38: (0.265825, 0.179852),
    39: (0.334606, 0.231733), 40: (0.260918, 0.245099), 41: (0.182743, 0.244077),
    42: (0.645647, 0.231733), 43: (0.714428, 0.179852), 44: (0.793132, 0.178758),
    45: (0.858516, 0.216423), 46: (0.79751, 0.244077), 47: (0.719335, 0.245099),
    48: (0.254149, 0.780233), 54: (0.726104, 0.780233),
}
# dlib's 5-point chip constants (parts 0..4: image-right eye outer/inner corner, image-left eye outer/inner
# corner, nose base), same unit frame: MEAN_FACE_5, imported from dlib_chip.


def mean_face_arcface_points() -> np.ndarray:
    """The 5 ArcFace-order points of dlib's mean face, unit-square coordinates [5, 2]."""
    m = {k: np.array(v) for k, v in MEAN_FACE_68.items()}
    left_eye = np.mean([m[i] for i in range(36, 42)], axis=0)
    right_eye = np.mean([m[i] for i in range(42, 48)], axis=0)
    return np.stack([left_eye, right_eye, m[30], m[48], m[54]])


def chip_template(size: int = INPUT_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """ArcFace-order points in the pixels of a dlib face chip of ``size`` and ``padding`` (pixel centres at
    integers, like dlib's chip extractor and align.warp_to_template)."""
    return (size * (padding + mean_face_arcface_points()) / (1 + 2 * padding)).astype(np.float32)


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


# --------------------------------------------------------------------------------------------------------------
# the torch module


def dlib_padding(kernel: int, stride: int) -> int:
    """dlib's default padding for con_/max_pool_/avg_pool_: half the window, but none for strided layers."""
    return kernel // 2 if stride == 1 else 0


def pad_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev_``: the sum over the larger shape, each input zero-extended at the end of every axis."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(x, y) for x, y in zip(a.shape[1:], b.shape[1:]))

    def grow(t):
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))
    return grow(a) + grow(b)


class ChannelAffine(nn.Module):
    """dlib's ``affine_`` in convolution mode: ``x * gamma[c] + beta[c]`` (batch norm at test time)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)


def _conv(cin: int, cout: int, kernel: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=dlib_padding(kernel, stride), bias=True)


class ResBlock(nn.Module):
    """``ares`` / ``ares_down`` of dlib's example: two 3x3 convs; a down block strides its first conv and uses a
    2x2 average pool of the input as shortcut, added with :func:`pad_add` (channel counts may differ)."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1, self.aff1 = _conv(cin, cout, 3, 2 if down else 1), ChannelAffine(cout)
        self.conv2, self.aff2 = _conv(cout, cout, 3, 1), ChannelAffine(cout)

    def forward(self, x):
        y = self.aff2(self.conv2(F.relu(self.aff1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(pad_add(y, shortcut))


class DlibResNet(Recognizer):
    """dlib's 128-D face descriptor network. ``forward`` takes 150 x 150 RGB chips in [0, 1] (dlib chips:
    ``get_face_chip(img, shape5, 150, 0.25)``, or :meth:`align`) and returns dlib's unnormalised descriptors: dlib
    compares them by Euclidean distance, 0.6 being its same-person threshold."""

    name = "dlib"
    input_size = INPUT_SIZE
    template = chip_template()

    def __init__(self, means=DEFAULT_MEANS):
        super().__init__()
        self.register_buffer("means", torch.tensor(means, dtype=torch.float32).view(1, 3, 1, 1))
        self.stem_conv, self.stem_affine = _conv(3, 32, 7, 2), ChannelAffine(32)
        blocks, cin = [], 32
        for channels, count, first_down in LEVELS:
            for b in range(count):
                blocks.append(ResBlock(cin, channels, first_down and b == 0))
                cin = channels
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(cin, EMBED_DIM, bias=True)
        nn.init.zeros_(self.fc.bias)

    # Landmarks the template approximation fits (LANDMARK_NAMES indices): eyes and nose. dlib cuts its chips from
    # eye corners and the nose base alone, so fitting the mouth corners too (they move with expression: a smile
    # pulls them up and out) tilts and scales the crop away from dlib's; on the sample photos that doubled the
    # descriptor distance to dlib's own pipeline.
    align_points = (0, 1, 2)

    def align(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """150 px chips [N, 3, 150, 150], differentiable with respect to ``images``.

        With dlib's 5 shape parts in the landmarks ([N, 10, 2], see :func:`~.base.dlib_parts`) this is dlib's own
        chip extraction (:mod:`.dlib_chip`: same pixels as ``dlib.get_face_chip``). With ArcFace points only
        ([N, 5, 2], e.g. from SCRFD) it approximates it: a similarity fitted on :attr:`align_points` onto
        :attr:`template` and one bilinear warp (no image pyramid, no 8-bit rounding)."""
        from kornia.geometry.transform import warp_affine

        from .align import umeyama

        landmarks = torch.as_tensor(landmarks, device=images.device)
        landmarks = landmarks.unsqueeze(0) if landmarks.dim() == 2 else landmarks
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"align: images [N, 3, H, W] expected, got {tuple(images.shape)}")
        check_landmarks(landmarks, images.shape[0])
        parts = dlib_parts(landmarks)
        if parts is not None:
            return extract_face_chips(images, parts, INPUT_SIZE, CHIP_PADDING).float()
        idx = list(self.align_points)
        template = torch.as_tensor(self.template[idx], device=images.device)
        matrix = umeyama(arcface_points(landmarks)[:, idx].float(), template)
        with torch.autocast(device_type=images.device.type, enabled=False):
            return warp_affine(images.float(), matrix, dsize=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                               padding_mode="zeros", align_corners=True)

    def preprocess(self, crops: torch.Tensor) -> torch.Tensor:
        """input_rgb_image_sized: (8-bit value - channel mean) / 256."""
        return (crops * 255.0 - self.means.to(crops.dtype)) / 256.0

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        if crops.dim() != 4 or crops.shape[1] != 3 or tuple(crops.shape[2:]) != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"DlibResNet expects [N, 3, {INPUT_SIZE}, {INPUT_SIZE}] crops, got {tuple(crops.shape)}")
        x = F.relu(self.stem_affine(self.stem_conv(self.preprocess(crops))))
        x = F.max_pool2d(x, 3, 2)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))

    def slots(self) -> list[tuple[str, object]]:
        """(dlib layer kind, the module receiving its weights or the expected pooling window/stride) in the order
        :func:`parse_dlib_net` returns the file's layers."""
        out = [("con", self.stem_conv), ("affine", self.stem_affine), ("relu", None), ("max_pool", (3, 2))]
        for block in self.blocks:
            out += [("con", block.conv1), ("affine", block.aff1), ("relu", None), ("con", block.conv2),
                    ("affine", block.aff2)]
            out += [("avg_pool", (2, 2))] if block.down else []
            out += [("add_prev", None), ("relu", None)]
        return out + [("avg_pool", (0, 1)), ("fc", self.fc)]


def _check_pool(layer: LayerDetails, window: int, stride: int, source: str):
    a = layer.attrs
    got = (a["nr"], a["nc"], a["stride_y"], a["stride_x"], a["padding_y"], a["padding_x"])
    pad = dlib_padding(window, stride) if window else 0
    if got != (window, window, stride, stride, pad, pad):
        raise ModelError(f"{source}: {layer.kind} layer {got} differs from dlib's face network")


def _copy(param: torch.Tensor, array: np.ndarray, what: str, source: str):
    if tuple(param.shape) != tuple(array.shape):
        raise ModelError(f"{source}: {what} has shape {tuple(array.shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.ascontiguousarray(array)))


def load_parsed(model: DlibResNet, parsed: ParsedNet, source: str = "model") -> DlibResNet:
    """Copy the weights of :func:`parse_dlib_net`'s output into ``model``, checking every layer's kind, shape,
    stride and padding against the architecture."""
    slots = model.slots()
    if [k for k, _ in slots] != [l.kind for l in parsed.layers]:
        raise ModelError(f"{source}: layer sequence differs from dlib's face recognition ResNet")
    if parsed.size != INPUT_SIZE:
        raise ModelError(f"{source}: input size {parsed.size}, expected {INPUT_SIZE}")
    model.means.copy_(torch.tensor(parsed.means, dtype=torch.float32).view(1, 3, 1, 1))
    for i, ((kind, target), layer) in enumerate(zip(slots, parsed.layers)):
        what = f"layer {i} ({kind})"
        if kind == "con":
            a = layer.attrs
            if (a["stride_y"], a["padding_y"]) != (target.stride[0], target.padding[0]) or a["nr"] != a["nc"]:
                raise ModelError(f"{source}: {what} stride/padding differ from dlib's face network")
            _copy(target.weight, layer.arrays["weight"], what, source)
            _copy(target.bias, layer.arrays["bias"], what, source)
        elif kind == "affine":
            _copy(target.gamma, layer.arrays["gamma"], what, source)
            _copy(target.beta, layer.arrays["beta"], what, source)
        elif kind == "fc":
            _copy(target.weight, layer.arrays["weight"], what, source)
            _copy(target.bias, layer.arrays["bias"], what, source)
        elif kind in ("max_pool", "avg_pool"):
            _check_pool(layer, *target, source)
    return model


def load_dlib_recognizer(path: str | os.PathLike | None = None) -> DlibResNet:
    """dlib's recogniser from its .dat file (default: the ``face_recognition_models`` package's copy), in eval
    mode. Errors name the file."""
    from .dlib_files import RESNET, require_model

    path = require_model(RESNET) if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"dlib recognition model not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    parsed = parse_dlib_net(data, source=str(path))
    return load_parsed(DlibResNet(parsed.means), parsed, source=str(path)).eval()
