#define NEG_INF (__int_as_float(0xff800000))
struct half_t { unsigned short x; };
__device__ __forceinline__ float h2f(unsigned short h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ unsigned short f2h(float f) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const half_t* p, long long i) { return h2f(p[i].x); }
__device__ __forceinline__ float ld(const signed char* p, long long i) { return (float)p[i]; }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(half_t* p, long long i, float v) { p[i].x = f2h(v); }
/* Reductions: Add or Max combine two partial values; identity() is what an empty share holds. */
struct Add { __device__ static float f(float a, float b) { return a + b; } __device__ static float identity() { return 0.f; } };
struct Max { __device__ static float f(float a, float b) { return fmaxf(a, b); } __device__ static float identity() { return NEG_INF; } };
template <typename Op>
__device__ __forceinline__ float warp_reduce(float v) {
    for (int o = 16; o > 0; o >>= 1) v = Op::f(v, __shfl_down_sync(0xffffffffu, v, o));
    return v;  /* complete in lane 0 */
}
__device__ __forceinline__ float warp_sum(float v) { return warp_reduce<Add>(v); }
/* Over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
   sh needs 33 floats. */
template <typename Op>
__device__ float block_reduce(float v, float* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_reduce<Op>(v);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nw ? sh[lane] : Op::identity();
        v = warp_reduce<Op>(v);
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    float r = sh[32];
    __syncthreads();
    return r;
}
__device__ float block_sum(float v, float* sh) { return block_reduce<Add>(v, sh); }
__device__ float block_max(float v, float* sh) { return block_reduce<Max>(v, sh); }
