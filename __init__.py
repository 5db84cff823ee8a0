"""IDDM node pack for ComfyUI. ComfyUI imports this package from its custom_nodes folder.

On a ComfyUI with the versioned node API (``comfy_api``, see nodes/v3.py) the nodes are registered on the V3
schema through ``comfy_entrypoint``; ComfyUI's loader uses ``NODE_CLASS_MAPPINGS`` instead whenever a module
defines it, so it is then left out. On older ComfyUI the V1 mappings are exported as before. Node ids, inputs
and their order are the same either way.
"""
import logging as _logging

from .nodes import NODE_CLASS_MAPPINGS as _V1_CLASSES, NODE_DISPLAY_NAME_MAPPINGS as _V1_NAMES
from .nodes.v3 import api_version as _api_version, load_api as _load_api, v1_reason as _v1_reason

WEB_DIRECTORY = "./web"

_log = _logging.getLogger(__name__)
_API = _load_api()
_WHY_V1 = _v1_reason() if _API is None else None
if _API is not None:
    from .nodes.v3 import extension as _extension, v3_nodes as _v3_nodes

    try:
        V3_NODES = _v3_nodes(_API, _V1_CLASSES, _V1_NAMES)
        for _cls in V3_NODES:   # build and validate every schema now: a failure here still falls back to V1,
            getattr(_cls, "GET_SCHEMA", _cls.define_schema)()   # one inside ComfyUI's loader would lose the pack
    except Exception:           # an io this module does not fit: keep the pack working on V1
        _log.warning("IDDM: V3 node schema unavailable, using V1 nodes", exc_info=True)
        _WHY_V1 = f"the V3 schema could not be built on comfy_api {_api_version(_API)} (see the warning above)"
        _API = None

# One line saying which registration is active (a V3-only problem is then easy to place).
if _API is None:
    _log.info("IDDM: nodes registered on the V1 schema (NODE_CLASS_MAPPINGS): %s", _WHY_V1)
    NODE_CLASS_MAPPINGS = _V1_CLASSES
    NODE_DISPLAY_NAME_MAPPINGS = _V1_NAMES
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
else:
    _log.info("IDDM: nodes registered on the V3 schema (comfy_api %s)", _api_version(_API))

    async def comfy_entrypoint():
        """ComfyUI's V3 entry point: the extension listing the pack's nodes."""
        return _extension(_API, V3_NODES)

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
