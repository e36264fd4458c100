"""Cross-attention (and T5's biased self-attention): scores → bias → mask → softmax → PV.

Spec: minitx/ops/cross_attention.py. Same semantics: ``k``/``v`` are given (B, S, H·D),
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
from .attention import PREFILL_MIN_QUERIES, _mix_values, sdpa


def _biased(q, K, V, mask, has_mask, bias, causal, scale, H, zero, out):
    """One task per (batch, head, query): four keys per pass share the loads of q, the bias row is
    added to the scaled scores, and the values are mixed four rows per pass (``_mix_values``)."""
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
        m = ninf
        for s in range(n):
            if has_mask and mask[b, s] == 0:
                sc[s] = ninf
            elif sc[s] > m:
                m = sc[s]
        for d in range(D):
            o[d] = zero
        if m == ninf:  # nothing visible: uniform over all keys, like the spec
            for s in range(S):
                vs = V[b, s, lo:lo + D]
                for d in range(D):
                    o[d] += vs[d]
            for d in range(D):
                o[d] = o[d] / S
            continue
        total = zero
        for s in range(n):
            p = exp(sc[s] - m)   # a masked key: exp(−inf) = 0
            sc[s] = p
            total += p
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
    pick(_BIASED, work)(qc, K, V, m, has_mask, np.ascontiguousarray(bias, dtype=dt), bool(causal), sc, n_heads,
                        dt.type(0), out)
    return out


KERNELS = {"cross_attention": cross_attention}
VJPS: dict = {}
