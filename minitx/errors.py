"""One exception type for every problem a user can cause.

The CLI turns a MinitxError into a single line on stderr and a non-zero exit; anything else is a
bug in minitx and keeps its traceback.
"""
from __future__ import annotations


class MinitxError(Exception):
    """A user-facing error: the message names the file, key, shape or op at fault."""


class ShapeError(MinitxError):
    """Inputs of an op do not fit together."""
