"""Rotary position embeddings on the GPU (spec: minitx/ops/positions.py): one ElementwiseKernel,
angles in float64 like the spec, cos/sin rounded to the input's dtype like the spec, the rotation
in float32. UNTESTED ON HARDWARE so far."""
from __future__ import annotations

import cupy as cp
import numpy as np

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


KERNELS = {"rope": rope}
