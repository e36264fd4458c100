/* Cross-attention with an additive score bias (T5's relative positions); spec:
   minitx/ops/cross_attention.py. q (B, Tq, H*D); K, V (B, S, H*D) contiguous, as many heads as q;
   bias (1 or B, H, Tq, S); mask (B, S) marks real keys; causal lets query t see keys
   0 .. S - Tq + t. A query with no visible key averages all S values uniformly (the spec). */
__device__ __forceinline__ long long bias_row(int bi, int h, int t, int bias_batch, int H, int n_queries,
                                              int n_keys) {
    return (((long long)(bias_batch > 1 ? bi : 0) * H + h) * n_queries + t) * n_keys;
}
__device__ __forceinline__ bool visible(int s, int last, const long long* mask, int has_mask, int bi, int n_keys) {
    return s <= last && (!has_mask || mask[(long long)bi * n_keys + s] != 0);
}
/* Probabilities from cuBLAS's raw scores x (B, H, Tq, S): scale, bias, mask, softmax; one block per
   row. */
extern "C" __global__ void biased_softmax(const T* x, const T* bias, T* y, int n_keys, int n_queries, int H,
                                          int bias_batch, const long long* mask, int has_mask, int causal,
                                          float scale) {
    __shared__ float sh[33];
    int row = blockIdx.x;
    int bi = row / (H * n_queries), h = (row / n_queries) % H, t = row % n_queries;
    int last = causal ? n_keys - n_queries + t : n_keys - 1;
    long long base = (long long)row * n_keys, br = bias_row(bi, h, t, bias_batch, H, n_queries, n_keys);
    float m = NEG_INF;
    for (int j = threadIdx.x; j < n_keys; j += blockDim.x)
        if (visible(j, last, mask, has_mask, bi, n_keys)) m = fmaxf(m, ld(x, base + j) * scale + ld(bias, br + j));
    m = block_max(m, sh);
    if (m == NEG_INF) {
        for (int j = threadIdx.x; j < n_keys; j += blockDim.x) st(y, base + j, 1.f / n_keys);
        return;
    }
    float s = 0.f;
    for (int j = threadIdx.x; j < n_keys; j += blockDim.x)
        if (visible(j, last, mask, has_mask, bi, n_keys)) s += expf(ld(x, base + j) * scale + ld(bias, br + j) - m);
    float inv = 1.f / block_sum(s, sh);
    for (int j = threadIdx.x; j < n_keys; j += blockDim.x)
        st(y, base + j, visible(j, last, mask, has_mask, bi, n_keys)
                        ? expf(ld(x, base + j) * scale + ld(bias, br + j) - m) * inv : 0.f);
}
/* Few queries (a decode step): one block per (batch, head, query); a warp per key for the scores
   (kept in shared memory), the block's softmax, then blockDim / D slices of the keys each mixing
   the values of its share. Dynamic shared memory: n_keys + 33 + blockDim floats. */
extern "C" __global__ void biased_decode(const T* q, const T* K, const T* V, const T* bias, T* out,
                                         const long long* mask, int has_mask, int bias_batch, int causal,
                                         int n_queries, int n_keys, int H, int D, float scale) {
    extern __shared__ float smem[];
    float* sc = smem;
    float* red = smem + n_keys;
    float* part = red + 33;
    int blk = blockIdx.x;
    int bi = blk / (H * n_queries), h = (blk / n_queries) % H, t = blk % n_queries;
    int last = causal ? n_keys - n_queries + t : n_keys - 1;
    long long HD = (long long)H * D;
    long long qo = ((long long)bi * n_queries + t) * HD + (long long)h * D;
    long long br = bias_row(bi, h, t, bias_batch, H, n_queries, n_keys);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int s = warp; s < n_keys; s += nw) {
        bool ok = visible(s, last, mask, has_mask, bi, n_keys);
        float a = 0.f;
        if (ok) {
            long long ko = ((long long)bi * n_keys + s) * HD + (long long)h * D;
            for (int d = lane; d < D; d += 32) a += ld(q, qo + d) * ld(K, ko + d);
            a = warp_sum(a);
        }
        if (lane == 0) sc[s] = ok ? a * scale + ld(bias, br + s) : NEG_INF;
    }
    __syncthreads();
    float m = NEG_INF;
    for (int s = threadIdx.x; s < n_keys; s += blockDim.x) m = fmaxf(m, sc[s]);
    m = block_max(m, red);
    float tot = 0.f;
    for (int s = threadIdx.x; s < n_keys; s += blockDim.x) {
        float p = m == NEG_INF ? 1.f : (sc[s] == NEG_INF ? 0.f : expf(sc[s] - m));
        tot += p;
        sc[s] = p;
    }
    tot = block_sum(tot, red);  /* its barriers also publish sc */
    int parts = blockDim.x / D;  /* >= 1: the host picks blockDim >= D */
    int d = threadIdx.x % D, pi = threadIdx.x / D;
    float acc = 0.f;
    if (pi < parts) {
        long long vo = (long long)bi * n_keys * HD + (long long)h * D + d;
        for (int s = pi; s < n_keys; s += parts) acc += sc[s] * ld(V, vo + (long long)s * HD);
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x < D) {
        float r = 0.f;
        for (int k = 0; k < parts; ++k) r += part[k * D + threadIdx.x];
        st(out, qo + threadIdx.x, r / tot);
    }
}
