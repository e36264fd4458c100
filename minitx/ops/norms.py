"""Normalisations over the last axis: LayerNorm and RMSNorm."""
from __future__ import annotations

import numpy as np

from . import register, require


def layer_norm(x, weight, bias, *, eps=1e-5):
    """y = (x − mean(x)) / sqrt(var(x) + ε) · γ + β over the last axis."""
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def layer_norm_vjp(grads, inputs, outputs, *, eps=1e-5):
    (g,) = grads
    x, weight, bias = inputs
    mu = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps)
    xhat = (x - mu) * rstd
    gxhat = g * weight
    # d/dx of the normalisation: (gxhat − mean(gxhat) − xhat·mean(gxhat·xhat)) / σ
    gx = rstd * (gxhat - gxhat.mean(axis=-1, keepdims=True) - xhat * (gxhat * xhat).mean(axis=-1, keepdims=True))
    rows = (-1, x.shape[-1])
    return gx, (g * xhat).reshape(rows).sum(axis=0), g.reshape(rows).sum(axis=0)


def rms_norm(x, weight, *, eps=1e-6):
    """y = x / sqrt(mean(x²) + ε) · γ over the last axis."""
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def rms_norm_vjp(grads, inputs, outputs, *, eps=1e-6):
    (g,) = grads
    x, weight = inputs
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    xhat = x * rstd
    gxhat = g * weight
    gx = rstd * (gxhat - xhat * (gxhat * xhat).mean(axis=-1, keepdims=True))
    return gx, (g * xhat).reshape(-1, x.shape[-1]).sum(axis=0)


def _norm_infer(op):
    def infer(shapes, dtypes, **attrs):
        x = shapes[0]
        for s in shapes[1:]:
            require(tuple(s) == (x[-1],), op, f"parameter shape {s} != ({x[-1]},) for input {x}")
        return [(tuple(x), dtypes[0])]

    return infer


def _norm_flops(shapes, outs, **attrs):
    return 8 * int(np.prod(outs[0]))


register("layer_norm", layer_norm, layer_norm_vjp, _norm_infer("layer_norm"), flops=_norm_flops,
         vjp_uses_outputs=False)
register("rms_norm", rms_norm, rms_norm_vjp, _norm_infer("rms_norm"), flops=_norm_flops,
         vjp_uses_outputs=False)
