"""Pointwise activations, SwiGLU, softmax and add, fused to one pass over memory.

Specs: minitx/ops/activations.py (gelu both forms, silu, swiglu, softmax, relu) and
minitx/ops/linalg.py (add). Each kernel computes in the input's dtype like the spec; the tanh
form of GELU and σ use the same formulas as the spec so results agree to rounding.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from minitx.ops import activations as spec_act
from minitx.ops import linalg as spec_lin

from ._jit import kernel, pick

_K = math.sqrt(2.0 / math.pi)
_R2 = 1.0 / math.sqrt(2.0)


def _gelu_tanh(x, y):
    for i in prange(x.size):
        v = x[i]
        y[i] = 0.5 * v * (1.0 + np.tanh(_K * (v + 0.044715 * v * v * v)))


def _gelu_erf(x, y):
    for i in prange(x.size):
        v = x[i]
        y[i] = 0.5 * v * (1.0 + math.erf(v * _R2))


def _gelu_tanh_bwd(x, g, gx):
    for i in prange(x.size):
        v = x[i]
        t = np.tanh(_K * (v + 0.044715 * v * v * v))
        du = _K * (1.0 + 3 * 0.044715 * v * v)
        gx[i] = g[i] * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du)


def _gelu_erf_bwd(x, g, gx):
    for i in prange(x.size):
        v = x[i]
        cdf = 0.5 * (1.0 + math.erf(v * _R2))
        pdf = math.exp(-0.5 * v * v) * 0.3989422804014327
        gx[i] = g[i] * (cdf + v * pdf)


def _silu(x, y):
    for i in prange(x.size):
        v = x[i]
        y[i] = v * (0.5 * (1.0 + np.tanh(0.5 * v)))


def _silu_bwd(x, g, gx):
    for i in prange(x.size):
        v = x[i]
        s = 0.5 * (1.0 + np.tanh(0.5 * v))
        gx[i] = g[i] * s * (1.0 + v * (1.0 - s))


def _swiglu(h, y):
    n, f = y.shape
    for r in prange(n):
        for j in range(f):
            a = h[r, j]
            y[r, j] = a * (0.5 * (1.0 + np.tanh(0.5 * a))) * h[r, f + j]


def _relu(x, y):
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
            e = np.exp(x[r, j] - m)
            y[r, j] = e
            s += e
        inv = 1.0 / s
        for j in range(c):
            y[r, j] *= inv


def _add(a, b, y):
    for i in prange(a.size):
        y[i] = a[i] + b[i]


def _add_row(a, b, y):
    n, c = a.shape
    for r in prange(n):
        for j in range(c):
            y[r, j] = a[r, j] + b[j]


_GT, _GE, _GTB, _GEB = kernel(_gelu_tanh), kernel(_gelu_erf), kernel(_gelu_tanh_bwd), kernel(_gelu_erf_bwd)
_SILU, _SILU_B, _SWIGLU, _RELU = kernel(_silu), kernel(_silu_bwd), kernel(_swiglu), kernel(_relu)
_SOFTMAX, _ADD, _ADD_ROW = kernel(_softmax), kernel(_add), kernel(_add_row)


def _flat(x):
    return np.ascontiguousarray(x).reshape(-1)


def _unary(pair, x):
    xf = _flat(x)
    y = np.empty_like(xf)
    pick(pair, xf.size)(xf, y)
    return y.reshape(np.shape(x))


def _unary_bwd(pair, x, g):
    xf, gf = _flat(x), _flat(g).astype(x.dtype, copy=False)
    gx = np.empty_like(xf)
    pick(pair, xf.size)(xf, gf, gx)
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
    return _unary(_RELU, x)


def swiglu(h):
    h2 = np.ascontiguousarray(h).reshape(-1, h.shape[-1])
    y = np.empty((h2.shape[0], h2.shape[1] // 2), h.dtype)
    pick(_SWIGLU, y.size)(h2, y)
    return y.reshape(*h.shape[:-1], h.shape[-1] // 2)


def softmax(x, *, axis=-1):
    if axis not in (-1, x.ndim - 1) or x.shape[-1] == 0:
        return spec_act.softmax(x, axis=axis)  # other axes: the spec is as good as it gets
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    y = np.empty_like(x2)
    pick(_SOFTMAX, x2.size)(x2, y)
    return y.reshape(x.shape)


def add(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype == b.dtype and a.dtype.kind == "f":
        if a.shape == b.shape:
            y = np.empty_like(a, order="C")
            pick(_ADD, a.size)(_flat(a), _flat(b), y.reshape(-1))
            return y
        if b.ndim == 1 and a.ndim >= 1 and b.shape[0] == a.shape[-1]:  # bias over the last axis
            a2 = np.ascontiguousarray(a).reshape(-1, a.shape[-1])
            y = np.empty_like(a2)
            pick(_ADD_ROW, a2.size)(a2, b, y)
            return y.reshape(a.shape)
    return spec_lin.add(a, b)  # general broadcasting or mixed dtypes: numpy's rules, exactly


KERNELS = {"gelu": gelu, "silu": silu, "relu": relu, "swiglu": swiglu, "softmax": softmax, "add": add}
VJPS = {"gelu": gelu_vjp, "silu": silu_vjp}
