"""Pointwise nonlinearities, softmax and dropout."""
from __future__ import annotations

import numpy as np
from scipy.special import erf

from . import elementwise_flops, register, require, same_as, wide
from .cases import EDGE_ROWS, Case, add_cases, exp_range, randn, signed_zeros, tiny, viewed

_SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))  # a Python float keeps float32 inputs float32


def _pointwise_cases(pair: bool = False, **attrs) -> list[Case]:
    """Every input family a pointwise op meets; ``pair`` doubles the last axis ([gate | up])."""
    def case(name, family, shape, fill):
        shape = (*shape[:-1], 2 * shape[-1]) if pair else shape
        return Case(name + "".join(f", {k}={v}" for k, v in attrs.items()),
                    lambda r, d: ((fill(r, shape, d),), dict(attrs)), family)

    typical = [case(f"{'x'.join(map(str, s))} scale {a}", "typical", s, lambda r, s, d, a=a: randn(r, s, d, a))
               for s, a in (((3, 5, 16), 2.0), ((64, 768), 2.0), ((1, 1, 7), 0.3))]
    return typical + [
        case("3x5x16 near exp overflow", "large", (3, 5, 16), lambda r, s, d: randn(r, s, d, exp_range(d))),
        case("3x5x16 subnormal", "tiny", (3, 5, 16), lambda r, s, d: randn(r, s, d, tiny(d))),
        case("3x5x16 signed zeros", "zeros", (3, 5, 16), lambda r, s, d: signed_zeros(s, d)),
        *[case(f"{n}x{n + 2} rows", "sizes", (n, n + 2), lambda r, s, d: randn(r, s, d, 2.0)) for n in EDGE_ROWS],
        viewed(typical[0]),
    ]


# ------------------------------------------------------------------------------------- gelu
def gelu(x, *, approximate="none"):
    """GELU(x) = x·Φ(x); ``approximate="tanh"`` uses ½x(1 + tanh(√(2/π)(x + 0.044715x³)))."""
    v = wide(x)
    if approximate == "tanh":
        return (0.5 * v * (1.0 + np.tanh(_SQRT_2_OVER_PI * (v + 0.044715 * v**3)))).astype(x.dtype)
    return (0.5 * v * (1.0 + erf(v / np.sqrt(2.0)).astype(v.dtype))).astype(x.dtype)


def gelu_vjp(grads, inputs, outputs, *, approximate="none"):
    (g,) = grads
    (x,) = inputs
    v = wide(x)
    if approximate == "tanh":
        u = _SQRT_2_OVER_PI * (v + 0.044715 * v**3)
        t = np.tanh(u)
        # 1 − t² is exactly 0 once tanh saturates; cancellation would leave rounding noise there
        sech2 = np.where(np.abs(u) > 20, 0.0, 1.0 - t * t).astype(v.dtype)
        du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * v * v)
        return ((g * (0.5 * (1.0 + t) + 0.5 * v * sech2 * du)).astype(x.dtype, copy=False),)
    cdf = 0.5 * (1.0 + erf(v / np.sqrt(2.0)))
    pdf = np.exp(-0.5 * v * v) / np.sqrt(2.0 * np.pi)
    return ((g * (cdf + v * pdf)).astype(x.dtype, copy=False),)


def _gelu_infer(shapes, dtypes, *, approximate="none"):
    require(approximate in ("none", "tanh"), "gelu", f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return [(tuple(shapes[0]), dtypes[0])]


register("gelu", gelu, gelu_vjp, _gelu_infer, flops=elementwise_flops(8), vjp_uses_outputs=False)
add_cases("gelu", _pointwise_cases(approximate="none") + _pointwise_cases(approximate="tanh"))


# ------------------------------------------------------------------------------------- relu
def relu(x):
    """max(x, 0)."""
    return np.maximum(x, 0)


def relu_vjp(grads, inputs, outputs):
    return (grads[0] * (inputs[0] > 0),)


register("relu", relu, relu_vjp, same_as(0), flops=elementwise_flops(1), vjp_uses_outputs=False)
add_cases("relu", _pointwise_cases())


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
add_cases("silu", _pointwise_cases())


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
add_cases("swiglu", _pointwise_cases(pair=True))


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


def _masked_logits(r, d):
    x = randn(r, (4, 6, 33), d, 2.0)
    x[..., ::3] = -np.inf          # masked positions as a model writes them; every row keeps some
    return (x,), {}


def _tied_logits(r, d):
    x = r.integers(0, 3, (5, 40)).astype(d)   # several equal maxima per row
    return (x,), {}


_SOFTMAX_TYPICAL = [Case(f"{'x'.join(map(str, s))}", lambda r, d, s=s: ((randn(r, s, d, 2.0),), {}))
                    for s in ((3, 5, 16), (64, 768), (2, 3, 1))]
add_cases("softmax", _SOFTMAX_TYPICAL + [
    Case("4x6x5, axis=1", lambda r, d: ((randn(r, (4, 6, 5), d, 2.0),), {"axis": 1})),
    Case("spread near exp overflow", lambda r, d: ((randn(r, (8, 50), d, exp_range(d) / 3),), {}), "large"),
    Case("offset near exp overflow", lambda r, d: ((randn(r, (8, 50), d, 1.0, exp_range(d)),), {}), "large"),
    Case("subnormal logits", lambda r, d: ((randn(r, (8, 50), d, tiny(d)),), {}), "tiny"),
    Case("signed zeros (uniform)", lambda r, d: ((signed_zeros((8, 50), d),), {}), "zeros"),
    Case("-inf masked positions", _masked_logits, "masked"),
    Case("tied maxima", _tied_logits, "ties"),
    *[Case(f"{n} rows of {n + 1}", lambda r, d, n=n: ((randn(r, (n, n + 1), d, 2.0),), {}), "sizes")
      for n in EDGE_ROWS],
    Case("batch 1", lambda r, d: ((randn(r, (1, 1, 300), d, 2.0),), {}), "batch"),
    Case("batch 512", lambda r, d: ((randn(r, (512, 3, 20), d, 2.0),), {}), "batch"),
    viewed(_SOFTMAX_TYPICAL[0]),
])


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
         vjp_uses_outputs=False, may_alias=True)  # inference returns x itself
add_cases("dropout", [
    Case("inference", lambda r, d: ((randn(r, (4, 8), d),), {"p": 0.1, "seed": 3, "training": False, "step": 0})),
    Case("training", lambda r, d: ((randn(r, (4, 8), d),), {"p": 0.1, "seed": 3, "training": True, "step": 2})),
    Case("training, 65x63", lambda r, d: ((randn(r, (65, 63), d),), {"p": 0.5, "seed": 1, "training": True, "step": 7}),
         family="sizes"),
])
