"""The CuPy GPU backend: weights resident on the GPU, cuBLAS matmuls, fused CUDA kernels.

UNTESTED ON HARDWARE so far: written and reviewed without a GPU (see docs/backends.md);
``tests/test_backend_cupy.py`` and ``benchmarks/gpu_session.sh`` are what a machine with one
runs first. Importing this module never touches the GPU; :func:`backend` does, and fails cleanly
— "cupy not installed" or "no CUDA device" — so ``minitx backends`` lists it as unavailable and
everything else works.

Submodules mirror the spec's modules (``norms``, ``activations``, ``linalg``, ``attention``,
``positions``, ``quant``, and for encoder–decoders ``cross_attention``, ``relpos``, ``gated``,
``losses`` (scale), ``collectives`` (concat), for minitx/ops/X.py) and export ``KERNELS`` (and
``VJPS``) like the numba backend's; ``kvcache`` and ``_buckets`` are helpers (the in-place device
KV cache, T5's bucket table); the CUDA sources (``rows.cu``, ``quant.cu``, ``cross_attention.cu``)
are shared. Each is imported on its own, so one that
fails (a CUDA compile error shows up at first call, an import error here) is reported in
``backend().problems`` and the others still load. Every kernel runs behind a guard that turns
CuPy's out-of-memory error into a one-line MinitxError naming the op.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

import numpy as np

from minitx.backend import Backend
from minitx.errors import MinitxError

# One module per spec module (minitx/ops/X.py -> X.py); kvcache.py is a helper.
MODULES = ("norms", "activations", "linalg", "attention", "positions", "quant", "cross_attention", "relpos", "gated",
           "losses", "collectives")


class NoCupy(ImportError):
    """CuPy is not installed."""


class NoDevice(RuntimeError):
    """CuPy is installed but no usable NVIDIA GPU/driver answers."""


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as e:
        raise NoCupy(f"cupy not installed ({e})") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 — CUDARuntimeError, driver missing, …
        raise NoDevice(f"no CUDA device: {e}") from None
    if n == 0:
        raise NoDevice("no CUDA device: the driver reports 0 GPUs")
    return cupy


def remedy(error: BaseException) -> str | None:
    """What to do when :func:`backend` failed with ``error`` (asked by minitx's registry)."""
    if isinstance(error, NoCupy):
        return "install the gpu extra (pip install 'minitx[gpu]') on a machine with an NVIDIA GPU"
    if isinstance(error, NoDevice):
        return "no usable NVIDIA GPU/driver was found; use --backend numba or numpy on this machine"
    return None


def out_of_memory(e: Exception, what: str, nbytes: int | None = None) -> MinitxError:
    size = f" ({nbytes / 2**20:.1f} MiB)" if nbytes is not None else ""
    return MinitxError(f"GPU out of memory while {what}{size}: {str(e).splitlines()[0] if str(e) else e!r}; "
                       f"use a smaller batch or context, float16 or quantized weights, or --backend numba")


def _guarded(op: str, f: Callable[..., Any], oom: type) -> Callable[..., Any]:
    @functools.wraps(f)
    def run(*args: Any, **attrs: Any) -> Any:
        try:
            return f(*args, **attrs)
        except oom as e:
            shapes = ", ".join(str(tuple(a.shape)) for a in args if hasattr(a, "shape"))
            raise out_of_memory(e, f"running op {op} on inputs {shapes}") from None
    return run


class CupyBackend(Backend):
    name = "cupy"
    device = "cuda"
    # bfloat16 has no NumPy dtype for the host side of transfers; float16 and float32 do.
    dtypes = frozenset({"float16", "float32"})

    def __init__(self) -> None:
        super().__init__()
        cp = _cupy()
        self.cp = cp
        dev = cp.cuda.Device()
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        self.device = f"cuda:{dev.id} ({name})"
        self.version = cp.__version__
        self.problems: dict[str, str] = {}
        self._oom = cp.cuda.memory.OutOfMemoryError
        for mod in MODULES:
            try:
                m = importlib.import_module(f"{__name__}.{mod}")
            except Exception as e:  # noqa: BLE001 — one broken module must not hide the others
                self.problems[mod] = f"{type(e).__name__}: {e}"
                continue
            self.kernels.update({op: _guarded(op, f, self._oom) for op, f in getattr(m, "KERNELS", {}).items()})
            self.vjps.update({op: _guarded(op, f, self._oom) for op, f in getattr(m, "VJPS", {}).items()})
        if not self.kernels:
            raise RuntimeError("no cupy kernel module could be loaded: " + "; ".join(
                f"{k}: {v}" for k, v in self.problems.items()))

    def asarray(self, a: np.ndarray) -> Any:
        try:
            return self.cp.asarray(a)
        except self._oom as e:
            raise out_of_memory(e, f"copying an array of shape {tuple(a.shape)} to the GPU", a.nbytes) from None

    def to_numpy(self, a: Any) -> np.ndarray:
        return self.cp.asnumpy(a) if isinstance(a, self.cp.ndarray) else np.asarray(a)

    def owns(self, a: Any) -> bool:
        """CuPy arrays are ours: fed back (the KV cache between decode steps) they stay on the GPU."""
        return isinstance(a, self.cp.ndarray)

    def synchronize(self) -> None:
        self.cp.cuda.get_current_stream().synchronize()


def backend() -> CupyBackend:
    """Entry point ``minitx.backends: cupy``."""
    return CupyBackend()
