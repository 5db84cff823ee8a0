"""Benchmarks: ``python -m iddm_core.bench <name> [...]``. Each module here with ``register(subparsers)`` adds one."""
