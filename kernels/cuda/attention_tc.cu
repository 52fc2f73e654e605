// Causal GQA attention on the tensor cores (bf16 in, f32 accumulate), flash-attention-2 style: the S×S score
// matrix is never stored; tiles stream through shared memory, softmax is online (base 2), and P / dS are fed back
// into the next matrix product straight from registers (an m16n8 accumulator fragment pair is an m16k16 A
// fragment).
//
// Same contract as attention.cu (shapes, masking, lse and Dd layouts); bf16 only, head_dim D ∈ {64, 128}.
// Products use `mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32` (sm_80+; the wgmma path for sm_90a is future work).
//
// Work split (16 rows a warp; 4 warps a block unless stated):
// - fwd:  a block owns 128 queries of one q head (8 warps; the template also builds 4) and loops over key
//         tiles of 64 up to the diagonal. On an H200 the 8-warp form ran 164 TFLOP/s against 150 for 4 warps
//         (b1 s4096 hq32 hkv8 d128, causal), so only it is instantiated.
// - dq:   a block owns 64 queries; key tiles of 32; dQ = Σ dS·K, written once (no atomics).
// - dkdv: a block owns 64 keys of one kv head; loops over the group's q heads and query tiles of 32 from the
//         diagonal on; dV = Σ Pᵀ·dO, dK = Σ dSᵀ·Q, written once (no atomics).
// Shared-memory rows are padded by 8 elements (16 bytes) so fragment loads and ldmatrix are bank-conflict free.
// The streamed tiles are double-buffered with cp.async (the next tile loads while the current one is computed).
// Dynamic shared memory: fwd (128 + 4·64)·(D+8)·2 + 2·64·4 B; dq 2·64·(D+8)·2 + 4·32·(D+8)·2 + 2·32·4 B;
// dkdv 2·64·(D+8)·2 + 4·32·(D+8)·2 + 6·32·4 B (the host computes the same in src/cuda/ops.rs).

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned lds32(const bf16* p) { return *(const unsigned*)p; }

__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *(unsigned*)&v;
}

// A fragment (16×16, row-major) from shared memory; `p` points at (row 0, col k0) of the 16-row block.
__device__ __forceinline__ void lda(unsigned* a, const bf16* p, int ld, int g, int t) {
    a[0] = lds32(p + g * ld + 2 * t);
    a[1] = lds32(p + (g + 8) * ld + 2 * t);
    a[2] = lds32(p + g * ld + 8 + 2 * t);
    a[3] = lds32(p + (g + 8) * ld + 8 + 2 * t);
}

// B fragment (k16×n8) from storage whose rows are the n index (k contiguous); `p` at (row n0, col k0).
__device__ __forceinline__ void ldb(unsigned& b0, unsigned& b1, const bf16* p, int ld, int g, int t) {
    b0 = lds32(p + g * ld + 2 * t);
    b1 = lds32(p + g * ld + 8 + 2 * t);
}

// Two B fragments (k16 × n-blocks n0 and n0+8) from storage whose rows are the k index; `p` at (row k0, col n0).
__device__ __forceinline__ void ldb_trans2(unsigned* b, const bf16* p, int ld, int lane) {
    int r = (lane & 7) + ((lane >> 3) & 1) * 8, c = (lane >> 4) * 8;
    unsigned addr = (unsigned)__cvta_generic_to_shared(p + r * ld + c);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                 : "r"(addr));
}

// Accumulator fragments of two consecutive n8 blocks → one A fragment (k16), rounded to bf16.
__device__ __forceinline__ void c2a(unsigned* a, const float* c0, const float* c1) {
    a[0] = pack2(c0[0], c0[1]);
    a[1] = pack2(c0[2], c0[3]);
    a[2] = pack2(c1[0], c1[1]);
    a[3] = pack2(c1[2], c1[3]);
}

// Rows r0..r0+R of head h of a [B, S, H, D] bf16 tensor → smem [R][D+8] (zeros past S); 16-byte accesses.
template <int D, int R>
__device__ __forceinline__ void load_rows(bf16* dst, const bf16* __restrict__ src, int b, int r0, int S, int H,
                                          int h) {
    constexpr int V = D / 8;
    for (int e = threadIdx.x; e < R * V; e += blockDim.x) {
        int r = e / V, c = e % V, i = r0 + r;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (i < S) val = *(const uint4*)(src + (((long long)b * S + i) * H + h) * D + c * 8);
        *(uint4*)(dst + r * (D + 8) + c * 8) = val;
    }
}

// As load_rows, but with cp.async (16 bytes a copy, zero-filled past S); the caller commits and waits.
template <int D, int R>
__device__ __forceinline__ void load_rows_async(bf16* dst, const bf16* __restrict__ src, int b, int r0, int S,
                                                int H, int h) {
    constexpr int V = D / 8;
    for (int e = threadIdx.x; e < R * V; e += blockDim.x) {
        int r = e / V, c = e % V, i = r0 + r;
        const bf16* sp = i < S ? src + (((long long)b * S + i) * H + h) * D + c * 8 : src;
        unsigned sa = (unsigned)__cvta_generic_to_shared(dst + r * (D + 8) + c * 8);
        size_t ga = __cvta_generic_to_global(sp);
        int n = i < S ? 16 : 0;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(ga), "r"(n));
    }
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// W warps: a block owns 16·W queries.
template <int D, int W>
__device__ __forceinline__ void fwd_tc(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                       const bf16* __restrict__ v, const unsigned* __restrict__ seg,
                                       bf16* __restrict__ out, float* __restrict__ lse, int S, int Hq, int Hkv,
                                       float scale) {
    constexpr int LD = D + 8;
    extern __shared__ __align__(16) unsigned char smraw[];
    constexpr int BQ = 16 * W;
    bf16* Qs = (bf16*)smraw;
    bf16* Kbuf = Qs + BQ * LD;         // [2][64][LD]
    bf16* Vbuf = Kbuf + 2 * 64 * LD;   // [2][64][LD]
    unsigned* ksegb = (unsigned*)(Vbuf + 2 * 64 * LD);  // [2][64]
    int qb = gridDim.x - 1 - blockIdx.x;  // longest rows first
    int b = blockIdx.z, h = blockIdx.y, q0 = qb * BQ, hk = h / (Hq / Hkv);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    load_rows<D, BQ>(Qs, q, b, q0, S, Hq, h);
    __syncthreads();
    unsigned qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) lda(qf[kk], Qs + warp * 16 * LD + kk * 16, LD, g, t);
    int i0 = q0 + warp * 16 + g, i1 = i0 + 8;
    unsigned qs0 = (seg != nullptr && i0 < S) ? seg[(long long)b * S + i0] : 0u;
    unsigned qs1 = (seg != nullptr && i1 < S) ? seg[(long long)b * S + i1] : 0u;
    float o[D / 8][4];
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    const float sl2 = scale * LOG2E;
    int q_last = min(q0 + BQ, S) - 1;
    int n_tiles = q_last / 64 + 1;
    // Double buffering: tile it+1 streams in (cp.async) while tile it is computed.
    load_rows_async<D, 64>(Kbuf, k, b, 0, S, Hkv, hk);
    load_rows_async<D, 64>(Vbuf, v, b, 0, S, Hkv, hk);
    cp_commit();
    if (threadIdx.x < 64) {
        int j = threadIdx.x;
        ksegb[threadIdx.x] = (seg != nullptr && j < S) ? seg[(long long)b * S + j] : 0u;
    }
    for (int it = 0; it < n_tiles; ++it) {
        int cur = it & 1, k0 = it * 64;
        if (it + 1 < n_tiles) {
            int nxt = cur ^ 1, k1 = k0 + 64;
            load_rows_async<D, 64>(Kbuf + nxt * 64 * LD, k, b, k1, S, Hkv, hk);
            load_rows_async<D, 64>(Vbuf + nxt * 64 * LD, v, b, k1, S, Hkv, hk);
            cp_commit();
            if (threadIdx.x < 64) {
                int j = k1 + threadIdx.x;
                ksegb[nxt * 64 + threadIdx.x] = (seg != nullptr && j < S) ? seg[(long long)b * S + j] : 0u;
            }
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        __syncthreads();
        const bf16* Ks = Kbuf + cur * 64 * LD;
        const bf16* Vs = Vbuf + cur * 64 * LD;
        const unsigned* kseg = ksegb + cur * 64;
        // Tiles wholly below the diagonal, without segments, need no mask.
        bool full = seg == nullptr && k0 + 63 <= q0;
        float s[8][4];
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int nb = 0; nb < 8; ++nb) {
                unsigned b0, b1;
                ldb(b0, b1, Ks + nb * 8 * LD + kk * 16, LD, g, t);
                mma16816(s[nb], qf[kk], b0, b1);
            }
        }
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                int jl = nb * 8 + 2 * t + e, j = k0 + jl;
                bool ok0 = full || (j <= i0 && j < S && kseg[jl] == qs0);
                bool ok1 = full || (j <= i1 && j < S && kseg[jl] == qs1);
                s[nb][e] = ok0 ? s[nb][e] * sl2 : -INFINITY;
                s[nb][2 + e] = ok1 ? s[nb][2 + e] * sl2 : -INFINITY;
                mx0 = fmaxf(mx0, s[nb][e]);
                mx1 = fmaxf(mx1, s[nb][2 + e]);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // A row with nothing visible yet keeps o = l = 0; use base 0 so exp2(−inf − 0) = 0, never NaN.
        float base0 = mn0 == -INFINITY ? 0.0f : mn0, base1 = mn1 == -INFINITY ? 0.0f : mn1;
        float a0 = exp2f(m0 - base0), a1 = exp2f(m1 - base1);
        l0 *= a0;
        l1 *= a1;
        m0 = mn0;
        m1 = mn1;
        unsigned pf[4][4];
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
            float p00 = exp2f(s[nb][0] - base0), p01 = exp2f(s[nb][1] - base0);
            float p10 = exp2f(s[nb][2] - base1), p11 = exp2f(s[nb][3] - base1);
            l0 += p00 + p01;
            l1 += p10 + p11;
            int kk = nb >> 1, hi = (nb & 1) * 2;
            pf[kk][hi] = pack2(p00, p01);
            pf[kk][hi + 1] = pack2(p10, p11);
        }
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd) {
            o[nd][0] *= a0;
            o[nd][1] *= a0;
            o[nd][2] *= a1;
            o[nd][3] *= a1;
        }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
            for (int nd = 0; nd < D / 8; nd += 2) {
                unsigned bb[4];
                ldb_trans2(bb, Vs + kk * 16 * LD + nd * 8, LD, lane);
                mma16816(o[nd], pf[kk], bb[0], bb[1]);
                mma16816(o[nd + 1], pf[kk], bb[2], bb[3]);
            }
        }
        __syncthreads();  // everyone is done with buffer `cur` before it is refilled
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    if (i0 < S) {
        bf16* row = out + (((long long)b * S + i0) * Hq + h) * D;
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd)
            *(unsigned*)(row + nd * 8 + 2 * t) = pack2(o[nd][0] * inv0, o[nd][1] * inv0);
        if (t == 0) lse[((long long)b * Hq + h) * S + i0] = (m0 + log2f(l0)) * LN2;
    }
    if (i1 < S) {
        bf16* row = out + (((long long)b * S + i1) * Hq + h) * D;
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd)
            *(unsigned*)(row + nd * 8 + 2 * t) = pack2(o[nd][2] * inv1, o[nd][3] * inv1);
        if (t == 0) lse[((long long)b * Hq + h) * S + i1] = (m1 + log2f(l1)) * LN2;
    }
}

template <int D>
__device__ __forceinline__ void dq_tc(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                      const bf16* __restrict__ v, const unsigned* __restrict__ seg,
                                      const bf16* __restrict__ dout, const float* __restrict__ lse,
                                      const float* __restrict__ Dd, bf16* __restrict__ dq, int S, int Hq, int Hkv,
                                      float scale) {
    constexpr int LD = D + 8;
    extern __shared__ __align__(16) unsigned char smraw[];
    bf16* Qs = (bf16*)smraw;
    bf16* dOs = Qs + 64 * LD;
    bf16* Kbuf = dOs + 64 * LD;        // [2][32][LD]
    bf16* Vbuf = Kbuf + 2 * 32 * LD;   // [2][32][LD]
    unsigned* ksegb = (unsigned*)(Vbuf + 2 * 32 * LD);  // [2][32]
    int qb = gridDim.x - 1 - blockIdx.x;
    int b = blockIdx.z, h = blockIdx.y, q0 = qb * 64, hk = h / (Hq / Hkv);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    load_rows<D, 64>(Qs, q, b, q0, S, Hq, h);
    load_rows<D, 64>(dOs, dout, b, q0, S, Hq, h);
    __syncthreads();
    unsigned qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) lda(qf[kk], Qs + warp * 16 * LD + kk * 16, LD, g, t);
    const bf16* dOw = dOs + warp * 16 * LD;
    int i0 = q0 + warp * 16 + g, i1 = i0 + 8;
    bool v0 = i0 < S, v1 = i1 < S;
    long long r0 = ((long long)b * Hq + h) * S;
    float L0 = v0 ? lse[r0 + i0] * LOG2E : 0.0f, L1 = v1 ? lse[r0 + i1] * LOG2E : 0.0f;
    float D0 = v0 ? Dd[r0 + i0] : 0.0f, D1 = v1 ? Dd[r0 + i1] : 0.0f;
    unsigned qs0 = (seg != nullptr && v0) ? seg[(long long)b * S + i0] : 0u;
    unsigned qs1 = (seg != nullptr && v1) ? seg[(long long)b * S + i1] : 0u;
    float acc[D / 8][4];
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.0f;
    const float sl2 = scale * LOG2E;
    int q_last = min(q0 + 64, S) - 1;
    int n_tiles = q_last / 32 + 1;
    load_rows_async<D, 32>(Kbuf, k, b, 0, S, Hkv, hk);
    load_rows_async<D, 32>(Vbuf, v, b, 0, S, Hkv, hk);
    cp_commit();
    if (threadIdx.x < 32) {
        int j = threadIdx.x;
        ksegb[threadIdx.x] = (seg != nullptr && j < S) ? seg[(long long)b * S + j] : 0u;
    }
    for (int it = 0; it < n_tiles; ++it) {
        int cur = it & 1, k0 = it * 32;
        if (it + 1 < n_tiles) {
            int nxt = cur ^ 1, k1 = k0 + 32;
            load_rows_async<D, 32>(Kbuf + nxt * 32 * LD, k, b, k1, S, Hkv, hk);
            load_rows_async<D, 32>(Vbuf + nxt * 32 * LD, v, b, k1, S, Hkv, hk);
            cp_commit();
            if (threadIdx.x < 32) {
                int j = k1 + threadIdx.x;
                ksegb[nxt * 32 + threadIdx.x] = (seg != nullptr && j < S) ? seg[(long long)b * S + j] : 0u;
            }
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        __syncthreads();
        const bf16* Ks = Kbuf + cur * 32 * LD;
        const bf16* Vs = Vbuf + cur * 32 * LD;
        const unsigned* kseg = ksegb + cur * 32;
        float s[4][4], dp[4][4];
#pragma unroll
        for (int nb = 0; nb < 4; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nb][e] = dp[nb][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned af[4];
            lda(af, dOw + kk * 16, LD, g, t);
#pragma unroll
            for (int nb = 0; nb < 4; ++nb) {
                unsigned b0, b1;
                ldb(b0, b1, Ks + nb * 8 * LD + kk * 16, LD, g, t);
                mma16816(s[nb], qf[kk], b0, b1);
                ldb(b0, b1, Vs + nb * 8 * LD + kk * 16, LD, g, t);
                mma16816(dp[nb], af, b0, b1);
            }
        }
#pragma unroll
        for (int nb = 0; nb < 4; ++nb) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                int jl = nb * 8 + 2 * t + e, j = k0 + jl;
                bool ok0 = v0 && j <= i0 && kseg[jl] == qs0;
                bool ok1 = v1 && j <= i1 && kseg[jl] == qs1;
                float p0 = ok0 ? exp2f(s[nb][e] * sl2 - L0) : 0.0f;
                float p1 = ok1 ? exp2f(s[nb][2 + e] * sl2 - L1) : 0.0f;
                s[nb][e] = p0 * (dp[nb][e] - D0);  // s now holds dS
                s[nb][2 + e] = p1 * (dp[nb][2 + e] - D1);
            }
        }
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
            unsigned af[4];
            c2a(af, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int nd = 0; nd < D / 8; nd += 2) {
                unsigned bb[4];
                ldb_trans2(bb, Ks + kk * 16 * LD + nd * 8, LD, lane);
                mma16816(acc[nd], af, bb[0], bb[1]);
                mma16816(acc[nd + 1], af, bb[2], bb[3]);
            }
        }
        __syncthreads();
    }
    if (v0) {
        bf16* row = dq + (((long long)b * S + i0) * Hq + h) * D;
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd)
            *(unsigned*)(row + nd * 8 + 2 * t) = pack2(acc[nd][0] * scale, acc[nd][1] * scale);
    }
    if (v1) {
        bf16* row = dq + (((long long)b * S + i1) * Hq + h) * D;
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd)
            *(unsigned*)(row + nd * 8 + 2 * t) = pack2(acc[nd][2] * scale, acc[nd][3] * scale);
    }
}

template <int D>
__device__ __forceinline__ void dkdv_tc(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                        const bf16* __restrict__ v, const unsigned* __restrict__ seg,
                                        const bf16* __restrict__ dout, const float* __restrict__ lse,
                                        const float* __restrict__ Dd, bf16* __restrict__ dk,
                                        bf16* __restrict__ dv, int S, int Hq, int Hkv, float scale) {
    constexpr int LD = D + 8;
    extern __shared__ __align__(16) unsigned char smraw[];
    bf16* Ks = (bf16*)smraw;
    bf16* Vs = Ks + 64 * LD;
    bf16* Qbuf = Vs + 64 * LD;          // [2][32][LD]
    bf16* dObuf = Qbuf + 2 * 32 * LD;   // [2][32][LD]
    float* Lbuf = (float*)(dObuf + 2 * 32 * LD);  // [2][32]
    float* Dbuf = Lbuf + 2 * 32;                  // [2][32]
    unsigned* qsegb = (unsigned*)(Dbuf + 2 * 32); // [2][32]
    int kb = blockIdx.x;  // keys near the start see the most queries and are scheduled first
    int b = blockIdx.z, hk = blockIdx.y, k0 = kb * 64, G = Hq / Hkv;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    load_rows<D, 64>(Ks, k, b, k0, S, Hkv, hk);
    load_rows<D, 64>(Vs, v, b, k0, S, Hkv, hk);
    const bf16* Kw = Ks + warp * 16 * LD;
    const bf16* Vw = Vs + warp * 16 * LD;
    int j0 = k0 + warp * 16 + g, j1 = j0 + 8;
    unsigned ks0 = (seg != nullptr && j0 < S) ? seg[(long long)b * S + j0] : 0u;
    unsigned ks1 = (seg != nullptr && j1 < S) ? seg[(long long)b * S + j1] : 0u;
    float ak[D / 8][4], av[D / 8][4];
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd)
#pragma unroll
        for (int e = 0; e < 4; ++e) ak[nd][e] = av[nd][e] = 0.0f;
    const float sl2 = scale * LOG2E;
    // Flattened (q head of the group, query tile from the diagonal on), double-buffered.
    int nq = k0 < S ? (S - k0 + 31) / 32 : 0;
    int n_tiles = G * nq;
    auto issue = [&](int it, int buf) {
        int h = hk * G + it / nq, i0 = k0 + (it % nq) * 32;
        long long r0 = ((long long)b * Hq + h) * S;
        load_rows_async<D, 32>(Qbuf + buf * 32 * LD, q, b, i0, S, Hq, h);
        load_rows_async<D, 32>(dObuf + buf * 32 * LD, dout, b, i0, S, Hq, h);
        cp_commit();
        if (threadIdx.x < 32) {
            int i = i0 + threadIdx.x;
            bool valid = i < S;
            Lbuf[buf * 32 + threadIdx.x] = valid ? lse[r0 + i] * LOG2E : 0.0f;
            Dbuf[buf * 32 + threadIdx.x] = valid ? Dd[r0 + i] : 0.0f;
            qsegb[buf * 32 + threadIdx.x] = (seg != nullptr && valid) ? seg[(long long)b * S + i] : 0u;
        }
    };
    if (n_tiles > 0) issue(0, 0);
    for (int it = 0; it < n_tiles; ++it) {
        int cur = it & 1;
        int i0 = k0 + (it % nq) * 32;
        {
            if (it + 1 < n_tiles) {
                issue(it + 1, cur ^ 1);
                cp_wait<1>();
            } else {
                cp_wait<0>();
            }
            __syncthreads();
            const bf16* Qs = Qbuf + cur * 32 * LD;
            const bf16* dOs = dObuf + cur * 32 * LD;
            const float* Ls = Lbuf + cur * 32;
            const float* Ds = Dbuf + cur * 32;
            const unsigned* qseg = qsegb + cur * 32;
            float s[4][4], dp[4][4];
#pragma unroll
            for (int nb = 0; nb < 4; ++nb)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nb][e] = dp[nb][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                unsigned kf[4], vf[4];
                lda(kf, Kw + kk * 16, LD, g, t);
                lda(vf, Vw + kk * 16, LD, g, t);
#pragma unroll
                for (int nb = 0; nb < 4; ++nb) {
                    unsigned b0, b1;
                    ldb(b0, b1, Qs + nb * 8 * LD + kk * 16, LD, g, t);
                    mma16816(s[nb], kf, b0, b1);
                    ldb(b0, b1, dOs + nb * 8 * LD + kk * 16, LD, g, t);
                    mma16816(dp[nb], vf, b0, b1);
                }
            }
            // s → Pᵀ, dp → dSᵀ (rows = keys j0/j1, columns = queries).
#pragma unroll
            for (int nb = 0; nb < 4; ++nb) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    int il = nb * 8 + 2 * t + e, i = i0 + il;
                    bool okq = i < S;
                    bool ok0 = okq && j0 <= i && qseg[il] == ks0;
                    bool ok1 = okq && j1 <= i && qseg[il] == ks1;
                    float p0 = ok0 ? exp2f(s[nb][e] * sl2 - Ls[il]) : 0.0f;
                    float p1 = ok1 ? exp2f(s[nb][2 + e] * sl2 - Ls[il]) : 0.0f;
                    s[nb][e] = p0;
                    s[nb][2 + e] = p1;
                    dp[nb][e] = p0 * (dp[nb][e] - Ds[il]);
                    dp[nb][2 + e] = p1 * (dp[nb][2 + e] - Ds[il]);
                }
            }
#pragma unroll
            for (int kk = 0; kk < 2; ++kk) {
                unsigned pa[4], da[4];
                c2a(pa, s[2 * kk], s[2 * kk + 1]);
                c2a(da, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
                for (int nd = 0; nd < D / 8; nd += 2) {
                    unsigned bb[4];
                    ldb_trans2(bb, dOs + kk * 16 * LD + nd * 8, LD, lane);
                    mma16816(av[nd], pa, bb[0], bb[1]);
                    mma16816(av[nd + 1], pa, bb[2], bb[3]);
                    ldb_trans2(bb, Qs + kk * 16 * LD + nd * 8, LD, lane);
                    mma16816(ak[nd], da, bb[0], bb[1]);
                    mma16816(ak[nd + 1], da, bb[2], bb[3]);
                }
            }
            __syncthreads();
        }
    }
    if (j0 < S) {
        long long base = (((long long)b * S + j0) * Hkv + hk) * D;
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd) {
            *(unsigned*)(dk + base + nd * 8 + 2 * t) = pack2(ak[nd][0] * scale, ak[nd][1] * scale);
            *(unsigned*)(dv + base + nd * 8 + 2 * t) = pack2(av[nd][0], av[nd][1]);
        }
    }
    if (j1 < S) {
        long long base = (((long long)b * S + j1) * Hkv + hk) * D;
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd) {
            *(unsigned*)(dk + base + nd * 8 + 2 * t) = pack2(ak[nd][2] * scale, ak[nd][3] * scale);
            *(unsigned*)(dv + base + nd * 8 + 2 * t) = pack2(av[nd][2], av[nd][3]);
        }
    }
}

#define ATTN_TC(DN)                                                                                \
    extern "C" __global__ void __launch_bounds__(256) attn_fwd_tc8_d##DN(                          \
        const bf16* q, const bf16* k, const bf16* v, const unsigned* seg, bf16* out, float* lse,   \
        int S, int Hq, int Hkv, int D, float scale) {                                              \
        fwd_tc<DN, 8>(q, k, v, seg, out, lse, S, Hq, Hkv, scale);                                  \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_dq_tc_d##DN(                        \
        const bf16* q, const bf16* k, const bf16* v, const unsigned* seg, const bf16* dout,        \
        const float* lse, const float* Dd, bf16* dq, int S, int Hq, int Hkv, int D, float scale) { \
        dq_tc<DN>(q, k, v, seg, dout, lse, Dd, dq, S, Hq, Hkv, scale);                             \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_dkdv_tc_d##DN(                      \
        const bf16* q, const bf16* k, const bf16* v, const unsigned* seg, const bf16* dout,        \
        const float* lse, const float* Dd, bf16* dk, bf16* dv, int S, int Hq, int Hkv, int D,      \
        float scale) {                                                                             \
        dkdv_tc<DN>(q, k, v, seg, dout, lse, Dd, dk, dv, S, Hq, Hkv, scale);                       \
    }

ATTN_TC(64)
ATTN_TC(128)
