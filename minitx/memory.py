"""Keep freed memory in the process for the next call: large NumPy buffers without page faults.

Why: glibc's malloc serves every block above its mmap threshold (128 KiB, rising to at most
32 MiB) with a fresh ``mmap`` and hands it back to the kernel on ``free``. A forward pass makes
its large intermediate arrays anew on every call, so each one page-faults its memory in again and
the kernel zeroes every page first. On MiniLM at 32 × 128 that was most of GELU's time (5.1 ms a
call with the faults, 2.1 without) and a third of the whole forward pass (552 against 342 ms on
the numba backend, quiet Zen 5 host). Raising the mmap and the trim thresholds makes ``free``
keep the pages in malloc's heap, where the next call's arrays find them — what ONNX Runtime's
arena allocator does for its tensors. The cost: after a large batch the process keeps its peak
memory instead of returning it to the system.

Done once, by the backends that want speed (the numba backend on creation); only with glibc, and
never when the user set ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (their choice
stands, as ``OPENBLAS_CORETYPE`` does for BLAS).
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
THRESHOLD = 1 << 30                           # blocks up to 1 GiB come from (and go back to) the heap
_state: bool | None = None


def retain_freed() -> bool:
    """Make glibc's malloc keep freed blocks up to THRESHOLD for reuse; whether it now does."""
    global _state
    if _state is not None:
        return _state
    _state = False
    if not sys.platform.startswith("linux") or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_",
                                                                             "MALLOC_TRIM_THRESHOLD_")):
        return _state
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: another allocator
            return _state
        _state = bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        pass
    return _state
