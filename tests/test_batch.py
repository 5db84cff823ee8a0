"""Issue 28: `iddm batch` on Ray, one IDDM job per identity, resumable per identity, private by job id.

Jobs read from a jobs.csv or a folder of identity folders; a worker killed mid-job makes its job resume (not
restart) on another worker, and the LoRAs equal sequential `iddm train` runs with the same seeds; a bad identity
fails alone; Ctrl-C leaves every job resumable; no folder or photo name reaches a report, a log line or Ray's logs.
Every private name in this module contains "zqx", so one search finds any leak. The Ray tests share one local Ray
(2 CPUs, no dashboard) and skip where Ray is not installed (CI installs it: requirements-dev.txt).
"""
import json
import logging
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import HANG_S, write_private_photos
from iddm_core.batch.jobs import KEY_FILE, folder_job_id, load_jobs
from iddm_core.batch.worker import TEST_KILL_ENV, describe, scrub
from iddm_core.cli import main
from iddm_core.errors import InputError

PRIVATE = b"zqx"                 # in every identity folder and photo name below
SMALL = ("--model", "tiny", "--K", "2", "--T", "2", "--ft-steps", "1", "--resolution", "64", "--no-prior")
KILLED = "j3"                    # the job whose worker kills itself after iteration 1 (first attempt only)
DATE_EPOCH = "1700000000"        # SOURCE_DATE_EPOCH: fixes modelspec.date, so equal runs write equal files


def _faceless(path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((160, 160, 3), 128, np.uint8)).save(path)


def _assert_private(*texts) -> None:
    for text in texts:
        data = text if isinstance(text, bytes) else str(text).encode()
        assert PRIVATE not in data.lower(), data[max(0, data.lower().find(PRIVATE) - 200):][:400]


def _names_under(folder: Path) -> str:
    return "\n".join(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------------ jobs, no Ray
def test_jobs_csv_overrides_and_validation(tmp_path):
    (tmp_path / "a").mkdir()
    csv = tmp_path / "jobs.csv"
    csv.write_text("id,photos,seed,FT-steps,no_prior,K\nclient-1,a,3,,yes,\nb.2,/abs/zqxfolder,x,2,,\n")
    one, two = load_jobs(csv, tmp_path / "out")
    assert (one.id, one.photos, one.overrides, one.error) == ("client-1", tmp_path / "a",
                                                              {"seed": 3, "no_prior": True}, None)
    assert two.photos == Path("/abs/zqxfolder") and two.error == "seed='x' is not an integer"
    _assert_private(repr(one), repr(two))                       # a job's repr never shows its folder
    assert one.settings({"seed": 0, "K": 10})["K"] == 10 and one.settings({"seed": 0})["seed"] == 3
    csv.write_text("id,photos,gradient,k\nc,a,red,\nd,a,fast,3\n")       # choices as `iddm train` has them
    bad, good = load_jobs(csv, tmp_path / "out")
    assert bad.error.startswith("gradient='red': choose one of full") and good.overrides == {"gradient": "fast", "K": 3}

    for text, message in [("id,folder\n", "missing column(s) photos"),
                          ("id,photos,colour\nx,a,red\n", "unknown column(s) colour"),
                          ("id,photos\nx,a\nx,a\n", "appears twice"),
                          ("id,photos\n../x,a\n", "job id '../x' must be"),
                          ("id,photos\n", "lists no job")]:
        csv.write_text(text)
        with pytest.raises(InputError, match=re.escape(message)):
            load_jobs(csv, tmp_path / "out")
    with pytest.raises(InputError, match="neither a jobs.csv file nor a folder"):
        load_jobs(tmp_path / "missing.csv", tmp_path / "out")


def test_folder_job_ids_are_keyed_hashes_stable_per_output_folder(tmp_path, capsys):
    people = tmp_path / "people"
    for name in ("zqxanna", "zqxbob", ".hidden"):
        (people / name).mkdir(parents=True)
    (people / "zqxbob" / "iddm.json").write_text(json.dumps({"seed": 7, "rank": "8", "train_text_encoder": True}))
    (people / "stray.txt").write_text("not a folder")
    jobs = load_jobs(people, tmp_path / "out")
    again = load_jobs(people, tmp_path / "out")
    other = load_jobs(people, tmp_path / "other-out")
    assert [j.id for j in jobs] == [j.id for j in again] != [j.id for j in other]   # the key lives in --out
    assert len(jobs) == 2 and all(j.id.startswith("p") and len(j.id) == 13 for j in jobs)
    _assert_private(*(j.id for j in jobs), *(repr(j) for j in jobs))
    assert jobs[1].overrides == {"seed": 7, "rank": 8, "train_text_encoder": True}
    key = tmp_path / "out" / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert jobs[0].id == folder_job_id(bytes.fromhex(key.read_text().strip()), "zqxanna")
    (people / "zqxanna" / "iddm.json").write_text("{broken")
    assert "iddm.json is not valid JSON" in load_jobs(people, tmp_path / "out")[0].error
    # the user's own terminal may see which id is which folder, on request
    assert main(["batch", "--jobs", str(people), "--out", str(tmp_path / "out"), "--show-ids"]) == 0
    assert f"{jobs[1].id}  zqxbob" in capsys.readouterr().out


def test_batch_without_ray_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)           # import ray -> ImportError
    (tmp_path / "jobs.csv").write_text("id,photos\nx,a\n")
    assert main(["batch", "--jobs", str(tmp_path / "jobs.csv"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[batch]'" in err and "Ray" in err
    assert not (tmp_path / "out").exists()                   # refused before any work


def test_error_messages_name_the_job_not_its_photos(tmp_path):
    folder = tmp_path / "zqxcarol"
    folder.mkdir()
    (folder / "zqxcarol_beach.jpg").write_bytes(b"not a jpeg")
    (folder / "zqxcarol_2.png").write_bytes(b"")
    exc = InputError(f"cannot read image {folder / 'zqxcarol_beach.jpg'}: UnidentifiedImageError")
    assert describe(exc, "c1", folder) == "cannot read image <a photo>: UnidentifiedImageError"
    text = describe(InputError(f"no face detected in zqxcarol_beach.jpg, zqxcarol_2.png ({folder})"), "c1", folder)
    assert text == "no face detected in <a photo>, <a photo> (<photos of job c1>)"
    assert describe(RuntimeError(f"boom at {folder.resolve()}"), "c1", folder) == \
        "RuntimeError: boom at <photos of job c1>"
    (folder / "iddm.json").write_text("{}")             # the job's settings file is not a photo
    assert describe(RuntimeError("in iddm_core"), "c1", folder) == "RuntimeError: in iddm_core"
    # another spelling of a private name is not replaced, so the whole message is withheld
    assert scrub("see ZQXCAROL_BEACH", "c1", folder) == "details withheld: the message named a private file"


# --------------------------------------------------------------------------------------------------- on Ray
@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module: 2 CPUs, no dashboard, a small object store, logs in a folder of our own.
    Workers inherit the test-only kill switch for job KILLED and a fixed SOURCE_DATE_EPOCH."""
    ray = pytest.importorskip("ray")
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))        # short: Ray's socket paths must stay short
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TEST_KILL_ENV, f"{KILLED}:1")
        mp.setenv("SOURCE_DATE_EPOCH", DATE_EPOCH)            # modelspec.date: the same in batch and sequential runs
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=100 * 2 ** 20,
                 _temp_dir=str(temp), logging_level=logging.WARNING)
        yield ray, temp
        ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)




def _identities(people: Path, faces: Path, csv: Path) -> None:
    rows = ["id,photos,seed,K"]
    for i in range(1, 7):
        write_private_photos(people / f"zqxident{i}", faces, f"zqxphoto{i}")
        rows.append(f"j{i},people/zqxident{i},{i},")
    bad = people / "zqxidentbad"                       # one face: not enough photos
    bad.mkdir()
    shutil.copy(faces / "obama.jpg", bad / "zqxphotobad_0.jpg")
    _faceless(bad / "zqxphotobad_wall.png")
    rows += ["bad,people/zqxidentbad,0,", "badk,people/zqxident1,0,0"]     # badk: K=0
    csv.write_text("\n".join(rows) + "\n")


def test_six_identities_two_workers_a_killed_worker_resumes_bit_identical(tmp_path, ray_cluster, small_faces_dir,
                                                                          monkeypatch, capfd, one_thread):
    monkeypatch.setenv("IDDM_CACHE_DIR", str(tmp_path / "cache"))
    csv, out, state = tmp_path / "jobs.csv", tmp_path / "out", tmp_path / "shared-state"
    _identities(tmp_path / "people", small_faces_dir, csv)
    argv = ["batch", "--jobs", str(csv), "--out", str(out), "--state-dir", str(state), "--workers", "2", *SMALL]
    assert main(argv) == 1                                  # finished, one job (two) failed
    captured = capfd.readouterr()
    report = json.loads((out / "batch_report.json").read_text())
    jobs = report["jobs"]
    assert report["state"] == "finished" and report["workers"] == 2
    assert report["counts"] == {"done": 6, "failed": 2}
    assert "need at least 3 photos with a face" in jobs["bad"]["error"]
    assert "<photos of job bad>" in jobs["bad"]["error"] and "<a photo>" in jobs["bad"]["error"]
    assert jobs["badk"]["error"].startswith("K=0: the number of outer iterations") and jobs["badk"]["attempts"] == 0
    for i in range(1, 7):
        entry = jobs[f"j{i}"]
        assert entry["status"] == "done" and entry["output"] == f"j{i}.safetensors"
        assert set(entry["final_similarity"]) == {"dlib"} and entry["time_s"] > 0
        expect = (2, 1) if f"j{i}" == KILLED else (1, 0)    # killed after iteration 1: resumed, not restarted
        assert (entry["attempts"], entry["resumed_from_iteration"]) == expect, (i, entry)
    assert f"job {KILLED}: retrying: its worker died during attempt 1" in captured.err
    assert f"job {KILLED}: done" in captured.err and "resumed after iteration 1" in captured.err
    loads = [not jobs[f"j{i}"]["model_reused"] for i in range(1, 7)]
    assert 1 <= sum(loads) <= 3                      # once per worker (2, + the replacement), not once per job
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".iddm-batch", "batch_report.json"] + [f"j{i}.{ext}" for i in range(1, 7)
                                                for ext in ("safetensors", "report.json")])
    assert not list(state.rglob("state.iddm"))       # every finished job's state is gone

    # privacy: no folder or photo name in the report, the job reports, the console, any file name
    _assert_private(captured.out, captured.err, _names_under(out), _names_under(state),
                    *(p.read_bytes() for p in out.glob("*.json")))

    # the same LoRA files, byte for byte, as sequential `iddm train` runs with the same seeds (one thread, like
    # the workers; the same SOURCE_DATE_EPOCH)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", DATE_EPOCH)
    for i in range(1, 7):
        seq = tmp_path / "seq" / f"j{i}.safetensors"
        assert main(["train", "--refs", str(tmp_path / "people" / f"zqxident{i}"), "--out", str(seq),
                     "--seed", str(i), "--device", "cpu", *SMALL]) == 0
        assert (out / f"j{i}.safetensors").read_bytes() == seq.read_bytes(), f"j{i}"
    capfd.readouterr()

    # a re-run of the same batch: finished jobs are skipped, the bad ones fail again, nothing else changes
    before = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    assert main(argv) == 1
    captured = capfd.readouterr()
    again = json.loads((out / "batch_report.json").read_text())["jobs"]
    assert [again[f"j{i}"]["status"] for i in range(1, 7)] == ["already_done"] * 6
    assert all(again[f"j{i}"]["attempts"] == 0 and "dlib" in again[f"j{i}"]["final_similarity"] for i in range(1, 7))
    assert again["bad"]["status"] == "failed" and {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == before
    _assert_private(captured.out, captured.err, (out / "batch_report.json").read_bytes())


def _interrupt_when_a_state_is_saved(state: Path, fired: list) -> threading.Thread:
    """Ctrl-C (SIGINT to this process) as soon as some job has saved the state of its first iteration."""
    def watch():
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            if list(state.glob("*/state.iddm")):
                fired.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.02)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_leaves_every_job_resumable(tmp_path, ray_cluster, small_faces_dir, monkeypatch, capfd):
    monkeypatch.setenv("IDDM_CACHE_DIR", str(tmp_path / "cache"))
    people, out, state = tmp_path / "people", tmp_path / "out", tmp_path / "shared-state"
    for name in ("zqxdora", "zqxemil"):
        write_private_photos(people / name, small_faces_dir, name + "_pic")
    (people / "zqxemil" / "iddm.json").write_text('{"seed": 5}')
    argv = ["batch", "--jobs", str(people), "--out", str(out), "--state-dir", str(state), "--workers", "2",
            "--model", "tiny", "--K", "3", "--T", "2", "--ft-steps", "8", "--resolution", "64", "--no-prior"]
    fired = []
    watcher = _interrupt_when_a_state_is_saved(state, fired)
    assert main(argv) == 130
    watcher.join(timeout=HANG_S)
    assert fired
    captured = capfd.readouterr()
    assert "run the same command again to continue" in captured.err
    report = json.loads((out / "batch_report.json").read_text())
    assert report["state"] == "cancelled"
    statuses = {j: e["status"] for j, e in report["jobs"].items()}
    assert "interrupted" in statuses.values() and set(statuses.values()) <= {"interrupted", "done", "pending"}
    for job_id, status in statuses.items():
        assert (out / f"{job_id}.safetensors").exists() == (status == "done")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert list(state.glob("*/state.iddm"))            # the saved iteration is still there

    assert main(argv) == 0                             # the same command continues
    captured2 = capfd.readouterr()
    jobs = json.loads((out / "batch_report.json").read_text())["jobs"]
    assert {e["status"] for e in jobs.values()} <= {"done", "already_done"}
    assert max(e.get("resumed_from_iteration", 0) for e in jobs.values()) >= 1    # resumed, not restarted
    assert not list(state.glob("*/state.iddm"))
    _assert_private(captured.out, captured.err, captured2.out, captured2.err, _names_under(out),
                    _names_under(state), *(p.read_bytes() for p in out.glob("*.json")))


def test_ray_logs_name_no_private_file(ray_cluster):
    """Ray's own logs (driver, raylet, workers) and every other file of its session hold no private name. Runs
    last: it ends the module's Ray, so that every log is flushed."""
    ray, temp = ray_cluster
    ray.shutdown()
    files = [p for p in temp.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size < 200 * 2 ** 20]
    assert any(p.suffix in (".out", ".err", ".log") for p in files)
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        assert PRIVATE not in data.lower(), path
