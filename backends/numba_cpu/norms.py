"""Fused LayerNorm and RMSNorm: one pass for the statistics, one to write, per row.

Specs: minitx/ops/norms.py (layer_norm, rms_norm and their VJPs). Statistics accumulate in
float64 whatever the input dtype, which is at least as accurate as the spec.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ._jit import FASTMATH, kernel, pick, rows


@numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _row_stats(xr, eps):
    """(mean, 1/√(var + eps)) of one row, accumulated in float64."""
    c = xr.size
    s = 0.0
    for j in range(c):
        s += xr[j]
    mu = s / c
    v = 0.0
    for j in range(c):
        d = xr[j] - mu
        v += d * d
    return mu, 1.0 / np.sqrt(v / c + eps)


def _ln(x, w, b, eps, y):
    n, c = x.shape
    for r in prange(n):
        mu, rstd = _row_stats(x[r], eps)
        for j in range(c):
            y[r, j] = (x[r, j] - mu) * rstd * w[j] + b[j]


def _rms(x, w, eps, y):
    n, c = x.shape
    for r in prange(n):
        s = 0.0
        for j in range(c):
            s += x[r, j] * x[r, j]
        rstd = 1.0 / np.sqrt(s / c + eps)
        for j in range(c):
            y[r, j] = x[r, j] * rstd * w[j]


def _ln_bwd(x, w, g, eps, gx):
    """gx = rstd·(ĝ − mean ĝ − x̂·mean(ĝ·x̂)), ĝ = g·w — the spec's formula, fused per row."""
    n, c = x.shape
    for r in prange(n):
        mu, rstd = _row_stats(x[r], eps)
        a = 0.0
        bsum = 0.0
        for j in range(c):
            gh = g[r, j] * w[j]
            a += gh
            bsum += gh * (x[r, j] - mu) * rstd
        a /= c
        bsum /= c
        for j in range(c):
            xh = (x[r, j] - mu) * rstd
            gx[r, j] = rstd * (g[r, j] * w[j] - a - xh * bsum)


_LN, _RMS, _LN_BWD = kernel(_ln), kernel(_rms), kernel(_ln_bwd)


def layer_norm(x, weight, bias, *, eps=1e-5):
    x2 = rows(x)
    y = np.empty_like(x2)
    pick(_LN, x2.size)(x2, np.ascontiguousarray(weight), np.ascontiguousarray(bias), float(eps), y)
    return y.reshape(x.shape)


def rms_norm(x, weight, *, eps=1e-6):
    x2 = rows(x)
    y = np.empty_like(x2)
    pick(_RMS, x2.size)(x2, np.ascontiguousarray(weight), float(eps), y)
    return y.reshape(x.shape)


def layer_norm_vjp(grads, inputs, outputs, *, eps=1e-5):
    (g,) = grads
    x, weight, bias = inputs
    x2, g2 = rows(x), rows(g)
    gx = np.empty_like(x2)
    pick(_LN_BWD, x2.size)(x2, np.ascontiguousarray(weight), g2, float(eps), gx)
    # Parameter gradients are column sums: BLAS-backed numpy is already optimal for those.
    mu = x2.mean(axis=1, keepdims=True)
    xhat = (x2 - mu) / np.sqrt(((x2 - mu) ** 2).mean(axis=1, keepdims=True) + eps)
    return gx.reshape(x.shape), (g2 * xhat).sum(axis=0), g2.sum(axis=0)


KERNELS = {"layer_norm": layer_norm, "rms_norm": rms_norm}
VJPS = {"layer_norm": layer_norm_vjp}
