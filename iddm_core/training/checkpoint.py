"""Resumable IDDM runs: one state file per output, rewritten atomically after every outer iteration.

The state holds the LoRA and optimiser state, X' (the perturbed protection images, i.e. derived private data),
every RNG state and the report so far. So:

- it lives in a private cache folder, never beside the output: ``$IDDM_CACHE_DIR/state/<key>/`` (default
  ``$XDG_CACHE_HOME/iddm`` or ``~/.cache/iddm``), ``<key>`` a hash of the output's absolute path (the ComfyUI
  node passes its own root, see nodes/train_node.py); folders are created 0700, the file is written 0600 through
  a temp file and a rename, and its name (``state.iddm``) is no model extension any model list would show;
- it is deleted after the run succeeds;
- it can only continue the run that wrote it. The state records a fingerprint of five parts (content hashes,
  never names or paths): the base model (kohya ``sshs``-style hash of the checkpoint file, cached per process;
  of the weight files of a diffusers folder; else of the loaded weights), the photo set, its split into Xc / X0
  (pixels + landmarks of each image, in order), the class images and every setting. Resuming with any part
  different is refused before any work, naming the parts (:class:`StateMismatch`).

A run holds its state as a :class:`RunState` (IDDM's loop in protection/iddm.py, protect's in protection/protect.py):
opened before any work, saved after every finished unit (an IDDM iteration, a protect round), cleared after success.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError

STATE_FILE = "state.iddm"       # deliberately not .pt/.ckpt/.safetensors: no model browser lists it
FORMAT_VERSION = 2
PARTS = ("base model", "photos", "split", "class images", "settings")
DIR_MODE, FILE_MODE = 0o700, 0o600
_CHUNK = 8 << 20
# Settings added after FORMAT_VERSION 2 -> their default: left out of the fingerprint while at it, so a state written
# before the setting existed still matches a run that leaves it alone (and one that sets it is another run)
LATER_SETTINGS = {"conv_rank": 0, "conv_alpha": None}
LATER_PGD_SETTINGS = {"psnr": None}


class StateMismatch(InputError):
    """A resume state that belongs to another run; ``reasons`` lists what differs (e.g. "base model differs")."""

    def __init__(self, directory, reasons: list[str]):
        self.directory, self.reasons = Path(directory), list(reasons)
        super().__init__(f"resume state belongs to a different run: {'; '.join(self.reasons)} (state in "
                         f"{self.directory}); resume with the same model, photos, class images and settings, "
                         f"or start over (which discards it)")


# ------------------------------------------------------------------------------------------------ where
def cache_root() -> Path:
    """``$IDDM_CACHE_DIR``, else ``$XDG_CACHE_HOME/iddm``, else ``~/.cache/iddm``."""
    if os.environ.get("IDDM_CACHE_DIR"):
        return Path(os.environ["IDDM_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "iddm"


def state_dir_for(output, root=None, namespace: str = "cli") -> Path:
    """The state folder of the run writing ``output``: ``<root>/<hash of namespace + absolute output path>``
    (``root`` default: ``cache_root()/state``). One folder per output: a new run for the same output finds, and
    checks, the state an interrupted one left."""
    return state_dir_keyed(str(Path(output).expanduser().resolve()), root, namespace)


def state_dir_keyed(key: str, root=None, namespace: str = "cli") -> Path:
    """``<root>/<hash of namespace + key>``: the state folder of a run identified by ``key`` (never in clear)."""
    digest = hashlib.sha256(f"{namespace}\n{key}".encode()).hexdigest()[:32]
    return Path(root if root is not None else cache_root() / "state") / digest


def _make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents with mode 0700 (existing folders are left as they are)."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(d, DIR_MODE)       # mkdir's mode is masked by the umask; 0700 is what we mean


# --------------------------------------------------------------------------------------------- hashing
_FILE_HASHES: dict = {}


def _stream_sha256(path: Path, start: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_hash(path) -> str:
    """Content hash of a model file or folder, computed once per process (cached by path, size and mtime).

    ``.safetensors``: SHA-256 of everything after the JSON header (kohya's ``sshs_model_hash`` convention, so
    editing metadata keeps the hash); other files: SHA-256 of the file; a folder (diffusers): SHA-256 over the
    relative names and hashes of its files."""
    path = Path(path).resolve()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in
                                                                            p.relative_to(path).parts))
        key = ("dir", str(path), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
        if key not in _FILE_HASHES:
            h = hashlib.sha256()
            for p in files:
                h.update(p.relative_to(path).as_posix().encode() + b"\0" + file_hash(p).encode())
            _FILE_HASHES[key] = h.hexdigest()
        return _FILE_HASHES[key]
    stat = path.stat()
    key = ("file", str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        start = 0
        if path.suffix.lower() == ".safetensors" and stat.st_size >= 8:
            with open(path, "rb") as f:
                start = 8 + int.from_bytes(f.read(8), "little")
        _FILE_HASHES[key] = _stream_sha256(path, start)
    return _FILE_HASHES[key]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def tensor_digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def weights_hash(*modules) -> str:
    """SHA-256 of the base weights of ``modules`` (LoRA adapters left out, PEFT's ``base_layer`` unwrapped)."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        state = {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if "lora_" not in k}
        for name in sorted(state):
            h.update(f"{i}:{name}".encode())
            h.update(tensor_digest(state[name]).encode())
    return h.hexdigest()


def model_hash(bundle, source=None) -> str:
    """The "base model" part: the checkpoint's content (``source``: the file or folder it was loaded from;
    otherwise, e.g. the built-in "tiny"/"demo" models or an in-memory bundle, its loaded weights), plus the kind
    and prediction type the bundle was loaded as and how its tokenizer reads the training prompts."""
    h = hashlib.sha256()
    if source is not None and str(source) not in ("tiny", "demo", "demo-v2") and Path(str(source)).exists():
        h.update(b"file:" + file_hash(source).encode())
    else:
        parts = (bundle.unet, bundle.vae, bundle.text_encoder, getattr(bundle, "text_encoder_2", None))  # SDXL: 4
        h.update(b"weights:" + weights_hash(*(m for m in parts if m is not None)).encode())
    h.update(f"{bundle.kind}|{bundle.prediction_type}".encode())
    from .finetune import FinetuneConfig

    cfg = FinetuneConfig()
    for tok in (bundle.tokenizer, getattr(bundle, "tokenizer_2", None)):    # SDXL: both towers' tokenizers
        if tok is not None:
            ids = tok([cfg.instance_prompt, cfg.class_prompt], padding="max_length", truncation=True,
                      max_length=tok.model_max_length, return_tensors="pt").input_ids
            h.update(tensor_digest(ids).encode())
    return h.hexdigest()


def _image_digests(images: torch.Tensor, landmarks: torch.Tensor) -> list[str]:
    return [tensor_digest(x.float(), lm.float()) for x, lm in zip(images, landmarks)]


def _without_later_defaults(settings: dict, later: dict) -> dict:
    """``settings`` without the settings added later while they keep their default (an older state still
    resumes)."""
    return {k: v for k, v in settings.items() if not (k in later and v == later[k])}


def run_fingerprint(bundle, refs, config, class_images=None, model_source=None) -> dict:
    """{"parts": {part: hash}, "settings": config.to_dict()} of one IDDM run (see the module docstring).

    ``class_images``: the tensor the trainer will get, or None (generated by the base model from the settings,
    so covered by those two parts). Photo names and paths never enter a hash input."""
    ref = _image_digests(*refs.reference())
    prot = _image_digests(*refs.protect())
    settings = _without_later_defaults(config.to_dict(), LATER_SETTINGS)
    if isinstance(settings.get("pgd"), dict):
        settings["pgd"] = _without_later_defaults(settings["pgd"], LATER_PGD_SETTINGS)
    s = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    s.update("\n".join(config.surrogates).encode())   # recogniser tokens with their paths: hashed, not stored
    if not config.prior_preservation:
        classes = "none"
    elif class_images is None:
        classes = "generated by the base model"
    else:
        classes = tensor_digest(class_images.float())
    parts = {
        "base model": model_hash(bundle, model_source),
        "photos": hashlib.sha256("\n".join(sorted(ref + prot)).encode()).hexdigest(),
        "split": hashlib.sha256(("\n".join(ref) + "\n|\n" + "\n".join(prot)).encode()).hexdigest(),
        "class images": hashlib.sha256(classes.encode()).hexdigest(),
        "settings": s.hexdigest(),
    }
    return {"parts": parts, "settings": settings}


def differences(state: dict, fingerprint: dict) -> list[str]:
    """What makes ``state`` another run than ``fingerprint`` describes ([] = the same run)."""
    if state.get("version") != FORMAT_VERSION:
        return [f"written by another version of IDDM (format {state.get('version')!r}, this one reads "
                f"{FORMAT_VERSION})"]
    old, new = state.get("fingerprint", {}).get("parts", {}), fingerprint["parts"]
    reasons = []
    for part in PARTS:
        if old.get(part) == new[part]:
            continue
        if part == "split" and "photos differ" in reasons:
            continue                                  # other photos: the split differs too; say it once
        if part == "settings":
            keys = _changed_keys(state["fingerprint"].get("settings", {}), fingerprint["settings"])
            reasons.append("settings differ" + (f" ({', '.join(keys)})" if keys else " (recogniser files)"))
        else:
            reasons.append(f"{part} differs" if part in ("base model", "split") else f"{part} differ")
    return reasons


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


# ------------------------------------------------------------------------------------------- read/write
def state_path(directory) -> Path:
    return Path(directory) / STATE_FILE


def has_state(directory) -> bool:
    return state_path(directory).is_file()


def save_state(directory, state: dict) -> Path:
    """Write the state atomically (temp file in the same folder, rename), mode 0600, folder 0700."""
    from ..atomic import atomic_write

    directory = Path(directory)
    _make_private_dirs(directory)
    return atomic_write(state_path(directory), lambda tmp: torch.save({"version": FORMAT_VERSION, **state}, tmp),
                        overwrite=True, mode=FILE_MODE)


def read_state(directory) -> dict | None:
    """The saved state in ``directory``, or None when there is none; an unreadable file is an InputError."""
    path = state_path(directory)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise InputError(f"cannot read the resume state {path}: {exc.__class__.__name__}; delete it to start "
                         "over") from exc


def load_state(directory, fingerprint: dict) -> dict | None:
    """The state of the same run, or None when there is none. A state of another run raises StateMismatch."""
    state = read_state(directory)
    if state is None:
        return None
    reasons = differences(state, fingerprint)
    if reasons:
        raise StateMismatch(directory, reasons)
    return state


ON_MISMATCH = ("error", "restart")


def check_on_mismatch(on_mismatch: str) -> None:
    if on_mismatch not in ON_MISMATCH:
        raise InputError(f"on_mismatch={on_mismatch!r}: use 'error' or 'restart'")


def open_state(checkpoint_dir, resume: bool, fingerprint: dict, on_mismatch: str = "error"):
    """(saved state or None, what happened to an old state: {} | {"discarded": reasons}); before any work.
    ``resume=False`` deletes an old state. A state of another run (or an unreadable one) raises with
    ``on_mismatch="error"`` (the CLI: the user asked for --resume) or is deleted (``"restart"``: the nodes)."""
    if not resume:
        clear_state(checkpoint_dir)                    # starting over: an old run's X' does not linger
        return None, {}
    try:
        return load_state(checkpoint_dir, fingerprint), {}
    except StateMismatch as exc:
        if on_mismatch == "error":
            raise
        clear_state(checkpoint_dir)
        return None, {"discarded": "; ".join(exc.reasons)}
    except InputError:
        if on_mismatch == "error":
            raise
        clear_state(checkpoint_dir)
        return None, {"discarded": "the saved state could not be read"}


def clear_state(directory) -> None:
    """Delete the state file (and leftovers of an interrupted write); the folder too when nothing else is in it."""
    directory = Path(directory)
    state_path(directory).unlink(missing_ok=True)
    if directory.is_dir():
        for leftover in directory.glob(f".{STATE_FILE}.*.tmp"):
            leftover.unlink(missing_ok=True)
        try:
            directory.rmdir()
        except OSError:          # not empty: a folder the user named holds other files
            pass


@dataclass(frozen=True)
class ResumeOptions:
    """How a run keeps its state: ``directory`` (None: no state), ``resume`` (continue a saved state of the same run;
    False deletes any), ``on_mismatch`` (see :func:`open_state`), ``model_source`` (the file or folder the model was
    loaded from, hashed into the fingerprint) and ``stop_after`` (end after that iteration or round, keeping the
    state: tests simulate an interruption with it)."""

    directory: object = None
    resume: bool = False
    on_mismatch: str = "error"
    model_source: object = None
    stop_after: int | None = None

    def stops_after(self, k: int) -> bool:
        return self.stop_after is not None and k >= self.stop_after


@dataclass
class RunState:
    """The resume state of one run in ``directory`` (None: the run keeps none). ``saved``: the state to continue,
    read and checked by :func:`open_state` before any work; ``info``: what happened to an old state ({} or
    {"discarded": why}; a run adds {"resumed_after": ...} when it continues one)."""

    directory: object = None
    fingerprint: dict | None = None
    saved: dict | None = None
    info: dict = field(default_factory=dict)

    @classmethod
    def open(cls, options: ResumeOptions, fingerprint: dict) -> "RunState":
        saved, info = open_state(options.directory, options.resume, fingerprint, options.on_mismatch)
        return cls(options.directory, fingerprint, saved, info)

    @property
    def kept(self) -> bool:
        """Whether the run keeps a state at all (it was given a folder)."""
        return self.directory is not None

    def save(self, **state) -> None:
        """Write ``state`` with the run's fingerprint (:func:`save_state`: private folder, atomic)."""
        save_state(self.directory, {"fingerprint": self.fingerprint, **state})

    def clear(self) -> None:
        if self.kept:
            clear_state(self.directory)
