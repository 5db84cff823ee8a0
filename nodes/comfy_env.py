"""Everything the IDDM nodes need from ComfyUI itself, in one place.

Why one module: ComfyUI's modules (``folder_paths``, ``comfy.model_management``, ``comfy.utils``, ``server``)
only exist inside a running ComfyUI. Keeping every reference to them here means the node classes stay plain
adapters, the tests can stub exactly these four modules, and nothing in ``iddm_core`` ever imports ComfyUI.
All imports happen inside functions so importing the pack stays cheap and never fails at start-up.
"""
from __future__ import annotations

import os
from pathlib import Path

# Model folders the pack adds to ComfyUI's registry at import. "insightface" follows the layout of ComfyUI's
# insightface-based nodes (models/insightface/models/<pack>/*.onnx); "facerecognition" holds face-zoo .pth files.
FACE_MODEL_FOLDERS = {
    "insightface": {".onnx"},
    "facerecognition": {".pth", ".pt"},
}
DIFFUSERS_PREFIX = "[diffusers] "


# ------------------------------------------------------------------------------------------- model folders
def register_model_folders() -> None:
    """Add ``models/insightface`` and ``models/facerecognition`` to folder_paths unless already known.

    Other packs (or extra_model_paths.yaml) may have registered the same names with their own directories;
    those are kept, ours is only appended, so a user's configured location keeps priority.
    """
    try:
        import folder_paths
    except ImportError:          # not inside ComfyUI (e.g. a plain `import nodes` in a script)
        return
    for name, extensions in FACE_MODEL_FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, name)
        known = folder_paths.folder_names_and_paths.get(name)
        if known is None:
            folder_paths.folder_names_and_paths[name] = ([default], set(extensions))
        else:
            if default not in known[0]:
                folder_paths.add_model_folder_path(name, default)
            exts = known[1]
            if isinstance(exts, set):
                exts.update(extensions)


def recogniser_search_dirs() -> list[str]:
    """Directories that hold ``insightface/...`` or ``facerecognition/...`` (the registry's relative paths).

    The registry looks for ``<dir>/insightface/models/buffalo_l/w600k_r50.onnx`` etc., so each registered
    folder contributes its parent; ComfyUI's own models dir comes first.
    """
    import folder_paths

    dirs = [folder_paths.models_dir]
    for name in FACE_MODEL_FOLDERS:
        try:
            paths = folder_paths.get_folder_paths(name)
        except KeyError:
            continue
        for p in paths:
            parent = str(Path(p).parent) if Path(p).name == name else None
            if parent and parent not in dirs:
                dirs.append(parent)
    return dirs


# The pack's own small trained model (iddm_core/assets/demo_model): listed last, so a user's real checkpoint stays
# the default choice; with no checkpoint installed it lets a new user try the nodes at once.
DEMO_CHOICE = "[IDDM demo model, 128 px toy]"


def checkpoint_choices() -> list[str]:
    """Single-file checkpoints from "checkpoints", diffusers folders (with model_index.json) from "diffusers", then
    the pack's demo model."""
    import folder_paths

    files = list(folder_paths.get_filename_list("checkpoints"))
    return files + [DIFFUSERS_PREFIX + name for name in _diffusers_folders()] + [DEMO_CHOICE]


def _diffusers_folders() -> list[str]:
    import folder_paths

    try:
        roots = folder_paths.get_folder_paths("diffusers")
    except KeyError:
        return []
    names = set()
    for root in roots:
        if not os.path.isdir(root):
            continue
        for entry in os.scandir(root):
            if entry.is_dir() and os.path.isfile(os.path.join(entry.path, "model_index.json")):
                names.add(entry.name)
    return sorted(names)


def resolve_checkpoint(name: str) -> str:
    """A ``ckpt_name`` choice -> the path for iddm_core.diffusion.loading.load_model.

    Single files carry no tokenizer (neither do the SD checkpoints users download); iddm_core.diffusion.tokenizers
    finds the CLIP tokenizer files that ComfyUI ships with its own code (comfy/sd1_tokenizer). Diffusers folders bring
    their own tokenizer.
    """
    import folder_paths

    from ..iddm_core.errors import ModelError

    if name == DEMO_CHOICE:
        return "demo"
    if name.startswith(DIFFUSERS_PREFIX):
        folder = name[len(DIFFUSERS_PREFIX):]
        roots = folder_paths.get_folder_paths("diffusers")
        for root in roots:
            candidate = os.path.join(root, folder)
            if os.path.isfile(os.path.join(candidate, "model_index.json")):
                return candidate
        raise ModelError(f"ckpt_name: diffusers folder {folder!r} not found in {', '.join(roots)}")
    path = folder_paths.get_full_path("checkpoints", name)
    if path is None:
        raise ModelError(f"ckpt_name: checkpoint {name!r} not found in "
                         f"{', '.join(folder_paths.get_folder_paths('checkpoints'))}")
    return path


def loras_dir() -> Path:
    """Where a trained LoRA goes: the first "loras" folder, which is where LoraLoader lists files from."""
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0])


def lora_choices() -> list[str]:
    """The LoRA files ComfyUI lists (LoraLoader's choices)."""
    import folder_paths

    return list(folder_paths.get_filename_list("loras"))


def lora_path(name: str) -> Path:
    """A ``lora_name`` choice -> its file; a clear error when it is not in the loras folders."""
    import folder_paths

    from ..iddm_core.errors import InputError

    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise InputError(f"lora_name: {name!r} not found in {', '.join(folder_paths.get_folder_paths('loras'))}")
    return Path(path)


def input_folder(folder: str) -> Path:
    """A photo folder relative to ComfyUI's input directory, or an absolute path."""
    import folder_paths

    from ..iddm_core.errors import InputError

    text = (folder or "").strip()
    if not text:
        raise InputError("folder: give a folder of your photos (relative to ComfyUI's input folder, or absolute)")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = Path(folder_paths.get_input_directory()) / path
    return path


def image_target(filename_prefix: str, width: int, height: int, temp: bool = False):
    """Where ComfyUI's own save nodes would put the next image of ``filename_prefix``: (folder, file stem,
    counter, subfolder, kind). ComfyUI's ``get_save_image_path`` resolves a sub-folder and its %year%/%width%-style
    variables in the prefix, and refuses a prefix that leaves the output (or temp) folder."""
    import folder_paths

    base = folder_paths.get_temp_directory() if temp else folder_paths.get_output_directory()
    folder, stem, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, base, width, height)
    return Path(folder), stem, int(counter), subfolder, "temp" if temp else "output"


def class_cache_dir() -> str | None:
    """A temp folder for the generated prior-preservation class images (made by the base model, not private)."""
    try:
        import folder_paths
        return os.path.join(folder_paths.get_temp_directory(), "iddm_class_images")
    except (ImportError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------ memory, device
def torch_device():
    import comfy.model_management as mm

    return mm.get_torch_device()


def free_memory() -> None:
    """Ask ComfyUI to unload its cached models before we load a full SD model for training."""
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()


def release_memory() -> None:
    import gc

    import comfy.model_management as mm

    gc.collect()
    mm.soft_empty_cache()


def check_interrupted() -> None:
    """Raises ComfyUI's interrupt exception when the user pressed Cancel."""
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


# ------------------------------------------------------------------------------------------------ progress
def send_event(name: str, data: dict) -> None:
    """Send a websocket message to the client that queued the prompt (no-op outside a server)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return
    server.send_sync(name, data, getattr(server, "client_id", None))


class NodeProgress:
    """The per-step callback for iddm_core jobs: ComfyUI progress bar + Cancel + live chart events.

    Raising from the callback is how a job is cancelled between two steps; iddm_core then writes nothing.
    Messages carry numbers only (phase, step, loss, similarities) and fixed words (the setup step), never a photo
    name or path. Setup events (phase "setup": checking, loading, class images, trial steps) check Cancel and
    reach the chart too, but leave the progress bar alone (no training step is done yet); a node sends its first
    one with :meth:`setup` as soon as it starts, before anything slow.
    """

    EVENT = "iddm.progress"

    def __init__(self, node_id, total: int):
        import comfy.utils

        self.node_id = node_id
        self.bar = comfy.utils.ProgressBar(max(1, int(total)), node_id=node_id)
        self.events = 0

    def __call__(self, event) -> None:
        check_interrupted()
        if event.total and event.phase != "setup":
            self.bar.update_absolute(min(event.done, event.total), event.total)
        self.events += 1
        send_event(self.EVENT, progress_message(self.node_id, event))

    def setup(self, stage: str, message: str = "") -> None:
        """Report setup step ``stage`` (iddm_core.events.SETUP_STAGES) from the node itself; raises on Cancel."""
        from ..iddm_core.events import report_setup

        report_setup(self, stage, message)


def progress_message(node_id, event) -> dict:
    """The JSON the web extension draws from (see web/iddm.js)."""
    return {
        "node": None if node_id is None else str(node_id),
        "phase": event.phase, "done": event.done, "total": event.total,
        "k": event.k, "t": event.t, "stage": event.stage,
        "loss": _finite(event.loss),
        "similarity": {str(k): _finite(v) for k, v in (event.similarity or {}).items()},
        "linf": _finite(event.linf), "elapsed": round(float(event.elapsed or 0.0), 3),
        "message": event.message or None,      # fixed words (the setup step, "reference"/"protected"), no names
    }


def _finite(value):
    import math

    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def state_root() -> Path:
    """Where the node keeps resume states (they hold derived private images), never under a models folder:
    ``$IDDM_CACHE_DIR/state`` if set; else ComfyUI's system-user folder ``user/__iddm/state`` (not served over
    HTTP; survives a restart); on a ComfyUI without system users ``<user dir>/__iddm/state``; else ComfyUI's
    temp folder (which ComfyUI empties at start, so there a crash can only be resumed within one session)."""
    import folder_paths

    if os.environ.get("IDDM_CACHE_DIR"):
        return Path(os.environ["IDDM_CACHE_DIR"]).expanduser() / "state"
    system_dir = getattr(folder_paths, "get_system_user_directory", None)
    if callable(system_dir):
        return Path(system_dir("iddm")) / "state"
    user_dir = getattr(folder_paths, "get_user_directory", None)
    if callable(user_dir):
        return Path(user_dir()) / "__iddm" / "state"
    return Path(folder_paths.get_temp_directory()) / "iddm_state"
