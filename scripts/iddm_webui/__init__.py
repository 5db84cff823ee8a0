"""The A1111 / Forge side of the pack: the "IDDM" tab (loaded by ``scripts/iddm_tab.py``).

``webui.py`` is the only module that touches the web UI (``modules.*``), ``ui.py`` the only one that imports
gradio, ``run.py`` the jobs behind the buttons, ``pictures.py`` the face preview and the chart (PIL, in memory).
All the work is ``iddm_core``'s, and what the ComfyUI nodes do the same way is ``iddm_core.frontend``'s.
This folder is a package, not a script: the web UI loads only the ``.py`` files directly in ``scripts/``.
"""
