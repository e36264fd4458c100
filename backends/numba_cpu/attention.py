"""Scaled dot-product attention, fused scores → softmax → PV: one kernel for decode, one for prefill.

Spec: minitx/ops/attention.py. Same semantics: grouped-query heads (query head h reads kv head
h // (n_heads / n_kv_heads)), ``causal`` lets query t see keys 0 … S + t, ``mask`` (B, S + T)
removes padded keys, and a query with no visible key averages all values uniformly (the spec's
fully-masked row). The KV cache grows in place (see kvcache.py) instead of being copied.
"""
from __future__ import annotations

import numba
import numpy as np
import scipy.linalg.cython_blas  # noqa: F401 — the BLAS numba's np.dot calls: loaded before threads.attach_numba sizes it
from numba import prange

from ._jit import FASTMATH, kernel, pick
from ._vmath import dot4, exp
from .kvcache import append, storage


@numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _mix_values(p, n, Vb, first, lo, acc):
    """acc += Σ_{s<n} p[s]·Vb[first + s, lo:lo+len(acc)], four value rows per pass over acc (one
    load and store of acc per four multiply-adds)."""
    D = acc.size
    s = 0
    while s + 4 <= n:
        p0, p1, p2, p3 = p[s], p[s + 1], p[s + 2], p[s + 3]
        r = first + s
        v0, v1 = Vb[r, lo:lo + D], Vb[r + 1, lo:lo + D]
        v2, v3 = Vb[r + 2, lo:lo + D], Vb[r + 3, lo:lo + D]
        for d in range(D):
            acc[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d]
        s += 4
    while s < n:
        ps = p[s]
        vs = Vb[first + s, lo:lo + D]
        for d in range(D):
            acc[d] += ps * vs[d]
        s += 1


@numba.njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def mean_values(V, VS, quantized, b, g, S, o):
    """o = the mean of V[b, :S, g's head] (times the per-token scales VS[b, s, g] of an int8
    cache when ``quantized``): the spec's output for a query with no visible key, which attends
    uniformly to all S keys. The one copy of this rule for every attention kernel of the backend
    (sparse.py's too) but _sdpa_short, which reads V at a column offset."""
    D = o.size
    for d in range(D):
        o[d] = 0
    for s in range(S):
        vs = V[b, s, g * D:(g + 1) * D]
        if quantized:
            ws = VS[b, s, g]
            for d in range(D):
                o[d] += ws * vs[d]
        else:
            for d in range(D):
                o[d] += vs[d]
    for d in range(D):
        o[d] = o[d] / S


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
            a0, a1, a2, a3 = dot4(qh, k0, k1, k2, k3, D, zero)
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
        o = out[b, t, h * D:(h + 1) * D]
        if m == -np.inf:  # nothing visible: uniform over all keys, like the spec
            mean_values(V, VS, quantized, b, g, S_tot, o)
            continue
        acc = np.zeros(D, q.dtype)
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
        _mix_values(sc, n, V[b], 0, g * D, acc)
        inv = 1.0 / total
        for d in range(D):
            o[d] = acc[d] * inv


TQ = 64    # queries per tile of the GEMM prefill kernel
TK = 256   # keys per tile: a TQ × TK score tile is 64 KiB in float32, resident in L2


def _sdpa_gemm(q, K, V, S, mask, has_mask, causal, scale, H, KV, zero, out):
    """Prefill as two small GEMMs per tile, with an online softmax between them.

    One task per (batch, head): its keys and values are copied once into contiguous (S, D)
    arrays, then for each tile of TQ queries (pre-scaled) the kernel walks TK-key tiles: scores
    = Q·Kᵀ (one BLAS call), per row the running maximum, sum and rescale of the accumulator
    (flash-attention's online softmax; causal rows stop at their last visible key, masked keys
    weigh exactly 0), then acc += P·V (one BLAS call). The score matrix never exceeds TQ × TK,
    and key tiles past a causal query tile's last query are skipped.
    Why BLAS inside: the previous kernel's loops (four rows of Kᵀ or V per pass, LLVM-vectorised)
    load and store the score row or accumulator every four FMAs; a GEMM micro-kernel keeps a
    register tile, which numba's loops cannot express. Measured against it in one process,
    alternating, 5 rounds, 2 threads on the 2-core machine at load average 10-12: MiniLM 32×128
    1.41x, GPT-2 1×128 causal 1.01x, 4×128 (padded) 2.76x, 1×1024 causal 1.55x, GQA 32/8 heads
    1×512 1.29x, 3×37 (D = 24, padded) 1.28x. BLAS is on one thread here (minitx/threads.py),
    each call from its own numba task.
    """
    B, T, HD = q.shape
    D = HD // H
    G = H // KV
    past = S - T
    ninf = zero - np.float32(np.inf)
    for task in prange(B * H):
        b = task // H
        h = task % H
        g = h // G
        Kh = np.empty((S, D), q.dtype)
        Vh = np.empty((S, D), q.dtype)
        vis = np.empty(S, q.dtype)
        for s in range(S):
            for d in range(D):
                Kh[s, d] = K[b, s, g * D + d]
                Vh[s, d] = V[b, s, g * D + d]
            vis[s] = zero if has_mask and mask[b, s] == 0 else zero + 1
        Qt = np.empty((TQ, D), q.dtype)
        sbuf = np.empty(TQ * TK, q.dtype)
        pv = np.empty(TQ * D, q.dtype)
        acc = np.empty((TQ, D), q.dtype)
        m = np.empty(TQ, q.dtype)
        tot = np.empty(TQ, q.dtype)
        for t0 in range(0, T, TQ):
            nq = min(TQ, T - t0)
            for i in range(nq):
                for d in range(D):
                    Qt[i, d] = q[b, t0 + i, h * D + d] * scale
                    acc[i, d] = zero
                m[i] = ninf
                tot[i] = zero
            hi = past + t0 + nq if causal else S
            for s0 in range(0, hi, TK):
                nk = min(TK, hi - s0)
                sc = sbuf[:nq * nk].reshape((nq, nk))
                np.dot(Qt[:nq], Kh[s0:s0 + nk].T, sc)
                vr = vis[s0:s0 + nk]
                for i in range(nq):
                    row = sc[i]
                    n = min(nk, past + t0 + i + 1 - s0) if causal else nk
                    bm = ninf
                    for j in range(n):
                        if vr[j] != zero and row[j] > bm:
                            bm = row[j]
                    if bm == ninf:  # nothing visible in this tile: the row adds nothing
                        for j in range(nk):
                            row[j] = zero
                        continue
                    if bm > m[i]:
                        c = exp(m[i] - bm)  # 0 on the first visible tile (m = −inf)
                        tot[i] *= c
                        for d in range(D):
                            acc[i, d] *= c
                        m[i] = bm
                    mi = m[i]
                    total = zero
                    for j in range(n):
                        p = exp(row[j] - mi) * vr[j]
                        row[j] = p
                        total += p
                    for j in range(n, nk):
                        row[j] = zero
                    tot[i] += total
                pvt = pv[:nq * D].reshape((nq, D))
                np.dot(sc, Vh[s0:s0 + nk], pvt)
                for i in range(nq):
                    for d in range(D):
                        acc[i, d] += pvt[i, d]
            for i in range(nq):
                o = out[b, t0 + i, h * D:(h + 1) * D]
                if m[i] == ninf:  # nothing visible: uniform over all keys, like the spec
                    mean_values(V, V, False, b, g, S, o)
                    continue
                inv = 1.0 / tot[i]
                for d in range(D):
                    o[d] = acc[i, d] * inv


def _sdpa_short(q, qo, K, ko, V, vo, S, mask, has_mask, causal, scale, H, KV, zero, out):
    """Prefill over few keys (at most SHORT_KEYS): one task per (batch, head), register blocks.

    Scores come two queries at a time against four keys at a time, each a dot product along the
    keys' contiguous head slices read in place (eight independent reductions per pass over d,
    each q and k element loaded once for two or four of them); then per query the softmax over its
    row and the weighted sum of values, four value rows per pass (``_mix_values``). Why not
    _sdpa_gemm's BLAS tiles here: at MiniLM's 16-token sentences (S = 16, D = 32) a tile is one
    tiny GEMM per (batch, head) each way, whose call and packing cost is as large as its 8K
    multiply-adds (measured beside it: SHORT_KEYS). Masked keys weigh exactly 0 (``vis``); a query with
    no visible key averages V like the spec; an odd last query is computed as its own pair.
    q, K and V are read at column offsets qo, ko, vo of their buffers: the three may be one fused
    projection's output (``_columns``), read in place instead of copied apart.
    """
    B, T = q.shape[0], q.shape[1]
    HD = out.shape[2]
    D = HD // H
    G = H // KV
    past = S - T
    ninf = zero - np.float32(np.inf)
    for task in prange(B * H):
        b = task // H
        h = task % H
        lo = (h // G) * D
        kl = ko + lo
        vl = vo + lo
        qh = qo + h * D
        vis = np.empty(S, q.dtype)
        for s in range(S):
            vis[s] = zero if has_mask and mask[b, s] == 0 else zero + 1
        sc = np.empty((2, S), q.dtype)
        acc = np.empty(D, q.dtype)
        for t0 in range(0, T, 2):
            t1 = min(t0 + 1, T - 1)
            qa = q[b, t0, qh:qh + D]
            qb = q[b, t1, qh:qh + D]
            n = min(S, past + t1 + 1) if causal else S
            s = 0
            while s + 4 <= n:
                k0, k1 = K[b, s, kl:kl + D], K[b, s + 1, kl:kl + D]
                k2, k3 = K[b, s + 2, kl:kl + D], K[b, s + 3, kl:kl + D]
                a0 = a1 = a2 = a3 = c0 = c1 = c2 = c3 = zero
                for d in range(D):
                    x, y = qa[d], qb[d]
                    e0, e1, e2, e3 = k0[d], k1[d], k2[d], k3[d]
                    a0 += x * e0
                    a1 += x * e1
                    a2 += x * e2
                    a3 += x * e3
                    c0 += y * e0
                    c1 += y * e1
                    c2 += y * e2
                    c3 += y * e3
                sc[0, s], sc[0, s + 1], sc[0, s + 2], sc[0, s + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
                sc[1, s], sc[1, s + 1], sc[1, s + 2], sc[1, s + 3] = c0 * scale, c1 * scale, c2 * scale, c3 * scale
                s += 4
            while s < n:
                ks = K[b, s, kl:kl + D]
                a0 = c0 = zero
                for d in range(D):
                    a0 += qa[d] * ks[d]
                    c0 += qb[d] * ks[d]
                sc[0, s], sc[1, s] = a0 * scale, c0 * scale
                s += 1
            for i in range(t1 - t0 + 1):
                t = t0 + i
                row = sc[i]
                ni = min(S, past + t + 1) if causal else S
                m = ninf
                for j in range(ni):
                    if vis[j] != zero and row[j] > m:
                        m = row[j]
                o = out[b, t, h * D:(h + 1) * D]
                if m == ninf:  # nothing visible: uniform over all keys, like the spec (mean_values's
                    for d in range(D):  # rule, inline: V's columns start at vl, not at a head boundary)
                        o[d] = zero
                    for j in range(S):
                        for d in range(D):
                            o[d] += V[b, j, vl + d]
                    for d in range(D):
                        o[d] = o[d] / S
                    continue
                total = zero
                for j in range(ni):
                    p = exp(row[j] - m) * vis[j]
                    row[j] = p
                    total += p
                for d in range(D):
                    acc[d] = zero
                _mix_values(row, ni, V[b], 0, vl, acc)
                inv = 1.0 / total
                for d in range(D):
                    o[d] = acc[d] * inv


_SDPA, _SDPA_GEMM, _SDPA_SHORT = kernel(_sdpa), kernel(_sdpa_gemm), kernel(_sdpa_short)
NO_SCALES = np.zeros((1, 1, 1), np.float32)
_NO_MASK = np.zeros((1, 1), np.int64)  # _sdpa's unread KS / VS for a float cache
PREFILL_MIN_QUERIES = 8  # from here on the GEMM tiles (_sdpa_gemm); fewer queries take a dot product per key
# Prefill over at most SHORT_KEYS keys takes _sdpa_short. CPU time of one MiniLM layer (12 heads of
# 32) at batch 32, short / gemm, one thread, 15 rounds alternating (load average 4-6): 16 keys
# 0.86x, 32 0.69x, 48 (batch 4) 0.96x, 64 1.16x, 128 1.37x.
SHORT_KEYS = 48
# _sdpa_short's tasks are a few microseconds each: from this many multiply-adds on (MiniLM at
# 32 x 16: 3.1M, about 1 ms on one core) they are worth waking numba's other threads for; the
# shared default (PARALLEL_MIN, 16M) would keep a 32-sentence batch on one core.
SHORT_PARALLEL_MIN = 1 << 20


@numba.njit(cache=True, nogil=True)
def _offset(a, base):
    """Elements from the start of ``base`` to the start of its view ``a`` (NumPy's own way,
    ``__array_interface__``, costs several microseconds a call)."""
    return (a.ctypes.data - base.ctypes.data) // a.itemsize


def _columns(a):
    """(buffer, offset): a C-contiguous (B, T, W) array whose columns offset … offset + a.shape[2]
    are ``a``. A column slice of a contiguous array (q, k and v split from one fused projection)
    gives its base; anything else a contiguous copy at offset 0."""
    if a.flags.c_contiguous:
        return a, 0
    base, isz = a.base, a.itemsize
    B, T, C = a.shape
    if (isinstance(base, np.ndarray) and base.flags.c_contiguous and base.dtype == a.dtype and a.strides[2] == isz
            and a.strides[1] % isz == 0 and a.strides[0] == T * a.strides[1]):
        W = a.strides[1] // isz
        off = _offset(a, base)
        if base.size == B * T * W and 0 <= off and off + C <= W:
            return base.reshape(B, T, W), off
    return np.ascontiguousarray(a), 0


def _short(q, k, v, mask, n_heads, n_kv_heads, causal, scale):
    """_sdpa_short on q, k, v read where they lie (no KV cache: present K/V are k/v themselves)."""
    (qb, qo), (kb, ko), (vb, vo) = _columns(q), _columns(k), _columns(v)
    out = np.empty(q.shape, q.dtype)
    D = q.shape[-1] // n_heads
    scale = q.dtype.type(1.0 / np.sqrt(D) if scale is None else scale)
    has_mask = mask is not None
    m = np.ascontiguousarray(mask, dtype=np.int64) if has_mask else _NO_MASK
    work = q.shape[0] * n_heads * q.shape[1] * k.shape[1] * D
    pick(_SDPA_SHORT, work, SHORT_PARALLEL_MIN)(qb, qo, kb, ko, vb, vo, k.shape[1], m, has_mask, bool(causal), scale,
                                                n_heads, n_kv_heads, q.dtype.type(0), out)
    return out


def attention(q, k, v, past_k=None, past_v=None, mask=None, *, n_heads, n_kv_heads, causal, scale=None):
    if past_k is None and q.shape[1] >= PREFILL_MIN_QUERIES and k.shape[1] <= SHORT_KEYS:
        return _short(q, k, v, mask, n_heads, n_kv_heads, causal, scale), k, v
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
        if K.shape[1] <= SHORT_KEYS:
            Kb, Vb = storage(K), storage(V)
            pick(_SDPA_SHORT, work, SHORT_PARALLEL_MIN)(qc, 0, Kb, 0, Vb, 0, K.shape[1], m, has_mask, bool(causal),
                                                        scale, n_heads, n_kv_heads, qc.dtype.type(0), out)
            return out
        pick(_SDPA_GEMM, work)(qc, storage(K), storage(V), K.shape[1], m, has_mask, bool(causal), scale, n_heads,
                               n_kv_heads, qc.dtype.type(0), out)
        return out
    pick(_SDPA, work)(qc, storage(K), storage(KS) if quantized else NO_SCALES, storage(V),
                      storage(VS) if quantized else NO_SCALES, quantized, K.shape[1], m, has_mask, bool(causal), scale,
                      n_heads, n_kv_heads, qc.dtype.type(0), out)
    return out


KERNELS = {"attention": attention}
VJPS: dict = {}
