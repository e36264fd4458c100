"""The numba backend's growable KV caches: :mod:`minitx.kvcache` over NumPy arrays.

``append`` grows a decode cache in place; ``storage`` gives kernels the C-contiguous buffer behind
a cache view (they take it plus the used length: numba compiles strided arguments into loops that
do not vectorise, and copying the cache each step would undo the in-place append).
"""
from __future__ import annotations

import numpy as np

from minitx.kvcache import MIN_SPARE, Caches

CACHES = Caches(np, lambda a: a.__array_interface__["data"][0])
append = CACHES.append
storage = CACHES.storage

__all__ = ["MIN_SPARE", "append", "storage"]
