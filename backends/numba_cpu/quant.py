"""Quantized linears on the numba backend: computed from the packed weights, never dequantized whole.

Specs: minitx/ops/quant.py. Decode at batch 1 is memory-bound — each step reads every weight once —
so reading int8 (1 byte) or packed int4 (½ byte) instead of float32 (4 bytes) is the speed-up.
With few rows (``SKINNY_MAX_ROWS``) a streaming kernel walks the packed matrix row by row, converts
each int8/nibble to float in registers and accumulates one column block per thread; per-channel
scales are applied once at the end, block/group scales once per block. With many rows (prefill)
the work is compute-bound: the matrix is dequantized one tile of input rows at a time into a
small float buffer and multiplied with BLAS, so no full float copy of W ever exists.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from minitx.ops import quant as spec

from ._jit import kernel

SKINNY_MAX_ROWS = 8
TILE = 256  # input rows dequantized at a time on the BLAS path


def _block(n: int) -> int:
    per = -(-n // max(1, numba.get_num_threads()))
    return int(min(2048, max(64, -(-per // 64) * 64)))


def _q8_skinny(x, w, y, block):
    """y = x @ w (int8 (K, N)), unscaled; parallel over column blocks."""
    M, K = x.shape
    N = w.shape[1]
    for blk in prange((N + block - 1) // block):
        j0 = blk * block
        j1 = min(N, j0 + block)
        n = j1 - j0
        acc = np.zeros(M * n, np.float32)
        for k in range(K):
            wk = w[k, j0:j1]
            for m in range(M):
                xv = x[m, k]
                a = acc[m * n:(m + 1) * n]
                for j in range(n):
                    a[j] += xv * np.float32(wk[j])
        for m in range(M):
            for j in range(n):
                y[m, j0 + j] = acc[m * n + j]


def _q8_block_skinny(x, w, s, y, block, group):
    """y = x @ (q · s[k // group]) for int8 q (K, N); a partial sum per group, scaled once."""
    M, K = x.shape
    N = y.shape[1]
    for blk in prange((N + block - 1) // block):
        j0 = blk * block
        j1 = min(N, j0 + block)
        n = j1 - j0
        acc = np.zeros(M * n, np.float32)
        part = np.zeros(M * n, np.float32)
        for g in range(K // group):
            part[:] = 0.0
            for k in range(g * group, (g + 1) * group):
                wk = w[k, j0:j1]
                for m in range(M):
                    xv = x[m, k]
                    p = part[m * n:(m + 1) * n]
                    for j in range(n):
                        p[j] += xv * np.float32(wk[j])
            sg = s[g, j0:j1]
            for m in range(M):
                a = acc[m * n:(m + 1) * n]
                p = part[m * n:(m + 1) * n]
                for j in range(n):
                    a[j] += p[j] * sg[j]
        for m in range(M):
            for j in range(n):
                y[m, j0 + j] = acc[m * n + j]


def _q4_skinny(x, w, s, y, block, group):
    """y = x @ ((nibble − 8) · s[k // group]) for packed uint8 w (K/2, N): one byte load, two rows."""
    M, K = x.shape
    N = y.shape[1]
    for blk in prange((N + block - 1) // block):
        j0 = blk * block
        j1 = min(N, j0 + block)
        n = j1 - j0
        acc = np.zeros(M * n, np.float32)
        part = np.zeros(M * n, np.float32)
        for g in range(K // group):
            part[:] = 0.0
            for r in range(g * group // 2, (g + 1) * group // 2):
                wr = w[r, j0:j1]
                for m in range(M):
                    x0 = x[m, 2 * r]
                    x1 = x[m, 2 * r + 1]
                    p = part[m * n:(m + 1) * n]
                    for j in range(n):
                        byte = np.int32(wr[j])
                        p[j] += x0 * np.float32((byte & 15) - 8) + x1 * np.float32((byte >> 4) - 8)
            sg = s[g, j0:j1]
            for m in range(M):
                a = acc[m * n:(m + 1) * n]
                p = part[m * n:(m + 1) * n]
                for j in range(n):
                    a[j] += p[j] * sg[j]
        for m in range(M):
            for j in range(n):
                y[m, j0 + j] = acc[m * n + j]


def _q8_skinny_t(x, w, y):
    """y[m, n] = x[m, :] · w[n, :] for int8 w (N, K) row-major: the tied LM head, unscaled."""
    M, K = x.shape
    N = w.shape[0]
    for blk in prange((N + 63) // 64):
        for n in range(blk * 64, min(N, blk * 64 + 64)):
            wn = w[n]
            for m in range(M):
                xm = x[m]
                acc = np.float32(0.0)
                for k in range(K):
                    acc += xm[k] * np.float32(wn[k])
                y[m, n] = acc


_Q8 = kernel(_q8_skinny)
_Q8T = kernel(_q8_skinny_t)
_BLOCK = kernel(_q8_block_skinny)
_Q4 = kernel(_q4_skinny)


def _pick(pair, work: int):
    return pair[0] if work >= (1 << 15) and numba.get_num_threads() > 1 else pair[1]


def _rows(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x.reshape(-1, x.shape[-1])


def _finish(y, x, b):
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if b is None else y + b


def _tiled(x2, n_out, dequant_rows):
    """BLAS path: y = Σ over input tiles of x[:, tile] @ W[tile], W[tile] dequantized on the fly."""
    y = np.zeros((x2.shape[0], n_out), np.float32)
    for k0 in range(0, x2.shape[1], TILE):
        k1 = min(x2.shape[1], k0 + TILE)
        y += x2[:, k0:k1] @ dequant_rows(k0, k1)
    return y


def _tiled_t(x2, w):
    """BLAS path for x @ wᵀ with int8 w (N, K): dequantize TILE output rows at a time."""
    y = np.empty((x2.shape[0], w.shape[0]), np.float32)
    for n0 in range(0, w.shape[0], 4 * TILE):
        y[:, n0:n0 + 4 * TILE] = x2 @ w[n0:n0 + 4 * TILE].astype(np.float32).T
    return y


def linear_q8(x, w, scale, b=None, *, transposed=False):
    if x.dtype != np.float32:
        return spec.linear_q8(x, w, scale, b, transposed=transposed)
    x2 = _rows(x)
    if transposed:
        if x2.shape[0] <= SKINNY_MAX_ROWS:
            y = np.empty((x2.shape[0], w.shape[0]), np.float32)
            _pick(_Q8T, w.size)(x2, w, y)
        else:
            y = _tiled_t(x2, w)
        return _finish(y * scale, x, b)
    if x2.shape[0] <= SKINNY_MAX_ROWS:
        y = np.empty((x2.shape[0], w.shape[1]), np.float32)
        _pick(_Q8, w.size)(x2, w, y, _block(w.shape[1]))
    else:
        y = _tiled(x2, w.shape[1], lambda a, c: w[a:c].astype(np.float32))
    return _finish(y * scale, x, b)


def linear_q8_block(x, w, scale, b=None, *, block=32):
    if x.dtype != np.float32:
        return spec.linear_q8_block(x, w, scale, b, block=block)
    x2 = _rows(x)
    s = np.ascontiguousarray(scale, np.float32)
    if x2.shape[0] <= SKINNY_MAX_ROWS:
        y = np.empty((x2.shape[0], w.shape[1]), np.float32)
        _pick(_BLOCK, w.size)(x2, w, s, y, _block(w.shape[1]), block)
    else:
        y = _tiled(x2, w.shape[1], lambda a, c: spec.dequantize_blocks(w[a:c], s[a // block:c // block], block))
    return _finish(y, x, b)


def linear_q4(x, w, scale, b=None, *, group=32):
    if x.dtype != np.float32 or group % 2:
        return spec.linear_q4(x, w, scale, b, group=group)
    x2 = _rows(x)
    s = np.ascontiguousarray(scale, np.float32)
    n_out = w.shape[1]
    if x2.shape[0] <= SKINNY_MAX_ROWS:
        y = np.empty((x2.shape[0], n_out), np.float32)
        _pick(_Q4, w.size * 2)(x2, w, s, y, _block(n_out), group)
    else:
        # tiles are whole groups (TILE is a multiple of any group dividing it; else use the group)
        tile = TILE if TILE % group == 0 else group

        y = np.zeros((x2.shape[0], n_out), np.float32)
        for k0 in range(0, x2.shape[1], tile):
            k1 = min(x2.shape[1], k0 + tile)
            wt = spec.dequantize_blocks(spec.unpack_int4(w[k0 // 2:k1 // 2]), s[k0 // group:k1 // group], group)
            y += x2[:, k0:k1] @ wt
    return _finish(y, x, b)


def linear_w8a8(x, w, scale, b=None):
    if x.dtype != np.float32:
        return spec.linear_w8a8(x, w, scale, b)
    q, sx = spec.quantize_rows(_rows(x))
    # The product of integers is exact in float32 only while |acc| < 2^24; the spec's float64
    # accumulation is exact, so accumulate integer products in float64 tiles here too.
    qf = q.astype(np.float64)
    acc = np.zeros((q.shape[0], w.shape[1]), np.float64)
    for k0 in range(0, q.shape[1], TILE):
        acc += qf[:, k0:k0 + TILE] @ w[k0:k0 + TILE].astype(np.float64)
    y = acc.astype(np.float32) * sx * scale
    return _finish(y, x, b)


KERNELS = {"linear_q8": linear_q8, "linear_q8_block": linear_q8_block, "linear_q4": linear_q4,
           "linear_w8a8": linear_w8a8}
