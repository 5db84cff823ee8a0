"""CAP's style term: Gram matrices of a feature network's first layers, and how far a photo set's styles spread.

    L_style = 1/N sum_i sum_l || G^l(x'_i) - mean_j G^l(x'_j) ||_F^2,   G^l = F F^T / (C H W)   (F: [C, H W])

Feature networks: VGG-19's first five conv layers (ReLU outputs of conv1_1, conv1_2, conv2_1, conv2_2, conv3_1,
ImageNet normalisation) from a user-supplied torchvision-layout state dict, read without torchvision; else the
attacked model's VAE encoder (conv_in and the resnets of its first down block). The Gram gradient of photo i needs
only G_i and the set's mean Gram, so :func:`style_gradient` is micro-batched (the mean is computed first, without
gradient). protect.py's ascent (ascent.py) uses it from ``ProtectConfig.cap_first_step`` on.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..errors import InputError

FEATURES_VGG, FEATURES_VAE = "vgg19", "vae-encoder"
# torchvision's vgg19().features indices: conv layers at 0, 2, 5, 7, 10 (the first five); ReLU right after each.
VGG19_LAYOUT = (("conv", 3, 64), ("relu",), ("conv", 64, 64), ("relu",), ("pool",),
                ("conv", 64, 128), ("relu",), ("conv", 128, 128), ("relu",), ("pool",),
                ("conv", 128, 256), ("relu",))
VGG19_STYLE_OUTPUTS = (1, 3, 6, 8, 11)          # ReLU outputs of conv1_1, conv1_2, conv2_1, conv2_2, conv3_1
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def gram(features: torch.Tensor) -> torch.Tensor:
    """Gram matrices ``[B, C, C]`` of feature maps ``[B, C, H, W]``, normalised by C*H*W (float32)."""
    b, c, h, w = features.shape
    f = features.float().reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def style_spread(grams: list[torch.Tensor]) -> torch.Tensor:
    """L_style of a set: per layer ``[N, C, C]``, mean over images of ||G_i - mean G||_F^2, summed over layers."""
    return sum(((g - g.mean(0, keepdim=True)) ** 2).sum(dim=(1, 2)).mean() for g in grams)


def relative_scale(grad_rec: torch.Tensor, grad_style: torch.Tensor) -> float:
    """Factor that gives the style gradient the reconstruction gradient's mean absolute value (over the set), so
    that ratio r = 1 weighs both equally whatever the feature network, resolution and Gram normalisation."""
    den = float(grad_style.abs().mean())
    return float(grad_rec.abs().mean()) / den if den > 0 else 0.0


class VGG19Style(nn.Module):
    """The first layers of torchvision's ``vgg19().features`` (same indices, same ``features.N.weight`` keys),
    built in plain torch; ``forward`` returns the ReLU outputs of its first five conv layers."""

    name = FEATURES_VGG

    def __init__(self):
        super().__init__()
        layers = []
        for spec in VGG19_LAYOUT:
            if spec[0] == "conv":
                layers.append(nn.Conv2d(spec[1], spec[2], 3, padding=1))
            elif spec[0] == "relu":
                layers.append(nn.ReLU())
            else:
                layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x.float() - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG19_STYLE_OUTPUTS:
                out.append(h)
        return out


def load_vgg19(path, device="cpu") -> VGG19Style:
    """VGG19Style with the weights of a torchvision-layout VGG-19 state dict file (``.pth``/``.pt`` read with
    ``torch.load(weights_only=True)``, or ``.safetensors``); keys ``features.N.weight|bias``, others ignored."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"VGG-19 weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot read VGG-19 weights {path}: {exc.__class__.__name__}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{path} is not a state dict (expected keys like features.0.weight)")
    net = VGG19Style()
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise InputError(f"{path} is not a torchvision VGG-19 state dict: missing {', '.join(missing[:4])}")
    wrong = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise InputError(f"{path}: {k} has shape {tuple(state[k].shape)}, VGG-19 has {tuple(own[k].shape)}")
    net.load_state_dict({k: state[k].float() for k in own})
    return net.to(device).eval().requires_grad_(False)


class VAEEncoderStyle(nn.Module):
    """Early features of the attacked model's VAE encoder: conv_in, then each resnet of its first down block."""

    name = FEATURES_VAE

    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.encoder

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        dtype = next(self.encoder.parameters()).dtype
        h = self.encoder.conv_in((x * 2 - 1).to(dtype))
        out = [h]
        for resnet in self.encoder.down_blocks[0].resnets:
            h = resnet(h, None)
            out.append(h)
        return out


def style_network(bundle, vgg19_path=None):
    """The CAP feature network: VGG-19 from ``vgg19_path`` when given, else the VAE encoder's early layers."""
    if vgg19_path:
        return load_vgg19(vgg19_path, bundle.device)
    return VAEEncoderStyle(bundle.vae)


def set_grams(net, x: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Per layer ``[N, C, C]`` Gram matrices of a set, ``batch`` images at a time, without gradient."""
    per_layer = None
    with torch.no_grad():
        for lo in range(0, x.shape[0], batch):
            grams = [gram(f) for f in net(x[lo:lo + batch])]
            per_layer = [[g] for g in grams] if per_layer is None else [p + [g] for p, g in zip(per_layer, grams)]
    return [torch.cat(p) for p in per_layer]


def style_gradient(net, x: torch.Tensor, batch: int):
    """(d L_style / d x, L_style): photo i's gradient is that of 1/N sum_l ||G_i - mean G||^2 with the mean held
    fixed (the mean's own terms cancel, since sum_i (G_i - mean G) = 0), so it is computed ``batch`` at a time."""
    grams = set_grams(net, x, batch)
    means = [g.mean(0, keepdim=True) for g in grams]
    n = x.shape[0]
    grad = torch.zeros_like(x)
    for lo in range(0, n, batch):
        xb = x[lo:lo + batch].detach().requires_grad_(True)
        loss = sum(((gram(f) - m) ** 2).sum() for f, m in zip(net(xb), means)) / n
        grad[lo:lo + batch], = torch.autograd.grad(loss, xb)
    return grad, float(style_spread(grams))


def measure_style_spread(net, x: torch.Tensor, batch: int = 1) -> float:
    """L_style (the Gram-matrix spread across the set) of images ``x``; no gradient."""
    with torch.inference_mode(False):
        return float(style_spread(set_grams(net, x, batch)))
