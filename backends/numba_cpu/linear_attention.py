"""Linear attention by running sums: O((T + S)·F·D) per head instead of the spec's O(T·S·D).

Spec: minitx/ops/linear_attention.py. Per (batch, query head) the keys' features are summed into a
state Σ φ(k) vᵀ (F, D) and Σ φ(k) (F): all keys first when bidirectional; when causal, each key is
added just before the first query allowed to see it (prefix sums), so the state a query reads
holds exactly its visible keys. Padded keys are never added. Features are computed once per key
per head group (``_features``), in the input's dtype.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ._jit import FASTMATH, kernel, pick

EPS = 1e-6


def _features(x, n_heads, favor, proj, out):
    """φ of every (batch, position, head) row of x (B, N, n_heads·D) into out (B, n_heads, N, F)."""
    B, N, HD = x.shape
    D = HD // n_heads
    F = out.shape[3]
    c = D ** -0.25
    for task in prange(B * n_heads * N):
        b = task // (n_heads * N)
        h = (task // N) % n_heads
        n = task % N
        row = x[b, n, h * D:(h + 1) * D]
        if not favor:
            for d in range(D):
                v = row[d]
                out[b, h, n, d] = v + 1 if v > 0 else np.exp(v)
            continue
        sq = 0.0
        for d in range(D):
            sq += (row[d] * c) ** 2
        for f in range(F):
            u = 0.0
            for d in range(D):
                u += proj[f, d] * row[d] * c
            out[b, h, n, f] = np.exp(u - 0.5 * sq) / np.sqrt(F)


@numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def _add_key(st, z, pk, V, b, g, s):
    """Key s of kv group g joins the state: z += φ(k), st += φ(k) vᵀ."""
    F, D = st.shape
    for f in range(F):
        kf = pk[b, g, s, f]
        z[f] += kf
        for d in range(D):
            st[f, d] += kf * V[b, s, g * D + d]


@numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def _read(pq, st, z, b, h, t, out):
    """Query t of head h reads the state: φ(q)ᵀ st / (φ(q)ᵀ z + ε)."""
    F, D = st.shape
    den = EPS
    for f in range(F):
        den += pq[b, h, t, f] * z[f]
    for d in range(D):
        acc = 0.0
        for f in range(F):
            acc += pq[b, h, t, f] * st[f, d]
        out[b, t, h * D + d] = acc / den


def _running(pq, pk, V, mask, has_mask, causal, G, out):
    """One task per (batch, query head): the state over the keys each query may see."""
    B, H, T, F = pq.shape
    S = pk.shape[2]
    D = out.shape[2] // H
    past = S - T
    for task in prange(B * H):
        b = task // H
        h = task % H
        g = h // G
        st = np.zeros((F, D), pq.dtype)
        z = np.zeros(F, pq.dtype)
        added = 0
        for t in range(T):
            upto = past + t + 1 if causal else S
            while added < upto:
                s = added
                added += 1
                if has_mask and mask[b, s] == 0:
                    continue
                _add_key(st, z, pk, V, b, g, s)
            _read(pq, st, z, b, h, t, out)


def _continue(pq, pk, V, mask, s0, z0, G, out, s1, z1):
    """``linear_attention_state``: the running sums start from the carried state (s0, z0) and end
    in (s1, z1), written by the first query head of each kv group."""
    B, H, T, _ = pq.shape
    for task in prange(B * H):
        b = task // H
        h = task % H
        g = h // G
        st = s0[b, g].copy()
        z = z0[b, g].copy()
        for t in range(T):
            if mask[b, t] != 0:
                _add_key(st, z, pk, V, b, g, t)
            _read(pq, st, z, b, h, t, out)
        if h % G == 0:
            s1[b, g] = st
            z1[b, g] = z


_FEATURES, _RUNNING, _CONTINUE = kernel(_features), kernel(_running), kernel(_continue)


def _phis(q, K, proj, n_heads, n_kv_heads, feature):
    B, T, HD = q.shape
    D = HD // n_heads
    favor = feature == "favor"
    F = proj.shape[0] if favor else D
    P = np.ascontiguousarray(proj, dtype=q.dtype) if favor else np.zeros((1, 1), q.dtype)
    pq = np.empty((B, n_heads, T, F), q.dtype)
    pk = np.empty((B, n_kv_heads, K.shape[1], F), q.dtype)
    pick(_FEATURES, pq.size * (D if favor else 1))(np.ascontiguousarray(q), n_heads, favor, P, pq)
    pick(_FEATURES, pk.size * (D if favor else 1))(np.ascontiguousarray(K, dtype=q.dtype), n_kv_heads, favor, P, pk)
    return pq, pk


def linear_attention(q, k, v, past_k=None, past_v=None, mask=None, proj=None, *, n_heads, n_kv_heads, causal,
                     feature="elu"):
    K = k if past_k is None else np.concatenate([past_k, k], axis=1)
    V = v if past_v is None else np.concatenate([past_v, v], axis=1)
    B, T, HD = q.shape
    qc, Vc = (np.ascontiguousarray(a, dtype=q.dtype) for a in (q, V))
    pq, pk = _phis(qc, K, proj, n_heads, n_kv_heads, feature)
    F, D = pq.shape[3], HD // n_heads
    out = np.empty_like(qc)
    m = np.zeros((1, 1), np.int64) if mask is None else np.ascontiguousarray(mask, dtype=np.int64)
    pick(_RUNNING, B * n_heads * (T + K.shape[1]) * F * D)(pq, pk, Vc, m, mask is not None, bool(causal),
                                                          n_heads // n_kv_heads, out)
    return out, K, V


def linear_attention_state(q, k, v, state_s=None, state_z=None, mask=None, proj=None, *, n_heads, n_kv_heads,
                           feature="elu"):
    B, T, HD = q.shape
    qc, Vc = (np.ascontiguousarray(a, dtype=q.dtype) for a in (q, v))
    pq, pk = _phis(qc, k, proj, n_heads, n_kv_heads, feature)
    F, D = pq.shape[3], HD // n_heads
    s0 = np.zeros((B, n_kv_heads, F, D), q.dtype) if state_s is None else np.ascontiguousarray(state_s, q.dtype)
    z0 = np.zeros((B, n_kv_heads, F), q.dtype) if state_z is None else np.ascontiguousarray(state_z, q.dtype)
    m = np.ones((B, T), np.int64) if mask is None else np.ascontiguousarray(mask[:, -T:], dtype=np.int64)
    out, s1, z1 = np.empty_like(qc), np.empty_like(s0), np.empty_like(z0)
    pick(_CONTINUE, B * n_heads * T * F * D)(pq, pk, Vc, m, s0, z0, n_heads // n_kv_heads, out, s1, z1)
    return out, s1, z1


KERNELS = {"linear_attention": linear_attention, "linear_attention_state": linear_attention_state}
