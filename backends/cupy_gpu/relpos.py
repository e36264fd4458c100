"""T5's relative position bias on the GPU (spec: minitx/ops/relpos.py). UNTESTED ON HARDWARE so far.

One ElementwiseKernel over the (1 or B, H, T, S) output: distance = key − query position, clamped
to [−R, R], bucket from a table the spec filled (_buckets.py: exact buckets, no float logs on the
device), then the learned scalar of (bucket, head). The output is the size of one layer's scores
and built once per stack, on the device, instead of on the host and copied over.
"""
from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from minitx import ops

from . import _buckets
from ._cuda import contiguous

_relpos = cp.ElementwiseKernel(
    "raw T table, raw int64 lut, raw int64 qpos, int32 has_qpos, int32 H, int32 NQ, int32 S, int32 R", "T y",
    """
    long long s = i % S, t = (i / S) % NQ, b = i / ((long long)S * NQ * H);
    int h = (int)((i / ((long long)S * NQ)) % H);
    long long rel = s - (has_qpos ? qpos[b * NQ + t] : t);
    rel = rel < -R ? -R : (rel > R ? R : rel);
    y = table[lut[rel + R] * H + h];
    """,
    "minitx_relpos")


@functools.lru_cache(maxsize=None)
def _device_lut(bidirectional: bool, num_buckets: int, max_distance: int):
    found = _buckets.lut(bidirectional, num_buckets, max_distance)
    return None if found is None else (cp.asarray(found[0]), found[1])


def relative_position_bias(table, key_mask, query_positions=None, *, bidirectional, num_buckets=32,
                           max_distance=128):
    found = _device_lut(bool(bidirectional), int(num_buckets), int(max_distance))
    if found is None:   # a configuration whose buckets do not saturate: the spec, on the host
        host = [None if a is None else cp.asnumpy(a) for a in (table, key_mask, query_positions)]
        return cp.asarray(ops.get("relative_position_bias").forward(
            *host, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance))
    lut, R = found
    S, H = key_mask.shape[1], table.shape[1]
    if query_positions is None:
        qpos, shape = cp.zeros((1, 1), cp.int64), (1, H, S, S)
    else:
        qpos = contiguous(query_positions, cp.int64)
        shape = (qpos.shape[0], H, qpos.shape[1], S)
    y = cp.empty(shape, table.dtype)
    if y.size:
        _relpos(contiguous(table), lut, qpos, np.int32(query_positions is not None), np.int32(H),
                np.int32(shape[2]), np.int32(S), np.int32(R), y)
    return y


KERNELS = {"relative_position_bias": relative_position_bias}
