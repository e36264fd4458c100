"""Training objectives."""
from __future__ import annotations

import numpy as np

from . import register, require


def _log_softmax(x):
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def cross_entropy(logits, targets, *, ignore_index=-100):
    """mean over counted positions of −log softmax(logits)[target]; targets == ignore_index are skipped."""
    logp = _log_softmax(logits).reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    keep = t != ignore_index
    picked = logp[np.nonzero(keep)[0], t[keep]]
    return np.asarray(-picked.sum() / max(int(keep.sum()), 1), dtype=logits.dtype)


def cross_entropy_vjp(grads, inputs, outputs, *, ignore_index=-100):
    (g,) = grads
    logits, targets = inputs
    V = logits.shape[-1]
    p = np.exp(_log_softmax(logits)).reshape(-1, V)
    t = targets.reshape(-1)
    keep = t != ignore_index
    rows = np.nonzero(keep)[0]
    p[rows, t[keep]] -= 1.0
    p[~keep] = 0.0
    return (p * (g / max(int(keep.sum()), 1))).reshape(logits.shape).astype(logits.dtype), None


def cross_entropy_infer(shapes, dtypes, *, ignore_index=-100):
    logits, targets = shapes
    require(tuple(targets) == tuple(logits[:-1]), "cross_entropy",
            f"targets {targets} must match logits {logits} without the class axis")
    return [((), dtypes[0])]


register("cross_entropy", cross_entropy, cross_entropy_vjp, cross_entropy_infer,
         flops=lambda s, o, **a: 4 * int(np.prod(s[0])), nondiff=(1,), vjp_uses_outputs=False)
