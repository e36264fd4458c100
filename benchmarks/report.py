"""The last step every benchmark shares: its Markdown report to a file (written whole or not at
all, minitx.outputs.atomic_write) or, without ``--out``, to stdout."""
from __future__ import annotations

import sys

from minitx.outputs import atomic_write


def write(lines: list[str], out: str | None) -> None:
    text = "\n".join(lines) + "\n"
    if out:
        with atomic_write(out) as f:
            f.write(text.encode())
    else:
        sys.stdout.write(text)
