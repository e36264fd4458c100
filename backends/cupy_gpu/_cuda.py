"""Compiling the backend's raw CUDA kernels: one module per element type, no CUDA headers.

Half precision is read and written with the PTX conversions themselves (``cvt.f32.f16`` and
``cvt.rn.f16.f32``, exactly what ``__half2float``/``__float2half`` compile to), through a 16-bit
struct, so the sources need neither ``cuda_fp16.h`` (whose presence on NVRTC's include path
depends on how CuPy was installed) nor C++ templates. A source names its element types ``T``
(activations), ``S`` (scales) and ``O`` (outputs); :func:`function` compiles it once per
combination with those typedefs and caches the module. All arithmetic is float32.
"""
from __future__ import annotations

from typing import Any

import cupy as cp

PRELUDE = r"""
#define NEG_INF (__int_as_float(0xff800000))
struct half_t { unsigned short x; };
__device__ __forceinline__ float h2f(unsigned short h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ unsigned short f2h(float f) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const half_t* p, long long i) { return h2f(p[i].x); }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(half_t* p, long long i, float v) { p[i].x = f2h(v); }
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;  /* complete in lane 0 */
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
    return v;
}
/* Sum / max over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
   sh needs 33 floats. */
__device__ float block_sum(float v, float* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nw ? sh[lane] : 0.f;
        v = warp_sum(v);
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    float r = sh[32];
    __syncthreads();
    return r;
}
__device__ float block_max(float v, float* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nw ? sh[lane] : NEG_INF;
        v = warp_max(v);
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    float r = sh[32];
    __syncthreads();
    return r;
}
"""

_CTYPE = {"float32": "float", "float16": "half_t"}
_modules: dict[tuple[int, str, str, str], Any] = {}


def ctype(dtype: Any) -> str:
    t = _CTYPE.get(str(dtype))
    if t is None:
        raise TypeError(f"cupy backend: float32 and float16 only, not {dtype}")
    return t


def function(source: str, name: str, T: Any = "float32", S: Any = "float32", O: Any = "float32") -> Any:
    """The kernel ``name`` of ``source`` compiled for activations T, scales S and outputs O."""
    key = (id(source), str(T), str(S), str(O))
    mod = _modules.get(key)
    if mod is None:
        head = f"typedef {ctype(T)} T;\ntypedef {ctype(S)} S;\ntypedef {ctype(O)} O;\n"
        mod = _modules[key] = cp.RawModule(code=PRELUDE + head + source, options=("-std=c++14",))
    return mod.get_function(name)


def threads(n: int) -> int:
    """Threads for a one-block-per-row kernel over rows of n: a power of two in [32, 1024]."""
    return int(min(1024, max(32, 1 << (max(n, 1) - 1).bit_length())))


def contiguous(a: Any, dtype: Any = None) -> Any:
    return cp.ascontiguousarray(a, dtype=dtype)
