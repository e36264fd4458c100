"""Kernels for the sparsity plugin's ops: pattern attention that touches only the kept keys, and
linears computed from compact weights (CSR, packed N:M).

Spec: minitx/ops/sparse.py. ``sparse_attention`` dispatches three ways. Where the pattern keeps
every key (``dense``, at most ``dense_below`` keys, or no more keys than ``topk``) it runs the
dense kernel of attention.py, so it is never slower than dense there. The static patterns (local,
block, strided) run one task per query over the keys its pattern keeps, enumerated by arithmetic:
at T = 4096 with window 128 a causal query reads 128 keys instead of 2048 on average, and the
time falls with the FLOPs (benchmarks/results/attention_patterns_cpu.md). Top-k and threshold
need every score; they compute them as the dense prefill kernel does (Kᵀ once per kv head), find
the cut-off by partial selection, and exponentiate and mix only the surviving keys.

The linears keep the weights in their compact form: ``sparse_linear`` walks the CSR rows of Wᵀ,
``nm_linear`` decodes the packed positions on the fly; both accumulate whole rows of xᵀ, so the
inner loop is a contiguous axpy over the batch of tokens.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ._jit import FASTMATH, kernel, pick
from ._vmath import dot4, exp
from .attention import PREFILL_MIN_QUERIES, mean_values, sdpa
from .kvcache import append, storage

_CODES = {"dense": 0, "local": 1, "block": 2, "strided": 3, "topk": 4, "threshold": 5}


@numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _pattern_keys(i, S, hi, code, window, block, stride, n_global, idx):
    """Write into ``idx`` the keys j < ``hi`` the static pattern gives query position ``i``, in
    ascending order; return how many. Only these are ever touched: the work is O(kept keys)."""
    n = 0
    if code == 1:  # local: |i - j| < window
        for j in range(max(0, i - window + 1), min(hi, i + window)):
            idx[n] = j
            n += 1
    elif code == 2:  # block: own block, and the first n_global blocks
        g1 = min(hi, n_global * block)
        for j in range(0, g1):
            idx[n] = j
            n += 1
        for j in range(max(g1, (i // block) * block), min(hi, (i // block + 1) * block)):
            idx[n] = j
            n += 1
    else:  # strided: |i - j| < stride, or i - j a multiple of stride
        lo = max(0, i - stride + 1)
        first = lo - 1 - ((lo - 1 - i) % stride) if lo > 0 else -1   # largest j < lo with (i - j) % stride == 0
        start = first % stride if first >= 0 else 0
        if first >= 0:
            for j in range(start, first + 1, stride):
                idx[n] = j
                n += 1
        top = min(hi, i + stride)
        for j in range(lo, top):
            idx[n] = j
            n += 1
        j = i + stride
        while j < top:
            j += stride
        while j < hi:
            idx[n] = j
            n += 1
            j += stride
    return n


def _pattern_sdpa(q, K, V, S, mask, has_mask, causal, code, window, block, stride, n_global, cap, scale, H, KV,
                  zero, out):
    """Static patterns (local, block, strided): one task per (batch, head, query) over the keys its
    pattern keeps, found by arithmetic — never the masked-out ones. Dot products take four keys
    per pass (independent reductions), like attention.py's decode kernel."""
    B, T, HD = q.shape
    D = HD // H
    G = H // KV
    past = S - T
    for task in prange(B * H * T):
        b = task // (H * T)
        h = (task // T) % H
        t = task % T
        g = h // G
        i = past + t
        hi = i + 1 if causal else S
        idx = np.empty(cap, np.int64)
        n = _pattern_keys(i, S, hi, code, window, block, stride, n_global, idx)
        if has_mask:  # drop padded keys
            w = 0
            for c in range(n):
                if mask[b, idx[c]] != 0:
                    idx[w] = idx[c]
                    w += 1
            n = w
        qh = q[b, t, h * D:(h + 1) * D]
        o = out[b, t, h * D:(h + 1) * D]
        acc = np.zeros(D, q.dtype)
        if n == 0:  # nothing visible: uniform over every key, like the spec
            mean_values(V, V, False, b, g, S, o)
            continue
        sc = np.empty(n, q.dtype)
        c = 0
        while c + 4 <= n:
            k0 = K[b, idx[c], g * D:(g + 1) * D]
            k1 = K[b, idx[c + 1], g * D:(g + 1) * D]
            k2 = K[b, idx[c + 2], g * D:(g + 1) * D]
            k3 = K[b, idx[c + 3], g * D:(g + 1) * D]
            a0, a1, a2, a3 = dot4(qh, k0, k1, k2, k3, D, zero)
            sc[c], sc[c + 1], sc[c + 2], sc[c + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
            c += 4
        while c < n:
            kc = K[b, idx[c], g * D:(g + 1) * D]
            a = zero
            for d in range(D):
                a += qh[d] * kc[d]
            sc[c] = a * scale
            c += 1
        _softmax_mix(sc, idx, n, V[b], g * D, zero, acc)
        for d in range(D):
            o[d] = acc[d]


@numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _softmax_mix(sc, idx, n, Vb, lo, zero, acc):
    """acc = Σ_c softmax(sc[:n])_c · Vb[idx[c], lo:lo+D], four value rows per pass."""
    D = acc.size
    m = sc[0]
    for c in range(1, n):
        if sc[c] > m:
            m = sc[c]
    total = zero
    for c in range(n):
        p = exp(sc[c] - m)
        sc[c] = p
        total += p
    for d in range(D):
        acc[d] = zero
    c = 0
    while c + 4 <= n:
        p0, p1, p2, p3 = sc[c], sc[c + 1], sc[c + 2], sc[c + 3]
        v0, v1 = Vb[idx[c], lo:lo + D], Vb[idx[c + 1], lo:lo + D]
        v2, v3 = Vb[idx[c + 2], lo:lo + D], Vb[idx[c + 3], lo:lo + D]
        for d in range(D):
            acc[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d]
        c += 4
    while c < n:
        pc = sc[c]
        vc = Vb[idx[c], lo:lo + D]
        for d in range(D):
            acc[d] += pc * vc[d]
        c += 1
    inv = 1.0 / total
    for d in range(D):
        acc[d] *= inv


def _select_sdpa(q, K, V, S, mask, has_mask, causal, code, topk, log_thr, transpose, scale, H, KV, zero, out):
    """Data-dependent patterns (top-k, threshold): every score is needed to know which keys
    survive, so the scores are computed as in the dense kernels — one task per (batch, kv head),
    with Kᵀ built once when there are many queries (``transpose``) so a query's scores are
    unit-stride SIMD — then the cut-off is found by partial selection (a k-element heap: O(S)
    on typical rows, not a sort) and only the surviving keys are exponentiated and mixed: the values' pass costs
    O(k·D) instead of O(S·D)."""
    B, T, HD = q.shape
    D = HD // H
    G = H // KV
    past = S - T
    for task in prange(B * KV):
        b = task // KV
        g = task % KV
        KT = np.empty((D, S if transpose else 0), q.dtype)
        if transpose:
            for s in range(S):
                for d in range(D):
                    KT[d, s] = K[b, s, g * D + d]
        sc = np.empty(S, q.dtype)
        heap = np.empty(max(topk, 1), q.dtype)
        idx = np.empty(S, np.int64)
        acc = np.empty(D, q.dtype)
        for hh in range(G):
            h = g * G + hh
            for t in range(T):
                n = past + t + 1 if causal else S
                if transpose:
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
                else:
                    qh = q[b, t, h * D:(h + 1) * D]
                    for s in range(n):
                        ks = K[b, s, g * D:(g + 1) * D]
                        a = zero
                        for d in range(D):
                            a += qh[d] * ks[d]
                        sc[s] = a * scale
                m = zero - np.float32(np.inf)
                if has_mask:  # visible keys, their scores compacted to the front of sc
                    cnt = 0
                    for s in range(n):
                        if mask[b, s] != 0:
                            idx[cnt] = s
                            sc[cnt] = sc[s]
                            cnt += 1
                else:
                    cnt = n
                if code == 5:
                    for c in range(cnt):
                        m = max(m, sc[c])
                o = out[b, t, h * D:(h + 1) * D]
                if cnt == 0:  # nothing visible: uniform over every key, like the spec
                    mean_values(V, V, False, b, g, S, o)
                    continue
                if code == 4:
                    cut = _kth_largest(sc, cnt, topk, heap) if cnt > topk else zero - np.float32(np.inf)
                else:
                    cut = m + log_thr
                w = 0
                for c in range(cnt):  # the survivors (ties at the cut all stay, like the spec)
                    if sc[c] >= cut:
                        idx[w] = idx[c] if has_mask else c
                        sc[w] = sc[c]
                        w += 1
                _softmax_mix(sc, idx, w, V[b], g * D, zero, acc)
                for d in range(D):
                    o[d] = acc[d]


@numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _kth_largest(x, n, k, heap):
    """The k-th largest of x[:n] (k < n) by a min-heap of the k largest so far: O(n + k·log k·log(n/k))
    on unordered scores, since few of them beat the heap's minimum once it is full — the partial
    selection top-k needs, without sorting the row."""
    for c in range(k):
        heap[c] = x[c]
    for c in range(k // 2 - 1, -1, -1):
        _sift(heap, c, k)
    for c in range(k, n):
        if x[c] > heap[0]:
            heap[0] = x[c]
            _sift(heap, 0, k)
    return heap[0]


@numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _sift(heap, c, k):
    v = heap[c]
    while True:
        child = 2 * c + 1
        if child >= k:
            break
        if child + 1 < k and heap[child + 1] < heap[child]:
            child += 1
        if heap[child] >= v:
            break
        heap[c] = heap[child]
        c = child
    heap[c] = v


_PATTERN, _SELECT = kernel(_pattern_sdpa), kernel(_select_sdpa)


def _pattern_cap(code: int, S: int, window: int, block: int, stride: int, n_global: int) -> int:
    """Most keys a static pattern gives one query (the size of its index buffer)."""
    bound = {1: 2 * window, 2: (n_global + 1) * block, 3: 2 * stride + 2 * (S // max(stride, 1)) + 2}[code]
    return max(1, min(S, bound))


def sparse_attention(q, k, v, past_k=None, past_v=None, mask=None, *, n_heads, n_kv_heads, causal,
                     pattern="dense", window=0, block=0, stride=0, n_global=0, topk=0, threshold=0.0,
                     dense_below=0, scale=None):
    """Dispatch: the dense kernel where the pattern keeps every key (``dense``, at most
    ``dense_below`` keys, or no more keys than ``topk``) — so a pattern is never slower than dense
    there — the static-pattern kernel for local/block/strided, the selection kernel for
    top-k/threshold."""
    K = append(past_k, k)
    V = append(past_v, v)
    B, T, HD = q.shape
    S = K.shape[1]
    code = _CODES[pattern]
    if S <= dense_below or code == 0 or (code == 4 and S <= topk):
        return sdpa(q, K, None, V, None, mask, n_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal,
                    scale=scale), K, V
    D = HD // n_heads
    sc = q.dtype.type(1.0 / np.sqrt(D) if scale is None else scale)
    qc = np.ascontiguousarray(q)
    out = np.empty_like(qc)
    has_mask = mask is not None
    m = np.ascontiguousarray(mask, dtype=np.int64) if has_mask else np.zeros((1, 1), np.int64)
    Kb, Vb = storage(K), storage(V)
    if Kb.dtype != qc.dtype:
        Kb, Vb = K.astype(qc.dtype), V.astype(qc.dtype)
    if code <= 3:
        cap = _pattern_cap(code, S, int(window), int(block), int(stride), int(n_global))
        pick(_PATTERN, B * n_heads * T * cap * D)(qc, Kb, Vb, S, m, has_mask, bool(causal), code, int(window),
                                                  int(block), int(stride), int(n_global), cap, sc, n_heads,
                                                  n_kv_heads, qc.dtype.type(0), out)
    else:
        log_thr = float(np.log(threshold)) if code == 5 else 0.0
        pick(_SELECT, B * n_heads * T * S * D)(qc, Kb, Vb, S, m, has_mask, bool(causal), code, int(topk),
                                               qc.dtype.type(log_thr), T >= PREFILL_MIN_QUERIES, sc, n_heads,
                                               n_kv_heads, qc.dtype.type(0), out)
    return out, K, V


# ------------------------------------------------------------------------------ CSR linear
def _csr_rows(xT, data, indices, indptr, yT):
    """Many rows (prefill): yT[o, :] += w · xT[col, :] for every stored weight — each weight read
    once, a contiguous row of xT per weight; accumulating in yT itself (no buffer per output)."""
    out_f = yT.shape[0]
    N = xT.shape[1]
    for o in prange(out_f):
        yo = yT[o]
        for n in range(N):
            yo[n] = 0.0
        for p in range(indptr[o], indptr[o + 1]):
            w = data[p]
            xc = xT[indices[p]]
            for n in range(N):
                yo[n] += w * xc[n]


def _csr_skinny(x, data, indices, indptr, y):
    """Few rows (decode): one scalar accumulator per (row, output), the row's inputs gathered by
    index — the loop over rows of ``_csr_rows`` has length 1 here and only costs overhead."""
    out_f = y.shape[1]
    for o in prange(out_f):
        p0, p1 = indptr[o], indptr[o + 1]
        for n in range(x.shape[0]):
            xn = x[n]
            acc = np.float32(0.0)
            for p in range(p0, p1):
                acc += data[p] * xn[indices[p]]
            y[n, o] = acc


_CSR = kernel(_csr_rows)
_CSR_SKINNY = kernel(_csr_skinny)
SKINNY_MAX_ROWS = 8


def sparse_linear(x, data, indices, indptr, b=None, *, shape):
    out_f, in_f = shape
    x2 = x.reshape(-1, in_f)
    if x2.shape[0] <= SKINNY_MAX_ROWS and x.dtype == np.float32:
        y2 = np.empty((x2.shape[0], out_f), x.dtype)
        pick(_CSR_SKINNY, data.size * x2.shape[0])(np.ascontiguousarray(x2), data.astype(x.dtype, copy=False),
                                                    indices, indptr, y2)
        y = y2.reshape(*x.shape[:-1], out_f)
        return y if b is None else y + b
    xT = np.ascontiguousarray(x2.T)
    yT = np.empty((out_f, xT.shape[1]), x.dtype)
    pick(_CSR, data.size * xT.shape[1])(xT, data.astype(x.dtype, copy=False), indices, indptr, yT)
    y = yT.T.reshape(*x.shape[:-1], out_f)
    return y if b is None else y + b


# ------------------------------------------------------------------------------ N:M linear
def _nm_rows(xT, values, packed, n, m, bits, yT):
    out_f, K = values.shape
    N = xT.shape[1]
    per = 8 // bits
    low = (1 << bits) - 1
    for o in prange(out_f):
        acc = np.zeros(N, yT.dtype)
        for kk in range(K):
            pos = (packed[o, kk // per] >> (bits * (kk % per))) & low
            col = (kk // n) * m + pos
            w = values[o, kk]
            for t in range(N):
                acc[t] += w * xT[col, t]
        yT[o, :] = acc


_NM = kernel(_nm_rows)


def _nm_expand(values, packed, n, m, bits, Wt):
    """Wt (out, in) = the dense matrix an N:M pair stands for (Wt zeroed here)."""
    out_f, K = values.shape
    per = 8 // bits
    low = (1 << bits) - 1
    for o in prange(out_f):
        row = Wt[o]
        for i in range(row.size):
            row[i] = 0.0
        for kk in range(K):
            pos = (packed[o, kk // per] >> (bits * (kk % per))) & low
            row[(kk // n) * m + pos] = values[o, kk]


_NM_EXPAND = kernel(_nm_expand)


NM_TILE = 1024  # output channels expanded to dense at a time on the many-rows path


def nm_linear(x, values, idx, b=None, *, n, m, in_features):
    """Few rows: the gather kernel. Many rows: N:M holds no speed-up for a CPU's vector units (no
    sparse tensor cores), so tiles of output channels are expanded to dense and multiplied with
    BLAS — 2:4's gain here is storage, at close to dense speed (measured:
    benchmarks/results/sparse_crossover.md)."""
    from minitx.ops.sparse import index_bits

    x2 = x.reshape(-1, in_features)
    if x2.shape[0] > 8 and x.dtype == np.float32:
        y2 = np.empty((x2.shape[0], values.shape[0]), x.dtype)
        wt = np.empty((min(NM_TILE, values.shape[0]), in_features), np.float32)
        vals = values.astype(np.float32, copy=False)
        for o in range(0, values.shape[0], NM_TILE):
            t = wt[:min(NM_TILE, values.shape[0] - o)]
            pick(_NM_EXPAND, t.size)(vals[o:o + NM_TILE], idx[o:o + NM_TILE], int(n), int(m), index_bits(m), t)
            y2[:, o:o + NM_TILE] = x2 @ t.T
        y = y2.reshape(*x.shape[:-1], values.shape[0])
        return y if b is None else y + b
    xT = np.ascontiguousarray(x2.T)
    yT = np.empty((values.shape[0], xT.shape[1]), x.dtype)
    pick(_NM, values.size * xT.shape[1])(xT, values.astype(x.dtype, copy=False), idx, int(n), int(m),
                                         index_bits(m), yT)
    y = yT.T.reshape(*x.shape[:-1], values.shape[0])
    return y if b is None else y + b


KERNELS = {"sparse_attention": sparse_attention, "sparse_linear": sparse_linear, "nm_linear": nm_linear}
