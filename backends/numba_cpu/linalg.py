"""Linear layers and matmuls: BLAS on one thread per numba task, and x·Eᵀ for a few rows.

Spec: minitx/ops/linalg.py. ``linear`` with at least SPLIT_ROWS rows and fewer than SPLIT_MAX
multiply-adds is cut into one slab of rows per numba thread, each an OpenBLAS GEMM on one thread
(:func:`_gemm_rows`); other calls are one BLAS call sized by the thread budget (minitx/threads.py:
one thread below BLAS_PARALLEL_MIN = SPLIT_MAX, the budget from there on). Why: below that size the
budget keeps OpenBLAS on one thread, because its own two threads wait for each other, spinning,
when one is descheduled (0.18x / 0.49x of one thread on MiniLM's linears at 128 / 512 rows, load
average 9 on the 2 cores); numba's tasks do not, and ran 1.12x / 1.14x faster than one thread
there (in one process, interleaved, 7 rounds). On the whole MiniLM encoder at load average 3 the
split, the split for every size and no split were within noise of each other (±5%) at 1×128,
32×16, 4×128 and 32×128, so above the threshold the budget's rule stays as it was. Measured earlier
(single-thread CPU time, weights from DRAM): OpenBLAS's GEMV/GEMM on ``x @ W`` with W (in, out)
is as good as anything we wrote in numba for every row count (a numba GEMV prefetching rows
ahead, as the int8 kernels do, streamed slower than OpenBLAS at batch 1). But ``x @ Eᵀ`` with the
(vocab, d) embedding table is about 2x slower than it should be for 2–16 rows (its transposed
small-M path) against :func:`_xwt`, where each output is a dot product along a contiguous row of
E, four rows of x at a time."""
from __future__ import annotations

import numba
import numpy as np
import scipy.linalg.cython_blas  # noqa: F401 — the BLAS numba's np.dot calls: loaded before threads.attach_numba sizes it
from numba import prange

from minitx import threads
from minitx.ops import linalg as spec

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


SPLIT_ROWS = 64  # from here on linear splits its rows over numba's threads …
SPLIT_MAX = threads.BLAS_PARALLEL_MIN  # … up to the multiply-adds from which BLAS gets the budget


def _gemm_rows(x, w, y, P):
    """y = x @ w, rows cut into P slabs, one BLAS call (on one thread) per numba task."""
    M = x.shape[0]
    for p in prange(P):
        m0 = p * M // P
        m1 = (p + 1) * M // P
        np.dot(x[m0:m1], w, y[m0:m1])


_GEMM_ROWS = kernel(_gemm_rows)


def linear(x, w, b=None):
    """The spec's ``x W + b`` (bias added in place)."""
    rows = int(np.prod(x.shape[:-1]))
    P = numba.get_num_threads()
    work = rows * w.shape[0] * w.shape[1]
    if (rows < SPLIT_ROWS or work >= SPLIT_MAX or P < 2 or x.dtype != w.dtype or x.dtype.kind != "f" or not w.flags.c_contiguous
            or (b is not None and b.dtype != x.dtype)):
        with threads.blas(work):
            return spec.linear(x, w, b)
    x2 = np.ascontiguousarray(x).reshape(rows, x.shape[-1])
    y = np.empty((rows, w.shape[1]), x.dtype)
    _GEMM_ROWS[0](x2, w, y, P)
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w.shape[1])


def linear_vjp(grads, inputs, outputs):
    """The spec's VJP, its two products (the forward's size) on the budget's BLAS threads."""
    x, w = inputs[0], inputs[1]
    with threads.blas(int(np.prod(x.shape[:-1])) * w.shape[0] * w.shape[1]):
        return spec.linear_vjp(grads, inputs, outputs)


# threads.size_blas leaves these as they are: they size BLAS themselves
linear.sizes_blas = linear_vjp.sizes_blas = True  # type: ignore[attr-defined]


def matmul(a, b, *, transpose_b=False):
    rows = int(np.prod(a.shape[:-1]))
    if (transpose_b and b.ndim == 2 and XWT_ROWS[0] <= rows <= XWT_ROWS[1] and a.dtype == b.dtype
            and a.dtype.kind == "f" and b.flags.c_contiguous):
        a2 = np.ascontiguousarray(a).reshape(rows, a.shape[-1])
        y = np.empty((rows, b.shape[0]), a.dtype)
        pick(_XWT, b.size)(a2, b, y, a.dtype.type(0))
        return y.reshape(*a.shape[:-1], b.shape[0])
    return spec.matmul(a, b, transpose_b=transpose_b)


KERNELS = {"linear": linear, "matmul": matmul}
VJPS = {"linear": linear_vjp}
