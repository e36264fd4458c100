"""Scaled dot-product attention, fused scores → softmax → PV: one kernel for decode, one for prefill.

Spec: minitx/ops/attention.py. Same semantics: grouped-query heads (query head h reads kv head
h // (n_heads / n_kv_heads)), ``causal`` lets query t see keys 0 … S + t, ``mask`` (B, S + T)
removes padded keys, and a query with no visible key averages all values uniformly (the spec's
fully-masked row). The KV cache grows in place (see kvcache.py) instead of being copied.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ._jit import FASTMATH, kernel, pick
from ._vmath import exp
from .kvcache import append, storage


@numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _mix_values(p, n, Vb, lo, acc):
    """acc += Σ_{s<n} p[s]·Vb[s, lo:lo+len(acc)], four value rows per pass over acc (one load and
    store of acc per four multiply-adds)."""
    D = acc.size
    s = 0
    while s + 4 <= n:
        p0, p1, p2, p3 = p[s], p[s + 1], p[s + 2], p[s + 3]
        v0, v1 = Vb[s, lo:lo + D], Vb[s + 1, lo:lo + D]
        v2, v3 = Vb[s + 2, lo:lo + D], Vb[s + 3, lo:lo + D]
        for d in range(D):
            acc[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d]
        s += 4
    while s < n:
        ps = p[s]
        vs = Vb[s, lo:lo + D]
        for d in range(D):
            acc[d] += ps * vs[d]
        s += 1


def _sdpa(q, K, KS, V, VS, quantized, S_tot, mask, has_mask, causal, scale, H, KV, zero, out):
    """One task per (batch, head, query): dot products along each key's contiguous head slice.

    Four keys per pass share the loads of q (four independent reductions keep the FMA units
    busy), and the weighted sum of values takes four rows per pass over the accumulator.
    Accumulation is in the input's dtype (``zero`` carries it), like the spec's float32 matmuls.
    ``quantized``: K and V are an int8 cache (``attention_kv8``, quant.py) with one scale per
    token and kv head in KS / VS (B, S, KV), applied to each score and to each softmax weight, so
    the int8 rows are read as they are; otherwise KS / VS are unused placeholders.
    """
    B, T, HD = q.shape
    D = HD // H
    G = H // KV
    past = S_tot - T
    for task in prange(B * H * T):
        b = task // (H * T)
        h = (task // T) % H
        t = task % T
        g = h // G
        qh = q[b, t, h * D:(h + 1) * D]
        n = past + t + 1 if causal else S_tot
        sc = np.empty(n, q.dtype)
        s = 0
        while s + 4 <= n:
            k0 = K[b, s, g * D:(g + 1) * D]
            k1 = K[b, s + 1, g * D:(g + 1) * D]
            k2 = K[b, s + 2, g * D:(g + 1) * D]
            k3 = K[b, s + 3, g * D:(g + 1) * D]
            a0 = a1 = a2 = a3 = zero
            for d in range(D):
                qd = qh[d]
                a0 += qd * k0[d]
                a1 += qd * k1[d]
                a2 += qd * k2[d]
                a3 += qd * k3[d]
            sc[s], sc[s + 1], sc[s + 2], sc[s + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
            s += 4
        while s < n:
            ks = K[b, s, g * D:(g + 1) * D]
            a = zero
            for d in range(D):
                a += qh[d] * ks[d]
            sc[s] = a * scale
            s += 1
        if quantized:
            for s in range(n):
                sc[s] *= KS[b, s, g]
        m = zero - np.float32(np.inf)
        for s in range(n):
            if (not has_mask or mask[b, s] != 0) and sc[s] > m:
                m = sc[s]
        acc = np.zeros(D, q.dtype)
        o = out[b, t, h * D:(h + 1) * D]
        if m == -np.inf:  # nothing visible: uniform over all keys, like the spec
            for s in range(S_tot):
                vs = V[b, s, g * D:(g + 1) * D]
                ws = VS[b, s, g] if quantized else zero + 1
                for d in range(D):
                    acc[d] += ws * vs[d]
            for d in range(D):
                o[d] = acc[d] / S_tot
            continue
        total = zero
        for s in range(n):
            p = exp(sc[s] - m)
            if has_mask and mask[b, s] == 0:
                p = zero
            sc[s] = p
            total += p
        if quantized:
            for s in range(n):
                sc[s] *= VS[b, s, g]
        _mix_values(sc, n, V[b], g * D, acc)
        inv = 1.0 / total
        for d in range(D):
            o[d] = acc[d] * inv


def _sdpa_prefill(q, K, V, S, mask, has_mask, causal, scale, H, KV, zero, out):
    """Many queries at once: one task per (batch, kv head), keys transposed once per task.

    With Kᵀ (D, S) in hand, a query's scores are D unit-stride multiply-adds over the keys and
    its output S unit-stride multiply-adds over D: no horizontal sums, all of it SIMD. Masked
    keys get weight exactly 0; a query with no visible key averages all values, like the spec.
    """
    B, T, HD = q.shape
    D = HD // H
    G = H // KV
    past = S - T
    for task in prange(B * KV):
        b = task // KV
        g = task % KV
        KT = np.empty((D, S), q.dtype)
        for s in range(S):
            for d in range(D):
                KT[d, s] = K[b, s, g * D + d]
        vis = np.ones(S, q.dtype)
        if has_mask:
            for s in range(S):
                if mask[b, s] == 0:
                    vis[s] = zero
        sc = np.empty(S, q.dtype)
        acc = np.empty(D, q.dtype)
        for hh in range(G):
            h = g * G + hh
            for t in range(T):
                n = past + t + 1 if causal else S
                for s in range(n):
                    sc[s] = zero
                d = 0
                while d + 4 <= D:  # four rows of Kᵀ per pass: one load/store of sc per 4 FMAs
                    q0 = q[b, t, h * D + d] * scale
                    q1 = q[b, t, h * D + d + 1] * scale
                    q2 = q[b, t, h * D + d + 2] * scale
                    q3 = q[b, t, h * D + d + 3] * scale
                    k0, k1, k2, k3 = KT[d], KT[d + 1], KT[d + 2], KT[d + 3]
                    for s in range(n):
                        sc[s] += q0 * k0[s] + q1 * k1[s] + q2 * k2[s] + q3 * k3[s]
                    d += 4
                while d < D:
                    qd = q[b, t, h * D + d] * scale
                    kd = KT[d]
                    for s in range(n):
                        sc[s] += qd * kd[s]
                    d += 1
                m = zero - np.float32(np.inf)
                for s in range(n):
                    if vis[s] != zero and sc[s] > m:
                        m = sc[s]
                for d in range(D):
                    acc[d] = zero
                o = out[b, t, h * D:(h + 1) * D]
                if m == -np.inf:  # nothing visible: uniform over all keys
                    for s in range(S):
                        for d in range(D):
                            acc[d] += V[b, s, g * D + d]
                    for d in range(D):
                        o[d] = acc[d] / S
                    continue
                total = zero
                for s in range(n):
                    p = exp(sc[s] - m) * vis[s]
                    sc[s] = p
                    total += p
                _mix_values(sc, n, V[b], g * D, acc)
                inv = 1.0 / total
                for d in range(D):
                    o[d] = acc[d] * inv


_SDPA, _SDPA_PREFILL = kernel(_sdpa), kernel(_sdpa_prefill)
NO_SCALES = np.zeros((1, 1, 1), np.float32)  # _sdpa's unread KS / VS for a float cache
PREFILL_MIN_QUERIES = 8  # from here on transposing the keys once beats a dot product per key


def attention(q, k, v, past_k=None, past_v=None, mask=None, *, n_heads, n_kv_heads, causal, scale=None):
    K = append(past_k, k)
    V = append(past_v, v)
    return sdpa(q, K, None, V, None, mask, n_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal, scale=scale), K, V


def sdpa(q, K, KS, V, VS, mask, *, n_heads: int, n_kv_heads: int, causal: bool, scale: float | None) -> np.ndarray:
    """Attention of ``q`` over whole caches ``K``/``V`` (views the kernels read through their
    buffers, see kvcache.py). ``KS``/``VS``: None for a float cache, else the per-token scales of
    an int8 one (quant.py's ``attention_kv8``), which always takes the per-query kernel."""
    D = q.shape[-1] // n_heads
    scale = q.dtype.type(1.0 / np.sqrt(D) if scale is None else scale)
    qc = np.ascontiguousarray(q)
    out = np.empty_like(qc)
    has_mask = mask is not None
    m = np.ascontiguousarray(mask, dtype=np.int64) if has_mask else np.zeros((1, 1), np.int64)
    work = q.shape[0] * n_heads * q.shape[1] * max(K.shape[1], 1) * D
    quantized = KS is not None
    if q.shape[1] >= PREFILL_MIN_QUERIES and not quantized:
        pick(_SDPA_PREFILL, work)(qc, storage(K), storage(V), K.shape[1], m, has_mask, bool(causal), scale, n_heads,
                                  n_kv_heads, qc.dtype.type(0), out)
        return out
    pick(_SDPA, work)(qc, storage(K), storage(KS) if quantized else NO_SCALES, storage(V),
                      storage(VS) if quantized else NO_SCALES, quantized, K.shape[1], m, has_mask, bool(causal), scale,
                      n_heads, n_kv_heads, qc.dtype.type(0), out)
    return out


KERNELS = {"attention": attention}
VJPS: dict = {}
