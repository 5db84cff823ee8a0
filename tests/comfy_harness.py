"""A stand-in for the parts of ComfyUI the IDDM node pack touches, and a tiny executor for API-format workflows.

No ComfyUI is installed in CI, so this module builds the four modules the pack uses (``folder_paths``,
``comfy.utils``, ``comfy.model_management``, ``server``) over a temporary ComfyUI-like folder tree, records
what the pack does with them (progress updates, websocket messages, memory calls), loads the pack the way
ComfyUI's ``load_custom_node`` does (``spec_from_file_location`` on the pack's ``__init__.py`` under a fresh
module name) and runs the pack's own nodes of a workflow in dependency order under ``torch.inference_mode()``.
``core_nodes`` adds minimal stand-ins for the ComfyUI built-ins of the example workflows (Load Checkpoint, Load
LoRA, KSampler, ..., and Save Image / Preview Image, which embed the prompt and workflow as ComfyUI does).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUB_NAMES = ("folder_paths", "comfy", "comfy.utils", "comfy.model_management", "server")
SUPPORTED_PT_EXTENSIONS = {".ckpt", ".pt", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
WIDGET_OPTION_KEYS = {
    "INT": {"default", "min", "max", "step", "tooltip", "display", "control_after_generate", "forceInput",
            "lazy", "advanced"},
    "FLOAT": {"default", "min", "max", "step", "round", "tooltip", "display", "forceInput", "lazy", "advanced"},
    "STRING": {"default", "multiline", "placeholder", "tooltip", "dynamicPrompts", "forceInput", "lazy", "advanced"},
    "BOOLEAN": {"default", "label_on", "label_off", "tooltip", "forceInput", "lazy", "advanced"},
}


class InterruptProcessingException(Exception):
    """Same name and role as ComfyUI's: raised by throw_exception_if_processing_interrupted after Cancel."""


class ComfyStubs:
    """A temporary ComfyUI tree (models/, input/, temp/, comfy/) plus recording stub modules.

    ``interrupt_after``: after that many progress-bar updates the interrupt flag is raised, as if the user
    pressed Cancel mid-run.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.models = self.root / "models"
        self.input = self.root / "input"
        self.temp = self.root / "temp"
        self.output = self.root / "output"
        self.comfy_dir = self.root / "comfy"
        for d in (self.models / "checkpoints", self.models / "loras", self.models / "diffusers", self.input,
                  self.temp, self.output, self.comfy_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.progress: list[tuple] = []        # (node_id, value, total)
        self.messages: list[tuple] = []        # (event, data, sid)
        self.memory_calls: list[str] = []
        self.interrupted = False
        self.interrupt_after: int | None = None
        self._saved: dict = {}
        self.modules = self._build_modules()

    # ---------------------------------------------------------------- stub modules
    def _build_modules(self) -> dict:
        return {"folder_paths": self._folder_paths(), "comfy": self._comfy_package(),
                "comfy.utils": self._comfy_utils(), "comfy.model_management": self._model_management(),
                "server": self._server()}

    def _folder_paths(self):
        fp = types.ModuleType("folder_paths")
        fp.models_dir = str(self.models)
        fp.supported_pt_extensions = set(SUPPORTED_PT_EXTENSIONS)
        fp.folder_names_and_paths = {
            "checkpoints": ([str(self.models / "checkpoints")], set(SUPPORTED_PT_EXTENSIONS)),
            "loras": ([str(self.models / "loras")], set(SUPPORTED_PT_EXTENSIONS)),
            "diffusers": ([str(self.models / "diffusers")], ["folder"]),
        }

        def add_model_folder_path(folder_name, full_folder_path, is_default=False):
            entry = fp.folder_names_and_paths.setdefault(folder_name, ([], set()))
            if full_folder_path in entry[0]:
                return
            entry[0].insert(0, full_folder_path) if is_default else entry[0].append(full_folder_path)

        def get_folder_paths(folder_name):
            return list(fp.folder_names_and_paths[folder_name][0])

        def get_filename_list(folder_name):
            paths, exts = fp.folder_names_and_paths[folder_name]
            out = set()
            for base in paths:
                for dirpath, _, files in os.walk(base):
                    for f in files:
                        if not exts or os.path.splitext(f)[1].lower() in exts:
                            out.add(os.path.relpath(os.path.join(dirpath, f), base).replace(os.sep, "/"))
            return sorted(out)

        def get_full_path(folder_name, filename):
            if folder_name not in fp.folder_names_and_paths:
                return None
            filename = os.path.relpath(os.path.join("/", filename), "/")
            for base in fp.folder_names_and_paths[folder_name][0]:
                candidate = os.path.join(base, filename)
                if os.path.isfile(candidate):
                    return candidate
            return None

        def get_full_path_or_raise(folder_name, filename):
            path = get_full_path(folder_name, filename)
            if path is None:
                raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
            return path

        fp.add_model_folder_path = add_model_folder_path
        fp.get_folder_paths = get_folder_paths
        fp.get_filename_list = get_filename_list
        fp.get_full_path = get_full_path
        fp.get_full_path_or_raise = get_full_path_or_raise
        def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
            # ComfyUI's contract: (folder, file stem, next counter, subfolder, prefix); the prefix may name a
            # sub-folder but never leave output_dir; files are "<stem>_<counter:05>_.png"
            prefix = filename_prefix.replace("%width%", str(image_width)).replace("%height%", str(image_height))
            subfolder, stem = os.path.split(os.path.normpath(prefix))
            folder = os.path.abspath(os.path.join(output_dir, subfolder))
            if os.path.commonpath((folder, os.path.abspath(output_dir))) != os.path.abspath(output_dir):
                raise Exception("Saving image outside the output folder is not allowed.")
            os.makedirs(folder, exist_ok=True)
            used = [int(name[len(stem) + 1:len(stem) + 6]) for name in os.listdir(folder)
                    if name.startswith(stem + "_") and name[len(stem) + 1:len(stem) + 6].isdigit()]
            return folder, stem, max(used, default=0) + 1, subfolder, prefix

        fp.get_input_directory = lambda: str(self.input)
        fp.get_temp_directory = lambda: str(self.temp)
        fp.get_output_directory = lambda: str(self.output)
        fp.get_save_image_path = get_save_image_path
        return fp

    def _comfy_package(self):
        # A real package spec pointing at comfy_dir, so importlib.util.find_spec("comfy") finds
        # comfy/sd1_tokenizer like inside ComfyUI.
        spec = importlib.machinery.ModuleSpec("comfy", None, is_package=True)
        spec.submodule_search_locations = [str(self.comfy_dir)]
        pkg = importlib.util.module_from_spec(spec)
        pkg.__path__ = [str(self.comfy_dir)]
        return pkg

    def _comfy_utils(self):
        utils = types.ModuleType("comfy.utils")
        stubs = self

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total, self.current, self.node_id = total, 0, node_id

            def update_absolute(self, value, total=None, preview=None):
                if total is not None:
                    self.total = total
                self.current = min(value, self.total)
                stubs._record_progress(self.node_id, self.current, self.total)

            def update(self, value):
                self.update_absolute(self.current + value)

        utils.ProgressBar = ProgressBar
        return utils

    def _record_progress(self, node_id, value, total):
        self.progress.append((node_id, value, total))
        if self.interrupt_after is not None and len(self.progress) >= self.interrupt_after:
            self.interrupted = True

    def _model_management(self):
        import torch

        mm = types.ModuleType("comfy.model_management")
        stubs = self
        mm.InterruptProcessingException = InterruptProcessingException

        def throw_exception_if_processing_interrupted():
            if stubs.interrupted:
                stubs.interrupted = False
                raise InterruptProcessingException()

        def interrupt_current_processing(value=True):
            stubs.interrupted = value

        mm.get_torch_device = lambda: torch.device("cpu")
        mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
        mm.interrupt_current_processing = interrupt_current_processing
        mm.processing_interrupted = lambda: stubs.interrupted
        mm.unload_all_models = lambda: stubs.memory_calls.append("unload_all_models")
        mm.soft_empty_cache = lambda force=False: stubs.memory_calls.append("soft_empty_cache")
        return mm

    def _server(self):
        server = types.ModuleType("server")
        stubs = self

        class PromptServer:
            instance = None

            def __init__(self):
                self.client_id = "test-client"

            def send_sync(self, event, data, sid=None):
                stubs.messages.append((event, data, sid))

        PromptServer.instance = PromptServer()
        server.PromptServer = PromptServer
        return server

    # ---------------------------------------------------------------- install / load
    def install(self) -> "ComfyStubs":
        for name in STUB_NAMES:
            self._saved[name] = sys.modules.get(name)
            sys.modules[name] = self.modules[name]
        self.modules["comfy"].utils = self.modules["comfy.utils"]
        self.modules["comfy"].model_management = self.modules["comfy.model_management"]
        return self

    def uninstall(self) -> None:
        for name, old in self._saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
        self._saved.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()


def tiny_comfy(root: Path, faces: Path, private: str) -> "ComfyStubs":
    """Installed ComfyUI stubs under ``root`` with the tiny model as ``checkpoints/tiny.safetensors`` (its tokenizer
    also as ComfyUI's ``sd1_tokenizer``) and four private-looking photos in ``input/photos``."""
    import shutil

    from iddm_core.diffusion.tiny import write_tiny_model, write_tiny_tokenizer

    stubs = ComfyStubs(root)
    _, single = write_tiny_model(stubs.root / "scratch")
    shutil.move(str(single), stubs.models / "checkpoints" / "tiny.safetensors")
    write_tiny_tokenizer(stubs.comfy_dir / "sd1_tokenizer")
    from conftest import write_private_photos

    write_private_photos(stubs.input / "photos", faces, private)
    stubs.install()
    return stubs


def unload_pack(module_name: str = "comfyui-iddm") -> None:
    """Forget the pack and its submodules, so the next import (or another test file's) starts fresh."""
    for key in [k for k in sys.modules if k == module_name or k.startswith(module_name + ".")]:
        del sys.modules[key]


def load_pack(module_name: str = "comfyui-iddm", repo: Path = REPO):
    """Import the pack as ComfyUI does: the folder's __init__.py under the folder's name, as a package."""
    unload_pack(module_name)
    init = Path(repo) / "__init__.py"
    spec = importlib.util.spec_from_file_location(module_name, str(init), submodule_search_locations=[str(repo)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


# -------------------------------------------------------------------- node definition rules
def _is_type(t) -> bool:
    return isinstance(t, str) and bool(t) or (isinstance(t, (list, tuple)) and all(isinstance(x, str) for x in t))


def node_problems(name: str, cls) -> list[str]:
    """What ComfyUI (server validation + frontend widget creation) would reject or show badly."""
    problems = []
    try:
        spec = cls.INPUT_TYPES()
    except Exception as exc:     # noqa: BLE001 - reported as a problem
        return [f"{name}: INPUT_TYPES() raised {exc!r}"]
    if not isinstance(spec, dict) or "required" not in spec:
        return [f"{name}: INPUT_TYPES must return a dict with 'required'"]
    for section, entries in spec.items():
        if section not in ("required", "optional", "hidden"):
            problems.append(f"{name}: unknown INPUT_TYPES section {section!r}")
            continue
        for inp, entry in entries.items():
            if section == "hidden":
                if not isinstance(entry, str):
                    problems.append(f"{name}.{inp}: hidden inputs are strings like 'UNIQUE_ID'")
                continue
            problems += _input_problems(f"{name}.{inp}", entry)
            if inp in ("seed", "noise_seed") and isinstance(entry, tuple) and entry[:1] == ("INT",) and \
                    (len(entry) < 2 or entry[1].get("control_after_generate") is not False):
                # ComfyUI's frontend gives INT inputs of these names a control_after_generate widget ("randomize"
                # by default): the value changes after every queue and saved UI workflows carry an extra value
                problems.append(f"{name}.{inp}: an INT named {inp!r} is re-randomised by the frontend after every "
                                "queue (a re-queued run would never match its resume state)")
    rt = getattr(cls, "RETURN_TYPES", None)
    if not isinstance(rt, tuple) or not all(_is_type(t) for t in rt):
        problems.append(f"{name}: RETURN_TYPES must be a tuple of type strings")
    rn = getattr(cls, "RETURN_NAMES", None)
    if rn is not None and (len(rn) != len(rt or ()) or not all(isinstance(n, str) for n in rn)):
        problems.append(f"{name}: RETURN_NAMES must match RETURN_TYPES in length")
    tips = getattr(cls, "OUTPUT_TOOLTIPS", None)
    if tips is not None and len(tips) != len(rt or ()):
        problems.append(f"{name}: OUTPUT_TOOLTIPS must match RETURN_TYPES in length")
    fn = getattr(cls, "FUNCTION", None)
    if not isinstance(fn, str) or not callable(getattr(cls, fn, None)):
        problems.append(f"{name}: FUNCTION must name a method")
    if not isinstance(getattr(cls, "CATEGORY", None), str):
        problems.append(f"{name}: CATEGORY must be a string")
    if not isinstance(getattr(cls, "OUTPUT_NODE", False), bool):
        problems.append(f"{name}: OUTPUT_NODE must be a bool")
    return problems


def _input_problems(where: str, entry) -> list[str]:
    if not isinstance(entry, tuple) or not entry or len(entry) > 2:
        return [f"{where}: an input is a tuple (type,) or (type, options)"]
    t = entry[0]
    opts = entry[1] if len(entry) == 2 else {}
    problems = []
    if not _is_type(t):
        problems.append(f"{where}: type must be a string or a list of strings (combo)")
    if not isinstance(opts, dict):
        return problems + [f"{where}: options must be a dict"]
    if not opts.get("tooltip"):
        problems.append(f"{where}: no tooltip")
    if isinstance(t, (list, tuple)):
        if "default" in opts and opts["default"] not in t:
            problems.append(f"{where}: combo default {opts['default']!r} is not a choice")
    elif t in WIDGET_TYPES:
        unknown = set(opts) - WIDGET_OPTION_KEYS[t]
        if unknown:
            problems.append(f"{where}: unknown {t} options {sorted(unknown)}")
        d = opts.get("default")
        if t in ("INT", "FLOAT"):
            if not isinstance(d, (int, float)) or isinstance(d, bool) or (t == "INT" and not isinstance(d, int)):
                problems.append(f"{where}: {t} default must be a number")
            elif not opts.get("min", d) <= d <= opts.get("max", d):
                problems.append(f"{where}: default {d} outside [min, max]")
        if t == "BOOLEAN" and not isinstance(d, bool):
            problems.append(f"{where}: BOOLEAN default must be a bool")
        if t == "STRING" and not isinstance(d, str):
            problems.append(f"{where}: STRING default must be a string")
    return problems


def linked_type_ok(received_type, input_type) -> bool:
    """ComfyUI's link rule (comfy_execution.validation.validate_node_input): equal under ``!=``, or overlapping
    comma-separated unions, or a "*" wildcard."""
    if not received_type != input_type:
        return True
    if not isinstance(received_type, str) or not isinstance(input_type, str):
        return False
    if "*" in (received_type, input_type):
        return True
    return bool(set(received_type.split(",")) & set(input_type.split(",")))


# ------------------------------------------------------------------------------------- executor
def execution_order(workflow: dict) -> list[str]:
    """Topological order of an API-format workflow (links are [node_id, output_index])."""
    order, state = [], {}

    def visit(nid):
        if state.get(nid) == "done":
            return
        if state.get(nid) == "visiting":
            raise ValueError(f"cycle at node {nid}")
        state[nid] = "visiting"
        for value in workflow[nid]["inputs"].values():
            if _is_link(value):
                visit(str(value[0]))
        state[nid] = "done"
        order.append(nid)

    for nid in workflow:
        visit(nid)
    return order


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def run_workflow(pack, workflow: dict, core: dict | None = None, extra_pnginfo: dict | None = None,
                 ui: dict | None = None) -> dict:
    """Execute ``workflow`` (API format) in dependency order, under ``torch.inference_mode()`` as ComfyUI's
    executor does. Pack nodes run for real; other nodes run from ``core`` (e.g. :func:`core_nodes`) when given
    there, else are skipped. Returns {node_id: outputs tuple}; for a skipped node {node_id: {"resolved": {input:
    value from an executed node}}} so callers can check what it would get. Link types are checked with ComfyUI's
    rule first. Hidden inputs get what ComfyUI gives: UNIQUE_ID the node id, PROMPT the workflow, EXTRA_PNGINFO
    ``extra_pnginfo`` (the frontend sends {"workflow": <UI-format workflow>}). ``ui``: collects each node's
    ``ui`` dict by node id.
    """
    import torch

    classes = dict(core or {})
    classes.update(pack.NODE_CLASS_MAPPINGS)
    hidden_values = {"PROMPT": workflow, "EXTRA_PNGINFO": extra_pnginfo}
    results: dict = {}
    for nid in execution_order(workflow):
        node = workflow[nid]
        cls = classes.get(node["class_type"])
        kwargs = {}
        for name, value in node["inputs"].items():
            if _is_link(value):
                src = str(value[0])
                src_out = results.get(src)
                if isinstance(src_out, tuple):
                    _check_link(workflow, classes, src, value[1], nid, name)
                    kwargs[name] = src_out[value[1]]
            else:
                kwargs[name] = value
        if cls is None:
            results[nid] = {"resolved": kwargs}
            continue
        for name, kind in cls.INPUT_TYPES().get("hidden", {}).items():
            kwargs[name] = nid if kind == "UNIQUE_ID" else hidden_values.get(kind)
        with torch.inference_mode():
            out = getattr(cls(), cls.FUNCTION)(**kwargs)
        if isinstance(out, dict):
            if ui is not None and "ui" in out:
                ui[nid] = out["ui"]
            out = out.get("result", ())
        if len(out) != len(cls.RETURN_TYPES):
            raise AssertionError(f"{node['class_type']} returned {len(out)} values for {len(cls.RETURN_TYPES)} outputs")
        results[nid] = tuple(out)
    return results


def _check_link(workflow, classes, src, index, dst, input_name) -> None:
    src_cls = classes[workflow[src]["class_type"]]
    received = src_cls.RETURN_TYPES[index]
    dst_cls = classes.get(workflow[dst]["class_type"])
    if dst_cls is None:
        return
    spec = dst_cls.INPUT_TYPES()
    entry = spec.get("required", {}).get(input_name) or spec.get("optional", {}).get(input_name)
    if entry is None:
        raise AssertionError(f"node {dst} has no input {input_name!r}")
    if not linked_type_ok(received, entry[0]):
        raise AssertionError(f"link {src}:{index} -> {dst}.{input_name}: {received!r} does not fit {entry[0]!r}")


def comfy_error_type(exc_type: type) -> str:
    """How ComfyUI names a failed node's exception type in its error dialog and console (execution.py,
    ``full_type_name``): the class's qualified name, prefixed with its module unless that is ``builtins``."""
    if exc_type.__module__ == "builtins":
        return exc_type.__qualname__
    return f"{exc_type.__module__}.{exc_type.__qualname__}"


# ------------------------------------------------------------------------ ComfyUI's built-in nodes, minimally
def core_nodes(stubs: ComfyStubs, embed_metadata: bool = True) -> dict:
    """Stand-ins for the ComfyUI built-ins the example workflows use: ComfyUI's class names, input names and
    socket types; files are looked up as ComfyUI does (a missing checkpoint or LoRA is an error); images are
    deterministic noise of the right shape. SaveImage and PreviewImage write PNGs the way ComfyUI does unless
    started with ``--disable-metadata`` (``embed_metadata=False``): a "prompt" text chunk holding the API-format
    prompt and one chunk per EXTRA_PNGINFO key (the frontend sends the whole UI workflow as "workflow")."""
    import json

    import torch

    fp = stubs.modules["folder_paths"]

    def combo(folder, tip):
        return (fp.get_filename_list(folder), {"tooltip": tip})

    class CheckpointLoaderSimple:
        FUNCTION, RETURN_TYPES = "load", ("MODEL", "CLIP", "VAE")

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"ckpt_name": combo("checkpoints", "checkpoint")}}

        def load(self, ckpt_name):
            fp.get_full_path_or_raise("checkpoints", ckpt_name)
            return ({"ckpt": ckpt_name, "loras": []}, {"ckpt": ckpt_name, "loras": []}, {"ckpt": ckpt_name})

    class LoraLoader:
        FUNCTION, RETURN_TYPES = "load", ("MODEL", "CLIP")

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "lora_name": combo("loras", "lora"),
                                 "strength_model": ("FLOAT",), "strength_clip": ("FLOAT",)}}

        def load(self, model, clip, lora_name, strength_model, strength_clip):
            fp.get_full_path_or_raise("loras", lora_name)
            return ({**model, "loras": model["loras"] + [lora_name]}, {**clip, "loras": clip["loras"] + [lora_name]})

    class CLIPTextEncode:
        FUNCTION, RETURN_TYPES = "encode", ("CONDITIONING",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"text": ("STRING",), "clip": ("CLIP",)}}

        def encode(self, text, clip):
            return ({"text": text, "loras": clip["loras"]},)

    class EmptyLatentImage:
        FUNCTION, RETURN_TYPES = "generate", ("LATENT",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"width": ("INT",), "height": ("INT",), "batch_size": ("INT",)}}

        def generate(self, width, height, batch_size):
            return ({"samples": torch.zeros(batch_size, 4, height // 8, width // 8)},)

    class KSampler:
        FUNCTION, RETURN_TYPES = "sample", ("LATENT",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",), "seed": ("INT",), "steps": ("INT",), "cfg": ("FLOAT",),
                                 "sampler_name": (["euler", "dpmpp_2m"],), "scheduler": (["normal", "karras"],),
                                 "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                                 "latent_image": ("LATENT",), "denoise": ("FLOAT",)}}

        def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                   denoise=1.0):
            shape = latent_image["samples"].shape
            return ({"samples": torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))},)

    class VAEDecode:
        FUNCTION, RETURN_TYPES = "decode", ("IMAGE",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}

        def decode(self, samples, vae):
            x = torch.sigmoid(samples["samples"][:, :3]).repeat_interleave(8, 2).repeat_interleave(8, 3)
            return (x.permute(0, 2, 3, 1).contiguous(),)

    class SaveImage:
        FUNCTION, RETURN_TYPES, OUTPUT_NODE = "save_images", (), True
        directory, kind = stubs.output, "output"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING",)},
                    "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

        def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
            from PIL import Image
            from PIL.PngImagePlugin import PngInfo

            h, w = images.shape[1:3]
            folder, stem, counter, subfolder, _ = fp.get_save_image_path(filename_prefix, str(self.directory), w, h)
            saved = []
            for i, image in enumerate(images):
                info = PngInfo()
                if embed_metadata:
                    if prompt is not None:
                        info.add_text("prompt", json.dumps(prompt))
                    for key, value in (extra_pnginfo or {}).items():
                        info.add_text(key, json.dumps(value))
                name = f"{stem}_{counter + i:05}_.png"
                rgb = image.mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(rgb).save(os.path.join(folder, name), pnginfo=info)
                saved.append({"filename": name, "subfolder": subfolder, "type": self.kind})
            return {"ui": {"images": saved}}

    class PreviewImage(SaveImage):
        directory, kind = stubs.temp, "temp"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"images": ("IMAGE",)},
                    "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

        def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
            return super().save_images(images, "ComfyUI_temp_preview", prompt, extra_pnginfo)

    class LoadImage:
        """ComfyUI's: a file of input/ as IMAGE [1, H, W, 3] in [0, 1] and a MASK (here: none, zeros)."""
        FUNCTION, RETURN_TYPES = "load_image", ("IMAGE", "MASK")

        @classmethod
        def INPUT_TYPES(cls):
            files = sorted(p.name for p in stubs.input.iterdir() if p.is_file()) if stubs.input.exists() else []
            return {"required": {"image": (files, {"image_upload": True})}}

        def load_image(self, image):
            import numpy as np
            from PIL import Image

            with Image.open(stubs.input / image) as im:
                rgb = torch.from_numpy(np.array(im.convert("RGB"))).float() / 255
            return rgb[None], torch.zeros(1, *rgb.shape[:2])

    class ImageBatch:
        """ComfyUI's: image2 resized to image1's size (bilinear here), then both in one batch."""
        FUNCTION, RETURN_TYPES = "batch", ("IMAGE",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"image1": ("IMAGE",), "image2": ("IMAGE",)}}

        def batch(self, image1, image2):
            if image2.shape[1:3] != image1.shape[1:3]:
                image2 = torch.nn.functional.interpolate(image2.movedim(-1, 1), size=tuple(image1.shape[1:3]),
                                                         mode="bilinear", align_corners=False).movedim(1, -1)
            return (torch.cat([image1, image2]),)

    return {cls.__name__: cls for cls in (CheckpointLoaderSimple, LoraLoader, CLIPTextEncode, EmptyLatentImage,
                                          KSampler, VAEDecode, SaveImage, PreviewImage, LoadImage, ImageBatch)}


def state_files(stubs: ComfyStubs) -> list[Path]:
    """Every file under the nodes' resume-state root (ComfyUI's temp folder when there are no system users)."""
    root = stubs.temp / "iddm_state"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def png_files(*folders) -> list[Path]:
    """Every PNG under the given folders."""
    return sorted(p for folder in folders for p in Path(folder).rglob("*.png"))


def png_chunk_types(path) -> list[str]:
    """The chunk types of a PNG file, in order (read from the bytes, not through PIL)."""
    import struct

    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    types_, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        types_.append(data[pos + 4:pos + 8].decode("ascii"))
        pos += 12 + length
    return types_
