"""The face-recognition "zoo" of the face-privacy literature, as :class:`Recognizer` modules.

TIP-IM, AMT-GAN, Adv-Makeup, DiffAM, CLIP2Protect and IDDM all evaluate (and attack) the same four checkpoints:
``irse50.pth`` (IR-SE-50), ``ir152.pth`` (IR-152), ``mobile_face.pth`` (MobileFaceNet) and ``facenet.pth``
(Inception-ResNet-v1); facenet-pytorch's VGGFace2 weights are the same Inception-ResNet-v1. Those files are bare
state dicts of the face.evoLVe / InsightFace_Pytorch / facenet-pytorch modules, so the architectures below are
written so that their *parameter names and shapes* are exactly the ones stored in the files (``input_layer.0``,
``body.3.res_layer.5.fc1``, ``conv_23.conv_dw.prelu``, ``repeat_2.4.branch1.2.bn``, ...): a downloaded file
then loads with ``strict=True`` and any difference is a real incompatibility, not a renaming problem.

Each module does its own preprocessing in :meth:`forward`, the way those repositories feed the networks:
crops in [0, 1] are resized (bilinear) to the network's input side and mapped to [-1, 1]; FaceNet uses
facenet-pytorch's fixed standardisation ``(255 x - 127.5) / 128`` at 160 px. ``forward`` returns the raw
(un-normalised) embedding; :meth:`Recognizer.embed` normalises it.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .align import ARCFACE_TEMPLATE_112, template_for
from .base import Recognizer

# ----------------------------------------------------------------------------------------------- preprocessing


def resize_and_normalise(crops: torch.Tensor, size: int, scale: float, offset: float) -> torch.Tensor:
    """Crops [N, 3, h, w] in [0, 1] -> [N, 3, size, size] as ``crops * scale + offset``.

    Resizing is bilinear without antialiasing because that is what the attack papers used
    (``F.interpolate(..., mode="bilinear")``); crops already at ``size`` pass through untouched.
    """
    if crops.dim() != 4 or crops.shape[1] != 3:
        raise ValueError(f"expected crops [N, 3, H, W], got shape {tuple(crops.shape)}")
    if crops.shape[-2:] != (size, size):
        crops = F.interpolate(crops, size=(size, size), mode="bilinear", align_corners=False)
    return crops * scale + offset


class _MinusOneToOne:
    """Mixin: the 112 px [-1, 1] input convention of the IR and MobileFaceNet checkpoints."""

    input_size = 112

    def _prepare(self, crops: torch.Tensor) -> torch.Tensor:
        return resize_and_normalise(crops, self.input_size, 2.0, -1.0)


# ------------------------------------------------------------------------------------------------ IR / IR-SE

# Units per stage for the improved-residual (IR) backbones; the stage widths are always 64, 128, 256, 512.
IR_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
IR_WIDTHS = (64, 128, 256, 512)


class SqueezeExcite(nn.Module):
    """Channel attention with 1x1 convolutions named ``fc1``/``fc2`` (bias-free), reduction 16."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(w))))


class IRUnit(nn.Module):
    """One improved-residual unit: BN-Conv3x3-PReLU-Conv3x3(stride)-BN[-SE] plus a shortcut.

    The shortcut is a parameter-free subsampling when the width is unchanged (the original code uses a 1x1 max
    pool, i.e. plain striding) and a strided 1x1 conv + BN otherwise; the indices inside ``res_layer`` are
    what the checkpoints store (0 BN, 1 conv, 2 PReLU, 3 conv, 4 BN, 5 SE).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, se: bool):
        super().__init__()
        if c_in == c_out:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        layers = [nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.PReLU(c_out),
                  nn.Conv2d(c_out, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)]
        if se:
            layers.append(SqueezeExcite(c_out))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def ir_unit_specs(depth: int) -> list[tuple[int, int, int]]:
    """(c_in, c_out, stride) of every unit of an IR-``depth`` body; each stage starts with a stride-2 unit."""
    if depth not in IR_UNITS:
        raise ValueError(f"IR depth must be one of {sorted(IR_UNITS)}, got {depth}")
    specs, c_in = [], 64
    for c_out, n in zip(IR_WIDTHS, IR_UNITS[depth]):
        specs.append((c_in, c_out, 2))
        specs.extend((c_out, c_out, 1) for _ in range(n - 1))
        c_in = c_out
    return specs


class IRBackbone(_MinusOneToOne, Recognizer):
    """IR-50/100/152 (``se=False``) and IR-SE-50/... (``se=True``) for 112 px crops, 512-D output.

    Key layout: ``input_layer`` (conv, BN, PReLU), ``body.<i>`` units, ``output_layer`` (BN2d, dropout,
    flatten, Linear(512*7*7, 512), BN1d) — dropout and flatten hold no weights but keep the indices.
    """

    def __init__(self, depth: int = 50, se: bool = True, name: str | None = None, embedding_size: int = 512):
        super().__init__()
        self.name = name or f"ir{'se' if se else ''}{depth}"
        self.template = ARCFACE_TEMPLATE_112.copy()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        self.body = nn.Sequential(*(IRUnit(i, o, s, se) for i, o, s in ir_unit_specs(depth)))
        side = self.input_size // 16
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(0.4), nn.Flatten(),
                                          nn.Linear(512 * side * side, embedding_size),
                                          nn.BatchNorm1d(embedding_size))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = self._prepare(crops)
        return self.output_layer(self.body(self.input_layer(x)))


# --------------------------------------------------------------------------------------------- MobileFaceNet


class ConvBN(nn.Module):
    """Bias-free conv + BN (+ PReLU unless ``linear``): the ``conv``/``bn``/``prelu`` triple of the checkpoint."""

    def __init__(self, c_in, c_out, kernel=1, stride=1, padding=0, groups=1, linear=False):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        if not linear:
            self.prelu = nn.PReLU(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.prelu(x) if hasattr(self, "prelu") else x


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``hidden`` -> depthwise 3x3 (stride) -> linear 1x1 project."""

    def __init__(self, c_in: int, c_out: int, hidden: int, stride: int, residual: bool):
        super().__init__()
        self.residual = residual
        self.conv = ConvBN(c_in, hidden)
        self.conv_dw = ConvBN(hidden, hidden, 3, stride, 1, groups=hidden)
        self.project = ConvBN(hidden, c_out, linear=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.conv_dw(self.conv(x)))
        return x + y if self.residual else y


class ResidualStack(nn.Module):
    """``n`` residual stride-1 DepthWise blocks, stored under ``model.<i>``."""

    def __init__(self, channels: int, n: int, hidden: int):
        super().__init__()
        self.model = nn.Sequential(*(DepthWise(channels, channels, hidden, 1, True) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MobileFaceNet(_MinusOneToOne, Recognizer):
    """MobileFaceNet (Chen et al. 2018) as in InsightFace_Pytorch: 112 px in, 512-D out, ~1M parameters.

    The 7x7 global depthwise conv (``conv_6_dw``) replaces pooling so that position information survives.
    """

    def __init__(self, embedding_size: int = 512, name: str = "mobileface_zoo"):
        super().__init__()
        self.name = name
        self.template = ARCFACE_TEMPLATE_112.copy()
        self.conv1 = ConvBN(3, 64, 3, 2, 1)
        self.conv2_dw = ConvBN(64, 64, 3, 1, 1, groups=64)
        self.conv_23 = DepthWise(64, 64, 128, 2, False)
        self.conv_3 = ResidualStack(64, 4, 128)
        self.conv_34 = DepthWise(64, 128, 256, 2, False)
        self.conv_4 = ResidualStack(128, 6, 256)
        self.conv_45 = DepthWise(128, 128, 512, 2, False)
        self.conv_5 = ResidualStack(128, 2, 256)
        self.conv_6_sep = ConvBN(128, 512)
        self.conv_6_dw = ConvBN(512, 512, 7, 1, 0, groups=512, linear=True)
        self.linear = nn.Linear(512, embedding_size, bias=False)
        self.bn = nn.BatchNorm1d(embedding_size)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = self._prepare(crops)
        for stage in (self.conv1, self.conv2_dw, self.conv_23, self.conv_3, self.conv_34, self.conv_4,
                      self.conv_45, self.conv_5, self.conv_6_sep, self.conv_6_dw):
            x = stage(x)
        return self.bn(self.linear(x.flatten(1)))


# ------------------------------------------------------------------------------------- Inception-ResNet-v1


class BasicConv(nn.Module):
    """Bias-free conv + BN(eps=1e-3, the TensorFlow value the weights were trained with) + ReLU."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class InceptionResidual(nn.Module):
    """Residual inception block: parallel branches, concatenated, 1x1 ``conv2d`` (with bias), scaled, added.

    ``kind`` picks the block of the network: "35" (256 ch, three branches), "17" (896 ch, 1x7/7x1) or
    "8" (1792 ch, 1x3/3x1). ``relu=False`` is the network's very last block.
    """

    def __init__(self, kind: str, scale: float, relu: bool = True):
        super().__init__()
        self.scale, self.relu = scale, relu
        if kind == "35":
            c, b = 256, 32
            self.branch0 = BasicConv(c, b, 1)
            self.branch1 = nn.Sequential(BasicConv(c, b, 1), BasicConv(b, b, 3, 1, 1))
            self.branch2 = nn.Sequential(BasicConv(c, b, 1), BasicConv(b, b, 3, 1, 1), BasicConv(b, b, 3, 1, 1))
            cat = 3 * b
        elif kind == "17":
            c, b = 896, 128
            self.branch0 = BasicConv(c, b, 1)
            self.branch1 = nn.Sequential(BasicConv(c, b, 1), BasicConv(b, b, (1, 7), 1, (0, 3)),
                                  BasicConv(b, b, (7, 1), 1, (3, 0)))
            cat = 2 * b
        elif kind == "8":
            c, b = 1792, 192
            self.branch0 = BasicConv(c, b, 1)
            self.branch1 = nn.Sequential(BasicConv(c, b, 1), BasicConv(b, b, (1, 3), 1, (0, 1)),
                                  BasicConv(b, b, (3, 1), 1, (1, 0)))
            cat = 2 * b
        else:
            raise ValueError(f"unknown inception block kind {kind!r}")
        self.conv2d = nn.Conv2d(cat, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch0(x), self.branch1(x)]
        if hasattr(self, "branch2"):
            branches.append(self.branch2(x))
        out = self.conv2d(torch.cat(branches, 1)) * self.scale + x
        return F.relu(out) if self.relu else out


class Reduction(nn.Module):
    """Grid reduction (stride 2): conv branches plus a 3x3 max-pool branch that has no weights.

    "6a": 256 -> 896 channels; "7a": 896 -> 1792.
    """

    def __init__(self, kind: str):
        super().__init__()
        if kind == "6a":
            self.branch0 = BasicConv(256, 384, 3, 2)
            self.branch1 = nn.Sequential(BasicConv(256, 192, 1), BasicConv(192, 192, 3, 1, 1), BasicConv(192, 256, 3, 2))
        elif kind == "7a":
            self.branch0 = nn.Sequential(BasicConv(896, 256, 1), BasicConv(256, 384, 3, 2))
            self.branch1 = nn.Sequential(BasicConv(896, 256, 1), BasicConv(256, 256, 3, 2))
            self.branch2 = nn.Sequential(BasicConv(896, 256, 1), BasicConv(256, 256, 3, 1, 1), BasicConv(256, 256, 3, 2))
        else:
            raise ValueError(f"unknown reduction block kind {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.branch0(x), self.branch1(x)]
        if hasattr(self, "branch2"):
            outs.append(self.branch2(x))
        outs.append(F.max_pool2d(x, 3, 2))
        return torch.cat(outs, 1)


class InceptionResnetV1(Recognizer):
    """FaceNet's Inception-ResNet-v1 (facenet-pytorch layout), 160 px in, 512-D out.

    ``num_classes`` adds the ``logits`` classifier the checkpoints carry (8631 VGGFace2 identities); it is
    loaded for strictness but never used, since only the embedding matters here.
    """

    input_size = 160

    def __init__(self, num_classes: int | None = None, name: str = "facenet"):
        super().__init__()
        self.name = name
        self.template = template_for(self.input_size)
        self.conv2d_1a = BasicConv(3, 32, 3, 2)
        self.conv2d_2a = BasicConv(32, 32, 3, 1)
        self.conv2d_2b = BasicConv(32, 64, 3, 1, 1)
        self.conv2d_3b = BasicConv(64, 80, 1)
        self.conv2d_4a = BasicConv(80, 192, 3, 1)
        self.conv2d_4b = BasicConv(192, 256, 3, 2)
        self.repeat_1 = nn.Sequential(*(InceptionResidual("35", 0.17) for _ in range(5)))
        self.mixed_6a = Reduction("6a")
        self.repeat_2 = nn.Sequential(*(InceptionResidual("17", 0.10) for _ in range(10)))
        self.mixed_7a = Reduction("7a")
        self.repeat_3 = nn.Sequential(*(InceptionResidual("8", 0.20) for _ in range(5)))
        self.block8 = InceptionResidual("8", 1.0, relu=False)
        self.last_linear = nn.Linear(1792, 512, bias=False)
        self.last_bn = nn.BatchNorm1d(512, eps=1e-3)
        if num_classes:
            self.logits = nn.Linear(512, num_classes)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = resize_and_normalise(crops, self.input_size, 255.0 / 128.0, -127.5 / 128.0)
        x = self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x)))
        x = F.max_pool2d(x, 3, 2)
        x = self.conv2d_4b(self.conv2d_4a(self.conv2d_3b(x)))
        x = self.repeat_3(self.mixed_7a(self.repeat_2(self.mixed_6a(self.repeat_1(x)))))
        x = F.adaptive_avg_pool2d(self.block8(x), 1).flatten(1)
        return self.last_bn(self.last_linear(x))


# ------------------------------------------------------------------------------------------------- loading

ZOO_ALIASES = {
    "irse50": "irse50", "ir_se50": "irse50", "ir-se-50": "irse50",
    "ir152": "ir152", "ir_152": "ir152",
    # "mobileface" alone names the TensorFlow.js MobileFace in the registry (face/tfjs_recognizers.py).
    "mobileface_zoo": "mobileface_zoo", "mobile_face": "mobileface_zoo", "mobile-face": "mobileface_zoo",
    "facenet": "facenet",
    "facenet_vggface2": "facenet_vggface2", "facenet-vggface2": "facenet_vggface2", "vggface2": "facenet_vggface2",
}
ZOO_NAMES = ("irse50", "ir152", "mobileface_zoo", "facenet", "facenet_vggface2")


def canonical_name(name: str) -> str:
    """The zoo's name for ``name`` (case and separator aliases accepted); ModelError for unknown names."""
    key = str(name).strip().lower()
    if key not in ZOO_ALIASES:
        raise ModelError(f"unknown zoo recogniser {name!r}; choose one of {', '.join(ZOO_NAMES)}")
    return ZOO_ALIASES[key]


def build_zoo_model(name: str, num_classes: int | None = None) -> Recognizer:
    """A randomly initialised zoo architecture (eval mode). ``num_classes`` only matters for FaceNet."""
    name = canonical_name(name)
    if name == "irse50":
        model = IRBackbone(50, se=True, name="irse50")
    elif name == "ir152":
        model = IRBackbone(152, se=False, name="ir152")
    elif name == "mobileface_zoo":
        model = MobileFaceNet()
    else:
        model = InceptionResnetV1(num_classes=num_classes, name=name)
    return model.eval()


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")


def read_state_dict(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    """Tensors of a checkpoint file, unwrapped from ``{"state_dict": ...}`` / ``{"model": ...}`` and with a
    ``module.`` (DataParallel) prefix removed. Only tensors are accepted (``weights_only`` unpickling), so a
    checkpoint cannot run code on load.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"recogniser checkpoint {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            obj = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors errors all mean "not a readable state dict"
        raise ModelError(f"cannot read recogniser checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ModelError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    state = OrderedDict()
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[_strip_prefix(str(key))] = value
    return state


def _strip_prefix(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def state_dict_mismatches(model: nn.Module, state: dict, limit: int = 5) -> list[str]:
    """Human-readable differences between ``model``'s state dict and ``state`` (at most ``limit`` of each kind).

    BatchNorm's ``num_batches_tracked`` counters are optional: checkpoints saved before PyTorch 0.4.1 lack
    them and they do not affect inference.
    """
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return problems


def load_zoo_recognizer(name: str, path: str | os.PathLike, device: str | torch.device = "cpu") -> Recognizer:
    """A zoo recogniser with the weights of ``path`` loaded strictly, in eval mode, frozen, on ``device``.

    The parameters are frozen (``requires_grad=False``) because attacks need gradients with respect to the
    pixels only; gradients still flow through the module.
    """
    canonical = canonical_name(name)
    state = read_state_dict(path)
    num_classes = None
    if canonical.startswith("facenet") and "logits.weight" in state:
        num_classes = int(state["logits.weight"].shape[0])
    model = build_zoo_model(canonical, num_classes=num_classes)
    problems = state_dict_mismatches(model, state)
    if problems:
        raise ModelError(f"{os.fspath(path)} is not a {canonical} checkpoint: " + "; ".join(problems))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # anything the pre-check missed
        raise ModelError(f"{os.fspath(path)} does not load into {canonical}: {exc}") from exc
    model.requires_grad_(False)
    return model.to(device).eval()
