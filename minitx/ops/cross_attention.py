"""Attention of queries over a *given* set of keys and values, with an optional additive bias.

The self-attention op (``attention``) makes its keys from the same tokens as its queries. An
encoder–decoder also needs queries from the decoder attending to keys/values computed once from
the encoder (cross-attention, masked by the encoder's padding mask), and T5 needs a learned
relative-position bias added to the scores. Both are this op:

    out = softmax(Q Kᵀ · scale + bias, over the allowed keys) V        per head

``k``/``v`` are (B, S, H·D) for any S; ``mask`` (B, S) marks real keys; ``causal`` lets query t
see keys 0 … S − T + t (T5's decoder self-attention over [past; new]); ``bias`` is
(1 or B, H, T, S). Heads: multi-head only (K/V have the queries' head count).
"""
from __future__ import annotations

import numpy as np

from . import register, require, unbroadcast, wide_forward, wide_vjp
from .attention import _heads, _merge, allowed_keys, head_scale
from .cases import Case, Make, add_cases, randn, tiny, viewed


def _probs(q, k, mask, bias, n_heads, causal, scale):
    B, T, _ = q.shape
    qh, kh = _heads(q, n_heads), _heads(k, n_heads)            # (B, H, T, D), (B, H, S, D)
    scores = (qh @ np.swapaxes(kh, -1, -2)) * scale
    if bias is not None:
        scores = scores + bias.astype(scores.dtype)
    keep = allowed_keys(T, k.shape[1], mask, causal, B)         # (B, 1, T, S)
    # A query with no allowed key (padding) gets uniform weights rather than NaN; it is unused.
    scores = np.where(keep, scores, np.finfo(scores.dtype).min)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True), keep, qh, kh


@wide_forward
def cross_attention(q, k, v, mask=None, bias=None, *, n_heads, causal=False, scale=None):
    """softmax(Q Kᵀ·scale + bias) V per head over the given keys/values (see the module doc)."""
    p, _, _, _ = _probs(q, k, mask, bias, n_heads, causal, head_scale(q, n_heads, scale))
    return _merge(p @ _heads(v, n_heads))


@wide_vjp
def cross_attention_vjp(grads, inputs, outputs, *, n_heads, causal=False, scale=None):
    (g,) = grads
    q, k, v, mask, bias = inputs
    scale = head_scale(q, n_heads, scale)
    p, keep, qh, kh = _probs(q, k, mask, bias, n_heads, causal, scale)
    go = _heads(g, n_heads)
    gv = _merge(np.swapaxes(p, -1, -2) @ go)
    gp = go @ np.swapaxes(_heads(v, n_heads), -1, -2)
    gs = np.where(keep, p * (gp - (gp * p).sum(axis=-1, keepdims=True)), 0)  # softmax VJP; dropped keys get none
    gbias = None if bias is None else unbroadcast(gs, bias.shape).astype(bias.dtype)
    gs = gs * scale
    return _merge(gs @ kh), _merge(np.swapaxes(gs, -1, -2) @ qh), gv, None, gbias


def cross_attention_infer(shapes, dtypes, *, n_heads, causal=False, scale=None):
    q, k, v, mask, bias = shapes
    op = "cross_attention"
    require(len(q) == 3 and len(k) == 3 and len(v) == 3, op, f"q, k, v must be (B, T, H·D), got {q}, {k}, {v}")
    require(q[-1] % n_heads == 0, op, f"q width {q[-1]} is not divisible by n_heads {n_heads}")
    require(not any("int" in str(d) for d in dtypes[:3]), op,
            f"q, k, v must be floating point, got {dtypes[:3]} (int8 K/V: cross_attention_kv8)")
    B, T, S = q[0], q[1], k[1]
    require(tuple(k) == (B, S, q[2]) and tuple(v) == (B, S, q[2]), op,
            f"k {k} and v {v} must be (batch {B}, S, width {q[2]})")
    require(not causal or S >= T, op, f"causal attention needs at least as many keys ({S}) as queries ({T})")
    if mask is not None:
        require(tuple(mask) == (B, S), op, f"mask {mask} must be (batch, keys) = {(B, S)}")
    if bias is not None:
        require(len(bias) == 4 and bias[0] in (1, B) and tuple(bias[1:]) == (n_heads, T, S), op,
                f"bias {bias} must be (1 or {B}, {n_heads}, {T}, {S})")
    return [(tuple(q), dtypes[0])]


def cross_attention_flops(shapes, outs, *, n_heads, causal=False, scale=None):
    (B, T, C), S = shapes[0], shapes[1][1]
    return 4 * B * T * S * C + 5 * B * n_heads * T * S


register("cross_attention", cross_attention, cross_attention_vjp, cross_attention_infer,
         flops=cross_attention_flops, nondiff=(3,), n_optional=2, vjp_uses_outputs=False)


def _cross_inputs(B: int, T: int, S: int, H: int, D: int, *, pad: bool = False, bias: str | None = None,
                  causal: bool = False, dead_row: bool = False, scale: float = 1.0, subnormal: bool = False) -> Make:
    """q (B, T, H·D) over k, v (B, S, H·D). ``pad`` right-pads the sources by different lengths
    (an encoder's padding mask); ``dead_row`` masks batch row 0 entirely; ``bias`` is "shared"
    (1, H, T, S) or "per-row" (B, H, T, S), T5's position bias (its scale is then 1); ``scale``
    shapes q so that scores reach a given magnitude; ``subnormal`` makes q, k and v subnormal (the
    scores underflow to zero: uniform weights over subnormal values)."""
    def make(r, d):
        t = tiny(d) if subnormal else 1.0
        q = randn(r, (B, T, H * D), d, scale * t)
        k, v = randn(r, (B, S, H * D), d, t), randn(r, (B, S, H * D), d, t)
        mask = None
        if pad or dead_row:
            mask = np.ones((B, S), np.int64)
            for b in range(B):
                mask[b, S - b % S:] = 0  # right padding of different lengths per row
            if dead_row:
                mask[0] = 0
        bb = None if bias is None else randn(r, (1 if bias == "shared" else B, H, T, S), d, 2.0)
        attrs = {"n_heads": H, "causal": causal, **({"scale": 1.0} if bias else {})}
        return (q, k, v, mask, bb), attrs
    return make


add_cases("cross_attention", [
    Case("decoder over encoder, 2 heads", _cross_inputs(2, 5, 7, 2, 8)),
    Case("decoder over padded encoder", _cross_inputs(3, 4, 9, 4, 8, pad=True)),
    Case("T5 encoder self-attention, shared bias, padding", _cross_inputs(2, 6, 6, 2, 8, pad=True, bias="shared")),
    Case("T5 decoder, causal over past + new, per-row bias", _cross_inputs(2, 3, 8, 2, 4, causal=True, bias="per-row")),
    Case("decode step over padded encoder", _cross_inputs(3, 1, 11, 4, 16, pad=True)),
    Case("fully padded source row", _cross_inputs(2, 3, 5, 2, 4, dead_row=True), "masked"),
    Case("fully padded source row, with bias", _cross_inputs(3, 4, 6, 2, 4, dead_row=True, bias="shared"), "masked"),
    Case("large scores", _cross_inputs(2, 4, 9, 2, 8, pad=True, scale=12.0), "large"),
    Case("zero queries (uniform)", _cross_inputs(2, 5, 7, 2, 8, scale=0.0), "zeros"),
    Case("subnormal q, k, v over padded encoder", _cross_inputs(2, 4, 9, 2, 8, pad=True, subnormal=True), "tiny"),
    *[Case(f"{t} queries over {s} keys", _cross_inputs(1, t, s, 2, 8, pad=False), "sizes")
      for t, s in ((1, 1), (7, 9), (8, 8), (9, 17), (17, 65))],
    Case("batch 1", _cross_inputs(1, 3, 5, 2, 8), "batch"),
    Case("batch 16, padded", _cross_inputs(16, 2, 6, 2, 4, pad=True), "batch"),
    viewed(Case("decoder over padded encoder", _cross_inputs(3, 4, 9, 4, 8, pad=True))),
])


# ------------------------------------------------------------------ int8 K/V (the quant plugin's kv=int8)
# An encoder–decoder keeps two kinds of cache: the decoder's self-attention K/V, growing by one
# token per step, and the cross-attention K/V, computed once per input from the encoder output
# and read by every step. With ``kv=int8`` both are int8 with a float scale per token and head
# (the decoder-only ``attention_kv8``'s format, minitx/ops/quant.py): ``quantize_heads`` rounds
# them once where they are made, and ``cross_attention_kv8`` reads them.
from .quant import _scale_vjp, dequantize_heads, quantize_heads  # noqa: E402
from .cases import int8_grid  # noqa: E402


def quantize_heads_op(x, *, n_heads):
    """(B, T, H·D) → (int8 (B, T, H·D), scale (B, T, H)): symmetric int8, one scale per token and
    head (max |x| / 127 over the head's D values; an all-zero head has scale 0)."""
    return quantize_heads(x, n_heads)


def quantize_heads_vjp(grads, inputs, outputs, *, n_heads):
    # The int8 values are round(x / s): flat almost everywhere, no gradient. The scale moves with
    # the one element of largest magnitude in its head.
    _, g_scale = grads
    (x,) = inputs
    B, T, HD = x.shape
    return (_scale_vjp(x.reshape(B, T, n_heads, HD // n_heads), g_scale[..., None]).reshape(B, T, HD),)


def quantize_heads_infer(shapes, dtypes, *, n_heads):
    (x,) = shapes
    op = "quantize_heads"
    require(len(x) == 3 and x[-1] % n_heads == 0, op, f"x must be (B, T, H·D) with H = {n_heads}, got {x}")
    require(str(dtypes[0]).startswith("float"), op, f"x must be floating point, got {dtypes[0]}")
    return [(tuple(x), "int8"), ((x[0], x[1], n_heads), dtypes[0])]


register("quantize_heads", quantize_heads_op, quantize_heads_vjp, quantize_heads_infer,
         flops=lambda s, o, **a: 3 * int(np.prod(s[0])), vjp_uses_outputs=False)


@wide_forward
def cross_attention_kv8(q, k, k_scale, v, v_scale, mask=None, bias=None, *, n_heads, causal=False, scale=None):
    """``cross_attention`` over int8 keys/values with a scale per token and head:
    softmax(Q (K·s_k)ᵀ · scale + bias) (V·s_v) per head (see the module doc)."""
    return cross_attention(q, dequantize_heads(k, k_scale), dequantize_heads(v, v_scale), mask, bias,
                           n_heads=n_heads, causal=causal, scale=scale)


@wide_vjp
def cross_attention_kv8_vjp(grads, inputs, outputs, *, n_heads, causal=False, scale=None):
    q, k, ks, v, vs, mask, bias = inputs
    kd, vd = dequantize_heads(k, ks), dequantize_heads(v, vs)
    gq, gkd, gvd, _, gbias = cross_attention_vjp(grads, (q, kd, vd, mask, bias), None, n_heads=n_heads,
                                                 causal=causal, scale=scale)

    def scale_grad(x, g):   # d(x·s)/ds summed over the head's D values
        B, S, HD = x.shape
        return (g.reshape(B, S, n_heads, HD // n_heads) * x.reshape(B, S, n_heads, HD // n_heads)).sum(-1)
    return gq, None, scale_grad(k, gkd), None, scale_grad(v, gvd), None, gbias


def cross_attention_kv8_infer(shapes, dtypes, *, n_heads, causal=False, scale=None):
    q, k, ks, v, vs, mask, bias = shapes
    op = "cross_attention_kv8"
    require(str(dtypes[1]) == "int8" and str(dtypes[3]) == "int8", op,
            f"k and v must be int8, got {dtypes[1]}/{dtypes[3]}")
    require(len(k) == 3, op, f"k must be (B, S, H·D), got {k}")
    want = (k[0], k[1], n_heads)
    require(tuple(ks) == want and tuple(vs) == want, op, f"scales {ks}/{vs} must be (batch, keys, heads) = {want}")
    return cross_attention_infer([q, k, v, mask, bias], [dtypes[0], dtypes[0], dtypes[0], None, None],
                                 n_heads=n_heads, causal=causal, scale=scale)


def cross_attention_kv8_flops(shapes, outs, **attrs):
    return cross_attention_flops([shapes[0], shapes[1]], outs, **attrs) + 2 * 2 * int(np.prod(shapes[1]))


register("cross_attention_kv8", cross_attention_kv8, cross_attention_kv8_vjp, cross_attention_kv8_infer,
         flops=cross_attention_kv8_flops, nondiff=(1, 3, 5), n_optional=2, vjp_uses_outputs=False)


def _kv8_case(B: int, T: int, S: int, H: int, D: int, **kw) -> Make:
    """``_cross_inputs``' configuration with K/V on the int8 grid of each head, quantized (exactly,
    in every dtype) to int8 plus scales: the spec in float64 and a kernel in float16 read the same."""
    base = _cross_inputs(B, T, S, H, D, **kw)

    def make(r, d):
        (q, k, v, mask, bias), attrs = base(r, d)
        # the grid's values reach ±16; 1/8 of them (exact) keeps the scores randn-sized
        kq, ks = quantize_heads(int8_grid(r, k.shape, d, H) / 8, H)
        vq, vs = quantize_heads(int8_grid(r, v.shape, d, H) / 8, H)
        return (q, kq, ks, vq, vs, mask, bias), attrs
    return make


def _quantize_case(B: int, T: int, H: int, D: int, zero_head: bool = False) -> Make:
    """x on each head's int8 grid: its quantization is exact in every dtype."""
    def make(r, d):
        x = int8_grid(r, (B, T, H * D), d, H)
        if zero_head:
            x[:, :, :D] = 0   # an all-zero head: scale 0, values 0
        return (x,), {"n_heads": H}
    return make


add_cases("quantize_heads", [
    Case("encoder output, 4 heads", _quantize_case(2, 9, 4, 16)),
    Case("one decode token", _quantize_case(3, 1, 2, 8)),
    Case("an all-zero head", _quantize_case(2, 3, 2, 4, zero_head=True), "zeros"),
    *[Case(f"{t} tokens, D {d}", _quantize_case(1, t, 2, d), "sizes") for t, d in ((1, 1), (7, 3), (65, 9))],
    Case("batch 16", _quantize_case(16, 2, 2, 4), "batch"),
    viewed(Case("encoder output, 4 heads", _quantize_case(2, 9, 4, 16))),
])
add_cases("cross_attention_kv8", [
    Case("decoder over int8 encoder K/V", _kv8_case(2, 5, 7, 2, 8)),
    Case("decode step over padded int8 encoder K/V", _kv8_case(3, 1, 11, 4, 16, pad=True)),
    Case("T5 decoder, causal over int8 past + new, per-row bias", _kv8_case(2, 3, 8, 2, 4, causal=True,
                                                                            bias="per-row")),
    Case("T5 decode step, shared bias", _kv8_case(2, 1, 6, 2, 8, causal=True, bias="shared")),
    Case("fully padded source row", _kv8_case(2, 3, 5, 2, 4, dead_row=True), "masked"),
    Case("fully padded source row, with bias", _kv8_case(3, 1, 6, 2, 4, dead_row=True, bias="shared"), "masked"),
    Case("large scores", _kv8_case(2, 4, 9, 2, 8, pad=True, scale=12.0), "large"),
    Case("zero queries (uniform)", _kv8_case(2, 5, 7, 2, 8, scale=0.0), "zeros"),
    *[Case(f"{t} queries over {s} keys", _kv8_case(1, t, s, 2, 8), "sizes")
      for t, s in ((1, 1), (7, 9), (9, 17), (17, 65))],
    Case("batch 16, padded", _kv8_case(16, 1, 6, 2, 4, pad=True), "batch"),
    viewed(Case("decode step over padded int8 encoder K/V", _kv8_case(3, 1, 11, 4, 16, pad=True))),
])
