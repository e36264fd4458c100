"""Linear layers and matmuls: BLAS on one thread per numba task, and x·Eᵀ for a few rows.

Spec: minitx/ops/linalg.py. ``linear`` (whatever its size: OpenBLAS stays on one thread,
minitx/threads.py) is cut into :func:`slabs` tasks, one per SLAB_MIN
multiply-adds up to numba's thread count, each a one-thread BLAS call on its slab: for one row
(batch-1 decode) slabs of output columns, a GEMV each into NumPy's own OpenBLAS on w's block in
place (:func:`_gemv_cols`, ``_cblas``), so that each core streams its share of the weight; from
SPLIT_ROWS rows on slabs of rows (:func:`_gemm_rows`, numba's ``np.dot``: the same split through
``_cblas`` measured 0.80x of it on MiniLM at 32 x 16, equal at 1 x 128, load average 3). The tied
LM head ``x @ Eᵀ`` for one row is cut the same way over E's rows (:func:`_xet_cols`). Other calls
are one NumPy call sized by the budget.

Measured on the shared 2-core VM (benchmarks/results/decode_cpu.md): the one-row column split
against one GEMV was 0.75-1.87x at batch-1 decode across runs minutes apart, 1.03x interleaved in
one process, and 0.73-1.5x on single GEMVs paired one each way (one core's GEMV already reads
20-25 GB/s there); the same split of 2–63 rows ran at 0.67–0.94x of one GEMM (waking the second
task costs 15–80 µs, and the halves of a GEMM did not overlap), so few rows stay one call.
Why numba's tasks and not OpenBLAS's threads: OpenBLAS's two threads wait for each
other, spinning, when one is descheduled (0.18x / 0.49x of one thread on MiniLM's linears at 128 /
512 rows, load average 9); numba's tasks do not. Measured earlier (single-thread CPU time, weights
from DRAM): OpenBLAS's GEMV/GEMM on ``x @ W`` with W (in, out) is as good as anything we wrote in
numba for every row count. But ``x @ Eᵀ`` with the (vocab, d) embedding table is about 2x slower
than it should be for 2–16 rows (its transposed small-M path) against :func:`_xwt`, where each
output is a dot product along a contiguous row of E, four rows of x at a time."""
from __future__ import annotations

import numba
import numpy as np
import scipy.linalg.cython_blas  # noqa: F401 — the BLAS numba's np.dot calls (attention's tiles): loaded before threads.attach_numba sizes it
from numba import prange

from minitx import threads
from minitx.ops import linalg as spec

from . import _cblas, sgemm
from ._cblas import NO_TRANS, TRANS, gemv
from ._jit import kernel, pick

XWT_ROWS = (2, 16)  # row counts for which _xwt beats BLAS on x @ Eᵀ


def _xwt(x, w, y, zero):
    """y = x @ wᵀ with w (N, K) row-major: per output column a dot along w's contiguous row n.

    Four rows of x share each load of w[n]; the accumulators are typed by ``zero`` (float32 stays
    float32, so LLVM vectorises the four reductions).
    """
    M, K = x.shape
    N = w.shape[0]
    for blk in prange((N + 127) // 128):
        for n in range(blk * 128, min(N, blk * 128 + 128)):
            wn = w[n]
            m = 0
            while m + 4 <= M:
                x0, x1, x2, x3 = x[m], x[m + 1], x[m + 2], x[m + 3]
                a0 = a1 = a2 = a3 = zero
                for k in range(K):
                    wk = wn[k]
                    a0 += x0[k] * wk
                    a1 += x1[k] * wk
                    a2 += x2[k] * wk
                    a3 += x3[k] * wk
                y[m, n] = a0
                y[m + 1, n] = a1
                y[m + 2, n] = a2
                y[m + 3, n] = a3
                m += 4
            while m < M:
                xm = x[m]
                a = zero
                for k in range(K):
                    a += xm[k] * wn[k]
                y[m, n] = a
                m += 1


_XWT = kernel(_xwt)


SPLIT_ROWS = 64  # from here on linear cuts its rows into slabs (for one row: its output columns)
SLAB_MIN = 1 << 18  # multiply-adds per slab: one task per SLAB_MIN, up to numba's thread count


def _gemm_rows(x, w, b, has_bias, y, P):
    """y = x @ w (+ b), rows cut into P slabs, one BLAS call (on one thread) per numba task, which
    then adds the bias to its slab while it is in cache (one NumPy pass over all of y afterwards
    was a serial read and write of the whole output: 0.3 ns an element, 3 ms a MiniLM run at 32 x 16)."""
    M = x.shape[0]
    N = w.shape[1]
    for p in prange(P):
        m0 = p * M // P
        m1 = (p + 1) * M // P
        np.dot(x[m0:m1], w, y[m0:m1])
        if has_bias:
            for m in range(m0, m1):
                for n in range(N):
                    y[m, n] += b[n]


def _gemv_cols(x, w, y, P):
    """y = x @ w for one row, output columns cut into P slabs (of whole 64-byte lines), one GEMV per
    task on w's (K, slab) block in place (leading dimension N): each core streams its share of w."""
    K = x.shape[1]
    N = w.shape[1]
    for p in prange(P):
        c0 = p * N // P // 16 * 16
        c1 = N if p == P - 1 else (p + 1) * N // P // 16 * 16
        if c1 > c0:
            gemv(TRANS, K, c1 - c0, w, c0, N, x, y, c0)


def _xet_cols(x, e, y, P):
    """y = x @ eᵀ for one row, e (V, K) row-major: e's rows (y's columns) cut into P contiguous
    slabs, one GEMV per task."""
    K = x.shape[1]
    V = e.shape[0]
    for p in prange(P):
        n0 = p * V // P // 16 * 16
        n1 = V if p == P - 1 else (p + 1) * V // P // 16 * 16
        if n1 > n0:
            gemv(NO_TRANS, n1 - n0, K, e, n0 * K, K, x, y, n0)


_GEMM_ROWS, _GEMV_COLS, _XET_COLS = kernel(_gemm_rows), kernel(_gemv_cols), kernel(_xet_cols)


def slabs(work: int) -> int:
    """Tasks to cut a product of ``work`` multiply-adds into: 1 (not split) for small calls, where
    waking a thread costs more than half the call; else one per SLAB_MIN, up to numba's threads.
    Large calls too: 128 x 768 @ 768 x 3072 (and back) took 31.6 ms as two numba tasks of one-
    thread GEMMs, 34.0 ms on one OpenBLAS thread and 62.7 ms on OpenBLAS's two, interleaved at
    load average 3.9 (llama.cpp's prefill comparison, benchmarks/results/llamacpp_cpu.md)."""
    return max(1, min(numba.get_num_threads(), work // SLAB_MIN))


def _splittable(a, w, b=None) -> bool:
    return (a.dtype == w.dtype and a.dtype in (np.float32, np.float64) and w.ndim == 2 and w.flags.c_contiguous
            and (b is None or b.dtype == a.dtype))


def linear(x, w, b=None):
    """The spec's ``x W + b`` (bias added in place)."""
    rows = int(np.prod(x.shape[:-1]))
    work = rows * w.shape[0] * w.shape[1]
    P = slabs(work) if (rows == 1 and _cblas.AVAILABLE) or rows >= SPLIT_ROWS else 1
    if sgemm.usable(x.reshape(rows, x.shape[-1]), w, b):  # AVX-512 (sgemm.py)
        y = sgemm.gemm(x.reshape(rows, x.shape[-1]), w, b, parallel=P > 1)
        return y.reshape(*x.shape[:-1], w.shape[1])
    if P < 2 or not _splittable(x, w, b):
        with threads.blas(work):
            return spec.linear(x, w, b)
    x2 = np.ascontiguousarray(x).reshape(rows, x.shape[-1])
    y = np.empty((rows, w.shape[1]), x.dtype)
    if rows == 1:
        _GEMV_COLS[0](x2, w, y, P)
        if b is not None:
            y += b
    else:
        _GEMM_ROWS[0](x2, w, w[0] if b is None else b, b is not None, y, P)
    return y.reshape(*x.shape[:-1], w.shape[1])


def linear_vjp(grads, inputs, outputs):
    """The spec's VJP, its two products (the forward's size) on the budget's BLAS threads."""
    x, w = inputs[0], inputs[1]
    with threads.blas(int(np.prod(x.shape[:-1])) * w.shape[0] * w.shape[1]):
        return spec.linear_vjp(grads, inputs, outputs)


# threads.size_blas leaves these as they are: they size BLAS themselves
linear.sizes_blas = linear_vjp.sizes_blas = True  # type: ignore[attr-defined]


def matmul(a, b, *, transpose_b=False):
    """The spec's matmul; ``a @ bᵀ`` with a 2-D ``b`` (the tied LM head) split over numba's tasks
    for one row, and by :func:`_xwt` for XWT_ROWS rows."""
    rows = int(np.prod(a.shape[:-1]))
    if transpose_b and b.ndim == 2 and sgemm.usable(a.reshape(rows, a.shape[-1]), b, transposed=True):  # AVX-512 (sgemm.py)
        P = slabs(rows * b.size) if rows >= SPLIT_ROWS else 1
        return sgemm.gemm(a.reshape(rows, a.shape[-1]), b, transposed=True, parallel=P > 1).reshape(
            *a.shape[:-1], b.shape[0])
    if transpose_b and _splittable(a, b) and (rows == 1 or XWT_ROWS[0] <= rows <= XWT_ROWS[1]):
        a2 = np.ascontiguousarray(a).reshape(rows, a.shape[-1])
        y = np.empty((rows, b.shape[0]), a.dtype)
        P = slabs(b.size) if _cblas.AVAILABLE else 1
        if rows > 1:
            pick(_XWT, b.size)(a2, b, y, a.dtype.type(0))
        elif P > 1:
            _XET_COLS[0](a2, b, y, P)
        else:
            return spec.matmul(a, b, transpose_b=True)
        return y.reshape(*a.shape[:-1], b.shape[0])
    return spec.matmul(a, b, transpose_b=transpose_b)


KERNELS = {"linear": linear, "matmul": matmul}
VJPS = {"linear": linear_vjp}
