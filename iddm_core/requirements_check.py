"""Which diffusers / peft / onnx releases work next to a host's older torch, transformers, accelerate, protobuf.

Their declared requirements allow far older hosts than they really import on (AUTOMATIC1111 1.10: torch 2.1.2,
transformers 4.30.2, accelerate 0.21.0, protobuf 3.20.0). The boundaries below were read from the packages' own
source and metadata:

- diffusers 0.36.0 fills a table with ``torch.xpu.empty_cache`` (``diffusers/utils/torch_utils.py``) when it is
  imported; ``torch.xpu`` exists from torch 2.3.0 (2.1.2 and 2.2.2 wheels have no ``torch/xpu``).
- peft 0.14.0 imports ``EncoderDecoderCache`` from transformers (``peft/peft_model.py``), new in 4.43.0.
- peft 0.15.0 imports ``accelerate.utils.memory.clear_device_cache`` (``peft/utils/loftq_utils.py``), new in 0.32.0.
- onnx 1.13 and later require protobuf >= 3.20.2; onnx 1.12.0 accepts 3.12.2 .. 3.20.1 (wheels up to Python 3.10).

install.py (loaded by file path, before anything else is installed) uses :data:`RULES` to cap what it installs;
the library calls :func:`require` where it first imports diffusers / peft / onnx, so a mismatch reads as one
:class:`RequirementsError` naming the installed versions and the fix instead of e.g.
``AttributeError: module 'torch' has no attribute 'xpu'``. Standard library only.
"""
from __future__ import annotations

import importlib
import re
from typing import Mapping, NamedTuple

try:
    from .errors import ModelError
except ImportError:            # loaded by path from install.py (no package around it)
    ModelError = RuntimeError  # type: ignore[misc,assignment]


class Rule(NamedTuple):
    package: str        # e.g. "diffusers"
    first_bad: str      # its first release that needs more of the host
    host: str           # the host package it needs more of
    host_min: str       # ... at least this version
    why: str


RULES = (
    Rule("diffusers", "0.36", "torch", "2.3", "reads torch.xpu when imported"),
    Rule("peft", "0.14", "transformers", "4.43", "imports transformers.EncoderDecoderCache"),
    Rule("peft", "0.15", "accelerate", "0.32", "imports accelerate.utils.memory.clear_device_cache"),
    Rule("onnx", "1.13", "protobuf", "3.20.2", "requires a newer protobuf"),
)
# what a failed import reports, in this order
STACK = ("torch", "diffusers", "peft", "transformers", "accelerate", "huggingface-hub", "protobuf", "onnx")


class RequirementsError(ModelError):
    """diffusers / peft / onnx missing or not importable with the installed torch / transformers / accelerate."""


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: ``"2.1.2+cu121"`` -> (2, 1, 2), ``"0.36.0.dev0"`` -> (0, 36, 0)."""
    out = []
    for part in version.split("+", 1)[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        out.append(int(digits.group()))
        if digits.group() != part:
            break
    return tuple(out)


def older(version: str | None, than: str) -> bool:
    return version is not None and release(version) < release(than)


def installed_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def caps(host: Mapping[str, str | None]) -> dict[str, list[tuple[str, str]]]:
    """``{package: [(specifier, reason), ...]}`` for each rule the ``host`` versions (name -> version or None
    when unknown / about to be upgraded) fall under: the package must stay below its ``first_bad`` release."""
    out: dict[str, list[tuple[str, str]]] = {}
    for rule in RULES:
        have = host.get(rule.host)
        if older(have, rule.host_min):
            reason = f"{rule.package} {rule.first_bad}+ {rule.why} ({rule.host} >= {rule.host_min} needed, {have} here)"
            out.setdefault(rule.package, []).append((f"<{rule.first_bad}", reason))
    return out


def diagnose(versions: Mapping[str, str | None]) -> list[tuple[str, str]]:
    """``[(requirement to install, explanation)]`` for each installed package too new for its host."""
    out = []
    for rule in RULES:
        have, host = versions.get(rule.package), versions.get(rule.host)
        if have is not None and not older(have, rule.first_bad) and older(host, rule.host_min):
            out.append((f"{rule.package}<{rule.first_bad}",
                        f"{rule.package} {have} {rule.why} (needs {rule.host} >= {rule.host_min}, "
                        f"installed {rule.host} {host})"))
    return out


def installed_stack() -> dict[str, str | None]:
    return {name: installed_version(name) for name in STACK}


def explain(module: str, exc: BaseException, versions: Mapping[str, str | None] | None = None) -> str:
    """One message: what failed, the installed versions, and what to run."""
    versions = installed_stack() if versions is None else versions
    have = ", ".join(f"{name} {versions[name]}" for name in STACK if versions.get(name))
    fixes = diagnose(versions)
    # a later rule for the same package (peft: accelerate) is looser; keep the tightest cap per package
    tightest: dict[str, str] = {}
    for requirement, _ in fixes:
        name, cap = requirement.split("<", 1)
        if name not in tightest or release(cap) < release(tightest[name]):
            tightest[name] = cap
    if isinstance(exc, ModuleNotFoundError) and versions.get(module) is None:
        what = f"{module} is not installed in the Python that runs IDDM"
        limits = [(spec, reason) for spec, reason in caps(versions).get(module, [])]
        spec = "".join(s for s, _ in limits[:1])
        todo = (f'Install it with that Python: python -m pip install "{module}{spec}" (in A1111 / Forge / ComfyUI: '
                "restart the app so that the pack's install.py runs)")
        if limits:
            todo += f"; only {module}{spec} fits: {limits[0][1]}"
    else:
        what = f"{module} cannot be imported ({type(exc).__name__}: {exc})"
        if tightest:
            why = "; ".join(text for _, text in fixes)
            pins = " ".join(f'"{name}<{cap}"' for name, cap in tightest.items())
            todo = f"{why}. Fix: with the Python that runs IDDM, python -m pip install {pins}"
        else:
            todo = ("Install diffusers, peft, transformers and accelerate versions that import with this torch "
                    "(see docs/a1111.md, 'Installing into A1111 1.10 / Forge'), then restart")
    return f"{what}. Installed: {have or 'none of ' + ', '.join(STACK)}. {todo}"


_IMPORTED: set[str] = set()


def require(*modules: str) -> None:
    """Import ``modules`` (e.g. ``"diffusers"``); a failure becomes a :class:`RequirementsError` that names the
    installed versions and the fix. Cheap after the first success."""
    for module in modules:
        if module in _IMPORTED:
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:         # AttributeError (torch.xpu), ImportError (peft vs transformers), ...
            raise RequirementsError(explain(module, exc)) from exc
        _IMPORTED.add(module)
