"""One batch job on one worker, without Ray (runner.py wraps :class:`JobRunner` in a Ray actor).

A worker keeps the base model it loaded in host memory and gives each job its own copy on the job's device
(``copy.deepcopy``, as the demo does: a run injects its LoRA into the model it trains), so the model is read from
disk once per worker, not once per job, and the device holds one copy at a time. A job is ``iddm train`` with
``--resume``: the same checks, photo preparation, model load and :func:`~iddm_core.protection.iddm.run_iddm` call,
so its LoRA is the one ``iddm train`` writes with the same settings and seed; its resume state lives in the
state folder the driver named (on storage every worker sees), so a job that lost its worker continues from its
last finished iteration wherever it lands next.

Privacy: whatever goes wrong, what leaves this module is a result dict whose message has every form of the
job's folder and photo names replaced (:func:`describe`); tracebacks never leave. Nothing here prints.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import signal
import time
from pathlib import Path

from ..errors import IDDMError, InputError

# TEST ONLY: "<job id>:<k>" makes the worker running that job kill its own process (SIGKILL, as a crash or a lost
# node would) right after iteration k's resume state is saved, on the job's first attempt only (a marker file in
# the state root remembers it). tests/test_batch.py uses it to show that a job resumes on another worker.
TEST_KILL_ENV = "IDDM_BATCH_TEST_KILL"
MAX_MESSAGE = 600


# ------------------------------------------------------------------------------------------------- privacy
def private_strings(photos) -> list[str]:
    """Every form in which the job's folder or photos could appear in a message: the folder as given and resolved,
    its name, each file's path and name, each image's stem (stems under 4 characters are left: they would mangle
    ordinary words and numbers, and a name that short says little). The job's own settings file (iddm.json) is
    not private: its stem would mangle every "iddm" in a message. Longest first."""
    from ..images import IMAGE_EXTENSIONS
    from .jobs import OVERRIDES_FILE

    folder = Path(photos)
    found = {str(folder)} | ({folder.name} if len(folder.name) >= 4 else set())
    try:
        found.add(str(folder.resolve()))
        files = [f for f in folder.iterdir() if f.name != OVERRIDES_FILE] if folder.is_dir() else []
    except OSError:
        files = []
    for f in files:
        found.update((str(f), f.name))
        if len(f.stem) >= 4 and f.suffix.lower() in IMAGE_EXTENSIONS:
            found.add(f.stem)
    return sorted((s for s in found if s and s not in (".", "/")), key=len, reverse=True)


def scrub(text: str, job_id: str, photos) -> str:
    """``text`` with the job's folder written as ``<photos of job ID>`` and each photo as ``<a photo>``; if any
    private form survives (say, in another spelling), the whole text is withheld."""
    strings = private_strings(photos)
    folder_forms = {str(Path(photos)), Path(photos).name}     # written as the job's folder, the rest as photos
    try:
        folder_forms.add(str(Path(photos).resolve()))
    except OSError:
        pass
    for s in strings:
        text = text.replace(s, f"<photos of job {job_id}>" if s in folder_forms else "<a photo>")
    text = re.sub(r"\s+", " ", text).strip()
    lowered = text.lower()
    if any(len(s) >= 4 and s.lower() in lowered for s in strings):
        return "details withheld: the message named a private file"
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def describe(exc: BaseException, job_id: str, photos) -> str:
    """The report's message for an error of job ``job_id``: the library's own message for the errors a user can
    act on, the class name and message for anything else; scrubbed either way."""
    text = str(exc) if isinstance(exc, IDDMError) else f"{exc.__class__.__name__}: {exc}"
    return scrub(text, job_id, photos)


# -------------------------------------------------------------------------------------------------- test hook
def _test_kill_hook(spec: dict):
    """The callback of :data:`TEST_KILL_ENV` for this job, or None (always None outside tests)."""
    value = os.environ.get(TEST_KILL_ENV, "")
    job, _, k = value.partition(":")
    if not value or job != spec["job_id"]:
        return None
    marker = Path(spec["state_root"]) / f".test-killed-{job}"
    if marker.exists():
        return None
    after = int(k or 1)

    def hook(ev):
        if ev.phase == "finetune" and ev.k == after + 1:          # iteration `after` ended: its state is saved
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


# ------------------------------------------------------------------------------------------------------ jobs
def check_shared(spec: dict) -> None:
    """The driver's marker files must be visible here: the output and state folders are the same storage on
    every node (else a LoRA would land on a disk the user never sees, and a retried job could not resume)."""
    for path, token, what in spec.get("markers", ()):
        try:
            ok = Path(path).read_text(encoding="ascii").strip() == token
        except OSError:
            ok = False
        if not ok:
            raise InputError(f"the {what} folder of this batch is not visible from this worker's node: {what} must be "
                             "on storage every node of the cluster shares (the same path everywhere)")


class JobRunner:
    """Runs batch jobs one after another in this process, keeping one base model in host memory."""

    def __init__(self, threads: int | None = None, device: str = "auto"):
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        self.device = device            # "cpu" for a worker given no GPU, even on a machine that has one
        self._base_key = None
        self._base = None

    def run(self, spec: dict) -> dict:
        """Run one job (``spec``: made by runner.prepare); a result dict, never an exception (a kill is a kill)."""
        from ..memory import release_host_memory

        t0 = time.perf_counter()
        try:
            result = self._run(spec)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the job's message, the batch goes on
            result = {"status": "failed", "error": describe(exc, spec["job_id"], spec["photos"])}
        finally:
            release_host_memory()
        result["worker_time_s"] = round(time.perf_counter() - t0, 3)
        return result

    def _bundle(self, settings: dict, device, dtypes: dict):
        """A fresh copy of the base model on ``device``; the base is loaded (on the host, in the storage ``dtypes``
        the job's runtime wants) only when it changes."""
        from ..diffusion.loading import load_model
        from ..memory import release_host_memory

        key = (settings["model"], settings.get("kind"), settings.get("tokenizer"),
               tuple(sorted((k, str(v)) for k, v in dtypes.items())))
        reused = key == self._base_key
        if not reused:
            self._base_key, self._base = None, None               # one base at a time: free the old one first
            release_host_memory()
            self._base = load_model(settings["model"], kind=settings.get("kind"), tokenizer=settings.get("tokenizer"),
                                    device="cpu", weight_dtypes=dtypes)
            self._base_key = key
        return copy.deepcopy(self._base).to(device), reused

    def _run(self, spec: dict) -> dict:
        """``iddm train --resume`` (cli/iddm.py's cmd_train) for one job, minus its console output."""
        from ..protection.options import config_from_args
        from ..diffusion.fit import check_model_fits
        from ..diffusion.runtime import Runtime, pick_device
        from ..diffusion.validation import validate_model
        from ..protection.iddm import run_iddm
        from ..protection.refs import load_private_refs

        check_shared(spec)
        settings = spec["settings"]
        config = config_from_args(argparse.Namespace(**settings))
        info = validate_model(settings["model"], kind=settings.get("kind"), tokenizer=settings.get("tokenizer"))
        refs = load_private_refs(spec["photos"], config.resolution or info.resolution, seed=config.seed,
                                 n_reference=settings.get("n_reference"))
        warnings = _photo_warnings(refs)
        device = pick_device(self.device)
        runtime = Runtime.for_settings(config, device)             # what run_iddm decides from the same settings
        check_model_fits(info, runtime)
        bundle, reused = self._bundle(settings, device, runtime.weight_dtypes)
        try:
            result = run_iddm(bundle, refs, config, out_path=spec["out"], lora_name=spec["job_id"],
                              report_path=spec["report"], checkpoint_dir=spec["state_dir"], resume=True,
                              on_mismatch=spec["on_mismatch"], callback=_test_kill_hook(spec),
                              class_images=settings.get("class_images"), model_source=settings["model"])
        finally:
            del bundle
        report = result.report
        resume = report.get("resume", {})
        return {"status": "done", "resumed_from_iteration": int(resume.get("resumed_after", 0)),
                "discarded_state": resume.get("discarded"), "model_reused": reused,
                "final_similarity": report.get("final_similarity", {}),
                "train_time_s": round(report["timings"]["total"], 3), "device": device.type,
                "warnings": [scrub(w, spec["job_id"], spec["photos"]) for w in warnings]}


def _photo_warnings(refs) -> list[str]:
    """What `iddm train` warns about the photos, naming photos by position, never by name."""
    from ..protection.refs import check_identity, identity_note

    warnings = []
    if refs.skipped:
        warnings.append(f"no face found in {len(refs.skipped)} photo(s), not used")
    if check_identity(refs) is not None and identity_note(refs, show_names=False):
        warnings.append(identity_note(refs, show_names=False).removeprefix("warning: "))
    return warnings


class BatchWorker:
    """The Ray actor (runner.py applies ``ray.remote`` with the job's CPUs and GPUs): one :class:`JobRunner`."""

    def __init__(self, threads: int | None = None, device: str = "auto"):
        self.runner = JobRunner(threads, device)

    def run(self, spec: dict) -> dict:
        return self.runner.run(spec)

    def pid(self) -> int:
        return os.getpid()
