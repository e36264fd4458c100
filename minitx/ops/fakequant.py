"""Fake quantization: a float tensor rounded through a packed format and back, for
quantization-aware training (QAT).

    fake_quant(W) = dequantize(quantize(W))

with exactly the quantizers of :mod:`minitx.ops.quant` (the one definition of each packed format),
so a graph trained through ``fake_quant`` computes, weight for weight, what the packed graph
computes after conversion:

* ``bits=8, group=0, axis=0``  int8, one scale per output channel (column): ``quantize_per_channel``
  (``linear_q8``; W8A8's weights)
* ``bits=8, group=0, axis=1``  int8, one scale per row: an embedding table (``embedding_q8``)
* ``bits=8, group=k``          int8, one scale per ``k`` input rows: ``quantize_blocks`` (``linear_q8_block``,
  and int8's ``linear_q8_0``, which stores the same values transposed)
* ``bits=4, group=k``          int4 in [-8, 7], one scale per ``k`` input rows: ``quantize_int4`` (``linear_q4``)
* ``bits=4, group=k, axis=1``  int4, one scale per ``k`` columns of a row: ``quantize_int4_rows``
  (``embedding_q4`` and the tied int4 LM head)
* ``codebook=NAME, bits=b, group=k``  binary / ternary / int2 / log4 codes, one scale per ``k``
  input rows: ``quantize_lut`` (``linear_lut``)

``axis`` is the axis a scale's values run along: 0 = down a column, 1 = along a row.

The VJP is the straight-through estimator (STE): ∂L/∂W := ∂L/∂fake_quant(W), the identity. It is
*not* the derivative of the forward — that is zero almost everywhere through ``round`` plus a term
through the max-abs scale — but of the identity, the smooth surrogate the rounding is treated as
noise around; training with it keeps moving the float weights the rounded ones come from. There
is no clipping region to zero out: every scale is max-abs, so no value falls outside the integer
range except int4's positive extreme (s = max|group| / 7.5 maps the group's largest value to 7.5,
stored as 7), which is off by at most half a step, like any rounding. So the STE is the identity
everywhere, clipped or not.

``fake_quant_act(x, group=k)`` is the same for activations: x rounded to int8 per ``k`` consecutive
values of its last axis with a max-abs scale, ``quantize_act_blocks`` — what ``linear_q8_0`` (the
int8 and W8A8 modes) does to its input at run time. A QAT graph reads such a linear's input
through it, so the fake-quant graph rounds activations where the packed graph does; its VJP is the
identity too, the straight-through view ``linear_q8_0``'s own VJP takes of the same rounding.
"""
from __future__ import annotations

import numpy as np

from . import register, require
from .cases import Case, add_cases, int8_grid
from .quant import (
    CODEBOOKS,
    dequantize_blocks,
    dequantize_lut,
    quantize_act_blocks,
    quantize_blocks,
    quantize_int4,
    quantize_lut,
    quantize_per_channel,
    unpack_int4,
)


def fake_quant(w, *, bits=8, group=0, axis=0, codebook=""):
    """W ↦ dequantize(quantize(W)) in W's dtype (see the module docstring for the formats)."""
    if codebook:                    # W (in, out) packed (out, in) with groups along inputs
        q, s = quantize_lut(np.ascontiguousarray(w.T), codebook, group)
        return np.ascontiguousarray(dequantize_lut(q, s, codebook, group).T).astype(w.dtype, copy=False)
    if axis == 1 and group:         # groups along each row: the transpose's column groups
        return np.ascontiguousarray(fake_quant(w.T, bits=bits, group=group, axis=0).T)
    if bits == 4:
        q, s = quantize_int4(w, group)
        r = dequantize_blocks(unpack_int4(q), s, group)
    elif group:
        q, s = quantize_blocks(w, group)
        r = dequantize_blocks(q, s, group)
    else:
        q, s = quantize_per_channel(w, axis)
        r = q.astype(s.dtype) * (s if axis == 0 else s[:, None])
    return r.astype(w.dtype, copy=False)


def fake_quant_vjp(grads, inputs, outputs, *, bits=8, group=0, axis=0, codebook=""):
    """Straight-through estimator: the cotangent passes through unchanged."""
    (g,) = grads
    return (g,)


def _infer(shapes, dtypes, *, bits=8, group=0, axis=0, codebook=""):
    (w,) = shapes
    op = "fake_quant"
    if codebook:
        require(codebook in CODEBOOKS, op, f"unknown codebook {codebook!r} (known: {', '.join(CODEBOOKS)})")
        cb_bits = CODEBOOKS[codebook][0]
        require(bits == cb_bits and axis == 0, op, f"codebook {codebook} is {cb_bits}-bit along axis 0, "
                                                   f"got bits={bits}, axis={axis}")
        require(group > 0 and group % (8 // cb_bits) == 0, op,
                f"codebook {codebook} needs a group that is a multiple of {8 // cb_bits}, got {group}")
    else:
        require(bits in (4, 8), op, f"bits must be 4 or 8, got {bits}")
    require(len(w) == 2, op, f"weight must be 2-D, got shape {w}")
    require(np.issubdtype(np.dtype(dtypes[0]), np.floating), op, f"weight must be float, got {dtypes[0]}")
    require(axis in (0, 1), op, f"axis must be 0 (scale per column) or 1 (per row), got {axis}")
    if bits == 4:
        require(group > 0 and group % 2 == 0, op, f"int4 needs an even group size, got {group}")
    if group:
        n = w[axis]
        require(n % group == 0, op, f"group size {group} does not divide the {n} {('rows', 'columns')[axis]} "
                                    f"(weight {w}, axis {axis})")
    return [(tuple(w), dtypes[0])]


register("fake_quant", fake_quant, fake_quant_vjp, _infer,
         flops=lambda shapes, outs, **a: 3 * int(np.prod(outs[0])), vjp_uses_outputs=False)


def fake_quant_act(x, *, group=32):
    """x ↦ q · s with ``quantize_act_blocks(x, group)``: int8 per ``group`` values of the last axis."""
    q, s = quantize_act_blocks(x, group)
    r = q.reshape(*x.shape[:-1], -1, group).astype(s.dtype) * s[..., None]
    return r.reshape(x.shape).astype(x.dtype, copy=False)


def fake_quant_act_vjp(grads, inputs, outputs, *, group=32):
    """Straight-through estimator, as for the weights (and as ``linear_q8_0``'s VJP in x)."""
    (g,) = grads
    return (g,)


def _infer_act(shapes, dtypes, *, group=32):
    (x,) = shapes
    op = "fake_quant_act"
    require(len(x) >= 1, op, f"input must have a last axis to group, got shape {x}")
    require(np.issubdtype(np.dtype(dtypes[0]), np.floating), op, f"input must be float, got {dtypes[0]}")
    require(group > 0 and x[-1] % group == 0, op, f"group size {group} does not divide the last axis {x[-1]} "
                                                  f"(input {x})")
    return [(tuple(x), dtypes[0])]


register("fake_quant_act", fake_quant_act, fake_quant_act_vjp, _infer_act,
         flops=lambda shapes, outs, **a: 3 * int(np.prod(outs[0])), vjp_uses_outputs=False)


def _int4_grid(r, shape, group, d):
    """n·2⁻³, |n| ≤ 7, with one ±7.5·2⁻³ per group: the scale is exactly 2⁻³ and the extreme sits
    exactly on the rounding tie in every dtype (a random extreme would round apart across dtypes)."""
    n = r.integers(-7, 8, shape).astype(np.float64)
    g = n.reshape(shape[0] // group, group, shape[1])
    g[:, 0] = np.where(r.random(g[:, 0].shape) < 0.5, -7.5, 7.5)
    return (n / 8).astype(d)


add_cases("fake_quant", [
    Case("int8 per column", lambda r, d: ((np.ascontiguousarray(int8_grid(r, (24, 40), d).T),), {})),
    Case("int8 per row", lambda r, d: ((int8_grid(r, (24, 40), d),), {"axis": 1})),
    Case("int8 blocks of 8", lambda r, d: ((np.ascontiguousarray(int8_grid(r, (24, 40), d, heads=5).T),),
                                           {"group": 8})),
    Case("int4 groups of 8", lambda r, d: ((_int4_grid(r, (40, 24), 8, d),), {"bits": 4, "group": 8})),
])


def _on_levels(name):
    """Weights already on the codebook's levels (one scale per group of 8): rounding is exact in
    every dtype, so a low-precision run and the float64 reference agree code for code."""
    def make(r, d):
        bits, levels = CODEBOOKS[name][0], np.asarray(CODEBOOKS[name][1])
        used = np.unique(levels)
        codes = r.integers(0, len(used), (40, 16))
        w = used[codes]
        w[0::8] = used[np.argmax(np.abs(used))]          # each group reaches the largest level
        if name in ("binary", "ternary"):
            w = np.sign(w) * (np.abs(w) > 0)             # one magnitude: mean-abs scales are exact
        return (w.astype(d),), {"bits": bits, "group": 8, "codebook": name}
    return make


add_cases("fake_quant", [Case(f"{name} codes, groups of 8", _on_levels(name)) for name in CODEBOOKS])
add_cases("fake_quant_act", [
    Case("blocks of 32", lambda r, d: ((int8_grid(r, (2, 3, 96), d, heads=3),), {"group": 32})),
    Case("one block per row", lambda r, d: ((int8_grid(r, (5, 40), d),), {"group": 40})),
    Case("an all-zero block", lambda r, d: ((np.concatenate([np.zeros((1, 16), d), int8_grid(r, (1, 16), d)], 1),),
                                           {"group": 16}), "zeros"),
    *[Case(f"{m} rows, blocks of 8", lambda r, d, m=m: ((int8_grid(r, (m, 24), d, heads=3),), {"group": 8}), "sizes")
      for m in (1, 7, 65)],
])
