"""The IDDM tab's jobs: plain values in, progress updates out (dicts of texts and HTML; ui.py turns them into
gradio updates). All the work is iddm_core's; every web UI call goes through webui.py.

A Train click, in order:

1. **Checks, before the web UI is touched**: the settings (``iddm_core.frontend``: the same rules as the ComfyUI
   nodes), the LoRA name and whether it may be written, the checkpoint (``validate_model``: kind, tokenizer,
   every weight), the photos (read into memory, faces found, split). Any error here is shown as text and nothing
   was unloaded.
2. **The run, in a worker thread** (a generator cannot yield from inside a callback): it takes the web UI's queue
   lock, moves the web UI's model off the GPU, loads the training copy, runs IDDM, drops the copy and brings the
   web UI's model back, in ``finally`` blocks, so that happens whether the run finished, failed or was
   interrupted. The progress callback puts each event on a queue, updates ``shared.state``'s job fields and
   raises ``Cancelled`` after the tab's own Interrupt button (not the web UI's global one, which is meant for its
   generation): iddm_core then writes nothing. Setup reports too, from before the offload on (loading the model
   part by part, class images per sampler step, the trial steps), and Interrupt is checked at each of those steps
   and while waiting for the queue.
3. **The generator** relays the queue: a status line per step, the chart about once a second, the summary and the
   ``<lora:NAME:1>`` tag at the end. If the browser goes away the worker still finishes (and writes its LoRA).

Privacy: uploaded photos are read into memory straight from the copies gradio made; those copies (gradio 3.41
writes two per photo) are deleted once a click has read them: after Preview, whatever happened, and after a Train
that got past its checks, whatever happened then; the upload box is emptied and the status says so. A Train
stopped by a settings check keeps them (box and copies) for the next click. Nothing of the photos is written by
the tab. Photo names appear only in texts for the user's own screen (faces left out, a photo that does not look
like the others, errors); never in a log line, the summary or the LoRA.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from . import pictures, webui

CHART_EVERY = 1.0      # seconds between chart redraws while a run goes on
POLL = 0.25            # seconds the relay waits for the worker's next message
PHASES = {"setup": "setting up", "finetune": "fine-tune", "pgd": "PGD", "save": "writing the LoRA",
          "done": "finished"}


@dataclass
class TrainRequest:
    """Every field of the tab, as plain values, in the order of the Train button's inputs."""

    checkpoint: str = webui.CURRENT_CHOICE
    photos_folder: str = ""
    uploads: Any = None                 # gradio's file list: 3.41 temp-file objects, 4.x paths
    n_reference: int = 0
    split_seed: int = 0
    skip_faceless: bool = True
    reference_files: str = ""
    preset: str = "privacy"
    T: int = 8
    rho: float = 0.1
    eta: float = 0.08
    alpha: float = 0.008
    gradient: str = "full"
    pgd_batch: int = 1
    surrogates: Any = ("dlib",)
    extra_surrogates: str = ""
    tau: float = 0.03
    K: int = 10
    ft_steps: int = 40
    rank: int = 4
    lr: float = 1e-4
    resolution: int = 0
    seed: int = 0
    prior_preservation: bool = True
    num_class_images: int = 8
    train_text_encoder: bool = False
    resume: bool = True
    lora_name: str = "iddm_lora"
    overwrite: bool = False
    tokenizer: str = ""


FIELDS = tuple(f.name for f in fields(TrainRequest))
PREVIEW_FIELDS = ("checkpoint", "photos_folder", "uploads", "n_reference", "split_seed", "skip_faceless",
                  "reference_files", "resolution", "tokenizer")


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


# ------------------------------------------------------------------------------------------------- photos
def upload_files(uploads) -> list[tuple[Path, str]]:
    """(path of gradio's copy, the file's own name) per uploaded file; gradio 3.41 gives temp-file objects
    (``.name`` the copy, ``.orig_name`` the user's name), gradio 4 paths (str subclasses)."""
    if not uploads:
        return []
    items = uploads if isinstance(uploads, (list, tuple)) else [uploads]
    out = []
    for item in items:
        if isinstance(item, dict):
            path, orig = item.get("path") or item.get("name"), item.get("orig_name")
        elif isinstance(item, (str, os.PathLike)):
            path, orig = os.fspath(item), None
        else:
            path, orig = getattr(item, "name", None), getattr(item, "orig_name", None)
        if path:
            out.append((Path(path), Path(orig or path).name))
    return out


UPLOADS_DELETED = ("the temporary copies of the uploaded photos were deleted and the upload box emptied: upload "
                   "them again for another run (or give a photo folder)")
UPLOADS_KEPT = "the uploaded photos are kept: correct it and press Train again"


def upload_copies(uploads) -> list[Path]:
    """Every file gradio wrote for the uploads: the file handed to the tab and, with gradio 3.41, the copy its
    /upload route wrote first (``orig_name`` of the temp-file object: ``<temp>/<random>/<name>``, beside the
    hashed copy ``<temp>/<sha>/<name>`` in ``name``). ``orig_name`` counts only when it is such a sibling path:
    for data sent inline it is the browser's bare file name, which must not be touched."""
    items = uploads if isinstance(uploads, (list, tuple)) else [uploads] if uploads else []
    copies = []
    for (path, _), item in zip(upload_files(uploads), [i for i in items if i]):
        copies.append(path)
        orig = getattr(item, "orig_name", None) if not isinstance(item, (str, os.PathLike, dict)) else None
        if orig and os.path.isabs(orig) and Path(orig) != path and Path(orig).parent.parent == path.parent.parent:
            copies.append(Path(orig))
    return copies


def delete_uploads(uploads) -> int:
    """Delete gradio's copies of the uploaded photos (the user's own files were never on this machine's disk
    under these paths: these are the copies gradio wrote when they were uploaded), and the per-upload folders
    gradio made for them once empty. Returns how many files were deleted."""
    deleted = 0
    for path in upload_copies(uploads):
        try:
            path.unlink()
            deleted += 1
        except OSError:
            pass
        try:
            path.parent.rmdir()             # only succeeds when empty: gradio makes one folder per upload
        except OSError:
            pass
    items = uploads if isinstance(uploads, (list, tuple)) else [uploads] if uploads else []
    for item in items:                      # gradio 3.41 hands over open (empty) temp-file objects
        close = getattr(item, "close", None)
        if callable(close):
            try:
                close()
            except Exception:               # noqa: BLE001 - closing is tidiness only
                pass
    return deleted


def load_photos(folder: str, uploads) -> tuple[list, str]:
    """The photos of ``folder`` and the uploaded ones, in memory, and how to name their source in messages."""
    from iddm_core.errors import InputError
    from iddm_core.images import Photo, load_folder, load_rgb

    photos, sources = [], []
    folder = (folder or "").strip()
    if folder:
        path = Path(folder).expanduser()
        photos += load_folder(path)
        sources.append(str(path))
    seen = {p.name for p in photos}
    files = upload_files(uploads)
    for path, name in files:
        unique, n = name, 2
        while unique in seen:
            stem, dot, ext = name.rpartition(".")
            unique = f"{stem} ({n}).{ext}" if dot else f"{name} ({n})"
            n += 1
        seen.add(unique)
        photos.append(Photo(unique, Path(unique), load_rgb(path)))
    if files:
        sources.append("the uploaded photos")
    if not photos:
        raise InputError("photos: give the folder of your photos, or upload them (3 or more photos of one person)")
    return photos, " and ".join(sources)


def prepare_refs(request: TrainRequest, resolution: int):
    from iddm_core.face.detect import get_detector
    from iddm_core.frontend import parse_file_list
    from iddm_core.protection.refs import refs_from_photos

    from iddm_core.frontend import check_number
    from iddm_core.protection.refs import check_identity

    seed = check_number("split_seed", request.split_seed, (0, 0xFFFFFFFF, True, "seed of the reference split"))
    n_reference = check_number("n_reference", request.n_reference,
                               (0, 100000, True, "reference photos; 0 = half of them"))
    photos, source = load_photos(request.photos_folder, request.uploads)
    refs = refs_from_photos(photos, int(resolution), get_detector("dlib"), seed=seed,
                            n_reference=n_reference or None,
                            reference_files=parse_file_list(request.reference_files),
                            skip_faceless=bool(request.skip_faceless), source=source)
    check_identity(refs)               # one person? a warning in the photos text (refs_summary), never a refusal
    return refs


# -------------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """Everything checked before the web UI's model is touched."""

    config: Any
    file_name: str
    out_path: Path
    model_path: str
    tokenizer: str | None
    info: Any
    refs: Any
    state_dir: Path
    overwrite: bool
    resume: bool
    notes: list = field(default_factory=list)


def check_model(request: TrainRequest):
    """(path, tokenizer folder or None, ModelInfo) of the chosen checkpoint, checked without loading it."""
    from iddm_core.errors import ModelError

    path = webui.resolve_checkpoint(request.checkpoint)
    tokenizer = None
    if Path(path).is_file():                 # single files carry no tokenizer; folders and "demo" bring theirs
        tokenizer = webui.tokenizer_dir(request.tokenizer)
        if tokenizer is None:
            raise ModelError(f"base model: no CLIP tokenizer found for {Path(path).name} (a single-file checkpoint "
                             f"has none): {webui.webui_name()} downloads {webui.HF_TOKENIZER_REPO} into the Hugging "
                             "Face cache the first time it loads an SD 1.x or SDXL model (generate one image, then "
                             "train); or put vocab.json and merges.txt of that tokenizer in a folder and give it "
                             "under Advanced: CLIP tokenizer folder")
    import_model_modules()
    from iddm_core.diffusion.models import validate_model

    return path, tokenizer, validate_model(path, tokenizer=tokenizer)


def import_model_modules() -> None:
    """Import iddm_core's model modules with the web UI's environment kept as it was: importing them sets the HF
    offline variables (iddm_core.offline), which a web UI restart would otherwise inherit."""
    with webui.keep_host_environment():
        import iddm_core.demo.model.architecture  # noqa: F401
        import iddm_core.diffusion.models  # noqa: F401
        import iddm_core.diffusion.tiny  # noqa: F401


def plan_run(request: TrainRequest) -> Plan:
    from iddm_core import frontend
    from iddm_core.atomic import check_writable
    from iddm_core.training.checkpoint import clear_state, state_dir_for
    from iddm_core.face.registry import discover

    pgd = frontend.pgd_config(request.preset, request.T, request.rho, request.eta, request.alpha, request.gradient,
                              request.pgd_batch)
    tokens = frontend.selected_surrogates(discover(webui.recogniser_search_dirs()), request.surrogates or (),
                                          request.extra_surrogates, field=lambda name: f"surrogates: {name}")
    config = frontend.iddm_config(pgd, request.K, request.ft_steps, request.rank, request.lr, request.resolution,
                                  request.seed, request.prior_preservation, request.num_class_images,
                                  request.train_text_encoder, surrogates=tokens, tau=request.tau)
    file_name = frontend.lora_file_name(request.lora_name)
    out_path = webui.lora_dir() / file_name
    check_writable(out_path, bool(request.overwrite))          # before any slow work
    model_path, tokenizer, info = check_model(request)
    refs = prepare_refs(request, config.resolution or info.resolution)
    state_dir = state_dir_for(out_path, namespace="a1111")
    if not request.resume:
        clear_state(state_dir)
    notes = [frontend.pgd_settings_text(pgd, request.preset, request.rho, request.gradient)]
    from iddm_core.protection.refs import identity_note

    if identity_note(refs):                # the photos text says it too; the status line is what users read first
        notes.append(identity_note(refs))
    return Plan(config, file_name, out_path, model_path, tokenizer, info, refs, state_dir, bool(request.overwrite),
                bool(request.resume), notes)


# ------------------------------------------------------------------------------------------------ worker
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


# ---------------------------------------------------------------------------------------------- the jobs
def lora_place() -> str:
    """How the summary names where the LoRA went (``frontend.result_summary``'s ``where``)."""
    return f"{webui.webui_name()}'s Lora folder; press the refresh button of the Lora tab if it is not listed"


def train(request: TrainRequest) -> Iterator[dict]:
    """The Train button: yields dicts with some of the keys status, chart, faces, photos, summary, tag, uploads
    (``uploads: None`` empties the upload box)."""
    if not ACTIVE.lock.acquire(blocking=False):
        yield {"status": "a training run is already going on in this web UI: wait for it, or press Interrupt"}
        return
    worker, consumed = None, False
    try:
        ACTIVE.cancel.clear()
        yield {"status": "checking the settings, the model and the photos", "summary": "", "tag": "", "chart": ""}
        try:
            plan = plan_run(request)
        except Exception as exc:            # the uploads stay (box and copies): the next click uses them
            kept = f"; {UPLOADS_KEPT}" if upload_files(request.uploads) else ""
            yield {"status": f"error: {error_text(exc)}\nnothing was started; the web UI's model was not touched"
                             + kept}
            return
        consumed = True                     # the photos are in memory: their copies go, whatever happens next
        yield {"status": "photos ready: " + " / ".join(plan.notes), "faces": pictures.faces_html(plan.refs),
               "photos": _refs_text(plan.refs)}
        if ACTIVE.cancel.is_set():
            yield {"status": "interrupted before the run started: nothing was done" + _uploads_said(request.uploads),
                   "uploads": None}
            return
        worker = Worker(plan, request.uploads)
        worker.start()                     # from here on the worker releases the run lock and deletes uploads
        yield from _relay(worker, plan)
    finally:
        if worker is None:
            if consumed:
                delete_uploads(request.uploads)
            ACTIVE.lock.release()


def _uploads_said(uploads) -> str:
    """The line telling the user that the uploads were used up (empty when there were none)."""
    return f"\n{UPLOADS_DELETED}" if upload_files(uploads) else ""


def _refs_text(refs) -> str:
    from iddm_core.frontend import refs_summary

    return refs_summary(refs)


def _relay(worker: Worker, plan: Plan) -> Iterator[dict]:
    from iddm_core import frontend
    from iddm_core.training.checkpoint import has_state

    history, notes, last_chart, last = pictures.History(), [], 0.0, None
    while True:
        try:
            kind, payload = worker.messages.get(timeout=POLL)
        except queue.Empty:
            continue
        if kind == "event":
            last = payload
            history.add(payload)
            update = {"status": status_line(payload)}
            if time.monotonic() - last_chart >= CHART_EVERY:
                update["chart"], last_chart = pictures.chart_html(history), time.monotonic()
            yield update
        elif kind in ("note", "wait"):
            if kind == "note":
                notes.append(payload)
            yield {"status": payload}
        elif kind == "done":
            stem = frontend.lora_stem(plan.file_name)
            yield {"status": f"finished: {plan.out_path}\n" + "; ".join(notes) + _uploads_said(worker.uploads),
                   "chart": pictures.chart_html(history),
                   "summary": frontend.result_summary(plan.file_name, payload.report, where=lora_place())
                   + f"\nin a prompt: <lora:{stem}:1> (with 'a photo of sks person')",
                   "tag": f"<lora:{stem}:1>", "uploads": None}
        elif kind == "cancelled":
            where = f" at step {last.done} of {last.total}" if last is not None and last.done else ""
            if last is not None and last.phase == "setup":
                where = f" during setup ({last.message or last.stage})"
            kept = (" The resume state of the last finished iteration is kept (privately): press Train again with "
                    "the same settings to continue.") if plan.resume and has_state(plan.state_dir) else ""
            yield {"status": f"interrupted{where}: no LoRA was written.{kept}\n" + "; ".join(notes)
                   + _uploads_said(worker.uploads),
                   "chart": pictures.chart_html(history), "uploads": None}
        elif kind == "error":
            yield {"status": f"error: {payload}\nno LoRA was written; " + "; ".join(notes)
                   + _uploads_said(worker.uploads),
                   "chart": pictures.chart_html(history), "uploads": None}
        elif kind == "end":
            return


def preview(request: TrainRequest) -> dict:
    """The Preview faces button: the face crops and the split, in memory. gradio's copies of the uploaded photos
    are deleted afterwards, whatever happened (as after Train), and the upload box emptied (a box showing files
    whose copies are gone would fail at the next click), which the text says."""
    from iddm_core.frontend import check_number

    try:
        resolution = check_number("resolution", request.resolution)
        if not resolution:
            resolution = check_model(request)[2].resolution
        refs = prepare_refs(request, resolution)
        out = {"faces": pictures.faces_html(refs), "photos": _refs_text(refs)}
    except Exception as exc:
        out = {"faces": "", "photos": f"error: {error_text(exc)}"}
    finally:
        if upload_files(request.uploads):
            delete_uploads(request.uploads)
    if upload_files(request.uploads):
        out["photos"] += _uploads_said(request.uploads)
        out["uploads"] = None
    return out


def recognisers_text() -> str:
    from iddm_core.face.registry import discover
    from iddm_core.frontend import recogniser_status

    dirs = webui.recogniser_search_dirs()
    return (f"Face recognisers (looked for under {', '.join(dirs)}):\n"
            + recogniser_status(discover(dirs)))
