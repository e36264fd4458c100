"""The CuPy backend's growable KV caches: :mod:`minitx.kvcache` over device arrays.

Decoding feeds a cache view back as the next step's ``past`` (the executor leaves the caches on
the device, ``run(device_outputs=…)``); ``append`` then writes the new keys into the buffer's spare
room with one small copy kernel on the current stream, ordered after every earlier read.
``storage`` gives the attention kernel the buffer behind a view; its ``shape[1]`` is the row stride.
UNTESTED ON HARDWARE so far; the shared logic is tested on NumPy (tests/test_kvcache.py).
"""
from __future__ import annotations

import cupy as cp

from minitx.kvcache import MIN_SPARE, Caches

CACHES = Caches(cp, lambda a: int(a.data.ptr))
append = CACHES.append
storage = CACHES.storage

__all__ = ["MIN_SPARE", "append", "storage"]
