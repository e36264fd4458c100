"""Rotary position embeddings, computed on the fly per (batch, token, head).

Spec: minitx/ops/positions.py (rope). Angles are computed in float64 from integer positions
like the spec, then the rotation is applied in the input dtype.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import kernel, pick


def _rope(x, pos, H, theta, y):
    B, T, HD = x.shape
    D = HD // H
    half = D // 2
    for task in prange(B * T):
        b = task // T
        t = task % T
        p = float(pos[b, t])
        for i in range(half):
            ang = p * theta ** (-(2.0 * i) / D)
            c = np.cos(ang)
            s = np.sin(ang)
            for h in range(H):
                o = h * D
                x1 = x[b, t, o + i]
                x2 = x[b, t, o + half + i]
                y[b, t, o + i] = x1 * c - x2 * s
                y[b, t, o + half + i] = x2 * c + x1 * s


_ROPE = kernel(_rope)


def rope(x, positions, *, n_heads, theta=10000.0):
    xc = np.ascontiguousarray(x)
    y = np.empty_like(xc)
    pick(_ROPE, xc.size)(xc, np.ascontiguousarray(positions, dtype=np.int64), n_heads, float(theta), y)
    return y


def rope_vjp(grads, inputs, outputs, *, n_heads, theta=10000.0):
    """A rotation's transpose is the rotation by −θ (as in the spec)."""
    return rope(grads[0], -np.asarray(inputs[1]), n_heads=n_heads, theta=theta), None


KERNELS = {"rope": rope}
VJPS = {"rope": rope_vjp}
