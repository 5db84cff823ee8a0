"""Which identities a batch trains, and with which settings (issue 28). No Ray here.

Two inputs:

* a ``jobs.csv`` with columns ``id`` and ``photos`` (a folder; relative paths are relative to the csv's folder)
  plus any per-job setting (:func:`override_types`; a blank cell keeps the batch's default). The job id is the
  ``id`` cell: the user's own pseudonym, used in file names, logs and the report, so not the person's name.
* a folder whose sub-folders are identities (hidden ones skipped), each optionally holding ``iddm.json`` (an
  object of per-job settings). The job id is ``p`` + 12 hex digits of HMAC-SHA256(batch key, folder name), the
  key being 32 random bytes kept in ``<out>/.iddm-batch-key`` (0600, made on the first run). Not the folder name
  (private), not an ordinal (adding a folder would shift every later id onto another person's outputs and resume
  state), not a plain hash of the name (a guessed name could be checked against it): stable across re-runs into the
  same output folder, meaningless without the key. ``iddm batch --show-ids`` shows the user, on the terminal
  only, which id is which folder.

A folder path lives in :attr:`Job.photos`, which no repr, log line or report shows. Bad per-job input (a value
that is not a number, a broken ``iddm.json``) makes that job fail alone (:attr:`Job.error`); a malformed csv
(missing or unknown columns, duplicate or invalid ids) is refused before any work.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
KEY_FILE = ".iddm-batch-key"
OVERRIDES_FILE = "iddm.json"


def _bool(text: str) -> bool:
    word = str(text).strip().lower()
    if word in ("1", "true", "yes", "y", "on"):
        return True
    if word in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError("not a yes/no value")


# the per-job settings besides `iddm train`'s algorithm options (override_types)
MODEL_SETTINGS = {"model": str, "kind": str, "tokenizer": str, "n_reference": int}
_KIND_WORDS = {int: "an integer", float: "a number", _bool: "yes/no (1/0, true/false)", str: "text"}


@functools.lru_cache(maxsize=1)
def override_types() -> dict:
    """{setting: (convert, choices or None)}: what a csv column or iddm.json key may set. Every algorithm option of
    `iddm train` (protection/options.py's ``add_algorithm_args``, so a new option is a per-job setting too, by its
    argparse name: ``ft_steps``, ``no_prior``) converted as that option converts its value, plus
    :data:`MODEL_SETTINGS`."""
    import argparse

    from ..protection.options import add_algorithm_args

    parser = argparse.ArgumentParser(add_help=False)
    add_algorithm_args(parser)
    types = {name: (convert, None) for name, convert in MODEL_SETTINGS.items()}
    for action in parser._actions:
        if action.nargs == 0 and action.const is True:              # a store_true flag
            types[action.dest] = (_bool, None)
        elif action.option_strings:
            types[action.dest] = (action.type or str, tuple(action.choices) if action.choices else None)
    return types


@dataclass
class Job:
    id: str
    photos: Path = field(repr=False)                 # private: never in a repr, a log line or the report
    overrides: dict = field(default_factory=dict)
    error: str | None = None                         # bad per-job input: the job fails alone with this message
    label: str = field(default="", repr=False)       # DIR input: the folder name, for --show-ids only

    def __repr__(self) -> str:
        return f"Job({self.id!r}, {len(self.overrides)} override(s){', invalid' if self.error else ''})"

    def settings(self, defaults: dict) -> dict:
        """The batch's defaults with this job's overrides applied (the fields of `iddm train`'s arguments)."""
        return {**defaults, **self.overrides}


def column_name(raw: str) -> str | None:
    """The setting a header or json key means ("ft-steps", "FT_STEPS" -> "ft_steps"; "k" -> "K"), or None."""
    canonical = {name.lower(): name for name in override_types()}
    return canonical.get(str(raw).strip().replace("-", "_").lower())


def convert_overrides(raw: dict) -> tuple[dict, str | None]:
    """({setting: value}, error or None) from text cells; blank cells are skipped. The error names the setting
    and its value (settings are not private; a photo folder is never among them)."""
    values = {}
    for key, text in raw.items():
        name = column_name(key)
        if name is None:
            return {}, f"unknown setting {key!r} (known: {', '.join(override_types())})"
        if text is None or str(text).strip() == "":
            continue
        convert, choices = override_types()[name]
        try:
            values[name] = convert(str(text).strip())
        except ValueError:
            return {}, f"{name}={str(text).strip()!r} is not {_KIND_WORDS.get(convert, 'valid')}"
        if choices and values[name] not in choices:
            return {}, f"{name}={values[name]!r}: choose one of {', '.join(map(str, choices))}"
    return values, None


def check_id(job_id: str, where: str) -> str:
    if not ID_PATTERN.match(job_id or ""):
        raise InputError(f"{where}: job id {job_id!r} must be 1-64 letters, digits, '.', '_' or '-' and start with a "
                         "letter or digit (it names the job's LoRA file); use a pseudonym, never the person's name")
    return job_id


# ------------------------------------------------------------------------------------------------ jobs.csv
def read_csv(path: Path) -> list[Job]:
    """The jobs of a jobs.csv (see the module docstring)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = list(reader)
    lowered = [h.lower() for h in header]
    missing = [c for c in ("id", "photos") if c not in lowered]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (a jobs.csv needs id and photos)")
    unknown = [h for h in header if h.lower() not in ("id", "photos") and column_name(h) is None]
    if unknown:
        raise InputError(f"{path}: unknown column(s) {', '.join(unknown)}; per-job settings are: "
                         f"{', '.join(override_types())}")
    jobs, seen = [], set()
    for number, row in enumerate(rows, start=2):               # line 1 is the header
        row = {(k or "").strip(): v for k, v in row.items()}
        cells = {k.lower(): v for k, v in row.items()}
        job_id = check_id((cells.get("id") or "").strip(), f"{path} line {number}")
        if job_id in seen:
            raise InputError(f"{path} line {number}: job id {job_id!r} appears twice; ids must be unique")
        seen.add(job_id)
        photos = (cells.get("photos") or "").strip()
        overrides, error = convert_overrides({k: v for k, v in row.items() if k.lower() not in ("id", "photos")})
        if not photos:
            error = "no photo folder given (the photos cell is empty)"
        folder = Path(photos).expanduser()
        jobs.append(Job(job_id, folder if folder.is_absolute() else path.parent / folder, overrides, error))
    if not jobs:
        raise InputError(f"{path} lists no job")
    return jobs


# ------------------------------------------------------------------------------------------- folder of folders
def batch_key(out_dir, create: bool = True) -> bytes:
    """The secret that turns identity folder names into job ids, kept in ``<out>/.iddm-batch-key`` (0600)."""
    from ..atomic import atomic_write

    path = Path(out_dir) / KEY_FILE
    if not path.is_file():
        if not create:
            raise InputError(f"{out_dir} holds no batch key ({KEY_FILE}): run the batch into it first")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32)
        try:
            atomic_write(path, lambda tmp: Path(tmp).write_text(key + "\n", encoding="ascii"), mode=0o600)
        except InputError:              # made meanwhile by another run into the same folder: use that one
            pass
    text = path.read_text(encoding="ascii").strip()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise InputError(f"{path} is not a batch key: delete it only together with the batch's outputs")
    return bytes.fromhex(text)


def folder_job_id(key: bytes, folder_name: str) -> str:
    return "p" + hmac.new(key, folder_name.encode("utf-8"), hashlib.sha256).hexdigest()[:12]


def _folder_overrides(folder: Path) -> tuple[dict, str | None]:
    path = folder / OVERRIDES_FILE
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, f"its {OVERRIDES_FILE} is not valid JSON ({exc.__class__.__name__})"
    if not isinstance(data, dict):
        return {}, f"its {OVERRIDES_FILE} must hold one JSON object of settings"
    return convert_overrides({k: ("" if v is None else str(v).lower() if isinstance(v, bool) else str(v))
                              for k, v in data.items()})


def read_folder(root: Path, out_dir) -> list[Job]:
    """One job per sub-folder of ``root`` (see the module docstring)."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"{root} holds no identity folder (one sub-folder of photos per person)")
    key = batch_key(out_dir)
    jobs = []
    for folder in folders:
        overrides, error = _folder_overrides(folder)
        jobs.append(Job(folder_job_id(key, folder.name), folder, overrides, error, label=folder.name))
    if len({j.id for j in jobs}) != len(jobs):          # 48-bit ids: practically never
        raise InputError(f"{root}: two identity folders got the same job id; rename one of them")
    return jobs


def load_jobs(source, out_dir) -> list[Job]:
    """The jobs of a jobs.csv or of a folder of identity folders (``out_dir``: where the batch key lives)."""
    source = Path(source).expanduser()
    if source.is_dir():
        return read_folder(source, out_dir)
    if source.is_file():
        return read_csv(source)
    raise InputError(f"--jobs {source}: neither a jobs.csv file nor a folder of identity folders")


def id_table(jobs: list[Job]) -> str:
    """"<id>  <folder>" lines, for the user's own terminal (``--show-ids``); never for a log or a file."""
    return "\n".join(f"{j.id}  {j.label or os.fspath(j.photos)}" for j in jobs)
