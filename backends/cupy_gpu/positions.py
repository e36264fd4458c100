"""Position embeddings on the GPU (spec: minitx/ops/positions.py). UNTESTED ON HARDWARE so far.

* ``rope``: one ElementwiseKernel, angles in float64 like the spec, cos/sin rounded to the input's
  dtype like the spec, the rotation in float32.
* ``sinusoidal_positions``: rows gathered from the spec's own table, copied to the device once per
  (length, width, layout, dtype).
"""
from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from minitx.ops.positions import sinusoidal_table

from ._cuda import contiguous

# rope on a contiguous (B, T, H*D) x: element i is row i / HD (one position), head-dim index d.
_rope = cp.ElementwiseKernel(
    "raw T x, raw int64 pos, int32 HD, int32 D, float64 theta", "T y",
    """
    long long row = i / HD;
    int d = (int)(i % HD) % D;
    int hh = D / 2;
    int j = d < hh ? d : d - hh;
    double ang = (double)pos[row] * pow(theta, -(2.0 * j) / D);
    float c = (float)(T)(float)cos(ang), s = (float)(T)(float)sin(ang);
    float v = (float)x[i];
    y = d < hh ? (T)(v * c - (float)x[i + hh] * s) : (T)(v * c + (float)x[i - hh] * s);
    """,
    "minitx_rope")


def rope(x, positions, *, n_heads, theta=10000.0):
    B, T, HD = x.shape
    y = cp.empty((B, T, HD), x.dtype)
    if y.size:
        _rope(contiguous(x), contiguous(positions, cp.int64), np.int32(HD), np.int32(HD // n_heads),
              np.float64(theta), y)
    return y


@functools.lru_cache(maxsize=None)
def _table(max_len: int, dim: int, halves: bool, dtype: str):
    return cp.asarray(sinusoidal_table(max_len, dim, halves).astype(dtype))


def sinusoidal_positions(positions, *, dim, max_len, dtype="float32", halves=False):
    return cp.take(_table(int(max_len), int(dim), bool(halves), str(np.dtype(dtype))), cp.asarray(positions), axis=0)


KERNELS = {"rope": rope, "sinusoidal_positions": sinusoidal_positions}
