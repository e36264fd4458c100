#define MAXM 8
/* One warp per output channel n (the (out, in) kernels): which n this warp computes, or -1. */
__device__ __forceinline__ int warp_channel(int N) {
    int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    return n < N ? n : -1;
}
/* The warp's partial sums for rows m < M reduced, y[m, n] = sum * sn + bn written by lane 0. */
__device__ __forceinline__ void store_channel(const float* acc, O* y, int M, int N, int n, float sn, float bn) {
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
        float a = warp_sum(acc[m]);
        if ((threadIdx.x & 31) == 0 && m < M) st(y, (long long)m * N + n, a * sn + bn);
    }
}
/* Narrow weights (N, K) row-major, widened to float in registers: int8 (scaled per row), float16,
   or bfloat16 bit patterns. y[m, n] = (sum_k x[m, k] w[n, k]) * s[n] + b[n]; one warp per n,
   16-byte loads along the row. vec: K * sizeof(W) % 16 == 0. scale: null for the 16-bit floats. */
struct bf16_t { unsigned short x; };
__device__ __forceinline__ float wf(signed char v) { return (float)v; }
__device__ __forceinline__ float wf(half_t v) { return h2f(v.x); }
__device__ __forceinline__ float wf(bf16_t v) { return __uint_as_float((unsigned)v.x << 16); }
template <typename W>
__device__ void rows_dot(const T* x, const W* w, const S* scale, const O* bias, O* y,
                         int M, int N, int K, int vec, int has_bias) {
    const int E = 16 / sizeof(W);  /* weights per 16-byte load */
    int n = warp_channel(N), lane = threadIdx.x & 31;
    if (n < 0) return;
    const W* wr = w + (long long)n * K;
    float acc[MAXM] = {};
    int tail = 0;
    if (vec) {
        const int4* w16 = (const int4*)wr;
        int nv = K / E;
        for (int c = lane; c < nv; c += 32) {
            int4 pk = w16[c];
            const W* e = (const W*)&pk;
#pragma unroll
            for (int u = 0; u < E; ++u) {
                float wv = wf(e[u]);
                int k = c * E + u;
#pragma unroll
                for (int m = 0; m < MAXM; ++m)
                    if (m < M) acc[m] += wv * ld(x, (long long)m * K + k);
            }
        }
        tail = nv * E;
    }
    for (int k = tail + lane; k < K; k += 32) {
        float wv = wf(wr[k]);
#pragma unroll
        for (int m = 0; m < MAXM; ++m)
            if (m < M) acc[m] += wv * ld(x, (long long)m * K + k);
    }
    store_channel(acc, y, M, N, n, scale ? ld(scale, n) : 1.f, has_bias ? ld(bias, n) : 0.f);
}
extern "C" __global__ void q8t(const T* x, const signed char* w, const S* scale, const O* bias, O* y,
                               int M, int N, int K, int vec, int has_bias) {
    rows_dot<signed char>(x, w, scale, bias, y, M, N, K, vec, has_bias);
}
extern "C" __global__ void f16t(const T* x, const half_t* w, const S* unused, const O* bias, O* y,
                                int M, int N, int K, int vec, int has_bias) {
    rows_dot<half_t>(x, w, (const S*)0, bias, y, M, N, K, vec, has_bias);
}
extern "C" __global__ void bf16t(const T* x, const bf16_t* w, const S* unused, const O* bias, O* y,
                                 int M, int N, int K, int vec, int has_bias) {
    rows_dot<bf16_t>(x, w, (const S*)0, bias, y, M, N, K, vec, has_bias);
}
/* int4 (N, K/2), scales (N, K/group): byte i of a row holds inputs 2i (low nibble) and 2i+1.
   One warp per n; vec: (K/2) % 16 == 0. group is even, so a byte never straddles two groups. */
extern "C" __global__ void q4t(const T* x, const unsigned char* w, const S* scale, const O* bias, O* y,
                               int M, int N, int K, int group, int vec, int has_bias) {
    int n = warp_channel(N), lane = threadIdx.x & 31;
    if (n < 0) return;
    int kb = K >> 1, ng = K / group;
    const unsigned char* wr = w + (long long)n * kb;
    const long long so = (long long)n * ng;
    float acc[MAXM] = {};
    int tail = 0;
    if (vec) {
        const int4* w16 = (const int4*)wr;
        int nv = kb >> 4;
        for (int c = lane; c < nv; c += 32) {
            int4 pk = w16[c];
            int words[4] = {pk.x, pk.y, pk.z, pk.w};
#pragma unroll
            for (int u = 0; u < 4; ++u) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int byte = (words[u] >> (8 * e)) & 0xff;
                    int k = 2 * ((c << 4) + u * 4 + e);
                    float s = ld(scale, so + k / group);
                    float w0 = (float)((byte & 15) - 8) * s, w1 = (float)((byte >> 4) - 8) * s;
#pragma unroll
                    for (int m = 0; m < MAXM; ++m)
                        if (m < M) acc[m] += w0 * ld(x, (long long)m * K + k) + w1 * ld(x, (long long)m * K + k + 1);
                }
            }
        }
        tail = nv << 4;
    }
    for (int i = tail + lane; i < kb; i += 32) {
        int byte = wr[i];
        int k = 2 * i;
        float s = ld(scale, so + k / group);
        float w0 = (float)((byte & 15) - 8) * s, w1 = (float)((byte >> 4) - 8) * s;
#pragma unroll
        for (int m = 0; m < MAXM; ++m)
            if (m < M) acc[m] += w0 * ld(x, (long long)m * K + k) + w1 * ld(x, (long long)m * K + k + 1);
    }
    store_channel(acc, y, M, N, n, 1.f, has_bias ? ld(bias, n) : 0.f);  /* group scales are inside */
}
/* (in, out) layouts, split-K: thread = 4 consecutive output columns, blockIdx.y = inputs
   [y*ks, y*ks + ks) (ks a multiple of the group). mode 0: int8, no scale here (per channel,
   epilogue); 1: int8 with scales (K/group, N); 2: int4 (K/2, N) with scales (K/group, N).
   Adds float32 partial sums into acc (M, N), zeroed by the caller. */
extern "C" __global__ void gemv_kn(const T* x, const signed char* w8, const unsigned char* w4, const S* scale,
                                   float* acc, int M, int N, int K, int group, int ks, int mode) {
    int j0 = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (j0 >= N) return;
    int nc = min(4, N - j0);
    int kbeg = blockIdx.y * ks, kend = min(K, kbeg + ks);
    int gs = mode == 0 ? ks : group;
    float tot[MAXM][4], part[MAXM][4];
#pragma unroll
    for (int m = 0; m < MAXM; ++m)
#pragma unroll
        for (int c = 0; c < 4; ++c) tot[m][c] = 0.f;
    for (int g0 = kbeg; g0 < kend; g0 += gs) {
        int g1 = min(kend, g0 + gs);
#pragma unroll
        for (int m = 0; m < MAXM; ++m)
#pragma unroll
            for (int c = 0; c < 4; ++c) part[m][c] = 0.f;
        for (int k = g0; k < g1; ++k) {
            float wv[4];
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                if (c < nc) {
                    if (mode == 2) {
                        int byte = w4[(long long)(k >> 1) * N + j0 + c];
                        wv[c] = (float)(((k & 1) ? (byte >> 4) : (byte & 15)) - 8);
                    } else {
                        wv[c] = (float)w8[(long long)k * N + j0 + c];
                    }
                } else {
                    wv[c] = 0.f;
                }
            }
#pragma unroll
            for (int m = 0; m < MAXM; ++m) {
                if (m < M) {
                    float xv = ld(x, (long long)m * K + k);
#pragma unroll
                    for (int c = 0; c < 4; ++c) part[m][c] += xv * wv[c];
                }
            }
        }
        float sg[4];
#pragma unroll
        for (int c = 0; c < 4; ++c)
            sg[c] = (mode == 0 || c >= nc) ? 1.f : ld(scale, (long long)(g0 / group) * N + j0 + c);
#pragma unroll
        for (int m = 0; m < MAXM; ++m)
#pragma unroll
            for (int c = 0; c < 4; ++c) tot[m][c] += part[m][c] * sg[c];
    }
#pragma unroll
    for (int m = 0; m < MAXM; ++m)
        if (m < M)
#pragma unroll
            for (int c = 0; c < 4; ++c)
                if (c < nc) atomicAdd(acc + (long long)m * N + j0 + c, tot[m][c]);
}
