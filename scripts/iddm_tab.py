"""AUTOMATIC1111 / Forge extension entry point: adds the "IDDM" tab (training an identity-decoupled LoRA).

The web UI runs every ``.py`` file of an extension's ``scripts/`` folder while the extension's own folder is at
the front of ``sys.path`` (``modules/scripts.py``, ``load_scripts``), and restores ``sys.path`` right after. This
file therefore imports what it needs now, and does not rely on that: it puts the extension folder on
``sys.path`` itself if it is missing, imports ``iddm_core`` (the library, shared with the ComfyUI nodes; later
imports of its submodules go through the package object) and takes that entry away again, so no module of this
repository (``nodes``, ``install``, ``tests``) can shadow another extension's. The tab itself lives in the
package ``scripts/iddm_webui`` (a folder, which the web UI does not run as a script), loaded here by path.
"""
import importlib.util
import sys
from pathlib import Path

EXTENSION_DIR = Path(__file__).resolve().parents[1]
PACKAGE = "iddm_webui"


def import_core():
    """``iddm_core`` from this extension (already imported: that module)."""
    if "iddm_core" in sys.modules:
        return sys.modules["iddm_core"]
    root = str(EXTENSION_DIR)
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        import iddm_core
    finally:
        if added:
            sys.path.remove(root)
    return iddm_core


def load_package():
    """The ``iddm_webui`` package, loaded from ``scripts/iddm_webui`` by path (once per process)."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    folder = Path(__file__).resolve().parent / PACKAGE
    spec = importlib.util.spec_from_file_location(PACKAGE, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACKAGE]
        raise
    return module


import_core()
load_package()
from iddm_webui import ui  # noqa: E402  (loaded just above)

try:
    from modules import script_callbacks
except ImportError:          # imported outside a web UI (e.g. a syntax check): nothing to register
    script_callbacks = None

if script_callbacks is not None:
    script_callbacks.on_ui_tabs(ui.on_ui_tabs)
