"""Quantized linears on the CuPy backend (specs: minitx/ops/quant.py). UNTESTED ON HARDWARE.

Weights stay packed on the GPU (int8, or uint8 nibbles for int4); each call dequantizes one tile
of ``TILE`` input rows at a time into a float buffer and multiplies it with cuBLAS, so no full
float copy of a matrix is ever made. Exports ``KERNELS`` like the numba backend's quant module;
``backends/cupy_gpu/__init__.py`` has to merge it (``kernels.update(quant.KERNELS)``).
"""
from __future__ import annotations

import cupy as cp

TILE = 1024


def _rows(x):
    return x.reshape(-1, x.shape[-1])


def _finish(y, x, b):
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if b is None else y + b


def _tiled(x2, n_in, n_out, dequant, step=TILE):
    y = cp.zeros((x2.shape[0], n_out), x2.dtype)
    for k0 in range(0, n_in, step):
        k1 = min(n_in, k0 + step)
        y += x2[:, k0:k1] @ dequant(k0, k1).astype(x2.dtype)
    return y


def linear_q8(x, w, scale, b=None, *, transposed=False):
    x2 = _rows(x)
    if transposed:  # w (out, in): tile over output rows
        y = cp.empty((x2.shape[0], w.shape[0]), x.dtype)
        for n0 in range(0, w.shape[0], 4 * TILE):
            y[:, n0:n0 + 4 * TILE] = x2 @ w[n0:n0 + 4 * TILE].astype(x.dtype).T
    else:
        y = _tiled(x2, w.shape[0], w.shape[1], lambda a, c: w[a:c])
    return _finish(y * scale.astype(x.dtype), x, b)


def linear_q8_block(x, w, scale, b=None, *, block=32):
    step = TILE - TILE % block or block
    y = _tiled(_rows(x), w.shape[0], w.shape[1],
               lambda a, c: w[a:c].astype(scale.dtype) * cp.repeat(scale[a // block:c // block], block, axis=0), step)
    return _finish(y, x, b)


def _unpack(packed):
    lo = (packed & 15).astype(cp.int8) - 8
    hi = (packed >> 4).astype(cp.int8) - 8
    out = cp.empty((packed.shape[0] * 2, packed.shape[1]), cp.int8)
    out[0::2], out[1::2] = lo, hi
    return out


def linear_q4(x, w, scale, b=None, *, group=32):
    step = TILE - TILE % group or group
    y = _tiled(_rows(x), w.shape[0] * 2, w.shape[1],
               lambda a, c: _unpack(w[a // 2:c // 2]).astype(scale.dtype)
               * cp.repeat(scale[a // group:c // group], group, axis=0), step)
    return _finish(y, x, b)


KERNELS = {"linear_q8": linear_q8, "linear_q8_block": linear_q8_block, "linear_q4": linear_q4}
