"""Kernels for the sparsity plugin's ops: pattern attention that skips masked key blocks, and
linears computed from compact weights (CSR, packed N:M).

Spec: minitx/ops/sparse.py. ``sparse_attention`` works on tiles of ``QB`` queries: for each tile
it gathers only the key range its pattern can reach (a band of 2·window keys for ``local``, the
own and global blocks for ``block``, the causal prefix otherwise), computes the tile's scores, applies
the exact per-element pattern, softmax, and multiplies by the gathered values. For local attention
at T = 4096, window 256 that is ~320 keys per tile instead of up to 4096. ``topk``/``threshold``
still compute every score (which keys survive depends on them) but only the survivors are summed.

The linears keep the weights in their compact form: ``sparse_linear`` walks the CSR rows of Wᵀ,
``nm_linear`` decodes the packed positions on the fly; both accumulate whole rows of xᵀ, so the
inner loop is a contiguous axpy over the batch of tokens.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from ._jit import kernel, pick

QB = 64  # queries per tile

_CODES = {"dense": 0, "local": 1, "block": 2, "strided": 3, "topk": 4, "threshold": 5}


def _sparse_sdpa(qh, kh, vh, mask, has_mask, causal, code, window, block, stride, n_global, topk, log_thr,
                 scale, out):
    B, H, T, D = qh.shape
    KV = kh.shape[1]
    S = kh.shape[2]
    G = H // KV
    past = S - T
    n_tiles = (T + QB - 1) // QB
    for task in prange(B * H * n_tiles):
        b = task // (H * n_tiles)
        h = (task // n_tiles) % H
        g = h // G
        t0 = (task % n_tiles) * QB
        t1 = min(T, t0 + QB)
        nq = t1 - t0
        i0 = past + t0
        i1 = past + t1 - 1
        hi = i1 + 1 if causal else S
        # ---- the keys this tile can reach, as at most two ranges [a0, a1) ∪ [c0, c1)
        a0, a1, c0, c1 = 0, hi, 0, 0
        if code == 1:
            a0 = max(0, i0 - window + 1)
            a1 = min(hi, i1 + window)
        elif code == 2:
            a0 = 0
            a1 = min(hi, n_global * block)
            c0 = max(a1, (i0 // block) * block)
            c1 = min(hi, (i1 // block + 1) * block)
        n_c = max(0, a1 - a0) + max(0, c1 - c0)
        idx = np.empty(n_c, np.int64)
        p = 0
        for j in range(a0, a1):
            idx[p] = j
            p += 1
        for j in range(c0, c1):
            idx[p] = j
            p += 1
        Kc = np.empty((n_c, D), qh.dtype)
        Vc = np.empty((n_c, D), qh.dtype)
        for c in range(n_c):
            Kc[c, :] = kh[b, g, idx[c], :]
            Vc[c, :] = vh[b, g, idx[c], :]
        sc = np.empty((nq, n_c), qh.dtype)
        for r in range(nq):  # plain loops, not np.dot: BLAS threads inside prange oversubscribe the cores
            for c in range(n_c):
                acc = 0.0
                for d in range(D):
                    acc += qh[b, h, t0 + r, d] * Kc[c, d]
                sc[r, c] = acc
        done = np.zeros(nq, np.bool_)
        for r in range(nq):
            i = i0 + r
            m = -np.inf
            n_ok = 0
            for c in range(n_c):
                j = idx[c]
                ok = (not causal or j <= i) and (not has_mask or mask[b, j] != 0)
                if ok and code == 1:
                    ok = abs(i - j) < window
                elif ok and code == 2:
                    ok = (i // block == j // block) or (j // block < n_global)
                elif ok and code == 3:
                    ok = abs(i - j) < stride or (i - j) % stride == 0
                if ok:
                    s = sc[r, c] * scale
                    sc[r, c] = s
                    n_ok += 1
                    if s > m:
                        m = s
                else:
                    sc[r, c] = -np.inf
            if n_ok == 0:  # nothing visible: uniform over every key, like the spec
                done[r] = True
                for d in range(D):
                    acc = 0.0
                    for j in range(S):
                        acc += vh[b, g, j, d]
                    out[b, h, t0 + r, d] = acc / S
                sc[r, :] = 0.0
                continue
            cut = -np.inf
            if code == 4 and n_ok > topk:
                vals = np.empty(n_ok, sc.dtype)
                q = 0
                for c in range(n_c):
                    if sc[r, c] != -np.inf:
                        vals[q] = sc[r, c]
                        q += 1
                vals.sort()
                cut = vals[n_ok - topk]
            elif code == 5:
                cut = m + log_thr
            total = 0.0
            for c in range(n_c):
                s = sc[r, c]
                if s != -np.inf and s >= cut:
                    e = math.exp(s - m)
                    sc[r, c] = e
                    total += e
                else:
                    sc[r, c] = 0.0
            inv = 1.0 / total
            for c in range(n_c):
                sc[r, c] *= inv
        for r in range(nq):
            if done[r]:
                continue
            o = np.zeros(D, qh.dtype)
            for c in range(n_c):
                pr = sc[r, c]
                if pr != 0.0:  # dropped keys (top-k, threshold) cost nothing here
                    for d in range(D):
                        o[d] += pr * Vc[c, d]
            out[b, h, t0 + r, :] = o


_SDPA = kernel(_sparse_sdpa)


def sparse_attention(q, k, v, past_k=None, past_v=None, mask=None, *, n_heads, n_kv_heads, causal,
                     pattern="dense", window=0, block=0, stride=0, n_global=0, topk=0, threshold=0.0,
                     dense_below=0, scale=None):
    K = k if past_k is None else np.concatenate([past_k, k], axis=1)
    V = v if past_v is None else np.concatenate([past_v, v], axis=1)
    B, T, HD = q.shape
    S = K.shape[1]
    D = HD // n_heads
    scale = float(1.0 / np.sqrt(D) if scale is None else scale)
    code = 0 if S <= dense_below else _CODES[pattern]
    qh = np.ascontiguousarray(q.reshape(B, T, n_heads, D).transpose(0, 2, 1, 3))
    kh = np.ascontiguousarray(K.reshape(B, S, n_kv_heads, D).transpose(0, 2, 1, 3)).astype(q.dtype, copy=False)
    vh = np.ascontiguousarray(V.reshape(B, S, n_kv_heads, D).transpose(0, 2, 1, 3)).astype(q.dtype, copy=False)
    m = np.zeros((1, 1), np.int8) if mask is None else np.ascontiguousarray(mask != 0).astype(np.int8)
    out = np.zeros((B, n_heads, T, D), q.dtype)
    log_thr = float(np.log(threshold)) if code == 5 else 0.0
    fn = pick(_SDPA, B * n_heads * T * S)
    fn(qh, kh, vh, m, mask is not None, bool(causal), code, int(window), int(block), int(stride), int(n_global),
       int(topk), log_thr, scale, out)
    return out.transpose(0, 2, 1, 3).reshape(B, T, HD), K, V


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
