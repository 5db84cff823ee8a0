"""The A1111/Forge "IDDM" tab, loaded the way the web UI loads it, built with a real gradio (3.41.2, the version
AUTOMATIC1111 pins; requirements-a1111-test.txt) against stubs of the web UI's ``modules`` (tests/a1111_harness),
trained on the tiny model by calling the functions its buttons are bound to."""
from __future__ import annotations

import inspect
import os
import re
import shutil
import sys
import types
from pathlib import Path

import pytest

from conftest import HANG_S
from a1111_harness import REPO, WebUIStubs, bound_function, load_extension_script, unload_extension

PRIVATE = "secret_alice"          # a private-looking photo name that must never reach a summary, log or LoRA
LORA = "alice_avatar"
TINY = dict(K=1, T=2, preset="fidelity", ft_steps=1, resolution=0, prior_preservation=False, lora_name=LORA)


def _gradio():
    """The real gradio (requirements-a1111-test.txt); the tests that build the tab skip without it."""
    return pytest.importorskip("gradio", reason="gradio for these tests: pip install --no-deps -r "
                                                "requirements-a1111-test.txt")


def _write_photos(folder: Path, uploads: Path, source: Path) -> list:
    """Four photos of one person under private names: two in the folder, two "uploaded" as gradio 3.41 hands
    uploads over (a temp copy with ``.name`` and the user's ``.orig_name``)."""
    from PIL import Image

    folder.mkdir(parents=True)
    files = []
    for i, name in enumerate(("obama.jpg", "obama2.jpg")):
        im = Image.open(source / name).convert("RGB")
        im.transpose(Image.FLIP_LEFT_RIGHT).save(folder / f"{PRIVATE}_{i}_m.jpg")
        copy = uploads / f"upload{i}" / f"{PRIVATE}_{i}.jpg"
        copy.parent.mkdir(parents=True)
        im.save(copy)
        files.append(copy)
    return files


def _uploads(files):
    return [types.SimpleNamespace(name=str(f), orig_name=f.name) for f in files]


@pytest.fixture(scope="module")
def webui(tmp_path_factory, faces_dir):
    """A stub A1111 with the tiny model as its loaded checkpoint (single file; its CLIP tokenizer in the Hugging Face
    cache, where A1111 keeps its download), --lora-dir set, the extension loaded as the web UI loads it."""
    from iddm_core.diffusion.writing import save_single_file
    from iddm_core.diffusion.tiny import build_tiny_bundle, write_tiny_tokenizer

    _gradio()
    root = tmp_path_factory.mktemp("a1111")
    stubs = WebUIStubs(root)
    save_single_file(build_tiny_bundle(), stubs.checkpoints / "tiny.safetensors")
    stubs.write_hf_tokenizer(write_tiny_tokenizer)
    photo_folder = root / "photos"
    upload_copies = _write_photos(photo_folder, root / "gradio_tmp", faces_dir)
    import torch

    # One CPU thread: the tiny model gains nothing from two, and on a loaded 2-core machine torch's second thread
    # spins (measured: the whole file 105 s with two threads, 22 s with one, under the same load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved_cache = os.environ.get("IDDM_CACHE_DIR")
    os.environ["IDDM_CACHE_DIR"] = str(root / "iddm_cache")     # resume states and class images stay in here
    stubs.install()
    info = stubs.add_checkpoint(stubs.checkpoints / "tiny.safetensors")
    stubs.load(info)
    try:
        module = load_extension_script()
        tabs = stubs.ui_tabs()
        yield types.SimpleNamespace(stubs=stubs, module=module, tabs=tabs, info=info, photos=photo_folder,
                                    upload_copies=upload_copies, root=root)
    finally:
        torch.set_num_threads(threads)
        stubs.uninstall()
        unload_extension()
        if saved_cache is None:
            os.environ.pop("IDDM_CACHE_DIR", None)
        else:
            os.environ["IDDM_CACHE_DIR"] = saved_cache


@pytest.fixture
def tab(webui):
    """The tab's Blocks and components by elem_id; the web UI's model back on the GPU, no leftovers."""
    stubs = webui.stubs
    stubs.calls.clear()
    stubs.state.calls.clear()
    stubs.state.steps.clear()
    stubs.state.interrupt_at_step = stubs.state.fail_at_step = stubs.state.on_step = None
    stubs.state.interrupted = False
    stubs.model.to("cuda")
    for f in stubs.lora_dir.iterdir():
        f.unlink()
    blocks = webui.tabs[0][0]
    components = {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}
    return types.SimpleNamespace(blocks=blocks, c=components, **vars(webui))


def _click(tab, button: str, **values):
    """Run what a click on ``button`` runs: the bound function, called with every input's default value unless
    given in ``values`` (by field name); returns the list of updates as {elem_id: value}."""
    fn, inputs, _ = bound_function(tab.blocks, tab.c[button])
    args = []
    for component in inputs:
        name = component.elem_id[len("iddm_"):]
        args.append(values.pop(name) if name in values else component.value)
    assert not values, f"not an input of {button}: {sorted(values)}"
    result = fn(*args)
    updates = list(result) if inspect.isgenerator(result) else [result]
    return [{c.elem_id: u.get("value") for c, u in update.items()} for update in updates]


def _run_module():
    """The tab's run.py as the extension loaded it."""
    return sys.modules["iddm_webui.run"]


def _texts(updates) -> str:
    return "\n".join(str(v) for u in updates for v in u.values() if isinstance(v, str))


def _last(updates, key):
    values = [u[key] for u in updates if key in u]
    return values[-1] if values else None


def _leftovers(tab) -> list:
    """Files of a run that must not exist after a failed or interrupted one: the LoRA (or its temp file) and a
    resume state."""
    files = [p for p in tab.stubs.lora_dir.iterdir()]
    state_root = tab.root / "iddm_cache" / "state"
    if state_root.exists():
        files += [p for p in state_root.rglob("*") if p.is_file()]
    return files


# ------------------------------------------------------------------------------------------------ loading
def test_tab_is_registered_and_built(tab):
    assert len(tab.tabs) == 1
    blocks, title, elem_id = tab.tabs[0]
    assert isinstance(blocks, _gradio().Blocks) and (title, elem_id) == ("IDDM", "iddm")
    train, inputs, outputs = bound_function(blocks, tab.c["iddm_train"])
    assert inspect.isgeneratorfunction(train)          # gradio streams its updates
    assert [c.elem_id for c in inputs] == ["iddm_" + name for name in _run_module().FIELDS]
    assert {c.elem_id for c in outputs} >= {"iddm_status", "iddm_chart", "iddm_summary", "iddm_tag", "iddm_uploads"}
    choices = [ch[0] if isinstance(ch, tuple) else ch for ch in tab.c["iddm_checkpoint"].choices]
    assert choices[0] == "(the web UI's current checkpoint)" and tab.info.title in choices
    status = tab.c["iddm_recognisers"].value
    assert "dlib: installed" in status and "to enable 'arcface'" in status      # what is missing and where to put it
    assert str(tab.stubs.models) in status


def test_extension_loads_without_its_folder_on_sys_path(tmp_path):
    """In a fresh interpreter whose sys.path lacks the extension folder (the web UI adds it during loading; this
    test does not): the script adds it for its own import only, and the tab's later (lazy) imports of iddm_core
    submodules still work after it is gone."""
    import subprocess

    _gradio()
    code = (
        "import sys, importlib.util\n"
        "sys.path = [p for p in sys.path if p not in (%r, '')] + [%r]\n"
        "from a1111_harness import WebUIStubs\n"
        "stubs = WebUIStubs(%r).install()\n"
        "spec = importlib.util.spec_from_file_location('iddm_tab.py', %r)\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "assert %r not in sys.path and 'nodes' not in sys.modules\n"
        "assert len(stubs.ui_tabs()) == 1\n"
        "run = sys.modules['iddm_webui.run']\n"
        "assert 'dlib: installed' in run.recognisers_text()\n"
        "print(sorted(m for m in sys.modules if m.startswith('iddm_core.'))[:3])\n"
        "print('heavy:', sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'dlib', "
        "'_dlib_pybind11', 'kornia', 'peft'}))\n"
    ) % (str(REPO), str(Path(__file__).parent), str(tmp_path), str(REPO / "scripts" / "iddm_tab.py"), str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "iddm_core." in out.stdout
    assert "heavy: []" in out.stdout           # the web UI's start-up stays cheap: nothing heavy until Train


def test_library_stays_free_of_web_ui_and_gradio():
    offenders = []
    for path in (REPO / "iddm_core").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if re.search(r"^\s*(from|import)\s+(modules|gradio)\b", text, re.M):
            offenders.append(str(path))
    assert offenders == []
    for path in (REPO / "scripts").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if path.name != "ui.py":
            assert not re.search(r"^\s*(from|import)\s+gradio\b", text, re.M), path


# --------------------------------------------------------------------------------------------- training
def test_train_writes_lora_and_gives_the_model_back(tab):
    from iddm_core.training.kohya_check import inspect_lora

    model = tab.stubs.model
    updates = _click(tab, "iddm_train", photos_folder=str(tab.photos), uploads=_uploads(tab.upload_copies), **TINY)
    lora = tab.stubs.lora_dir / f"{LORA}.safetensors"
    assert lora.is_file(), _texts(updates)
    report = inspect_lora(lora)
    assert report["compatible"] and report["kind"] == "sd1" and report["modules"]["unet"] > 0, report
    steps = [u["iddm_status"] for u in updates if str(u.get("iddm_status", "")).startswith("step ")]
    assert len(steps) >= 4 and "step 4/4" in steps[-1]                       # live progress, every step
    assert "data:image/png;base64," in _last(updates, "iddm_chart")
    assert "data:image/png;base64," in _last(updates, "iddm_faces")         # the preview, in memory
    summary = _last(updates, "iddm_summary")
    assert f"<lora:{LORA}:1>" in summary and f"LoRA written: {LORA}.safetensors" in summary
    assert _last(updates, "iddm_tag") == f"<lora:{LORA}:1>"
    assert PRIVATE not in summary and PRIVATE not in _last(updates, "iddm_status")
    assert PRIVATE not in str(report["metadata"])
    # the web UI's model: moved off the GPU before, back after; one GPU job (begin/end)
    assert tab.stubs.calls == [("unload_model_weights", model), ("send_model_to_device", model)]
    assert model.device == "cuda" and tab.stubs.state.calls == [("begin", "iddm_train"), ("end",)]
    assert not tab.stubs.queue_lock.locked()
    # gradio's copies of the uploads are deleted and the upload box emptied; the user's folder is untouched
    assert not any(f.exists() for f in tab.upload_copies)
    assert _last(updates, "iddm_uploads") is None and len(list(tab.photos.iterdir())) == 2


def test_bad_photo_folder_fails_before_anything_is_unloaded(tab):
    updates = _click(tab, "iddm_train", photos_folder=str(tab.root / "no_such_folder"), **TINY)
    status = _last(updates, "iddm_status")
    assert status.startswith("error: photo folder not found") and "not touched" in status
    assert "Traceback" not in _texts(updates)
    assert tab.stubs.calls == [] and tab.stubs.state.calls == [] and tab.stubs.model.device == "cuda"
    assert _leftovers(tab) == []


def test_failure_during_the_run_still_gives_the_model_back(tab):
    tab.stubs.state.fail_at_step = 1
    updates = _click(tab, "iddm_train", photos_folder=str(_full_folder(tab)), **TINY)
    status = _last(updates, "iddm_status")
    assert status.startswith("error: RuntimeError: simulated failure") and "no LoRA was written" in status
    assert "Traceback" not in _texts(updates)
    model = tab.stubs.model
    assert tab.stubs.calls == [("unload_model_weights", model), ("send_model_to_device", model)]
    assert model.device == "cuda" and ("end",) in tab.stubs.state.calls
    assert _leftovers(tab) == []


def test_interrupt_stops_within_a_step_and_writes_nothing(tab):
    """Train while a generation holds the web UI's queue: it waits, then runs; Interrupt pressed at step 1."""
    import threading
    import time

    interrupt, _, _ = bound_function(tab.blocks, tab.c["iddm_interrupt"])
    said = []
    tab.stubs.state.on_step = lambda step: said.append(interrupt()) if step == 1 else None   # pressed at step 1
    def generation():                     # holds the web UI's queue until the training worker has asked for it
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(t.name == "iddm-train" for t in threading.enumerate()):
            time.sleep(0.02)
        time.sleep(0.5)
        tab.stubs.queue_lock.release()

    tab.stubs.queue_lock.acquire()
    threading.Thread(target=generation, daemon=True).start()
    updates = _click(tab, "iddm_train", photos_folder=str(_full_folder(tab)), **TINY)
    assert "waiting for the web UI's current job to finish" in [u.get("iddm_status") for u in updates]
    status = _last(updates, "iddm_status")
    assert status.startswith("interrupted at step 1 of 4: no LoRA was written"), status
    assert said and "stops after the current step" in said[0]["value"]
    assert tab.stubs.state.steps == [1]                                   # no step after the one it was pressed in
    model = tab.stubs.model
    assert tab.stubs.calls == [("unload_model_weights", model), ("send_model_to_device", model)]
    assert model.device == "cuda" and _leftovers(tab) == []
    # the next click trains again (the run lock and the interrupt flag were released)
    assert tab.stubs.state.interrupted is False


def _full_folder(tab) -> Path:
    """All four photos in one folder (the uploads of the first test were deleted after it)."""
    folder = tab.root / "photos_all"
    if not folder.exists():
        shutil.copytree(tab.photos, folder)
        from PIL import Image

        for i, name in enumerate(("obama.jpg", "obama2.jpg")):
            Image.open(_faces() / name).convert("RGB").save(folder / f"{PRIVATE}_{i}.jpg")
    return folder


def _faces() -> Path:
    from conftest import PACKAGE_FACES, SHARED_FACES

    return SHARED_FACES if SHARED_FACES.is_dir() else PACKAGE_FACES


def test_single_file_without_tokenizer_is_explained(tab, monkeypatch):
    run = _run_module()
    monkeypatch.setattr(run.webui, "tokenizer_dir", lambda explicit="": None)
    updates = _click(tab, "iddm_train", photos_folder=str(tab.photos), **TINY)
    status = _last(updates, "iddm_status")
    assert "no CLIP tokenizer found for tiny.safetensors" in status and "CLIP tokenizer folder" in status
    assert tab.stubs.calls == []


def test_preview_shows_faces_in_memory(tab):
    updates = _click(tab, "iddm_preview", photos_folder=str(_full_folder(tab)), resolution=64)
    assert "data:image/png;base64," in updates[0]["iddm_faces"]
    assert updates[0]["iddm_photos"].startswith("4 photos with a face at 64px: 2 reference (Xc), 2 protected (X0)")
    assert tab.stubs.calls == []


# ---------------------------------------------------------------------------------------------- adapter
def test_lora_folder_without_lora_dir_is_models_lora(webui):
    shared = sys.modules["modules.shared"]
    saved, shared.cmd_opts.lora_dir = shared.cmd_opts.lora_dir, None
    try:
        assert _run_module().webui.lora_dir() == webui.stubs.models / "Lora"
    finally:
        shared.cmd_opts.lora_dir = saved


def test_forge_adapter(tmp_path, webui):
    """Forge: the selected checkpoint from forge_loading_parameters, its tokenizer copy, unload_all_models and
    nothing loaded back by hand (Forge does it at the next generation; reload_model_weights is a no-op there)."""
    from iddm_core.diffusion.tiny import write_tiny_tokenizer

    webui_module = _run_module().webui
    forge = WebUIStubs(tmp_path, forge=True)
    (forge.checkpoints / "model.safetensors").write_bytes(b"")
    write_tiny_tokenizer(forge.webui_dir / "backend/huggingface/runwayml/stable-diffusion-v1-5/tokenizer")
    webui.stubs.uninstall()
    forge.install()
    try:
        info = forge.add_checkpoint(forge.checkpoints / "model.safetensors")
        forge.load(info)
        assert webui_module.is_forge() and webui_module.webui_name() == "Forge"
        assert webui_module.resolve_checkpoint(webui_module.CURRENT_CHOICE) == info.filename
        assert webui_module.tokenizer_dir().endswith("stable-diffusion-v1-5/tokenizer")
        offload = webui_module.offload_webui_model()
        assert forge.calls == [("unload_all_models",)]
        offload.restore()
        offload.restore()                                                  # once only
        assert forge.calls == [("unload_all_models",), ("reload_model_weights",)]
    finally:
        forge.uninstall()
        webui.stubs.install()


# ---------------------------------------------------------------------------------------------- install.py
def _install_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("iddm_install", REPO / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_keeps_the_web_ui_pins(tmp_path, monkeypatch):
    """As an A1111/Forge extension (extensions/<pack>, the web UI's requirements_versions.txt two folders up):
    a requirement the web UI pins is left to it, the rest is installed with the pins as pip constraints, and
    nothing that is already there is installed again."""
    install = _install_module()
    webui_dir = tmp_path / "webui"
    (webui_dir / "extensions" / "iddm").mkdir(parents=True)
    (webui_dir / "launch.py").write_text("")
    pins = webui_dir / "requirements_versions.txt"
    pins.write_text("transformers==4.30.2\nkornia==0.6.7  # a comment\ntorch\n")
    monkeypatch.setattr(install, "HERE", webui_dir / "extensions" / "iddm")
    monkeypatch.chdir(tmp_path)
    assert install.webui_pins_file() == pins
    todo, left = install.plan(["transformers>=99", "kornia>=99", "no-such-package-iddm>=1", "numpy"], pins)
    assert todo == ["no-such-package-iddm>=1"] and left == ["transformers>=99", "kornia>=99"]
    assert install.install_command(todo, pins)[-2:] == ["-c", str(pins)]
    assert "torch" not in [install.requirement_name(r) for r in install.requirements(REPO / "requirements.txt")]


def test_install_runs_no_pip_when_everything_is_there(monkeypatch):
    install = _install_module()
    calls = []
    monkeypatch.setattr(install, "requirements", lambda: ["numpy", "pillow"])
    monkeypatch.setattr(install, "onnxruntime_package", lambda: "onnxruntime")
    monkeypatch.setattr(install, "installed", lambda name: name == "onnxruntime")
    monkeypatch.setattr(install.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    monkeypatch.setattr(install, "install_faceres", lambda: calls.append("faceres"))
    assert install.main() == 0
    assert calls == ["faceres"]                      # no pip; faceres decides for itself (present: nothing)
