"""The numba CPU backend: multithreaded, fused kernels for the hot ops; BLAS for matmuls.

Each submodule exports ``KERNELS`` (op → forward, the spec's signature) and optionally ``VJPS``
(op → VJP); :func:`backend` merges them. Every public module of this package is imported, one by
one and fault-tolerantly, so kernels for plugin ops (``quant.py``, ``sparse.py``, maintained by
the plugins' authors) are picked up just by being here; a module that fails to import is
reported in ``backend().problems`` instead of taking the whole backend down. Modules without
``KERNELS`` are helpers (``kvcache``). Ops not listed run on the NumPy spec, per node.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from typing import Any, Callable

# Idle OpenMP workers that spin (libgomp's default) steal the cores from the next kernel and from
# BLAS; on a shared 2-core VM we measured 50x slowdowns (benchmarks/results/decode_cpu.md).
# Must be set before numba starts its thread pool; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from minitx import threads
from minitx.backend import Backend

CORE = ("norms", "activations", "attention", "linalg", "positions")


def _blas_work(op: str, args: tuple, kw: dict) -> int:
    """Multiply-adds of a BLAS-backed kernel's call (``linear``: x (…, K) · W (K, N); ``matmul``:
    a (…, K) · b (…, K, N), or b (…, N, K) transposed)."""
    a, b = args[0], args[1]
    if op == "matmul":
        return a.size * b.shape[-2 if kw.get("transpose_b") else -1]
    return a.size * b.shape[-1]


def _sized(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with BLAS given the thread budget only for calls big enough to share (threads.blas)."""
    def run(*args: Any, **kw: Any) -> Any:
        with threads.blas(_blas_work(op, args, kw)):
            return fn(*args, **kw)

    run.__wrapped__ = fn  # type: ignore[attr-defined]
    return run


def _sized_vjp(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``linear``'s VJP: two products of the forward's size (gx = g Wᵀ, gW = xᵀ g)."""
    def run(grads: Any, inputs: Any, outputs: Any, **kw: Any) -> Any:
        with threads.blas(_blas_work("linear", (inputs[0], inputs[1]), kw)):
            return fn(grads, inputs, outputs, **kw)

    run.__wrapped__ = fn  # type: ignore[attr-defined]
    return run


def _submodules() -> list[str]:
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return list(CORE) + [m for m in found if m not in CORE]


class NumbaBackend(Backend):
    name = "numba"
    device = "cpu"
    dtypes = frozenset({"float32", "float64"})

    def __init__(self) -> None:
        super().__init__()
        import numba  # noqa: F401 — fails here, cleanly, when numba is not installed

        self.version = numba.__version__
        threads.attach_numba()
        self.threads = numba.get_num_threads()
        self.problems: dict[str, str] = {}
        for mod in _submodules():
            try:
                m = importlib.import_module(f"{__name__}.{mod}")
            except Exception as e:  # noqa: BLE001 — one broken module must not hide the others
                self.problems[mod] = f"{type(e).__name__}: {e}"
                continue
            kernels: dict[str, Callable[..., Any]] = getattr(m, "KERNELS", {})
            vjps: dict[str, Callable[..., Any]] = getattr(m, "VJPS", {})
            self.kernels.update(kernels)
            self.vjps.update(vjps)
        for op in ("linear", "matmul"):  # the kernels that call BLAS on large inputs
            if op in self.kernels:
                self.kernels[op] = _sized(op, self.kernels[op])
        if "linear" in self.vjps:
            self.vjps["linear"] = _sized_vjp(self.vjps["linear"])
        if not self.kernels:
            raise RuntimeError("no numba kernel module could be loaded: " + "; ".join(
                f"{k}: {v}" for k, v in self.problems.items()))


def backend() -> NumbaBackend:
    """Entry point ``minitx.backends: numba``."""
    return NumbaBackend()
