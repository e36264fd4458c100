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

from . import register, require


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


def attention(q, k, v, past_k=None, past_v=None, mask=None, *, n_heads, n_kv_heads, causal, scale=None):
    """softmax(Q Kᵀ / √d + mask) V per head, with K, V = [past; new]; returns (out, K, V)."""
    K, V = concat_cache(k, v, past_k, past_v)
    p, _, _, _ = probs(q, K, mask, n_heads, n_kv_heads, causal, head_scale(q, n_heads, scale))
    return mix_values(p, V, n_heads, n_kv_heads, q.shape), K, V


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
         n_optional=3)
