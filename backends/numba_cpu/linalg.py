"""Linear layers and matmuls: BLAS, except x·Eᵀ for a few rows (the tied LM head while decoding).

Spec: minitx/ops/linalg.py. Measured on this project's 2-core machine (single-thread CPU time,
weights streamed from DRAM; see benchmarks/results/decode_cpu.md): OpenBLAS's GEMV/GEMM on ``x @ W``
with W (in, out) is as good as anything we wrote in numba for every row count, so ``linear`` is the
spec's own BLAS call, delegated (``NumbaBackend.delegate``; a numba GEMV prefetching rows ahead, as
the int8 kernels do, streamed slower than OpenBLAS at batch 1). But ``x @ Eᵀ`` with the (vocab, d) embedding table
is about 2x slower than it should be for 2–16 rows (its transposed small-M path) against
:func:`_xwt`, where each output is a dot product along a
contiguous row of E, four rows of x at a time. ``embedding`` (a row gather) and ``split`` (views)
are delegated to the spec too: its NumPy code is already optimal."""
from __future__ import annotations

import numpy as np
from numba import prange

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


def matmul(a, b, *, transpose_b=False):
    rows = int(np.prod(a.shape[:-1]))
    if (transpose_b and b.ndim == 2 and XWT_ROWS[0] <= rows <= XWT_ROWS[1] and a.dtype == b.dtype
            and a.dtype.kind == "f" and b.flags.c_contiguous):
        a2 = np.ascontiguousarray(a).reshape(rows, a.shape[-1])
        y = np.empty((rows, b.shape[0]), a.dtype)
        pick(_XWT, b.size)(a2, b, y, a.dtype.type(0))
        return y.reshape(*a.shape[:-1], b.shape[0])
    return spec.matmul(a, b, transpose_b=transpose_b)


KERNELS = {"matmul": matmul}
