"""Scaled dot-product attention, multi-head and grouped-query, with masks and a KV cache.

Layout: activations stay (batch, time, heads·head_dim), the layout the linears produce, so no
reshape or transpose ops appear in the graph. Keys and values have ``n_kv_heads`` heads; each
group of ``n_heads / n_kv_heads`` query heads shares one (grouped-query attention; MHA when equal).

The KV cache is explicit: ``past_k``/``past_v`` (batch, S, n_kv_heads·head_dim) come in, and the
op returns the concatenated ``present_k``/``present_v`` the next step feeds back. ``mask`` is a
key-padding mask over all S + T key positions (1 = attend). ``causal`` lets query t (absolute
position S + t) see keys 0 … S + t.
"""
from __future__ import annotations

import numpy as np

from typing import Callable

from . import register, require, wide_forward, wide_vjp
from .cases import Case, Make, add_cases, randn, viewed


def _heads(x, n):
    """(B, T, n·D) → (B, n, T, D)."""
    B, T, HD = x.shape
    return x.reshape(B, T, n, HD // n).transpose(0, 2, 1, 3)


def _merge(x):
    """(B, n, T, D) → (B, T, n·D)."""
    B, n, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, n * D)


def allowed_keys(T, S_total, mask, causal, batch):
    """Boolean (B, 1, T, S_total): which key each query may attend to."""
    allowed = np.ones((batch, 1, T, S_total), dtype=bool)
    if causal:
        past = S_total - T
        allowed &= (np.arange(S_total)[None, :] <= past + np.arange(T)[:, None])[None, None]
    if mask is not None:
        allowed &= mask.astype(bool)[:, None, None, :]
    return allowed


def probs(q, K, mask, n_heads, n_kv_heads, causal, scale, restrict=None):
    """Attention probabilities P (B, Hkv, G, T, S): softmax(QKᵀ·scale) over the kept keys.

    Kept keys are the causal/padding-allowed ones, narrowed further by ``restrict(scores, keep)``
    when given (the sparse patterns). Returns (P, keep, Q heads, K heads) for the VJP.
    """
    B, T, _ = q.shape
    G = n_heads // n_kv_heads
    qh = _heads(q, n_heads).reshape(B, n_kv_heads, G, T, -1)
    kh = _heads(K, n_kv_heads)[:, :, None]  # (B, Hkv, 1, S, D)
    scores = (qh @ np.swapaxes(kh, -1, -2)) * scale
    keep = allowed_keys(T, K.shape[1], mask, causal, B)[:, :, None]
    if restrict is not None:
        keep = restrict(scores, keep)
    # A row with no kept key (a padding query) becomes uniform instead of NaN; its output is unused.
    scores = np.where(keep, scores, np.finfo(scores.dtype).min)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True), keep, qh, kh


def concat_cache(k, v, past_k, past_v):
    """K, V = [past; new] along time."""
    K = k if past_k is None else np.concatenate([past_k, k], axis=1)
    V = v if past_v is None else np.concatenate([past_v, v], axis=1)
    return K, V


def head_scale(q, n_heads, scale):
    return q.dtype.type(1.0 / np.sqrt(q.shape[-1] // n_heads) if scale is None else scale)


def mix_values(p, V, n_heads, n_kv_heads, q_shape):
    """P V per head, merged back to (B, T, H·D)."""
    B, T, HD = q_shape
    vh = _heads(V, n_kv_heads)[:, :, None]  # (B, Hkv, 1, S, D)
    return _merge((p @ vh).reshape(B, n_heads, T, HD // n_heads))


def probs_vjp(grads, inputs, outputs, p, keep, qh, kh, n_heads, n_kv_heads, scale):
    """The VJP of (out, K, V) given the forward's probabilities; keys that were not kept get none."""
    g_out, g_K, g_V = grads
    q, k, v, past_k, past_v, mask = inputs
    _, K, V = outputs
    B, T, _ = q.shape
    D = q.shape[-1] // n_heads
    G = n_heads // n_kv_heads
    vh = _heads(V, n_kv_heads)[:, :, None]
    go = _heads(g_out, n_heads).reshape(B, n_kv_heads, G, T, D)
    gV = _merge((np.swapaxes(p, -1, -2) @ go).sum(axis=2))      # Σ over the group's query heads
    gp = go @ np.swapaxes(vh, -1, -2)
    gs = p * (gp - (gp * p).sum(axis=-1, keepdims=True)) * scale  # softmax VJP, then the scale
    # Scores of dropped keys never reach the output; a fully masked row's output is a constant.
    gs = np.where(keep, gs, 0)
    gq = _merge((gs @ kh).reshape(B, n_heads, T, D))
    gK = _merge((np.swapaxes(gs, -1, -2) @ qh).sum(axis=2))
    gK, gV = gK + g_K, gV + g_V
    S = K.shape[1] - T
    return (gq, gK[:, S:], gV[:, S:],
            None if past_k is None else gK[:, :S], None if past_v is None else gV[:, :S], None)


@wide_forward
def attention(q, k, v, past_k=None, past_v=None, mask=None, *, n_heads, n_kv_heads, causal, scale=None):
    """softmax(Q Kᵀ / √d + mask) V per head, with K, V = [past; new]; returns (out, K, V)."""
    K, V = concat_cache(k, v, past_k, past_v)
    p, _, _, _ = probs(q, K, mask, n_heads, n_kv_heads, causal, head_scale(q, n_heads, scale))
    return mix_values(p, V, n_heads, n_kv_heads, q.shape), K, V


@wide_vjp
def attention_vjp(grads, inputs, outputs, *, n_heads, n_kv_heads, causal, scale=None):
    q, mask, K = inputs[0], inputs[5], outputs[1]
    scale = head_scale(q, n_heads, scale)
    p, keep, qh, kh = probs(q, K, mask, n_heads, n_kv_heads, causal, scale)
    return probs_vjp(grads, inputs, outputs, p, keep, qh, kh, n_heads, n_kv_heads, scale)


def attention_infer(shapes, dtypes, *, n_heads, n_kv_heads, causal, scale=None):
    q, k, v, pk, pv, mask = shapes
    op = "attention"
    require(len(q) == 3 and len(k) == 3 and len(v) == 3, op, f"q, k, v must be (B, T, H·D), got {q}, {k}, {v}")
    require(n_heads % n_kv_heads == 0, op, f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    require(q[-1] % n_heads == 0, op, f"q width {q[-1]} is not divisible by n_heads {n_heads}")
    D = q[-1] // n_heads
    kv = (q[0], q[1], n_kv_heads * D)
    require(tuple(k) == kv and tuple(v) == kv, op, f"k {k} and v {v} must be {kv} for {n_kv_heads} kv heads of {D}")
    require((pk is None) == (pv is None), op, "past_k and past_v come together")
    S = 0
    if pk is not None:
        require(len(pk) == 3 and pk[0] == q[0] and pk[2] == kv[2] and tuple(pv) == tuple(pk), op,
                f"past_k {pk} / past_v {pv} must be ({q[0]}, S, {kv[2]})")
        S = pk[1]
    if mask is not None:
        require(tuple(mask) == (q[0], S + q[1]), op, f"mask {mask} must be (batch, past + new) = {(q[0], S + q[1])}")
    present = ((q[0], S + q[1], kv[2]), dtypes[1])
    return [(tuple(q), dtypes[0]), present, present]


def attention_flops(shapes, outs, *, n_heads, n_kv_heads, causal, scale=None):
    q = shapes[0]
    S = outs[1][1]
    return 4 * q[0] * q[1] * S * q[2] + 5 * q[0] * n_heads * q[1] * S


register("attention", attention, attention_vjp, attention_infer, flops=attention_flops, nondiff=(5,),
         n_optional=3, may_alias=True)  # without a cache, present_k/v are k/v themselves


def attention_inputs(B: int, T: int, S: int, H: int, KV: int, D: int, causal: bool, pad: bool, cache: bool,
                     dead_row: bool = False, scale: float = 1.0, offset: float = 0.0) -> Make:
    """Build attention inputs: (q, k, v, past_k, past_v, mask) and the attributes. ``pad`` left-pads
    each row by a different length; ``dead_row`` masks row 0 entirely (the spec averages it
    uniformly); ``scale``/``offset`` shape q so that scores reach a given magnitude."""
    def make(r, d):
        q = randn(r, (B, T, H * D), d, scale, offset)
        k, v = randn(r, (B, T, KV * D), d), randn(r, (B, T, KV * D), d)
        pk = randn(r, (B, S, KV * D), d) if cache else None
        pv = randn(r, (B, S, KV * D), d) if cache else None
        mask = None
        if pad:
            mask = np.ones((B, S + T), np.int64)
            for b in range(B):
                mask[b, : b % (S + T)] = 0  # left padding of different lengths per row
            if dead_row:
                mask[0] = 0
        return (q, k, v, pk, pv, mask), {"n_heads": H, "n_kv_heads": KV, "causal": causal}
    return make


def attention_cases(build: Callable[..., Make] = attention_inputs) -> list[Case]:
    """The situations an attention kernel meets, for ``attention`` and its variants (``build``
    turns the float inputs into the variant's): decode over a cache, prefill after a cache,
    padding, fully masked rows, query counts on both sides of the decode/prefill switch, scores
    near exp overflow, grouped-query heads."""
    c = [
        Case("MHA causal prefill", build(2, 9, 0, 4, 4, 8, True, False, False)),
        Case("GQA decode, cache + padding", build(3, 1, 11, 6, 2, 16, True, True, True)),
        Case("GQA prefill after cache, padding", build(2, 5, 4, 4, 2, 8, True, True, True)),
        Case("bidirectional, padding", build(3, 7, 0, 2, 2, 8, False, True, False)),
        Case("fully masked row", build(2, 3, 0, 2, 1, 4, False, True, False, dead_row=True), "masked"),
        # From 8 queries on, backends may switch to a prefill kernel: the same situations, longer.
        Case("prefill, left padding", build(3, 10, 0, 4, 4, 8, True, True, False)),
        Case("GQA prefill after cache, padding, 12 q", build(2, 12, 5, 4, 2, 8, True, True, True)),
        Case("bidirectional, padding, 10 q", build(3, 10, 0, 2, 2, 8, False, True, False)),
        Case("fully masked row, 9 q", build(2, 9, 0, 2, 1, 4, False, True, False, dead_row=True), "masked"),
        Case("decode, large scores", build(2, 1, 9, 2, 2, 8, True, True, True, scale=12.0), "large"),
        Case("prefill, large scores", build(2, 9, 0, 2, 2, 8, True, False, False, scale=12.0), "large"),
        Case("zero queries (uniform)", build(2, 5, 3, 2, 1, 8, True, False, True, scale=0.0), "zeros"),
        *[Case(f"{t} queries over {t + 2} cached", build(1, t, t + 2, 2, 1, 8, True, False, True), "sizes")
          for t in (1, 7, 8, 9, 17)],
        Case("batch 1, decode", build(1, 1, 5, 4, 2, 8, True, False, True), "batch"),
        Case("batch 16, decode", build(16, 1, 6, 2, 2, 4, True, True, True), "batch"),
    ]
    return c + [viewed(c[2])]


add_cases("attention", attention_cases() + [
    Case("large (parallel)", attention_inputs(2, 64, 0, 8, 4, 64, True, False, False))])


@wide_forward
def attention_probs(q, k, mask=None, *, n_heads, n_kv_heads, causal, scale=None, n_maps=None):
    """The attention op's probabilities softmax(Q Kᵀ·scale) over allowed keys, (B, n_maps, T, S):
    per head (n_maps = n_heads, the default) or averaged over contiguous groups of n_heads / n_maps
    heads, so models with different head counts can be compared map for map."""
    B, T, _ = q.shape
    D = q.shape[-1] // n_heads
    m = n_maps or n_heads
    sc = q.dtype.type(1.0 / np.sqrt(D) if scale is None else scale)
    p, _, _, _ = probs(q, k, mask, n_heads, n_kv_heads, causal, sc)
    p = p.reshape(B, m, n_heads // m, T, k.shape[1])
    return p.mean(axis=2) if n_heads != m else p[:, :, 0]


@wide_vjp
def attention_probs_vjp(grads, inputs, outputs, *, n_heads, n_kv_heads, causal, scale=None, n_maps=None):
    (g,) = grads
    q, k, mask = inputs
    B, T, _ = q.shape
    D = q.shape[-1] // n_heads
    m = n_maps or n_heads
    sc = q.dtype.type(1.0 / np.sqrt(D) if scale is None else scale)
    p, _, qh, kh = probs(q, k, mask, n_heads, n_kv_heads, causal, sc)
    gp = (np.repeat(g, n_heads // m, axis=1) / (n_heads // m)).reshape(p.shape)
    gs = p * (gp - (gp * p).sum(axis=-1, keepdims=True)) * sc      # softmax VJP, then the scale
    gs = np.where(allowed_keys(T, k.shape[1], mask, causal, B)[:, :, None], gs, 0)
    gq = _merge((gs @ kh).reshape(B, n_heads, T, D))
    gk = _merge((np.swapaxes(gs, -1, -2) @ qh).sum(axis=2))
    return gq.astype(q.dtype), gk.astype(k.dtype), None


def attention_probs_infer(shapes, dtypes, *, n_heads, n_kv_heads, causal, scale=None, n_maps=None):
    q, k, mask = shapes
    op = "attention_probs"
    require(len(q) == 3 and len(k) == 3, op, f"q, k must be (B, T, H·D), got {q}, {k}")
    require(n_heads % n_kv_heads == 0, op, f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    require(q[-1] % n_heads == 0, op, f"q width {q[-1]} is not divisible by n_heads {n_heads}")
    m = n_maps or n_heads
    require(n_heads % m == 0, op, f"n_heads {n_heads} is not a multiple of n_maps {m}")
    kv = n_kv_heads * (q[-1] // n_heads)
    require(k[0] == q[0] and k[2] == kv, op, f"k {k} must be ({q[0]}, S, {kv}) for {n_kv_heads} kv heads")
    if mask is not None:
        require(tuple(mask) == (q[0], k[1]), op, f"mask {mask} must be (batch, keys) = {(q[0], k[1])}")
    return [((q[0], m, q[1], k[1]), dtypes[0])]


def attention_probs_flops(shapes, outs, *, n_heads, **attrs):
    (B, T, HD), S = shapes[0], shapes[1][1]
    return 2 * B * T * S * HD + 5 * B * n_heads * T * S    # Q Kᵀ, then the softmax


register("attention_probs", attention_probs, attention_probs_vjp, attention_probs_infer, flops=attention_probs_flops,
         nondiff=(2,), n_optional=1, vjp_uses_outputs=False)
def _probs_inputs(B: int, T: int, H: int, KV: int, causal: bool, pad: bool, dead_row: bool = False,
                  **attrs) -> Make:
    """attention_probs takes (q, k, mask) of an attention call."""
    base = attention_inputs(B, T, 0, H, KV, 8, causal, pad, False, dead_row)

    def make(r, d):
        (q, k, _, _, _, mask), a = base(r, d)
        return (q, k, mask), {**a, **attrs}
    return make


add_cases("attention_probs", [
    Case("causal, per head", _probs_inputs(2, 6, 4, 2, True, False)),
    Case("padded, heads averaged in pairs", _probs_inputs(3, 5, 4, 4, False, True, n_maps=2)),
    Case("fully masked row", _probs_inputs(2, 5, 2, 1, False, True, dead_row=True), "masked"),
])
