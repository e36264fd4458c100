"""Linear layers and matmuls: BLAS for many rows, a streaming kernel for few (decode).

Specs: minitx/ops/linalg.py (linear, matmul, embedding, split). With few rows (decode at batch
1-3) y = xW is memory-bound: every weight is read once per step. ``_skinny`` streams W row by
row, keeping all output rows of a column block in cache, so each weight is loaded once for the
whole batch, with the bias folded in; one thread per column block. Above ``SKINNY_MAX_ROWS`` the
work is compute-bound and BLAS (numpy ``@``) wins. ``embedding`` is a row gather and ``split``
returns views: the spec's NumPy code is already optimal, so they are the spec functions.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from minitx.ops import linalg as spec

from ._jit import kernel

SKINNY_MAX_ROWS = 0  # quiet-machine decode: BLAS GEMV beat this kernel (32 vs 22 tok/s); see decode_cpu.md

def _block(n: int) -> int:
    """Columns per task: one long contiguous slice per thread (measured best), at most 1536."""
    per = -(-n // max(1, numba.get_num_threads()))
    return int(min(1536, max(64, -(-per // 64) * 64)))


def _skinny(x, w, b, has_bias, y, block):
    """y[m, :] = x[m, :] @ w (+ b), w is (K, N) row-major; parallel over column blocks.

    For each weight row k, the block's slice is loaded once and used for all M rows; the
    accumulators are one flat array so every inner loop is a unit-stride axpy LLVM vectorises.
    """
    M, K = x.shape
    N = w.shape[1]
    nblk = (N + block - 1) // block
    for blk in prange(nblk):
        j0 = blk * block
        j1 = min(N, j0 + block)
        n = j1 - j0
        acc = np.zeros(M * n, x.dtype)
        for k in range(K):
            wk = w[k, j0:j1]
            for m in range(M):
                xm = x[m, k]
                a = acc[m * n:(m + 1) * n]
                for j in range(n):
                    a[j] += xm * wk[j]
        for m in range(M):
            for j in range(n):
                y[m, j0 + j] = acc[m * n + j] + (b[j0 + j] if has_bias else 0)


def _skinny_t(x, w, y):
    """y[m, n] = x[m, :] · w[n, :] — x @ wᵀ with w (N, K) row-major (a tied LM head)."""
    M, K = x.shape
    N = w.shape[0]
    nblk = (N + 63) // 64
    for blk in prange(nblk):
        for n in range(blk * 64, min(N, blk * 64 + 64)):
            for m in range(M):
                acc = 0.0
                for k in range(K):
                    acc += x[m, k] * w[n, k]
                y[m, n] = acc


_SKINNY, _SKINNY_T = kernel(_skinny), kernel(_skinny_t)


def _par(work: int):
    return 0 if work >= 1 << 15 and numba.get_num_threads() > 1 else 1


def linear(x, w, b=None):
    rows = int(np.prod(x.shape[:-1]))
    if (rows <= SKINNY_MAX_ROWS and rows > 0 and x.dtype == w.dtype and x.dtype.kind == "f"
            and w.flags.c_contiguous and (b is None or b.dtype == x.dtype)):
        x2 = np.ascontiguousarray(x).reshape(rows, x.shape[-1])
        y = np.empty((rows, w.shape[1]), x.dtype)
        bb = b if b is not None else np.zeros(1, x.dtype)
        _SKINNY[_par(w.size)](x2, w, bb, b is not None, y, _block(w.shape[1]))
        return y.reshape(*x.shape[:-1], w.shape[1])
    return spec.linear(x, w, b)


def matmul(a, b, *, transpose_b=False):
    rows = int(np.prod(a.shape[:-1]))
    if (transpose_b and b.ndim == 2 and 0 < rows <= SKINNY_MAX_ROWS and a.dtype == b.dtype
            and a.dtype.kind == "f" and b.flags.c_contiguous):
        a2 = np.ascontiguousarray(a).reshape(rows, a.shape[-1])
        y = np.empty((rows, b.shape[0]), a.dtype)
        _SKINNY_T[_par(b.size)](a2, b, y)
        return y.reshape(*a.shape[:-1], b.shape[0])
    return spec.matmul(a, b, transpose_b=transpose_b)


KERNELS = {"linear": linear, "matmul": matmul, "embedding": spec.embedding, "split": spec.split}
VJPS = {"linear": spec.linear_vjp}
