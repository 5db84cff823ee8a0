"""The demo: the story (`story.py`, ``iddm demo``) and the small demo model trained here (`model/`).

The names of the 0.2 module ``iddm_core.demo`` (``demo_photos``, ``demo_config``, ``run_demo``, ...) are looked
up in ``story`` on first use, so importing ``iddm_core.demo.model`` stays light.
"""


def __getattr__(name: str):
    import importlib

    if name.startswith("__") or name in ("story", "model"):    # submodules are the import system's business
        raise AttributeError(name)
    return getattr(importlib.import_module(f"{__name__}.story"), name)
