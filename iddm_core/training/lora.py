"""LoRA adapters inside the model, for training: which layers (:class:`LoraSpec`), injection with PEFT, the
trainable parameters and their state (checkpoints, resume), and switching them off.

PEFT injects trainable low-rank layers into the diffusers UNet / CLIP text encoder(s) (Linear and Conv2d of any
kernel). The file front ends read, kohya-ss's layout, is written from these layers by :mod:`.kohya`; reading and
checking such files is :mod:`.kohya_check`.

LoCon (kohya-ss ``networks/lora.py`` with ``conv_dim``): ``conv_rank > 0`` adds, on top of the attention targets,
every Linear / Conv2d inside the UNet's ResnetBlock2D, Downsample2D and Upsample2D modules, as kohya-ss does: the
3x3 convolutions (``conv1``, ``conv2``, the samplers' ``conv``) get ``conv_rank`` / ``conv_alpha``, the others
(``time_emb_proj``, the 1x1 ``conv_shortcut``) the network's ``rank`` / ``alpha``. A conv LoRA's down layer is a
conv with the base layer's kernel, stride and padding and its up layer a 1x1 conv, in PEFT as in kohya.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..errors import InputError, ModelError
from ..requirements_check import require

require("peft")        # a peft too new for this transformers / accelerate fails here, naming the fix

ADAPTER = "iddm"
UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
UNET_PROJ = ("proj_in", "proj_out")
UNET_FF = ("ff.net.0.proj", "ff.net.2")
TE_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
# LoCon: the Linear / Conv2d children of diffusers' ResnetBlock2D, Downsample2D, Upsample2D (PEFT suffix targets)
UNET_RESNET = ("conv1", "conv2", "conv_shortcut", "time_emb_proj")
UNET_SAMPLERS = ("downsamplers.0.conv", "upsamplers.0.conv")
# Which of them have a 3x3 kernel (conv_rank / conv_alpha), as PEFT rank/alpha patterns: suffix regexes, since
# peft 0.11-0.13 match a pattern as ".*\.PATTERN$" and newer releases as "(.*\.)?(PATTERN)$"
CONV_PATTERNS = (r"resnets\.\d+\.conv[12]", r"(down|up)samplers\.0\.conv")


@dataclass
class LoraSpec:
    """Which layers get a LoRA and how big it is. ``alpha=None`` means alpha = rank (scale 1).

    ``conv_rank`` > 0 turns LoCon on (see the module docstring); ``conv_alpha=None`` means conv_alpha = conv_rank.
    """

    rank: int = 4
    alpha: float | None = None
    include_proj: bool = False
    include_ff: bool = False
    train_text_encoder: bool = False
    unet_targets: tuple = field(default=UNET_ATTN)
    conv_rank: int = 0
    conv_alpha: float | None = None

    def __post_init__(self):
        if int(self.rank) < 1:
            raise InputError(f"LoRA rank must be >= 1 (got {self.rank})")
        self.rank = int(self.rank)
        self.alpha = float(self.rank if self.alpha is None else self.alpha)
        if self.alpha <= 0:
            raise InputError(f"LoRA alpha must be > 0 (got {self.alpha})")
        if int(self.conv_rank) < 0 or int(self.conv_rank) != self.conv_rank:
            raise InputError(f"conv_rank must be a whole number >= 0, 0 = no conv LoRA (got {self.conv_rank})")
        self.conv_rank = int(self.conv_rank)
        if not self.conv_rank:
            if self.conv_alpha is not None:
                raise InputError(f"conv_alpha={self.conv_alpha} is set but conv_rank is 0 (no conv LoRA): "
                                 "set conv_rank too, or leave conv_alpha out")
            return
        self.conv_alpha = float(self.conv_rank if self.conv_alpha is None else self.conv_alpha)
        if self.conv_alpha <= 0:
            raise InputError(f"conv_alpha must be > 0 (got {self.conv_alpha})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def unet_modules(self) -> list[str]:
        return list(self.unet_targets) + list(UNET_PROJ if self.include_proj else ()) + \
            list(UNET_FF if self.include_ff else ()) + list(UNET_RESNET + UNET_SAMPLERS if self.conv_rank else ())

    def unet_patterns(self) -> tuple[dict, dict]:
        """PEFT ``(rank_pattern, alpha_pattern)`` of the UNet: the 3x3 convolutions of LoCon ({} without it)."""
        if not self.conv_rank:
            return {}, {}
        return {p: self.conv_rank for p in CONV_PATTERNS}, {p: self.conv_alpha for p in CONV_PATTERNS}

    def rank_alpha_for(self, base_layer: torch.nn.Module) -> tuple[int, float]:
        """The (rank, alpha) a LoRA on ``base_layer`` has under this spec: the conv pair for a kernel over 1x1."""
        kernel = getattr(base_layer, "kernel_size", (1, 1))
        if self.conv_rank and tuple(kernel) != (1, 1):
            return self.conv_rank, self.conv_alpha
        return self.rank, self.alpha


# ---------------------------------------------------------------- injection and state

def lora_layers(module: torch.nn.Module):
    """(module path, PEFT LoRA layer) for every layer holding our adapter, in module order."""
    from peft.tuners.lora import LoraLayer

    for name, sub in module.named_modules():
        if isinstance(sub, LoraLayer) and ADAPTER in sub.lora_A:
            yield name, sub



def model_parts(bundle) -> list[tuple[str, torch.nn.Module]]:
    """``[(part, module)]``: the UNet, the text encoder and, for SDXL, the second text encoder."""
    parts = [("unet", bundle.unet), ("text_encoder", bundle.text_encoder)]
    if getattr(bundle, "text_encoder_2", None) is not None:   # SDXL
        parts.append(("text_encoder_2", bundle.text_encoder_2))
    return parts


def has_lora(bundle) -> bool:
    return any(True for _, m in model_parts(bundle) for _ in lora_layers(m))


def _targets(bundle, spec: LoraSpec) -> list[tuple[str, torch.nn.Module, list[str], dict, dict]]:
    """``(part, module, target names, rank pattern, alpha pattern)`` for each part that gets a LoRA."""
    targets = [("unet", bundle.unet, spec.unet_modules(), *spec.unet_patterns())]
    if spec.train_text_encoder:
        targets += [(part, module, list(TE_ATTN), {}, {}) for part, module in model_parts(bundle)[1:]]
    return targets


def _check_ranks(bundle, spec: LoraSpec) -> None:
    """Every injected layer has the rank and alpha ``spec`` gives its kernel (a pattern that missed is a bug)."""
    for _, module in model_parts(bundle):
        for name, layer in lora_layers(module):
            got = int(layer.r[ADAPTER]), float(layer.lora_alpha[ADAPTER])
            want = spec.rank_alpha_for(layer.get_base_layer())
            if got[0] != want[0] or abs(got[1] - want[1]) > 1e-6:
                raise ModelError(f"LoRA on {name} has rank {got[0]}, alpha {got[1]}; expected {want[0]}, {want[1]}")


def add_lora(bundle, spec: LoraSpec, seed: int = 0) -> list[torch.nn.Parameter]:
    """Inject the ``"iddm"`` adapter (once) and freeze everything else; returns the trainable parameters.

    The adapter's random init (kaiming for ``lora_A``; ``lora_B`` is zero so training starts from the base
    model) uses ``seed`` in a forked RNG, so two runs with the same seed start from the same LoRA.
    LoRA weights are kept in float32 whatever the base dtype: fp16 master weights would lose small updates.
    Calling it again on the same bundle is a no-op (IDDM re-enters training many times without reloading).
    SDXL: ``train_text_encoder`` puts the text-encoder LoRA on both encoders.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if has_lora(bundle):
        return lora_parameters(bundle)
    for _, module in model_parts(bundle):
        module.requires_grad_(False)
    bundle.vae.requires_grad_(False)
    devices = [bundle.device] if bundle.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for part, module, names, rank_pattern, alpha_pattern in _targets(bundle, spec):
            config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights=True,
                                target_modules=names, lora_dropout=0.0, bias="none",
                                rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
            try:
                inject_adapter_in_model(config, module, adapter_name=ADAPTER)
            except ValueError as exc:
                raise ModelError(f"cannot add LoRA to the {part}: {exc}") from exc
    _check_ranks(bundle, spec)
    params = lora_parameters(bundle)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_parameters(bundle) -> list[torch.nn.Parameter]:
    """All LoRA weights (UNet first, then text encoder(s)) in a stable order, for the optimizer."""
    params = []
    for _, module in model_parts(bundle):
        for _, layer in lora_layers(module):
            params += [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
    return params


def get_lora_state(bundle) -> dict[str, torch.Tensor]:
    """Cloned LoRA weights keyed ``<part>.<module path>.lora_A|lora_B`` (for checkpoints and resume)."""
    state = {}
    for part, module in model_parts(bundle):
        for name, layer in lora_layers(module):
            state[f"{part}.{name}.lora_A"] = layer.lora_A[ADAPTER].weight.detach().clone()
            state[f"{part}.{name}.lora_B"] = layer.lora_B[ADAPTER].weight.detach().clone()
    return state


def set_lora_state(bundle, state: dict[str, torch.Tensor]) -> None:
    """Copy weights from :func:`get_lora_state` back in place (the optimizer keeps its parameter objects)."""
    expected = {f"{part}.{name}.{ab}" for part, m in model_parts(bundle) for name, _ in lora_layers(m)
                for ab in ("lora_A", "lora_B")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ModelError(f"LoRA state does not match the model's adapters (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for part, module in model_parts(bundle):
            for name, layer in lora_layers(module):
                for ab, dic in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
                    target = dic[ADAPTER].weight
                    value = state[f"{part}.{name}.{ab}"]
                    if value.shape != target.shape:
                        raise ModelError(f"LoRA state {part}.{name}.{ab} has shape {tuple(value.shape)}, "
                                         f"expected {tuple(target.shape)}")
                    target.copy_(value.to(target.device, target.dtype))


@contextlib.contextmanager
def lora_disabled(bundle):
    """Run the base model (e.g. to sample DreamBooth class images) without removing the adapters."""
    layers = [layer for _, m in model_parts(bundle) for _, layer in lora_layers(m)]
    trainable = [p.requires_grad for p in lora_parameters(bundle)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in zip(lora_parameters(bundle), trainable):
            p.requires_grad_(flag)
