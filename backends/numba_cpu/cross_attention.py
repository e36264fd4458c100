"""Cross-attention (and T5's biased self-attention): scores → bias → mask → softmax → PV.

Spec: minitx/ops/cross_attention.py (also ``cross_attention_kv8``, the same over int8 K/V with a
scale per token and head, and ``quantize_heads``, which makes them: the quant plugin's kv=int8). Same semantics: ``k``/``v`` are given (B, S, H·D),
``bias`` (1 or B, H, T, S) is added to the scaled scores, ``mask`` (B, S) removes padded keys,
``causal`` lets query t see keys 0 … S − T + t, and a query with no visible key averages all S
values uniformly (the spec's fully-masked row).

Without a bias this is exactly attention.py's ``sdpa`` over a full cache (same causal offset,
mask and dead-row rule, K/V heads = query heads), so that tuned pair of kernels (per-query for
decode, online-softmax blocks for prefill) runs it. With T5's bias: few queries (a decode step)
take :func:`_biased`, one task per (batch, head, query) in ``_sdpa``'s style; many queries (the
encoder, a decoder prefill) take the spec's batched BLAS products, which a per-query numba loop
did not beat (this module's first version, one plain loop for every case, measured in-process,
1 thread, T = S = 128, 8 heads of 64: spec 1.8 ms, kernel 11 ms; for 4 × 32 queries over 256
keys 4.6 ms vs 23 ms). Decode steps gain 1.3–1.9x over the spec (same setting, noisy machine).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from minitx.ops import cross_attention as spec

from ._jit import kernel, pick
from ._vmath import dot4, exp
from .attention import NO_SCALES, PREFILL_MIN_QUERIES, _mix_values, mean_values, sdpa


def _biased(q, K, KS, V, VS, quantized, mask, has_mask, bias, causal, scale, H, zero, out):
    """One task per (batch, head, query): four keys per pass share the loads of q, the bias row is
    added to the scaled scores, and the values are mixed four rows per pass (``_mix_values``).
    ``quantized``: K and V are int8 with a scale per token and head in KS / VS (B, S, H), applied
    to each score before the bias and to each softmax weight, as attention.py's ``_sdpa`` does."""
    B, T, HD = q.shape
    S = K.shape[1]
    D = HD // H
    past = S - T
    ninf = zero - np.float32(np.inf)
    for task in prange(B * H * T):
        b = task // (H * T)
        h = (task // T) % H
        t = task % T
        lo = h * D
        qh = q[b, t, lo:lo + D]
        o = out[b, t, lo:lo + D]
        brow = bias[b if bias.shape[0] > 1 else 0, h, t]
        n = past + t + 1 if causal else S   # keys 0 … n − 1 may be seen
        sc = np.empty(max(n, 1), q.dtype)
        s = 0
        while s + 4 <= n:
            k0, k1, k2, k3 = K[b, s, lo:lo + D], K[b, s + 1, lo:lo + D], K[b, s + 2, lo:lo + D], K[b, s + 3, lo:lo + D]
            a0, a1, a2, a3 = dot4(qh, k0, k1, k2, k3, D, zero)
            sc[s], sc[s + 1] = a0 * scale + brow[s], a1 * scale + brow[s + 1]
            sc[s + 2], sc[s + 3] = a2 * scale + brow[s + 2], a3 * scale + brow[s + 3]
            s += 4
        while s < n:
            ks = K[b, s, lo:lo + D]
            a = zero
            for d in range(D):
                a += qh[d] * ks[d]
            sc[s] = a * scale + brow[s]
            s += 1
        if quantized:   # (q·k·s_k)·scale + bias: undo the bias, rescale, add it back
            for s in range(n):
                sc[s] = (sc[s] - brow[s]) * KS[b, s, h] + brow[s]
        m = ninf
        for s in range(n):
            if has_mask and mask[b, s] == 0:
                sc[s] = ninf
            elif sc[s] > m:
                m = sc[s]
        for d in range(D):
            o[d] = zero
        if m == ninf:  # nothing visible: uniform over all keys, like the spec
            mean_values(V, VS, quantized, b, h, S, o)
            continue
        total = zero
        for s in range(n):
            p = exp(sc[s] - m)   # a masked key: exp(−inf) = 0
            sc[s] = p
            total += p
        if quantized:
            for s in range(n):
                sc[s] *= VS[b, s, h]
        _mix_values(sc, n, V[b], 0, lo, o)
        inv = 1.0 / total
        for d in range(D):
            o[d] = o[d] * inv


_BIASED = kernel(_biased)
_NO_MASK = np.zeros((1, 1), np.int64)


def cross_attention(q, k, v, mask=None, bias=None, *, n_heads, causal=False, scale=None):
    if bias is None:
        return sdpa(q, np.ascontiguousarray(k, q.dtype), None, np.ascontiguousarray(v, q.dtype), None, mask,
                    n_heads=n_heads, n_kv_heads=n_heads, causal=causal, scale=scale)
    if q.shape[1] >= PREFILL_MIN_QUERIES:
        return spec.cross_attention(q, k, v, mask, bias, n_heads=n_heads, causal=causal, scale=scale)
    qc = np.ascontiguousarray(q)
    dt = qc.dtype
    sc = dt.type(1.0 / np.sqrt(q.shape[-1] // n_heads) if scale is None else scale)
    K, V = np.ascontiguousarray(k, dt), np.ascontiguousarray(v, dt)
    has_mask = mask is not None
    m = np.ascontiguousarray(mask, dtype=np.int64) if has_mask else _NO_MASK
    out = np.empty_like(qc)
    work = q.shape[0] * q.shape[1] * max(k.shape[1], 1) * q.shape[2]
    pick(_BIASED, work)(qc, K, NO_SCALES, V, NO_SCALES, False, m, has_mask, np.ascontiguousarray(bias, dtype=dt),
                        bool(causal), sc, n_heads, dt.type(0), out)
    return out


def cross_attention_kv8(q, k, k_scale, v, v_scale, mask=None, bias=None, *, n_heads, causal=False, scale=None):
    """Over int8 K/V: without a bias attention.py's per-query ``_sdpa`` reads the int8 rows with
    their scales (the decoder's cross-attention); with T5's bias a decode step takes
    :func:`_biased` the same way, and many queries the spec (dequantize, then BLAS), as above."""
    dt = q.dtype
    KS, VS = np.ascontiguousarray(k_scale, dt), np.ascontiguousarray(v_scale, dt)
    K, V = np.ascontiguousarray(k), np.ascontiguousarray(v)
    if bias is None:
        return sdpa(q, K, KS, V, VS, mask, n_heads=n_heads, n_kv_heads=n_heads, causal=causal, scale=scale)
    if q.shape[1] >= PREFILL_MIN_QUERIES:
        return spec.cross_attention_kv8(q, k, k_scale, v, v_scale, mask, bias, n_heads=n_heads, causal=causal,
                                        scale=scale)
    qc = np.ascontiguousarray(q)
    sc = dt.type(1.0 / np.sqrt(q.shape[-1] // n_heads) if scale is None else scale)
    has_mask = mask is not None
    m = np.ascontiguousarray(mask, dtype=np.int64) if has_mask else _NO_MASK
    out = np.empty_like(qc)
    work = q.shape[0] * q.shape[1] * max(k.shape[1], 1) * q.shape[2]
    pick(_BIASED, work)(qc, K, KS, V, VS, True, m, has_mask, np.ascontiguousarray(bias, dtype=dt), bool(causal), sc,
                        n_heads, dt.type(0), out)
    return out


def _quantize(x, q, s):
    R, H, D = x.shape
    for task in prange(R * H):
        r = task // H
        h = task % H
        m = abs(x[r, h, 0])
        for d in range(1, D):
            a = abs(x[r, h, d])
            if a > m:
                m = a
        s[r, h] = m / 127 if m > 0 else 0
        div = s[r, h]            # the stored (rounded) scale, in x's dtype; 0 (a zero or
        if not div > 0:          # underflowing head) divides by 1, as the spec does
            div = div * 0 + 1
        yb = np.empty(D, x.dtype)
        for d in range(D):
            yb[d] = x[r, h, d] / div   # stored in x's dtype: numba divides float32s in float64
        for d in range(D):
            y = yb[d]
            v = np.floor(y)    # round half to even, as NumPy's rint (numba's scalar rint rounds
            f = y - v          # halves away from zero)
            if f > 0.5 or (f == 0.5 and v % 2 != 0):
                v += 1
            q[r, h, d] = np.int8(min(max(v, -127), 127))


# No fastmath: x / s must round exactly as the spec's division does (``arcp`` would multiply by
# 1/s, which can round a value on a .5 edge the other way), so the int8 values equal the spec's.
# Parallel for an encoder output, serial for a decode step's few rows.
_QUANTIZE = kernel(_quantize, fastmath=False)


def quantize_heads(x, *, n_heads):
    """int8 per token and head in one pass over x (the spec's max, divide, round and clip are four)."""
    B, T, HD = x.shape
    xc = np.ascontiguousarray(x).reshape(B * T, n_heads, HD // n_heads)
    q = np.empty((B * T, n_heads, HD // n_heads), np.int8)
    s = np.empty((B * T, n_heads), x.dtype)
    if x.size:
        pick(_QUANTIZE, x.size)(xc, q, s)
    return q.reshape(B, T, HD), s.reshape(B, T, n_heads)


KERNELS = {"cross_attention": cross_attention, "cross_attention_kv8": cross_attention_kv8,
           "quantize_heads": quantize_heads}
VJPS: dict = {}
