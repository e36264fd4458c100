"""Sentence-level heads: masked mean pooling and L2 normalisation."""
from __future__ import annotations

import numpy as np

from . import register, require, wide, wide_forward, wide_vjp
from .cases import Case, add_cases, randn, signed_zeros, tiny, viewed


@wide_forward
def mean_pool(x, mask):
    """Σ_t mask_t·x_t / Σ_t mask_t: the mean of the non-padding token vectors."""
    m = mask.astype(x.dtype)[..., None]
    return (x * m).sum(axis=1) / np.maximum(m.sum(axis=1), x.dtype.type(1e-9))


@wide_vjp
def mean_pool_vjp(grads, inputs, outputs):
    (g,) = grads
    x, mask = inputs
    m = mask.astype(x.dtype)[..., None]
    return g[:, None, :] * m / np.maximum(m.sum(axis=1, keepdims=True), x.dtype.type(1e-9)), None


def mean_pool_infer(shapes, dtypes):
    x, mask = shapes
    require(len(x) == 3 and tuple(mask) == tuple(x[:2]), "mean_pool", f"mask {mask} must be (B, T) of x {x}")
    return [((x[0], x[2]), dtypes[0])]


register("mean_pool", mean_pool, mean_pool_vjp, mean_pool_infer, nondiff=(1,), vjp_uses_outputs=False,
         flops=lambda s, o: 2 * int(np.prod(s[0])))
_LENGTHS = np.array([[6], [3], [1]])
add_cases("mean_pool", [
    Case("padded", lambda r, d: ((randn(r, (3, 6, 16), d), (np.arange(6) < _LENGTHS).astype(np.int64)), {})),
    Case("a fully padded row", lambda r, d: ((randn(r, (3, 6, 16), d), (np.arange(6) < np.array([[6], [0], [2]]))
                                              .astype(np.int64)), {}), "masked"),
])


def l2_normalize(x, *, eps=1e-12):
    """x / max(‖x‖₂, ε) along the last axis (the norm in float32 for 16-bit inputs, where ε is 0)."""
    v = wide(x)
    return (v / np.maximum(np.sqrt((v * v).sum(axis=-1, keepdims=True)), v.dtype.type(eps))).astype(x.dtype, copy=False)


def l2_normalize_vjp(grads, inputs, outputs, *, eps=1e-12):
    (g,) = grads
    (x,) = inputs
    dt = x.dtype
    x, g = wide(x), wide(g)
    n = np.sqrt((x * x).sum(axis=-1, keepdims=True))
    y = x / np.maximum(n, x.dtype.type(eps))
    clipped = n < eps
    gx = (g - y * (g * y).sum(axis=-1, keepdims=True)) / np.maximum(n, x.dtype.type(eps))
    return (np.where(clipped, g / x.dtype.type(eps), gx).astype(dt, copy=False),)


register("l2_normalize", l2_normalize, l2_normalize_vjp, lambda s, d, **a: [(tuple(s[0]), d[0])],
         flops=lambda s, o, **a: 3 * int(np.prod(s[0])))
_L2 = [Case("3x5x16", lambda r, d: ((randn(r, (3, 5, 16), d, 2.0),), {})),
       Case("64x384", lambda r, d: ((randn(r, (64, 384), d, 2.0),), {}))]
add_cases("l2_normalize", _L2 + [
    # Below ε the gradient is g/ε: an ε float16 can represent keeps it finite in every dtype.
    Case("zero rows", lambda r, d: ((signed_zeros((4, 32), d),), {"eps": 1e-3}), "zeros"),
    Case("subnormal rows", lambda r, d: ((randn(r, (4, 32), d, tiny(d)),), {"eps": 1e-3}), "tiny"),
    Case("large rows", lambda r, d: ((randn(r, (4, 32), d, 1e3 if d == "float16" else 1e15),), {}), "large"),
    viewed(_L2[0]),
])
