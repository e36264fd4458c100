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

from . import register, require, unbroadcast
from .attention import _heads, _merge, allowed_keys, head_scale


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


def cross_attention(q, k, v, mask=None, bias=None, *, n_heads, causal=False, scale=None):
    """softmax(Q Kᵀ·scale + bias) V per head over the given keys/values (see the module doc)."""
    p, _, _, _ = _probs(q, k, mask, bias, n_heads, causal, head_scale(q, n_heads, scale))
    return _merge(p @ _heads(v, n_heads))


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
