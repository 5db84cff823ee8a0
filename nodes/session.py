"""One Stable Diffusion model per run: free ComfyUI's memory, load, train or attack, release.

Why not reuse ComfyUI's loaded MODEL/CLIP/VAE: IDDM differentiates through the UNet, the VAE encoder and
decoder and trains PEFT LoRA adapters in place, which ComfyUI's patched, possibly low-VRAM-offloaded models do
not support. So the training nodes load their own diffusers copy through iddm_core and give the memory back
to ComfyUI at the end, whether the run finished, failed or was cancelled.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager

from .comfy_env import free_memory, release_memory, resolve_checkpoint, torch_device


@contextmanager
def training_model(ckpt_name: str, info=None, precision: str = "auto", callback=None):
    """Yield a ModelBundle of ``ckpt_name`` on ComfyUI's torch device, loaded once, released after.

    The frozen weights are stored as the precision policy says (bf16/fp16 UNet and text encoders on a GPU); with
    ``info`` (``validate_model``'s answer) a model whose weights cannot fit the memory left once ComfyUI's own
    models are unloaded is refused before loading (iddm_core.frontend.loaded_for_training, shared with A1111).
    ``callback``: the node's NodeProgress; it reports each loading step and raises on Cancel between them."""
    from ..iddm_core.events import report_setup
    from ..iddm_core.frontend import loaded_for_training

    path = resolve_checkpoint(ckpt_name)          # a missing file fails before anything is unloaded
    report_setup(callback, "free", "freeing ComfyUI's models")
    free_memory()
    try:
        with loaded_for_training(path, torch_device(), info=info, precision=precision, callback=callback) as bundle:
            yield bundle
    finally:
        release_memory()
        from ..iddm_core.memory import release_host_memory   # glibc keeps freed host memory: give it back

        release_host_memory()


def trainable_refs(refs):
    """A copy of PrivateRefs whose tensors are ordinary (not inference-mode) tensors.

    ComfyUI runs every node under ``torch.inference_mode()``; tensors made there cannot take part in autograd
    later, so the training code works on clones made inside ``torch.inference_mode(False)``."""
    return dataclasses.replace(refs, images=refs.images.clone(), landmarks=refs.landmarks.clone())
