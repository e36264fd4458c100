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

The linears keep the weights in their compact form: ``sparse_linear`` walks the CSR rows of Wᵀ
(at decode a gather per stored weight, so it beats dense only at high sparsity); ``nm_linear``'s
2:4 kernel selects each stored value's input arithmetically from four held in registers, so
decode reads half the bytes of dense at vector speed; int8 values (quantization after pruning)
with a scale per output go through the same kernels. At many rows (prefill) the work is
compute-bound and a CPU has no sparse matrix units: there both expand panels of output columns
into a reused float32 buffer and hand them to the float linear's BLAS (:func:`_through_blas`) —
2:4 above ``NM_PACKED_MAX_ROWS`` rows, CSR from ``CSR_BLAS_MIN_DENSITY`` of the weights kept —
so prefill runs at dense speed less the expansion (benchmarks/results/sparse_crossover.md).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from minitx.ops import sparse as S

from ._jit import FASTMATH, kernel, pick
from ._vmath import dot4, exp
from .attention import PREFILL_MIN_QUERIES, mean_values, sdpa
from .kvcache import append, storage
from .linalg import linear as float_linear

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


SELECT_ROWS = 64      # queries per tile of the selection kernel (fewer at long rows: see _tile_rows)
SELECT_TILE_BYTES = 1 << 21  # at most this much score tile (queries × keys) per task
DENSE_MIX = 4         # a tile mixes values by one GEMM when more than 1/DENSE_MIX of its visible keys survive


def _select_sdpa(q, K, V, S, mask, has_mask, causal, code, topk, log_thr, gemm, rows, scale, H, KV, zero, out):
    """Data-dependent patterns (top-k, threshold): every score is needed to know which keys
    survive. One task per (batch, head); for each tile of ``rows`` queries the scores of all their
    visible keys come from one BLAS GEMM against a contiguous copy of the head's keys (like
    attention.py's _sdpa_gemm; ``gemm`` False at decode: a dot product per key read in place, as
    copying the cache would cost as much as the scores). Per row the cut-off is found without a
    sort — the k-th largest by a bound from run maxima and a search over the few scores above it
    (:func:`_kth_largest`), or the row's maximum + log(threshold) — and only the survivors are
    exponentiated. The values' pass is a gather of the survivors' rows (O(k·D) a query) unless
    more than 1/DENSE_MIX of a prefill tile's visible keys survive (threshold on flat rows): then the
    weights, zero off the survivors, go through one P·V GEMM like dense attention.
    Masked keys score −inf (never selected, never weighed); a row with no visible key averages
    every value, like the spec."""
    B, T, HD = q.shape
    D = HD // H
    G = H // KV
    past = S - T
    ninf = zero - np.float32(np.inf)
    for task in prange(B * H):
        b = task // H
        h = task % H
        g = h // G
        lo = g * D
        Kh = np.empty((S if gemm else 0, D), q.dtype)
        for s in range(Kh.shape[0]):
            for d in range(D):
                Kh[s, d] = K[b, s, lo + d]
        Vh = np.empty((0, D), q.dtype)  # copied on the first tile that mixes by GEMM
        bias = np.empty(S, q.dtype)     # 0 on visible keys, −inf on padding
        nvis = np.zeros(S + 1, np.int64)  # visible keys among the first s
        for s in range(S):
            seen = not has_mask or mask[b, s] != 0
            bias[s] = zero if seen else ninf
            nvis[s + 1] = nvis[s] + (1 if seen else 0)
        sbuf = np.empty(rows * S, q.dtype)
        Qt = np.empty((rows, D), q.dtype)
        cuts = np.empty(rows, q.dtype)
        mx = np.empty(rows, q.dtype)
        tot = np.empty(rows, q.dtype)
        kept = np.empty(rows, np.int64)
        cand = np.empty((rows if code == 4 else 0, S), q.dtype)  # _kth_largest's candidates, per row
        cidx = np.empty((rows if code == 4 else 0, S), np.int32)
        ncand = np.empty(rows, np.int64)  # how many; −1: none gathered (threshold, or k ≥ visible)
        idx = np.empty(S, np.int64)
        pbuf = np.empty(S, q.dtype)
        acc = np.empty(D, q.dtype)
        pvbuf = np.empty(rows * D, q.dtype)
        for t0 in range(0, T, rows):
            nq = min(rows, T - t0)
            hi = past + t0 + nq if causal else S
            sc = sbuf[:nq * hi].reshape((nq, hi))
            if gemm:
                for i in range(nq):
                    for d in range(D):
                        Qt[i, d] = q[b, t0 + i, h * D + d] * scale
                np.dot(Qt[:nq], Kh[:hi].T, sc)
            else:
                for i in range(nq):
                    qh = q[b, t0 + i, h * D:(h + 1) * D]
                    row = sc[i]
                    n = past + t0 + i + 1 if causal else S
                    s = 0
                    while s + 4 <= n:
                        a0, a1, a2, a3 = dot4(qh, K[b, s, lo:lo + D], K[b, s + 1, lo:lo + D],
                                              K[b, s + 2, lo:lo + D], K[b, s + 3, lo:lo + D], D, zero)
                        row[s], row[s + 1], row[s + 2], row[s + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
                        s += 4
                    while s < n:
                        ks = K[b, s, lo:lo + D]
                        a = zero
                        for d in range(D):
                            a += qh[d] * ks[d]
                        row[s] = a * scale
                        s += 1
            n_vis = 0
            n_kept = 0
            for i in range(nq):
                row = sc[i]
                n = past + t0 + i + 1 if causal else S
                cnt = nvis[n]
                kept[i] = 0
                if cnt == 0:
                    continue
                if has_mask:
                    for j in range(n):
                        row[j] += bias[j]
                ncand[i] = -1
                if code == 5:
                    m = ninf
                    for j in range(n):
                        m = max(m, row[j])
                    mx[i] = m
                if code == 4:
                    if cnt > topk:
                        cut, nc = _kth_largest(row, n, topk, cand[i], cidx[i], ninf)
                        ncand[i] = nc
                    else:
                        cut = ninf
                    kept[i] = min(cnt, topk)
                else:
                    cut = mx[i] + log_thr
                    kept[i] = _count_at_least(row, n, cut)
                cuts[i] = cut
                n_vis += cnt
                n_kept += kept[i]
            if gemm and n_kept * DENSE_MIX > n_vis:  # most keys survive: weights (0 off the survivors) through a GEMM
                if Vh.shape[0] == 0:
                    Vh = np.empty((S, D), q.dtype)
                    for s in range(S):
                        for d in range(D):
                            Vh[s, d] = V[b, s, lo + d]
                for i in range(nq):
                    row = sc[i]
                    n = past + t0 + i + 1 if causal else S
                    total = zero
                    if kept[i] > 0:
                        cut = cuts[i]
                        if code == 4:
                            m = ninf
                            for j in range(n):
                                m = max(m, row[j])
                        else:
                            m = mx[i]
                        for j in range(n):
                            x = row[j]
                            p = exp(x - m)
                            if x < cut or x == ninf:
                                p = zero
                            row[j] = p
                            total += p
                    else:
                        n = 0
                    for j in range(n, hi):
                        row[j] = zero
                    tot[i] = total
                pv = pvbuf[:nq * D].reshape((nq, D))
                np.dot(sc, Vh[:hi], pv)
                for i in range(nq):
                    o = out[b, t0 + i, h * D:(h + 1) * D]
                    if kept[i] == 0:  # nothing visible: uniform over every key, like the spec
                        mean_values(V, V, False, b, g, S, o)
                        continue
                    inv = 1.0 / tot[i]
                    for d in range(D):
                        o[d] = pv[i, d] * inv
                continue
            for i in range(nq):  # few survivors: gather their value rows
                o = out[b, t0 + i, h * D:(h + 1) * D]
                if kept[i] == 0:
                    mean_values(V, V, False, b, g, S, o)
                    continue
                row = sc[i]
                n = past + t0 + i + 1 if causal else S
                cut = cuts[i]
                w = 0
                if ncand[i] >= 0:  # the survivors (ties at the cut all stay, like the spec)
                    ci, cv = cidx[i], cand[i]
                    for c in range(ncand[i]):
                        if cv[c] >= cut:
                            idx[w] = ci[c]
                            pbuf[w] = cv[c]
                            w += 1
                else:
                    for j in range(n):
                        x = row[j]
                        if x >= cut and x != ninf:
                            idx[w] = j
                            pbuf[w] = x
                            w += 1
                _softmax_mix(pbuf, idx, w, V[b], lo, zero, acc)
                for d in range(D):
                    o[d] = acc[d]


@numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _count_at_least(c, w, t):
    """How many of c[:w] are ≥ t (one vectorised pass)."""
    n = 0
    for j in range(w):
        n += 1 if c[j] >= t else 0
    return n


@numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _kth_largest(x, n, k, cand, cidx, ninf):
    """The k-th largest of x[:n] (k < n) without sorting the row, and the candidates: the scores
    (``cand``) and positions (``cidx``) of x[:n] that can reach it, how many is the second result.

    Why this way: a heap over the row mispredicts a branch per score (14 ns a score, measured).
    Split x[:k·(n // k)] into k runs: the smallest of their maxima is at most the k-th largest
    (each run holds a score at least that large), so only scores at or above it matter — about
    120 of a random row at k = 32, whatever n. The run maxima are vectorised reductions, the
    candidates are gathered without branches, and the cut-off is found by searching its value
    over them (interpolating on the counts, alternating with bisection so it always converges),
    each step one vectorised count: with ``lo`` ≤ k-th largest < ``hi`` kept, it ends
    when exactly k candidates are ≥ lo (the k-th largest is then their minimum) or when no float
    lies strictly between lo and hi (then it is lo: ties at the cut stay, like the spec).
    ``ninf``: −inf in x's dtype (padding's score)."""
    run = n // k
    bound = -ninf
    for r in range(k):
        cm = x[r * run]
        for j in range(r * run + 1, (r + 1) * run):
            cm = max(cm, x[j])
        bound = min(bound, cm)
    w = 0
    for j in range(n):
        v = x[j]
        cand[w] = v
        cidx[w] = j
        w += 1 if v >= bound else 0
    lo = bound
    hi = cand[0]
    for c in range(w):
        hi = max(hi, cand[c])
    if lo == ninf:  # a run of padding only: start from the smallest visible candidate
        lo = hi
        for c in range(w):
            if cand[c] > ninf:
                lo = min(lo, cand[c])
    chi = _count_at_least(cand, w, hi)
    if chi >= k:
        return hi, w
    clo = _count_at_least(cand, w, lo)
    step = 0
    while clo != k:  # count(≥ lo) = clo > k > chi = count(≥ hi)
        step += 1
        if step % 2 == 1:  # interpolate on the counts (near linear in a row's upper tail), then bisect
            mid = lo + (hi - lo) * np.float32(clo - k) / np.float32(clo - chi)
        else:
            mid = lo + (hi - lo) * np.float32(0.5)
        if mid <= lo or mid >= hi:
            mid = lo + (hi - lo) * np.float32(0.5)
            if mid <= lo or mid >= hi:  # no float between: the k-th largest is lo
                return lo, w
        cm = _count_at_least(cand, w, mid)
        if cm >= k:
            lo, clo = mid, cm
        else:
            hi, chi = mid, cm
    m = hi
    for c in range(w):
        if cand[c] >= lo:
            m = min(m, cand[c])
    return m, w


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
        gemm = T >= PREFILL_MIN_QUERIES
        rows = max(1, min(SELECT_ROWS, T, SELECT_TILE_BYTES // (S * qc.itemsize))) if gemm else T
        pick(_SELECT, B * n_heads * T * S * D)(qc, Kb, Vb, S, m, has_mask, bool(causal), code, int(topk),
                                               qc.dtype.type(log_thr), gemm, rows, sc, n_heads, n_kv_heads,
                                               qc.dtype.type(0), out)
    return out, K, V


def sparse_attention_kv8(q, k, v, past_k=None, past_k_scale=None, past_v=None, past_v_scale=None, mask=None,
                         **attrs):
    """The spec's int8 cache handling (quantize the new tokens, dequantize the cache) around the
    pattern kernel above: the pattern's speed, the int8 cache's memory."""
    from minitx.ops.quant import kv8_forward

    return kv8_forward(sparse_attention, (q, k, v, past_k, past_k_scale, past_v, past_v_scale, mask), attrs)


# ------------------------------------------------------------------------------ CSR linear
def _csr_rows(xT, data, indices, indptr, scale, yT):
    """Many rows (prefill): yT[o, :] += w · xT[col, :] for every stored weight — each weight read
    once, a contiguous row of xT per weight; accumulating in yT itself (no buffer per output)."""
    out_f = yT.shape[0]
    N = xT.shape[1]
    for o in prange(out_f):
        yo = yT[o]
        for n in range(N):
            yo[n] = 0.0
        for p in range(indptr[o], indptr[o + 1]):
            w = np.float32(data[p])
            xc = xT[indices[p]]
            for n in range(N):
                yo[n] += w * xc[n]
        s = scale[o]
        for n in range(N):
            yo[n] *= s


def _csr_skinny(x, data, indices, indptr, scale, y):
    """Few rows (decode): four independent accumulators per (row, output) over the row's inputs
    gathered by index — one accumulator would wait on the add before it every time."""
    out_f = y.shape[1]
    for o in prange(out_f):
        p0, p1 = indptr[o], indptr[o + 1]
        for n in range(x.shape[0]):
            xn = x[n]
            a0 = a1 = a2 = a3 = np.float32(0.0)
            p = p0
            while p + 4 <= p1:
                a0 += np.float32(data[p]) * xn[indices[p]]
                a1 += np.float32(data[p + 1]) * xn[indices[p + 1]]
                a2 += np.float32(data[p + 2]) * xn[indices[p + 2]]
                a3 += np.float32(data[p + 3]) * xn[indices[p + 3]]
                p += 4
            while p < p1:
                a0 += np.float32(data[p]) * xn[indices[p]]
                p += 1
            y[n, o] = ((a0 + a1) + (a2 + a3)) * scale[o]


def _csr_expand(data, indices, indptr, scale, o0, W):
    """W (in, width) = the dense columns o0 … o0 + width of what the CSR Wᵀ stands for: one
    column per output, each stored weight written once. A task per 16 columns (one 64-byte line
    of each row) zeroes them and scatters their weights, so the lines it writes stay in its cache;
    a column at a time touched a new line for every weight."""
    width = W.shape[1]
    for blk in prange((width + 15) // 16):
        c0 = blk * 16
        c1 = min(width, c0 + 16)
        for i in range(W.shape[0]):
            for o in range(c0, c1):
                W[i, o] = 0.0
        for o in range(c0, c1):
            s = scale[o0 + o]
            for p in range(indptr[o0 + o], indptr[o0 + o + 1]):
                W[indices[p], o] = np.float32(data[p]) * s


_CSR, _CSR_SKINNY, _CSR_EXPAND = kernel(_csr_rows), kernel(_csr_skinny), kernel(_csr_expand)
SKINNY_MAX_ROWS = 8
# From this fraction of weights kept on, many rows go through dense panels and BLAS instead of the
# CSR kernel (whose time falls with the weights kept): at 768 → 3072 and 128 rows the kernel ran
# at 0.67x dense with 30% kept (panels 0.55x) and 0.41x with 50% kept (panels 0.52x),
# benchmarks/results/sparse_crossover.md.
CSR_BLAS_MIN_DENSITY = 0.4
PANEL_FLOATS = 1 << 18   # one panel of expanded weights, 1 MiB. 2:4 at 768 → 3072, 128 rows, interleaved at load
# average 6-8: 0.76-0.89x dense with it, 0.79-0.80x with 4 MiB, 0.82x with the whole matrix as one
# panel, 0.63x with 256 KiB; the code before panels (1024-column tiles, NumPy's matmul) 0.78x


def _through_blas(x2, out_f, fill):
    """y = x2 @ W for compact W: a panel of output columns at a time is expanded into one reused
    float32 buffer by ``fill(o0, panel)`` and multiplied by the float linear (linalg.py: numba's
    tasks for threads, never OpenBLAS's spinning ones) — the trick quant.py's transposed int8
    linear (``_tiled_t``) plays. A CPU has no sparse matrix units, so at many rows this is the fastest way through we
    have, but not free: the expansion is a pass over a dense-sized panel (measured at 0.3-0.6 of
    the GEMM's time at 128 rows on the shared 2-core VM), so prefill stays below dense speed."""
    rows, in_f = x2.shape
    width = min(out_f, max(64, PANEL_FLOATS // in_f // 64 * 64))
    buf = np.empty(in_f * width, np.float32)
    if width == out_f:
        panel = buf.reshape(in_f, out_f)
        fill(0, panel)
        return float_linear(x2, panel)
    y = np.empty((rows, out_f), np.float32)
    for o in range(0, out_f, width):
        w = min(width, out_f - o)
        panel = buf[:in_f * w].reshape(in_f, w)
        fill(o, panel)
        y[:, o:o + w] = float_linear(x2, panel)
    return y


def _scales(scale, out_f):
    return np.ones(out_f, np.float32) if scale is None else scale.astype(np.float32, copy=False)


def _stored(a):
    """Compact weights as the kernels read them: float32, or the integers as they are (int8)."""
    return a if a.dtype.kind in "iu" else a.astype(np.float32, copy=False)


def _finish(y2, x, b):
    y = y2.reshape(*x.shape[:-1], y2.shape[-1])
    return y if b is None else y + b


def sparse_linear(x, data, indices, indptr, b=None, scale=None, *, shape):
    """Few rows (decode): the skinny CSR kernel. Many rows: the CSR kernel where few weights are
    kept, dense panels and BLAS from ``CSR_BLAS_MIN_DENSITY`` on, whichever measured faster."""
    if x.dtype != np.float32:
        return S.sparse_linear(x, data, indices, indptr, b, scale, shape=shape)
    out_f, in_f = shape
    x2 = np.ascontiguousarray(x.reshape(-1, in_f))
    s = _scales(scale, out_f)
    vals = _stored(data)
    if x2.shape[0] <= SKINNY_MAX_ROWS:
        y2 = np.empty((x2.shape[0], out_f), x.dtype)
        pick(_CSR_SKINNY, data.size * x2.shape[0])(x2, vals, indices, indptr, s, y2)
        return _finish(y2, x, b)
    if data.size >= CSR_BLAS_MIN_DENSITY * out_f * in_f:
        return _finish(_through_blas(x2, out_f, lambda o, t: pick(_CSR_EXPAND, t.size)(vals, indices, indptr, s, o, t)),
                       x, b)
    xT = np.ascontiguousarray(x2.T)
    yT = np.empty((out_f, xT.shape[1]), x.dtype)
    pick(_CSR, data.size * xT.shape[1])(xT, vals, indices, indptr, s, yT)
    return _finish(yT.T, x, b)


# ------------------------------------------------------------------------------ N:M linear
NM_TILE = 1024   # output channels per task: their accumulators stay in L1, their rows stream


def _nm24_rows(x, values, packed, scale, y):
    """2:4 at few rows (decode), input-major storage: for every 8 inputs (one byte of positions
    per output: two groups, two positions each) and a tile of outputs, the value at position
    p = 2h + l of a group is x[4g] + l·(x[4g+1] − x[4g]) + h·((x[4g+2] − x[4g]) + l·(…)) — the
    position's two bits, used unshifted (the constants carry the powers of two), select among
    four inputs held in registers with three fused multiply-adds. No gather, so the loop over
    outputs vectorises; it reads 2 floats and 4 bits per group of 4 weights (int8 values: 2 bytes
    and 4 bits) instead of a dense matrix's 4 floats, which is what decode's speed is bound by."""
    N = x.shape[0]
    J, out = packed.shape
    for t in prange((out + NM_TILE - 1) // NM_TILE):
        o0 = t * NM_TILE
        w = min(out, o0 + NM_TILE) - o0
        acc = np.zeros((N, w), np.float32)
        for j in range(J):
            pj = packed[j, o0:o0 + w]
            v0, v1 = values[4 * j, o0:o0 + w], values[4 * j + 1, o0:o0 + w]
            v2, v3 = values[4 * j + 2, o0:o0 + w], values[4 * j + 3, o0:o0 + w]
            for r in range(N):
                xa, xb = x[r, 8 * j], x[r, 8 * j + 4]
                dA, eA = x[r, 8 * j + 1] - xa, x[r, 8 * j + 2] - xa
                fA = x[r, 8 * j + 3] - x[r, 8 * j + 2] - dA
                dB, eB = x[r, 8 * j + 5] - xb, x[r, 8 * j + 6] - xb
                fB = x[r, 8 * j + 7] - x[r, 8 * j + 6] - dB
                # bit k of the byte is 2^k when set: fold 2^-k into the constants
                a0, b0, c0 = dA, eA * np.float32(0.5), fA * np.float32(0.5)
                a1, b1, c1 = dA * np.float32(0.25), eA * np.float32(0.125), fA * np.float32(2.0 ** -5)
                a2, b2, c2 = dB * np.float32(2.0 ** -4), eB * np.float32(2.0 ** -5), fB * np.float32(2.0 ** -9)
                a3, b3, c3 = dB * np.float32(2.0 ** -6), eB * np.float32(2.0 ** -7), fB * np.float32(2.0 ** -13)
                ar = acc[r]
                for o in range(w):
                    c = np.int32(pj[o])
                    l0, h0 = np.float32(c & 1), np.float32(c & 2)
                    l1, h1 = np.float32(c & 4), np.float32(c & 8)
                    l2, h2 = np.float32(c & 16), np.float32(c & 32)
                    l3, h3 = np.float32(c & 64), np.float32(c & 128)
                    s0 = xa + l0 * a0 + h0 * (b0 + l0 * c0)
                    s1 = xa + l1 * a1 + h1 * (b1 + l1 * c1)
                    s2 = xb + l2 * a2 + h2 * (b2 + l2 * c2)
                    s3 = xb + l3 * a3 + h3 * (b3 + l3 * c3)
                    ar[o] += (np.float32(v0[o]) * s0 + np.float32(v1[o]) * s1
                              + np.float32(v2[o]) * s2 + np.float32(v3[o]) * s3)
        for r in range(N):
            for o in range(w):
                y[r, o0 + o] = acc[r, o] * scale[o0 + o]


def _nm_expand(values, packed, n, m, bits, scale, o0, W):
    """W (in, width) = the dense columns o0 … o0 + width of what an N:M pair stands for (W
    zeroed here)."""
    K = values.shape[0]
    per = 8 // bits
    low = (1 << bits) - 1
    width = W.shape[1]
    for i in prange(W.shape[0]):
        for o in range(width):
            W[i, o] = 0.0
    for k in range(K):
        base = (k // n) * m
        shift = bits * (k % per)
        pk = packed[k // per]
        vk = values[k]
        for o in range(width):
            W[base + ((pk[o0 + o] >> shift) & low), o] = np.float32(vk[o0 + o]) * scale[o0 + o]


def _nm24_expand(values, packed, scale, o0, W):
    """2:4 only: W (in, width) = the dense columns o0 … o0 + width, written row by row, so the loop
    over outputs vectorises and the stores are contiguous (the generic ``_nm_expand`` scatters one
    value at a time). Dense row r of a group is Σ_slot v·[p = r] over the group's two slots; with
    p's bits l, h as 0/1 floats (taken unshifted, ``c & 2^k``, whose powers of two the constants
    undo, as in ``_nm24_rows``) [p = r] = (1 − |l − r₀|)(1 − |h − r₁|) for r's bits r₀, r₁. Float
    lanes throughout: a shift by a variable or a compare on the integer position made numba's
    int64 lanes, and the loop ran 1.3-1.6x slower (768 × 3072, interleaved)."""
    J = packed.shape[0]
    width = W.shape[1]
    one = np.float32(1.0)
    for j in prange(J):
        pj = packed[j, o0:o0 + width]
        v0, v1 = values[4 * j, o0:o0 + width], values[4 * j + 1, o0:o0 + width]
        v2, v3 = values[4 * j + 2, o0:o0 + width], values[4 * j + 3, o0:o0 + width]
        sc = scale[o0:o0 + width]
        for r in range(4):
            r0 = np.float32(r & 1)
            r1 = np.float32(r >> 1)
            lo, hi = W[8 * j + r], W[8 * j + 4 + r]   # rows r of the byte's two groups
            for o in range(width):
                c = np.int32(pj[o])
                i0 = (one - abs(np.float32(c & 1) - r0)) * (one - abs(np.float32(c & 2) * np.float32(0.5) - r1))
                i1 = ((one - abs(np.float32(c & 4) * np.float32(0.25) - r0))
                      * (one - abs(np.float32(c & 8) * np.float32(0.125) - r1)))
                i2 = ((one - abs(np.float32(c & 16) * np.float32(2.0 ** -4) - r0))
                      * (one - abs(np.float32(c & 32) * np.float32(2.0 ** -5) - r1)))
                i3 = ((one - abs(np.float32(c & 64) * np.float32(2.0 ** -6) - r0))
                      * (one - abs(np.float32(c & 128) * np.float32(2.0 ** -7) - r1)))
                s = sc[o]
                lo[o] = (np.float32(v0[o]) * i0 + np.float32(v1[o]) * i1) * s
                hi[o] = (np.float32(v2[o]) * i2 + np.float32(v3[o]) * i3) * s


_NM24, _NM_EXPAND, _NM24_EXPAND = kernel(_nm24_rows), kernel(_nm_expand), kernel(_nm24_expand)
NM_PACKED_MAX_ROWS = 16   # 2:4 up to this many rows: the packed kernel; more: dense panels and BLAS
# (measured: benchmarks/results/sparse_crossover.md, the 2:4 switch table)


def nm_linear(x, values, idx, b=None, scale=None, *, n, m, in_features):
    """2:4 at up to ``NM_PACKED_MAX_ROWS`` rows: the packed kernel (faster than dense: decode reads
    half the bytes, benchmarks/results/sparse_crossover.md). Many rows, or other N:M: panels of
    output channels expanded to dense and multiplied by BLAS (:func:`_through_blas`) — a CPU has
    no sparse matrix units, so 2:4's gain at prefill is storage, and its cost the expansion."""
    if x.dtype != np.float32:
        return S.nm_linear(x, values, idx, b, scale, n=n, m=m, in_features=in_features)
    out_f = values.shape[1]
    x2 = np.ascontiguousarray(x.reshape(-1, in_features))
    s = _scales(scale, out_f)
    vals = _stored(values)
    two_four = (n, m) == (2, 4) and in_features % 8 == 0
    if two_four and x2.shape[0] <= NM_PACKED_MAX_ROWS:
        y2 = np.empty((x2.shape[0], out_f), np.float32)
        pick(_NM24, values.size * x2.shape[0])(x2, vals, idx, s, y2)
        return _finish(y2, x, b)
    if two_four:
        def fill(o, t):
            pick(_NM24_EXPAND, t.size)(vals, idx, s, o, t)
    else:
        def fill(o, t):
            pick(_NM_EXPAND, t.size)(vals, idx, int(n), int(m), S.index_bits(m), s, o, t)
    return _finish(_through_blas(x2, out_f, fill), x, b)


KERNELS = {"sparse_attention": sparse_attention, "sparse_attention_kv8": sparse_attention_kv8,
           "sparse_linear": sparse_linear, "nm_linear": nm_linear}
