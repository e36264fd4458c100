"""Scaled dot-product attention: one task per (batch, head, query), fused scores → softmax → PV.

Spec: minitx/ops/attention.py. Same semantics: grouped-query heads (query head h reads kv head
h // (n_heads / n_kv_heads)), ``causal`` lets query t see keys 0 … S + t, ``mask`` (B, S + T)
removes padded keys, and a query with no visible key averages all values uniformly (the spec's
fully-masked row). The KV cache grows in place (see kvcache.py) instead of being copied.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import kernel, pick
from .kvcache import append


def _sdpa(q, K, V, mask, has_mask, causal, scale, H, KV, out):
    B, T, HD = q.shape
    S_tot = K.shape[1]
    D = HD // H
    G = H // KV
    past = S_tot - T
    for task in prange(B * H * T):
        b = task // (H * T)
        h = (task // T) % H
        t = task % T
        g = h // G
        qo = h * D
        ko = g * D
        scores = np.empty(S_tot, np.float64)
        ok = np.zeros(S_tot, np.bool_)
        m = -np.inf
        for s in range(S_tot):
            if causal and s > past + t:
                continue
            if has_mask and mask[b, s] == 0:
                continue
            acc = 0.0
            for d in range(D):
                acc += q[b, t, qo + d] * K[b, s, ko + d]
            sc = acc * scale
            scores[s] = sc
            ok[s] = True
            if sc > m:
                m = sc
        acc_v = np.zeros(D, np.float64)
        total = 0.0
        if m == -np.inf:  # nothing visible: uniform over all keys, like the spec
            for s in range(S_tot):
                for d in range(D):
                    acc_v[d] += V[b, s, ko + d]
            total = float(S_tot)
        else:
            for s in range(S_tot):
                if ok[s]:
                    p = np.exp(scores[s] - m)
                    total += p
                    for d in range(D):
                        acc_v[d] += p * V[b, s, ko + d]
        inv = 1.0 / total
        for d in range(D):
            out[b, t, qo + d] = acc_v[d] * inv


_SDPA = kernel(_sdpa)


def attention(q, k, v, past_k=None, past_v=None, mask=None, *, n_heads, n_kv_heads, causal, scale=None):
    K = append(past_k, k)
    V = append(past_v, v)
    D = q.shape[-1] // n_heads
    scale = float(q.dtype.type(1.0 / np.sqrt(D) if scale is None else scale))
    qc = np.ascontiguousarray(q)
    out = np.empty_like(qc)
    has_mask = mask is not None
    m = np.ascontiguousarray(mask, dtype=np.int64) if has_mask else np.zeros((1, 1), np.int64)
    work = q.shape[0] * n_heads * q.shape[1] * max(K.shape[1], 1) * D
    pick(_SDPA, work)(qc, K, V, m, has_mask, bool(causal), scale, n_heads, n_kv_heads, out)
    return out, K, V


KERNELS = {"attention": attention}
VJPS: dict = {}
