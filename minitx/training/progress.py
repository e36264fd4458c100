"""The progress line every training command shows on stderr."""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class ProgressLine:
    """One status line, rewritten in place on a terminal, printed every ``every`` steps otherwise.

    Called with each step's record (``fit``'s ``progress``); :meth:`message` prints a log line
    above it."""

    def __init__(self, total: int, every: int = 10, stream: TextIO | None = None) -> None:
        self.total, self.every = total, every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, rec: dict[str, Any]) -> None:
        step = int(rec["step"])
        width = 24
        done = int(width * step / self.total)
        bar = "#" * done + "-" * (width - done)
        el = time.perf_counter() - self.t0
        line = (f"[{bar}] {step}/{self.total} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                f"{rec['tokens_per_s']:,.0f} tok/s {el:,.0f}s")
        if "loss_scale" in rec:
            line += f" scale {rec['loss_scale']:g} skipped {rec['skipped_total']}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step == self.total else ""))
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            self.stream.write(line + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()
