"""Pointwise activations, SwiGLU and softmax, fused to one pass over memory.

Spec: minitx/ops/activations.py (gelu both forms, silu, swiglu, softmax, relu). Each kernel computes
in the input's dtype like the spec. The tanh form of GELU is computed as v·σ(2u), which equals
0.5·v·(1 + tanh u), and σ, SiLU and SwiGLU use the vectorisable exp of _vmath.py: results agree with
the spec to a few ulps (the conformance table shows how few), and a GELU over 128×3072 values takes
~1 ms instead of ~6."""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from minitx.ops import activations as spec_act

from ._jit import kernel, pick
from ._vmath import erf, exp

_K = math.sqrt(2.0 / math.pi)
_R2 = 1.0 / math.sqrt(2.0)


# Constants reach the kernels as an array in the input's dtype (see _consts): a Python float
# literal is float64 to numba and would silently widen every float32 expression around it.
_GELU_C = (-2.0 * _K, 0.044715, 1.0, 2.0 * 3 * 0.044715 * _K, 2.0 * _K, 0.5, _R2, 1.0 / math.sqrt(2.0 * math.pi))


def _gelu_tanh(x, y, c):
    # 0.5·v·(1 + tanh u) = v·σ(2u): the same function, with one vectorisable exp instead of tanh
    m2k, a, one = c[0], c[1], c[2]
    for i in prange(x.size):
        v = x[i]
        y[i] = v / (one + exp(m2k * (v + a * v * v * v)))


def _gelu_erf(x, y, c):
    one, half, r2 = c[2], c[5], c[6]
    for i in prange(x.size):
        v = x[i]
        y[i] = half * v * (one + erf(v * r2))


def _gelu_tanh_bwd(x, g, gx, c):
    # with s = σ(2u) = (1 + tanh u)/2:  d/dv = s + v·2s(1 − s)·du/dv
    m2k, a, one, a6k, k2 = c[0], c[1], c[2], c[3], c[4]
    for i in prange(x.size):
        v = x[i]
        s = one / (one + exp(m2k * (v + a * v * v * v)))
        gx[i] = g[i] * (s + v * s * (one - s) * (k2 + a6k * v * v))


def _gelu_erf_bwd(x, g, gx, c):
    one, half, r2, r2pi = c[2], c[5], c[6], c[7]
    for i in prange(x.size):
        v = x[i]
        cdf = half * (one + erf(v * r2))
        pdf = exp(-half * v * v) * r2pi
        gx[i] = g[i] * (cdf + v * pdf)


def _silu(x, y, c):
    one = c[2]
    for i in prange(x.size):
        v = x[i]
        y[i] = v / (one + exp(-v))


def _silu_bwd(x, g, gx, c):
    one = c[2]
    for i in prange(x.size):
        v = x[i]
        s = one / (one + exp(-v))
        gx[i] = g[i] * s * (one + v * (one - s))


def _swiglu(h, y, c):
    one = c[2]
    n, f = y.shape
    for r in prange(n):
        for j in range(f):
            a = h[r, j]
            y[r, j] = a / (one + exp(-a)) * h[r, f + j]


def _relu(x, y, c):
    for i in prange(x.size):
        v = x[i]
        y[i] = v if v > 0 else v * 0  # keeps NaN and -0.0 like np.maximum(x, 0) does for NaN


def _softmax(x, y):
    n, c = x.shape
    for r in prange(n):
        m = x[r, 0]
        for j in range(1, c):
            if x[r, j] > m:
                m = x[r, j]
        s = 0.0
        for j in range(c):
            e = exp(x[r, j] - m)
            y[r, j] = e
            s += e
        inv = 1.0 / s
        for j in range(c):
            y[r, j] *= inv


_GT, _GE, _GTB, _GEB = kernel(_gelu_tanh), kernel(_gelu_erf), kernel(_gelu_tanh_bwd), kernel(_gelu_erf_bwd)
_SILU, _SILU_B, _SWIGLU, _RELU = kernel(_silu), kernel(_silu_bwd), kernel(_swiglu), kernel(_relu)
_SOFTMAX = kernel(_softmax)


# The exp/erf kernels (about 1 ns an element on one core) go parallel from this many elements (about
# 0.25 ms of work) instead of the shared PARALLEL_MIN (16M): MiniLM's GELU at 32 x 16 (786K
# values a layer) stayed on one core. relu, a few times cheaper, keeps the shared threshold.
EXP_PARALLEL_MIN = 1 << 18


def _flat(x):
    return np.ascontiguousarray(x).reshape(-1)


def _consts(dtype) -> np.ndarray:
    return np.array(_GELU_C, dtype)


def _unary(pair, x, minimum=EXP_PARALLEL_MIN):
    xf = _flat(x)
    y = np.empty_like(xf)
    pick(pair, xf.size, minimum)(xf, y, _consts(xf.dtype))
    return y.reshape(np.shape(x))


def _unary_bwd(pair, x, g):
    xf, gf = _flat(x), _flat(g).astype(x.dtype, copy=False)
    gx = np.empty_like(xf)
    pick(pair, xf.size, EXP_PARALLEL_MIN)(xf, gf, gx, _consts(xf.dtype))
    return gx.reshape(np.shape(x))


def gelu(x, *, approximate="none"):
    return _unary(_GT if approximate == "tanh" else _GE, x)


def gelu_vjp(grads, inputs, outputs, *, approximate="none"):
    return (_unary_bwd(_GTB if approximate == "tanh" else _GEB, inputs[0], grads[0]),)


def silu(x):
    return _unary(_SILU, x)


def silu_vjp(grads, inputs, outputs):
    return (_unary_bwd(_SILU_B, inputs[0], grads[0]),)


def relu(x):
    return _unary(_RELU, x, None)


def swiglu(h):
    h2 = np.ascontiguousarray(h).reshape(-1, h.shape[-1])
    y = np.empty((h2.shape[0], h2.shape[1] // 2), h.dtype)
    pick(_SWIGLU, y.size, EXP_PARALLEL_MIN)(h2, y, _consts(h2.dtype))
    return y.reshape(*h.shape[:-1], h.shape[-1] // 2)


def softmax(x, *, axis=-1):
    if axis not in (-1, x.ndim - 1) or x.shape[-1] == 0:
        return spec_act.softmax(x, axis=axis)  # other axes: the spec is as good as it gets
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    y = np.empty_like(x2)
    pick(_SOFTMAX, x2.size, EXP_PARALLEL_MIN)(x2, y)
    return y.reshape(x.shape)


KERNELS = {"gelu": gelu, "silu": silu, "relu": relu, "swiglu": swiglu, "softmax": softmax}
VJPS = {"gelu": gelu_vjp, "silu": silu_vjp}
