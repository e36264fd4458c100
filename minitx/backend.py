"""What a backend is, and how backends are found.

A backend is an object with a name, a device, the dtypes it computes in, and two tables keyed by
op name: ``kernels`` (forward, same signature as the spec's forward) and ``vjps`` (same signature
as the spec's VJP). It implements any subset of the spec's ops; the executor runs every other
node on the spec, moving arrays with ``asarray``/``to_numpy``. That is the whole contract —
see docs/backends.md.

Backends are discovered from the entry-point group ``minitx.backends``. An entry point names a
zero-argument factory returning a :class:`Backend`; the factory is only called when the backend
is first used, and a factory that fails (a missing library, no GPU) is recorded with its reason
so that the other backends keep working (the JAX PJRT plugin pattern).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Sequence

import numpy as np

from . import ops
from .errors import MinitxError

GROUP = "minitx.backends"
# The backends minitx ships, as pyproject.toml declares them (used when not pip-installed).
BUILTIN = {"numba": "minitx.backends.numba_cpu:backend", "cupy": "minitx.backends.cupy_gpu:backend", "onnxruntime": "minitx.backends.onnxruntime:backend"}


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


@dataclass
class Entry:
    """One discovered backend: loaded lazily, failure remembered with its reason."""

    name: str
    target: str
    dist: str = ""
    factory: Callable[[], Backend] | None = None
    backend: Backend | None = None
    error: str | None = None
    loaded: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def load(self) -> Backend | None:
        with self.lock:
            if not self.loaded:
                self.loaded = True
                try:
                    factory = self.factory or _load_entry_point(self.target)
                    b = factory()
                    if not isinstance(b, Backend):
                        raise TypeError(f"factory returned {type(b).__name__}, not a minitx Backend")
                    b.check()
                    self.backend = b
                except Exception as e:  # noqa: BLE001 — fault isolation is the point
                    self.error = f"{type(e).__name__}: {e}".strip()
            return self.backend


def _load_entry_point(target: str) -> Callable[[], Backend]:
    mod, _, attr = target.partition(":")
    import importlib

    obj: Any = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


_entries: dict[str, Entry] | None = None
_discover_lock = threading.Lock()


def entries() -> dict[str, Entry]:
    """All backends declared in the ``minitx.backends`` entry-point group (nothing imported yet)."""
    global _entries
    with _discover_lock:
        if _entries is None:
            found: dict[str, Entry] = {}
            for ep in metadata.entry_points(group=GROUP):
                dist = getattr(getattr(ep, "dist", None), "name", "") or ""
                found.setdefault(ep.name, Entry(ep.name, ep.value, dist))
            # Our own backends are always there, even when running from a checkout that was never
            # installed (and so has no entry points); the spec needs no import at all.
            found.setdefault("numpy", Entry("numpy", "minitx.backend:SpecBackend", "minitx", factory=SpecBackend))
            for name, target in BUILTIN.items():
                found.setdefault(name, Entry(name, target, "minitx"))
            _entries = found
        return _entries


def register(name: str, factory: Callable[[], Backend]) -> None:
    """Register a backend in-process (tests, notebooks); installed packages use the entry point."""
    entries()[name] = Entry(name, f"<registered {name}>", factory=factory)


def get_backend(name: str | Backend) -> Backend:
    """The named backend, loaded on first use; an unavailable one is an error naming the reason."""
    if isinstance(name, Backend):
        return name
    table = entries()
    if name not in table:
        raise MinitxError(f"unknown backend {name!r}; available: {', '.join(sorted(table))} "
                          f"(a third-party backend registers in the entry-point group {GROUP!r})")
    entry = table[name]
    b = entry.load()
    if b is None:
        raise MinitxError(f"backend {name!r} is unavailable: {entry.error}{_remedy(name, entry.error or '')}")
    return b


def describe(name: str) -> dict[str, Any]:
    """What ``minitx backends`` prints for one backend: loads it (fault-isolated) and reports.

    Unavailable backends carry ``reason`` (the import/initialisation error) and ``remedy``.
    """
    entry = entries()[name]
    b = entry.load()
    info: dict[str, Any] = {"name": name, "entry_point": entry.target, "distribution": entry.dist,
                            "available": b is not None}
    if b is None:
        err = entry.error or "unknown error"
        info.update(reason=err, remedy=_remedy(name, err).lstrip(" —") or
                    f"reinstall or fix the package providing {entry.target}")
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
    loaded = [e.backend for e in list(entries().values()) if e.backend is not None]
    for b in (*prefer, *loaded):
        if b.owns(a):
            return b
    return None


def to_host(a: Any) -> np.ndarray:
    """``a`` as a host NumPy array, copied from the device that holds it if any: the explicit
    transfer for code that reads results a run left on a device (decode state, caches)."""
    b = owner(a)
    return np.asarray(a) if b is None else b.to_numpy(a)


def _remedy(name: str, error: str) -> str:
    if "no CUDA device" in error or "CUDA driver" in error:
        return " — no usable NVIDIA GPU/driver was found; use --backend numba or numpy on this machine"
    if "numba" in error:
        return " — install the cpu extra: pip install 'minitx[cpu]'"
    if "cupy" in error.lower():
        return " — install the gpu extra (pip install 'minitx[gpu]') on a machine with an NVIDIA GPU"
    if "CUDA" in error or "cuda" in error:
        return " — no usable NVIDIA GPU/driver was found"
    return ""
