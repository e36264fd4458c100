"""Cross-attention (and T5's biased self-attention) on the GPU (spec: minitx/ops/cross_attention.py;
also its int8 forms for kv=int8, ``cross_attention_kv8`` and ``quantize_heads``).
UNTESTED ON HARDWARE so far.

Without a bias this is attention.py's ``sdpa`` over whole given K/V (same causal offset, mask and
dead-row rule, K/V heads = query heads), so the decoder's cross-attention runs that pair of
kernels. With T5's bias (1 or B, H, T, S) — added to the scaled scores before the mask — few
queries (a decode step) take one fused kernel per (batch, head, query) (``biased_decode``); more
queries (the encoder, a decoder prefill) take cuBLAS products around one kernel for scale + bias
+ mask + softmax (``biased_softmax``), both in ``cross_attention.cu``. Arithmetic in float32.
"""
from __future__ import annotations

import math

import cupy as cp
import numpy as np

from minitx.ops import quant as Q

from ._cuda import contiguous, function, source, threads
from .attention import DECODE_MAX_KEYS, DECODE_MAX_QUERIES, _mask_arg, sdpa

_SRC = source("cross_attention.cu")


def cross_attention(q, k, v, mask=None, bias=None, *, n_heads, causal=False, scale=None):
    dt = q.dtype
    K, V = contiguous(k, dt), contiguous(v, dt)
    if bias is None:
        return sdpa(q, K, None, V, None, mask, n_heads=n_heads, n_kv_heads=n_heads, causal=causal, scale=scale)
    B, T, HD = q.shape
    S = K.shape[1]
    H = int(n_heads)
    D = HD // H
    sc = float(1.0 / math.sqrt(D) if scale is None else scale)
    q, bias = contiguous(q), contiguous(bias, dt)
    m, has_mask = _mask_arg(mask, B)
    if B * T == 0 or S == 0:   # no keys: the spec's product over an empty axis is zeros
        return cp.zeros_like(q)
    flags = (np.int32(has_mask), np.int32(bias.shape[0]), np.int32(bool(causal)))
    if T <= DECODE_MAX_QUERIES and S <= DECODE_MAX_KEYS and D <= 1024:
        out = cp.empty_like(q)
        nt = 256 if D <= 256 else min(1024, -(-D // 32) * 32)
        function(_SRC, "biased_decode", dt)(
            (B * H * T,), (nt,),
            (q, K, V, bias, out, m, *flags, np.int32(T), np.int32(S), np.int32(H), np.int32(D), np.float32(sc)),
            shared_mem=4 * (S + 33 + nt))
        return out
    qh = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)              # (B, H, T, D)
    kh = K.reshape(B, S, H, D).transpose(0, 2, 3, 1)              # (B, H, D, S)
    vh = V.reshape(B, S, H, D).transpose(0, 2, 1, 3)              # (B, H, S, D)
    scores = contiguous(cp.matmul(qh, kh))                        # (B, H, T, S), unscaled
    p = cp.empty_like(scores)
    function(_SRC, "biased_softmax", dt)(
        (B * H * T,), (threads(S),),
        (scores, bias, p, np.int32(S), np.int32(T), np.int32(H), np.int32(bias.shape[0]), m, np.int32(has_mask),
         np.int32(bool(causal)), np.float32(sc)))
    return cp.matmul(p, vh).transpose(0, 2, 1, 3).reshape(B, T, HD)


def cross_attention_kv8(q, k, k_scale, v, v_scale, mask=None, bias=None, *, n_heads, causal=False, scale=None):
    """Over int8 K/V with a scale per token and head (the quant plugin's kv=int8). Without a bias
    — the decoder's cross-attention — attention.py's ``sdpa`` reads the int8 rows with their
    scales (its fused ``attn_decode_q8`` for a decode step, the cache dequantized around cuBLAS
    for more queries); with T5's bias the K/V are dequantized on the device for the float path
    above (correct, not fast: T5's self-attention cache is short)."""
    dt = q.dtype
    KS, VS = contiguous(k_scale, dt), contiguous(v_scale, dt)
    if bias is None:
        return sdpa(q, contiguous(k), KS, contiguous(v), VS, mask, n_heads=n_heads, n_kv_heads=n_heads,
                    causal=causal, scale=scale)
    return cross_attention(q, Q.dequantize_heads(contiguous(k), KS), Q.dequantize_heads(contiguous(v), VS), mask,
                           bias, n_heads=n_heads, causal=causal, scale=scale)


def quantize_heads(x, *, n_heads):
    """int8 per token and head: the spec's own ``quantize_heads``, its NumPy calls dispatched to
    CuPy for a device array (as quant.py's ``attention_kv8`` quantizes the new tokens)."""
    return Q.quantize_heads(contiguous(x), n_heads)


KERNELS = {"cross_attention": cross_attention, "cross_attention_kv8": cross_attention_kv8,
           "quantize_heads": quantize_heads}
