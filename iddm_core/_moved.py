"""Old import paths of the modules that moved into sub-packages (issue 25), kept working for users' scripts.

Until 0.2.0 every module lived directly in ``iddm_core/``; since 0.3.0 they are grouped by concern
(docs/DESIGN.md). ``import iddm_core.models`` / ``from iddm_core.iddm import run_iddm`` still work: a finder on
``sys.meta_path`` answers an old name with the module now holding it (the same object, so attributes and monkeypatches
are shared; ``python -m iddm_core.demo_model`` runs the moved package's ``__main__``) and issues a ``DeprecationWarning`` naming the new path. A module that was split into several answers
attribute lookups from each of its parts in turn. The library itself never imports an old path.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

# old module (relative to the package) -> the module(s) now holding its names, first match wins
MOVED: dict[str, tuple[str, ...]] = {
    "models": ("diffusion.loading", "diffusion.validation", "diffusion.bundle", "diffusion.kinds", "diffusion.reading",
               "diffusion.tokenizers", "diffusion.single_file", "diffusion.diffusers_folder", "diffusion.writing"),
    "sd_keys": ("diffusion.sd_keys",),
    "tiny": ("diffusion.tiny",),
    "precision": ("diffusion.precision",),
    "grad_checkpoint": ("diffusion.grad_checkpoint",),
    "fit": ("diffusion.fit",),
    "finetune": ("training.finetune", "training.conditioning", "training.latents", "training.sampling"),
    "lora": ("training.lora", "training.kohya", "training.kohya_check"),
    "checkpoint": ("training.checkpoint",),
    "pgd": ("protection.pgd",),
    "iddm": ("protection.iddm", "protection.iddm_report"),
    "protect": ("protection.protect", "protection.style", "protection.ascent", "protection.photo_files"),
    "refs": ("protection.refs",),
    "split": ("protection.split",),
    "evaluate": ("evaluation.evaluate", "evaluation.metrics", "evaluation.judges", "evaluation.faces",
                 "evaluation.brisque"),
    "leak_render": ("evaluation.leak_render",),
    "portraits": ("evaluation.portraits",),
    "demo_model": ("demo.model",),
    "demo_model.architecture": ("demo.model.architecture",),
    "demo_model.data": ("demo.model.data",),
    "demo_model.train": ("demo.model.train",),
    "demo_model.measure": ("demo.model.measure",),
}


def new_paths(package: str, old: str) -> tuple[str, ...]:
    return tuple(f"{package}.{n}" for n in MOVED[old])


class _SplitModule(types.ModuleType):
    """An old module whose names now live in several modules: looks each name up in them in order."""

    def __init__(self, name: str, parts: tuple[str, ...]):
        super().__init__(name, f"moved: {', '.join(parts)}")
        self.__parts = parts

    def __getattr__(self, attr: str):
        for part in self.__parts:
            module = importlib.import_module(part)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r} (it moved to "
                             f"{', '.join(self.__parts)})")


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, old: str, parts: tuple[str, ...]):
        self.old, self.parts = old, parts

    def create_module(self, spec):
        warnings.warn(f"{self.old} moved to {' / '.join(self.parts)}; import it from there "
                      "(the old path is kept for scripts written against iddm_core 0.2)", DeprecationWarning,
                      stacklevel=3)
        if len(self.parts) == 1:
            module = importlib.import_module(self.parts[0])
            self.real_spec = module.__spec__
            return module
        return _SplitModule(self.old, self.parts)

    def exec_module(self, module) -> None:
        # importlib has just set ``module.__spec__`` to the alias spec (the old name); a moved module keeps its own,
        # or relative imports inside its functions see __package__ != __spec__.parent (an ImportWarning)
        real = getattr(self, "real_spec", None)
        if real is not None:
            module.__spec__ = real


# ``python -m <old package>``: runpy runs the moved package's __main__ under its new name, so its relative imports
# resolve from where it lives now
MOVED_MAINS = {"demo_model.__main__": "demo.model.__main__"}


class MovedFinder(importlib.abc.MetaPathFinder):
    """Answers ``<package>.<old>`` for every old name in :data:`MOVED`."""

    def __init__(self, package: str):
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        prefix = self.package + "."
        old = fullname[len(prefix):] if fullname.startswith(prefix) else None
        if old in MOVED_MAINS:             # spec named as the new module, its loader answering the old name
            origin = importlib.util.find_spec(f"{self.package}.{MOVED_MAINS[old]}").origin
            return importlib.util.spec_from_file_location(
                f"{self.package}.{MOVED_MAINS[old]}", origin,
                loader=importlib.machinery.SourceFileLoader(fullname, origin))
        if old not in MOVED:
            return None
        parts = new_paths(self.package, old)
        target_spec = importlib.util.find_spec(parts[0])
        spec = importlib.util.spec_from_loader(fullname, _AliasLoader(fullname, parts),
                                               is_package=bool(target_spec and target_spec.submodule_search_locations))
        if target_spec is not None and target_spec.submodule_search_locations is not None and len(parts) == 1:
            spec.submodule_search_locations = list(target_spec.submodule_search_locations)
        return spec


def install(package: str) -> None:
    """Put one finder for ``package`` on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, MovedFinder) and f.package == package for f in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder(package))   # before the path finder: an old name is never loaded twice
