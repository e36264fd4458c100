"""The CuPy GPU backend: weights resident on the GPU, cuBLAS matmuls, fused CUDA kernels.

UNTESTED ON HARDWARE so far (written without a GPU; see docs/backends.md). Importing this
module never touches the GPU; :func:`backend` does, and fails cleanly — "cupy not installed" or
"no CUDA device" — so ``minitx backends`` lists it as unavailable and everything else works.

Submodules export ``KERNELS``/``VJPS`` like the numba backend; ``kernels.py`` holds them.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from minitx.backend import Backend
from minitx.errors import MinitxError


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as e:
        raise ImportError(f"cupy not installed ({e})") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 — CUDARuntimeError, driver missing, …
        raise RuntimeError(f"no CUDA device: {e}") from None
    if n == 0:
        raise RuntimeError("no CUDA device: the driver reports 0 GPUs")
    return cupy


def out_of_memory(e: Exception, what: str, nbytes: int) -> MinitxError:
    return MinitxError(f"GPU out of memory while allocating {what} ({nbytes / 2**20:.1f} MiB): {e}; "
                       f"use a smaller batch, float16 weights, or --backend numba")


class CupyBackend(Backend):
    name = "cupy"
    device = "cuda"
    # bfloat16 has no NumPy dtype for the host side of transfers; float16 and float32 do.
    dtypes = frozenset({"float16", "float32"})

    def __init__(self) -> None:
        super().__init__()
        cp = _cupy()
        self.cp = cp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        self.device = f"cuda:{cp.cuda.Device().id} ({name})"
        self.version = cp.__version__
        from . import kernels

        self.kernels = dict(kernels.KERNELS)
        self.vjps = dict(kernels.VJPS)

    def asarray(self, a: np.ndarray) -> Any:
        try:
            return self.cp.asarray(a)
        except self.cp.cuda.memory.OutOfMemoryError as e:
            raise out_of_memory(e, f"an array of shape {a.shape}", a.nbytes) from None

    def to_numpy(self, a: Any) -> np.ndarray:
        return self.cp.asnumpy(a) if isinstance(a, self.cp.ndarray) else np.asarray(a)

    def synchronize(self) -> None:
        self.cp.cuda.get_current_stream().synchronize()


def backend() -> CupyBackend:
    """Entry point ``minitx.backends: cupy``."""
    return CupyBackend()
