"""Stubs of the web UI's ``modules`` package (AUTOMATIC1111 1.10 shapes, or Forge's) for the IDDM tab's tests.

Only what the tab touches, with the names and signatures read from the web UI sources: ``script_callbacks``
(``on_ui_tabs`` + ``ui_tabs_callback``), ``shared`` (``state``, ``cmd_opts.lora_dir``, ``opts.sd_model_checkpoint``,
``sd_model``), ``sd_models`` (``checkpoints_list`` of CheckpointInfo with ``.filename``/``.title``, ``model_data``,
``list_models``, ``get_closet_checkpoint_match``, ``unload_model_weights``, ``send_model_to_device``,
``reload_model_weights``; Forge: ``forge_model_reload`` and ``model_data.forge_loading_parameters``), ``paths``
(``models_path``, ``script_path``), ``devices`` (``device``, ``torch_gc``), ``call_queue`` (``queue_lock``).
Every call that moves the web UI's model is recorded in ``calls``. :meth:`WebUIStubs.install` puts them in
``sys.modules``; :meth:`uninstall` takes them out again and restores whatever was there.

``State`` simulates a user: ``interrupt_at_step=N`` sets ``interrupted`` when the tab reports step N (as if
Interrupt were pressed right then), ``fail_at_step=N`` raises there (a failure in the middle of a run).
"""
from __future__ import annotations

import importlib.util
import sys
import threading
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = ("modules", "modules.script_callbacks", "modules.shared", "modules.sd_models", "modules.paths",
           "modules.devices", "modules.call_queue")
HF_TOKENIZER_REPO = "openai/clip-vit-large-patch14"


class State:
    """``modules.shared_state.State``: the flags and job fields the tab reads and writes."""

    def __init__(self):
        self.interrupted = False
        self.skipped = False
        self.job, self.job_count, self.job_no = "", 0, 0
        self.sampling_steps = 0
        self.textinfo = None
        self._step = 0
        self.calls: list = []
        self.steps: list[int] = []
        self.interrupt_at_step = None
        self.fail_at_step = None
        self.on_step = None               # called with each step number the tab reports

    @property
    def sampling_step(self):
        return self._step

    @sampling_step.setter
    def sampling_step(self, value):
        self._step = value
        if value:
            self.steps.append(value)
            if self.on_step is not None:
                self.on_step(value)
        if self.interrupt_at_step is not None and value >= self.interrupt_at_step:
            self.interrupted = True
        if self.fail_at_step is not None and value >= self.fail_at_step:
            raise RuntimeError("simulated failure in the middle of the run")

    def begin(self, job: str = "(unknown)"):
        self.calls.append(("begin", job))
        self._step, self.job_count, self.job = 0, -1, job
        self.interrupted = self.skipped = False

    def end(self):
        self.calls.append(("end",))
        self.job, self.job_count = "", 0

    def interrupt(self):
        self.interrupted = True


class CheckpointInfo:
    """``sd_models.CheckpointInfo``: the fields the tab reads."""

    def __init__(self, filename: Path, models_dir: Path):
        self.filename = str(filename)
        self.name = str(Path(filename).relative_to(models_dir))
        self.name_for_extra = Path(filename).stem
        self.title = f"{self.name} [0123456789]"


class FakeModel:
    """The web UI's loaded model: where it is, and its checkpoint."""

    def __init__(self, info: CheckpointInfo):
        self.sd_checkpoint_info = info
        self.device = "cuda"
        self.lowvram = False

    def to(self, device):
        self.device = str(device)
        return self


class WebUIStubs:
    """A web UI's folders under ``root`` and its ``modules``; ``forge=True`` gives Forge's sd_models."""

    def __init__(self, root: Path, forge: bool = False):
        self.root = Path(root)
        self.forge = forge
        self.webui_dir = self.root / "webui"
        self.models = self.webui_dir / "models"
        self.checkpoints = self.models / "Stable-diffusion"
        self.lora_dir = self.root / "my_loras"               # given with --lora-dir
        self.hf_cache = self.root / "hf_cache"
        for d in (self.checkpoints, self.lora_dir, self.hf_cache):
            d.mkdir(parents=True, exist_ok=True)
        self.calls: list = []
        self.callbacks: list = []
        self.state = State()
        self.queue_lock = threading.Lock()
        self.gc_calls = 0
        self.model = None
        self.modules: dict = {}
        self._saved: dict = {}
        self._hf_cache_before = None
        self._build()

    # ---------------------------------------------------------------------------------------- the web UI
    def add_checkpoint(self, path: Path) -> CheckpointInfo:
        info = CheckpointInfo(path, self.checkpoints)
        self.modules["modules.sd_models"].checkpoints_list[info.title] = info
        return info

    def load(self, info: CheckpointInfo | None) -> None:
        """Select ``info`` in the web UI and (A1111) have it loaded on the GPU."""
        sd_models, shared = self.modules["modules.sd_models"], self.modules["modules.shared"]
        shared.opts.sd_model_checkpoint = info.title if info else None
        if self.forge:
            sd_models.model_data.forge_loading_parameters = {"checkpoint_info": info} if info else {}
            return
        self.model = FakeModel(info) if info else None
        sd_models.model_data.sd_model = self.model
        shared.sd_model = self.model

    def write_hf_tokenizer(self, write_tokenizer) -> Path:
        """A Hugging Face cache snapshot of the CLIP tokenizer repo (A1111 downloads it), filled by
        ``write_tokenizer(folder)``."""
        repo = self.hf_cache / ("models--" + HF_TOKENIZER_REPO.replace("/", "--"))
        commit = "0" * 40
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        folder = repo / "snapshots" / commit
        write_tokenizer(folder)
        return folder

    def ui_tabs(self) -> list:
        """What the web UI does when it builds its tabs: every registered callback's (blocks, title, id)."""
        tabs = []
        for callback in self.callbacks:
            tabs += callback() or []
        return tabs

    # ------------------------------------------------------------------------------------------ modules
    def _build(self) -> None:
        stubs = self

        modules = types.ModuleType("modules")
        modules.__path__ = []

        callbacks = types.ModuleType("modules.script_callbacks")
        callbacks.on_ui_tabs = lambda callback: stubs.callbacks.append(callback)
        callbacks.ui_tabs_callback = self.ui_tabs

        shared = types.ModuleType("modules.shared")
        shared.state = self.state
        shared.cmd_opts = types.SimpleNamespace(lora_dir=str(self.lora_dir), ckpt_dir=None)
        shared.opts = types.SimpleNamespace(sd_model_checkpoint=None)
        shared.sd_model = None
        shared.models_path = str(self.models)

        sd_models = types.ModuleType("modules.sd_models")
        sd_models.checkpoints_list = {}
        sd_models.model_data = types.SimpleNamespace(sd_model=None)

        def list_models():
            stubs.calls.append(("list_models",))

        def get_closet_checkpoint_match(search):
            found = sorted((i for i in sd_models.checkpoints_list.values() if search in i.title),
                           key=lambda i: len(i.title))
            return found[0] if found else None

        sd_models.list_models = list_models
        sd_models.get_closet_checkpoint_match = get_closet_checkpoint_match
        if self.forge:
            sd_models.model_data.forge_loading_parameters = {}

            def unload_model_weights(sd_model=None, info=None):
                stubs.calls.append(("unload_all_models",))

            def reload_model_weights(sd_model=None, info=None, forced_reload=False):
                stubs.calls.append(("reload_model_weights",))

            sd_models.forge_model_reload = lambda: (None, False)
        else:
            def unload_model_weights(sd_model=None, info=None):
                model = sd_model or shared.sd_model
                stubs.calls.append(("unload_model_weights", model))
                if model is not None:
                    model.to("cpu")
                return sd_model

            def reload_model_weights(sd_model=None, info=None, forced_reload=False):
                stubs.calls.append(("reload_model_weights",))

            def send_model_to_device(m):
                stubs.calls.append(("send_model_to_device", m))
                m.to("cuda")

            sd_models.send_model_to_device = send_model_to_device
            sd_models.send_model_to_cpu = lambda m: m.to("cpu")
        sd_models.unload_model_weights = unload_model_weights
        sd_models.reload_model_weights = reload_model_weights

        paths = types.ModuleType("modules.paths")
        paths.models_path = str(self.models)
        paths.script_path = str(self.webui_dir)

        devices = types.ModuleType("modules.devices")
        import torch

        devices.device = torch.device("cpu")
        devices.cpu = torch.device("cpu")

        def torch_gc():
            stubs.gc_calls += 1

        devices.torch_gc = torch_gc

        call_queue = types.ModuleType("modules.call_queue")
        call_queue.queue_lock = self.queue_lock

        for name, module in (("script_callbacks", callbacks), ("shared", shared), ("sd_models", sd_models),
                             ("paths", paths), ("devices", devices), ("call_queue", call_queue)):
            setattr(modules, name, module)
            self.modules[f"modules.{name}"] = module
        self.modules["modules"] = modules

    def install(self) -> "WebUIStubs":
        from huggingface_hub import constants

        for name in MODULES:
            self._saved[name] = sys.modules.get(name)
            sys.modules[name] = self.modules[name]
        self._hf_cache_before = constants.HF_HUB_CACHE
        constants.HF_HUB_CACHE = str(self.hf_cache)
        return self

    def uninstall(self) -> None:
        from huggingface_hub import constants

        for name in MODULES:
            if self._saved.get(name) is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = self._saved[name]
        if self._hf_cache_before is not None:
            constants.HF_HUB_CACHE = self._hf_cache_before


def load_extension_script(path: Path = REPO / "scripts" / "iddm_tab.py"):
    """Run a ``scripts/*.py`` file as the web UI does (``modules/script_loading.load_module``: a module named after
    the file, from its path), with the extension folder at the front of ``sys.path`` during the load only."""
    saved = list(sys.path)
    sys.path.insert(0, str(path.parents[1]))
    try:
        spec = importlib.util.spec_from_file_location(path.name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def unload_extension() -> None:
    """Forget the tab's package so that the next load builds it anew (iddm_core itself stays imported)."""
    for key in [k for k in sys.modules if k == "iddm_webui" or k.startswith("iddm_webui.")]:
        del sys.modules[key]


def event_functions(blocks) -> list:
    """(BlockFunction, trigger block id, event name) of every event of ``blocks``: gradio 3.41 keeps lists
    ``fns`` and ``dependencies`` (targets ids + trigger); gradio 4 BlockFunctions carry their targets."""
    fns = blocks.fns
    fns = list(fns.values()) if isinstance(fns, dict) else list(fns)
    out = []
    for i, fn in enumerate(fns):
        targets = getattr(fn, "targets", None)
        if targets is not None:                                  # gradio 4
            out += [(fn, block_id, event) for block_id, event in targets]
        else:
            dep = blocks.dependencies[i]
            out += [(fn, block_id, dep["trigger"]) for block_id in dep["targets"]]
    return out


def bound_function(blocks, component, event: str = "click"):
    """The Python function gradio calls when ``event`` fires on ``component``, with its input and output
    components (exactly what a click in the browser runs)."""
    for fn, block_id, trigger in event_functions(blocks):
        if block_id == component._id and trigger == event:
            return fn.fn, list(fn.inputs), list(fn.outputs)
    raise LookupError(f"no {event} event on {component}")
