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
import pkgutil
from typing import Any, Callable

from minitx import memory, ops, threads
from minitx.backend import Backend

CORE = ("norms", "activations", "attention", "linalg", "positions")


def _submodules() -> list[str]:
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return list(CORE) + [m for m in found if m not in CORE]


class NumbaBackend(Backend):
    name = "numba"
    device = "cpu"
    dtypes = frozenset({"float32", "float64"})
    # One memory pass (add, concat, scale), gathers (embedding, sinusoidal_positions,
    # relative_position_bias — the last two once per stack), views (split) and small copies
    # (last_positions): the spec's NumPy code is already what a kernel would do, so these run it here.
    delegate = frozenset({"add", "concat", "embedding", "last_positions", "relative_position_bias", "scale",
                          "sinusoidal_positions", "split"})

    def __init__(self) -> None:
        super().__init__()
        import numba  # noqa: F401 — fails here, cleanly, when numba is not installed

        self.version = numba.__version__
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
        for op in self.delegate:
            self.kernels[op], self.vjps[op] = ops.get(op).forward, ops.get(op).vjp
        # The engine's budget (minitx/threads.py): numba's pool takes it, and every BLAS loaded by
        # now (numba's np.dot loads scipy's, which the attention kernels call) goes to one thread.
        threads.attach_numba()
        self.threads = numba.get_num_threads()
        threads.size_blas(self)  # BLAS gets the budget only around calls big enough to share it
        memory.retain_freed()  # large intermediates reuse freed pages instead of faulting in new ones
        if not self.kernels:
            raise RuntimeError("no numba kernel module could be loaded: " + "; ".join(
                f"{k}: {v}" for k, v in self.problems.items()))


def remedy(error: BaseException) -> str | None:
    """What to do when :func:`backend` failed with ``error`` (asked by minitx's registry)."""
    if isinstance(error, ImportError) and (error.name or "").partition(".")[0] in ("numba", "llvmlite"):
        return "install the cpu extra: pip install 'minitx[cpu]'"
    return None


def backend() -> NumbaBackend:
    """Entry point ``minitx.backends: numba``."""
    return NumbaBackend()
