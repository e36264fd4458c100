"""Attention on the GPU (spec: minitx/ops/attention.py). UNTESTED ON HARDWARE so far.

* ``attention``: for up to ``DECODE_MAX_QUERIES`` queries (decoding) one fused kernel per
  (batch, head, query) — scores in shared memory, masked softmax, P·V — reading K and V where
  they lie; for more queries batched cuBLAS GEMMs with grouped-query heads folded into rows
  (no broadcast copies of K), and one fused kernel for scale + causal/padding mask + softmax.
  Masking follows the spec exactly: a query with no visible key averages all values uniformly.
  The KV cache grows in place on the device (kvcache.py: ``present`` is a view of an
  over-allocated buffer; decoding feeds it back without a host round trip), and the decode
  kernel reads K and V from that buffer, with its length as the batch stride.
"""
from __future__ import annotations

import math

import cupy as cp
import numpy as np

from minitx.ops import quant as Q

from ._cuda import ROWS, contiguous, function, threads
from .kvcache import append, storage

DECODE_MAX_QUERIES = 8      # up to here the fused decode kernel; above, cuBLAS GEMMs
DECODE_MAX_KEYS = 8192      # shared memory holds one float score per key


def _mask_arg(mask, B):
    if mask is None:
        return cp.zeros((B, 1), cp.int64), 0
    return contiguous(mask, cp.int64), 1


def attention(q, k, v, past_k=None, past_v=None, mask=None, *, n_heads, n_kv_heads, causal, scale=None):
    """The spec's attention: decode queries in one fused kernel, prefill through cuBLAS.

    ``K``/``V`` (the present caches) are views of growable device buffers (kvcache.py); without
    a cache (encoders) they are the new keys and values themselves, as in the spec."""
    K = k if past_k is None else append(past_k, k)
    V = v if past_v is None else append(past_v, v)
    return sdpa(q, K, None, V, None, mask, n_heads=n_heads, n_kv_heads=n_kv_heads, causal=causal, scale=scale), K, V


def sdpa(q, K, KS, V, VS, mask, *, n_heads, n_kv_heads, causal, scale):
    """Attention of ``q`` over whole caches. ``KS``/``VS``: None for float caches; for int8 ones
    (quant.py's ``attention_kv8``) the per-token, per-kv-head scales, which the decode kernel
    applies as it reads the int8 rows; the cuBLAS path dequantizes the cache first."""
    B, T, HD = q.shape
    S = K.shape[1]
    H, KV = int(n_heads), int(n_kv_heads)
    D = HD // H
    G = H // KV
    sc = float(1.0 / math.sqrt(D) if scale is None else scale)
    m, has_mask = _mask_arg(mask, B)
    q = contiguous(q)
    if B * T == 0 or S == 0:
        return cp.zeros_like(q)
    quantized = KS is not None
    cache_ok = (KS.dtype == VS.dtype == q.dtype) if quantized else (K.dtype == q.dtype == V.dtype)
    if T <= DECODE_MAX_QUERIES and S <= DECODE_MAX_KEYS and D <= 1024 and cache_ok:
        bufs = [storage(a) for a in ((K, KS, V, VS) if quantized else (K, V))]
        if len({x.shape[1] for x in bufs}) == 1:  # one row stride (buffer length) for all of them
            out = cp.empty_like(q)
            nt = 256 if D <= 256 else min(1024, -(-D // 32) * 32)
            shape = (m, np.int32(has_mask), np.int32(bool(causal)), np.int32(T), np.int32(S),
                     np.int32(bufs[0].shape[1]), np.int32(H), np.int32(KV), np.int32(D), np.float32(sc))
            function(ROWS, "attn_decode_q8" if quantized else "attn_decode", q.dtype)(
                (B * H * T,), (nt,), (q, *bufs, out, *shape), shared_mem=4 * (S + 33 + nt))
            return out
    if quantized:
        K, V = Q.dequantize_heads(K, KS), Q.dequantize_heads(V, VS)
    # (B, T, KV, G, D) -> (B, KV, G*T, D): a kv head's G query heads are rows of one GEMM.
    qh = q.reshape(B, T, KV, G, D).transpose(0, 2, 3, 1, 4).reshape(B, KV, G * T, D)
    kh = K.reshape(B, S, KV, D).transpose(0, 2, 3, 1)          # (B, KV, D, S)
    vh = V.reshape(B, S, KV, D).transpose(0, 2, 1, 3)          # (B, KV, S, D)
    scores = contiguous(cp.matmul(qh, kh))                     # (B, KV, G*T, S), unscaled
    p = cp.empty_like(scores)
    function(ROWS, "masked_softmax", q.dtype)(
        (B * KV * G * T,), (threads(S),),
        (scores, p, np.int32(S), np.int32(T), np.int32(KV * G * T), m, np.int32(has_mask),
         np.int32(bool(causal)), np.float32(sc)))
    return cp.matmul(p, vh).reshape(B, KV, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, HD)


KERNELS = {"attention": attention}
