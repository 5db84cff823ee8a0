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

The file itself is read by face/dlib_format.py (:func:`~.dlib_format.parse_dlib_net`); this module holds the
chip template, the torch network and the weight copy.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .align import umeyama
from .base import Recognizer
from .dlib_chip import MEAN_FACE_5, extract_face_chips  # noqa: F401  (MEAN_FACE_5 re-exported)
from .dlib_format import LEVELS, LayerDetails, ParsedNet, parse_dlib_net
from .landmarks import arcface_points, check_landmarks, dlib_parts

INPUT_SIZE = 150
CHIP_PADDING = 0.25
EMBED_DIM = 128
DEFAULT_MEANS = (122.782, 117.001, 104.298)

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

        With dlib's 5 shape parts in the landmarks ([N, 10, 2], see :func:`~.landmarks.dlib_parts`) this is dlib's own
        chip extraction (:mod:`.dlib_chip`: same pixels as ``dlib.get_face_chip``). With ArcFace points only
        ([N, 5, 2], e.g. from SCRFD) it approximates it: a similarity fitted on :attr:`align_points` onto
        :attr:`template` and one bilinear warp (no image pyramid, no 8-bit rounding)."""
        from kornia.geometry.transform import warp_affine

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
