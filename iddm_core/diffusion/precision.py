"""Precision policy: which dtype autocast uses on which device, and the pieces that keep low precision safe.

    CUDA, compute capability >= 8.0 (Ampere, Ada, Hopper):  bf16 autocast; no loss scaling needed
    CUDA, compute capability <  8.0 (Pascal, Turing, Volta): fp16 autocast; loss scaled before the backward pass,
                                                              VAE outside autocast (fp16 overflows in its decoder)
    CPU and everything else:                                  fp32 (autocast would only slow convolutions down)

SDXL's VAE is the one that overflows worst in fp16 (NaN/inf in its decoder); weights are loaded in fp32, so the fp16
row's VAE-outside-autocast keeps it in fp32 too, and bf16 (fp32's exponent range) does not overflow.

``torch.cuda.is_bf16_supported()`` is not used to decide: it answers True on pre-Ampere cards, where bf16 is
emulated (slow, no bf16 convolution kernels). The capability is the honest test.

Sign-PGD only needs the sign of the gradient, so scaling the loss by any positive number changes nothing but
rescues gradients that would underflow to zero in fp16 (``sign(0) = 0``: the step would silently do nothing).
:class:`LossScale` keeps the scale dynamic, like ``torch.amp.GradScaler`` does for optimisers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import InputError

MODES = ("auto", "no", "fp16", "bf16")
BF16_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class Precision:
    """What one device runs in. ``dtype`` None means fp32 (no autocast)."""

    device_type: str
    dtype: Optional[torch.dtype] = None
    vae_fp32: bool = False        # run the VAE outside autocast (fp16 overflows in the SD VAE decoder)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    @property
    def scales_loss(self) -> bool:
        """fp16 needs loss scaling (GradScaler for training, :class:`LossScale` for PGD); bf16 and fp32 do not."""
        return self.dtype == torch.float16

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def vae(self):
        """Context for VAE calls: fp32 where the policy says fp16 would overflow, otherwise the ambient autocast."""
        if self.dtype is not None and self.vae_fp32:
            return torch.autocast(self.device_type, enabled=False)
        return contextlib.nullcontext()


FP32_CPU = Precision("cpu")


def choose_precision(device_type: str, capability: Optional[tuple] = None, mode: str = "auto") -> Precision:
    """The policy for a device, as a pure function (``capability`` = CUDA compute capability, e.g. (8, 6)).

    ``mode``: "auto" (the table in the module docstring), "no" (fp32), "fp16", or "bf16". "bf16" on a CUDA
    card below 8.0 is refused (emulated: slow, and no bf16 convolutions). On CPU, "bf16"/"fp16" are honoured
    (CPU autocast exists; tests use it), "auto" is fp32.
    """
    if mode not in MODES:
        raise InputError(f"mixed_precision={mode!r}: use one of {', '.join(MODES)}")
    if mode == "no":
        return Precision(device_type)
    if device_type != "cuda":
        if mode == "auto":
            return Precision(device_type)
        dtype = torch.bfloat16 if mode == "bf16" else torch.float16
        return Precision(device_type, dtype, vae_fp32=dtype == torch.float16)
    native_bf16 = capability is not None and tuple(capability) >= BF16_MIN_CAPABILITY
    if mode == "bf16" and not native_bf16:
        cc = ".".join(map(str, capability)) if capability else "unknown"
        raise InputError(f"mixed_precision='bf16': this GPU (compute capability {cc}) has no native bf16 "
                         "(it needs 8.0 or newer); use 'fp16' or 'auto'")
    if mode == "bf16" or (mode == "auto" and native_bf16):
        return Precision("cuda", torch.bfloat16)
    return Precision("cuda", torch.float16, vae_fp32=True)


FROZEN_HALF_PARTS = ("unet", "text_encoder", "text_encoder_2")


def weight_dtypes(precision: Precision) -> dict:
    """Storage dtype of the frozen base weights, per ``ModelBundle`` part: under mixed precision the UNet and the
    text encoders are kept in the autocast dtype (their matmuls run in it anyway; SDXL's 3.4 G of them take
    6.5 GiB instead of 13), the VAE stays fp32 (fp16 overflows in its decoder; it is small). fp32 policy: {}.
    The LoRA weights are trained in fp32 whatever the base dtype (lora.add_lora)."""
    if precision.dtype is None:
        return {}
    return {part: precision.dtype for part in FROZEN_HALF_PARTS}


def cuda_capability(device) -> Optional[tuple]:
    """The CUDA compute capability of ``device`` (e.g. (8, 6)); None for any other device."""
    device = torch.device(device)
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def precision_for(device, mode: str = "auto") -> Precision:
    """:func:`choose_precision` for a real ``torch.device``: the precision alone, for code that has no run (a run
    decides its whole :class:`~.runtime.Runtime` once instead)."""
    return choose_precision(torch.device(device).type, cuda_capability(device), mode)


class LossScale:
    """Dynamic loss scale for gradients taken with ``torch.autograd.grad`` under fp16.

    Start high; halve after a non-finite gradient; double after ``growth_interval`` finite ones in a row.
    With ``enabled=False`` the scale is 1 and never changes.
    """

    def __init__(self, enabled: bool, init: float = 2.0 ** 16, growth_interval: int = 20,
                 max_scale: float = 2.0 ** 24):
        self.enabled = enabled
        self.value = float(init) if enabled else 1.0
        self.growth_interval = growth_interval
        self.max_scale = max_scale
        self._good = 0

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.value = max(1.0, self.value / 2)
            self._good = 0
            return
        self._good += 1
        if self._good >= self.growth_interval:
            self.value = min(self.max_scale, self.value * 2)
            self._good = 0


def all_finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)
