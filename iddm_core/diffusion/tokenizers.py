"""The CLIP tokenizers of a model: where they are found (an explicit folder, the diffusers folder's own, ComfyUI's
bundled copy, the pack's built-in tiny tokenizer) and the check that a tokenizer belongs to its text encoder.

Single-file checkpoints carry no tokenizer and none may be downloaded, so a missing or mismatched one is a
:class:`ModelError` that says which tokenizer to use and how to pass it, before any network is built.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from ..offline import force_offline

force_offline()   # before transformers is imported (in the functions below)

from ..errors import ModelError  # noqa: E402
from .builtin import ASSET_DIR, TOKENIZER_DIR  # noqa: E402
from .kinds import SDXL_KINDS  # noqa: E402
from .reading import CONFIGS_METADATA_KEY, token_rows  # noqa: E402
from .tiny import build_tiny_tokenizer, tiny_vocab_and_merges  # noqa: E402

CLIP_CONTEXT_LENGTH = 77     # token positions of the SD1 / SD2 CLIP text encoders
CLIP_VOCAB_SIZE = 49408      # tokens of the CLIP BPE tokenizer that every SD 1.x / 2.x text encoder was trained with
# old CLIP configs (e.g. SD 1.5's diffusers folder) say eos_token_id 2, which transformers ignores
_LEGACY_EOS_ID = 2


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


def tiny_tokenizer_size() -> int:
    """Tokens of the pack's built-in tiny tokenizer (the vocabulary of the tiny and demo models' text encoders)."""
    return len(tiny_vocab_and_merges()[0])


def tiny_tokenizer(pad: str | None = None):
    """The built-in tiny tokenizer, padding with ``pad`` when given."""
    tok = build_tiny_tokenizer()
    if pad is not None:
        tok.pad_token = pad
    return tok


def carries_tiny_vocabulary(state: dict, metadata: Mapping[str, str], kind: str) -> bool:
    """Whether a single file is one of the pack's own models (tiny, demo: written with ``iddm.configs`` metadata)
    whose text encoder has the built-in tiny tokenizer's vocabulary. Such a file needs no tokenizer argument:
    the tokenizer is built in, so it also loads inside ComfyUI, where ComfyUI's own CLIP tokenizer would be found
    first and would not fit it."""
    if CONFIGS_METADATA_KEY not in metadata:
        return False
    prefix = "conditioner.embedders.0." if kind in SDXL_KINDS else "cond_stage_model."
    return token_rows(state, prefix) == tiny_tokenizer_size()


def _tokenizer_advice(rows: int) -> str:
    """Which tokenizer a text encoder with ``rows`` token embeddings needs, and how to pass it."""
    if rows == CLIP_VOCAB_SIZE:
        return (f"this model needs the standard CLIP tokenizer of SD 1.x/2.x ({CLIP_VOCAB_SIZE} tokens: vocab.json + "
                f"merges.txt of openai/clip-vit-large-patch14, which ComfyUI ships as comfy/sd1_tokenizer); put "
                f"them in a folder and pass tokenizer=<folder> (CLI: --tokenizer <folder>)")
    if rows == tiny_tokenizer_size():
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


def check_text_encoder_fits(tok, config: Mapping, source: str, rows: int | None = None) -> None:
    """:func:`check_tokenizer_fits` against a text encoder config (its ``vocab_size``, CLIP's when unsaid, and
    ``eos_token_id``); ``rows``: the embedding's rows when a file's weights tell them."""
    rows = rows or int(config.get("vocab_size", CLIP_VOCAB_SIZE))
    check_tokenizer_fits(tok, rows, config.get("eos_token_id"), source)
