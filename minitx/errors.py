"""One exception type for every problem a user can cause.

The CLI turns a MinitxError into a single line on stderr and a non-zero exit; anything else is a
bug in minitx and keeps its traceback.
"""
from __future__ import annotations

import os
import stat


class MinitxError(Exception):
    """A user-facing error: the message names the file, key, shape or op at fault."""


class ShapeError(MinitxError):
    """Inputs of an op do not fit together."""


def regular_file(path: str, what: str) -> os.stat_result:
    """Stat ``path`` and refuse anything but a regular file, each case one line naming it: a FIFO
    or device would block a read or never end it, a folder cannot be read as a file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MinitxError(f"{path}: no such {what}") from None
    except OSError as e:
        raise MinitxError(f"{path}: cannot read: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise MinitxError(f"{path}: is a folder, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise MinitxError(f"{path}: is not a regular file (a FIFO, device or socket), not a {what}")
    return st
