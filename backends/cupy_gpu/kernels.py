"""CUDA kernels for the CuPy backend (imported only once a GPU has been found).

Specs: minitx/ops/{norms,activations,linalg,attention,positions}.py. Matmuls go to cuBLAS via
``cupy.matmul``; norms and softmax are one thread block per row with float32 accumulation
(so float16 inputs keep float32 statistics); pointwise ops are ElementwiseKernels; attention
follows the spec's formulation with batched cuBLAS GEMMs and the fused masked softmax.
UNTESTED ON HARDWARE so far.
"""
from __future__ import annotations

import math

import cupy as cp
import numpy as np

_ROW_KERNELS = r"""
#include <cuda_fp16.h>
template <typename T>
__device__ float block_sum(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x + 31) / 32) ? sh[lane] : 0.f;
    if (warp == 0) for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    if (threadIdx.x == 0) sh[32] = v;
    __syncthreads();
    float r = sh[32];
    __syncthreads();
    return r;
}
template <typename T>
__device__ float block_max(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffff, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x + 31) / 32) ? sh[lane] : -INFINITY;
    if (warp == 0) for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffff, v, o));
    if (threadIdx.x == 0) sh[32] = v;
    __syncthreads();
    float r = sh[32];
    __syncthreads();
    return r;
}
template <typename T>
__global__ void layer_norm(const T* x, const T* w, const T* b, T* y, int C, float eps) {
    __shared__ float sh[33];
    const T* xr = x + (long long)blockIdx.x * C; T* yr = y + (long long)blockIdx.x * C;
    float s = 0.f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) s += (float)xr[j];
    float mu = block_sum<T>(s, sh) / C;
    float v = 0.f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) { float d = (float)xr[j] - mu; v += d * d; }
    float rstd = rsqrtf(block_sum<T>(v, sh) / C + eps);
    for (int j = threadIdx.x; j < C; j += blockDim.x)
        yr[j] = (T)(((float)xr[j] - mu) * rstd * (float)w[j] + (float)b[j]);
}
template <typename T>
__global__ void rms_norm(const T* x, const T* w, T* y, int C, float eps) {
    __shared__ float sh[33];
    const T* xr = x + (long long)blockIdx.x * C; T* yr = y + (long long)blockIdx.x * C;
    float s = 0.f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) { float a = (float)xr[j]; s += a * a; }
    float rstd = rsqrtf(block_sum<T>(s, sh) / C + eps);
    for (int j = threadIdx.x; j < C; j += blockDim.x) yr[j] = (T)((float)xr[j] * rstd * (float)w[j]);
}
template <typename T>
__global__ void softmax(const T* x, T* y, int C) {
    __shared__ float sh[33];
    const T* xr = x + (long long)blockIdx.x * C; T* yr = y + (long long)blockIdx.x * C;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < C; j += blockDim.x) m = fmaxf(m, (float)xr[j]);
    m = block_max<T>(m, sh);
    float s = 0.f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) s += __expf((float)xr[j] - m);
    float inv = 1.f / block_sum<T>(s, sh);
    for (int j = threadIdx.x; j < C; j += blockDim.x) yr[j] = (T)(__expf((float)xr[j] - m) * inv);
}
"""
_NAMES = [f"{k}<{t}>" for k in ("layer_norm", "rms_norm", "softmax") for t in ("float", "__half")]
_module = None


def _kernel(name: str, dtype) -> cp.RawKernel:
    global _module
    if _module is None:
        _module = cp.RawModule(code=_ROW_KERNELS, options=("-std=c++14",), name_expressions=_NAMES)
    t = {"float32": "float", "float16": "__half"}.get(str(dtype))
    if t is None:
        raise TypeError(f"cupy backend: {name} supports float32 and float16, not {dtype}")
    return _module.get_function(f"{name}<{t}>")


def _threads(C: int) -> int:
    return int(min(1024, max(32, 1 << (max(C, 1) - 1).bit_length())))


def _rows(x):
    x = cp.ascontiguousarray(x)
    return x.reshape(-1, x.shape[-1])


def layer_norm(x, weight, bias, *, eps=1e-5):
    x2 = _rows(x)
    y = cp.empty_like(x2)
    C = x2.shape[1]
    if x2.shape[0]:
        _kernel("layer_norm", x.dtype)((x2.shape[0],), (_threads(C),),
                                       (x2, cp.ascontiguousarray(weight), cp.ascontiguousarray(bias), y,
                                        cp.int32(C), cp.float32(eps)))
    return y.reshape(x.shape)


def rms_norm(x, weight, *, eps=1e-6):
    x2 = _rows(x)
    y = cp.empty_like(x2)
    C = x2.shape[1]
    if x2.shape[0]:
        _kernel("rms_norm", x.dtype)((x2.shape[0],), (_threads(C),),
                                     (x2, cp.ascontiguousarray(weight), y, cp.int32(C), cp.float32(eps)))
    return y.reshape(x.shape)


def softmax(x, *, axis=-1):
    if axis not in (-1, x.ndim - 1):
        x = cp.moveaxis(x, axis, -1)
        return cp.moveaxis(softmax(x), -1, axis)
    x2 = _rows(x)
    y = cp.empty_like(x2)
    C = x2.shape[1]
    if x2.shape[0] and C:
        _kernel("softmax", x.dtype)((x2.shape[0],), (_threads(C),), (x2, y, cp.int32(C)))
    return y.reshape(x.shape)


# Pointwise ops compute in float32 (the "float" casts) and store in the input dtype.
_gelu_tanh = cp.ElementwiseKernel(
    "T x", "T y", "float v = (float)x; y = (T)(0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v))))",
    "minitx_gelu_tanh")
_gelu_erf = cp.ElementwiseKernel(
    "T x", "T y", "float v = (float)x; y = (T)(0.5f * v * (1.f + erff(v * 0.7071067811865476f)))", "minitx_gelu_erf")
_silu = cp.ElementwiseKernel(
    "T x", "T y", "float v = (float)x; y = (T)(v * 0.5f * (1.f + tanhf(0.5f * v)))", "minitx_silu")
_swiglu = cp.ElementwiseKernel(
    "T g, T u", "T y", "float v = (float)g; y = (T)(v * 0.5f * (1.f + tanhf(0.5f * v)) * (float)u)", "minitx_swiglu")


def gelu(x, *, approximate="none"):
    return (_gelu_tanh if approximate == "tanh" else _gelu_erf)(x)


def silu(x):
    return _silu(x)


def relu(x):
    return cp.maximum(x, 0)


def swiglu(h):
    F = h.shape[-1] // 2
    return _swiglu(h[..., :F], h[..., F:])


def add(a, b):
    return a + b


def linear(x, w, b=None):
    y = cp.matmul(x, w)  # cuBLAS
    return y if b is None else y + b


def matmul(a, b, *, transpose_b=False):
    return cp.matmul(a, cp.swapaxes(b, -1, -2) if transpose_b else b)


def embedding(ids, table):
    return table[cp.asarray(ids)]


def split(x, *, sizes):
    bounds = [int(v) for v in np.cumsum(sizes)[:-1]]
    return tuple(cp.split(x, bounds, axis=-1))


def _heads(x, n):
    B, T, HD = x.shape
    return x.reshape(B, T, n, HD // n).transpose(0, 2, 1, 3)


def attention(q, k, v, past_k=None, past_v=None, mask=None, *, n_heads, n_kv_heads, causal, scale=None):
    """The spec's formulation on the GPU: batched cuBLAS QKᵀ, fused masked softmax, PV."""
    K = k if past_k is None else cp.concatenate([past_k, k], axis=1)
    V = v if past_v is None else cp.concatenate([past_v, v], axis=1)
    B, T, _ = q.shape
    S_tot = K.shape[1]
    D = q.shape[-1] // n_heads
    G = n_heads // n_kv_heads
    scale = float(1.0 / math.sqrt(D) if scale is None else scale)
    qh = _heads(q, n_heads).reshape(B, n_kv_heads, G, T, D)
    kh = _heads(K, n_kv_heads)[:, :, None]
    scores = cp.matmul(qh, cp.swapaxes(kh, -1, -2)).astype(cp.float32) * scale
    allowed = cp.ones((B, 1, 1, T, S_tot), dtype=bool)
    if causal:
        allowed &= (cp.arange(S_tot)[None, :] <= (S_tot - T) + cp.arange(T)[:, None])
    if mask is not None:
        allowed &= cp.asarray(mask).astype(bool)[:, None, None, None, :]
    scores = cp.where(allowed, scores, cp.float32(cp.finfo(cp.float32).min))
    p = softmax(scores).astype(q.dtype)
    out = cp.matmul(p, _heads(V, n_kv_heads)[:, :, None]).reshape(B, n_heads, T, D)
    return out.transpose(0, 2, 1, 3).reshape(B, T, n_heads * D), K, V


def rope(x, positions, *, n_heads, theta=10000.0):
    B, T, HD = x.shape
    D = HD // n_heads
    inv = theta ** (-cp.arange(0, D, 2, dtype=cp.float64) / D)
    ang = cp.asarray(positions).astype(cp.float64)[..., None, None] * inv
    cos, sin = cp.cos(ang).astype(x.dtype), cp.sin(ang).astype(x.dtype)
    xh = x.reshape(B, T, n_heads, D)
    x1, x2 = xh[..., : D // 2], xh[..., D // 2:]
    return cp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(B, T, HD)


KERNELS = {"layer_norm": layer_norm, "rms_norm": rms_norm, "softmax": softmax, "gelu": gelu, "silu": silu,
           "relu": relu, "swiglu": swiglu, "add": add, "linear": linear, "matmul": matmul,
           "embedding": embedding, "split": split, "attention": attention, "rope": rope}
VJPS: dict = {}
