"""The model that ships inside the package, used when no model file is named."""
from __future__ import annotations

import os
import stat

from .errors import MinitxError

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "data", "default.npz")


def default_model_path() -> str:
    if not os.path.exists(DEFAULT_MODEL):
        raise MinitxError("no model file given and no bundled default model is installed "
                          f"(expected {DEFAULT_MODEL}); pass a model file, e.g. one from 'minitx init'")
    return DEFAULT_MODEL


def model_path(path: str | None) -> str:
    """The model file a command reads: ``path``, or the bundled model when none is named.

    A folder is refused with a hint (a Hugging Face folder needs `minitx convert`); the loader
    refuses anything else that is not a regular file before opening it.
    """
    if path is None:
        return default_model_path()
    if path == "":
        raise MinitxError("the model path is empty")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return path   # missing or unreadable: the loader names the problem
    if stat.S_ISDIR(mode):
        raise MinitxError(f"{path}: is a folder, not a model file (a Hugging Face folder? see `minitx convert`)")
    return path


def load_model(path: str | None):
    """The :class:`minitx.model.Model` in ``path`` (default: the bundled model)."""
    from . import modelfile

    return modelfile.load(model_path(path))
