"""The pack's nodes on ComfyUI's V3 node schema (``comfy_api``), derived from the V1 classes.

The V1 classes (``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION``, tooltips, hidden inputs, ``VALIDATE_INPUTS``,
``IS_CHANGED``) stay the single source of truth: :func:`v3_nodes` wraps each one in an ``io.ComfyNode`` whose
``define_schema`` translates the V1 definition (recomputed on every call, so combo choices and "installed"
tooltips stay live like V1's) and whose ``execute`` runs the V1 function (with its plain-error wrapping, see
errors.py). Node ids, input names and their order are the V1 ones, so saved workflows of either format load.

The API is imported from a numbered ``comfy_api`` version, never ``latest`` (which changes without notice):
:data:`PINNED_VERSIONS`, newest first. Without any of them (ComfyUI older than the versioned API, or no ComfyUI),
:func:`load_api` returns None and the pack registers its V1 mappings as before. Nothing here imports torch.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os

from .specs import ComboName

# Numbered comfy_api versions this module is written against, newest first. Both expose the same ``io`` names
# used below (ComfyNode, Schema, Boolean/Int/Float/String/Combo/Image/Custom, Hidden, NodeOutput) and
# ComfyExtension; v0_0_2 covers ComfyUI releases from before v0_0_3 existed.
PINNED_VERSIONS = ("v0_0_3", "v0_0_2")
# Set to "v1" to make the pack register its V1 mappings even where comfy_api is available.
SCHEMA_ENV = "IDDM_COMFY_NODE_SCHEMA"

_log = logging.getLogger(__name__)

# V1 widget type -> V3 io class name
_TYPED = {"BOOLEAN": "Boolean", "INT": "Int", "FLOAT": "Float", "STRING": "String", "IMAGE": "Image"}
# V1 option name -> V3 Input keyword (anything else goes through extra_dict when the io version has it)
_OPTION_KWARGS = {"default": "default", "min": "min", "max": "max", "step": "step", "round": "round",
                  "tooltip": "tooltip", "multiline": "multiline", "placeholder": "placeholder",
                  "label_on": "label_on", "label_off": "label_off", "dynamicPrompts": "dynamic_prompts",
                  "forceInput": "force_input", "lazy": "lazy", "control_after_generate": "control_after_generate"}


def load_api():
    """The pinned ``comfy_api`` version module (with ``io`` and ``ComfyExtension``), or None to stay on V1."""
    if os.environ.get(SCHEMA_ENV, "").strip().lower() == "v1":
        return None
    for version in PINNED_VERSIONS:
        try:
            api = importlib.import_module(f"comfy_api.{version}")
        except ImportError:
            continue
        if hasattr(api, "io") and hasattr(api, "ComfyExtension"):
            return api
    return None


def api_version(api) -> str:
    """The numbered version of a module :func:`load_api` returned, e.g. "v0_0_3"."""
    return api.__name__.rsplit(".", 1)[-1]


def v1_reason() -> str:
    """Why :func:`load_api` found no API to register on (for the pack's one log line)."""
    if os.environ.get(SCHEMA_ENV, "").strip().lower() == "v1":
        return f"{SCHEMA_ENV}=v1"
    return f"this ComfyUI has no comfy_api {' or '.join(PINNED_VERSIONS)}"


def _io_class(io, kind, cache: dict):
    """The V3 io type for a V1 socket type: the built-in one for widgets/IMAGE, else ``io.Custom(kind)`` (ComfyUI
    may re-wrap ``kind`` in its own str type, so a ComboName output goes through :func:`_combo_name_output`)."""
    if isinstance(kind, str) and type(kind) is str and kind in _TYPED:
        return getattr(io, _TYPED[kind])
    if kind not in cache:
        cache[kind] = io.Custom(kind)
    return cache[kind]


def _accepted(factory) -> tuple[set, bool]:
    params = inspect.signature(factory).parameters
    return set(params), "extra_dict" in params


def _make_input(io, name: str, entry: tuple, optional: bool, cache: dict):
    """One V1 input ``(type, options)`` as a V3 Input with the same id, type, options and required/optional."""
    kind = entry[0]
    opts = dict(entry[1]) if len(entry) > 1 and entry[1] else {}
    kwargs = {"optional": optional}
    if isinstance(kind, (list, tuple)):
        factory = io.Combo.Input
        kwargs["options"] = list(kind)
    else:
        factory = _io_class(io, kind, cache).Input
    accepted, has_extra = _accepted(factory)
    extra = {}
    for key, value in opts.items():
        keyword = _OPTION_KWARGS.get(key)
        if keyword is not None and keyword in accepted:
            kwargs[keyword] = value
        else:
            extra[key] = value
    if extra:
        if has_extra:
            kwargs["extra_dict"] = extra
        else:
            _log.debug("%s: options %s not representable in this comfy_api version", name, sorted(extra))
    return factory(name, **kwargs)


def _combo_name_output(io, kind: ComboName, cache: dict):
    """An output class for a V1 output typed :class:`specs.ComboName` (Train LoRA's ``lora_name``): a combo output
    whose type is ``kind`` itself.

    ComfyUI checks a link with the received type's own ``!=`` (comfy_execution/validation.py), and LoraLoader's
    ``lora_name`` expects its list of files, so the type must stay the ComboName object. ``io.Custom(kind)`` does
    not keep it on ComfyUI 0.3.64: ``comfytype`` re-wraps every io_type in its own str subclass, which is unequal to
    any list ("received_type(COMBO) mismatch input_type([...])") and the generation branch is dropped. A plain
    ``io.Combo.Output`` fits only by chance there (typed by its ``options``, compared by list equality with a file
    list that changes whenever a LoRA is written) and not at all where it is typed "COMBO". ComfyUI (0.3.64 and
    later) reads a V3 output's type from ``Output.io_type`` (RETURN_TYPES, node info), so ``io.Combo.Output`` with
    that property returning ``kind`` fits the combo input everywhere and still reaches the frontend as "COMBO"."""
    key = ("combo output", kind)
    if key not in cache:
        combo = getattr(io, "Combo", None)
        base = getattr(combo, "Output", None) or io.Custom(str(kind)).Output
        cache[key] = type("ComboNameOutput", (base,), {"__module__": __name__, "io_type": property(lambda self: kind)})
    return cache[key]


def _make_output(io, kind, name, tooltip, is_list: bool, cache: dict):
    if isinstance(kind, ComboName):
        factory = _combo_name_output(io, kind, cache)
    else:
        factory = _io_class(io, kind, cache).Output
    kwargs = {"display_name": name, "tooltip": tooltip, "is_output_list": is_list}
    accepted, _ = _accepted(factory)
    return factory(**{k: v for k, v in kwargs.items() if k in accepted})


def schema_for(io, node_id: str, display_name: str, v1, cache: dict | None = None):
    """The ``io.Schema`` equivalent to V1 class ``v1`` (inputs in V1 order: required, then optional)."""
    cache = {} if cache is None else cache
    spec = v1.INPUT_TYPES()
    inputs = [_make_input(io, name, entry, section == "optional", cache)
              for section in ("required", "optional") for name, entry in spec.get(section, {}).items()]
    types = tuple(getattr(v1, "RETURN_TYPES", ()))
    names = tuple(getattr(v1, "RETURN_NAMES", None) or [str(t) for t in types])
    tips = tuple(getattr(v1, "OUTPUT_TOOLTIPS", None) or [None] * len(types))
    is_list = tuple(getattr(v1, "OUTPUT_IS_LIST", None) or [False] * len(types))
    outputs = [_make_output(io, t, n, tip, bool(lst), cache) for t, n, tip, lst in zip(types, names, tips, is_list)]
    hidden = [io.Hidden(kind) for kind in spec.get("hidden", {}).values()]
    return io.Schema(node_id=node_id, display_name=display_name, category=v1.CATEGORY,
                     description=getattr(v1, "DESCRIPTION", ""), inputs=inputs, outputs=outputs, hidden=hidden,
                     is_output_node=bool(getattr(v1, "OUTPUT_NODE", False)),
                     is_input_list=bool(getattr(v1, "INPUT_IS_LIST", False)))


def node_output(io, returned):
    """A V1 return value (tuple, or {"ui": ..., "result": ...}) as an ``io.NodeOutput``."""
    if isinstance(returned, dict):
        return io.NodeOutput(*tuple(returned.get("result", ())), ui=returned.get("ui"))
    return io.NodeOutput(*tuple(returned))


def v3_node(io, node_id: str, display_name: str, v1):
    """An ``io.ComfyNode`` subclass for V1 class ``v1``, registered under the same ``node_id``."""
    cache: dict = {}

    def define_schema(cls):
        return schema_for(io, node_id, display_name, cls._iddm_v1, cache)

    def execute(cls, **kwargs):
        source = cls._iddm_v1
        hidden_values = getattr(cls, "hidden", None)
        for key, kind in source.INPUT_TYPES().get("hidden", {}).items():
            kwargs[key] = getattr(hidden_values, io.Hidden(kind).name, None) if hidden_values is not None else None
        return node_output(io, getattr(source(), source.FUNCTION)(**kwargs))

    namespace = {"__module__": __name__, "__doc__": v1.__doc__, "_iddm_v1": v1,
                 "define_schema": classmethod(define_schema), "execute": classmethod(execute)}
    # The V1 functions themselves, so ComfyUI sees the same argument names: a validator that names an input
    # replaces ComfyUI's own range/choice check of that input only (one taking **kwargs would disable all).
    if callable(getattr(v1, "VALIDATE_INPUTS", None)):
        namespace["validate_inputs"] = classmethod(v1.VALIDATE_INPUTS.__func__)
    if callable(getattr(v1, "IS_CHANGED", None)):
        namespace["fingerprint_inputs"] = classmethod(v1.IS_CHANGED.__func__)
    return type(v1.__name__, (io.ComfyNode,), namespace)


def v3_nodes(api, class_mappings: dict, display_names: dict) -> list:
    """One V3 node class per V1 mapping entry, in mapping order."""
    return [v3_node(api.io, node_id, display_names.get(node_id, node_id), v1)
            for node_id, v1 in class_mappings.items()]


def extension(api, nodes: list):
    """A ``ComfyExtension`` whose ``get_node_list`` returns ``nodes``."""

    class IDDMExtension(api.ComfyExtension):
        async def get_node_list(self):
            return list(nodes)

    return IDDMExtension()
