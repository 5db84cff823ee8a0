"""Step 2 of a Train click: the run itself, in a :class:`Worker` thread (a generator cannot yield from inside a
callback), one at a time per web UI process (:data:`ACTIVE`, whose flag the tab's Interrupt button sets), and
the texts its messages become (:func:`status_line`, :func:`error_text`)."""
from __future__ import annotations

import queue
import threading
import time
import traceback

from . import webui
from .photos import delete_uploads
from .plan import Plan

PHASES = {"setup": "setting up", "finetune": "fine-tune", "pgd": "PGD", "save": "writing the LoRA",
          "done": "finished"}


class ActiveRun:
    """At most one training run per web UI process; the Interrupt button's flag."""

    def __init__(self):
        self.lock = threading.Lock()
        self.cancel = threading.Event()
        self.running = False

    def interrupt(self) -> str:
        """The tab's Interrupt button. Only this flag stops a run (checked at every setup step and training step):
        the web UI's own Interrupt (``shared.state.interrupted``) is meant for its generation, e.g. one queued
        behind the training, so it is neither set here nor read by the run."""
        if not self.lock.locked():
            return "no training run is going on"
        self.cancel.set()
        return "interrupting: the run stops after the current step and writes nothing"


ACTIVE = ActiveRun()


def error_text(exc: BaseException) -> str:
    """What the tab shows for an error: the library's message (it names the file or setting at fault), or, for
    anything else (a bug, the device), the exception in one line, its traceback printed to the console."""
    from iddm_core.errors import IDDMError

    if isinstance(exc, IDDMError):
        return str(exc)
    traceback.print_exception(type(exc), exc, exc.__traceback__)
    return f"{type(exc).__name__}: {exc} (the traceback is in the web UI's console)"


def status_line(event) -> str:
    """One line per progress event: numbers only (and a setup event's fixed words)."""
    if event.phase == "setup":
        return f"{PHASES['setup']}: {event.message or event.stage} · {event.elapsed:.0f}s"
    parts = [f"step {event.done}/{event.total}", PHASES.get(event.phase, event.phase)]
    if event.k is not None:
        parts.append(f"iteration {event.k}")
    if event.t is not None:
        parts.append(f"PGD step {event.t} ({'Stage I' if event.stage == 'rec' else 'Stage II'})")
    if event.loss is not None:
        parts.append(f"loss {event.loss:.4f}")
    parts += [f"{name} {value:.3f}" for name, value in (event.similarity or {}).items()]
    if event.linf is not None:
        parts.append(f"|delta| {event.linf * 255:.1f}/255")
    parts.append(f"{event.elapsed:.0f}s")
    return " · ".join(parts)


class Worker(threading.Thread):
    """Runs one planned training; talks to the relay through ``messages`` (kind, payload)."""

    def __init__(self, plan: Plan, uploads):
        super().__init__(name="iddm-train", daemon=True)
        self.plan, self.uploads = plan, uploads
        self.messages: queue.Queue = queue.Queue()
        self.state = webui.WebUIState()
        self.started, self.total = time.perf_counter(), 0

    def run(self) -> None:
        from iddm_core.errors import Cancelled

        try:
            with webui.gpu_job(lambda: self.messages.put(("wait", "waiting for the web UI's current job to finish")),
                               poll=self._check_interrupt):       # Interrupt works while waiting too
                from iddm_core.protection.iddm import total_steps

                self.total = total_steps(self.plan.config)
                self.state.begin(self.total)
                ACTIVE.running = True
                try:
                    if ACTIVE.cancel.is_set():
                        raise Cancelled("interrupted before the run started")
                    result = self._train()
                finally:
                    ACTIVE.running = False
                    self.state.end()
            self.messages.put(("done", result))
        except Cancelled:
            self.messages.put(("cancelled", None))
        except Exception as exc:
            self.messages.put(("error", error_text(exc)))
        finally:
            delete_uploads(self.uploads)
            from iddm_core.memory import release_host_memory

            release_host_memory()          # finished, failed or cancelled: give the freed host memory back
            ACTIVE.cancel.clear()
            ACTIVE.lock.release()
            self.messages.put(("end", None))

    def _check_interrupt(self) -> None:
        from iddm_core.errors import Cancelled

        if ACTIVE.cancel.is_set():             # the tab's own Interrupt only (see ActiveRun.interrupt)
            raise Cancelled("interrupted")

    def _progress(self, event) -> None:
        """run_iddm's callback, and every setup step's before it (offload, loading, class images, trial steps):
        relays the event, updates the web UI's job fields, raises Cancelled after the tab's Interrupt."""
        if event.phase == "setup":            # setup counts from the worker's start (loading comes before the run)
            import dataclasses

            event = dataclasses.replace(event, elapsed=time.perf_counter() - self.started)
        self.messages.put(("event", event))
        self.state.step(event.done, event.total or self.total, status_line(event))
        self._check_interrupt()

    def _train(self):
        from iddm_core import frontend
        from iddm_core.training.checkpoint import cache_root
        from iddm_core.events import report_setup
        from iddm_core.protection.iddm import run_iddm

        plan = self.plan
        progress = self._progress
        report_setup(progress, "free", "moving the web UI's model off the GPU")   # shown before the offload starts
        offload = webui.offload_webui_model()
        self.messages.put(("note", offload.description))
        try:
            with frontend.loaded_for_training(plan.model_path, webui.torch_device(), plan.info,
                                              plan.config.mixed_precision, plan.tokenizer,
                                              callback=progress) as bundle:
                return run_iddm(bundle, plan.refs, plan.config, out_path=plan.out_path,
                                lora_name=frontend.lora_stem(plan.file_name), overwrite=plan.overwrite,
                                callback=progress, class_cache_dir=str(cache_root() / "class_images"),
                                checkpoint_dir=plan.state_dir if plan.resume else None, resume=plan.resume,
                                on_mismatch="restart", model_source=plan.model_path)
        finally:
            webui.torch_gc()
            try:
                offload.restore()
                if offload.restore_fn is not None:
                    self.messages.put(("note", "the web UI's model is back"))
            except Exception as exc:      # the run's own outcome is reported; this is said beside it
                traceback.print_exc()
                self.messages.put(("note", f"could not bring the web UI's model back ({type(exc).__name__}: "
                                           f"{exc}); reload the checkpoint in the web UI"))
