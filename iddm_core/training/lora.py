"""LoRA adapters for training (PEFT) and the kohya-ss ``.safetensors`` format users load in ComfyUI / A1111.

Why two representations: PEFT injects trainable low-rank layers into the diffusers UNet / CLIP text encoder
(fast, well tested, handles Linear and 1x1 Conv), while every Stable Diffusion front end reads the kohya layout
(``lora_unet_<path>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``). The conversion is written here from
the PEFT layers themselves, so the exported file is exactly what was trained.

Scale convention: PEFT multiplies ``B @ A`` by ``lora_alpha / r``; kohya multiplies ``up @ down`` by
``alpha / dim``. Writing PEFT's ``lora_alpha`` as the kohya ``alpha`` makes the two identical.

SDXL: kohya-ss trains SDXL on the original (SGM) UNet, so its files name UNet modules by the original paths
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``); we train the diffusers UNet and rename each
module through :func:`iddm_core.diffusion.sd_keys.unet_key_to_ldm`, the same map that writes SGM checkpoints. The two text
encoders are ``lora_te1_`` (CLIP ViT-L) and ``lora_te2_`` (ViT-bigG), both in HF CLIP naming as kohya writes them.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_write, check_writable
from ..errors import InputError, ModelError
from ..diffusion.models import SDXL_KINDS
from ..requirements_check import require

require("peft")        # a peft too new for this transformers / accelerate fails here, naming the fix

ADAPTER = "iddm"
UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
TE1_PREFIX, TE2_PREFIX = "lora_te1_", "lora_te2_"   # SDXL's two text encoders
UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
UNET_PROJ = ("proj_in", "proj_out")
UNET_FF = ("ff.net.0.proj", "ff.net.2")
TE_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")

KOHYA_KEY = re.compile(r"^lora_(unet|te|te1|te2)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
# what kohya-ss would name on an SD1/SD2 diffusers UNet / CLIP text encoder (module paths with "." -> "_")
KOHYA_UNET_MODULE = re.compile(
    r"^lora_unet_(down_blocks_\d+|mid_block|up_blocks_\d+)_attentions_\d+_"
    r"(proj_in|proj_out|transformer_blocks_\d+_(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))$")
KOHYA_TE_MODULE = re.compile(
    r"^lora_te_text_model_encoder_layers_\d+_(self_attn_(q_proj|k_proj|v_proj|out_proj)|mlp_fc[12])$")
# SDXL (kohya's SGM UNet): original module paths; attention sits at slot 1 of an input/output block
KOHYA_SDXL_UNET_MODULE = re.compile(
    r"^lora_unet_(input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)_"
    r"(proj_in|proj_out|transformer_blocks_\d+_(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))$")
KOHYA_SDXL_TE_MODULE = re.compile(
    r"^lora_te[12]_text_model_encoder_layers_\d+_(self_attn_(q_proj|k_proj|v_proj|out_proj)|mlp_fc[12])$")

# kind -> (ss_base_model_version, ss_v2, modelspec.architecture, modelspec.prediction_type)
BASE_INFO = {
    "sd1": ("sd_v1", "False", "stable-diffusion-v1/lora", "epsilon"),
    "sd2": ("sd_v2", "True", "stable-diffusion-v2-512/lora", "epsilon"),
    "sd2v": ("sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "v"),
    "sdxl": ("sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora", "epsilon"),
    "sdxl-v": ("sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora", "v"),
}
# The shapes of the real Stable Diffusion UNets: (block_out_channels, cross_attention_dim) per kind. A base with
# another shape (the pack's demo model, the tiny test models) gets the "custom" labels below, so that web UIs do
# not offer its LoRA for real checkpoints (it cannot apply to them: every layer's shape differs).
STANDARD_UNETS = {
    "sd1": ((320, 640, 1280, 1280), 768),
    "sd2": ((320, 640, 1280, 1280), 1024),
    "sd2v": ((320, 640, 1280, 1280), 1024),
    "sdxl": ((320, 640, 1280), 2048),
    "sdxl-v": ((320, 640, 1280), 2048),
}
# How A1111 1.10.1 files a LoRA (extensions-builtin/Lora/network.py, NetworkOnDisk.detect_version): SDXL when
# ss_base_model_version starts with "sdxl_", else SD2 when ss_v2 is "True", else SD1 when there is any metadata;
# its Lora tab then lists a LoRA only for checkpoints of that version. Forge reads the same keys (plus exact
# modelspec.architecture values). There is no "none of these" for a file with metadata, so an SD1/SD2-shaped
# custom base is filed as SD2 (ss_v2 "True"; the least used family: hidden next to SD1 and SDXL checkpoints,
# where "Networks with errors" would follow) under its own ss_base_model_version and modelspec.architecture.
# ComfyUI reads none of these keys (it matches a LoRA by its tensor names). SDXL-shaped custom bases keep the
# SDXL file layout (kohya's SGM names) and so their SDXL labels.
CUSTOM_BASE_PREFIX = "iddm_custom_"          # ss_base_model_version = prefix + the family's own value
CUSTOM_ARCH_PREFIX = "iddm-custom-"          # modelspec.architecture = prefix + the family's own value

METADATA_KEYS = (
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2",
    "ss_output_name", "ss_training_comment", "sshs_model_hash", "sshs_legacy_hash",
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
    "modelspec.resolution", "modelspec.prediction_type", "modelspec.date",
)


@dataclass
class LoraSpec:
    """Which layers get a LoRA and how big it is. ``alpha=None`` means alpha = rank (scale 1)."""

    rank: int = 4
    alpha: float | None = None
    include_proj: bool = False
    include_ff: bool = False
    train_text_encoder: bool = False
    unet_targets: tuple = field(default=UNET_ATTN)

    def __post_init__(self):
        if int(self.rank) < 1:
            raise InputError(f"LoRA rank must be >= 1 (got {self.rank})")
        self.rank = int(self.rank)
        self.alpha = float(self.rank if self.alpha is None else self.alpha)
        if self.alpha <= 0:
            raise InputError(f"LoRA alpha must be > 0 (got {self.alpha})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def unet_modules(self) -> list[str]:
        return list(self.unet_targets) + list(UNET_PROJ if self.include_proj else ()) + \
            list(UNET_FF if self.include_ff else ())


# ---------------------------------------------------------------- injection and state

def _lora_layers(module: torch.nn.Module):
    """(module path, PEFT LoRA layer) for every layer holding our adapter, in module order."""
    from peft.tuners.lora import LoraLayer

    for name, sub in module.named_modules():
        if isinstance(sub, LoraLayer) and ADAPTER in sub.lora_A:
            yield name, sub


def _parts(bundle) -> list[tuple[str, torch.nn.Module]]:
    parts = [("unet", bundle.unet), ("text_encoder", bundle.text_encoder)]
    if getattr(bundle, "text_encoder_2", None) is not None:   # SDXL
        parts.append(("text_encoder_2", bundle.text_encoder_2))
    return parts


def has_lora(bundle) -> bool:
    return any(True for _, m in _parts(bundle) for _ in _lora_layers(m))


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
    targets = [("unet", bundle.unet, spec.unet_modules())]
    if spec.train_text_encoder:
        targets += [(part, module, list(TE_ATTN)) for part, module in _parts(bundle)[1:]]
    for _, module in _parts(bundle):
        module.requires_grad_(False)
    bundle.vae.requires_grad_(False)
    devices = [bundle.device] if bundle.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for part, module, names in targets:
            config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights=True,
                                target_modules=names, lora_dropout=0.0, bias="none")
            try:
                inject_adapter_in_model(config, module, adapter_name=ADAPTER)
            except ValueError as exc:
                raise ModelError(f"cannot add LoRA to the {part}: {exc}") from exc
    params = lora_parameters(bundle)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_parameters(bundle) -> list[torch.nn.Parameter]:
    """All LoRA weights (UNet first, then text encoder(s)) in a stable order, for the optimizer."""
    params = []
    for _, module in _parts(bundle):
        for _, layer in _lora_layers(module):
            params += [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
    return params


def get_lora_state(bundle) -> dict[str, torch.Tensor]:
    """Cloned LoRA weights keyed ``<part>.<module path>.lora_A|lora_B`` (for checkpoints and resume)."""
    state = {}
    for part, module in _parts(bundle):
        for name, layer in _lora_layers(module):
            state[f"{part}.{name}.lora_A"] = layer.lora_A[ADAPTER].weight.detach().clone()
            state[f"{part}.{name}.lora_B"] = layer.lora_B[ADAPTER].weight.detach().clone()
    return state


def set_lora_state(bundle, state: dict[str, torch.Tensor]) -> None:
    """Copy weights from :func:`get_lora_state` back in place (the optimizer keeps its parameter objects)."""
    expected = {f"{part}.{name}.{ab}" for part, m in _parts(bundle) for name, _ in _lora_layers(m)
                for ab in ("lora_A", "lora_B")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ModelError(f"LoRA state does not match the model's adapters (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for part, module in _parts(bundle):
            for name, layer in _lora_layers(module):
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
    layers = [layer for _, m in _parts(bundle) for _, layer in _lora_layers(m)]
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


# ---------------------------------------------------------------- kohya export

def _canonical_path(name: str, prefix: str) -> str:
    """transformers 5 flattened ``CLIPTextModel`` (``encoder.layers...``); kohya files always use the
    transformers 4 path ``text_model.encoder.layers...``, so text-encoder names are normalised to it."""
    if prefix != UNET_PREFIX and not name.startswith("text_model."):
        return "text_model." + name
    return name


def sdxl_unet_module_path(name: str, config) -> str:
    """A diffusers SDXL UNet module path -> its original (SGM) path, e.g. ``down_blocks.1.attentions.0.proj_in``
    -> ``input_blocks.4.1.proj_in``; derived from the checkpoint key map in :mod:`.sd_keys`."""
    from ..diffusion import sd_keys

    key = sd_keys.unet_key_to_ldm(name + ".weight", config)
    return key[len(sd_keys.UNET_PREFIX):-len(".weight")]


def _kohya_module_name(bundle, part: str, name: str) -> str:
    """The kohya module name (``lora_unet_...`` / ``lora_te_...`` / ``lora_te1_...`` / ``lora_te2_...``)."""
    sdxl = getattr(bundle, "text_encoder_2", None) is not None or getattr(bundle, "kind", None) in SDXL_KINDS
    if part == "unet":
        path = sdxl_unet_module_path(name, bundle.unet.config) if sdxl else name
        return UNET_PREFIX + path.replace(".", "_")
    prefix = {"text_encoder": TE1_PREFIX if sdxl else TE_PREFIX, "text_encoder_2": TE2_PREFIX}[part]
    return prefix + _canonical_path(name, prefix).replace(".", "_")


def kohya_state_dict(bundle, spec: LoraSpec, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The trained adapter in kohya-ss naming, built from the PEFT layers.

    ``lora_down`` = PEFT ``lora_A`` (in -> rank), ``lora_up`` = ``lora_B`` (rank -> out); 1x1 conv LoRAs keep
    their 4-D shapes as kohya stores them. ``alpha`` is read from each layer and must match ``spec`` (a mismatch
    would silently change the strength of the LoRA in every front end). SDXL UNet modules get their original
    (SGM) names and the encoders ``lora_te1_`` / ``lora_te2_``, as kohya-ss writes SDXL LoRAs.
    """
    out = {}
    for part, module in _parts(bundle):
        for name, layer in _lora_layers(module):
            key = _kohya_module_name(bundle, part, name)
            alpha = float(layer.lora_alpha[ADAPTER])
            rank = int(layer.r[ADAPTER])
            if rank != spec.rank or abs(alpha - spec.alpha) > 1e-6:
                raise ModelError(f"LoRA on {name} has rank {rank}, alpha {alpha}; spec says {spec.rank}, {spec.alpha}")
            out[f"{key}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    if not out:
        raise ModelError("the model has no LoRA adapter to export; train one first")
    return out


def _sha256_after_header(blob: bytes) -> str:
    """sd-webui-additional-networks' "new" hash: SHA-256 of the tensor bytes (everything after the JSON header)."""
    header_len = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header_len:]).hexdigest()


def _legacy_hash(blob: bytes) -> str:
    """The "legacy" hash: first 8 hex digits of SHA-256 over the 64 KiB at offset 1 MiB (empty past EOF)."""
    return hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as kohya-ss precomputes them: the file is serialised with only
    the ``ss_*`` metadata (so later user edits of other metadata keep the hash), then hashed."""
    from safetensors.torch import save

    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    return _sha256_after_header(blob), _legacy_hash(blob)


def is_standard_base(bundle) -> bool:
    """Whether ``bundle``'s UNet has the shape of the real Stable Diffusion models of its kind (STANDARD_UNETS);
    False for the demo model and the tiny models, whose LoRAs fit no real checkpoint."""
    config = getattr(bundle.unet, "config", None)
    if config is None or bundle.kind not in STANDARD_UNETS:
        return False
    shape = (tuple(int(c) for c in config.get("block_out_channels", ())), config.get("cross_attention_dim"))
    return shape == STANDARD_UNETS[bundle.kind]


def base_labels(bundle) -> tuple[str, str, str, str]:
    """(ss_base_model_version, ss_v2, modelspec.architecture, modelspec.prediction_type) for ``bundle``; custom
    SD1/SD2-shaped bases get the labels that keep web UIs from offering the LoRA for real checkpoints."""
    if bundle.kind not in BASE_INFO:
        raise ModelError(f"unknown model kind {bundle.kind!r}")
    version, v2, arch, pred = BASE_INFO[bundle.kind]
    pred = "v" if bundle.prediction_type == "v_prediction" else pred     # an SD1 v-prediction base (the demo model)
    if bundle.kind not in SDXL_KINDS and not is_standard_base(bundle):
        version, v2, arch = CUSTOM_BASE_PREFIX + version, "True", CUSTOM_ARCH_PREFIX + arch
    return version, v2, arch, pred


def build_metadata(bundle, spec: LoraSpec, output_name: str, comment: str = "",
                   date: datetime.datetime | None = None, resolution: int | None = None) -> dict[str, str]:
    """The kohya ``ss_*`` and SAI ``modelspec.*`` keys (hashes added by :func:`save_kohya_lora`).

    Only the LoRA name, the base model's title and training settings go in: never a photo's name or path.
    ``resolution``: the side the LoRA was trained at (default: the base model's native one).
    """
    version, v2, arch, pred = base_labels(bundle)
    resolution = int(resolution or bundle.resolution)
    date = date or datetime.datetime.now().replace(microsecond=0)
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": str(float(spec.alpha)),
        "ss_base_model_version": version,
        "ss_v2": v2,
        "ss_output_name": output_name,
        "ss_training_comment": comment,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": arch,
        "modelspec.implementation": "diffusers",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": pred,
        "modelspec.date": date.isoformat(),
    }


def save_kohya_lora(path, bundle, spec: LoraSpec, output_name: str, comment: str = "", overwrite: bool = False,
                    dtype: torch.dtype = torch.float16, resolution: int | None = None) -> Path:
    """Write the adapter as a kohya LoRA, atomically; refuses an existing file unless ``overwrite``.
    ``resolution``: the training side, written as ``modelspec.resolution`` (default: the base's native one)."""
    if not output_name or "/" in output_name or "\\" in output_name:
        raise InputError(f"LoRA name {output_name!r} must be a plain name (no folders)")
    check_writable(path, overwrite)
    tensors = kohya_state_dict(bundle, spec, dtype)
    metadata = build_metadata(bundle, spec, output_name, comment, resolution=resolution)
    model_hash, legacy_hash = kohya_hashes(tensors, metadata)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = model_hash, legacy_hash

    def write(tmp):
        from safetensors.torch import save_file

        save_file(tensors, tmp, metadata=metadata)

    return atomic_write(path, write, overwrite=overwrite)


# ---------------------------------------------------------------- reading and checking

def read_kohya_lora(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` LoRA; :class:`ModelError` naming the file if unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"cannot read LoRA {path}: {exc.__class__.__name__}: {exc}") from exc
    return tensors, metadata


def read_lora_metadata(path) -> dict[str, str]:
    """The metadata of a ``.safetensors`` LoRA without loading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"cannot read LoRA {path}: {exc.__class__.__name__}: {exc}") from exc


def _modules(tensors) -> dict[str, dict[str, torch.Tensor]]:
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, rest = key.partition(".")
        mods.setdefault(name, {})[rest] = value
    return mods


def _base_version(metadata: dict[str, str]) -> str:
    """ss_base_model_version without the custom-base prefix (the family's own value)."""
    version = metadata.get("ss_base_model_version", "")
    return version[len(CUSTOM_BASE_PREFIX):] if version.startswith(CUSTOM_BASE_PREFIX) else version


def _is_sdxl_file(metadata: dict[str, str]) -> bool:
    return _base_version(metadata).startswith("sdxl")


def check_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[str]:
    """Problems that would stop kohya-format readers (ComfyUI, A1111, diffusers) from applying the LoRA.

    The module names must fit the base model the metadata declares: SD1/SD2 files name the diffusers UNet and
    ``lora_te_``; SDXL files the original (SGM) UNet and ``lora_te1_`` / ``lora_te2_``.
    """
    problems = []
    bad = [k for k in tensors if not KOHYA_KEY.match(k)]
    if bad:
        problems.append(f"{len(bad)} key(s) not in kohya form, e.g. {bad[0]}")
    sdxl = _is_sdxl_file(metadata)
    for name, parts in _modules(tensors).items():
        if sdxl:
            if not (KOHYA_SDXL_UNET_MODULE.match(name) or KOHYA_SDXL_TE_MODULE.match(name)):
                problems.append(f"{name}: not an SDXL kohya module name")
        elif name.startswith((TE1_PREFIX, TE2_PREFIX)) or \
                name.startswith(UNET_PREFIX) and not KOHYA_UNET_MODULE.match(name) or \
                name.startswith(TE_PREFIX) and not KOHYA_TE_MODULE.match(name):
            problems.append(f"{name}: not an SD1/SD2 kohya module name")
        down, up, alpha = parts.get("lora_down.weight"), parts.get("lora_up.weight"), parts.get("alpha")
        if down is None or up is None:
            problems.append(f"{name}: lora_down/lora_up missing")
            continue
        if alpha is None or alpha.numel() != 1:
            problems.append(f"{name}: alpha missing or not a scalar")
        if down.dim() != up.dim() or down.dim() not in (2, 4) or up.shape[1] != down.shape[0] or \
                (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
            problems.append(f"{name}: up {tuple(up.shape)} and down {tuple(down.shape)} do not chain")
    missing = [k for k in METADATA_KEYS if k not in metadata]
    if missing:
        problems.append(f"metadata missing {', '.join(missing)}")
    extra = [k for k in metadata if k not in METADATA_KEYS]
    if extra:
        problems.append(f"unexpected metadata {', '.join(sorted(extra))}")
    if not tensors:
        problems.append("no tensors")
    return problems


def inspect_lora(path) -> dict:
    """A summary of a LoRA file and a compatibility verdict (``compatible`` + ``problems``)."""
    tensors, metadata = read_kohya_lora(path)
    mods = _modules(tensors)
    ranks = sorted({int(p["lora_down.weight"].shape[0]) for p in mods.values() if "lora_down.weight" in p})
    alphas = sorted({round(float(p["alpha"].float().reshape(-1)[0]), 6) for p in mods.values()
                     if "alpha" in p and p["alpha"].numel() == 1})
    kinds = {(v[0], v[3]): k for k, v in BASE_INFO.items()}
    version = _base_version(metadata)
    kind = kinds.get((version, metadata.get("modelspec.prediction_type", "")))
    if kind is None:   # SD1/SD2 versions name the kind on their own
        kind = {v[0]: k for k, v in BASE_INFO.items() if k not in SDXL_KINDS}.get(version, "unknown")
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    problems = check_kohya(tensors, metadata)
    modules = {"unet": sum(n.startswith(UNET_PREFIX) for n in mods),
               "te": sum(n.startswith((TE_PREFIX, TE1_PREFIX, TE2_PREFIX)) for n in mods)}
    if _is_sdxl_file(metadata) or any(n.startswith((TE1_PREFIX, TE2_PREFIX)) for n in mods):
        modules.update(te1=sum(n.startswith(TE1_PREFIX) for n in mods), te2=sum(n.startswith(TE2_PREFIX) for n in mods))
    return {
        "kind": kind,           # the base's family; "custom_base": a demo/tiny-shaped base, not a real checkpoint
        "custom_base": metadata.get("ss_base_model_version", "").startswith(CUSTOM_BASE_PREFIX),
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": alphas[0] if len(alphas) == 1 else alphas,
        "modules": modules,
        "tensors": len(tensors),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "size_bytes": os.path.getsize(path),
        "metadata": metadata,
        "compatible": not problems,
        "problems": problems,
    }

