"""Linear algebra on the GPU (spec: minitx/ops/linalg.py): matmuls go to cuBLAS through
``cupy.matmul``, leading axes folded into rows first (one GEMM, not one per batch index — the
spec's ``rows_matmul``); float16 GEMMs use CuPy's default compute type, which accumulates in
float32. UNTESTED ON HARDWARE so far."""
from __future__ import annotations

import cupy as cp
import numpy as np


def add(a, b):
    return a + b


def linear(x, w, b=None):
    y = cp.matmul(x.reshape(-1, x.shape[-1]), w)  # cuBLAS, one GEMM over all rows
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w.shape[1])


def matmul(a, b, *, transpose_b=False):
    bm = cp.swapaxes(b, -1, -2) if transpose_b else b
    if bm.ndim == 2 and a.ndim > 2:
        return cp.matmul(a.reshape(-1, a.shape[-1]), bm).reshape(*a.shape[:-1], bm.shape[-1])
    return cp.matmul(a, bm)


def embedding(ids, table):
    return cp.take(table, cp.asarray(ids), axis=0)


def split(x, *, sizes):
    starts = [0, *np.cumsum(sizes).tolist()]
    return tuple(x[..., a:b] for a, b in zip(starts, starts[1:]))


def last_positions(x, *, n):
    return x[:, -n:].copy()


KERNELS = {"add": add, "linear": linear, "matmul": matmul, "embedding": embedding, "split": split,
           "last_positions": last_positions}
