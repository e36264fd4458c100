"""The model that ships inside the package, used when no model file is named."""
from __future__ import annotations

import os

from .errors import MinitxError

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "data", "default.npz")


def default_model_path() -> str:
    if not os.path.exists(DEFAULT_MODEL):
        raise MinitxError("no model file given and no bundled default model is installed "
                          f"(expected {DEFAULT_MODEL}); pass a model file, e.g. one from 'minitx init'")
    return DEFAULT_MODEL
