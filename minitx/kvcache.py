"""Growable key/value caches behind the attention op's concatenation semantics, for any backend.

The spec returns ``present = concat(past, new)``: each decode step copies the whole cache, so
generating N tokens moves O(N²) bytes. A backend can instead return ``present`` as a *view* of a
larger buffer with spare room at the end. When the next step's ``past`` is exactly that view and
nobody has appended after it yet, the new keys are written into the spare room and the longer view
is returned — no copy. In every other case (a fresh past, a branch that reuses an older past, a
full buffer, another dtype) we copy into a new buffer, so the result always equals the spec's
concatenation. Views handed out earlier are never overwritten: a buffer only grows past its fill
mark, and every view ends at or before it.

One implementation for every array library (NumPy on the numba backend, CuPy on the GPU one):
:class:`Caches` takes the array module and how to read an array's data address, so the logic a
GPU cannot exercise in CI is the logic the CPU tests run.
"""
from __future__ import annotations

import threading
import weakref
from types import ModuleType
from typing import Any, Callable

MIN_SPARE = 64  # a new buffer has room for max(64, its length) more positions: amortised O(1)


class Caches:
    """The buffers one backend handed out, keyed by id and held weakly (a dropped cache is forgotten)."""

    def __init__(self, xp: ModuleType, address: Callable[[Any], int]) -> None:
        self.xp = xp
        self.address = address
        self._lock = threading.RLock()  # re-entrant: a weakref callback may fire while we hold it
        self._buffers: dict[int, tuple[weakref.ref, int]] = {}  # id(buffer) -> (ref, filled length)

    def _prefix_of(self, a: Any, buf: Any) -> bool:
        """``a`` starts where ``buf`` starts and walks it with the same strides (a prefix along axis 1)."""
        return (a.ndim == 3 and buf.ndim == 3 and a.shape[0] == buf.shape[0] and a.shape[2] == buf.shape[2]
                and a.dtype == buf.dtype and tuple(a.strides) == tuple(buf.strides)
                and self.address(a) == self.address(buf))

    def _owner(self, past: Any) -> tuple[Any, int] | None:
        """The buffer ``past`` is the filled prefix of, if any."""
        base = past.base
        while base is not None:
            rec = self._buffers.get(id(base))
            if rec is not None:
                buf = rec[0]()
                if buf is base and self._prefix_of(past, buf) and past.shape[1] == rec[1]:
                    return buf, rec[1]
                return None
            base = base.base
        return None

    def _forget(self, key: int) -> None:
        with self._lock:
            self._buffers.pop(key, None)

    def append(self, past: Any | None, new: Any) -> Any:
        """concat(past, new) along axis 1, appending in place when ``past`` is a cache we handed out."""
        T = new.shape[1]
        if past is None or past.shape[1] == 0:
            if T == 0:
                return new
            past = new[:, :0] if past is None else past
        S = past.shape[1]
        dtype = self.xp.result_type(past.dtype, new.dtype)  # the spec's concatenation promotes
        with self._lock:
            own = self._owner(past) if S else None
            if own is not None and own[0].shape[1] >= S + T and own[0].dtype == dtype:
                buf = own[0]
                buf[:, S:S + T] = new
                self._buffers[id(buf)] = (self._buffers[id(buf)][0], S + T)
                return buf[:, :S + T]
        cap = S + T + max(MIN_SPARE, S + T)
        buf = self.xp.empty((new.shape[0], cap, new.shape[2]), dtype)
        if S:
            buf[:, :S] = past
        buf[:, S:S + T] = new
        key = id(buf)
        try:
            ref = weakref.ref(buf, lambda _r, key=key: self._forget(key))
        except TypeError:  # an array type without weak references: no in-place growth, still correct
            return buf[:, :S + T]
        with self._lock:
            self._buffers[key] = (ref, S + T)
        return buf[:, :S + T]

    def storage(self, a: Any) -> Any:
        """A C-contiguous array whose [:, :a.shape[1]] is ``a``: the cache buffer itself when ``a``
        is its filled prefix (a strided view), else ``a`` or a contiguous copy. Kernels take the
        buffer plus the used length (its ``shape[1]`` is the row stride between batch entries):
        copying the cache each step would undo the in-place append, and numba compiles strided
        arguments into loops that do not vectorise."""
        if a.flags.c_contiguous:
            return a
        base = a.base
        if base is not None and base.flags.c_contiguous and self._prefix_of(a, base):
            return base
        return self.xp.ascontiguousarray(a)
