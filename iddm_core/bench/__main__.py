import argparse
import importlib
import pkgutil
import sys

from .. import bench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iddm_core.bench", description="IDDM benchmarks (print ratios).")
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(bench.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{bench.__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


sys.exit(main())
