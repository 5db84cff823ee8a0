"""Errors the user can act on. Messages name the file or parameter at fault."""


class IDDMError(Exception):
    """Base class: the CLI prints these as one line, ComfyUI shows them in its error dialog."""


class InputError(IDDMError, ValueError):
    """Bad user input: a folder, an image, a parameter."""


class ModelError(IDDMError):
    """A model file that is missing, unreadable or of an unknown layout."""


class Cancelled(IDDMError):
    """Raised (usually from a progress callback) to stop a run between two steps. Nothing is written."""
