"""A tiny, SD1-shaped Stable Diffusion built deterministically from a seed.

Why: no real Stable Diffusion weights exist on test machines (and none may be downloaded), yet LoRA injection,
DreamBooth fine-tuning, PGD and the single-file loaders must be exercised end to end. The tiny model keeps the
SD 1.5 *topology* (4 UNet down/up blocks, cross-attention on the first three, mid block with attention, a
4-block VAE that downsamples by 8, a CLIP text encoder, a byte-level CLIP BPE tokenizer) so every key name and
module path that real code touches exists, but with widths of 32/64 channels and a 64 px native resolution so a
training step costs milliseconds on CPU.

``build_tiny_bundle(seed)`` builds it in memory; ``write_tiny_model(out_dir)`` writes it both as a diffusers
folder and as a single-file ``.safetensors`` in the original SD key layout. The single file carries no
tokenizer (neither do real SD checkpoints): load it with ``tokenizer=<diffusers folder>/tokenizer``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..offline import force_offline

force_offline()

import torch  # noqa: E402

from ..requirements_check import require  # noqa: E402

require("diffusers")   # a diffusers that cannot import with this torch fails here, naming the fix

from ..atomic import check_writable  # noqa: E402
from .bundle import ModelBundle  # noqa: E402
from .kinds import KINDS, SDXL_KINDS  # noqa: E402
from .writing import save_diffusers, save_single_file  # noqa: E402

TINY_RESOLUTION = 64
TINY_TITLE = "tiny"
TINY_SDXL_TITLE = "tiny-sdxl"

# Words the tiny tokenizer knows as whole tokens. The instance and class prompts of DreamBooth must tokenize
# to one token per word (so "sks" is a single rare token, as with the real CLIP vocabulary).
TINY_WORDS = (
    "a", "photo", "of", "sks", "person", "man", "woman", "face", "portrait", "the", "in", "and", "with",
    "high", "quality", "picture", "close", "up", "smiling", "background",
)

UNET_CONFIG = {
    "sample_size": TINY_RESOLUTION // 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
}

VAE_CONFIG = {
    "sample_size": TINY_RESOLUTION,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}

TEXT_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    "layer_norm_eps": 1e-05,
}

# SDXL in miniature: no attention in the first level, a second and third level with 1 and 2 transformer layers
# (SDXL: 1/2/10), linear projections, the "text_time" added embedding fed by the second encoder's pooled
# projection plus six size/crop numbers, and a context that concatenates both encoders' hidden states.
SDXL_TEXT_CONFIG_2 = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 40,     # differs from hidden_size so a transposed projection cannot go unnoticed
    "layer_norm_eps": 1e-05,
}
SDXL_TIME_EMBED_DIM = 8

SDXL_UNET_CONFIG = {
    "sample_size": TINY_RESOLUTION // 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 32, 64],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 2, 4],
    "cross_attention_dim": TEXT_CONFIG["hidden_size"] + SDXL_TEXT_CONFIG_2["hidden_size"],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": SDXL_TEXT_CONFIG_2["projection_dim"] + 6 * SDXL_TIME_EMBED_DIM,
    "norm_num_groups": 8,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
}

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


# ----------------------------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character.

    Printable latin bytes map to themselves; the rest are shifted into the 256+ range so no vocabulary entry
    is whitespace or a control character.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tiny_vocab_and_merges(words=TINY_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style byte-level BPE vocabulary in which each of ``words`` is one end-of-word token.

    Layout follows CLIP: the 256 byte symbols, the same symbols with the ``</w>`` end-of-word marker, the merge
    products in merge order, then ``<|startoftext|>`` and ``<|endoftext|>``. Merges build each word left to
    right; merges are deduplicated so a prefix shared by two words ("p"+"h", "p"+"e") is learned once.
    """
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merge = f"{left} {right}"
            if merge not in merges:
                merges.append(merge)
                tokens.append(left + right)
            left = left + right
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def write_tiny_tokenizer(folder: str | os.PathLike) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` + tokenizer config, the files a CLIP tokenizer folder holds."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True,
              "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def build_tiny_tokenizer():
    """The tiny CLIP tokenizer, built in memory (no files)."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab_and_merges()
    try:
        tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    except TypeError:       # transformers 4 (A1111 1.10 pins 4.30.2) builds it from the two files only
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            write_tiny_tokenizer(folder)
            tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    tok.model_max_length = 77
    return tok


# ------------------------------------------------------------------------------------------------ modules
def _text_config(vocab_size: int, kind: str = "sd1"):
    from transformers import CLIPTextConfig

    # bos/eos ids are the last two vocabulary entries (CLIP layout); CLIPTextModel pools at the eos position.
    # SD2's OpenCLIP text tower uses exact GELU where OpenAI CLIP (SD1) uses quick-GELU.
    config = dict(TEXT_CONFIG, hidden_act="gelu" if kind != "sd1" else TEXT_CONFIG["hidden_act"])
    return CLIPTextConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                          pad_token_id=vocab_size - 1, **config)


def build_tiny_modules(seed: int = 0, kind: str = "sd1"):
    """(unet, vae, text_encoder, tokenizer, scheduler) initialised from ``seed`` without touching global RNG.

    ``kind="sd2"``/``"sd2v"`` gives the same tiny UNet/VAE with an SD2-flavoured text encoder (GELU) and, for
    sd2v, a v-prediction scheduler; these exist to test SD2 (OpenCLIP) single-file conversion and detection.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(_text_config(len(tokenizer), kind))
    prediction = "v_prediction" if kind == "sd2v" else "epsilon"
    scheduler = DDPMScheduler.from_config(dict(SCHEDULER_CONFIG, prediction_type=prediction))
    for m in (unet, vae, text_encoder):
        m.eval()
    return unet, vae, text_encoder, tokenizer, scheduler


def build_tiny_sdxl_bundle(seed: int = 0, kind: str = "sdxl"):
    """The tiny SDXL-shaped model (``SDXL_UNET_CONFIG``, the tiny VAE with SDXL's latent scale, a CLIP text
    encoder + a CLIPTextModelWithProjection, both with the tiny vocabulary; tokenizer_2 pads with "!")."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_tokenizer()
    tokenizer_2.pad_token = "!"
    n = len(tokenizer)
    config_2 = CLIPTextConfig(vocab_size=n, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=0,
                              **SDXL_TEXT_CONFIG_2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        vae = AutoencoderKL(**dict(VAE_CONFIG, scaling_factor=0.13025))
        text_encoder = CLIPTextModel(_text_config(n, "sd1"))
        text_encoder_2 = CLIPTextModelWithProjection(config_2)
    prediction = "v_prediction" if kind == "sdxl-v" else "epsilon"
    scheduler = DDPMScheduler.from_config(dict(SCHEDULER_CONFIG, prediction_type=prediction))
    return ModelBundle(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                       noise_scheduler=scheduler, kind=kind, prediction_type=prediction,
                       resolution=TINY_RESOLUTION, title=TINY_SDXL_TITLE, text_encoder_2=text_encoder_2.eval(),
                       tokenizer_2=tokenizer_2)


def build_tiny_bundle(seed: int = 0, kind: str = "sd1"):
    """The tiny model as a :class:`~iddm_core.diffusion.bundle.ModelBundle` (float32, CPU; SD1-shaped by default)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    if kind in SDXL_KINDS:
        return build_tiny_sdxl_bundle(seed, kind)
    unet, vae, text_encoder, tokenizer, scheduler = build_tiny_modules(seed, kind)
    return ModelBundle(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       noise_scheduler=scheduler, kind=kind, prediction_type=scheduler.config.prediction_type,
                       resolution=TINY_RESOLUTION, title=TINY_TITLE)


# ---------------------------------------------------------------------------------------------- writing
def write_tiny_model(out_dir: str | os.PathLike, seed: int = 0, kind: str = "sd1") -> tuple[Path, Path]:
    """Write the tiny model as ``out_dir/tiny`` (diffusers folder) and ``out_dir/tiny.safetensors``.

    The single file uses the original SD key layout (``model.diffusion_model.*``, ``first_stage_model.*``,
    ``cond_stage_model.transformer.*``), produced by :func:`iddm_core.diffusion.writing.bundle_to_original`. Both are
    written to temporary names and renamed at the end, so a failure leaves nothing half-written.
    ``kind="sdxl"``: the tiny SDXL model as ``out_dir/tiny-sdxl`` (with tokenizer/ and tokenizer_2/) and
    ``out_dir/tiny-sdxl.safetensors`` (SGM layout: ``conditioner.embedders.0/1``).
    """
    if kind not in ("sd1", "sdxl"):
        raise ValueError(f"kind={kind!r}: the tiny model is written as 'sd1' or 'sdxl'")
    title = TINY_SDXL_TITLE if kind == "sdxl" else TINY_TITLE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for target in (out_dir / title, out_dir / f"{title}.safetensors"):
        check_writable(target)   # fail before writing either, so we never leave one of the pair behind
    bundle = build_tiny_bundle(seed, kind)
    folder = save_diffusers(bundle, out_dir / title)
    single = save_single_file(bundle, out_dir / f"{title}.safetensors")
    return folder, single
