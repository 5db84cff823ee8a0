"""How the library's errors are named in ComfyUI's error dialog and console.

ComfyUI reports a failed node as ``<exception type>: <message>``, where the type is the class's ``__qualname__``
if its ``__module__`` is ``"builtins"`` and ``module + "." + qualname`` otherwise (``full_type_name`` in
ComfyUI's execution.py). A custom node folder is imported under its absolute path, so iddm_core's InputError
would read ``/home/<name>/ComfyUI/custom_nodes/comfyui-iddm.iddm_core.errors.InputError: ...``: noisy, and
it shows the install path.

:func:`plain_errors` wraps a node's FUNCTION so that an ``IDDMError`` leaves the node as one of the classes
below: the same message and traceback, a subclass of the library's class (``except InputError`` and the
tests still match it), presented as a builtin, so both ComfyUI and Python's own traceback print
``InputError: <message>``. Pickling turns one back into the library's class.
"""
from __future__ import annotations

import functools

from ..iddm_core import errors as _core


def _plain(base: type) -> type:
    def __reduce__(self):
        return (base, self.args)

    cls = type(base.__name__, (base,), {"__module__": "builtins", "__reduce__": __reduce__,
                                        "__doc__": f"{base.__name__} as ComfyUI shows it (see nodes/errors.py)."})
    cls.__qualname__ = base.__name__
    return cls


IDDMError = _plain(_core.IDDMError)
InputError = _plain(_core.InputError)
ModelError = _plain(_core.ModelError)
Cancelled = _plain(_core.Cancelled)

# most specific first
_PLAIN = ((_core.InputError, InputError), (_core.ModelError, ModelError), (_core.Cancelled, Cancelled),
          (_core.IDDMError, IDDMError))
_WRAPPED = "_iddm_plain_errors"


def as_plain(exc: BaseException) -> BaseException:
    """``exc`` as the plain class of its kind (``exc`` itself if it is not a library error or already plain)."""
    if not isinstance(exc, _core.IDDMError) or type(exc).__module__ == "builtins":
        return exc
    for core_cls, plain_cls in _PLAIN:
        if isinstance(exc, core_cls):
            return plain_cls(*exc.args).with_traceback(exc.__traceback__)
    return exc


def plain_errors(cls):
    """Make ``cls``'s FUNCTION re-raise library errors as the plain classes (idempotent). Returns ``cls``."""
    name = cls.FUNCTION
    function = getattr(cls, name)
    if getattr(function, _WRAPPED, False):
        return cls

    @functools.wraps(function)
    def run(self, *args, **kwargs):
        try:
            return function(self, *args, **kwargs)
        except _core.IDDMError as exc:
            plain = as_plain(exc)
            if plain is exc:
                raise
            # the original's chain, not the original itself (that would print the long name again)
            plain.__cause__, plain.__suppress_context__ = exc.__cause__, exc.__suppress_context__
            context = exc.__context__
        plain.__context__ = context
        raise plain

    setattr(run, _WRAPPED, True)
    setattr(cls, name, run)
    return cls
