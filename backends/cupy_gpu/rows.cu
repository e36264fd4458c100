extern "C" __global__ void layer_norm(const T* x, const T* w, const T* b, T* y, int C, float eps) {
    __shared__ float sh[33];
    long long base = (long long)blockIdx.x * C;
    float s = 0.f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) s += ld(x, base + j);
    float mu = block_sum(s, sh) / C;
    float v = 0.f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) { float d = ld(x, base + j) - mu; v += d * d; }
    float rstd = rsqrtf(block_sum(v, sh) / C + eps);
    for (int j = threadIdx.x; j < C; j += blockDim.x)
        st(y, base + j, (ld(x, base + j) - mu) * rstd * ld(w, j) + ld(b, j));
}
extern "C" __global__ void rms_norm(const T* x, const T* w, T* y, int C, float eps) {
    __shared__ float sh[33];
    long long base = (long long)blockIdx.x * C;
    float s = 0.f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) { float a = ld(x, base + j); s += a * a; }
    float rstd = rsqrtf(block_sum(s, sh) / C + eps);
    for (int j = threadIdx.x; j < C; j += blockDim.x) st(y, base + j, ld(x, base + j) * rstd * ld(w, j));
}
extern "C" __global__ void softmax(const T* x, T* y, int C) {
    __shared__ float sh[33];
    long long base = (long long)blockIdx.x * C;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < C; j += blockDim.x) m = fmaxf(m, ld(x, base + j));
    m = block_max(m, sh);
    float s = 0.f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) s += expf(ld(x, base + j) - m);
    float inv = 1.f / block_sum(s, sh);
    for (int j = threadIdx.x; j < C; j += blockDim.x) st(y, base + j, expf(ld(x, base + j) - m) * inv);
}
/* Attention probabilities from raw scores (rows = batch x kv head x group query head x query):
   scale, causal and padding mask, softmax. A row with no visible key is uniform (the spec). */
extern "C" __global__ void masked_softmax(const T* x, T* y, int n_keys, int n_queries, int rows_per_batch,
                                          const long long* mask, int has_mask, int causal, float scale) {
    __shared__ float sh[33];
    int row = blockIdx.x;
    int bi = row / rows_per_batch, t = row % n_queries;
    int last = causal ? n_keys - n_queries + t : n_keys - 1;
    long long base = (long long)row * n_keys;
    const long long* mrow = mask + (long long)bi * n_keys;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < n_keys; j += blockDim.x)
        if (j <= last && (!has_mask || mrow[j] != 0)) m = fmaxf(m, ld(x, base + j) * scale);
    m = block_max(m, sh);
    if (m == NEG_INF) {
        for (int j = threadIdx.x; j < n_keys; j += blockDim.x) st(y, base + j, 1.f / n_keys);
        return;
    }
    float s = 0.f;
    for (int j = threadIdx.x; j < n_keys; j += blockDim.x)
        if (j <= last && (!has_mask || mrow[j] != 0)) s += expf(ld(x, base + j) * scale - m);
    float inv = 1.f / block_sum(s, sh);
    for (int j = threadIdx.x; j < n_keys; j += blockDim.x) {
        bool ok = j <= last && (!has_mask || mrow[j] != 0);
        st(y, base + j, ok ? expf(ld(x, base + j) * scale - m) * inv : 0.f);
    }
}
/* Decoding: one block per (batch, head, query). q (B, Tq, H*D); K, V the first n_keys rows of
   contiguous (B, kv_rows, KV*D) cache buffers (kv_rows >= n_keys: the spare room of kvcache.py).
   C is the cache's element type: T, or signed char for an int8 cache (attention_kv8), whose
   per-token, per-kv-head scales KS, VS are (B, kv_rows, KV) buffers (null for a float cache):
   a score is (q . Kq) * KS * scale, a softmax weight multiplies Vq * VS.
   Dynamic shared memory: n_keys + 33 + blockDim floats. */
template <typename C>
__device__ void attn_decode_body(const T* q, const C* K, const T* KS, const C* V, const T* VS, T* out,
                                 const long long* mask, int has_mask, int causal, int n_queries, int n_keys,
                                 int kv_rows, int H, int KV, int D, float scale) {
    extern __shared__ float smem[];
    float* sc = smem;
    float* red = smem + n_keys;
    float* part = red + 33;
    int blk = blockIdx.x;
    int bi = blk / (H * n_queries), h = (blk / n_queries) % H, t = blk % n_queries;
    int g = h / (H / KV);
    int last = causal ? n_keys - n_queries + t : n_keys - 1;
    long long qo = ((long long)bi * n_queries + t) * H * D + (long long)h * D;
    long long kvw = (long long)KV * D;
    long long so = (long long)bi * kv_rows * KV + g;  /* scale of token s: so + s * KV */
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int s = warp; s < n_keys; s += nw) {
        bool ok = s <= last && (!has_mask || mask[(long long)bi * n_keys + s] != 0);
        float a = 0.f;
        if (ok) {
            long long ko = ((long long)bi * kv_rows + s) * kvw + (long long)g * D;
            for (int d = lane; d < D; d += 32) a += ld(q, qo + d) * ld(K, ko + d);
            a = warp_sum(a);
            if (KS) a *= ld(KS, so + (long long)s * KV);
        }
        if (lane == 0) sc[s] = ok ? a * scale : NEG_INF;
    }
    __syncthreads();
    float m = NEG_INF;
    for (int s = threadIdx.x; s < n_keys; s += blockDim.x) m = fmaxf(m, sc[s]);
    m = block_max(m, red);
    float tot = 0.f;
    for (int s = threadIdx.x; s < n_keys; s += blockDim.x) {
        float p = m == NEG_INF ? 1.f : (sc[s] == NEG_INF ? 0.f : expf(sc[s] - m));
        tot += p;
        sc[s] = VS ? p * ld(VS, so + (long long)s * KV) : p;
    }
    tot = block_sum(tot, red);  /* its barriers also publish sc */
    int parts = blockDim.x / D;  /* >= 1: the host picks blockDim >= D */
    int d = threadIdx.x % D, pi = threadIdx.x / D;
    float acc = 0.f;
    if (pi < parts) {
        long long vo = (long long)bi * kv_rows * kvw + (long long)g * D + d;
        for (int s = pi; s < n_keys; s += parts) acc += sc[s] * ld(V, vo + (long long)s * kvw);
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x < D) {
        float r = 0.f;
        for (int k = 0; k < parts; ++k) r += part[k * D + threadIdx.x];
        st(out, qo + threadIdx.x, r / tot);
    }
}
extern "C" __global__ void attn_decode(const T* q, const T* K, const T* V, T* out, const long long* mask,
                                       int has_mask, int causal, int n_queries, int n_keys, int kv_rows,
                                       int H, int KV, int D, float scale) {
    attn_decode_body<T>(q, K, (const T*)0, V, (const T*)0, out, mask, has_mask, causal, n_queries, n_keys,
                        kv_rows, H, KV, D, scale);
}
extern "C" __global__ void attn_decode_q8(const T* q, const signed char* K, const T* KS, const signed char* V,
                                          const T* VS, T* out, const long long* mask, int has_mask, int causal,
                                          int n_queries, int n_keys, int kv_rows, int H, int KV, int D,
                                          float scale) {
    attn_decode_body<signed char>(q, K, KS, V, VS, out, mask, has_mask, causal, n_queries, n_keys, kv_rows,
                                  H, KV, D, scale);
}
