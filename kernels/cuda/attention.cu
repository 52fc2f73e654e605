// Causal GQA attention with optional segment ids, forward and backward, flash-style: the S×S score matrix is
// never stored; key/value (or query) tiles of 32 rows stream through shared memory and softmax is online.
//
// Shapes: q [B, S, Hq, D], k/v [B, S, Hkv, D] (T = f32 or bf16), seg [B, S] (u32, or null), out like q,
// lse [B, Hq, S] (f32), Dd [B, Hq, S] (f32, Σ_d dO·O). q head h reads kv head h / (Hq/Hkv).
// Query i sees key j iff j ≤ i and seg[i] = seg[j]; every row sees at least itself.
//
// Work split: a block has 4 warps; each warp owns ROWS = 8 rows (queries in fwd/dq, keys in dkdv), so a block
// covers 32 rows, and lane l handles key (or query) l of the current 32-row tile when computing scores, and the
// head-dim columns d = l + 32·c (c < NCH, D ≤ 32·NCH) when accumulating outputs. Scores are f32 FMAs on the CUDA
// cores (no tensor cores yet): this is the correct, memory-lean path, not the fastest one.
//
// Dynamic shared memory (floats): fwd 32·D + 32·(D+1) + 32·D + 32 + 4·8·32; dq 2·32·D + 2·32·(D+1) + 32 + 4·8·32;
// dkdv 2·32·D + 2·32·(D+1) + 3·32 + 4·8·32. The host computes the same sizes (attention.rs).

#define TILE 32
#define ROWS 8
#define WARPS 4

template <typename T>
__device__ __forceinline__ float ld(const T* p, long long i) { return to_f(p[i]); }

// Loads rows r0..r0+32 of head `h` of a [B, S, H, D] tensor into smem rows of stride `ld_s` (zero past S).
template <typename T>
__device__ __forceinline__ void load_tile(float* dst, int ld_s, const T* src, int b, int r0, int S, int H,
                                          int h, int D) {
    for (int e = threadIdx.x; e < TILE * D; e += blockDim.x) {
        int r = e / D, d = e % D, i = r0 + r;
        dst[r * ld_s + d] = i < S ? to_f(src[(((long long)b * S + i) * H + h) * D + d]) : 0.0f;
    }
}

template <typename T, int NCH>
__device__ __forceinline__ void attn_fwd_impl(const T* __restrict__ q, const T* __restrict__ k,
                                              const T* __restrict__ v, const unsigned int* __restrict__ seg,
                                              T* __restrict__ out, float* __restrict__ lse, int S, int Hq,
                                              int Hkv, int D, float scale) {
    extern __shared__ float sm[];
    float* Qs = sm;                      // [32][D]
    float* Ks = Qs + TILE * D;           // [32][D+1]
    float* Vs = Ks + TILE * (D + 1);     // [32][D]
    unsigned int* kseg = (unsigned int*)(Vs + TILE * D);  // [32]
    float* Ps = (float*)(kseg + TILE);   // [WARPS][ROWS][32]
    int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * TILE;
    int hk = h / (Hq / Hkv);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* P = Ps + warp * ROWS * TILE;
    load_tile(Qs, D, q, b, q0, S, Hq, h, D);
    float m[ROWS], l[ROWS], acc[ROWS][NCH];
    unsigned int qs[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        int i = q0 + warp * ROWS + r;
        qs[r] = (seg != nullptr && i < S) ? seg[(long long)b * S + i] : 0u;
#pragma unroll
        for (int c = 0; c < NCH; ++c) acc[r][c] = 0.0f;
    }
    int q_last = min(q0 + TILE, S) - 1;
    for (int k0 = 0; k0 <= q_last; k0 += TILE) {
        __syncthreads();
        load_tile(Ks, D + 1, k, b, k0, S, Hkv, hk, D);
        load_tile(Vs, D, v, b, k0, S, Hkv, hk, D);
        if (threadIdx.x < TILE) {
            int j = k0 + threadIdx.x;
            kseg[threadIdx.x] = (seg != nullptr && j < S) ? seg[(long long)b * S + j] : 0u;
        }
        __syncthreads();
        int j = k0 + lane;
        float s[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) s[r] = 0.0f;
        const float* kr = Ks + lane * (D + 1);
        const float* qw = Qs + warp * ROWS * D;
        for (int d = 0; d < D; ++d) {
            float kv = kr[d];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) s[r] += qw[r * D + d] * kv;
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            int i = q0 + warp * ROWS + r;
            bool ok = i < S && j <= i && kseg[lane] == qs[r];
            float sc = ok ? s[r] * scale : -INFINITY;
            float mn = fmaxf(m[r], warp_max(sc));
            float alpha = m[r] == -INFINITY ? 0.0f : expf(m[r] - mn);
            float p = ok ? expf(sc - mn) : 0.0f;
            l[r] = l[r] * alpha + warp_sum(p);
            m[r] = mn;
            P[r * TILE + lane] = p;
#pragma unroll
            for (int c = 0; c < NCH; ++c) acc[r][c] *= alpha;
        }
        __syncwarp();
        for (int jj = 0; jj < TILE; ++jj) {
#pragma unroll
            for (int c = 0; c < NCH; ++c) {
                int d = lane + 32 * c;
                float vv = d < D ? Vs[jj * D + d] : 0.0f;
#pragma unroll
                for (int r = 0; r < ROWS; ++r) acc[r][c] += P[r * TILE + jj] * vv;
            }
        }
        __syncwarp();
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        int i = q0 + warp * ROWS + r;
        if (i >= S) continue;
        float inv = 1.0f / l[r];
        T* orow = out + (((long long)b * S + i) * Hq + h) * D;
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
            int d = lane + 32 * c;
            if (d < D) orow[d] = from_f<T>(acc[r][c] * inv);
        }
        if (lane == 0) lse[((long long)b * Hq + h) * S + i] = m[r] + logf(l[r]);
    }
}

// Dd[b, h, i] = Σ_d dO·O (one warp per row).
template <typename T>
__device__ __forceinline__ void attn_bwd_dot_impl(const T* __restrict__ dout, const T* __restrict__ out,
                                                  float* __restrict__ Dd, int B, int S, int Hq, int D) {
    long long rows = (long long)B * S * Hq;
    long long wpb = blockDim.x >> 5;
    int lane = threadIdx.x & 31;
    for (long long row = blockIdx.x * wpb + (threadIdx.x >> 5); row < rows; row += gridDim.x * wpb) {
        float acc = 0.0f;
        for (int d = lane; d < D; d += 32) acc += to_f(dout[row * D + d]) * to_f(out[row * D + d]);
        acc = warp_sum(acc);
        long long h = row % Hq, bi = row / ((long long)S * Hq), i = (row / Hq) % S;
        if (lane == 0) Dd[(bi * Hq + h) * S + i] = acc;
    }
}

template <typename T, int NCH>
__device__ __forceinline__ void attn_bwd_dq_impl(const T* __restrict__ q, const T* __restrict__ k,
                                                 const T* __restrict__ v, const unsigned int* __restrict__ seg,
                                                 const T* __restrict__ dout, const float* __restrict__ lse,
                                                 const float* __restrict__ Dd, T* __restrict__ dq, int S,
                                                 int Hq, int Hkv, int D, float scale) {
    extern __shared__ float sm[];
    float* Qs = sm;                       // [32][D]
    float* dOs = Qs + TILE * D;           // [32][D]
    float* Ks = dOs + TILE * D;           // [32][D+1]
    float* Vs = Ks + TILE * (D + 1);      // [32][D+1]
    unsigned int* kseg = (unsigned int*)(Vs + TILE * (D + 1));
    float* DSs = (float*)(kseg + TILE);   // [WARPS][ROWS][32]
    int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * TILE;
    int hk = h / (Hq / Hkv);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* DS = DSs + warp * ROWS * TILE;
    load_tile(Qs, D, q, b, q0, S, Hq, h, D);
    load_tile(dOs, D, dout, b, q0, S, Hq, h, D);
    float acc[ROWS][NCH], lr[ROWS], dr[ROWS];
    unsigned int qs[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        int i = q0 + warp * ROWS + r;
        bool valid = i < S;
        lr[r] = valid ? lse[((long long)b * Hq + h) * S + i] : 0.0f;
        dr[r] = valid ? Dd[((long long)b * Hq + h) * S + i] : 0.0f;
        qs[r] = (seg != nullptr && valid) ? seg[(long long)b * S + i] : 0u;
#pragma unroll
        for (int c = 0; c < NCH; ++c) acc[r][c] = 0.0f;
    }
    int q_last = min(q0 + TILE, S) - 1;
    for (int k0 = 0; k0 <= q_last; k0 += TILE) {
        __syncthreads();
        load_tile(Ks, D + 1, k, b, k0, S, Hkv, hk, D);
        load_tile(Vs, D + 1, v, b, k0, S, Hkv, hk, D);
        if (threadIdx.x < TILE) {
            int j = k0 + threadIdx.x;
            kseg[threadIdx.x] = (seg != nullptr && j < S) ? seg[(long long)b * S + j] : 0u;
        }
        __syncthreads();
        int j = k0 + lane;
        float s[ROWS], dp[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) s[r] = dp[r] = 0.0f;
        const float* kr = Ks + lane * (D + 1);
        const float* vr = Vs + lane * (D + 1);
        const float* qw = Qs + warp * ROWS * D;
        const float* ow = dOs + warp * ROWS * D;
        for (int d = 0; d < D; ++d) {
            float kv = kr[d], vv = vr[d];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                s[r] += qw[r * D + d] * kv;
                dp[r] += ow[r * D + d] * vv;
            }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            int i = q0 + warp * ROWS + r;
            bool ok = i < S && j <= i && kseg[lane] == qs[r];
            float p = ok ? expf(s[r] * scale - lr[r]) : 0.0f;
            DS[r * TILE + lane] = p * (dp[r] - dr[r]);
        }
        __syncwarp();
        for (int jj = 0; jj < TILE; ++jj) {
#pragma unroll
            for (int c = 0; c < NCH; ++c) {
                int d = lane + 32 * c;
                float kv = d < D ? Ks[jj * (D + 1) + d] : 0.0f;
#pragma unroll
                for (int r = 0; r < ROWS; ++r) acc[r][c] += DS[r * TILE + jj] * kv;
            }
        }
        __syncwarp();
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        int i = q0 + warp * ROWS + r;
        if (i >= S) continue;
        T* row = dq + (((long long)b * S + i) * Hq + h) * D;
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
            int d = lane + 32 * c;
            if (d < D) row[d] = from_f<T>(acc[r][c] * scale);
        }
    }
}

template <typename T, int NCH>
__device__ __forceinline__ void attn_bwd_dkdv_impl(const T* __restrict__ q, const T* __restrict__ k,
                                                   const T* __restrict__ v, const unsigned int* __restrict__ seg,
                                                   const T* __restrict__ dout, const float* __restrict__ lse,
                                                   const float* __restrict__ Dd, T* __restrict__ dk,
                                                   T* __restrict__ dv, int S, int Hq, int Hkv, int D,
                                                   float scale) {
    extern __shared__ float sm[];
    float* Kr = sm;                       // [32][D]  this block's keys
    float* Vr = Kr + TILE * D;            // [32][D]
    float* Qs = Vr + TILE * D;            // [32][D+1] query tile
    float* dOs = Qs + TILE * (D + 1);     // [32][D+1]
    float* lq = dOs + TILE * (D + 1);     // [32]
    float* dq_ = lq + TILE;               // [32] Dd of the query tile
    unsigned int* qseg = (unsigned int*)(dq_ + TILE);  // [32]
    float* PSs = (float*)(qseg + TILE);   // [WARPS][ROWS][32]
    float* DSs = PSs + WARPS * ROWS * TILE;
    int b = blockIdx.z, hk = blockIdx.y, k0 = blockIdx.x * TILE;
    int G = Hq / Hkv;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* PS = PSs + warp * ROWS * TILE;
    float* DS = DSs + warp * ROWS * TILE;
    load_tile(Kr, D, k, b, k0, S, Hkv, hk, D);
    load_tile(Vr, D, v, b, k0, S, Hkv, hk, D);
    float ak[ROWS][NCH], av[ROWS][NCH];
    unsigned int ks[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        int j = k0 + warp * ROWS + r;
        ks[r] = (seg != nullptr && j < S) ? seg[(long long)b * S + j] : 0u;
#pragma unroll
        for (int c = 0; c < NCH; ++c) ak[r][c] = av[r][c] = 0.0f;
    }
    const float* kw = Kr + warp * ROWS * D;
    const float* vw = Vr + warp * ROWS * D;
    for (int g = 0; g < G; ++g) {
        int h = hk * G + g;
        for (int i0 = k0; i0 < S; i0 += TILE) {
            __syncthreads();
            load_tile(Qs, D + 1, q, b, i0, S, Hq, h, D);
            load_tile(dOs, D + 1, dout, b, i0, S, Hq, h, D);
            if (threadIdx.x < TILE) {
                int i = i0 + threadIdx.x;
                bool valid = i < S;
                lq[threadIdx.x] = valid ? lse[((long long)b * Hq + h) * S + i] : 0.0f;
                dq_[threadIdx.x] = valid ? Dd[((long long)b * Hq + h) * S + i] : 0.0f;
                qseg[threadIdx.x] = (seg != nullptr && valid) ? seg[(long long)b * S + i] : 0u;
            }
            __syncthreads();
            int i = i0 + lane;
            float s[ROWS], dp[ROWS];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) s[r] = dp[r] = 0.0f;
            const float* qr = Qs + lane * (D + 1);
            const float* orow = dOs + lane * (D + 1);
            for (int d = 0; d < D; ++d) {
                float qv = qr[d], ov = orow[d];
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    s[r] += kw[r * D + d] * qv;
                    dp[r] += vw[r * D + d] * ov;
                }
            }
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                int j = k0 + warp * ROWS + r;
                bool ok = i < S && j < S && j <= i && qseg[lane] == ks[r];
                float p = ok ? expf(s[r] * scale - lq[lane]) : 0.0f;
                PS[r * TILE + lane] = p;
                DS[r * TILE + lane] = p * (dp[r] - dq_[lane]);
            }
            __syncwarp();
            for (int ii = 0; ii < TILE; ++ii) {
#pragma unroll
                for (int c = 0; c < NCH; ++c) {
                    int d = lane + 32 * c;
                    float qv = d < D ? Qs[ii * (D + 1) + d] : 0.0f;
                    float ov = d < D ? dOs[ii * (D + 1) + d] : 0.0f;
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) {
                        av[r][c] += PS[r * TILE + ii] * ov;
                        ak[r][c] += DS[r * TILE + ii] * qv;
                    }
                }
            }
            __syncwarp();
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        int j = k0 + warp * ROWS + r;
        if (j >= S) continue;
        long long base = (((long long)b * S + j) * Hkv + hk) * D;
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
            int d = lane + 32 * c;
            if (d < D) {
                dk[base + d] = from_f<T>(ak[r][c] * scale);
                dv[base + d] = from_f<T>(av[r][c]);
            }
        }
    }
}

#define ATTN(T, SFX, NCH, DN)                                                                      \
    extern "C" __global__ void __launch_bounds__(128) attn_fwd_##SFX##_d##DN(                      \
        const T* q, const T* k, const T* v, const unsigned int* seg, T* out, float* lse, int S,    \
        int Hq, int Hkv, int D, float scale) {                                                     \
        attn_fwd_impl<T, NCH>(q, k, v, seg, out, lse, S, Hq, Hkv, D, scale);                       \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_dq_##SFX##_d##DN(                   \
        const T* q, const T* k, const T* v, const unsigned int* seg, const T* dout,                \
        const float* lse, const float* Dd, T* dq, int S, int Hq, int Hkv, int D, float scale) {    \
        attn_bwd_dq_impl<T, NCH>(q, k, v, seg, dout, lse, Dd, dq, S, Hq, Hkv, D, scale);           \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_dkdv_##SFX##_d##DN(                 \
        const T* q, const T* k, const T* v, const unsigned int* seg, const T* dout,                \
        const float* lse, const float* Dd, T* dk, T* dv, int S, int Hq, int Hkv, int D,            \
        float scale) {                                                                             \
        attn_bwd_dkdv_impl<T, NCH>(q, k, v, seg, dout, lse, Dd, dk, dv, S, Hq, Hkv, D, scale);     \
    }

ATTN(float, f32, 2, 64)
ATTN(float, f32, 4, 128)
ATTN(float, f32, 8, 256)
ATTN(bf16, bf16, 2, 64)
ATTN(bf16, bf16, 4, 128)
ATTN(bf16, bf16, 8, 256)

#define ATTN_DOT(T, SFX)                                                                           \
    extern "C" __global__ void attn_bwd_dot_##SFX(const T* dout, const T* out, float* Dd, int B,   \
                                                  int S, int Hq, int D) {                          \
        attn_bwd_dot_impl<T>(dout, out, Dd, B, S, Hq, D);                                          \
    }
ATTN_DOT(float, f32)
ATTN_DOT(bf16, bf16)
