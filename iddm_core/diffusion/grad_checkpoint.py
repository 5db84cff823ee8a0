"""Activation checkpointing for the UNet and both VAE halves, independent of diffusers' own switch.

diffusers' ``enable_gradient_checkpointing()`` is honoured only in training mode on some versions, and its VAE
encoder checkpoints whole down blocks (at 512 px one block holds several 512x512x128 activations). PGD runs
the models in eval mode, so this module wraps the ``forward`` of each residual block and each attention block
itself, for the duration of a ``with`` block: their inner activations are recomputed during the backward pass
instead of being kept (``torch.utils.checkpoint``, non-reentrant: keyword arguments and autocast are kept).
Gradients are the same as without checkpointing; only memory and time change.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint

# diffusers block classes whose activations dominate memory (names, so any diffusers version matches)
CHECKPOINTED_CLASSES = frozenset({"ResnetBlock2D", "Transformer2DModel", "Attention"})


def checkpoint_targets(*models: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost sub-modules of ``models`` whose class is in :data:`CHECKPOINTED_CLASSES` (an attention
    inside a checkpointed transformer block is not wrapped again)."""
    found = []
    for model in models:
        wrapped_prefixes: list[str] = []
        for name, module in model.named_modules():
            if type(module).__name__ not in CHECKPOINTED_CLASSES:
                continue
            if any(name.startswith(p + ".") for p in wrapped_prefixes):
                continue
            wrapped_prefixes.append(name)
            found.append(module)
    return found


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def activation_checkpointing(*models: torch.nn.Module, enabled: bool = True):
    """Within the block, the blocks of ``models`` recompute their activations in the backward pass."""
    if not enabled:
        yield
        return
    targets = [m for m in checkpoint_targets(*models) if "forward" not in m.__dict__]
    for m in targets:
        m.forward = functools.partial(_checkpointed, m.forward)
    try:
        yield
    finally:
        for m in targets:
            del m.forward


def check_setting(setting: str) -> str:
    """The word must be "auto", "yes" or "no"; InputError naming the parameter otherwise."""
    from ..errors import InputError

    if setting not in ("auto", "yes", "no"):
        raise InputError(f"gradient_checkpointing={setting!r}: use auto, yes or no")
    return setting


def use_checkpointing(setting: str, device) -> bool:
    """"auto" = on for CUDA (memory is the limit there), off elsewhere (it costs ~30% time); "yes" / "no".
    A run asks once, through runtime.Runtime.decide."""
    check_setting(setting)
    return setting == "yes" or (setting == "auto" and torch.device(device).type == "cuda")
