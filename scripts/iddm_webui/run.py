"""The IDDM tab's jobs: plain values in, progress updates out (dicts of texts and HTML; ui.py turns them into
gradio updates). All the work is iddm_core's; every web UI call goes through webui.py.

The jobs (Train, Preview faces, the recognisers' list) and the relay of step 3 are here; the tab's settings are
request.py's, the photos photos.py's, step 1 plan.py's and step 2 worker.py's.

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

import queue
import time
from typing import Iterator

from . import pictures, webui
from .photos import UPLOADS_DELETED, UPLOADS_KEPT, delete_uploads, prepare_refs, upload_files
from .plan import Plan, check_model, plan_run
from .request import FIELDS, PREVIEW_FIELDS, TrainRequest  # noqa: F401  (ui.py reads them as run.*)
from .worker import ACTIVE, Worker, error_text, status_line

CHART_EVERY = 1.0      # seconds between chart redraws while a run goes on
POLL = 0.25            # seconds the relay waits for the worker's next message


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
