"""GEGLU (T5 v1.1's gated-GELU feed-forward middle) on the GPU (spec: minitx/ops/gated.py): one
ElementwiseKernel over [gate | up], each output reading its gate and up value once, GELU in
activations.py's float32 forms. UNTESTED ON HARDWARE so far."""
from __future__ import annotations

import cupy as cp

_geglu_tanh = cp.ElementwiseKernel(
    "T g, T u", "T y",
    "float v = (float)g; y = (T)(0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v))) * (float)u);",
    "minitx_geglu_tanh")
_geglu_erf = cp.ElementwiseKernel(
    "T g, T u", "T y", "float v = (float)g; y = (T)(0.5f * v * (1.f + erff(v * 0.7071067811865476f)) * (float)u);",
    "minitx_geglu_erf")


def geglu(h, *, approximate="tanh"):
    F = h.shape[-1] // 2
    return (_geglu_tanh if approximate == "tanh" else _geglu_erf)(h[..., :F], h[..., F:])


KERNELS = {"geglu": geglu}
