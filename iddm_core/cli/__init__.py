"""Command line: ``iddm <command> ...`` (installed with ``pip install -e .``) or ``python -m iddm_core <command> ...``.

Every module in this package that defines ``register(subparsers)`` contributes commands. A command's
parser sets ``func=callable(args) -> int``; heavy imports happen inside that callable so ``--help`` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ..errors import IDDMError


def build_parser(prog: str = "iddm") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="IDDM: train personal Stable Diffusion LoRAs whose outputs are hard to link to you by face recognition.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None, prog: str = "iddm") -> int:
    """The ``iddm`` console command (``prog``: the name usage lines show)."""
    try:
        parser = build_parser(prog)        # a command module may import the library (e.g. a version check fails)
    except IDDMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except IDDMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled: nothing was written", file=sys.stderr)
        return 130
