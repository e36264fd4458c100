"""T5's relative-position buckets as a lookup table, for the GPU kernel (relpos.py); needs no CuPy,
so that tests/test_backend_cupy_host.py checks it on any machine.

The spec computes a bucket from the key − query distance with float32 logarithms; CUDA's ``logf``
need not round like NumPy's, and one ulp can move a distance into the next bucket. So the device
never computes a bucket: it clamps the distance to [−R, R] and reads ``lut[distance + R]``, a
table the spec's own :func:`minitx.ops.relpos.buckets` filled. Beyond ``max_distance`` every
distance shares the last bucket on its side (the logarithmic part reaches the bucket count and is
capped), so R = ``max_distance`` loses nothing — when ``max_distance`` exceeds the exact range;
:func:`lut` answers None for configurations where it does not (the caller then runs the spec).
"""
from __future__ import annotations

import numpy as np

from minitx.ops.relpos import buckets


def exact_range(bidirectional: bool, num_buckets: int) -> int:
    """Distances below this have a bucket each (the spec's ``exact``)."""
    return (num_buckets // 2 if bidirectional else num_buckets) // 2


def lut(bidirectional: bool, num_buckets: int, max_distance: int) -> tuple[np.ndarray, int] | None:
    """(table of 2R + 1 buckets for distances −R … R, R), or None when distances past R would not
    all share R's bucket (``max_distance`` within the exact range: the log part then shrinks)."""
    if max_distance <= exact_range(bidirectional, num_buckets):
        return None
    R = int(max_distance)
    table = buckets(np.arange(-R, R + 1), bidirectional=bidirectional, num_buckets=num_buckets,
                    max_distance=max_distance)
    return np.ascontiguousarray(table, np.int64), R


def lookup(table: np.ndarray, R: int, relative: np.ndarray) -> np.ndarray:
    """The buckets of ``relative`` distances, as the kernel reads them (clamp, then index)."""
    return table[np.clip(relative, -R, R) + R]
