"""Sentence-level heads: masked mean pooling and L2 normalisation."""
from __future__ import annotations

import numpy as np

from . import register, require


def mean_pool(x, mask):
    """Σ_t mask_t·x_t / Σ_t mask_t: the mean of the non-padding token vectors."""
    m = mask.astype(x.dtype)[..., None]
    return (x * m).sum(axis=1) / np.maximum(m.sum(axis=1), x.dtype.type(1e-9))


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


def l2_normalize(x, *, eps=1e-12):
    """x / max(‖x‖₂, ε) along the last axis."""
    return x / np.maximum(np.sqrt((x * x).sum(axis=-1, keepdims=True)), x.dtype.type(eps))


def l2_normalize_vjp(grads, inputs, outputs, *, eps=1e-12):
    (g,) = grads
    (x,) = inputs
    (y,) = outputs
    n = np.sqrt((x * x).sum(axis=-1, keepdims=True))
    clipped = n < eps
    gx = (g - y * (g * y).sum(axis=-1, keepdims=True)) / np.maximum(n, x.dtype.type(eps))
    return (np.where(clipped, g / x.dtype.type(eps), gx),)


register("l2_normalize", l2_normalize, l2_normalize_vjp, lambda s, d, **a: [(tuple(s[0]), d[0])],
         flops=lambda s, o, **a: 3 * int(np.prod(s[0])))
