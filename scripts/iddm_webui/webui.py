"""Everything the IDDM tab needs from the web UI itself (AUTOMATIC1111 or Forge), in one place.

Why one module: the web UI's ``modules`` package only exists inside a running web UI. Every reference to it is
here, inside functions, so the rest of the tab stays a plain adapter, the tests stub exactly these modules
(``tests/a1111_harness.py``), and nothing in ``iddm_core`` ever imports the web UI.

What differs between the two, as read from their sources:

* **Freeing the GPU.** A1111 >= 1.6 ``sd_models.unload_model_weights(m)`` moves the loaded model to the CPU
  (``send_model_to_cpu``) and keeps it; its Settings button "Load SD checkpoint to VRAM from RAM" brings it back
  with ``send_model_to_device(m)`` (``reload_model_weights`` would return early: same checkpoint). Older A1111
  deletes the model in ``unload_model_weights`` and loads it again in ``reload_model_weights``. Forge's
  ``unload_model_weights`` unloads everything through ``backend.memory_management`` and its
  ``reload_model_weights`` does nothing: Forge puts models back on the GPU itself at the next generation.
* **The selected checkpoint.** Forge keeps it in ``model_data.forge_loading_parameters["checkpoint_info"]`` (the
  model loads lazily); A1111 in the loaded model's ``sd_checkpoint_info``. ``shared.sd_model`` is not read on
  A1111 >= 1.6: reading it loads a model when none was loaded yet. ``shared.opts.sd_model_checkpoint`` (the
  title) is the last resort.
* **The CLIP tokenizer** a single-file checkpoint lacks: Forge ships it under
  ``backend/huggingface/<repo>/tokenizer``; A1111 downloads ``openai/clip-vit-large-patch14`` into the Hugging Face
  cache the first time it loads an SD1/SDXL model.
* Both: ``shared.state`` (``interrupted``, ``begin``/``end``, the job fields), ``modules.call_queue.queue_lock``
  (one GPU job at a time), ``shared.cmd_opts.lora_dir`` (``--lora-dir``, added by the built-in Lora extension),
  ``modules.paths.models_path``.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

CURRENT_CHOICE = "(the web UI's current checkpoint)"
DEMO_CHOICE = "[IDDM demo model, 128 px toy]"
# Tokenizer folders Forge ships (relative to its root), first found wins; all hold the same CLIP BPE vocabulary.
FORGE_TOKENIZERS = ("backend/huggingface/runwayml/stable-diffusion-v1-5/tokenizer",
                    "backend/huggingface/stabilityai/stable-diffusion-xl-base-1.0/tokenizer")
HF_TOKENIZER_REPO = "openai/clip-vit-large-patch14"
# HF_* variables iddm_core.offline sets when its model modules are imported (see keep_host_environment).
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE",
                 "HF_HUB_DISABLE_TELEMETRY", "TRANSFORMERS_NO_ADVISORY_WARNINGS")


def _shared():
    from modules import shared

    return shared


def _sd_models():
    from modules import sd_models

    return sd_models


def is_forge() -> bool:
    """Forge (its ``sd_models`` has ``forge_model_reload``; its package ``modules_forge`` exists)."""
    try:
        if hasattr(_sd_models(), "forge_model_reload"):
            return True
    except ImportError:
        return False
    return "modules_forge" in sys.modules


def webui_name() -> str:
    return "Forge" if is_forge() else "AUTOMATIC1111"


# ---------------------------------------------------------------------------------------------- folders
def models_dir() -> Path:
    try:
        from modules import paths

        return Path(paths.models_path)
    except (ImportError, AttributeError):
        return Path(_shared().models_path)


def script_dir() -> Optional[Path]:
    """The web UI's own folder (where webui.py is), or None."""
    try:
        from modules import paths

        return Path(paths.script_path)
    except (ImportError, AttributeError):
        return None


def lora_dir() -> Path:
    """Where the web UI lists LoRAs from: ``--lora-dir`` if given, else ``<models>/Lora``."""
    configured = getattr(getattr(_shared(), "cmd_opts", None), "lora_dir", None)
    return Path(configured) if configured else models_dir() / "Lora"


def recogniser_search_dirs() -> list[str]:
    """Model folders where the recogniser registry looks for ``insightface/...`` and ``facerecognition/...``:
    the web UI's models folder first, then ``$IDDM_MODEL_DIRS``."""
    from iddm_core.face.registry import default_search_dirs

    dirs = [str(models_dir())]
    return dirs + [d for d in default_search_dirs() if d not in dirs]


# ------------------------------------------------------------------------------------------- checkpoints
def checkpoint_titles(refresh: bool = False) -> list[str]:
    """Titles of the web UI's checkpoint list (what its own checkpoint dropdown shows)."""
    sd_models = _sd_models()
    if refresh and hasattr(sd_models, "list_models"):
        sd_models.list_models()
    return [info.title for info in list(sd_models.checkpoints_list.values())]


def checkpoint_choices(refresh: bool = False) -> list[str]:
    return [CURRENT_CHOICE] + checkpoint_titles(refresh) + [DEMO_CHOICE]


def current_checkpoint_info():
    """The CheckpointInfo of the checkpoint selected in the web UI, or None."""
    sd_models = _sd_models()
    model_data = getattr(sd_models, "model_data", None)
    if model_data is not None:
        info = (getattr(model_data, "forge_loading_parameters", None) or {}).get("checkpoint_info")
        if info is not None:
            return info
        loaded = getattr(model_data, "sd_model", None)
    else:                                  # A1111 before 1.6: a plain attribute, reading it loads nothing
        loaded = getattr(_shared(), "sd_model", None)
    info = getattr(loaded, "sd_checkpoint_info", None)
    if info is not None:
        return info
    title = getattr(getattr(_shared(), "opts", None), "sd_model_checkpoint", None)
    return _find_checkpoint(title) if title else None


def _find_checkpoint(title: str):
    sd_models = _sd_models()
    info = sd_models.checkpoints_list.get(title)
    if info is None and hasattr(sd_models, "get_closet_checkpoint_match"):
        info = sd_models.get_closet_checkpoint_match(title)
    return info


def resolve_checkpoint(choice: str) -> str:
    """A dropdown choice -> the path for ``iddm_core.diffusion.loading.load_model`` (or ``"demo"``)."""
    from iddm_core.errors import InputError, ModelError

    if choice == DEMO_CHOICE:
        return "demo"
    if not choice or choice == CURRENT_CHOICE:
        info = current_checkpoint_info()
        if info is None:
            raise InputError("base model: no checkpoint is selected in the web UI; choose one in the list")
    else:
        info = _find_checkpoint(choice)
        if info is None:
            raise ModelError(f"base model: checkpoint {choice!r} is not in the web UI's list (press the refresh "
                             "button next to the list)")
    filename = getattr(info, "filename", None)
    if not filename or not os.path.exists(filename):
        title = getattr(info, "title", choice)
        raise ModelError(f"base model: the file of checkpoint {title!r} is missing: {filename}")
    return str(filename)


def tokenizer_dir(explicit: str = "") -> Optional[str]:
    """A CLIP tokenizer folder (vocab.json + merges.txt) for single-file checkpoints: ``explicit`` if given, else
    the one Forge ships, else A1111's download in the Hugging Face cache; None if there is none (iddm_core then
    explains what to put where)."""
    if explicit and explicit.strip():
        return str(Path(explicit.strip()).expanduser())
    root = script_dir()
    if root is not None:
        for rel in FORGE_TOKENIZERS:
            folder = root / rel
            if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                return str(folder)
    try:
        from huggingface_hub import constants, try_to_load_from_cache

        vocab = try_to_load_from_cache(HF_TOKENIZER_REPO, "vocab.json", cache_dir=constants.HF_HUB_CACHE)
        if isinstance(vocab, str) and (Path(vocab).parent / "merges.txt").is_file():
            return str(Path(vocab).parent)
    except Exception:            # an old or missing huggingface_hub: no cache lookup
        pass
    return None


def torch_device():
    """The web UI's torch device (``modules.devices.device``), else CUDA when there is one, else the CPU."""
    import torch

    try:
        from modules import devices

        device = getattr(devices, "device", None)
        if device is not None:
            return torch.device(device)
    except ImportError:
        pass
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_gc() -> None:
    try:
        from modules import devices

        devices.torch_gc()
        return
    except (ImportError, AttributeError):
        pass
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


@contextlib.contextmanager
def keep_host_environment():
    """Undo the HF_* variables that importing iddm_core's model modules sets (iddm_core.offline): they are meant
    for iddm_core's own process; the web UI decides for itself whether it may reach a model hub. iddm_core still
    never downloads: it loads with ``local_files_only`` and from its own configs."""
    before = {name: os.environ.get(name) for name in _OFFLINE_VARS}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ------------------------------------------------------------------------------------------ GPU, one job
@dataclass
class Offload:
    """What was done to the web UI's model, and how to undo it (``restore``, called once)."""

    description: str
    restore_fn: Optional[Callable[[], None]] = None
    restored: bool = field(default=False, init=False)

    def restore(self) -> None:
        if self.restored:
            return
        self.restored = True
        if self.restore_fn is not None:
            self.restore_fn()
            torch_gc()


def offload_webui_model() -> Offload:
    """Move the web UI's model off the GPU before training; the returned :class:`Offload` brings it back."""
    sd_models = _sd_models()
    if is_forge():
        sd_models.unload_model_weights()
        torch_gc()
        return Offload("Forge's models unloaded (Forge loads them again at the next generation)",
                       lambda: sd_models.reload_model_weights())
    model_data = getattr(sd_models, "model_data", None)
    if model_data is not None and hasattr(sd_models, "send_model_to_device"):
        model = getattr(model_data, "sd_model", None)
        if model is None:
            return Offload("no web UI model was loaded")
        sd_models.unload_model_weights(model)
        torch_gc()
        return Offload("the web UI's model moved to the CPU", lambda: sd_models.send_model_to_device(model))
    if getattr(_shared(), "sd_model", None) is None:            # A1111 before 1.6
        return Offload("no web UI model was loaded")
    sd_models.unload_model_weights()
    torch_gc()
    return Offload("the web UI's model unloaded", lambda: sd_models.reload_model_weights())


@contextlib.contextmanager
def gpu_job(on_wait: Optional[Callable[[], None]] = None, poll: Optional[Callable[[], None]] = None,
            poll_s: float = 0.25):
    """Hold the web UI's queue lock (so no generation runs beside training: one GPU job at a time, as its own
    buttons do), where the web UI has one; ``on_wait()`` is called first if another job holds it. With ``poll``
    the wait is a loop that calls ``poll()`` every ``poll_s`` seconds, which may raise to stop waiting (the tab's
    Interrupt); the lock is then not taken. (A1111's FIFOLock has no acquire timeout, hence the loop.)"""
    try:
        from modules.call_queue import queue_lock
    except (ImportError, AttributeError):
        queue_lock = None
    if queue_lock is None:
        yield
        return
    if not queue_lock.acquire(blocking=False):
        if on_wait is not None:
            on_wait()
        if poll is None:
            queue_lock.acquire()
        else:
            import time

            while not queue_lock.acquire(blocking=False):
                poll()
                time.sleep(poll_s)
    try:
        yield
    finally:
        queue_lock.release()


class WebUIState:
    """``shared.state``: the job fields the web UI shows, and its Interrupt flag."""

    JOB = "iddm_train"

    @property
    def state(self):
        return _shared().state

    def begin(self, total: int) -> None:
        state = self.state
        begin = getattr(state, "begin", None)
        if callable(begin):
            try:
                begin(job=self.JOB)
            except TypeError:        # A1111 before 1.6: begin() takes no job name
                begin()
        state.interrupted = False
        state.job = self.JOB
        state.job_count = 1
        state.sampling_steps = int(total)

    def step(self, done: int, total: int, text: str) -> None:
        state = self.state
        state.sampling_steps = int(total)
        state.textinfo = text
        state.sampling_step = int(done)

    def interrupted(self) -> bool:
        return bool(getattr(self.state, "interrupted", False))

    def interrupt(self) -> None:
        state = self.state
        if callable(getattr(state, "interrupt", None)):
            state.interrupt()
        else:
            state.interrupted = True

    def end(self) -> None:
        state = self.state
        end = getattr(state, "end", None)
        if callable(end):
            try:
                end()
            except Exception:       # end() reads time_start, which an old state may lack: the flags matter
                pass
        state.interrupted = False   # as the web UI's own job wrapper does after a job
        state.job = ""
        state.job_count = 0
