"""Normalisations over the last axis: LayerNorm and RMSNorm."""
from __future__ import annotations

import numpy as np

from . import register, require, wide
from .cases import EDGE_ROWS, Case, add_cases, norm_offset, randn, signed_zeros, tiny, viewed


def layer_norm(x, weight, bias, *, eps=1e-5):
    """y = (x − mean(x)) / sqrt(var(x) + ε) · γ + β over the last axis (two-pass statistics,
    in float32 for 16-bit inputs)."""
    v = wide(x)
    mu = v.mean(axis=-1, keepdims=True)
    var = ((v - mu) ** 2).mean(axis=-1, keepdims=True)
    return ((v - mu) / np.sqrt(var + eps) * weight + bias).astype(x.dtype, copy=False)


def layer_norm_vjp(grads, inputs, outputs, *, eps=1e-5):
    (g,) = grads
    x, weight, bias = inputs
    dt = x.dtype
    x, g = wide(x), wide(g)
    mu = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps)
    xhat = (x - mu) * rstd
    gxhat = g * weight
    # d/dx of the normalisation: (gxhat − mean(gxhat) − xhat·mean(gxhat·xhat)) / σ
    gx = rstd * (gxhat - gxhat.mean(axis=-1, keepdims=True) - xhat * (gxhat * xhat).mean(axis=-1, keepdims=True))
    rows = (-1, x.shape[-1])
    return (gx.astype(dt, copy=False), (g * xhat).reshape(rows).sum(axis=0).astype(weight.dtype, copy=False),
            g.reshape(rows).sum(axis=0).astype(bias.dtype, copy=False))


def rms_norm(x, weight, *, eps=1e-6):
    """y = x / sqrt(mean(x²) + ε) · γ over the last axis (in float32 for 16-bit inputs)."""
    v = wide(x)
    return (v / np.sqrt((v * v).mean(axis=-1, keepdims=True) + eps) * weight).astype(x.dtype, copy=False)


def rms_norm_vjp(grads, inputs, outputs, *, eps=1e-6):
    (g,) = grads
    x, weight = inputs
    dt = x.dtype
    x, g = wide(x), wide(g)
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    xhat = x * rstd
    gxhat = g * weight
    gx = rstd * (gxhat - xhat * (gxhat * xhat).mean(axis=-1, keepdims=True))
    return gx.astype(dt, copy=False), (g * xhat).reshape(-1, x.shape[-1]).sum(axis=0).astype(weight.dtype, copy=False)


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


def _norm_cases(op: str) -> list[Case]:
    """x at several scales and mean offsets (one-pass variance cancels there), tiny and zero rows
    (ε alone keeps them finite), row counts across tile edges, views."""
    def case(name, family, shape, scale=3.0, fill=None):
        def make(r, d):
            x = fill(r, shape, d) if fill else randn(r, shape, d, scale, norm_offset(d) if family == "large" else 0.0)
            params = (randn(r, shape[-1:], d), randn(r, shape[-1:], d))
            return (x, *params[: 2 if op == "layer_norm" else 1]), {"eps": 1e-5 if op == "layer_norm" else 1e-6}
        return Case(name, make, family)

    typical = [case("x".join(map(str, s)), "typical", s) for s in ((3, 5, 16), (64, 768), (1, 1, 768))]
    return typical + [
        case("small scale 1e-2", "typical", (4, 96), 1e-2),
        case("mean offset for the dtype", "large", (16, 768), 1.0),
        case("subnormal rows", "tiny", (4, 96), fill=lambda r, s, d: randn(r, s, d, tiny(d))),
        case("signed-zero rows", "zeros", (4, 96), fill=lambda r, s, d: signed_zeros(s, d)),
        *[case(f"{n} rows of {n + 3}", "sizes", (n, n + 3)) for n in EDGE_ROWS],
        viewed(typical[0]),
    ]


for _op in ("layer_norm", "rms_norm"):
    add_cases(_op, _norm_cases(_op))
