"""The kohya-ss LoRA file every Stable Diffusion front end reads (ComfyUI, A1111/Forge, diffusers): module names,
tensors, metadata, hashes, and writing it from the trained PEFT layers of :mod:`.lora`.

Layout: ``lora_unet_<path>.lora_down.weight`` / ``lora_up.weight`` / ``alpha`` per module (``lora_te_`` for the
text encoder). The file is built from the PEFT layers themselves, so it is exactly what was trained.

Scale convention: PEFT multiplies ``B @ A`` by ``lora_alpha / r``; kohya multiplies ``up @ down`` by
``alpha / dim``. Writing PEFT's ``lora_alpha`` as the kohya ``alpha`` makes the two identical. A conv LoRA
(LoCon) keeps its 4-D shapes as kohya-ss stores them: ``lora_down`` with the base conv's kernel (3x3), ``lora_up``
1x1, and no ``lora_mid``; the file then says ``ss_network_args = {"conv_dim": ..., "conv_alpha": ...}``.

SDXL: kohya-ss trains SDXL on the original (SGM) UNet, so its files name UNet modules by the original paths
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``lora_unet_input_blocks_1_0_in_layers_2``); we
train the diffusers UNet and rename each module through :func:`iddm_core.diffusion.sd_keys.unet_key_to_ldm`, the
same map that writes SGM checkpoints. The two text encoders are ``lora_te1_`` (CLIP ViT-L) and ``lora_te2_``
(ViT-bigG), both in HF CLIP naming as kohya writes them. SD1/SD2 files name the diffusers UNet, as kohya-ss does.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

import torch

from ..atomic import atomic_write, check_writable
from ..diffusion.kinds import SDXL_KINDS
from ..errors import InputError, ModelError
from .lora import ADAPTER, LoraSpec, lora_layers, model_parts

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
TE1_PREFIX, TE2_PREFIX = "lora_te1_", "lora_te2_"   # SDXL's two text encoders

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
OPTIONAL_METADATA_KEYS = ("ss_network_args",)    # kohya-ss writes it only when network arguments were given


# ---------------------------------------------------------------- names

def _canonical_path(name: str, prefix: str) -> str:
    """transformers 5 flattened ``CLIPTextModel`` (``encoder.layers...``); kohya files always use the
    transformers 4 path ``text_model.encoder.layers...``, so text-encoder names are normalised to it."""
    if prefix != UNET_PREFIX and not name.startswith("text_model."):
        return "text_model." + name
    return name


def sdxl_unet_module_path(name: str, config) -> str:
    """A diffusers SDXL UNet module path -> its original (SGM) path, e.g. ``down_blocks.1.attentions.0.proj_in``
    -> ``input_blocks.4.1.proj_in``, ``down_blocks.0.resnets.1.conv1`` -> ``input_blocks.2.0.in_layers.2``;
    derived from the checkpoint key map in :mod:`iddm_core.diffusion.sd_keys`."""
    from ..diffusion import sd_keys

    key = sd_keys.unet_key_to_ldm(name + ".weight", config)
    return key[len(sd_keys.UNET_PREFIX):-len(".weight")]


def kohya_module_name(bundle, part: str, name: str) -> str:
    """The kohya module name (``lora_unet_...`` / ``lora_te_...`` / ``lora_te1_...`` / ``lora_te2_...``)."""
    sdxl = getattr(bundle, "text_encoder_2", None) is not None or getattr(bundle, "kind", None) in SDXL_KINDS
    if part == "unet":
        path = sdxl_unet_module_path(name, bundle.unet.config) if sdxl else name
        return UNET_PREFIX + path.replace(".", "_")
    prefix = {"text_encoder": TE1_PREFIX if sdxl else TE_PREFIX, "text_encoder_2": TE2_PREFIX}[part]
    return prefix + _canonical_path(name, prefix).replace(".", "_")


# ---------------------------------------------------------------- tensors

def kohya_state_dict(bundle, spec: LoraSpec, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The trained adapter in kohya-ss naming, built from the PEFT layers.

    ``lora_down`` = PEFT ``lora_A`` (in -> rank), ``lora_up`` = ``lora_B`` (rank -> out); conv LoRAs keep their
    4-D shapes as kohya stores them. ``alpha`` is read from each layer and must match ``spec`` (rank/alpha, or
    conv_rank/conv_alpha for a kernel over 1x1: a mismatch would silently change the strength of the LoRA in
    every front end). SDXL UNet modules get their original (SGM) names and the encoders ``lora_te1_`` /
    ``lora_te2_``, as kohya-ss writes SDXL LoRAs.
    """
    out = {}
    for part, module in model_parts(bundle):
        for name, layer in lora_layers(module):
            key = kohya_module_name(bundle, part, name)
            alpha = float(layer.lora_alpha[ADAPTER])
            rank = int(layer.r[ADAPTER])
            want_rank, want_alpha = spec.rank_alpha_for(layer.get_base_layer())
            if rank != want_rank or abs(alpha - want_alpha) > 1e-6:
                raise ModelError(f"LoRA on {name} has rank {rank}, alpha {alpha}; spec says {want_rank}, {want_alpha}")
            out[f"{key}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    if not out:
        raise ModelError("the model has no LoRA adapter to export; train one first")
    return out


# ---------------------------------------------------------------- hashes

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


# ---------------------------------------------------------------- metadata

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


def network_args(spec: LoraSpec) -> dict[str, str]:
    """kohya-ss's ``--network_args`` of this spec (strings, as kohya stores them): the LoCon pair, or {}."""
    if not spec.conv_rank:
        return {}
    return {"conv_dim": str(spec.conv_rank), "conv_alpha": str(float(spec.conv_alpha))}


def build_metadata(bundle, spec: LoraSpec, output_name: str, comment: str = "",
                   date: datetime.datetime | None = None, resolution: int | None = None) -> dict[str, str]:
    """The kohya ``ss_*`` and SAI ``modelspec.*`` keys (hashes added by :func:`save_kohya_lora`).

    Only the LoRA name, the base model's title and training settings go in: never a photo's name or path.
    ``resolution``: the side the LoRA was trained at (default: the base model's native one).
    """
    version, v2, arch, pred = base_labels(bundle)
    resolution = int(resolution or bundle.resolution)
    date = date or build_date()
    metadata = {
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
    if network_args(spec):
        metadata["ss_network_args"] = json.dumps(network_args(spec))
    return metadata


def build_date() -> datetime.datetime:
    """``modelspec.date``: now, to the second; or ``SOURCE_DATE_EPOCH`` (seconds, UTC) when it is set, the
    reproducible-builds convention, so the same run writes the same bytes (`iddm batch` compares files with it)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch.isdigit():
        return datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).replace(tzinfo=None)
    return datetime.datetime.now().replace(microsecond=0)


def canonical_header(path) -> None:
    """Rewrite a safetensors file's JSON header with its keys sorted, in place (same length, so every offset
    stays). safetensors writes the metadata in a different order in every process; sorted, equal content gives
    equal bytes."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        if isinstance(header.get("__metadata__"), dict):
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(dict(sorted(header.items())), separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:              # never longer than what safetensors wrote; pad as it pads, with spaces
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


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
        canonical_header(tmp)

    return atomic_write(path, write, overwrite=overwrite)
