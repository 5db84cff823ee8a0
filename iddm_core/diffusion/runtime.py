"""How one run uses the hardware, decided once: the device, the precision policy, activation checkpointing, and the
storage dtypes of the frozen weights.

A run (``iddm train``, ``iddm protect``, a node, a bench case) calls :meth:`Runtime.decide` once, from its settings
(``mixed_precision``, ``gradient_checkpointing``) and the device, and hands the one :class:`Runtime` to everything
that depends on it: the loader (``weight_dtypes``), the memory check (fit.py), the trainer, PGD and protect's ascent.
Underneath it is :func:`decide_runtime`, a pure function of the device, its CUDA compute capability and the two
settings, so the policy is testable without a GPU:

    precision:      precision.choose_precision (bf16 from compute capability 8.0, fp16 below, fp32 on the CPU)
    checkpointing:  grad_checkpoint.use_checkpointing ("auto" = on for CUDA only)
    weight dtypes:  precision.weight_dtypes (UNet and text encoders in the autocast dtype; VAE fp32)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .grad_checkpoint import use_checkpointing
from .precision import FP32_CPU, Precision, choose_precision, cuda_capability, weight_dtypes


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Runtime:
    """The device a run computes on, its precision policy and whether activations are checkpointed."""

    device: torch.device
    precision: Precision
    checkpointing: bool

    @classmethod
    def decide(cls, device, mixed_precision: str = "auto", gradient_checkpointing: str = "auto") -> "Runtime":
        """The runtime for a real device (reads its CUDA compute capability); InputError naming a bad setting."""
        return decide_runtime(device, cuda_capability(device), mixed_precision, gradient_checkpointing)

    @classmethod
    def for_settings(cls, settings, device) -> "Runtime":
        """:meth:`decide` from a config with ``mixed_precision`` and ``gradient_checkpointing`` fields (IDDMConfig,
        ProtectConfig, FinetuneConfig)."""
        return cls.decide(device, settings.mixed_precision, settings.gradient_checkpointing)

    @property
    def weight_dtypes(self) -> dict:
        """Storage dtype per ``ModelBundle`` part for the loader (``{}``: everything fp32)."""
        return weight_dtypes(self.precision)

    def describe(self) -> dict:
        """The report's keys: ``{"precision": "fp32" | "fp16" | "bf16", "gradient_checkpointing": bool}``."""
        return {"precision": self.precision.name, "gradient_checkpointing": self.checkpointing}


def decide_runtime(device, capability: Optional[tuple], mixed_precision: str = "auto",
                   gradient_checkpointing: str = "auto") -> Runtime:
    """The policy as a pure function of ``device`` (a ``torch.device`` or its name: its type decides),
    ``capability`` (its CUDA compute capability, e.g. (8, 6); None off CUDA) and the two settings."""
    device = torch.device(device)
    checkpointing = use_checkpointing(gradient_checkpointing, device)
    return Runtime(device, choose_precision(device.type, capability, mixed_precision), checkpointing)


# fp32, no checkpointing: the default of the lower-level functions (PGD, protect's ascent) when given none
FP32 = Runtime(torch.device("cpu"), FP32_CPU, False)
