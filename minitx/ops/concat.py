"""Concatenation along time: a KV cache grown by the new keys, for attention written as separate
ops (T5's biased self-attention, whose ``present`` K/V are ``concat(past, new)``)."""
from __future__ import annotations

import numpy as np

from . import register, require


def concat(a, b, *, axis=1):
    """[a; b] along ``axis``."""
    return np.concatenate([a, b], axis=axis)


def concat_vjp(grads, inputs, outputs, *, axis=1):
    (g,) = grads
    n = inputs[0].shape[axis]
    return np.split(g, [n], axis=axis)[0], np.split(g, [n], axis=axis)[1]


def concat_infer(shapes, dtypes, *, axis=1):
    a, b = shapes
    ax = axis % len(a)
    require(len(a) == len(b) and all(x == y for k, (x, y) in enumerate(zip(a, b)) if k != ax), "concat",
            f"{a} and {b} differ outside axis {axis}")
    out = list(a)
    out[ax] = a[ax] + b[ax]
    return [(tuple(out), np.result_type(dtypes[0], dtypes[1]))]


register("concat", concat, concat_vjp, concat_infer, vjp_uses_outputs=False)
