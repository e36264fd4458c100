"""Growable key/value caches behind the attention op's concatenation semantics.

The spec returns ``present = concat(past, new)``: each decode step copies the whole cache, so
generating N tokens moves O(N²) bytes. Here ``present`` is a *view* of a larger buffer with spare
room at the end. When the next step's ``past`` is exactly that view and nobody has appended after
it yet, the new keys are written into the spare room and the longer view is returned — no copy.
In every other case (a fresh past, a branch that reuses an older past, a full buffer) we copy
into a new buffer, so the result is always equal to the spec's concatenation.

Views handed out earlier are never overwritten: a buffer only grows past its current fill mark,
and every view ends at or before it.
"""
from __future__ import annotations

import threading
import weakref

import numpy as np

_lock = threading.RLock()  # re-entrant: a weakref callback may fire while we hold it
# id(buffer) -> (weak reference to the buffer, filled length along axis 1)
_buffers: dict[int, tuple[weakref.ref, int]] = {}
MIN_SPARE = 64  # a new buffer has room for max(64, its length) more positions: amortised O(1)


def _owner(past: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The buffer ``past`` is the filled prefix of, if any."""
    base = past.base
    while base is not None:
        rec = _buffers.get(id(base))
        if rec is not None:
            buf = rec[0]()
            if buf is base:
                if (past.ndim == 3 and buf.ndim == 3 and past.shape[0] == buf.shape[0]
                        and past.shape[2] == buf.shape[2] and past.dtype == buf.dtype
                        and past.strides == buf.strides
                        and past.__array_interface__["data"][0] == buf.__array_interface__["data"][0]
                        and past.shape[1] == rec[1]):
                    return buf, rec[1]
            return None
        base = base.base
    return None


def _forget(key: int) -> None:
    with _lock:
        _buffers.pop(key, None)


def append(past: np.ndarray | None, new: np.ndarray) -> np.ndarray:
    """concat(past, new) along axis 1, appending in place when ``past`` is a cache we handed out."""
    T = new.shape[1]
    if past is None or past.shape[1] == 0:
        if T == 0:
            return new
        past = new[:, :0]
    S = past.shape[1]
    with _lock:
        own = _owner(past)
        if own is not None and own[0].shape[1] >= S + T:
            buf = own[0]
            buf[:, S:S + T] = new
            _buffers[id(buf)] = (_buffers[id(buf)][0], S + T)
            return buf[:, :S + T]
    cap = S + T + max(MIN_SPARE, S + T)
    buf = np.empty((new.shape[0], cap, new.shape[2]), new.dtype)
    buf[:, :S] = past
    buf[:, S:S + T] = new
    key = id(buf)
    ref = weakref.ref(buf, lambda _r, key=key: _forget(key))
    with _lock:
        _buffers[key] = (ref, S + T)
    return buf[:, :S + T]


def storage(a: np.ndarray) -> np.ndarray:
    """A C-contiguous array whose [:, :a.shape[1]] is ``a``: the cache buffer itself when ``a`` is
    its filled prefix (a strided view), else a contiguous copy.

    Kernels take the buffer plus the length: numba compiles strided ('A' layout) arguments into
    slower loops that do not vectorise, and copying the cache each step would undo the in-place
    append.
    """
    if a.flags.c_contiguous:
        return a
    base = a.base
    if (isinstance(base, np.ndarray) and base.flags.c_contiguous and base.ndim == 3 and a.ndim == 3
            and base.strides == a.strides and base.dtype == a.dtype
            and a.__array_interface__["data"][0] == base.__array_interface__["data"][0]
            and base.shape[0] == a.shape[0] and base.shape[2] == a.shape[2]):
        return base
    return np.ascontiguousarray(a)
