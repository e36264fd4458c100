"""The engine's one thread budget (issue #20).

numba's pool and OpenBLAS's pool each default to every core. OpenBLAS's threaded GEMM hands each
call to its worker threads and waits for all of them; when another process holds a core, a worker
is not scheduled and every small call waits for it (and the waiting threads spin meanwhile). Measured in one process
on the 2-core machine beside one competing busy process, pool sizes alternating: prefill of the
bundled model at batch 1 took 159 ms with 2 BLAS threads and 16 ms with 1 (numba's pool at 1 or
2 threads made no difference: its idle workers sleep, ``OMP_WAIT_POLICY=PASSIVE``), and a 2-thread
GEMM ran at 0.01–0.7x its 1-thread speed at every shape below about 2^28 multiply-adds. The
end-to-end comparison, with PyTorch beside it, is benchmarks/results/busy_cpu.md.

So the budget goes to numba's pool for good, and to BLAS only around a call big enough to share
(:func:`blas`, at least ``BLAS_PARALLEL_MIN`` multiply-adds); outside such a call BLAS runs on one
thread. The two pools are never hot at once: a BLAS call and a numba kernel never overlap (one
Python thread issues both) and each pool's idle threads sleep. This module is the only place that
sets either pool's size.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Any, Callable, Iterator

from .errors import MinitxError

# From here on (multiply-adds of one BLAS call) OpenBLAS gets the whole budget. Below it, its
# threads cost more than they gain under load (GEMMs of 0.3G multiply-adds ran at 0.45-0.85x with
# 2 threads beside one busy process, 0.6G and up at 1.0-1.7x; on a quiet machine 2 threads win
# from far smaller sizes, a measurement this shared machine could not give).
BLAS_PARALLEL_MIN = 1 << 28
CGROUP_V2 = "/sys/fs/cgroup/cpu.max"
CGROUP_V1 = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")

_budget: int | None = None
_blas_libs: list[Any] | None = None
_blas_now: int | None = None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def quota_cores(v2: str | None = CGROUP_V2, v1: tuple[str, str] | None = CGROUP_V1) -> int | None:
    """Cores the cgroup CPU quota allows (rounded up), or None when no quota is set.

    Why: a container limited to 1.5 CPUs still sees every core in its affinity mask; two threads
    there are throttled for part of every period instead of running side by side.
    """
    text = _read(v2) if v2 else None
    if text:
        quota, _, period = text.partition(" ")
        if quota != "max":
            try:
                return max(1, math.ceil(int(quota) / int(period or 100000)))
            except ValueError:
                return None
        return None
    if v1:
        quota, period = (_read(p) for p in v1)
        try:
            if quota is not None and int(quota) > 0 and period:
                return max(1, math.ceil(int(quota) / int(period)))
        except ValueError:
            return None
    return None


def available_cores() -> int:
    """Cores this process may use: its affinity mask, capped by the cgroup quota where one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    q = quota_cores()
    return max(1, min(n, q) if q else n)


def _blas_controllers() -> list[Any]:
    """threadpoolctl's controllers of every BLAS loaded now (numpy's, and scipy's when loaded)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # without threadpoolctl BLAS keeps its own thread count
        return []
    return list(ThreadpoolController().select(user_api="blas").lib_controllers)


def _set_blas(n: int) -> None:
    global _blas_now
    if n != _blas_now:
        for lib in _blas_libs or ():
            lib.set_num_threads(n)
        _blas_now = n


def _set_numba(n: int) -> None:
    """numba's pool takes the budget, capped at the threads it was started with (NUMBA_NUM_THREADS).
    Only when numba is already imported: importing it here would cost every command a second."""
    numba = sys.modules.get("numba")
    if numba is not None and hasattr(numba, "set_num_threads"):
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


def configure(threads: int | None = None) -> int:
    """Set the budget (None or 0: every available core) and return it. Commands that compute call
    this once, from their ``--threads`` flag, before any kernel runs; BLAS goes to one thread and
    numba's pool to the budget."""
    global _budget, _blas_libs, _blas_now
    if threads is not None and int(threads) < 0:
        raise MinitxError(f"--threads must be >= 0 (0: every available core), got {threads}")
    _budget = int(threads) if threads else available_cores()
    _blas_libs, _blas_now = _blas_controllers(), None
    _set_blas(1)
    _set_numba(_budget)
    return _budget


def budget() -> int:
    """The current budget (configuring the default on first use)."""
    return _budget if _budget is not None else configure(None)


def attach_numba() -> int:
    """Give numba's pool the budget; the numba backend calls this when it loads (numba may be
    imported after :func:`configure` ran)."""
    global _blas_libs, _blas_now
    n = budget()
    _blas_libs, _blas_now = _blas_controllers(), None  # numba loads scipy's BLAS too
    _set_blas(1)
    _set_numba(n)
    return n


@contextlib.contextmanager
def blas(work: int) -> Iterator[None]:
    """Run the BLAS call inside on the whole budget if it has at least ``BLAS_PARALLEL_MIN``
    multiply-adds, else on one thread; back to one thread afterwards."""
    n = budget()
    if n > 1 and work >= BLAS_PARALLEL_MIN:
        _set_blas(n)
        try:
            yield
        finally:
            _set_blas(1)
    else:
        _set_blas(1)
        yield


def _blas_work(op: str, args: tuple, kw: dict) -> int:
    """Multiply-adds of a BLAS-backed op's call (``linear``: x (…, K) · W (K, N); ``matmul``:
    a (…, K) · b (…, K, N), or b (…, N, K) transposed)."""
    a, b = args[0], args[1]
    if op == "matmul":
        return a.size * b.shape[-2 if kw.get("transpose_b") else -1]
    return a.size * b.shape[-1]


def _sized(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kw: Any) -> Any:
        with blas(_blas_work(op, args, kw)):
            return fn(*args, **kw)

    run.__wrapped__ = fn  # type: ignore[attr-defined]
    return run


def _sized_vjp(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A VJP's products are the size of its forward's (``linear``: gx = g Wᵀ and gW = xᵀ g)."""
    def run(grads: Any, inputs: Any, outputs: Any, **kw: Any) -> Any:
        with blas(_blas_work(op, tuple(inputs), kw)):
            return fn(grads, inputs, outputs, **kw)

    run.__wrapped__ = fn  # type: ignore[attr-defined]
    return run


BLAS_OPS = ("linear", "matmul")  # the ops whose kernels are BLAS calls on large inputs


def size_blas(backend: Any) -> None:
    """Wrap a host backend's BLAS-backed kernels and VJPs (``backend.kernels`` / ``.vjps``, its
    own dicts) in :func:`blas`, so that each call gets the budget only when it is big enough.
    A kernel marked ``sizes_blas = True`` sizes BLAS itself (numba's ``linear`` splits big calls
    over its own threads, each calling BLAS on one) and is left as it is."""
    for op in BLAS_OPS:
        if op in backend.kernels and not getattr(backend.kernels[op], "sizes_blas", False):
            backend.kernels[op] = _sized(op, backend.kernels[op])
        if backend.vjps.get(op) is not None and not getattr(backend.vjps[op], "sizes_blas", False):
            backend.vjps[op] = _sized_vjp(op, backend.vjps[op])
