"""minitx: a Transformer engine whose every op is an executable NumPy spec.

In the repository, `backends/`, `plugins/` and `cli.py` sit beside this package; an installed
wheel carries them inside it as `minitx.backends`, `minitx.plugins` and `minitx.cli`. When run
from a source checkout we extend the package path so that both layouts import the same way.
"""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "backends")) and _os.path.isfile(
    _os.path.join(_root, "cli.py")
):
    __path__.append(_root)  # type: ignore[name-defined]  # source checkout: find backends/, plugins/, cli.py

from .errors import MinitxError  # noqa: E402

__all__ = ["MinitxError", "__version__"]
