"""CUDA kernels for the CuPy backend's float ops (imported only once a GPU has been found).

Specs: minitx/ops/{norms,activations,linalg,attention,positions}.py. UNTESTED ON HARDWARE so far.

* Matmuls go to cuBLAS through ``cupy.matmul``, leading axes folded into rows first (one GEMM,
  not one per batch index — the spec's ``rows_matmul``). float16 GEMMs use CuPy's default
  compute type, which accumulates in float32.
* ``layer_norm``, ``rms_norm``, ``softmax``: one thread block per row, statistics in float32
  (float16 inputs keep float32 statistics), stored in the input's dtype.
* Pointwise ops are ElementwiseKernels that compute in float32 and store in the input's dtype;
  ``rope`` is one of them too (angles in float64 like the spec, cos/sin rounded to the input's
  dtype like the spec).
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

from ._cuda import contiguous, function, source, threads
from .kvcache import append, storage

_ROWS = source("rows.cu")

DECODE_MAX_QUERIES = 8      # up to here the fused decode kernel; above, cuBLAS GEMMs
DECODE_MAX_KEYS = 8192      # shared memory holds one float score per key


def _rows(x):
    x = contiguous(x)
    return x.reshape(-1, x.shape[-1])


def layer_norm(x, weight, bias, *, eps=1e-5):
    x2 = _rows(x)
    y = cp.empty_like(x2)
    C = x2.shape[1]
    if x2.shape[0] and C:
        function(_ROWS, "layer_norm", x.dtype)(
            (x2.shape[0],), (threads(C),),
            (x2, contiguous(weight, x.dtype), contiguous(bias, x.dtype), y, np.int32(C), np.float32(eps)))
    return y.reshape(x.shape)


def rms_norm(x, weight, *, eps=1e-6):
    x2 = _rows(x)
    y = cp.empty_like(x2)
    C = x2.shape[1]
    if x2.shape[0] and C:
        function(_ROWS, "rms_norm", x.dtype)(
            (x2.shape[0],), (threads(C),), (x2, contiguous(weight, x.dtype), y, np.int32(C), np.float32(eps)))
    return y.reshape(x.shape)


def softmax(x, *, axis=-1):
    if axis not in (-1, x.ndim - 1):
        return cp.moveaxis(softmax(cp.moveaxis(x, axis, -1)), -1, axis)
    x2 = _rows(x)
    y = cp.empty_like(x2)
    C = x2.shape[1]
    if x2.shape[0] and C:
        function(_ROWS, "softmax", x.dtype)((x2.shape[0],), (threads(C),), (x2, y, np.int32(C)))
    return y.reshape(x.shape)


# Pointwise ops compute in float32 (the "float" casts) and store in the input dtype (T).
_gelu_tanh = cp.ElementwiseKernel(
    "T x", "T y",
    "float v = (float)x; y = (T)(0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v))));",
    "minitx_gelu_tanh")
_gelu_erf = cp.ElementwiseKernel(
    "T x", "T y", "float v = (float)x; y = (T)(0.5f * v * (1.f + erff(v * 0.7071067811865476f)));", "minitx_gelu_erf")
_silu = cp.ElementwiseKernel(
    "T x", "T y", "float v = (float)x; y = (T)(v * 0.5f * (1.f + tanhf(0.5f * v)));", "minitx_silu")
_swiglu = cp.ElementwiseKernel(
    "T g, T u", "T y", "float v = (float)g; y = (T)(v * 0.5f * (1.f + tanhf(0.5f * v)) * (float)u);", "minitx_swiglu")
# rope on a contiguous (B, T, H*D) x: element i is row i / HD (one position), head-dim index d.
_rope = cp.ElementwiseKernel(
    "raw T x, raw int64 pos, int32 HD, int32 D, float64 theta", "T y",
    """
    long long row = i / HD;
    int d = (int)(i % HD) % D;
    int hh = D / 2;
    int j = d < hh ? d : d - hh;
    double ang = (double)pos[row] * pow(theta, -(2.0 * j) / D);
    float c = (float)(T)(float)cos(ang), s = (float)(T)(float)sin(ang);
    float v = (float)x[i];
    y = d < hh ? (T)(v * c - (float)x[i + hh] * s) : (T)(v * c + (float)x[i - hh] * s);
    """,
    "minitx_rope")


def gelu(x, *, approximate="none"):
    return (_gelu_tanh if approximate == "tanh" else _gelu_erf)(x)


def silu(x):
    return _silu(x)


def relu(x):
    return cp.maximum(x, x.dtype.type(0))


def swiglu(h):
    F = h.shape[-1] // 2
    return _swiglu(h[..., :F], h[..., F:])


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
            function(_ROWS, "attn_decode_q8" if quantized else "attn_decode", q.dtype)(
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
    function(_ROWS, "masked_softmax", q.dtype)(
        (B * KV * G * T,), (threads(S),),
        (scores, p, np.int32(S), np.int32(T), np.int32(KV * G * T), m, np.int32(has_mask),
         np.int32(bool(causal)), np.float32(sc)))
    return cp.matmul(p, vh).reshape(B, KV, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, HD)


def rope(x, positions, *, n_heads, theta=10000.0):
    B, T, HD = x.shape
    y = cp.empty((B, T, HD), x.dtype)
    if y.size:
        _rope(contiguous(x), contiguous(positions, cp.int64), np.int32(HD), np.int32(HD // n_heads),
              np.float64(theta), y)
    return y


KERNELS = {"layer_norm": layer_norm, "rms_norm": rms_norm, "softmax": softmax, "gelu": gelu, "silu": silu,
           "relu": relu, "swiglu": swiglu, "add": add, "linear": linear, "matmul": matmul,
           "embedding": embedding, "split": split, "attention": attention, "rope": rope}
VJPS: dict = {}
