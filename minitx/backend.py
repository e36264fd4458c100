"""What a backend is, and how backends are found.

A backend is an object with a name, a device, the dtypes it computes in, and two tables keyed by
op name: ``kernels`` (forward, same signature as the spec's forward) and ``vjps`` (same signature
as the spec's VJP). It implements any subset of the spec's ops; the executor runs every other
node on the spec, moving arrays with ``asarray``/``to_numpy``. That is the whole contract —
see docs/backends.md.

Backends are discovered from the entry-point group ``minitx.backends``. An entry point names a
zero-argument factory returning a :class:`Backend`; the factory is only called when the backend
is first used, and a factory that fails (a missing library, no GPU) is recorded with its reason
and the remedy its package suggests, so that the other backends keep working
(:mod:`minitx.registry`, shared with the plugins).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from . import ops
from .errors import MinitxError
from .registry import Entry, Registry

GROUP = "minitx.backends"
# The backends minitx ships, as pyproject.toml declares them (used when not pip-installed).
BUILTIN = {"numba": "minitx.backends.numba_cpu:backend", "cupy": "minitx.backends.cupy_gpu:backend",
           "onnxruntime": "minitx.backends.onnxruntime:backend"}


class Backend:
    """Base class; subclasses fill in ``kernels``/``vjps`` and, off the host, the transfers."""

    name: str = "unnamed"
    device: str = "cpu"
    version: str = ""
    dtypes: frozenset[str] = frozenset({"float16", "float32", "float64"})
    # Ops run with the spec's own forward and VJP (listed in kernels/vjps so they are placed here),
    # which are not this backend's kernels: conformance neither counts nor tests them.
    delegate: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.kernels: dict[str, Callable[..., Any]] = {}
        self.vjps: dict[str, Callable[..., tuple]] = {}

    def asarray(self, a: np.ndarray) -> Any:
        """Host NumPy array → this backend's array type (identity on the host)."""
        return a

    def to_numpy(self, a: Any) -> np.ndarray:
        """This backend's array → host NumPy array."""
        return np.asarray(a)

    def owns(self, a: Any) -> bool:
        """Whether ``a`` is an array in this backend's device memory (a CuPy array for the GPU
        backend). Host backends own nothing: NumPy arrays belong to the host. The executor asks
        this of arrays fed to a graph, so device arrays a previous run returned (a KV cache) are
        used where they lie instead of being copied through the host."""
        return False

    def supports(self, op: str, dtype: str) -> bool:
        """Whether this backend runs the forward of ``op`` when it computes in ``dtype``."""
        return op in self.kernels and dtype in self.dtypes

    def synchronize(self) -> None:
        """Wait for queued work (asynchronous devices); timing code calls this."""

    def check(self) -> None:
        """Raise MinitxError if a kernel names an op the spec does not have (no op without a spec)."""
        for op in list(self.kernels) + list(self.vjps):
            if op not in ops.OPS:
                raise MinitxError(f"backend {self.name}: kernel for {op!r}, which has no spec")


class SpecBackend(Backend):
    """The NumPy spec itself, as a backend: every op, forward and VJP, on the host."""

    name = "numpy"
    device = "cpu"
    dtypes = frozenset({"float16", "float32", "float64"})

    def __init__(self) -> None:
        super().__init__()
        self.version = np.__version__
        self.kernels = {name: spec.forward for name, spec in ops.OPS.items()}
        self.vjps = {name: spec.vjp for name, spec in ops.OPS.items()}
        from . import threads

        threads.size_blas(self)   # BLAS gets the thread budget only around calls big enough to share it


def _make(factory: Any) -> Backend:
    b = factory()
    if not isinstance(b, Backend):
        raise TypeError(f"factory returned {type(b).__name__}, not a minitx Backend")
    b.check()
    return b


REGISTRY: Registry[Backend] = Registry(GROUP, "backend", _make, {"numpy": SpecBackend, **BUILTIN})


def entries() -> dict[str, Entry[Backend]]:
    """All backends declared in the ``minitx.backends`` entry-point group (nothing imported yet)."""
    return REGISTRY.entries()


def register(name: str, factory: Callable[[], Backend]) -> None:
    """Register a backend in-process (tests, notebooks); installed packages use the entry point.
    A name already taken (``numpy``, ``numba``, …) is an error."""
    REGISTRY.register(name, factory)


def get_backend(name: str | Backend) -> Backend:
    """The named backend, loaded on first use; an unavailable one is an error naming the reason
    and the backend's own remedy."""
    if isinstance(name, Backend):
        return name
    return REGISTRY.get(name)


def describe(name: str) -> dict[str, Any]:
    """What ``minitx backends`` prints for one backend: loads it (fault-isolated) and reports.

    Unavailable backends carry ``reason`` (the import/initialisation error) and ``remedy``.
    """
    entry = entries()[name]
    b = REGISTRY.load(entry)
    info: dict[str, Any] = {"name": name, "entry_point": entry.target, "distribution": entry.dist,
                            "available": b is not None}
    if b is None:
        info.update(reason=entry.error or "unknown error",
                    remedy=entry.remedy or f"reinstall or fix the package providing {entry.target}")
        return info
    info.update(device=b.device, version=b.version, dtypes=sorted(b.dtypes),
                forward=sorted(b.kernels), vjp=sorted(b.vjps))
    return info


def spec_backend() -> Backend:
    return get_backend("numpy")


def owner(a: Any, prefer: Sequence[Backend] = ()) -> Backend | None:
    """The backend whose device memory holds ``a`` (asking ``prefer`` first, then every loaded
    backend), or None for a host array or anything no backend claims."""
    if isinstance(a, np.ndarray):
        return None
    for b in (*prefer, *REGISTRY.loaded()):
        if b.owns(a):
            return b
    return None


def to_host(a: Any) -> np.ndarray:
    """``a`` as a host NumPy array, copied from the device that holds it if any: the explicit
    transfer for code that reads results a run left on a device (decode state, caches)."""
    b = owner(a)
    return np.asarray(a) if b is None else b.to_numpy(a)
