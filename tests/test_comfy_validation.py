"""The shipped workflows under ComfyUI's own prompt validation, with the pack registered on V1 and on V3.

ComfyUI checks every link of a queued prompt before running anything (``execution.validate_prompt`` →
``validate_inputs`` → ``comfy_execution.validation.validate_node_input``). A link whose output type does not fit
the input makes every output node downstream of it invalid, and ComfyUI then drops those outputs ("Output will be
ignored") and runs the rest: the generation branch of a train → Load LoRA graph vanished that way on ComfyUI
0.3.64 with the V3 nodes, while the same graph validated with the V1 ones.

No ComfyUI source can be installed in CI (PyPI carries only its frontend, templates and docs packages, no server
code), so this file restates the behaviour that decides a link, written from reading ComfyUI itself:

* ``comfy_execution/validation.py`` ``validate_node_input`` at ComfyUI 0.3.64 (commit a125cd8): a link fits when
  ``received != expected`` is false (so a type's own ``__ne__`` decides first), else only when both are strings
  whose comma-separated sets overlap. A later revision adds a MatchType shortcut ("COMFY_MATCHTYPE_V3").
* ``execution.py`` ``validate_inputs`` / ``validate_prompt`` (a125cd8): the received type is
  ``NODE_CLASS_MAPPINGS[src].RETURN_TYPES[slot]``, the expected one the first element of the input's INPUT_TYPES
  entry (a list of choices for a combo such as LoraLoader's ``lora_name``); a validator taking ``input_types``
  switches the check off; the output nodes are those with ``OUTPUT_NODE`` true, each validated with everything it
  depends on, and only the valid ones are queued.
* ``comfy_api/latest/_io.py`` (what ``comfy_api.v0_0_2`` re-exports; 0.3.64 has no v0_0_3): ``comfytype()`` stores
  ``io_type`` as a str subclass whose ``__ne__`` is union-aware, "*"-tolerant and unequal to any non-string, so a
  str subclass handed to ``io.Custom`` loses its own comparison; inputs report their type wrapped the same way
  (``Input.get_io_type``; a combo input reports "COMBO"); a ``Combo.Output`` is typed by its ``options``; a V3
  node's RETURN_TYPES are ``[o.io_type for o in schema.outputs]``, computed once (``GET_SCHEMA``). In a later
  revision (004b1b5 in the public index) ``io_type`` is stored as given and ``Combo.Output`` is typed "COMBO".

:func:`_io_module` is a small stand-in for that ``io`` in both revisions, with ComfyUI's names and keywords; the
core nodes of the workflows are comfy_harness.core_nodes (ComfyUI's V1 classes, input names and types).
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import types
from abc import ABC, abstractmethod
from enum import Enum
from pathlib import Path

import pytest

from comfy_harness import REPO, ComfyStubs, core_nodes, load_pack, unload_pack

API_DIR = REPO / "example_workflows" / "api"
UI_DIR = REPO / "example_workflows"
API_WORKFLOWS = sorted(API_DIR.glob("*.json"))
UI_WORKFLOWS = sorted(UI_DIR.glob("*.json"))
# ComfyUI revisions modelled: name -> (numbered comfy_api module it offers, io_type wrapped as at a125cd8)
REVISIONS = {"0.3.64": ("v0_0_2", True), "later": ("v0_0_3", False)}
REGISTRATIONS = ("v1", "v3@0.3.64", "v3@later")
MATCHTYPE = "COMFY_MATCHTYPE_V3"


# ---------------------------------------------------------------------------------- ComfyUI's link check
def link_fits(received, expected, revision: str = "0.3.64") -> bool:
    """validate_node_input(received, expected) with strict=False, as described in the module docstring."""
    if not received != expected:                  # the received type's own __ne__ is asked first
        return True
    if revision != "0.3.64" and MATCHTYPE in (received, expected):
        return True
    if not (isinstance(received, str) and isinstance(expected, str)):
        return False
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in expected.split(",")})


def _input_entry(cls, name):
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        if name in spec.get(section, {}):
            return section, spec[section][name]
    return None, None


def _skips_type_check(cls) -> bool:
    """A validator that takes ``input_types`` replaces ComfyUI's link-type check for that node."""
    import inspect

    fn = getattr(cls, "validate_inputs", None) if hasattr(cls, "GET_SCHEMA") else getattr(cls, "VALIDATE_INPUTS", None)
    if fn is None:
        return False
    try:
        return "input_types" in inspect.getfullargspec(fn).args
    except TypeError:
        return False


def validate_prompt(prompt: dict, classes: dict, revision: str = "0.3.64"):
    """(queued output node ids, {node id: errors}) as ComfyUI's validate_prompt decides them for link types and
    missing required inputs (widget values, their ranges and choices, are not modelled here)."""
    for nid, node in prompt.items():
        if node["class_type"] not in classes:
            raise ValueError(f"node {nid}: {node['class_type']} does not exist")
    outputs = [nid for nid, node in prompt.items()
               if getattr(classes[node["class_type"]], "OUTPUT_NODE", False) is True]
    validated: dict = {}

    def check(nid):
        if nid in validated:
            return validated[nid][0]
        node, cls = prompt[nid], classes[prompt[nid]["class_type"]]
        spec = cls.INPUT_TYPES()
        errors, upstream_ok = [], True
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                if name not in node["inputs"]:
                    if section == "required":
                        errors.append({"type": "required_input_missing", "details": name})
                    continue
                value = node["inputs"][name]
                if not isinstance(value, list):
                    continue
                src, slot = str(value[0]), value[1]
                received = classes[prompt[src]["class_type"]].RETURN_TYPES[slot]
                if not _skips_type_check(cls) and not link_fits(received, entry[0], revision):
                    errors.append({"type": "return_type_mismatch",
                                   "details": f"{name}, received_type({received}) mismatch input_type({entry[0]})"})
                    continue
                upstream_ok = check(src) and upstream_ok
        validated[nid] = (not errors and upstream_ok, errors)
        return validated[nid][0]

    queued = [o for o in outputs if check(o)]
    return queued, {nid: errs for nid, (ok, errs) in validated.items() if errs}


# --------------------------------------------------------------------------------- comfy_api io stand-in
class _ClassProperty:
    def __init__(self, fn):
        self.fn = fn

    def __get__(self, obj, owner):
        return self.fn(owner)


def _io_module(revision: str, version: str):
    """The parts of ``comfy_api.<version>.io`` nodes/v3.py uses, typed as in ComfyUI ``revision``."""
    wraps = REVISIONS[revision][1]
    io = types.ModuleType(f"comfy_api.{version}.io")

    class TypeName(str):
        """0.3.64's stored io_type: unions compare by subset either way, "*" fits all, non-strings never fit."""

        def __ne__(self, other):
            if str.__eq__(self, "*") or (isinstance(other, str) and str.__eq__(other, "*")):
                return False
            if not isinstance(other, str):
                return True
            mine, theirs = frozenset(self.split(",")), frozenset(other.split(","))
            return not (mine <= theirs or theirs <= mine)

        __hash__ = str.__hash__

    def stored(io_type):
        return TypeName(io_type) if wraps else io_type

    class IOBase:
        Parent = None

        @property
        def io_type(self):
            return self.Parent.io_type

    class Input(IOBase):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, extra_dict=None):
            self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
            self.lazy, self.extra_dict = lazy, extra_dict or {}

        def get_io_type(self):
            return stored(self.io_type)

    class WidgetInput(Input):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     socketless=None, widget_type=None, force_input=None, extra_dict=None):
            super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
            self.default, self.widget_type, self.force_input = default, widget_type, force_input

        def get_io_type(self):
            return self.widget_type if self.widget_type is not None else super().get_io_type()

    class Output(IOBase):
        def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
            self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list

        def get_io_type(self):
            return self.io_type

    class BooleanInput(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     label_on=None, label_off=None, socketless=None, force_input=None, extra_dict=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict)

    class NumberInput(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, min=None,
                     max=None, step=None, round=None, control_after_generate=None, display_mode=None,
                     socketless=None, force_input=None, extra_dict=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict)

    class StringInput(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, multiline=False,
                     placeholder=None, default=None, dynamic_prompts=None, socketless=None, force_input=None,
                     extra_dict=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict)

    class ComboInput(WidgetInput):
        def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, lazy=None,
                     default=None, control_after_generate=None, upload=None, image_folder=None, remote=None,
                     socketless=None, extra_dict=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, None, extra_dict)
            self.options = options

    class ComboOutput(Output):
        def __init__(self, id=None, display_name=None, options=None, tooltip=None, is_output_list=False):
            super().__init__(id, display_name, tooltip, is_output_list)
            self.options = options if options is not None else []

        if wraps:                                   # 0.3.64: a combo output is typed by its choices
            @property
            def io_type(self):
                return self.options

    def comfytype(name, io_type, input_base=Input, output_base=Output):
        kind = type(name, (), {"io_type": stored(io_type)})
        kind.Input = type("Input", (input_base,), {"Parent": kind})
        kind.Output = type("Output", (output_base,), {"Parent": kind})
        return kind

    io.Input, io.WidgetInput, io.Output = Input, WidgetInput, Output
    io.Boolean = comfytype("Boolean", "BOOLEAN", BooleanInput)
    io.Int = comfytype("Int", "INT", NumberInput)
    io.Float = comfytype("Float", "FLOAT", NumberInput)
    io.String = comfytype("String", "STRING", StringInput)
    io.Combo = comfytype("Combo", "COMBO", ComboInput, ComboOutput)
    io.Image = comfytype("Image", "IMAGE")
    io.Custom = lambda io_type: comfytype("CustomComfyType", io_type)

    class Hidden(str, Enum):
        unique_id = "UNIQUE_ID"
        prompt = "PROMPT"
        extra_pnginfo = "EXTRA_PNGINFO"
        dynprompt = "DYNPROMPT"
        auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
        api_key_comfy_org = "API_KEY_COMFY_ORG"

    class Schema:
        def __init__(self, node_id, display_name=None, category="sd", inputs=None, outputs=None, hidden=None,
                     description="", is_input_list=False, is_output_node=False, is_deprecated=False,
                     is_experimental=False, is_api_node=False, not_idempotent=False):
            self.node_id, self.display_name, self.category, self.description = node_id, display_name, category, \
                description
            self.inputs, self.outputs, self.hidden = list(inputs or []), list(outputs or []), list(hidden or [])
            self.is_input_list, self.is_output_node = is_input_list, is_output_node

    class ComfyNode(ABC):
        """The V1-compatible face ComfyUI's executor reads from a V3 node class."""
        hidden = None
        _RETURN_TYPES = None
        _OUTPUT_NODE = None

        @classmethod
        @abstractmethod
        def define_schema(cls):
            ...

        @classmethod
        @abstractmethod
        def execute(cls, **kwargs):
            ...

        @classmethod
        def GET_SCHEMA(cls):
            schema = cls.define_schema()
            for i, out in enumerate(schema.outputs):
                if out.id is None:
                    out.id = f"_{i}_{out.io_type}_"
            if cls._RETURN_TYPES is None:            # computed once per class, as ComfyUI does
                cls._RETURN_TYPES = [out.io_type for out in schema.outputs]
            if cls._OUTPUT_NODE is None:
                cls._OUTPUT_NODE = schema.is_output_node
            return schema

        @_ClassProperty
        def RETURN_TYPES(cls):  # noqa: N802 - ComfyUI's name
            if cls._RETURN_TYPES is None:
                cls.GET_SCHEMA()
            return cls._RETURN_TYPES

        @_ClassProperty
        def OUTPUT_NODE(cls):  # noqa: N802
            if cls._OUTPUT_NODE is None:
                cls.GET_SCHEMA()
            return cls._OUTPUT_NODE

        @classmethod
        def INPUT_TYPES(cls):  # noqa: N802
            schema = cls.define_schema()
            spec: dict = {"required": {}}
            for inp in schema.inputs:
                spec.setdefault("optional" if inp.optional else "required", {})[inp.id] = \
                    (inp.get_io_type(), {"tooltip": inp.tooltip})
            for h in schema.hidden:
                spec.setdefault("hidden", {})[h.name] = (h.value,)
            return spec

    class NodeOutput:
        def __init__(self, *args, ui=None, expand=None, block_execution=None):
            self.args, self.ui = args, ui

    io.Hidden, io.Schema, io.ComfyNode, io.NodeOutput = Hidden, Schema, ComfyNode, NodeOutput
    return io


class _ComfyExtension(ABC):
    async def on_load(self) -> None:
        pass

    @abstractmethod
    async def get_node_list(self) -> list:
        ...


def _install_comfy_api(revision: str):
    version = REVISIONS[revision][0]
    package = types.ModuleType("comfy_api")
    package.__path__ = []
    module = types.ModuleType(f"comfy_api.{version}")
    module.io = _io_module(revision, version)
    module.ComfyExtension = _ComfyExtension
    setattr(package, version, module)
    names = ("comfy_api", *(f"comfy_api.{v}" for v, _ in REVISIONS.values()))
    saved = {name: sys.modules.get(name) for name in names}
    for name in names:
        sys.modules.pop(name, None)
    sys.modules["comfy_api"], sys.modules[f"comfy_api.{version}"] = package, module
    return module, saved


def _restore(saved: dict) -> None:
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


def _load(module_name: str, revision: str | None, prepare=None):
    if revision is None:
        return load_pack(module_name), None
    api, saved = _install_comfy_api(revision)
    if prepare is not None:
        prepare(api)
    try:
        return load_pack(module_name), api
    finally:
        _restore(saved)


def registered_classes(module, stubs) -> dict:
    """NODE_CLASS_MAPPINGS after ComfyUI loaded the built-ins (stand-ins) and this pack: its NODE_CLASS_MAPPINGS
    when defined, else each node of comfy_entrypoint()'s extension under its GET_SCHEMA() node id."""
    classes = dict(core_nodes(stubs))
    if getattr(module, "NODE_CLASS_MAPPINGS", None) is not None:
        classes.update(module.NODE_CLASS_MAPPINGS)
        return classes

    async def node_list():
        extension = await module.comfy_entrypoint()
        await extension.on_load()
        return await extension.get_node_list()

    for cls in asyncio.run(node_list()):
        classes[cls.GET_SCHEMA().node_id] = cls
    return classes


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """{registration: (pack module, NODE_CLASS_MAPPINGS, io stand-in or None, revision)}."""
    stubs = ComfyStubs(tmp_path_factory.mktemp("comfyui")).install()
    loaded = []
    try:
        out = {}
        for registration in REGISTRATIONS:
            revision = registration.split("@")[1] if "@" in registration else None
            name = f"comfyui-iddm-validation-{registration.replace('@', '-').replace('.', '')}"
            module, api = _load(name, revision)
            loaded.append(name)
            out[registration] = (module, registered_classes(module, stubs), api and api.io, revision or "0.3.64")
        out["stubs"] = stubs
        yield out
    finally:
        stubs.uninstall()
        for name in loaded:
            unload_pack(name)


def _api_workflow(path: Path) -> dict:
    return json.loads(path.read_text())


def train_and_generate() -> dict:
    """The documented chain in one prompt: workflow 1 (train) and workflow 2 (generate), with Load LoRA's
    ``lora_name`` linked to IDDM Train LoRA's ``lora_name`` output instead of naming the file."""
    prompt = {}
    for prefix, name in (("t", "iddm_1_train_lora_api.json"), ("g", "iddm_2_generate_api.json")):
        for nid, node in _api_workflow(API_DIR / name).items():
            inputs = {k: [prefix + str(v[0]), v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            prompt[prefix + nid] = {"class_type": node["class_type"], "inputs": inputs}
    train = next(nid for nid, n in prompt.items() if n["class_type"] == "IDDMTrainLoRA")
    lora = next(nid for nid, n in prompt.items() if n["class_type"] == "LoraLoader")
    prompt[lora]["inputs"]["lora_name"] = [train, 0]
    return prompt


# ------------------------------------------------------------------------------------------------ tests
def test_the_workflows_are_there():
    names = {p.name for p in API_WORKFLOWS}
    assert {"iddm_1_train_lora_api.json", "iddm_2_generate_api.json", "iddm_3_protect_photos_api.json"} <= names
    assert {p.stem + "_api.json" for p in UI_WORKFLOWS} == names       # each UI workflow has its API twin


@pytest.mark.parametrize("revision", ["0.3.64", "later"])
def test_the_stand_in_reproduces_what_comfyui_reported(hosts, revision):
    """The stand-in is not allowed to hide the wrapping that broke real ComfyUI: a V3 output declared as
    ``io.Custom(ComboName())`` (the pack's typing before the fix) is rejected on 0.3.64 with ComfyUI's message,
    the generation output is dropped and the training output still queued."""
    specs = sys.modules["comfyui-iddm-validation-v1.nodes.specs"]
    api, saved = _install_comfy_api(revision)
    _restore(saved)
    io = api.io

    class OldTrain(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="IDDMTrainLoRA", outputs=[io.Custom(specs.ComboName()).Output(),
                                                               io.String.Output()], is_output_node=True)

        @classmethod
        def execute(cls, **kwargs):
            raise AssertionError("not run")

    classes = dict(hosts["v3@" + revision][1], IDDMTrainLoRA=OldTrain)
    prompt = train_and_generate()
    queued, errors = validate_prompt(prompt, classes, revision)
    lora = next(nid for nid, n in prompt.items() if n["class_type"] == "LoraLoader")
    save = next(nid for nid, n in prompt.items() if n["class_type"] == "IDDMSaveImageNoMetadata")
    if revision == "0.3.64":
        assert [e["type"] for e in errors[lora]] == ["return_type_mismatch"]
        assert errors[lora][0]["details"].startswith("lora_name, received_type(COMBO) mismatch input_type([")
        assert save not in queued and "t4" in queued
    else:                                             # io_type kept as given: the old typing fitted there
        assert errors == {} and save in queued


@pytest.mark.parametrize("registration", REGISTRATIONS)
@pytest.mark.parametrize("path", API_WORKFLOWS, ids=lambda p: p.stem)
def test_shipped_api_workflows_validate(hosts, registration, path):
    _, classes, _, revision = hosts[registration]
    prompt = _api_workflow(path)
    queued, errors = validate_prompt(prompt, classes, revision)
    outputs = {nid for nid, n in prompt.items() if getattr(classes[n["class_type"]], "OUTPUT_NODE", False) is True}
    assert errors == {}, errors
    assert outputs and set(queued) == outputs


@pytest.mark.parametrize("registration", REGISTRATIONS)
def test_train_to_load_lora_chain_validates_and_queues_both_branches(hosts, registration):
    module, classes, io, revision = hosts[registration]
    prompt = train_and_generate()
    queued, errors = validate_prompt(prompt, classes, revision)
    assert errors == {}, errors
    kinds = {prompt[nid]["class_type"] for nid in queued}
    assert kinds == {"IDDMTrainLoRA", "IDDMSaveImageNoMetadata"}, kinds      # training and generation branch
    train = classes["IDDMTrainLoRA"]
    received = train.RETURN_TYPES[0]
    assert str(received) == "COMBO"                  # what the frontend gets, and what an error would print
    # only the combo input fits, not any other socket type
    assert link_fits(received, ["a.safetensors", "b.safetensors"], revision) and link_fits(received, [], revision)
    assert not link_fits(received, "MODEL", revision) and not link_fits(received, "IDDM_REFS", revision)
    if io is not None:
        schema = train.GET_SCHEMA()
        assert isinstance(schema.outputs[0], io.Combo.Output)   # a combo output, as ComfyUI's own ones
        assert [str(t) for t in train.RETURN_TYPES] == ["COMBO", "STRING"]
    else:
        assert module.NODE_CLASS_MAPPINGS["IDDMTrainLoRA"] is train


@pytest.mark.parametrize("registration", REGISTRATIONS)
@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_links_validate(hosts, registration, path):
    """Each link of the UI-format workflows, typed as the server types it: the source class's RETURN_TYPES at the
    link's origin slot against the target input's INPUT_TYPES type (found by the input's name)."""
    _, classes, _, revision = hosts[registration]
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert workflow["links"]
    for link_id, src, src_slot, dst, dst_slot, declared in workflow["links"]:
        src_cls, dst_cls = classes[nodes[src]["type"]], classes[nodes[dst]["type"]]
        name = nodes[dst]["inputs"][dst_slot]["name"]
        _, entry = _input_entry(dst_cls, name)
        assert entry is not None, (path.name, link_id, name)
        received = src_cls.RETURN_TYPES[src_slot]
        assert link_fits(received, entry[0], revision), (path.name, link_id, received, entry[0])
        assert str(received) == declared              # the frontend wrote the output's type on the link


# ----------------------------------------------------------------------------------- which schema is active
def _load_logged(caplog, module_name, revision, prepare=None):
    caplog.clear()
    with caplog.at_level(logging.INFO):
        module, _ = _load(module_name, revision, prepare)
    unload_pack(module_name)
    return module, [r.getMessage() for r in caplog.records if r.getMessage().startswith("IDDM: nodes registered")]


def test_the_active_schema_is_logged_once(hosts, caplog, monkeypatch):
    del hosts                                         # only for the ComfyUI stub modules it installs
    monkeypatch.delenv("IDDM_COMFY_NODE_SCHEMA", raising=False)
    module, lines = _load_logged(caplog, "comfyui-iddm-log-v3", "0.3.64")
    assert hasattr(module, "comfy_entrypoint")
    assert lines == ["IDDM: nodes registered on the V3 schema (comfy_api v0_0_2)"]
    _, lines = _load_logged(caplog, "comfyui-iddm-log-v3b", "later")
    assert lines == ["IDDM: nodes registered on the V3 schema (comfy_api v0_0_3)"]

    module, lines = _load_logged(caplog, "comfyui-iddm-log-v1", None)
    assert hasattr(module, "NODE_CLASS_MAPPINGS") and len(lines) == 1
    assert lines[0].startswith("IDDM: nodes registered on the V1 schema") and "v0_0_3" in lines[0]

    def reject(api):                                  # an io the pack's schemas do not fit
        def fail(cls):
            raise ValueError("schema rejected")
        api.io.ComfyNode.GET_SCHEMA = classmethod(fail)

    module, lines = _load_logged(caplog, "comfyui-iddm-log-rejected", "0.3.64", reject)
    assert hasattr(module, "NODE_CLASS_MAPPINGS") and len(lines) == 1
    assert lines[0].startswith("IDDM: nodes registered on the V1 schema") and "could not be built" in lines[0]
    assert "v0_0_2" in lines[0]

    monkeypatch.setenv("IDDM_COMFY_NODE_SCHEMA", "v1")
    module, lines = _load_logged(caplog, "comfyui-iddm-log-forced", "0.3.64")
    assert hasattr(module, "NODE_CLASS_MAPPINGS") and len(lines) == 1
    assert lines[0].startswith("IDDM: nodes registered on the V1 schema") and "IDDM_COMFY_NODE_SCHEMA=v1" in lines[0]
