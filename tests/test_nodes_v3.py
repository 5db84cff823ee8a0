"""The pack on ComfyUI's V3 node schema (nodes/v3.py), against a minimal stand-in for the pinned ``comfy_api``.

The stand-in has only what nodes/v3.py uses, with ComfyUI's class and keyword names (io.ComfyNode, io.Schema,
io.Boolean/Int/Float/String/Combo/Image/Custom with their Input/Output, io.Hidden, io.NodeOutput,
ComfyExtension), and records what the pack builds. The checks: every V1 node has a V3 twin with the same node id,
the same inputs in the same order with the same options (UI-format workflows store widget values by position),
the same outputs and hidden inputs; the twins run the V1 code; without comfy_api the pack stays V1 only.
"""
from __future__ import annotations

import asyncio
import inspect
import sys
import types
from abc import ABC, abstractmethod
from enum import Enum

import pytest

from comfy_harness import ComfyStubs, load_pack, png_chunk_types, unload_pack

PINNED = "v0_0_3"
V1_PACK, V3_PACK = "comfyui-iddm-v1", "comfyui-iddm-v3"


# ------------------------------------------------------------------------------------- comfy_api stand-in
def _io_module():
    io = types.ModuleType(f"comfy_api.{PINNED}.io")

    class Input:
        io_type = None

        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, extra_dict=None):
            self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
            self.lazy, self.extra_dict = lazy, extra_dict or {}

    class Output:
        io_type = None

        def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
            self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list

    class TypeName(str):
        """How ComfyUI 0.3.64's comfytype() stores an io_type (a str subclass of its own, union-aware ``!=``): a
        str subclass given to io.Custom loses its own comparison (tests/test_comfy_validation.py)."""

        def __ne__(self, other):
            if not isinstance(other, str):
                return True
            mine, theirs = set(self.split(",")), set(other.split(","))
            return not (mine <= theirs or theirs <= mine)

        __hash__ = str.__hash__

    def recording(base, io_type):
        """``base`` with the keyword arguments of each construction kept in ``.passed`` (same signature)."""
        def __init__(self, *args, **kwargs):
            base.__init__(self, *args, **kwargs)
            self.passed = dict(kwargs)

        __init__.__signature__ = inspect.signature(base.__init__)
        namespace = {"__init__": __init__}
        if not isinstance(inspect.getattr_static(base, "io_type", None), property):
            namespace["io_type"] = io_type
        return type(base.__name__, (base,), namespace)

    def comfytype(io_type, input_cls=Input, output_cls=Output):
        io_type = TypeName(io_type)
        kind = type(f"T_{io_type}", (), {"io_type": io_type})
        kind.Input, kind.Output = recording(input_cls, io_type), recording(output_cls, io_type)
        return kind

    class WidgetInput(Input):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     socketless=None, force_input=None, extra_dict=None):
            super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
            self.default, self.force_input = default, force_input

    class BooleanInput(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     label_on=None, label_off=None, socketless=None, force_input=None, extra_dict=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, force_input, extra_dict)
            self.label_on, self.label_off = label_on, label_off

    class IntInput(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, min=None,
                     max=None, step=None, control_after_generate=None, display_mode=None, socketless=None,
                     force_input=None, extra_dict=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, force_input, extra_dict)
            self.min, self.max, self.step, self.control_after_generate = min, max, step, control_after_generate

    class FloatInput(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, min=None,
                     max=None, step=None, round=None, display_mode=None, socketless=None, force_input=None,
                     extra_dict=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, force_input, extra_dict)
            self.min, self.max, self.step, self.round = min, max, step, round

    class StringInput(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, multiline=False,
                     placeholder=None, default=None, dynamic_prompts=None, socketless=None, force_input=None,
                     extra_dict=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, force_input, extra_dict)
            self.multiline, self.placeholder, self.dynamic_prompts = multiline, placeholder, dynamic_prompts

    class ComboInput(WidgetInput):
        def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, lazy=None,
                     default=None, control_after_generate=None, upload=None, image_folder=None, remote=None,
                     socketless=None, extra_dict=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, extra_dict)
            self.options = options

    class ComboOutput(Output):
        def __init__(self, id=None, display_name=None, options=None, tooltip=None, is_output_list=False):
            super().__init__(id, display_name, tooltip, is_output_list)
            self.options = options if options is not None else []

        @property
        def io_type(self):          # 0.3.64: a combo output is typed by its choices
            return self.options

    io.Boolean = comfytype("BOOLEAN", BooleanInput)
    io.Int = comfytype("INT", IntInput)
    io.Float = comfytype("FLOAT", FloatInput)
    io.String = comfytype("STRING", StringInput)
    io.Combo = comfytype("COMBO", ComboInput, ComboOutput)
    io.Image = comfytype("IMAGE")
    io.built_custom = []
    io.Custom = lambda io_type: io.built_custom.append(io_type) or comfytype(io_type)

    class Hidden(str, Enum):
        unique_id = "UNIQUE_ID"
        prompt = "PROMPT"
        extra_pnginfo = "EXTRA_PNGINFO"
        dynprompt = "DYNPROMPT"

    class HiddenHolder:
        def __init__(self, **values):
            self.__dict__.update(values)

        def __getattr__(self, key):
            return None

    class Schema:
        def __init__(self, node_id, display_name=None, category="sd", inputs=None, outputs=None, hidden=None,
                     description="", is_input_list=False, is_output_node=False, is_deprecated=False,
                     is_experimental=False, is_api_node=False, not_idempotent=False, enable_expand=False):
            self.node_id, self.display_name, self.category, self.description = node_id, display_name, category, \
                description
            self.inputs, self.outputs, self.hidden = inputs or [], outputs or [], hidden or []
            self.is_input_list, self.is_output_node = is_input_list, is_output_node

    class ComfyNode(ABC):
        hidden = None

        @classmethod
        @abstractmethod
        def define_schema(cls):
            ...

        @classmethod
        @abstractmethod
        def execute(cls, **kwargs):
            ...

    class NodeOutput:
        def __init__(self, *args, ui=None, expand=None, block_execution=None):
            self.args, self.ui = args, ui

    io.Input, io.Output, io.WidgetInput = Input, Output, WidgetInput
    io.Hidden, io.HiddenHolder, io.Schema, io.ComfyNode, io.NodeOutput = Hidden, HiddenHolder, Schema, ComfyNode, \
        NodeOutput
    return io


class _ComfyExtension(ABC):
    async def on_load(self) -> None:
        pass

    @abstractmethod
    async def get_node_list(self) -> list:
        ...


def _install_comfy_api():
    package = types.ModuleType("comfy_api")
    package.__path__ = []
    version = types.ModuleType(f"comfy_api.{PINNED}")
    version.io = _io_module()
    version.ComfyExtension = _ComfyExtension
    package.__dict__[PINNED] = version
    saved = {name: sys.modules.get(name) for name in ("comfy_api", f"comfy_api.{PINNED}")}
    sys.modules["comfy_api"], sys.modules[f"comfy_api.{PINNED}"] = package, version
    return version, saved


def _restore(saved):
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """The pack loaded twice as ComfyUI loads it: without comfy_api (V1) and with the pinned stand-in (V3)."""
    stubs = ComfyStubs(tmp_path_factory.mktemp("comfyui")).install()
    try:
        v1 = load_pack(V1_PACK)
        api, saved = _install_comfy_api()
        try:
            v3 = load_pack(V3_PACK)
        finally:
            _restore(saved)
        yield stubs, v1, v3, api
    finally:
        stubs.uninstall()
        unload_pack(V1_PACK)
        unload_pack(V3_PACK)


def comfyui_register(module) -> dict:
    """What ComfyUI's load_custom_node registers for a module: NODE_CLASS_MAPPINGS when the module defines it
    (not None), otherwise the nodes of comfy_entrypoint()'s extension, by their schema's node_id."""
    registered = {}
    if getattr(module, "NODE_CLASS_MAPPINGS", None) is not None:
        registered.update(module.NODE_CLASS_MAPPINGS)
    elif hasattr(module, "comfy_entrypoint"):
        async def nodes():
            extension = await module.comfy_entrypoint()
            assert isinstance(extension, _ComfyExtension)
            await extension.on_load()
            return await extension.get_node_list()

        for cls in asyncio.run(nodes()):
            node_id = cls.define_schema().node_id
            assert node_id not in registered, f"{node_id} registered twice"
            registered[node_id] = cls
    return registered


def as_v1_inputs(schema) -> dict:
    """The V1 INPUT_TYPES a V3 schema stands for, from the keyword arguments each Input was built with (the
    option names as ComfyUI's get_v1_info sends them to the frontend)."""
    v1_names = {"dynamic_prompts": "dynamicPrompts", "force_input": "forceInput"}
    out = {"required": {}}
    for inp in schema.inputs:
        opts = {v1_names.get(k, k): v for k, v in inp.passed.items() if k not in ("optional", "options", "extra_dict")}
        opts.update(inp.passed.get("extra_dict") or {})
        kind = tuple(inp.passed["options"]) if "options" in inp.passed else inp.io_type
        out.setdefault("optional" if inp.optional else "required", {})[inp.id] = (kind, opts)
    hidden = {h.name: h.value for h in schema.hidden}
    if hidden:
        out["hidden"] = hidden
    return out


def _normal(spec: dict) -> dict:
    """An INPUT_TYPES dict with combo choices as tuples and every entry as (type, options)."""
    return {section: ({name: (tuple(e[0]) if isinstance(e[0], list) else e[0], dict(e[1]) if len(e) > 1 else {})
                       for name, e in entries.items()} if section != "hidden" else dict(entries))
            for section, entries in spec.items()}


# ------------------------------------------------------------------------------------------------ loading
def test_without_comfy_api_the_pack_is_v1_only(packs):
    _, v1, _, _ = packs
    assert not hasattr(v1, "comfy_entrypoint")
    assert v1.WEB_DIRECTORY == "./web"
    assert set(v1.NODE_CLASS_MAPPINGS) == set(v1.NODE_DISPLAY_NAME_MAPPINGS)
    assert comfyui_register(v1) == v1.NODE_CLASS_MAPPINGS


def test_with_pinned_comfy_api_each_node_is_registered_once_on_v3(packs):
    _, v1, v3, api = packs
    # ComfyUI's loader takes NODE_CLASS_MAPPINGS over comfy_entrypoint: the V3 pack must not define it
    assert not hasattr(v3, "NODE_CLASS_MAPPINGS") and callable(v3.comfy_entrypoint)
    assert v3.WEB_DIRECTORY == "./web"
    registered = comfyui_register(v3)
    assert list(registered) == list(v1.NODE_CLASS_MAPPINGS)                # same ids, same order
    for node_id, cls in registered.items():
        assert issubclass(cls, api.io.ComfyNode) and cls.__name__ == v1.NODE_CLASS_MAPPINGS[node_id].__name__
        assert cls._iddm_v1 is _own_v1(node_id)
    # the V3 pack's node modules are its own copy, loaded under its own name
    assert sys.modules[f"{V3_PACK}.nodes.v3"].PINNED_VERSIONS[0] == PINNED


def test_env_variable_keeps_v1(packs, monkeypatch):
    del packs                                   # only for the stub ComfyUI modules it installs
    api, saved = _install_comfy_api()
    monkeypatch.setenv("IDDM_COMFY_NODE_SCHEMA", "v1")
    try:
        forced = load_pack("comfyui-iddm-forced")
        assert hasattr(forced, "NODE_CLASS_MAPPINGS") and not hasattr(forced, "comfy_entrypoint")
    finally:
        _restore(saved)
        unload_pack("comfyui-iddm-forced")


def test_a_schema_the_api_rejects_falls_back_to_v1(packs):
    """ComfyUI validates each schema in GET_SCHEMA inside its loader, where an error would lose the whole pack;
    the pack builds and validates them at import instead and stays on V1 if one fails."""
    del packs
    api, saved = _install_comfy_api()

    def reject(cls):
        raise ValueError("schema rejected")

    api.io.ComfyNode.GET_SCHEMA = classmethod(reject)
    try:
        fallback = load_pack("comfyui-iddm-rejected")
        assert hasattr(fallback, "NODE_CLASS_MAPPINGS") and not hasattr(fallback, "comfy_entrypoint")
    finally:
        del api.io.ComfyNode.GET_SCHEMA
        _restore(saved)
        unload_pack("comfyui-iddm-rejected")


# ------------------------------------------------------------------------------------------------ schema
def test_v3_twins_match_the_v1_definitions(packs):
    """Same node id, display name, category, description, output flag; inputs in the same order with the same
    type, default, range, choices and tooltip; same hidden inputs; outputs with the same types, names, tooltips."""
    _, v1, v3, api = packs
    v3_classes = comfyui_register(v3)
    for node_id, old in v1.NODE_CLASS_MAPPINGS.items():
        schema = v3_classes[node_id].define_schema()
        assert isinstance(schema, api.io.Schema)
        assert schema.node_id == node_id
        assert schema.display_name == v1.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert schema.category == old.CATEGORY == "IDDM"
        assert schema.description == old.DESCRIPTION
        assert schema.is_output_node is bool(getattr(old, "OUTPUT_NODE", False))
        spec = old.INPUT_TYPES()
        rebuilt = as_v1_inputs(schema)
        for section in ("required", "optional"):                            # widget order = saved positions
            assert list(rebuilt.get(section, {})) == list(spec.get(section, {})), (node_id, section)
        assert _normal(rebuilt) == _normal(spec), node_id
        assert [o.io_type for o in schema.outputs] == list(old.RETURN_TYPES)
        assert [o.display_name for o in schema.outputs] == list(getattr(old, "RETURN_NAMES", None) or old.RETURN_TYPES)
        assert [o.tooltip for o in schema.outputs] == list(getattr(old, "OUTPUT_TOOLTIPS", None)
                                                            or [None] * len(old.RETURN_TYPES))
        assert all(o.id is None for o in schema.outputs)    # ComfyUI names them; "lora_name" is also an input
    # the custom socket types go through io.Custom; the LoRA name output is a combo output typed ComboName itself
    assert {"IDDM_REFS", "IDDM_LOSS", "IDDM_PGD"} <= {str(t) for t in api.io.built_custom}
    train = v3_classes["IDDMTrainLoRA"].define_schema()
    assert isinstance(train.outputs[0], api.io.Combo.Output)
    assert train.outputs[0].io_type == ["any", "combo"] and train.outputs[0].io_type == "COMBO"
    assert not train.outputs[0].io_type != ["any", "combo"]          # ComfyUI's link check asks ``!=``


def test_schema_is_recomputed_per_call(packs):
    """Choices come from V1's INPUT_TYPES each time, as ComfyUI asks for node definitions again on refresh."""
    stubs, v1, v3, _ = packs
    pgd = comfyui_register(v3)["IDDMPGDTwoStage"]

    def choices():
        return next(i.options for i in pgd.define_schema().inputs if i.id == "preview_ckpt")

    before = choices()
    (stubs.models / "checkpoints" / "new_model.safetensors").write_bytes(b"")
    try:
        assert "new_model.safetensors" not in before and "new_model.safetensors" in choices()
        assert choices() == list(v1.NODE_CLASS_MAPPINGS["IDDMPGDTwoStage"].INPUT_TYPES()["optional"]
                                 ["preview_ckpt"][0])
    finally:
        (stubs.models / "checkpoints" / "new_model.safetensors").unlink()


def test_validators_keep_their_v1_signature(packs):
    """validate_inputs / fingerprint_inputs are V1's VALIDATE_INPUTS / IS_CHANGED: ComfyUI skips its own check
    only for inputs the validator names, so the argument list must be the same."""
    _, v1, v3, _ = packs
    v3_classes = comfyui_register(v3)
    loss, loss_v1 = v3_classes["IDDMFaceEnsembleLoss"], v1.NODE_CLASS_MAPPINGS["IDDMFaceEnsembleLoss"]
    assert inspect.getfullargspec(loss.validate_inputs) == inspect.getfullargspec(loss_v1.VALIDATE_INPUTS)
    assert loss.validate_inputs(tau=0.0) == loss_v1.VALIDATE_INPUTS(tau=0.0) != True  # noqa: E712
    assert loss.validate_inputs(tau=0.03) is True
    refs = v3_classes["IDDMLoadPrivateRefs"]
    assert refs.fingerprint_inputs.__func__ is _own_v1("IDDMLoadPrivateRefs").IS_CHANGED.__func__
    for node_id, cls in v3_classes.items():        # no validator where V1 had none (ComfyUI's checks stay on)
        old = v1.NODE_CLASS_MAPPINGS[node_id]
        assert ("validate_inputs" in cls.__dict__) == hasattr(old, "VALIDATE_INPUTS"), node_id
        assert ("fingerprint_inputs" in cls.__dict__) == hasattr(old, "IS_CHANGED"), node_id


# ------------------------------------------------------------------------------------------------ execution
def _own_v1(node_id):
    """The V1 class the V3 pack itself wraps (the V1 pack above is a separate copy with its own classes)."""
    return sys.modules[f"{V3_PACK}.nodes"].NODE_CLASS_MAPPINGS[node_id]


def _run_v3(api, cls, unique_id="7", **inputs):
    """As ComfyUI runs a V3 node: hidden values on cls.hidden, the inputs as keyword arguments."""
    clone = type(cls.__name__, (cls,), {"hidden": api.io.HiddenHolder(unique_id=unique_id)})
    out = clone.execute(**inputs)
    assert isinstance(out, api.io.NodeOutput)
    return out


def test_loss_node_gives_the_v1_result(packs):
    _, _, v3, api = packs
    inputs = {"use_dlib": True, "tau": 0.05, "extra_surrogates": "irse50:/m/irse50.pth"}
    old = _own_v1("IDDMFaceEnsembleLoss")().build(**inputs)
    new = _run_v3(api, comfyui_register(v3)["IDDMFaceEnsembleLoss"], **inputs)
    assert new.ui is None and len(new.args) == 1
    assert new.args == old


def test_pgd_node_gives_the_v1_result_and_ui(packs):
    _, _, v3, api = packs
    inputs = {"preset": "balanced", "T": 4, "rho": 0.2, "eta": 0.05, "alpha": 0.01}
    old = _own_v1("IDDMPGDTwoStage")().build(**inputs, unique_id="7")
    new = _run_v3(api, comfyui_register(v3)["IDDMPGDTwoStage"], **inputs)
    assert new.ui == old["ui"]
    assert new.args[0] == old["result"][0] and new.args[2] == old["result"][2]
    assert new.args[1].shape == old["result"][1].shape


def test_hidden_unique_id_reaches_the_v1_function(packs, monkeypatch):
    _, _, v3, api = packs
    pgd = comfyui_register(v3)["IDDMPGDTwoStage"]
    seen = {}
    v1_cls = pgd._iddm_v1
    original = v1_cls.build
    monkeypatch.setattr(v1_cls, "build", lambda self, **kw: seen.update(kw) or original(self, **kw))
    _run_v3(api, pgd, unique_id="42", preset="privacy", T=2, rho=0.1, eta=0.08, alpha=0.008)
    assert seen["unique_id"] == "42"


def test_save_node_writes_the_same_pngs(packs):
    import torch

    stubs, v1, v3, api = packs
    images = torch.rand(2, 24, 32, 3, generator=torch.Generator().manual_seed(1))
    old = v1.NODE_CLASS_MAPPINGS["IDDMSaveImageNoMetadata"]().save(images, "v3check/old")
    new = _run_v3(api, comfyui_register(v3)["IDDMSaveImageNoMetadata"], images=images,
                  filename_prefix="v3check/new")
    assert new.args == () and len(new.ui["images"]) == len(old["ui"]["images"]) == 2
    for a, b in zip(old["ui"]["images"], new.ui["images"]):
        assert (a["subfolder"], a["type"]) == (b["subfolder"], b["type"]) == ("v3check", "output")
        pa, pb = stubs.output / "v3check" / a["filename"], stubs.output / "v3check" / b["filename"]
        assert pa.read_bytes() == pb.read_bytes()
        assert set(png_chunk_types(pb)) == {"IHDR", "IDAT", "IEND"}


def test_library_errors_keep_their_plain_names(packs):
    """nodes/errors.py's wrapping applies on V3 too (execute calls the wrapped V1 function)."""
    _, _, v3, api = packs
    loss = comfyui_register(v3)["IDDMFaceEnsembleLoss"]
    with pytest.raises(Exception) as caught:
        _run_v3(api, loss, use_dlib=False, tau=0.03)
    assert type(caught.value).__module__ == "builtins" and type(caught.value).__name__ == "InputError"
