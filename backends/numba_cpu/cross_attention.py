"""Cross-attention (and T5's biased self-attention), fused scores → bias → mask → softmax → PV.

Spec: minitx/ops/cross_attention.py. Same semantics: ``k``/``v`` are given (B, S, H·D),
``bias`` (1 or B, H, T, S) is added to the scaled scores, ``mask`` (B, S) removes padded keys,
``causal`` lets query t see keys 0 … S − T + t, and a query with no visible key averages all S
values uniformly (the spec's fully-masked row).

Why a kernel of its own rather than attention.py's: that one reads a growing KV cache and has no
additive bias; here the keys are fixed (the encoder's output, computed once per input) and T5
adds a (T, S) bias per head. One task per (batch, head, query) keeps the scores in one S-long row
instead of the spec's (B, H, T, S) tensors; the decode step (T = 1) over a long source is the
hot case, where each task streams its head's slice of K and V once.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import kernel, pick
from ._vmath import exp


def _cross(q, K, V, mask, has_mask, bias, has_bias, causal, scale, H, zero, out):
    B, T, HD = q.shape
    S = K.shape[1]
    D = HD // H
    past = S - T
    ninf = zero - np.float32(np.inf)
    for task in prange(B * H * T):
        b = task // (H * T)
        h = (task // T) % H
        t = task % T
        qh = q[b, t, h * D:(h + 1) * D]
        o = out[b, t, h * D:(h + 1) * D]
        n = past + t + 1 if causal else S  # keys 0 … n − 1 may be seen
        bb = b if bias.shape[0] > 1 else 0
        sc = np.empty(S, q.dtype)
        m = ninf
        for s in range(n):
            if has_mask and mask[b, s] == 0:
                sc[s] = ninf
                continue
            ks = K[b, s, h * D:(h + 1) * D]
            a = zero
            for d in range(D):
                a += qh[d] * ks[d]
            a = a * scale
            if has_bias:
                a += bias[bb, h, t, s]
            sc[s] = a
            if a > m:
                m = a
        for d in range(D):
            o[d] = zero
        if m == ninf:  # nothing visible: uniform over all keys, like the spec
            for s in range(S):
                vs = V[b, s, h * D:(h + 1) * D]
                for d in range(D):
                    o[d] += vs[d]
            for d in range(D):
                o[d] = o[d] / S
            continue
        total = zero
        for s in range(n):
            if sc[s] == ninf:
                continue
            p = exp(sc[s] - m)
            total += p
            vs = V[b, s, h * D:(h + 1) * D]
            for d in range(D):
                o[d] += p * vs[d]
        inv = 1.0 / total
        for d in range(D):
            o[d] = o[d] * inv


_CROSS = kernel(_cross)
_NO_MASK = np.zeros((1, 1), np.int64)


def cross_attention(q, k, v, mask=None, bias=None, *, n_heads, causal=False, scale=None):
    D = q.shape[-1] // n_heads
    qc = np.ascontiguousarray(q)
    dt = qc.dtype
    sc = dt.type(1.0 / np.sqrt(D) if scale is None else scale)
    K, V = np.ascontiguousarray(k, dt), np.ascontiguousarray(v, dt)
    has_mask, has_bias = mask is not None, bias is not None
    m = np.ascontiguousarray(mask, dtype=np.int64) if has_mask else _NO_MASK
    bb = np.ascontiguousarray(bias, dtype=dt) if has_bias else np.zeros((1, 1, 1, 1), dt)
    out = np.empty_like(qc)
    work = q.shape[0] * q.shape[1] * max(k.shape[1], 1) * q.shape[2]
    pick(_CROSS, work)(qc, K, V, m, has_mask, bb, has_bias, bool(causal), sc, n_heads, dt.type(0), out)
    return out


KERNELS = {"cross_attention": cross_attention}
VJPS: dict = {}
