"""Quantized ops on the CuPy backend, computed from the packed weights (specs: minitx/ops/quant.py).

UNTESTED ON HARDWARE so far. Weights stay packed on the GPU (int8, or uint8 holding two 4-bit
values); no kernel ever builds a float copy of a whole matrix.

* Decoding (at most ``SKINNY_MAX_ROWS`` rows of activations) is memory-bound: each step reads
  every weight once, so reading 1 or ½ byte per weight instead of 2 is the speed-up.
  - ``transposed`` layouts (out, in) — the quant plugin's int8 linears and the tied LM heads —
    take one warp per output channel: 16-byte loads along the channel's contiguous inputs,
    widened to float32 in registers, the scale (per channel or per group) applied there, a warp
    reduction, bias and the output dtype in the same kernel.
  - (in, out) layouts — int4 groups and int8 blocks as the plugin stores them, older int8 files —
    take four output columns per thread and a slice of the inputs per block row (split-K, so
    that a 2048-wide layer still fills every SM); partial sums per group are scaled once and
    added into a float32 buffer with atomics; a small epilogue applies per-channel scales and
    the bias and casts.
* Prefill (more rows) is compute-bound: tiles of the packed matrix are dequantized into a small
  buffer (one elementwise kernel per tile) and multiplied with cuBLAS; float16 partial products
  are summed in float32.
* ``embedding_q8`` / ``embedding_q4`` widen only the looked-up rows.
* ``linear_cast`` (float16 / bfloat16 weights) decodes through the int8 kernel's body, widening
  16-bit weights instead of bytes.
* ``attention_kv8``: the int8 KV cache stays on the device; decoding reads it in the fused kernel.
* ``linear_w8a8``: activations quantized on the device, the integer product exact in float64
  GEMM tiles (the spec's float64 accumulation), not fast; ``linear_q8_0`` (int8 / W8A8 modes)
  likewise, one block of inputs at a time.

Output dtypes follow the spec's promotion (activations x scales x bias). Inputs in a dtype the
kernels do not handle (float64 scales, odd int4 groups) run the spec on the host.
"""
from __future__ import annotations

from typing import Any

import cupy as cp
import numpy as np

from minitx import ops

from ._cuda import contiguous, function, source
from .attention import sdpa
from .kvcache import append

SKINNY_MAX_ROWS = 8   # also the kernels' register array size (MAXM)
TILE = 1024           # rows of W dequantized at a time on the cuBLAS path
_FLOATS = ("float16", "float32")

_SRC = source("quant.cu")

# Epilogues of the split-K path and the tile dequantizers of the cuBLAS path.
_epi_scale = cp.ElementwiseKernel("float32 a, F s", "O y", "y = (O)(a * (float)s);", "minitx_q_epi_scale")
_epi_scale_bias = cp.ElementwiseKernel("float32 a, F s, B b", "O y", "y = (O)(a * (float)s + (float)b);",
                                       "minitx_q_epi_scale_bias")
_epi_bias = cp.ElementwiseKernel("float32 a, B b", "O y", "y = (O)(a + (float)b);", "minitx_q_epi_bias")
_deq8_rows = cp.ElementwiseKernel(   # int8 (K, N) rows k0.., scales (K/group, N)
    "raw int8 w, raw F s, int32 N, int32 group, int32 k0", "X out",
    "long long k = i / N + k0; int c = i % N; out = (X)((float)w[k * N + c] * (float)s[(k / group) * N + c]);",
    "minitx_deq8_rows")
_deq4_rows = cp.ElementwiseKernel(   # int4 (K/2, N) rows k0.., scales (K/group, N)
    "raw uint8 w, raw F s, int32 N, int32 group, int32 k0", "X out",
    """long long k = i / N + k0; int c = i % N; int byte = w[(k >> 1) * N + c];
    int qv = (k & 1) ? (byte >> 4) : (byte & 15);
    out = (X)((float)(qv - 8) * (float)s[(k / group) * N + c]);""",
    "minitx_deq4_rows")
_deq4_t = cp.ElementwiseKernel(      # int4 (N, K/2) output rows n0.., scales (N, K/group)
    "raw uint8 w, raw F s, int32 K, int32 group, int32 n0", "X out",
    """long long n = i / K + n0; int k = i % K; int byte = w[n * (K / 2) + k / 2];
    int qv = (k & 1) ? (byte >> 4) : (byte & 15);
    out = (X)((float)(qv - 8) * (float)s[n * (K / group) + k / group]);""",
    "minitx_deq4_t")
_emb8 = cp.ElementwiseKernel(
    "raw int64 ids, raw int8 table, raw F s, int32 C", "F out",
    "long long r = ids[i / C]; out = (F)((float)table[r * C + i % C] * (float)s[r]);", "minitx_emb8")
_emb4 = cp.ElementwiseKernel(
    "raw int64 ids, raw uint8 table, raw F s, int32 C, int32 group", "F out",
    """long long r = ids[i / C]; int c = i % C; int byte = table[r * (C / 2) + c / 2];
    int qv = (c & 1) ? (byte >> 4) : (byte & 15);
    out = (F)((float)(qv - 8) * (float)s[r * (C / group) + c / group]);""",
    "minitx_emb4")

_sms: list[int] = []


def _n_sms() -> int:
    if not _sms:
        _sms.append(int(cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["multiProcessorCount"]))
    return _sms[0]


def _on_host(op: str, *args: Any, **attrs: Any) -> Any:
    """The spec on the host, for dtypes the kernels do not take: correct, not fast."""
    host = [None if a is None else cp.asnumpy(a) for a in args]
    out = ops.get(op).forward(*host, **attrs)
    return tuple(cp.asarray(o) for o in out) if isinstance(out, tuple) else cp.asarray(out)


def _floats(*arrays: Any) -> bool:
    return all(a is None or str(a.dtype) in _FLOATS for a in arrays)


def _out_dtype(x, scale, b, scaled: bool = True) -> np.dtype:
    """The spec's result dtype: linear_q8 multiplies by the scale after the product (x·s·b
    promote); the block / group formats dequantize into x's dtype first (x·b promote)."""
    return np.result_type(x.dtype, *([scale.dtype] if scaled else []), *([b.dtype] if b is not None else []))


def _finish(y, x):
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _warp_rows(x2, w, scale, b, od, N, K, name, extra):
    """The one-warp-per-output kernels (q8t, q4t; f16t, bf16t, which have no scale: None)."""
    M = x2.shape[0]
    y = cp.empty((M, N), od)
    bias = contiguous(b, od) if b is not None else y
    s = y if scale is None else contiguous(scale)  # y: a float pointer the unscaled kernels never read
    warps = 8
    function(_SRC, name, x2.dtype, s.dtype, od)(
        ((N + warps - 1) // warps,), (32 * warps,),
        (x2, contiguous(w), s, bias, y, np.int32(M), np.int32(N), np.int32(K), *extra, np.int32(b is not None)))
    return y


def _split_k(x2, w, scale, N, K, group, mode):
    """The (in, out) split-K kernel: float32 sums (M, N), group scales applied (mode 1, 2)."""
    M = x2.shape[0]
    acc = cp.zeros((M, N), cp.float32)
    unit = group if mode else 16
    col_blocks = -(-N // 1024)
    splits = max(1, min(-(-K // unit), -(-8 * _n_sms() // col_blocks)))   # ~8 blocks per SM
    per = -(-K // splits)
    ks = -(-per // unit) * unit        # inputs per block row, whole groups
    splits = -(-K // ks)
    w = contiguous(w)
    w8 = w if mode != 2 else cp.empty(1, cp.int8)
    w4 = w if mode == 2 else cp.empty(1, cp.uint8)
    function(_SRC, "gemv_kn", x2.dtype, scale.dtype)(
        (col_blocks, splits), (256,),
        (x2, w8, w4, contiguous(scale), acc, np.int32(M), np.int32(N), np.int32(K), np.int32(group),
         np.int32(ks), np.int32(mode)))
    return acc


def _epilogue(acc, od, scale=None, b=None):
    y = cp.empty(acc.shape, od)
    if scale is not None and b is not None:
        return _epi_scale_bias(acc, scale, b, y)
    if scale is not None:
        return _epi_scale(acc, scale, y)
    if b is not None:
        return _epi_bias(acc, b, y)
    return acc.astype(od)


def _tiled_rows(x2, N, K, step, dequant):
    """cuBLAS path over (in, out) weights: Σ_tiles x[:, tile] @ W[tile], W[tile] from ``dequant``."""
    acc = cp.zeros((x2.shape[0], N), cp.float32)
    for k0 in range(0, K, step):
        k1 = min(K, k0 + step)
        wt = cp.empty((k1 - k0, N), x2.dtype)
        dequant(wt, k0)
        part = cp.matmul(x2[:, k0:k1], wt)
        acc += part if part.dtype == acc.dtype else part.astype(cp.float32)
    return acc


def _group_step(group: int) -> int:
    return max(group, TILE - TILE % group)


def linear_q8(x, w, scale, b=None, *, transposed=False):
    if not _floats(x, scale, b):
        return _on_host("linear_q8", x, w, scale, b, transposed=transposed)
    x2 = contiguous(x.reshape(-1, x.shape[-1]))
    od = _out_dtype(x, scale, b)
    if transposed:  # w (out, in)
        N, K = w.shape
        if x2.shape[0] <= SKINNY_MAX_ROWS:
            y = _warp_rows(x2, w, scale, b, od, N, K, "q8t", (np.int32(K % 16 == 0),))
        else:
            y = cp.empty((x2.shape[0], N), x.dtype)
            for n0 in range(0, N, TILE):
                y[:, n0:n0 + TILE] = cp.matmul(x2, w[n0:n0 + TILE].astype(x.dtype).T)
            y = y * scale
            y = y if b is None else y + b
        return _finish(y, x)
    K, N = w.shape
    if x2.shape[0] <= SKINNY_MAX_ROWS:
        acc = _split_k(x2, w, scale, N, K, 1, 0)
    else:
        def widen(wt, k0):
            wt[...] = w[k0:k0 + wt.shape[0]]

        acc = _tiled_rows(x2, N, K, TILE, widen)
    return _finish(_epilogue(acc, od, scale, b), x)


def linear_q8_block(x, w, scale, b=None, *, block=32):
    if not _floats(x, scale, b):
        return _on_host("linear_q8_block", x, w, scale, b, block=block)
    x2 = contiguous(x.reshape(-1, x.shape[-1]))
    od = _out_dtype(x, scale, b, scaled=False)
    K, N = w.shape
    s = contiguous(scale)
    if x2.shape[0] <= SKINNY_MAX_ROWS:
        acc = _split_k(x2, w, s, N, K, block, 1)
    else:
        wc = contiguous(w)
        acc = _tiled_rows(x2, N, K, _group_step(block),
                          lambda wt, k0: _deq8_rows(wc, s, np.int32(N), np.int32(block), np.int32(k0), wt))
    return _finish(_epilogue(acc, od, None, b), x)


def linear_q4(x, w, scale, b=None, *, group=32, transposed=False):
    if not _floats(x, scale, b) or group % 2:
        return _on_host("linear_q4", x, w, scale, b, group=group, transposed=transposed)
    x2 = contiguous(x.reshape(-1, x.shape[-1]))
    od = _out_dtype(x, scale, b, scaled=False)
    s = contiguous(scale)
    wc = contiguous(w)
    if transposed:  # w (out, in/2), scales (out, in/group)
        N, K = w.shape[0], w.shape[1] * 2
        if x2.shape[0] <= SKINNY_MAX_ROWS:
            y = _warp_rows(x2, wc, s, b, od, N, K, "q4t", (np.int32(group), np.int32((K // 2) % 16 == 0)))
            return _finish(y, x)
        y = cp.empty((x2.shape[0], N), x.dtype)
        for n0 in range(0, N, TILE):
            n1 = min(N, n0 + TILE)
            wt = cp.empty((n1 - n0, K), x.dtype)
            _deq4_t(wc, s, np.int32(K), np.int32(group), np.int32(n0), wt)
            y[:, n0:n1] = cp.matmul(x2, wt.T)
        y = y.astype(od, copy=False)
        return _finish(y if b is None else y + b, x)
    K, N = w.shape[0] * 2, w.shape[1]
    if x2.shape[0] <= SKINNY_MAX_ROWS:
        acc = _split_k(x2, wc, s, N, K, group, 2)
    else:
        acc = _tiled_rows(x2, N, K, _group_step(group),
                          lambda wt, k0: _deq4_rows(wc, s, np.int32(N), np.int32(group), np.int32(k0), wt))
    return _finish(_epilogue(acc, od, None, b), x)


def embedding_q8(ids, table, scale):
    if not _floats(scale):
        return _on_host("embedding_q8", ids, table, scale)
    flat = contiguous(ids, cp.int64).reshape(-1)
    C = table.shape[1]
    out = cp.empty((flat.size, C), scale.dtype)
    if out.size:
        _emb8(flat, contiguous(table), contiguous(scale), np.int32(C), out)
    return out.reshape(*ids.shape, C)


def embedding_q4(ids, table, scale, *, group=32):
    if not _floats(scale) or group % 2:
        return _on_host("embedding_q4", ids, table, scale, group=group)
    flat = contiguous(ids, cp.int64).reshape(-1)
    C = table.shape[1] * 2
    out = cp.empty((flat.size, C), scale.dtype)
    if out.size:
        _emb4(flat, contiguous(table), contiguous(scale), np.int32(C), np.int32(group), out)
    return out.reshape(*ids.shape, C)


def linear_cast(x, w, b=None, *, transposed=False):
    """float16 / bfloat16 weights (the quant plugin's ``float16``, ``bfloat16``): decoding widens
    them in registers (one warp per output channel, as for int8); more rows widen tiles of W
    (the spec's ``widen``, on device arrays) for cuBLAS."""
    if not _floats(x, b):
        return _on_host("linear_cast", x, w, b, transposed=transposed)
    x2 = contiguous(x.reshape(-1, x.shape[-1]))
    od = _out_dtype(x, None, b, scaled=False)
    if transposed:  # w (out, in)
        N, K = w.shape
        if x2.shape[0] <= SKINNY_MAX_ROWS:
            name = "bf16t" if w.dtype == np.uint16 else "f16t"
            return _finish(_warp_rows(x2, w, None, b, od, N, K, name, (np.int32(K % 8 == 0),)), x)
        y = cp.empty((x2.shape[0], N), x.dtype)
        for n0 in range(0, N, TILE):
            y[:, n0:n0 + TILE] = cp.matmul(x2, ops.quant.widen(w[n0:n0 + TILE], x.dtype).T)
        return _finish(y if b is None else y + b, x)
    K, N = w.shape

    def widen(wt, k0):
        wt[...] = ops.quant.widen(w[k0:k0 + wt.shape[0]], x.dtype)

    return _finish(_epilogue(_tiled_rows(x2, N, K, TILE, widen), od, None, b), x)


def linear_w8a8(x, w, scale, b=None):
    """Dynamic int8 activations: x quantized per token on the device (the spec's ``quantize_rows``,
    its NumPy calls dispatched to CuPy), the integer product exact in float64 GEMMs over TILE
    input rows of Wq (int8 (in, out)) at a time — never a float copy of the whole matrix —
    then rescaled as the spec does."""
    if not _floats(x, scale, b):
        return _on_host("linear_w8a8", x, w, scale, b)
    q, sx = ops.quant.quantize_rows(x)
    q2 = q.reshape(-1, q.shape[-1]).astype(cp.float64)
    K, N = w.shape
    acc = cp.zeros((q2.shape[0], N), cp.float64)
    for k0 in range(0, K, TILE):
        acc += cp.matmul(q2[:, k0:k0 + TILE], w[k0:k0 + TILE].astype(cp.float64))
    # Rescaled before rounding to x's dtype: in float16 the integer sums alone overflow 65504.
    y = (acc.reshape(*x.shape[:-1], N) * sx * scale).astype(np.result_type(x.dtype, scale.dtype))
    return y if b is None else y + b


def linear_q8_0(x, w, scale, b=None, *, block=32):
    """Q8_0 × Q8_0 (the quant plugin's int8 and W8A8): activations rounded per block on the device
    (the spec's ``quantize_act_blocks``, its NumPy calls dispatched to CuPy), each block's integer
    sums exact in a float64 GEMM against that block of Wq (int8 (out, in)), times both scales,
    accumulated in float64 as the spec does: correct, not fast (like ``linear_w8a8``)."""
    if not _floats(x, scale, b):
        return _on_host("linear_q8_0", x, w, scale, b, block=block)
    q, sx = ops.quant.quantize_act_blocks(x, block)
    q2, sx2 = q.reshape(-1, q.shape[-1]), sx.reshape(-1, sx.shape[-1]).astype(cp.float64)
    N, K = w.shape
    acc = cp.zeros((q2.shape[0], N), cp.float64)
    for g in range(K // block):
        k = slice(g * block, (g + 1) * block)
        acc += cp.matmul(q2[:, k].astype(cp.float64), w[:, k].astype(cp.float64).T) * sx2[:, g:g + 1] \
            * scale[:, g].astype(cp.float64)
    y = acc.astype(np.result_type(x.dtype, scale.dtype)).reshape(*x.shape[:-1], N)
    return y if b is None else y + b


def attention_kv8(q, k, v, past_k=None, past_k_scale=None, past_v=None, past_v_scale=None, mask=None, *,
                  n_heads, n_kv_heads, causal, scale=None):
    """The int8 KV cache on the device: the new tokens are quantized there by the spec's own
    ``quantize_heads`` (its NumPy calls dispatch to CuPy for device arrays), the int8 caches and
    their scales grow in place (kvcache.py), and decoding reads the int8 rows with their scales
    in the fused kernel (attention.py ``sdpa``)."""
    if not _floats(q):
        return _on_host("attention_kv8", q, k, v, past_k, past_k_scale, past_v, past_v_scale, mask,
                        n_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal, scale=scale)
    kq, ks = ops.quant.quantize_heads(k, n_kv_heads)
    vq, vs = ops.quant.quantize_heads(v, n_kv_heads)
    K, KS, V, VS = append(past_k, kq), append(past_k_scale, ks), append(past_v, vq), append(past_v_scale, vs)
    out = sdpa(q, K, KS, V, VS, mask, n_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal, scale=scale)
    return out, K, KS, V, VS


KERNELS = {"linear_q8": linear_q8, "linear_q8_block": linear_q8_block, "linear_q4": linear_q4,
           "embedding_q8": embedding_q8, "embedding_q4": embedding_q4, "linear_cast": linear_cast,
           "linear_w8a8": linear_w8a8, "linear_q8_0": linear_q8_0, "attention_kv8": attention_kv8}
