"""Pointwise activations, SwiGLU and softmax on the GPU (spec: minitx/ops/activations.py).

Pointwise ops are ElementwiseKernels that compute in float32 and store in the input's dtype;
``softmax`` is one thread block per row with float32 statistics. UNTESTED ON HARDWARE so far."""
from __future__ import annotations

import cupy as cp
import numpy as np

from ._cuda import ROWS, function, rows, threads

# Pointwise ops compute in float32 (the "float" casts) and store in the input dtype (T).
_gelu_tanh = cp.ElementwiseKernel(
    "T x", "T y",
    "float v = (float)x; y = (T)(0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v))));",
    "minitx_gelu_tanh")
_gelu_erf = cp.ElementwiseKernel(
    "T x", "T y", "float v = (float)x; y = (T)(0.5f * v * (1.f + erff(v * 0.7071067811865476f)));", "minitx_gelu_erf")
_silu = cp.ElementwiseKernel(
    "T x", "T y", "float v = (float)x; y = (T)(v * 0.5f * (1.f + tanhf(0.5f * v)));", "minitx_silu")
_swiglu = cp.ElementwiseKernel(
    "T g, T u", "T y", "float v = (float)g; y = (T)(v * 0.5f * (1.f + tanhf(0.5f * v)) * (float)u);", "minitx_swiglu")


def softmax(x, *, axis=-1):
    if axis not in (-1, x.ndim - 1):
        return cp.moveaxis(softmax(cp.moveaxis(x, axis, -1)), -1, axis)
    x2 = rows(x)
    y = cp.empty_like(x2)
    C = x2.shape[1]
    if x2.shape[0] and C:
        function(ROWS, "softmax", x.dtype)((x2.shape[0],), (threads(C),), (x2, y, np.int32(C)))
    return y.reshape(x.shape)


def gelu(x, *, approximate="none"):
    return (_gelu_tanh if approximate == "tanh" else _gelu_erf)(x)


def silu(x):
    return _silu(x)


def relu(x):
    return cp.maximum(x, x.dtype.type(0))


def swiglu(h):
    F = h.shape[-1] // 2
    return _swiglu(h[..., :F], h[..., F:])


KERNELS = {"softmax": softmax, "gelu": gelu, "silu": silu, "relu": relu, "swiglu": swiglu}
