"""Stable Diffusion loading, fully offline: the tiny model, diffusers folders and single-file checkpoints.

Everything downstream (LoRA injection, DreamBooth fine-tuning, PGD) works on a :class:`ModelBundle`, whatever
the model came from. Nothing here may reach a model hub: :func:`force_offline` runs at import, every
``from_pretrained`` gets ``local_files_only=True`` and configs ship in ``iddm_core/configs/<kind>/``.
SDXL (``sdxl`` / ``sdxl-v``) loads into a bundle with ``text_encoder_2``/``tokenizer_2``; DreamBooth-LoRA, IDDM's
PGD (finetune.sdxl_conditioning) and the kohya SDXL export (lora.py) run on it.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..offline import force_offline

force_offline()

import torch  # noqa: E402

from ..errors import ModelError  # noqa: E402
from ..requirements_check import require  # noqa: E402

require("diffusers")   # a diffusers that cannot import with this torch fails here, naming the fix
from ..atomic import atomic_write, check_writable  # noqa: E402

KINDS = ("sd1", "sd2", "sd2v", "sdxl", "sdxl-v")
SDXL_KINDS = ("sdxl", "sdxl-v")
PREDICTION_TYPES = {"sd1": "epsilon", "sd2": "epsilon", "sd2v": "v_prediction", "sdxl": "epsilon",
                    "sdxl-v": "v_prediction"}
# a zero-terminal-SNR schedule (Lin et al. 2024) in diffusers' scheduler settings; sampling starts at t = T - 1
ZERO_TERMINAL_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
RESOLUTIONS = {"sd1": 512, "sd2": 512, "sd2v": 768, "sdxl": 1024, "sdxl-v": 1024}


@dataclass
class ModelBundle:
    """The five pieces DreamBooth-LoRA training needs, plus what the LoRA metadata must say about the base."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any          # DDPMScheduler configured for training
    kind: str                     # "sd1" | "sd2" | "sd2v"
    prediction_type: str          # "epsilon" | "v_prediction"
    resolution: int               # native training resolution in pixels
    title: str                    # checkpoint stem, shown in LoRA metadata (never a full path)
    text_encoder_2: Any = None    # SDXL only: OpenCLIP ViT-bigG (CLIPTextModelWithProjection)
    tokenizer_2: Any = None       # SDXL only: its tokenizer (CLIP vocabulary, pads with "!")

    def to(self, device=None, dtype=None) -> "ModelBundle":
        """Move the networks (in place) and return self, so ``bundle.to("cuda")`` chains."""
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is None:
                continue
            if device is not None:
                module.to(device=device)
            # only cast when needed: diffusers warns on every dtype cast, even a no-op one
            if dtype is not None and next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)
        return self

    def cast(self, dtypes: Mapping[str, torch.dtype]) -> "ModelBundle":
        """Cast parts by name (``{"unet": torch.bfloat16, ...}``, see ``precision.weight_dtypes``) in place."""
        for part, dtype in dtypes.items():
            module = getattr(self, part)
            if module is not None and next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: 2 per VAE downsampling, i.e. 8 for every SD model (and the tiny one)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        """Latent scale applied after ``vae.encode`` (0.18215 for SD 1/2)."""
        return float(self.vae.config.scaling_factor)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor


def load_model(path: str, kind: str | None = None, tokenizer: str | None = None,
               device="cpu", dtype: torch.dtype = torch.float32,
               weight_dtypes: Mapping[str, torch.dtype] | None = None, callback=None) -> ModelBundle:
    """Load a Stable Diffusion model for training.

    ``path``: ``"demo"`` (the small trained model shipped in ``iddm_core/assets/demo_model``, 128 px), ``"tiny"``
    (the built-in tiny random model, seed 0, built in memory), a diffusers folder, or a single-file checkpoint
    (``.safetensors``; ``.ckpt``/``.pt`` only if ``torch.load(weights_only=True)`` accepts them) in the original
    SD key layout. ``kind`` overrides detection ("sd1" | "sd2" | "sd2v" | "sdxl" | "sdxl-v"). ``tokenizer`` is a
    folder holding ``vocab.json`` + ``merges.txt`` (needed for single files outside ComfyUI; for SDXL it serves
    both text encoders). ``weight_dtypes`` (``precision.weight_dtypes``) overrides ``dtype`` per part; the cast
    happens on the CPU, before the move to ``device``, so the device never holds an fp32 copy. ``callback(Event)``:
    a ``"setup"`` event (stage ``"load"``) before reading, between the parts and before the move; it may raise to
    cancel the load there (events.report_setup).
    """
    from ..events import report_setup

    report_setup(callback, "load", "loading the model: reading the weights")
    if kind is not None and kind not in KINDS:
        raise ModelError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    if str(path) == "demo":
        from ..demo.model import load_demo_bundle

        return load_demo_bundle().to(None, dtype).cast(weight_dtypes or {}).to(device)
    if str(path) == "demo-v2":          # issue 26's first cut, trained on the congress portraits (docs/DESIGN.md)
        from ..demo.model import load_demo_v2_bundle

        return load_demo_v2_bundle().to(None, dtype).cast(weight_dtypes or {}).to(device)
    if str(path) == "tiny":
        from .tiny import build_tiny_bundle

        # kind="sd2"/"sd2v" gives the SD2-flavoured tiny variant (e.g. to exercise v-prediction training);
        # "sdxl"/"sdxl-v" the SDXL-shaped one
        return build_tiny_bundle(0, kind or "sd1").to(None, dtype).cast(weight_dtypes or {}).to(device)
    p = Path(path)
    if p.is_dir():
        bundle = load_diffusers(p, kind=kind, tokenizer=tokenizer, callback=callback)
    elif p.is_file():
        bundle = load_single_file(p, kind=kind, tokenizer=tokenizer, callback=callback)
    else:
        raise ModelError(f"model not found: {path} (expected 'demo', 'tiny', a diffusers folder or a .safetensors file)")
    bundle = bundle.to(None, dtype).cast(weight_dtypes or {})
    report_setup(callback, "load", f"loading the model: moving it to {torch.device(device).type}")
    return bundle.to(device)



# ------------------------------------------------------------------------------------------ kind detection
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIGS_METADATA_KEY = "iddm.configs"   # safetensors metadata: architecture of non-standard (e.g. tiny) files
_CROSS_ATTN_K = re.compile(r"model\.diffusion_model\..*\.attn2\.to_k\.weight$")
_OUT_NORM1_BIAS = re.compile(r"model\.diffusion_model\.output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias$")
# ComfyUI's SD2 heuristic: v-prediction fine-tunes move this LayerNorm bias far more than epsilon ones do
V_PRED_STD_THRESHOLD = 0.09


def _shape(value) -> tuple:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def detect_kind(state: Mapping[str, Any], source: str = "checkpoint", metadata: Mapping[str, str] | None = None) -> str:
    """"sd1" | "sd2" | "sd2v" from an original-layout state dict (values: tensors, or shapes).

    The family comes from real distinguishing tensors: the text encoder layout (HF CLIP under
    ``cond_stage_model.transformer.`` = SD1, OpenCLIP under ``cond_stage_model.model.`` = SD2) and the UNet
    cross-attention context width (768 = SD1, 1024 = SD2). SD2 files carry no prediction flag, so v-prediction
    is inferred like ComfyUI/kohya do: an explicit ``v_pred`` key or modelspec metadata, else the spread of the
    last output block's ``norm1.bias`` (> 0.09 for the 768-v models). Pass ``kind=`` to override a wrong guess.
    """
    keys = list(state.keys())
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return _detect_sdxl(keys, state, source, metadata or {})
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelError(f"{source}: unknown checkpoint layout (no model.diffusion_model.* UNet weights); "
                         "expected an original-layout Stable Diffusion 1.x/2.x/XL checkpoint")
    conv_in = state.get("model.diffusion_model.input_blocks.0.0.weight")
    latent = _latent_channels(state)
    if conv_in is not None and _shape(conv_in)[1] != latent:
        raise ModelError(f"{source}: UNet takes {_shape(conv_in)[1]} input channels for {latent}-channel latents; "
                         "inpainting/depth models are not supported")
    has_clip = any(k.startswith("cond_stage_model.transformer.") for k in keys)
    has_openclip = any(k.startswith("cond_stage_model.model.") for k in keys)
    context = {_shape(state[k])[-1] for k in keys if _CROSS_ATTN_K.match(k)}
    if has_openclip or (not has_clip and 1024 in context):
        family = "sd2"
    elif has_clip or 768 in context:
        family = "sd1"
    else:
        raise ModelError(f"{source}: cannot tell SD1 from SD2 (no text encoder weights, cross-attention width "
                         f"{sorted(context) or 'unknown'}); pass kind='sd1', 'sd2' or 'sd2v'")
    if family == "sd1":
        return "sd1"
    return "sd2v" if _is_v_prediction(state, metadata or {}) else "sd2"


def _latent_channels(state: Mapping[str, Any]) -> int:
    """Latent channels of the file's VAE (its post-quant conv), 4 (SD's) when the file has no VAE. A UNet that
    takes more input channels than that is an inpainting/depth model (latents + mask/image/depth channels)."""
    post_quant = state.get("first_stage_model.post_quant_conv.weight")
    return int(_shape(post_quant)[1]) if post_quant is not None else 4


_SDXL_PARTS = (("model.diffusion_model.", "UNet"), ("conditioner.embedders.0.transformer.", "CLIP ViT-L text encoder"),
               ("conditioner.embedders.1.model.", "OpenCLIP ViT-bigG text encoder"))


def _detect_sdxl(keys: list, state: Mapping[str, Any], source: str, metadata: Mapping[str, str]) -> str:
    """"sdxl" | "sdxl-v" for an SGM-layout (``conditioner.embedders.*``) checkpoint; refiners, inpainting and
    incomplete files are refused. SDXL has no reliable weight heuristic for v-prediction, so only an explicit
    ``v_pred`` key or prediction-type metadata makes it ``sdxl-v`` (else pass kind="sdxl-v")."""
    for prefix, part in _SDXL_PARTS:
        if not any(k.startswith(prefix) for k in keys):
            raise ModelError(f"{source}: incomplete or unsupported SDXL checkpoint (no {prefix}* {part} weights; "
                             f"SDXL refiner checkpoints are not supported)")
    conv_in = state.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and _shape(conv_in)[1] != 4:
        raise ModelError(f"{source}: SDXL UNet takes {_shape(conv_in)[1]} input channels; inpainting models "
                         "are not supported")
    return "sdxl-v" if _declared_v_prediction(state, metadata) else "sdxl"


def _declared_v_prediction(state: Mapping[str, Any], metadata: Mapping[str, str]) -> bool | None:
    """True/False when the file says (a ``v_pred`` key, prediction-type metadata), else None."""
    if "v_pred" in state:
        return True
    declared = str(metadata.get("modelspec.prediction_type", metadata.get("prediction_type", ""))).lower()
    if declared:
        return declared.startswith("v")
    return None


def _file_prediction_type(kind: str, state: Mapping[str, Any], metadata: Mapping[str, str]) -> str:
    """The kind's prediction type; an SD1 file that declares v-prediction (a ``v_pred`` key or prediction-type
    metadata, which ComfyUI reads too) is v-prediction (e.g. the demo model)."""
    if kind == "sd1" and _declared_v_prediction(state, metadata):
        return "v_prediction"
    return PREDICTION_TYPES[kind]


def _is_v_prediction(state: Mapping[str, Any], metadata: Mapping[str, str]) -> bool:
    declared = _declared_v_prediction(state, metadata)
    if declared is not None:
        return declared
    norms = sorted(((int(m[1]), k) for k in state if (m := _OUT_NORM1_BIAS.match(k))))
    if not norms or not isinstance(state[norms[-1][1]], torch.Tensor):
        return False
    bias = state[norms[-1][1]].float()
    return bool(torch.std(bias, unbiased=False) > V_PRED_STD_THRESHOLD)


# ------------------------------------------------------------------------------------------------ reading
def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(state dict, metadata) of a single-file checkpoint, on CPU. Pickles load only with ``weights_only``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
            raise ModelError(f"{path}: not a readable .safetensors file ({exc})") from exc
        return state, metadata
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"{path}: refused to load this pickle checkpoint: it does not load with "
                             f"torch.load(weights_only=True) and could run code. Convert it to .safetensors "
                             f"first. ({type(exc).__name__})") from exc
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ModelError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    raise ModelError(f"{path}: unsupported model file type {suffix or '(none)'}; use .safetensors or a "
                     "diffusers folder")


def shipped_configs(kind: str) -> dict:
    """The architecture JSONs in ``iddm_core/configs/<kind>/`` (unet, vae, text_encoder, scheduler; SDXL also
    text_encoder_2). ``sdxl-v`` shares ``sdxl/`` (only the prediction type differs, set by the loader)."""
    folder = CONFIG_DIR / ("sdxl" if kind in SDXL_KINDS else kind)
    names = ("unet", "vae", "text_encoder", "scheduler") + (("text_encoder_2",) if kind in SDXL_KINDS else ())
    return {name: json.loads((folder / f"{name}.json").read_text(encoding="utf-8")) for name in names}


def _clean(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _match_text_prefix(module, state: dict) -> dict:
    """Make converted CLIP keys agree with the installed transformers on the ``text_model.`` level."""
    prefixed = any(k.startswith("text_model.") for k in module.state_dict())
    out = {}
    for k, v in state.items():
        bare = k[len("text_model."):] if k.startswith("text_model.") else k
        out["text_model." + bare if prefixed else bare] = v
    return out


def _build_loaded(factory, state: dict, source: str, part: str, kind: str):
    """``factory()`` with ``state`` loaded; the weights are checked on a meta-device copy first.

    Why meta first: a wrong guess of the architecture would otherwise allocate and randomly initialise a
    full-size network (seconds and gigabytes) only to fail.
    """
    with torch.device("meta"):
        _check_state(factory().state_dict(), state, source, part, kind)
    module = factory()
    own = module.state_dict()
    module.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    return module.eval()


def _check_state(own: dict, state: dict, source: str, part: str, kind: str) -> None:
    """A missing or misshapen tensor is an error; keys the module has no use for are ignored."""
    missing = [k for k in own if k not in state and not k.endswith("position_ids")]
    if missing:
        raise ModelError(f"{source}: the {part} does not match the {kind} architecture ({len(missing)} weights "
                         f"missing, e.g. {missing[0]}); if the kind was guessed wrong pass kind=...")
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ModelError(f"{source}: the {part} does not match the {kind} architecture ({bad[0]} has shape "
                         f"{tuple(state[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}); pass kind=...")


# -------------------------------------------------------------------------------------------- tokenizer
CLIP_CONTEXT_LENGTH = 77     # token positions of the SD1 / SD2 CLIP text encoders


def comfy_tokenizer_dir(kind: str) -> Path | None:
    """ComfyUI's bundled CLIP tokenizer, when running inside ComfyUI.

    ComfyUI ships one folder, ``comfy/sd1_tokenizer`` (vocab.json + merges.txt); its SD2 tokenizer
    (``comfy/sd2_clip.py``) reuses it with padding token 0 instead of end-of-text, since OpenCLIP ViT-H uses
    the same BPE vocabulary.
    """
    import importlib.util

    spec = importlib.util.find_spec("comfy")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        folder = Path(root) / "sd1_tokenizer"
        if (folder / "vocab.json").is_file():
            return folder
    return None


def resolve_tokenizer_2(tokenizer: str | os.PathLike | None = None, model_folder: str | os.PathLike | None = None,
                        source: str = "model"):
    """SDXL's second tokenizer: a diffusers folder's ``tokenizer_2/`` (as it is), else the same CLIP vocabulary
    as the first (explicit folder, ``tokenizer/``, ComfyUI's ``sd1_tokenizer``) padding with ``"!"`` (token 0),
    as SDXL's OpenCLIP tokenizer and ComfyUI's SDXL clip_g tokenizer do."""
    from transformers import CLIPTokenizer

    own = Path(model_folder) / "tokenizer_2" if model_folder is not None else None
    if tokenizer is None and own is not None and _tokenizer_files_present(own):
        tok = CLIPTokenizer.from_pretrained(str(own), local_files_only=True)
        tok.model_max_length = min(int(tok.model_max_length), CLIP_CONTEXT_LENGTH)
        return tok
    tok = resolve_tokenizer("sdxl", tokenizer, model_folder, source)
    tok.pad_token = "!"
    return tok


def _tokenizer_files_present(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or \
        ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def resolve_tokenizer(kind: str, tokenizer: str | os.PathLike | None = None,
                      model_folder: str | os.PathLike | None = None, source: str = "model"):
    """Find and load the CLIP tokenizer: explicit folder, the diffusers folder's tokenizer/, ComfyUI's copy.

    Single-file checkpoints carry no tokenizer, and none may be downloaded, so when all three are missing the
    error says exactly which files to put where.
    """
    from transformers import CLIPTokenizer

    candidates: list[Path] = []
    if tokenizer is not None:
        folder = Path(tokenizer)
        if not _tokenizer_files_present(folder):
            raise ModelError(f"tokenizer={tokenizer}: no vocab.json + merges.txt (or tokenizer.json) in this folder")
        candidates.append(folder)
    if model_folder is not None:
        candidates.append(Path(model_folder) / "tokenizer")
    comfy = comfy_tokenizer_dir(kind)
    if comfy is not None:
        candidates.append(comfy)
    for folder in candidates:
        if _tokenizer_files_present(folder):
            tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
            # ComfyUI's copy declares model_max_length 8192 (ComfyUI chunks long prompts itself); the SD text
            # encoders have 77 positions, and prompts are padded to model_max_length, so cap it.
            tok.model_max_length = min(int(tok.model_max_length), CLIP_CONTEXT_LENGTH)
            own = model_folder is not None and folder == Path(model_folder) / "tokenizer"
            if kind in ("sd2", "sd2v") and not own:
                # SD2 pads with token 0 ("!"), as its own tokenizer/ and ComfyUI's SD2 tokenizer do; a CLIP ViT-L
                # tokenizer (ComfyUI's sd1 copy, --tokenizer, A1111's Hugging Face cache) pads with end-of-text
                tok.pad_token = "!"
            return tok
    raise ModelError(
        f"{source}: no CLIP tokenizer found. Single-file checkpoints do not contain one. Put the CLIP tokenizer "
        f"files vocab.json and merges.txt (from openai/clip-vit-large-patch14, shared by SD1 and SD2) in a "
        f"folder and pass it with tokenizer=<folder> (CLI: --tokenizer <folder>), or load a diffusers folder "
        f"that has tokenizer/, or run inside ComfyUI (which ships comfy/sd1_tokenizer)")


CLIP_VOCAB_SIZE = 49408    # tokens of the CLIP BPE tokenizer that every SD 1.x / 2.x text encoder was trained with
_LEGACY_EOS_ID = 2         # old CLIP configs (e.g. SD 1.5's diffusers folder) say eos_token_id 2; transformers ignores it


def _tiny_tokenizer_size() -> int:
    from .tiny import tiny_vocab_and_merges

    return len(tiny_vocab_and_merges()[0])


def _tokenizer_advice(rows: int) -> str:
    """Which tokenizer a text encoder with ``rows`` token embeddings needs, and how to pass it."""
    if rows == CLIP_VOCAB_SIZE:
        return (f"this model needs the standard CLIP tokenizer of SD 1.x/2.x ({CLIP_VOCAB_SIZE} tokens: vocab.json + "
                f"merges.txt of openai/clip-vit-large-patch14, which ComfyUI ships as comfy/sd1_tokenizer); put "
                f"them in a folder and pass tokenizer=<folder> (CLI: --tokenizer <folder>)")
    if rows == _tiny_tokenizer_size():
        from ..demo.model import ASSET_DIR, TOKENIZER_DIR

        return (f"this is an IDDM tiny/demo model ({rows} tokens): use its tokenizer, "
                f"tokenizer={ASSET_DIR / TOKENIZER_DIR} (CLI: --tokenizer {ASSET_DIR / TOKENIZER_DIR}); for the "
                f"demo model itself choose 'demo' instead of the file (CLI: --model demo; ComfyUI: the IDDM demo "
                f"model entry of ckpt_name)")
    return (f"this model needs its own tokenizer ({rows} tokens), which the file does not contain: pass its "
            f"folder with tokenizer=<folder> (CLI: --tokenizer <folder>), or load the model as a diffusers folder "
            f"that has tokenizer/")


def check_tokenizer_fits(tok, rows: int, eos_token_id: int | None = None, source: str = "model") -> None:
    """A :class:`ModelError` when tokenizer ``tok`` does not belong to a text encoder with ``rows`` token embeddings.

    Mismatch: a token id the embedding does not have (prompts would die with "index out of range"), or a smaller
    vocabulary whose end-of-text token differs from the encoder's ``eos_token_id`` (prompts would silently mean
    something else). A larger embedding with the same special tokens (added tokens) is accepted. The message says
    which tokenizer to use.
    """
    vocab = tok.get_vocab()
    n = len(tok)
    max_id = max([n - 1, *vocab.values()]) if vocab else n - 1
    origin = getattr(tok, "name_or_path", "") or "built in"
    problem = None
    if max_id >= rows:
        problem = (f"the tokenizer ({origin}) has token ids up to {max_id}, but the text encoder's token embedding "
                   f"has only {rows} rows")
    elif (n < rows and eos_token_id is not None and eos_token_id != _LEGACY_EOS_ID
          and tok.eos_token_id != eos_token_id):
        problem = (f"the tokenizer ({origin}) has {n} tokens and end-of-text id {tok.eos_token_id}, but the text "
                   f"encoder has {rows} token embeddings and end-of-text id {eos_token_id}")
    if problem:
        raise ModelError(f"{source}: tokenizer and text encoder do not match: {problem}; {_tokenizer_advice(rows)}")


# ------------------------------------------------------------------------------------------------ loaders
def _resolution(vae_config: Mapping, kind: str) -> int:
    size = vae_config.get("sample_size")
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if size else RESOLUTIONS[kind]


def _scheduler(config: dict, prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config({**_clean(config), "prediction_type": prediction_type})


def _token_rows(state: Mapping[str, Any], prefix: str = "cond_stage_model.") -> int | None:
    """Rows of the text encoder's token embedding in an original-layout state dict (SD1 and SD2 keys; SDXL:
    ``prefix`` ``conditioner.embedders.0.`` / ``.1.``)."""
    for k, v in state.items():
        if k.startswith(prefix) and k.endswith("token_embedding.weight"):
            return int(_shape(v)[0])
    return None


def _single_file_configs(path: Path, metadata: Mapping[str, str], kind: str) -> dict:
    if CONFIGS_METADATA_KEY in metadata:
        try:
            return json.loads(metadata[CONFIGS_METADATA_KEY])
        except ValueError as exc:
            raise ModelError(f"{path}: corrupt {CONFIGS_METADATA_KEY} metadata") from exc
    return shipped_configs(kind)


def _carries_tiny_vocabulary(state: dict, metadata: Mapping[str, str], kind: str) -> bool:
    """Whether a single file is one of the pack's own models (tiny, demo: written with ``iddm.configs`` metadata)
    whose text encoder has the built-in tiny tokenizer's vocabulary. Such a file needs no tokenizer argument:
    the tokenizer is built in, so it also loads inside ComfyUI, where ComfyUI's own CLIP tokenizer would be found
    first and would not fit it."""
    if CONFIGS_METADATA_KEY not in metadata:
        return False
    prefix = "conditioner.embedders.0." if kind in SDXL_KINDS else "cond_stage_model."
    return _token_rows(state, prefix) == _tiny_tokenizer_size()


def _tiny_tokenizer(pad: str | None = None):
    from .tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    if pad is not None:
        tok.pad_token = pad
    return tok


def _single_file_setup(path: Path, state: dict, metadata: dict, kind: str | None, tokenizer):
    """(kind, configs, tokenizer) of a single file, the tokenizer checked against the text encoder's embedding.

    Runs before any network is built, so a wrong tokenizer fails in a second, not after the UNet is loaded."""
    kind = kind or detect_kind(state, str(path), metadata)
    sgm = any(k.startswith("conditioner.embedders.") for k in state)
    if (kind in SDXL_KINDS) != sgm:
        raise ModelError(f"{path}: kind={kind!r} does not fit this file ({'an SDXL' if sgm else 'not an SDXL'} "
                         f"checkpoint); pass kind=... matching the file, or none to detect it")
    configs = _single_file_configs(path, metadata, kind)
    if "ztsnr" in state:   # ComfyUI's and Forge's marker of a zero-terminal-SNR schedule (with ``v_pred``)
        configs = {**configs, "scheduler": {**configs["scheduler"], **ZERO_TERMINAL_SNR}}
    own = tokenizer is None and _carries_tiny_vocabulary(state, metadata, kind)
    tok = _tiny_tokenizer(pad="!" if kind in ("sd2", "sd2v") else None) if own else \
        resolve_tokenizer(kind, tokenizer, None, str(path))
    if kind in SDXL_KINDS:
        tok = (tok, _tiny_tokenizer(pad="!") if own else resolve_tokenizer_2(tokenizer, None, str(path)))
        for t, n, part in ((tok[0], 0, "text_encoder"), (tok[1], 1, "text_encoder_2")):
            rows = _token_rows(state, f"conditioner.embedders.{n}.") or \
                int(configs[part].get("vocab_size", CLIP_VOCAB_SIZE))
            check_tokenizer_fits(t, rows, configs[part].get("eos_token_id"), str(path))
        return kind, configs, tok
    rows = _token_rows(state) or int(configs["text_encoder"].get("vocab_size", CLIP_VOCAB_SIZE))
    check_tokenizer_fits(tok, rows, configs["text_encoder"].get("eos_token_id"), str(path))
    return kind, configs, tok


def _single_file_parts(path: Path, state: dict, configs: dict, kind: str) -> list:
    """[(part, factory, converted state)] for the UNet, VAE and text encoder of an original-layout state dict.

    Conversion is renaming and reshaping, so it also works on meta tensors (:func:`validate_model`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config, vae_config = _clean(configs["unet"]), _clean(configs["vae"])
    try:
        unet_state = convert_ldm_unet_checkpoint(state, unet_config)
        vae_state = convert_ldm_vae_checkpoint(state, vae_config)
    except (KeyError, IndexError) as exc:  # the converters index keys blindly
        raise ModelError(f"{path}: the UNet/VAE weights do not fit the {kind} layout (missing {exc})") from exc

    if kind in SDXL_KINDS:
        return [("UNet", lambda: UNet2DConditionModel.from_config(unet_config), unet_state),
                ("VAE", lambda: AutoencoderKL.from_config(vae_config), vae_state),
                *_sdxl_text_parts(state, configs)]
    text_config = dict(_clean(configs["text_encoder"]))
    openclip = any(k.startswith("cond_stage_model.model.") for k in state)
    if openclip:
        blocks = {int(m[1]) for k in state
                  if (m := re.match(r"cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.", k))}
        # SD2 conditions on the penultimate block: the text model has one block fewer than the file
        text_config["num_hidden_layers"] = max(len(blocks) - 1, 1)
    text_cfg = CLIPTextConfig(**text_config)
    with torch.device("meta"):
        probe = CLIPTextModel(text_cfg)
    converted = convert_open_clip_checkpoint(probe, state) if openclip else convert_ldm_clip_checkpoint(state)
    return [("UNet", lambda: UNet2DConditionModel.from_config(unet_config), unet_state),
            ("VAE", lambda: AutoencoderKL.from_config(vae_config), vae_state),
            ("text encoder", lambda: CLIPTextModel(text_cfg), _match_text_prefix(probe, converted))]


def _sdxl_text_parts(state: dict, configs: dict) -> list:
    """The two SDXL text encoders: CLIP ViT-L (HF names under ``conditioner.embedders.0.transformer.``) and
    OpenCLIP ViT-bigG with its projection (``conditioner.embedders.1.model.``, every block used)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg_1 = CLIPTextConfig(**_clean(configs["text_encoder"]))
    cfg_2 = CLIPTextConfig(**_clean(configs["text_encoder_2"]))
    with torch.device("meta"):
        probe_1, probe_2 = CLIPTextModel(cfg_1), CLIPTextModelWithProjection(cfg_2)
    first = {k: v for k, v in state.items() if k.startswith("conditioner.embedders.0.transformer.")}
    second = convert_open_clip_checkpoint(probe_2, state, prefix="conditioner.embedders.1.model.")
    return [("text encoder", lambda: CLIPTextModel(cfg_1), _match_text_prefix(probe_1, convert_ldm_clip_checkpoint(first))),
            ("text encoder 2", lambda: CLIPTextModelWithProjection(cfg_2), second)]


def load_single_file(path: str | os.PathLike, kind: str | None = None,
                     tokenizer: str | os.PathLike | None = None, callback=None) -> ModelBundle:
    """An original-layout SD checkpoint -> :class:`ModelBundle` (float32, CPU).

    Keys are converted with diffusers' public single-file conversion functions (pure functions on a dict; no
    hub access). The architecture comes from the file's ``iddm.configs`` metadata when present (files written
    by :func:`save_single_file`, e.g. the tiny model), else from ``iddm_core/configs/<kind>/``. A tokenizer that
    does not fit the text encoder is a :class:`ModelError` before any network is built.
    """
    path = Path(path)
    state, metadata = read_checkpoint(path)
    kind, configs, tok = _single_file_setup(path, state, metadata, kind, tokenizer)
    from ..events import report_setup

    modules = []
    for part, factory, part_state in _single_file_parts(path, state, configs, kind):
        report_setup(callback, "load", f"loading the model: {part}")     # ``callback`` may cancel between parts
        modules.append(_build_loaded(factory, part_state, str(path), part, kind))
    prediction_type = _file_prediction_type(kind, state, metadata)
    extra = {}
    if kind in SDXL_KINDS:   # tok is (tokenizer, tokenizer_2), modules end with text_encoder_2
        tok, extra = tok[0], {"text_encoder_2": modules.pop(), "tokenizer_2": tok[1]}
    unet, vae, text_encoder = modules
    return ModelBundle(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                       noise_scheduler=_scheduler(configs["scheduler"], prediction_type), kind=kind,
                       prediction_type=prediction_type, resolution=_resolution(configs["vae"], kind),
                       title=path.stem, **extra)


def _folder_kind(unet_config: Mapping, text_config: Mapping, scheduler_config: Mapping) -> str:
    sd2 = unet_config.get("cross_attention_dim") == 1024 or text_config.get("hidden_act", "") == "gelu"
    if not sd2:
        return "sd1"
    return "sd2v" if scheduler_config.get("prediction_type") == "v_prediction" else "sd2"


_FOLDER_CONFIGS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                   "scheduler": "scheduler_config.json"}
_FOLDER_WEIGHTS = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                   "text_encoder": ("model", "pytorch_model")}


def _folder_configs(folder: Path) -> dict:
    """The four JSON configs of a diffusers folder (no weights read); a missing part is a :class:`ModelError`."""
    configs = {}
    for part, name in _FOLDER_CONFIGS.items():
        if not (folder / part).is_dir():
            raise ModelError(f"{folder}: not a diffusers model folder (no {part}/ subfolder)")
        try:
            configs[part] = json.loads((folder / part / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{folder}: cannot read {part}/{name} ({exc.__class__.__name__})") from exc
    if (folder / "text_encoder_2").is_dir():   # SDXL
        try:
            configs["text_encoder_2"] = json.loads((folder / "text_encoder_2" / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{folder}: cannot read text_encoder_2/config.json ({exc.__class__.__name__})") from exc
    return configs


def _folder_is_sdxl(configs: Mapping) -> bool:
    return "text_encoder_2" in configs or configs["unet"].get("addition_embed_type") == "text_time"


def _folder_setup(folder: Path, kind: str | None, tokenizer):
    """(kind, configs, tokenizer) of a diffusers folder, the tokenizer checked against the text encoder config."""
    configs = _folder_configs(folder)
    if _folder_is_sdxl(configs):
        if kind is not None and kind not in SDXL_KINDS:
            raise ModelError(f"{folder}: kind={kind!r} does not fit this SDXL folder; pass kind='sdxl' or 'sdxl-v'")
        if "text_encoder_2" not in configs:
            raise ModelError(f"{folder}: SDXL folder without text_encoder_2/ (refiners are not supported)")
        predicted = configs["scheduler"].get("prediction_type")
        kind = kind or ("sdxl-v" if predicted == "v_prediction" else "sdxl")
    elif kind in SDXL_KINDS:
        raise ModelError(f"{folder}: kind={kind!r} does not fit this folder (not SDXL: no text_encoder_2/)")
    kind = kind or _folder_kind(configs["unet"], configs["text_encoder"], configs["scheduler"])
    tok = resolve_tokenizer(kind, tokenizer, folder, str(folder))
    text = configs["text_encoder"]
    check_tokenizer_fits(tok, int(text.get("vocab_size", CLIP_VOCAB_SIZE)), text.get("eos_token_id"), str(folder))
    if kind in SDXL_KINDS:   # tok becomes (tokenizer, tokenizer_2)
        tok = (tok, resolve_tokenizer_2(tokenizer, folder, str(folder)))
        text = configs["text_encoder_2"]
        check_tokenizer_fits(tok[1], int(text.get("vocab_size", CLIP_VOCAB_SIZE)), text.get("eos_token_id"),
                             str(folder))
    return kind, configs, tok


def load_diffusers(folder: str | os.PathLike, kind: str | None = None,
                   tokenizer: str | os.PathLike | None = None, callback=None) -> ModelBundle:
    """A diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/). ``callback``: a
    setup event before each part (it may raise to cancel)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ..events import report_setup

    folder = Path(folder)
    kind, configs, tok = _folder_setup(folder, kind, tokenizer)   # before any weights are read
    extra = {}
    try:
        report_setup(callback, "load", "loading the model: UNet")
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True)
        report_setup(callback, "load", "loading the model: VAE")
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", local_files_only=True)
        report_setup(callback, "load", "loading the model: text encoder")
        text_encoder = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", local_files_only=True)
        scheduler_config = DDPMScheduler.load_config(str(folder), subfolder="scheduler", local_files_only=True)
        if kind in SDXL_KINDS:
            from transformers import CLIPTextModelWithProjection

            report_setup(callback, "load", "loading the model: text encoder 2")
            extra["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                str(folder), subfolder="text_encoder_2", local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: cannot load the diffusers model ({exc})") from exc
    if kind in SDXL_KINDS:
        tok, extra["tokenizer_2"] = tok
        enc_2 = extra["text_encoder_2"]
        check_tokenizer_fits(extra["tokenizer_2"], int(enc_2.get_input_embeddings().weight.shape[0]),
                             enc_2.config.eos_token_id, str(folder))
    rows = int(text_encoder.get_input_embeddings().weight.shape[0])
    check_tokenizer_fits(tok, rows, text_encoder.config.eos_token_id, str(folder))
    prediction_type = PREDICTION_TYPES[kind]
    return ModelBundle(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tok,
                       noise_scheduler=_scheduler(dict(scheduler_config), prediction_type), kind=kind,
                       prediction_type=prediction_type, resolution=_resolution(vae.config, kind),
                       title=folder.name, **extra)


# ----------------------------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class ModelInfo:
    """What :func:`validate_model` found out about a model without loading its weights."""

    kind: str                # "sd1" | "sd2" | "sd2v" | "sdxl" | "sdxl-v"
    prediction_type: str     # "epsilon" | "v_prediction"
    resolution: int          # native training resolution in pixels
    title: str               # checkpoint stem / folder name (never a full path)
    vocab_size: int          # rows of the text encoder's token embedding (the tokenizer was checked against it)
    parameters: Mapping = field(default_factory=dict, compare=False)  # {"unet": n, "vae": n, ...}, counted on
                                                                      # the meta device (fit.check_weights_fit)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_checkpoint_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """(state dict of *meta* tensors with the file's shapes, metadata) of a single-file checkpoint.

    ``.safetensors``: only the header is read, plus the few small tensors kind detection looks at (the last
    ``norm1.bias`` of the UNet's output blocks, for the SD2 v-prediction heuristic), which are real tensors.
    Pickles cannot be read partially: they are loaded memory-mapped where possible (else fully, into RAM).
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        try:
            state = _load_pickle_mmap(path)
        except _NoMmap:
            state, metadata = read_checkpoint(path)
            return state, metadata
        return state, {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state = {}
            for k in f.keys():
                sl = f.get_slice(k)
                dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float32)
                state[k] = torch.empty(tuple(sl.get_shape()), dtype=dtype, device="meta")
            for k in [k for k in state if _OUT_NORM1_BIAS.match(k)]:
                state[k] = f.get_tensor(k)
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
        raise ModelError(f"{path}: not a readable .safetensors file ({exc})") from exc
    return state, metadata


class _NoMmap(Exception):
    pass


def _load_pickle_mmap(path: Path) -> dict:
    if path.suffix.lower() not in (".ckpt", ".pt", ".pth", ".bin") or not path.is_file():
        raise _NoMmap()
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        raise _NoMmap() from None   # read_checkpoint gives the proper error (or loads old, non-zip pickles)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise _NoMmap()
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


_PART_ATTRS = {"UNet": "unet", "VAE": "vae", "text encoder": "text_encoder", "text encoder 2": "text_encoder_2"}


def _parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _folder_parameters(configs: Mapping, kind: str) -> dict:
    """Parameters per part of a diffusers folder's architecture, built from its configs on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel.from_config(_clean(configs["unet"])),
                 "vae": AutoencoderKL.from_config(_clean(configs["vae"])),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**_clean(configs["text_encoder"])))}
        if kind in SDXL_KINDS:
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**_clean(configs["text_encoder_2"])))
    return {name: _parameter_count(m) for name, m in parts.items()}


def _tiny_parameters(kind: str) -> dict:
    from .tiny import build_tiny_bundle

    with torch.device("meta"):
        bundle = build_tiny_bundle(0, kind)
    return {name: _parameter_count(getattr(bundle, name)) for name in _PART_ATTRS.values()
            if getattr(bundle, name) is not None}


def validate_model(path: str, kind: str | None = None, tokenizer: str | os.PathLike | None = None) -> ModelInfo:
    """Check that ``path`` will load for training, without loading it: call before long work.

    Same arguments and the same :class:`ModelError` messages as :func:`load_model`. Checks that the model exists,
    its kind is known (or ``kind`` is valid), a tokenizer is found and fits the text encoder, and (single files)
    that every UNet / VAE / text-encoder weight the architecture needs is present with the right shape.

    Cost: no network is built with real memory. A ``.safetensors`` file: its header (plus a few KB of tensors)
    and the architecture built on the meta device, well under a second after the imports (diffusers and
    transformers take several seconds to import the first time). A pickle (``.ckpt``): memory-mapped when it
    is a zip pickle, else read whole. A diffusers folder: its JSON configs and tokenizer only (weights are not
    opened). ``"demo"``/``"demo-v2"``/``"tiny"``: constant.
    """
    if kind is not None and kind not in KINDS:
        raise ModelError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    if str(path) == "tiny":
        from .tiny import TINY_RESOLUTION, TINY_SDXL_TITLE, TINY_TITLE

        k = kind or "sd1"
        return ModelInfo(k, PREDICTION_TYPES[k], TINY_RESOLUTION, TINY_SDXL_TITLE if k in SDXL_KINDS else TINY_TITLE,
                         _tiny_tokenizer_size(), _tiny_parameters(k))
    if str(path) == "demo":
        from ..demo.model import ASSET_DIR, DEMO_TITLE, TOKENIZER_DIR, weights_path

        if not weights_path().is_file():
            raise ModelError(f"demo model weights missing: {weights_path()} (rebuild with "
                             f"`python -m iddm_core.demo.model train`)")
        info = validate_model(str(weights_path()), kind="sd1", tokenizer=ASSET_DIR / TOKENIZER_DIR)
        return ModelInfo(info.kind, info.prediction_type, info.resolution, DEMO_TITLE, info.vocab_size,
                         info.parameters)
    if str(path) == "demo-v2":
        from ..demo.model import ASSET_DIR_V2, DEMO_V2_TITLE, weights_path

        if not weights_path(ASSET_DIR_V2).is_file():
            raise ModelError(f"demo model v2 weights missing: {weights_path(ASSET_DIR_V2)}")
        info = validate_model(str(weights_path(ASSET_DIR_V2)), kind="sd1")
        return ModelInfo(info.kind, info.prediction_type, info.resolution, DEMO_V2_TITLE, info.vocab_size,
                         info.parameters)
    p = Path(path)
    if p.is_dir():
        kind, configs, _ = _folder_setup(p, kind, tokenizer)
        weights = dict(_FOLDER_WEIGHTS, **({"text_encoder_2": _FOLDER_WEIGHTS["text_encoder"]}
                                           if kind in SDXL_KINDS else {}))
        for part, stems in weights.items():
            if not any((p / part / f"{stem}{ext}").is_file() for stem in stems
                       for ext in (".safetensors", ".bin")):
                raise ModelError(f"{p}: {part}/ holds no weights file ({stems[0]}.safetensors)")
        return ModelInfo(kind, PREDICTION_TYPES[kind], _resolution(configs["vae"], kind), p.name,
                         int(configs["text_encoder"].get("vocab_size", CLIP_VOCAB_SIZE)),
                         _folder_parameters(configs, kind))
    if not p.is_file():
        raise ModelError(f"model not found: {path} (expected 'demo', 'tiny', a diffusers folder or a .safetensors file)")
    state, metadata = read_checkpoint_header(p)
    kind, configs, _ = _single_file_setup(p, state, metadata, kind, tokenizer)
    parameters = {}
    for part, factory, part_state in _single_file_parts(p, state, configs, kind):
        with torch.device("meta"):
            module = factory()
        _check_state(module.state_dict(), part_state, str(p), part, kind)
        parameters[_PART_ATTRS[part]] = _parameter_count(module)
    rows = _token_rows(state, "conditioner.embedders.0." if kind in SDXL_KINDS else "cond_stage_model.") or \
        int(configs["text_encoder"].get("vocab_size", CLIP_VOCAB_SIZE))
    return ModelInfo(kind, _file_prediction_type(kind, state, metadata), _resolution(configs["vae"], kind), p.stem,
                     rows, parameters)


# ------------------------------------------------------------------------------------------------ writing
def bundle_to_original(bundle: ModelBundle) -> dict:
    """The bundle's weights in the original SD single-file key layout (SD1: HF CLIP; SD2: OpenCLIP; SDXL: both,
    under ``conditioner.embedders.0/1``)."""
    from . import sd_keys

    state = {}
    state.update(sd_keys.unet_to_ldm(bundle.unet.state_dict(), bundle.unet.config))
    state.update(sd_keys.vae_to_ldm(bundle.vae.state_dict(), bundle.vae.config))
    text = bundle.text_encoder.state_dict()
    if bundle.kind in SDXL_KINDS:
        state.update(sd_keys.clip_to_ldm(text, prefix=sd_keys.SDXL_CLIP_PREFIX))
        state.update(sd_keys.clip_to_openclip(bundle.text_encoder_2.state_dict(), extra_last_layer=False,
                                              prefix=sd_keys.SDXL_OPENCLIP_PREFIX))
    elif bundle.kind == "sd1":
        state.update(sd_keys.clip_to_ldm(text))
    else:
        state.update(sd_keys.clip_to_openclip(text, bundle.text_encoder.config.projection_dim))
    if bundle.prediction_type == "v_prediction":
        state["v_pred"] = torch.tensor([])   # the marker ComfyUI/kohya read for v-prediction checkpoints
    if bundle.noise_scheduler.config.get("rescale_betas_zero_snr"):
        state["ztsnr"] = torch.tensor([])    # ... and for a zero-terminal-SNR schedule
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_single_file(bundle: ModelBundle, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``bundle`` as one original-layout ``.safetensors`` (atomically), architecture in its metadata."""
    from safetensors.torch import save_file

    state = bundle_to_original(bundle)
    configs = {"unet": _clean(dict(bundle.unet.config)), "vae": _clean(dict(bundle.vae.config)),
               "text_encoder": bundle.text_encoder.config.to_diff_dict(),
               "scheduler": _clean(dict(bundle.noise_scheduler.config))}
    configs["text_encoder"].pop("transformers_version", None)
    if bundle.text_encoder_2 is not None:
        configs["text_encoder_2"] = bundle.text_encoder_2.config.to_diff_dict()
        configs["text_encoder_2"].pop("transformers_version", None)
    metadata = {CONFIGS_METADATA_KEY: json.dumps(configs, default=list), "iddm.kind": bundle.kind}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata), overwrite=overwrite)


def save_diffusers(bundle: ModelBundle, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``bundle`` as a diffusers folder: built under a temporary name, renamed into place at the end."""
    import shutil
    import tempfile

    folder = check_writable(folder, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=str(folder.parent)))
    try:
        bundle.unet.save_pretrained(str(tmp / "unet"))
        bundle.vae.save_pretrained(str(tmp / "vae"))
        bundle.text_encoder.save_pretrained(str(tmp / "text_encoder"))
        bundle.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        bundle.noise_scheduler.save_pretrained(str(tmp / "scheduler"))
        index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
                 "safety_checker": [None, None], "feature_extractor": [None, None],
                 "requires_safety_checker": False}
        if bundle.text_encoder_2 is not None:   # SDXL
            bundle.text_encoder_2.save_pretrained(str(tmp / "text_encoder_2"))
            bundle.tokenizer_2.save_pretrained(str(tmp / "tokenizer_2"))
            index = {"_class_name": "StableDiffusionXLPipeline", "unet": index["unet"], "vae": index["vae"],
                     "text_encoder": index["text_encoder"], "tokenizer": index["tokenizer"],
                     "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                     "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": index["scheduler"],
                     "force_zeros_for_empty_prompt": True}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
