"""Pointwise nonlinearities, softmax and dropout."""
from __future__ import annotations

import numpy as np
from scipy.special import erf

from . import elementwise_flops, register, require, same_as

_SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))  # a Python float keeps float32 inputs float32


# ------------------------------------------------------------------------------------- gelu
def gelu(x, *, approximate="none"):
    """GELU(x) = x·Φ(x); ``approximate="tanh"`` uses ½x(1 + tanh(√(2/π)(x + 0.044715x³)))."""
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)).astype(x.dtype))


def gelu_vjp(grads, inputs, outputs, *, approximate="none"):
    (g,) = grads
    (x,) = inputs
    if approximate == "tanh":
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x**3)
        t = np.tanh(u)
        du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x**2)
        return (g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du),)
    cdf = 0.5 * (1.0 + erf(x / np.sqrt(2.0)))
    pdf = np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)
    return ((g * (cdf + x * pdf)).astype(x.dtype),)


def _gelu_infer(shapes, dtypes, *, approximate="none"):
    require(approximate in ("none", "tanh"), "gelu", f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return [(tuple(shapes[0]), dtypes[0])]


register("gelu", gelu, gelu_vjp, _gelu_infer, flops=elementwise_flops(8), vjp_uses_outputs=False)


# ------------------------------------------------------------------------------------- relu
def relu(x):
    """max(x, 0)."""
    return np.maximum(x, 0)


def relu_vjp(grads, inputs, outputs):
    return (grads[0] * (inputs[0] > 0),)


register("relu", relu, relu_vjp, same_as(0), flops=elementwise_flops(1), vjp_uses_outputs=False)


# ------------------------------------------------------------------------------------- silu
def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free σ(x)


def silu(x):
    """SiLU(x) = x·σ(x)."""
    return x * _sigmoid(x)


def silu_vjp(grads, inputs, outputs):
    (x,) = inputs
    s = _sigmoid(x)
    return (grads[0] * s * (1.0 + x * (1.0 - s)),)


register("silu", silu, silu_vjp, same_as(0), flops=elementwise_flops(4), vjp_uses_outputs=False)


# ----------------------------------------------------------------------------------- swiglu
def swiglu(h):
    """SwiGLU on a packed (…, 2F) input [gate | up]: SiLU(gate) · up — the gated FFN's middle."""
    gate, up = np.split(h, 2, axis=-1)
    return silu(gate) * up


def swiglu_vjp(grads, inputs, outputs):
    (g,) = grads
    gate, up = np.split(inputs[0], 2, axis=-1)
    (ggate,) = silu_vjp((g * up,), (gate,), None)
    return (np.concatenate([ggate, g * silu(gate)], axis=-1),)


def _swiglu_infer(shapes, dtypes):
    (h,) = shapes
    require(h[-1] % 2 == 0, "swiglu", f"last axis of {h} must be even ([gate | up])")
    return [((*h[:-1], h[-1] // 2), dtypes[0])]


register("swiglu", swiglu, swiglu_vjp, _swiglu_infer, flops=elementwise_flops(5), vjp_uses_outputs=False)


# ---------------------------------------------------------------------------------- softmax
def softmax(x, *, axis=-1):
    """exp(x − max x) / Σ exp(x − max x) along ``axis``."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax_vjp(grads, inputs, outputs, *, axis=-1):
    (g,) = grads
    (y,) = outputs
    return (y * (g - (g * y).sum(axis=axis, keepdims=True)),)


register("softmax", softmax, softmax_vjp, same_as(0), flops=elementwise_flops(5))


# ---------------------------------------------------------------------------------- dropout
def dropout_mask(shape, p, seed, step):
    """The keep-mask is a pure function of (seed, step), so backward and recompute see the same one."""
    return np.random.default_rng([seed, step]).random(shape) >= p


def dropout(x, *, p, seed=0, training=False, step=0):
    """Inverted dropout: in training, zero each element with probability p and scale by 1/(1−p)."""
    if not training or p == 0.0:
        return x
    return x * dropout_mask(x.shape, p, seed, step) / x.dtype.type(1.0 - p)


def dropout_vjp(grads, inputs, outputs, *, p, seed=0, training=False, step=0):
    (g,) = grads
    if not training or p == 0.0:
        return (g,)
    return (g * dropout_mask(g.shape, p, seed, step) / g.dtype.type(1.0 - p),)


def _dropout_infer(shapes, dtypes, *, p, seed=0):
    require(0.0 <= p < 1.0, "dropout", f"p must be in [0, 1), got {p}")
    return [(tuple(shapes[0]), dtypes[0])]


register("dropout", dropout, dropout_vjp, _dropout_infer, flops=elementwise_flops(2), mode_dependent=True,
         vjp_uses_outputs=False)
