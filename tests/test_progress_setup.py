"""Progress and Cancel from the first second (issue 24, items 2 and 10): every setup step (checking, freeing the
host's memory, loading the model, class images, trial steps) reports a "setup" event, and each event is a point
where Cancel stops the run, with nothing written (no LoRA, no class-image cache, no resume state).

The slow parts are stand-ins that sleep in SLICE-second slices (a full-size model's loading or class images,
at any size): the assertions count the slices that still ran after Cancel was requested and check the order of
events, so a slow machine cannot fail them. "Within seconds" is shown by order, not by a clock: the first event
comes before the model is checked or any slow slice runs (only argument checks are in front of it); the delay is
printed (`pytest -s`), never asserted, since a busy machine may stretch even argument checks.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import types

import pytest
import torch

from conftest import HANG_S, write_private_photos
from comfy_harness import REPO, InterruptProcessingException, load_pack, run_workflow, state_files, \
    tiny_comfy, unload_pack

SLICE = 0.5                 # seconds per slice of a slow stand-in
SLOW_SLICES = 60            # a 30 s stand-in loader / class-image generator
CANCEL_AT = 3               # the user presses Cancel during this slice
PACK = "comfyui-iddm"
TRAIN = "4"
PRIVATE = "secret_carol"
API_WORKFLOW = REPO / "example_workflows" / "api" / "iddm_1_train_lora_api.json"


class Timeline:
    """What happened, in order, with monotonic times: ("start"|"event"|"validate"|"slice"|"cancel", time, data)."""

    def __init__(self):
        self.items: list[tuple] = []

    def add(self, kind: str, data=None) -> None:
        self.items.append((kind, time.monotonic(), data))

    def first(self, kind: str, pred=lambda d: True):
        return next((i for i, item in enumerate(self.items) if item[0] == kind and pred(item[2])), None)

    def count_after(self, kind: str, index: int) -> int:
        return sum(1 for item in self.items[index + 1:] if item[0] == kind)


class SlowStandIn:
    """Sleeps SLOW_SLICES x SLICE seconds in slices, calling ``report(i)`` after each (as the real loader reports
    between parts and the sampler after every step); ``cancel()`` runs during slice CANCEL_AT (the user)."""

    def __init__(self, timeline: Timeline, cancel, slices: int = SLOW_SLICES):
        self.timeline, self.cancel, self.slices = timeline, cancel, slices

    def run(self, report) -> None:
        for i in range(1, self.slices + 1):
            time.sleep(SLICE)
            self.timeline.add("slice", i)
            if i == CANCEL_AT and self.cancel is not None:
                self.timeline.add("cancel")
                self.cancel()
            report(i)


# ---------------------------------------------------------------------------------------------- library
def test_setup_event_keeps_event_fields_and_to_dict():
    from iddm_core.events import SETUP_STAGES, Emitter, Event, report_setup

    seen = []
    report_setup(seen.append, "load", "loading the model: UNet")
    report_setup(None, "load")                                   # no callback: nothing happens
    assert seen[0].to_dict() == {"phase": "setup", "stage": "load", "message": "loading the model: UNet",
                                 "done": 0, "total": 0, "elapsed": 0.0}
    emit = Emitter(seen.append, total=7)
    emit("finetune", loss=0.5)
    emit.setup("class_images")
    assert (seen[-1].phase, seen[-1].done, seen[-1].total, seen[-1].message) == \
        ("setup", 1, 7, SETUP_STAGES["class_images"])            # counts no step, keeps the job's count
    assert Event(phase="pgd", done=2, total=4, t=1, stage="rec", loss=1.0).to_dict() == \
        {"phase": "pgd", "done": 2, "total": 4, "t": 1, "stage": "rec", "loss": 1.0, "elapsed": 0.0}


def test_load_model_reports_between_parts_and_stops_there(tmp_path, monkeypatch):
    """The real single-file loader: a setup event before each part (UNet, VAE, text encoder); a Cancel raised
    there means no further part is built."""
    from iddm_core.diffusion import loading, single_file
    from iddm_core.errors import Cancelled
    from iddm_core.diffusion.tiny import write_tiny_model

    _, single = write_tiny_model(tmp_path / "tiny")
    built, real = [], single_file._build_loaded
    monkeypatch.setattr(single_file, "_build_loaded", lambda f, s, src, part, kind: (built.append(part),
                                                                                 real(f, s, src, part, kind))[1])
    events = []
    bundle = loading.load_model(str(single), callback=events.append)
    assert bundle.unet is not None and built == ["UNet", "VAE", "text encoder"]
    messages = [e.message for e in events]
    assert all(e.phase == "setup" and e.stage == "load" for e in events)
    assert messages[0] == "loading the model: reading the weights" and messages[-1].startswith("loading the model: "
                                                                                                "moving it to")
    assert [m for m in messages if m.endswith(("UNet", "VAE", "text encoder"))] == \
        ["loading the model: UNet", "loading the model: VAE", "loading the model: text encoder"]
    built.clear()

    def cancel_at_vae(event):
        if event.message.endswith("VAE"):
            raise Cancelled("user pressed cancel")

    with pytest.raises(Cancelled):
        loading.load_model(str(single), callback=cancel_at_vae)
    assert built == ["UNet"]


def test_class_images_cached_only_when_complete(tmp_path):
    """Cancel during class-image sampling: nothing cached. Uncancelled: one cache file, written at the end."""
    from iddm_core.errors import Cancelled
    from iddm_core.training.finetune import DreamBoothTrainer, FinetuneConfig
    from iddm_core.training.lora import LoraSpec
    from iddm_core.diffusion.loading import load_model

    cfg = FinetuneConfig(resolution=32, num_class_images=2, class_sampler_steps=3)
    cache = tmp_path / "classes"
    seen = []

    def cancel_at_second_step(event):
        seen.append(event)
        if "sampler step 2/" in event.message:
            raise Cancelled("user pressed cancel")

    with pytest.raises(Cancelled):
        DreamBoothTrainer(load_model("tiny"), LoraSpec(rank=2), cfg, class_cache_dir=cache,
                          callback=cancel_at_second_step)
    assert not cache.exists() or list(cache.iterdir()) == []
    assert [e.stage for e in seen] == ["class_images"] * 3       # the announcement, then steps 1 and 2

    events = []
    DreamBoothTrainer(load_model("tiny"), LoraSpec(rank=2), cfg, class_cache_dir=cache, callback=events.append)
    assert [p.suffix for p in cache.iterdir()] == [".safetensors"]
    assert [e.message for e in events][1:4] == [f"making 2 class images: sampler step {i}/3" for i in (1, 2, 3)]


# ---------------------------------------------------------------------------------------------- ComfyUI
@pytest.fixture(scope="module")
def comfy(tmp_path_factory, small_faces_dir):
    stubs = tiny_comfy(tmp_path_factory.mktemp("comfyui"), small_faces_dir, PRIVATE)
    pack = load_pack(PACK)
    yield stubs, pack
    stubs.uninstall()
    unload_pack(PACK)


@pytest.fixture
def comfy_run(comfy, monkeypatch):
    """The stubs with a fresh Timeline wired in: node start (its first call, iddm_config), every websocket
    message, validate_model; Cancel = ComfyUI's interrupt flag."""
    stubs, pack = comfy
    monkeypatch.delenv("IDDM_CACHE_DIR", raising=False)
    stubs.progress.clear()
    stubs.messages.clear()
    stubs.interrupted, stubs.interrupt_after = False, None
    for folder in (stubs.models / "loras", stubs.temp):
        for f in folder.iterdir():
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    timeline = Timeline()
    mods = _pack_modules(pack)
    env, validation = mods["comfy_env"], mods["validation"]
    real_send, real_validate = env.send_event, validation.validate_model
    monkeypatch.setattr(env, "send_event", lambda name, data: (timeline.add("event", data), real_send(name, data)))
    monkeypatch.setattr(validation, "validate_model", lambda *a, **k: (timeline.add("validate"), real_validate(*a, **k))[1])
    # the nodes' first calls: the train node's config (imported at module level), the protect node's config class
    monkeypatch.setattr(mods["train_node"], "iddm_config", _first_call(timeline, mods["train_node"].iddm_config))
    monkeypatch.setattr(mods["protect"], "ProtectConfig", _first_call(timeline, mods["protect"].ProtectConfig))
    return types.SimpleNamespace(stubs=stubs, pack=pack, timeline=timeline, mods=mods,
                                 cancel=lambda: setattr(stubs, "interrupted", True))


def _first_call(timeline, fn):
    def wrapped(*args, **kwargs):
        timeline.add("start")
        return fn(*args, **kwargs)
    return wrapped


def _pack_modules(pack) -> dict:
    root = pack.__name__
    names = {"comfy_env": "nodes.comfy_env", "train_node": "nodes.train_node", "loading": "iddm_core.diffusion.loading",
             "finetune": "iddm_core.training.finetune", "protect": "iddm_core.protection.protect", "events": "iddm_core.events",
             "validation": "iddm_core.diffusion.validation"}
    import importlib

    return {key: importlib.import_module(f"{root}.{name}") for key, name in names.items()}


def _workflow(lora_name, **train) -> dict:
    wf = json.loads(API_WORKFLOW.read_text())
    ids = {node["class_type"]: nid for nid, node in wf.items()}
    wf[ids["IDDMLoadPrivateRefs"]]["inputs"].update(folder="photos", resolution=32)
    wf[ids["IDDMPGDTwoStage"]]["inputs"].update(T=2, preset="fidelity")
    wf[ids["IDDMTrainLoRA"]]["inputs"].update(dict(ckpt_name="tiny.safetensors", K=1, ft_steps=1, resolution=32,
                                                   prior_preservation=False, lora_name=lora_name), **train)
    assert ids["IDDMTrainLoRA"] == TRAIN
    return wf


def _slow_loader(run, monkeypatch, cancel=True):
    """load_model replaced by a 30 s stand-in that reports through the callback it is given after every slice
    (as the real one does between parts), then loads the tiny model for real."""
    models, events = run.mods["loading"], run.mods["events"]       # the pack's own copies of iddm_core's modules
    real = models.load_model
    slow = SlowStandIn(run.timeline, run.cancel if cancel else None)

    def load_model(path, *args, callback=None, **kwargs):
        slow.run(lambda i: events.report_setup(callback, "load", f"stand-in slice {i}"))
        return real(path, *args, callback=callback, **kwargs)

    monkeypatch.setattr(models, "load_model", load_model)


def _nothing_written(stubs) -> None:
    assert list((stubs.models / "loras").iterdir()) == []                       # no LoRA, no temp file
    classes = stubs.temp / "iddm_class_images"
    assert not classes.exists() or list(classes.iterdir()) == []                # no class-image cache
    assert state_files(stubs) == []                                              # no resume state


def _node_events(timeline, node):
    return [(i, d) for i, (kind, _, d) in enumerate(timeline.items) if kind == "event" and d.get("node") == node]


def _assert_prompt_start_and_cancel(run, node) -> None:
    tl = run.timeline
    start = tl.first("start")
    events = _node_events(tl, node)
    assert start is not None and events, "the node sent no progress event"
    first_i, first = events[0]
    # the first event comes before the model is checked or loaded, whatever its size ...
    assert first["phase"] == "setup" and first["stage"] == "check"
    assert first_i < tl.first("validate") and first_i < tl.first("slice")
    print(f"first progress event {tl.items[first_i][1] - tl.items[start][1]:.3f} s after the node started")
    # ... setup events keep coming, and each checks Cancel: at most one slice ran after it was pressed
    cancel = tl.first("cancel")
    assert cancel is not None and tl.count_after("slice", cancel) <= 1
    assert all(d["phase"] == "setup" for _, d in events)                         # no training step ran
    assert not [p for p in run.stubs.progress if p[0] == node]                  # the bar waits for training
    assert "stand-in slice 1" in [d.get("message") for _, d in events]


def test_train_node_reports_at_once_and_cancels_during_loading(comfy_run, monkeypatch):
    _slow_loader(comfy_run, monkeypatch)
    with pytest.raises(InterruptProcessingException):
        run_workflow(comfy_run.pack, _workflow("cancelled_loading"))
    _assert_prompt_start_and_cancel(comfy_run, TRAIN)
    stages = [d["stage"] for _, d in _node_events(comfy_run.timeline, TRAIN)]
    assert stages[:3] == ["check", "free", "load"]
    _nothing_written(comfy_run.stubs)
    text = json.dumps([d for _, _, d in comfy_run.timeline.items if isinstance(d, dict)])
    assert PRIVATE not in text and str(comfy_run.stubs.root) not in text       # no names or paths in events


def test_train_node_cancel_during_class_images_caches_nothing(comfy_run, monkeypatch):
    """Cancel while the class images are sampled (stand-in: 30 s of sampler steps): the run ends within one
    step, and the class-image cache, which a finished generation writes, is not written."""
    finetune = comfy_run.mods["finetune"]
    slow = SlowStandIn(comfy_run.timeline, comfy_run.cancel)

    def generate_images(bundle, prompt, n, seed=0, steps=20, guidance_scale=7.5, resolution=None, batch=4,
                        on_step=None):
        slow.run(lambda i: on_step(i, SLOW_SLICES) if on_step is not None else None)
        return torch.rand(n, 3, resolution, resolution)

    monkeypatch.setattr(finetune, "generate_images", generate_images)
    with pytest.raises(InterruptProcessingException):
        run_workflow(comfy_run.pack, _workflow("cancelled_classes", prior_preservation=True, num_class_images=2))
    tl = comfy_run.timeline
    cancel = tl.first("cancel")
    assert cancel is not None and tl.count_after("slice", cancel) <= 1
    events = [d for _, d in _node_events(tl, TRAIN)]
    stages = [d["stage"] for d in events]
    assert stages[0] == "check" and "load" in stages and stages[-1] == "class_images"
    messages = [d["message"] for d in events]
    assert messages[-1] == f"making 2 class images: sampler step {CANCEL_AT - 1}/{SLOW_SLICES}"   # then Cancel
    _nothing_written(comfy_run.stubs)


def test_protect_node_reports_at_once_and_cancels_during_loading(comfy_run, monkeypatch, small_faces_dir):
    import numpy as np
    from PIL import Image

    _slow_loader(comfy_run, monkeypatch)
    files = sorted(p for p in small_faces_dir.iterdir() if p.suffix in (".jpg", ".png"))[:2]
    images = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB").resize((40, 40)))
                                        for f in files])).float() / 255
    node = comfy_run.pack.NODE_CLASS_MAPPINGS["IDDMProtectPhotos"]()
    with pytest.raises(InterruptProcessingException):
        node.protect(images, ckpt_name="tiny.safetensors", method="aspl", cap=False, eta=0.05, alpha=0.01, rounds=1,
                     surrogate_steps=1, pgd_steps=1, protect_seed=0, resolution=32, prior_preservation=False,
                     unique_id="7")
    _assert_prompt_start_and_cancel(comfy_run, "7")
    _nothing_written(comfy_run.stubs)


# ---------------------------------------------------------------------------------------------- web extension
def test_chart_shows_the_setup_stage_text():
    """web/iddm.js: the status line of a setup event is its message (drawn even before any loss exists)."""
    import shutil as _shutil

    node = _shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    source = (REPO / "web" / "iddm.js").read_text()
    fn = re.search(r"function statusText\(d\) \{.*?\n\}\n", source, re.S).group(0)
    script = fn + """
const out = [statusText({phase: "setup", stage: "load", message: "loading the model: UNet", done: 0, total: 9}),
             statusText({phase: "setup", stage: "trial", done: 0, total: 9}),
             statusText({phase: "pgd", k: 1, t: 2, stage: "id", done: 3, total: 9, loss: 0.5})];
console.log(JSON.stringify(out));
"""
    out = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr
    texts = json.loads(out.stdout)
    assert texts[0] == "setting up: loading the model: UNet" and texts[1] == "setting up: trial"
    assert texts[2].startswith("pgd") and "Stage II" in texts[2]
    draw = re.search(r"function drawChart\(node, ctx\) \{.*?\n\}\n", source, re.S).group(0)
    assert "!run.text" in draw               # the box with the status is drawn before the first loss arrives


# ---------------------------------------------------------------------------------------------- A1111
@pytest.fixture(scope="module")
def a1111(tmp_path_factory, small_faces_dir):
    """A stub A1111 1.10 (tests/a1111_harness) with the tiny model loaded, and the tab's run.py as the web UI
    loads it (its buttons' functions are called directly: gradio is not needed for these)."""
    pytest.importorskip("gradio", reason="the tab's ui.py imports gradio: pip install --no-deps -r "
                                         "requirements-a1111-test.txt")
    import os

    from a1111_harness import WebUIStubs, load_extension_script, unload_extension
    from iddm_core.diffusion.writing import save_single_file
    from iddm_core.diffusion.tiny import build_tiny_bundle, write_tiny_tokenizer

    root = tmp_path_factory.mktemp("a1111_setup")
    stubs = WebUIStubs(root)
    save_single_file(build_tiny_bundle(), stubs.checkpoints / "tiny.safetensors")
    stubs.write_hf_tokenizer(write_tiny_tokenizer)
    photos = root / "photos"
    write_private_photos(photos, small_faces_dir, PRIVATE)
    saved_cache = os.environ.get("IDDM_CACHE_DIR")
    os.environ["IDDM_CACHE_DIR"] = str(root / "iddm_cache")
    stubs.install()
    stubs.load(stubs.add_checkpoint(stubs.checkpoints / "tiny.safetensors"))
    try:
        load_extension_script()
        yield types.SimpleNamespace(stubs=stubs, run=sys.modules["iddm_webui.run"], photos=photos, root=root)
    finally:
        stubs.uninstall()
        unload_extension()
        if saved_cache is None:
            os.environ.pop("IDDM_CACHE_DIR", None)
        else:
            os.environ["IDDM_CACHE_DIR"] = saved_cache


@pytest.fixture
def tab(a1111):
    stubs = a1111.stubs
    stubs.calls.clear()
    stubs.state.calls.clear()
    stubs.state.steps.clear()
    stubs.state.interrupt_at_step = stubs.state.fail_at_step = stubs.state.on_step = None
    stubs.state.interrupted = False
    stubs.model.to("cuda")
    for f in stubs.lora_dir.iterdir():
        f.unlink()
    return a1111


def _request(tab, **kw):
    values = dict(photos_folder=str(tab.photos), K=1, T=2, preset="fidelity", ft_steps=1, resolution=32,
                  prior_preservation=False, lora_name="carol_avatar")
    values.update(kw)
    return tab.run.TrainRequest(**values)


def _a1111_slow_loader(monkeypatch, timeline, cancel, slices=SLOW_SLICES):
    from iddm_core.diffusion import loading as models
    from iddm_core.events import report_setup

    real = models.load_model
    slow = SlowStandIn(timeline, cancel, slices)

    def load_model(path, *args, callback=None, **kwargs):
        slow.run(lambda i: report_setup(callback, "load", f"stand-in slice {i}"))
        return real(path, *args, callback=callback, **kwargs)

    monkeypatch.setattr(models, "load_model", load_model)


def _statuses(updates) -> list[str]:
    return [u["status"] for u in updates if "status" in u]


def _a1111_nothing_written(tab) -> None:
    assert list(tab.stubs.lora_dir.iterdir()) == []
    classes = tab.root / "iddm_cache" / "class_images"
    assert not classes.exists() or list(classes.iterdir()) == []
    state = tab.root / "iddm_cache" / "state"
    assert not state.exists() or not [p for p in state.rglob("*") if p.is_file()]


def test_tab_reports_setup_before_the_offload_and_its_interrupt_stops_loading(tab, monkeypatch):
    timeline = Timeline()
    _a1111_slow_loader(monkeypatch, timeline, lambda: tab.run.ACTIVE.interrupt())     # the tab's own button
    updates = list(tab.run.train(_request(tab)))
    statuses = _statuses(updates)
    offload_say = statuses.index("the web UI's model moved to the CPU")
    setup = [i for i, s in enumerate(statuses) if s.startswith("setting up:")]
    assert setup and setup[0] < offload_say                                     # said before the model moves
    assert statuses[setup[0]].startswith("setting up: moving the web UI's model off the GPU")
    assert any("stand-in slice 1" in s for s in statuses)                       # loading keeps reporting
    cancel = timeline.first("cancel")
    assert cancel is not None and timeline.count_after("slice", cancel) <= 1
    final = statuses[-1]
    assert final.startswith("interrupted during setup (") and "no LoRA was written" in final, final
    model = tab.stubs.model
    assert tab.stubs.calls == [("unload_model_weights", model), ("send_model_to_device", model)]
    assert model.device == "cuda" and tab.stubs.state.steps == []               # no training step ran
    _a1111_nothing_written(tab)
    assert not tab.run.ACTIVE.lock.locked() and not tab.run.ACTIVE.cancel.is_set()


def test_tab_interrupt_while_waiting_for_the_queue(tab):
    """A generation holds the web UI's queue; the tab's Interrupt stops the wait: nothing is unloaded."""
    run = tab.run
    tab.stubs.queue_lock.acquire()
    try:
        updates = []
        for update in run.train(_request(tab)):
            updates.append(update)
            if update.get("status") == "waiting for the web UI's current job to finish":
                assert "stops after the current step" in run.ACTIVE.interrupt()
        statuses = _statuses(updates)
        assert statuses[-1].startswith("interrupted: no LoRA was written"), statuses[-1]
        assert tab.stubs.calls == [] and tab.stubs.state.calls == []              # the web UI was not touched
    finally:
        tab.stubs.queue_lock.release()
    _a1111_nothing_written(tab)


def test_web_ui_interrupt_does_not_stop_the_tabs_training(tab, monkeypatch):
    """The web UI's own Interrupt (shared.state.interrupted, meant for its generation) pressed during setup and
    again at training step 1: the run goes on and writes its LoRA; the flag is cleared after the run."""
    timeline = Timeline()
    _a1111_slow_loader(monkeypatch, timeline, lambda: tab.stubs.state.interrupt(), slices=CANCEL_AT + 1)
    tab.stubs.state.interrupt_at_step = 1
    updates = list(tab.run.train(_request(tab)))
    final = _statuses(updates)[-1]
    assert final.startswith("finished:"), final
    assert timeline.first("cancel") is not None and tab.stubs.state.steps[:1] == [1]
    assert [p.name for p in tab.stubs.lora_dir.iterdir()] == ["carol_avatar.safetensors"]
    assert tab.stubs.state.interrupted is False
