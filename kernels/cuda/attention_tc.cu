// Causal GQA attention on the Hopper tensor cores (sm_90a: wgmma, TMA, mbarriers, setmaxnreg), bf16 in, f32
// accumulate, flash-attention style: the S×S score matrix is never stored; tiles stream through shared memory,
// softmax is online in base 2 with the scale folded into one FFMA per score, and P / dS go back into the next product
// straight from registers (a warp's 16 accumulator rows of an m64nN wgmma are its m16k16 A fragments).
//
// Same contract as attention.cu (shapes, masking, segments, lse and Dd layouts); bf16 only, head_dim D ∈ {64,128};
// the host (src/cuda/ops.rs) uses these kernels on sm_90 only and attention.cu elsewhere.
//
// Every kernel is warp-specialized: 384 threads = 3 warpgroups, one block an SM. Warpgroup 0 is the producer: after
// `setmaxnreg.dec 24` one thread issues TMA bulk-tensor copies (tensor maps built by the host, passed by value as
// __grid_constant__ parameters) into a ring of smem stages, each completing on its "full" mbarrier (dkdv: warp 1
// also writes the tile's lse/Dd/segments and arrives on "full"). Warpgroups 1 and 2 are consumers (`setmaxnreg.inc
// 240`), 64 rows each: they wait on "full", run the wgmmas and the softmax, and release a stage on its "empty"
// mbarrier (one arrive per consumer warp). There is no block-wide barrier after the setup, so the two consumer
// warpgroups drift and one's softmax overlaps the other's tensor work. Grids are (batch·heads, blocks along the
// sequence), the longest blocks first.
// - fwd:  a block owns 128 queries of one q head; key tiles of 128 up to the diagonal, 3 stages of K+V. Software
//         pipelined: iteration j issues S_j = Q·K_jᵀ (m64n128k16, Q and K from smem) and then O += P_{j-1}·V_{j-1}
//         (m64nDk16, P from registers, V from smem N-major), computes the softmax of tile j while the second product
//         runs, and releases tile j-1's stage. P is double-buffered in registers; O is rescaled only when a row
//         maximum moved. Masks only on tiles that cross the diagonal or the end, or with segments.
//         Dynamic smem: Q 128·D·2 + 3 × (K + V) 2·128·D·2 + 7 mbarriers (D=128: 230,456 B).
// - dq:   a block owns 128 queries of one q head; key tiles of 128 up to the diagonal, 2 stages of K+V. S = Q·Kᵀ and
//         dP = dO·Vᵀ (m64n128k16), P = exp2(S·scale·log2e − lse·log2e), dS = P∘(dP − Dd), dQ += dS·K (m64nDk16);
//         written once. Dynamic smem: Q, dO 2·128·D·2 + 2 × (K + V) 2·128·D·2 + 5 mbarriers (D=128: 197,672 B).
// - dkdv: a block owns 128 keys of one kv head; loops over the group's q heads × query tiles of 64 from the
//         diagonal on, 2 stages of Q+dO. Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ (m64n64k16), dV += Pᵀ·dO, dK += dSᵀ·Q (m64nDk16,
//         overlapped: dV runs while dSᵀ is formed); written once. Dynamic smem: K, V 2·128·D·2 + 2 × (Q + dO)
//         2·64·D·2 + 5 mbarriers + 2 × (lse, Dd, segments) 3·64·4 (D=128: 133,672 B).
// Every smem size above includes 1024 B for aligning the tiles to the swizzle period; the host computes the same.
//
// Shared-memory tiles use the 128-byte swizzle that both TMA (CU_TENSOR_MAP_SWIZZLE_128B, boxes of 64 columns) and
// wgmma descriptors understand: an R×D tile is stored as D/64 panels of [R rows][64 columns] (128 B a row), and the
// 16-byte chunk c of row r sits at chunk c ^ (r & 7). The same bytes serve as a K-major operand (rows = M/N, e.g. K
// in Q·Kᵀ) and as an N-major one (rows = K, e.g. V in P·V): descriptor SBO = 1024 B (8 rows), LBO = R·128 B (next
// 64-column panel, N-major only).

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *(unsigned*)&v;
}

// wgmma shared-memory descriptor with the 128-byte swizzle.
__device__ __forceinline__ unsigned long long make_desc(unsigned addr, unsigned lbo) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)((lbo >> 4) & 0x3FFF) << 16) |
           ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}
// K-major operand: rows m0..m0+63 (A) or the whole tile (B) of an R-row tile, k16 step kk along D.
template <int R>
__device__ __forceinline__ unsigned long long desc_k(unsigned tile, int m0, int kk) {
    return make_desc(tile + (kk >> 2) * (R * 128) + m0 * 128 + (kk & 3) * 32, 16);
}
// N-major B operand: tile rows 16·kk..16·kk+15 are K, the D columns are N.
template <int R>
__device__ __forceinline__ unsigned long long desc_n(unsigned tile, int kk) {
    return make_desc(tile + kk * 16 * 128, R * 128);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins accumulators at this point of the program (after a wait: they are read only from here on).
template <int N>
__device__ __forceinline__ void reg_fence(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D[64x64] (+)= A[64x16]·B[16x64], A and B in shared memory (descriptors), both K-major; acc = 0 overwrites D.
__device__ __forceinline__ void wg_ss_n64(float (&d)[32], unsigned long long da, unsigned long long db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(acc));
}

// D[64x64] += A[64x16]·B[16x64], A in registers (an m16k16 fragment per warp), B in shared memory N-major.
__device__ __forceinline__ void wg_rs_n64_t(float (&d)[32], const unsigned (&a)[4], unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

// D[64x128] (+)= A[64x16]·B[16x128], A and B in shared memory (descriptors), both K-major; acc = 0 overwrites D.
__device__ __forceinline__ void wg_ss_n128(float (&d)[64], unsigned long long da, unsigned long long db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(acc));
}

// D[64x128] += A[64x16]·B[16x128], A in registers (an m16k16 fragment per warp), B in shared memory N-major.
__device__ __forceinline__ void wg_rs_n128_t(float (&d)[64], const unsigned (&a)[4], unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

// O += P·V (D = 64 or 128 columns).
template <int D>
__device__ __forceinline__ void wg_rs_t(float (&d)[D / 2], const unsigned (&a)[4], unsigned long long db) {
    if constexpr (D == 128)
        wg_rs_n128_t(d, a, db);
    else
        wg_rs_n64_t(d, a, db);
}

struct __align__(64) TmaMap {
    unsigned long long v[16];
};

__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
// Rows r0..r0+R of head h, batch b (a [B, S, H, D] tensor described by `map`, box 64 columns × R rows) → the
// swizzled R-row tile at `dst`, one TMA copy per 64-column panel; rows past S arrive as zeros.
template <int D, int R>
__device__ __forceinline__ void tma_tile(unsigned dst, const TmaMap* map, int b, int r0, int h, unsigned bar) {
#pragma unroll
    for (int p = 0; p < D / 64; ++p)
        asm volatile(
            "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, "
            "%4, %5}], [%6];\n" ::"r"(dst + p * R * 128),
            "l"((unsigned long long)map), "r"(p * 64), "r"(h), "r"(r0), "r"(b), "r"(bar)
            : "memory");
}
__device__ __forceinline__ void ws_setup_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void reg_dealloc() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void reg_alloc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
// S (+)= A·B over N = 64 or 128 columns.
template <int N>
__device__ __forceinline__ void wg_ss(float (&d)[N / 2], unsigned long long da, unsigned long long db, int acc) {
    if constexpr (N == 128)
        wg_ss_n128(d, da, db, acc);
    else
        wg_ss_n64(d, da, db, acc);
}

// Registers a thread after setmaxnreg: producer warpgroup / consumer warpgroups (128·24 + 256·240 = 384·168, the
// allocation at launch under __launch_bounds__(384, 1)).
#define WS_PRODUCER_REGS 24
#define WS_CONSUMER_REGS 240

// ---------------------------------------------------------------------------------------------------------------
// Forward. Block: 128 queries (consumer warpgroups × 64) of head h; key tiles of 128 through NS stages of K+V. Each
// consumer warpgroup issues S_j = Q·K_jᵀ and then O += P_{j-1}·V_{j-1}, computes the softmax of tile j while the
// second product runs, and releases the stage of tile j-1 once it completes (so NS = 3 stages keep a tile of slack
// for the producer). P is double-buffered in registers.
template <int D, int NS>
__device__ __forceinline__ void fwd_tc(const TmaMap* tq, const TmaMap* tk, const TmaMap* tv,
                                       const unsigned* __restrict__ seg, bf16* __restrict__ out,
                                       float* __restrict__ lse, int S, int Hq, int Hkv, float scale) {
    constexpr int BQ = 128, BK = 128;
    constexpr unsigned TQ = BQ * D * 2, TK = BK * D * 2;
    extern __shared__ __align__(16) unsigned char smraw[];
    unsigned raw = smem_u32(smraw), base = (raw + 1023u) & ~1023u;
    unsigned sQ = base, sK = base + TQ, sV = sK + NS * TK;
    unsigned bars = sV + NS * TK;  // qbar, full[NS], empty[NS]
    unsigned qbar = bars;
    auto full = [&](int st) { return bars + 8 + 8 * st; };
    auto empty = [&](int st) { return bars + 8 + 8 * NS + 8 * st; };
    int tid = threadIdx.x, wg = tid >> 7;
    int qb = gridDim.y - 1 - blockIdx.y;
    int b = blockIdx.x / Hq, h = blockIdx.x % Hq, q0 = qb * BQ, hk = h / (Hq / Hkv);
    int n_tiles = (min(q0 + BQ, S) - 1) / BK + 1;
    if (tid == 0) {
        mbar_init(qbar, 1);
        for (int st = 0; st < NS; ++st) {
            mbar_init(full(st), 1);
            mbar_init(empty(st), 8);
        }
        ws_setup_fence();
    }
    __syncthreads();
    if (wg == 0) {
        reg_dealloc<WS_PRODUCER_REGS>();
        if (tid == 0) {
            mbar_expect_tx(qbar, TQ);
            tma_tile<D, BQ>(sQ, tq, b, q0, h, qbar);
            for (int it = 0; it < n_tiles; ++it) {
                int st = it % NS;
                if (it >= NS) mbar_wait(empty(st), ((it / NS) - 1) & 1);
                mbar_expect_tx(full(st), 2 * TK);
                tma_tile<D, BK>(sK + st * TK, tk, b, it * BK, hk, full(st));
                tma_tile<D, BK>(sV + st * TK, tv, b, it * BK, hk, full(st));
            }
        }
    } else {
        reg_alloc<WS_CONSUMER_REGS>();
        const int cw = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
        const bool has_seg = seg != nullptr;
        const long long sb = (long long)b * S;
        int wq0 = q0 + 64 * cw;
        int i0 = wq0 + 16 * warp + g, i1 = i0 + 8;
        unsigned qs0 = (has_seg && i0 < S) ? seg[sb + i0] : 0u;
        unsigned qs1 = (has_seg && i1 < S) ? seg[sb + i1] : 0u;
        float o[D / 2];
#pragma unroll
        for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
        float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
        const float sl2 = scale * LOG2E;
        // Masks, online-softmax update and P of key tile `it` (scores in s); returns the rescale factors of O.
        auto softmax = [&](float (&s)[BK / 2], int it, unsigned (&pn)[BK / 16][4], float& a0, float& a1) {
            int k0 = it * BK;
            if (has_seg || k0 + BK - 1 > wq0 || k0 + BK > S) {
#pragma unroll
                for (int jn = 0; jn < BK / 8; ++jn) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        int j = k0 + 8 * jn + 2 * t + e;
                        unsigned ks = (has_seg && j < S) ? seg[sb + j] : 0u;
                        if (!(j <= i0 && j < S && ks == qs0)) s[4 * jn + e] = -INFINITY;
                        if (!(j <= i1 && j < S && ks == qs1)) s[4 * jn + 2 + e] = -INFINITY;
                    }
                }
            }
            float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
            for (int jn = 0; jn < BK / 8; ++jn) {
                mx0 = fmaxf(mx0, fmaxf(s[4 * jn], s[4 * jn + 1]));
                mx1 = fmaxf(mx1, fmaxf(s[4 * jn + 2], s[4 * jn + 3]));
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            float mn0 = fmaxf(m0, mx0 * sl2), mn1 = fmaxf(m1, mx1 * sl2);
            // A row with nothing visible yet keeps o = l = 0; base 0 makes exp2(−inf − 0) = 0, never NaN.
            float base0 = mn0 == -INFINITY ? 0.0f : mn0, base1 = mn1 == -INFINITY ? 0.0f : mn1;
            a0 = ex2(m0 - base0);
            a1 = ex2(m1 - base1);
            m0 = mn0;
            m1 = mn1;
            l0 *= a0;
            l1 *= a1;
#pragma unroll
            for (int jn = 0; jn < BK / 8; ++jn) {
                float p00 = ex2(fmaf(s[4 * jn], sl2, -base0)), p01 = ex2(fmaf(s[4 * jn + 1], sl2, -base0));
                float p10 = ex2(fmaf(s[4 * jn + 2], sl2, -base1)), p11 = ex2(fmaf(s[4 * jn + 3], sl2, -base1));
                l0 += p00 + p01;
                l1 += p10 + p11;
                pn[jn >> 1][(jn & 1) * 2] = pack2(p00, p01);
                pn[jn >> 1][(jn & 1) * 2 + 1] = pack2(p10, p11);
            }
        };
        unsigned pa[BK / 16][4], pb[BK / 16][4];
        mbar_wait(qbar, 0);
        {
            mbar_wait(full(0), 0);
            float s[BK / 2];
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                wg_ss_n128(s, desc_k<BQ>(sQ, 64 * cw, kk), desc_k<BK>(sK, 0, kk), kk);
            wg_commit();
            wg_wait<0>();
            reg_fence(s);
            float a0, a1;
            softmax(s, 0, pa, a0, a1);  // O is still 0: nothing to rescale
        }
        auto step = [&](int it, unsigned (&pin)[BK / 16][4], unsigned (&pout)[BK / 16][4]) {
            int st = it % NS, sp = (it - 1) % NS;
            mbar_wait(full(st), (it / NS) & 1);
            float s[BK / 2];
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                wg_ss_n128(s, desc_k<BQ>(sQ, 64 * cw, kk), desc_k<BK>(sK + st * TK, 0, kk), kk);
            wg_commit();
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) wg_rs_t<D>(o, pin[kk], desc_n<BK>(sV + sp * TK, kk));
            wg_commit();
            wg_wait<1>();
            reg_fence(s);
            float a0, a1;
            softmax(s, it, pout, a0, a1);
            wg_wait<0>();
            reg_fence(o);
            if (lane == 0) mbar_arrive(empty(sp));  // tile it-1 is done
            if (__any_sync(0xffffffffu, a0 != 1.0f || a1 != 1.0f)) {
#pragma unroll
                for (int i = 0; i < D / 8; ++i) {
                    o[4 * i] *= a0;
                    o[4 * i + 1] *= a0;
                    o[4 * i + 2] *= a1;
                    o[4 * i + 3] *= a1;
                }
            }
        };
        auto last = [&](unsigned (&p)[BK / 16][4]) {
            int sp = (n_tiles - 1) % NS;
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) wg_rs_t<D>(o, p[kk], desc_n<BK>(sV + sp * TK, kk));
            wg_commit();
            wg_wait<0>();
            reg_fence(o);
            if (lane == 0) mbar_arrive(empty(sp));
        };
        int it = 1;
        for (; it + 1 < n_tiles; it += 2) {
            step(it, pa, pb);
            step(it + 1, pb, pa);
        }
        if (it < n_tiles) {
            step(it, pa, pb);
            last(pb);
        } else {
            last(pa);
        }
        l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
        l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
        float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
        if (i0 < S) {
            bf16* row = out + ((sb + i0) * Hq + h) * D;
#pragma unroll
            for (int i = 0; i < D / 8; ++i)
                *(unsigned*)(row + 8 * i + 2 * t) = pack2(o[4 * i] * inv0, o[4 * i + 1] * inv0);
            if (t == 0) lse[((long long)b * Hq + h) * S + i0] = (m0 + log2f(l0)) * LN2;
        }
        if (i1 < S) {
            bf16* row = out + ((sb + i1) * Hq + h) * D;
#pragma unroll
            for (int i = 0; i < D / 8; ++i)
                *(unsigned*)(row + 8 * i + 2 * t) = pack2(o[4 * i + 2] * inv1, o[4 * i + 3] * inv1);
            if (t == 0) lse[((long long)b * Hq + h) * S + i1] = (m1 + log2f(l1)) * LN2;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// dQ. Block: 128 queries (consumer warpgroups × 64) of head h; key tiles of BK through NS stages of K+V.
template <int D, int BK, int NS>
__device__ __forceinline__ void dq_tc(const TmaMap* tq, const TmaMap* tk, const TmaMap* tv, const TmaMap* tdo,
                                      const unsigned* __restrict__ seg, const float* __restrict__ lse,
                                      const float* __restrict__ Dd, bf16* __restrict__ dq, int S, int Hq, int Hkv,
                                      float scale) {
    constexpr int BQ = 128;
    constexpr unsigned TQ = BQ * D * 2, TK = BK * D * 2;
    extern __shared__ __align__(16) unsigned char smraw[];
    unsigned raw = smem_u32(smraw), base = (raw + 1023u) & ~1023u;
    unsigned sQ = base, sdO = base + TQ, sK = base + 2 * TQ, sV = sK + NS * TK;
    unsigned bars = sV + NS * TK;
    unsigned qbar = bars;
    auto full = [&](int st) { return bars + 8 + 8 * st; };
    auto empty = [&](int st) { return bars + 8 + 8 * NS + 8 * st; };
    int tid = threadIdx.x, wg = tid >> 7;
    int qb = gridDim.y - 1 - blockIdx.y;
    int b = blockIdx.x / Hq, h = blockIdx.x % Hq, q0 = qb * BQ, hk = h / (Hq / Hkv);
    int n_tiles = (min(q0 + BQ, S) - 1) / BK + 1;
    if (tid == 0) {
        mbar_init(qbar, 1);
        for (int st = 0; st < NS; ++st) {
            mbar_init(full(st), 1);
            mbar_init(empty(st), 8);
        }
        ws_setup_fence();
    }
    __syncthreads();
    if (wg == 0) {
        reg_dealloc<WS_PRODUCER_REGS>();
        if (tid == 0) {
            mbar_expect_tx(qbar, 2 * TQ);
            tma_tile<D, BQ>(sQ, tq, b, q0, h, qbar);
            tma_tile<D, BQ>(sdO, tdo, b, q0, h, qbar);
            for (int it = 0; it < n_tiles; ++it) {
                int st = it % NS;
                if (it >= NS) mbar_wait(empty(st), ((it / NS) - 1) & 1);
                mbar_expect_tx(full(st), 2 * TK);
                tma_tile<D, BK>(sK + st * TK, tk, b, it * BK, hk, full(st));
                tma_tile<D, BK>(sV + st * TK, tv, b, it * BK, hk, full(st));
            }
        }
    } else {
        reg_alloc<WS_CONSUMER_REGS>();
        const int cw = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
        const bool has_seg = seg != nullptr;
        const long long sb = (long long)b * S;
        int wq0 = q0 + 64 * cw;
        int i0 = wq0 + 16 * warp + g, i1 = i0 + 8;
        bool v0 = i0 < S, v1 = i1 < S;
        long long r0 = ((long long)b * Hq + h) * S;
        float L0 = v0 ? lse[r0 + i0] * LOG2E : 0.0f, L1 = v1 ? lse[r0 + i1] * LOG2E : 0.0f;
        float D0 = v0 ? Dd[r0 + i0] : 0.0f, D1 = v1 ? Dd[r0 + i1] : 0.0f;
        unsigned qs0 = (has_seg && v0) ? seg[sb + i0] : 0u;
        unsigned qs1 = (has_seg && v1) ? seg[sb + i1] : 0u;
        float acc[D / 2];
#pragma unroll
        for (int i = 0; i < D / 2; ++i) acc[i] = 0.0f;
        const float sl2 = scale * LOG2E;
        mbar_wait(qbar, 0);
        for (int it = 0; it < n_tiles; ++it) {
            int st = it % NS, k0 = it * BK;
            mbar_wait(full(st), (it / NS) & 1);
            float s[BK / 2], dp[BK / 2];
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                wg_ss<BK>(s, desc_k<BQ>(sQ, 64 * cw, kk), desc_k<BK>(sK + st * TK, 0, kk), kk);
            wg_commit();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                wg_ss<BK>(dp, desc_k<BQ>(sdO, 64 * cw, kk), desc_k<BK>(sV + st * TK, 0, kk), kk);
            wg_commit();
            wg_wait<1>();
            reg_fence(s);
            const bool need = has_seg || k0 + BK - 1 > wq0 || k0 + BK > S;
#pragma unroll
            for (int jn = 0; jn < BK / 8; ++jn) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float p0 = ex2(fmaf(s[4 * jn + e], sl2, -L0));
                    float p1 = ex2(fmaf(s[4 * jn + 2 + e], sl2, -L1));
                    if (need) {
                        int j = k0 + 8 * jn + 2 * t + e;
                        unsigned ks = (has_seg && j < S) ? seg[sb + j] : 0u;
                        if (!(j <= i0 && j < S && ks == qs0)) p0 = 0.0f;
                        if (!(j <= i1 && j < S && ks == qs1)) p1 = 0.0f;
                    }
                    s[4 * jn + e] = p0;
                    s[4 * jn + 2 + e] = p1;
                }
            }
            wg_wait<0>();
            reg_fence(dp);
            unsigned da[BK / 16][4];
#pragma unroll
            for (int jn = 0; jn < BK / 8; ++jn) {
                float d00 = s[4 * jn] * (dp[4 * jn] - D0), d01 = s[4 * jn + 1] * (dp[4 * jn + 1] - D0);
                float d10 = s[4 * jn + 2] * (dp[4 * jn + 2] - D1), d11 = s[4 * jn + 3] * (dp[4 * jn + 3] - D1);
                da[jn >> 1][(jn & 1) * 2] = pack2(d00, d01);
                da[jn >> 1][(jn & 1) * 2 + 1] = pack2(d10, d11);
            }
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) wg_rs_t<D>(acc, da[kk], desc_n<BK>(sK + st * TK, kk));
            wg_commit();
            wg_wait<0>();
            reg_fence(acc);
            if (lane == 0) mbar_arrive(empty(st));
        }
        if (v0) {
            bf16* row = dq + ((sb + i0) * Hq + h) * D;
#pragma unroll
            for (int i = 0; i < D / 8; ++i)
                *(unsigned*)(row + 8 * i + 2 * t) = pack2(acc[4 * i] * scale, acc[4 * i + 1] * scale);
        }
        if (v1) {
            bf16* row = dq + ((sb + i1) * Hq + h) * D;
#pragma unroll
            for (int i = 0; i < D / 8; ++i)
                *(unsigned*)(row + 8 * i + 2 * t) = pack2(acc[4 * i + 2] * scale, acc[4 * i + 3] * scale);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// dK, dV. Block: 128 keys (consumer warpgroups × 64) of kv head hk; the group's q heads × query
// tiles of 64 from the diagonal on stream through the ring (Q and dO of one tile a stage).
template <int D, int NS>
__device__ __forceinline__ void dkdv_tc(const TmaMap* tq, const TmaMap* tk, const TmaMap* tv, const TmaMap* tdo,
                                        const unsigned* __restrict__ seg, const float* __restrict__ lse,
                                        const float* __restrict__ Dd, bf16* __restrict__ dk, bf16* __restrict__ dv,
                                        int S, int Hq, int Hkv, float scale) {
    constexpr int BKV = 128, BQ = 64;
    constexpr unsigned TKV = BKV * D * 2, TQ = BQ * D * 2;
    extern __shared__ __align__(16) unsigned char smraw[];
    unsigned raw = smem_u32(smraw), base = (raw + 1023u) & ~1023u;
    unsigned sK = base, sV = base + TKV, sQ = base + 2 * TKV, sdO = sQ + NS * TQ;
    unsigned bars = sdO + NS * TQ;
    unsigned kvbar = bars;
    auto full = [&](int st) { return bars + 8 + 8 * st; };
    auto empty = [&](int st) { return bars + 8 + 8 * NS + 8 * st; };
    // Per stage: lse (log2 units), Dd and segment of the tile's 64 queries, written by producer warp 1.
    float* Lb = (float*)(smraw + (base - raw) + 2 * TKV + 2 * NS * TQ + 8 * (1 + 2 * NS));  // [NS][BQ]
    float* Db = Lb + NS * BQ;                                                                // [NS][BQ]
    unsigned* qsegb = (unsigned*)(Db + NS * BQ);                                             // [NS][BQ]
    int tid = threadIdx.x, wg = tid >> 7;
    int kb = blockIdx.y;
    int b = blockIdx.x / Hkv, hk = blockIdx.x % Hkv, k0 = kb * BKV, G = Hq / Hkv;
    int nq = (S - k0 + BQ - 1) / BQ;  // query tiles per head, from the diagonal on (k0 < S)
    int n_tiles = G * nq;
    const bool has_seg = seg != nullptr;
    const long long sb = (long long)b * S;
    if (tid == 0) {
        mbar_init(kvbar, 1);
        for (int st = 0; st < NS; ++st) {
            mbar_init(full(st), 1 + 32);  // the TMA thread's expect_tx + the 32 lanes of producer warp 1
            mbar_init(empty(st), 8);
        }
        ws_setup_fence();
    }
    __syncthreads();
    if (wg == 0) {
        reg_dealloc<WS_PRODUCER_REGS>();
        if (tid == 0) {
            mbar_expect_tx(kvbar, 2 * TKV);
            tma_tile<D, BKV>(sK, tk, b, k0, hk, kvbar);
            tma_tile<D, BKV>(sV, tv, b, k0, hk, kvbar);
            for (int it = 0; it < n_tiles; ++it) {
                int st = it % NS, h = hk * G + it / nq, i0 = k0 + (it % nq) * BQ;
                if (it >= NS) mbar_wait(empty(st), ((it / NS) - 1) & 1);
                mbar_expect_tx(full(st), 2 * TQ);
                tma_tile<D, BQ>(sQ + st * TQ, tq, b, i0, h, full(st));
                tma_tile<D, BQ>(sdO + st * TQ, tdo, b, i0, h, full(st));
            }
        } else if ((tid >> 5) == 1) {
            int lane = tid & 31;
            for (int it = 0; it < n_tiles; ++it) {
                int st = it % NS, h = hk * G + it / nq, i0 = k0 + (it % nq) * BQ;
                const long long r0 = ((long long)b * Hq + h) * S;
                if (it >= NS) mbar_wait(empty(st), ((it / NS) - 1) & 1);
#pragma unroll
                for (int e = lane; e < BQ; e += 32) {
                    int i = i0 + e;
                    bool ok = i < S;
                    Lb[st * BQ + e] = ok ? lse[r0 + i] * LOG2E : 0.0f;
                    Db[st * BQ + e] = ok ? Dd[r0 + i] : 0.0f;
                    qsegb[st * BQ + e] = (has_seg && ok) ? seg[sb + i] : 0u;
                }
                mbar_arrive(full(st));
            }
        }
    } else {
        reg_alloc<WS_CONSUMER_REGS>();
        const int cw = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
        int wk0 = k0 + 64 * cw;  // first key of this warpgroup
        int j0 = wk0 + 16 * warp + g, j1 = j0 + 8;
        unsigned ks0 = (has_seg && j0 < S) ? seg[sb + j0] : 0u;
        unsigned ks1 = (has_seg && j1 < S) ? seg[sb + j1] : 0u;
        float ak[D / 2], av[D / 2];
#pragma unroll
        for (int i = 0; i < D / 2; ++i) ak[i] = av[i] = 0.0f;
        const float sl2 = scale * LOG2E;
        mbar_wait(kvbar, 0);
        for (int it = 0; it < n_tiles; ++it) {
            int st = it % NS, i0 = k0 + (it % nq) * BQ;
            mbar_wait(full(st), (it / NS) & 1);
            float s[BQ / 2], dp[BQ / 2];
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                wg_ss_n64(s, desc_k<BKV>(sK, 64 * cw, kk), desc_k<BQ>(sQ + st * TQ, 0, kk), kk);
            wg_commit();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                wg_ss_n64(dp, desc_k<BKV>(sV, 64 * cw, kk), desc_k<BQ>(sdO + st * TQ, 0, kk), kk);
            wg_commit();
            wg_wait<1>();
            reg_fence(s);
            const float* Ls = Lb + st * BQ;
            const float* Ds = Db + st * BQ;
            const unsigned* qseg = qsegb + st * BQ;
            // Sᵀ → Pᵀ (rows = keys j0/j1, columns = queries).
            const bool need = has_seg || i0 < wk0 + 63 || i0 + BQ > S;
            unsigned pa[BQ / 16][4];
#pragma unroll
            for (int jn = 0; jn < BQ / 8; ++jn) {
                float2 L = *(const float2*)(Ls + 8 * jn + 2 * t);
                float p00 = ex2(fmaf(s[4 * jn], sl2, -L.x)), p01 = ex2(fmaf(s[4 * jn + 1], sl2, -L.y));
                float p10 = ex2(fmaf(s[4 * jn + 2], sl2, -L.x)), p11 = ex2(fmaf(s[4 * jn + 3], sl2, -L.y));
                if (need) {
                    int il = 8 * jn + 2 * t, i = i0 + il;
                    unsigned qa = qseg[il], qb2 = qseg[il + 1];
                    if (!(i < S && j0 <= i && qa == ks0)) p00 = 0.0f;
                    if (!(i + 1 < S && j0 <= i + 1 && qb2 == ks0)) p01 = 0.0f;
                    if (!(i < S && j1 <= i && qa == ks1)) p10 = 0.0f;
                    if (!(i + 1 < S && j1 <= i + 1 && qb2 == ks1)) p11 = 0.0f;
                }
                s[4 * jn] = p00;
                s[4 * jn + 1] = p01;
                s[4 * jn + 2] = p10;
                s[4 * jn + 3] = p11;
                pa[jn >> 1][(jn & 1) * 2] = pack2(p00, p01);
                pa[jn >> 1][(jn & 1) * 2 + 1] = pack2(p10, p11);
            }
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < BQ / 16; ++kk) wg_rs_t<D>(av, pa[kk], desc_n<BQ>(sdO + st * TQ, kk));
            wg_commit();
            wg_wait<1>();  // dPᵀ is done; dV may still run
            reg_fence(dp);
            unsigned da[BQ / 16][4];
#pragma unroll
            for (int jn = 0; jn < BQ / 8; ++jn) {
                float2 Dv = *(const float2*)(Ds + 8 * jn + 2 * t);
                float d00 = s[4 * jn] * (dp[4 * jn] - Dv.x), d01 = s[4 * jn + 1] * (dp[4 * jn + 1] - Dv.y);
                float d10 = s[4 * jn + 2] * (dp[4 * jn + 2] - Dv.x), d11 = s[4 * jn + 3] * (dp[4 * jn + 3] - Dv.y);
                da[jn >> 1][(jn & 1) * 2] = pack2(d00, d01);
                da[jn >> 1][(jn & 1) * 2 + 1] = pack2(d10, d11);
            }
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < BQ / 16; ++kk) wg_rs_t<D>(ak, da[kk], desc_n<BQ>(sQ + st * TQ, kk));
            wg_commit();
            wg_wait<0>();
            reg_fence(av);
            reg_fence(ak);
            if (lane == 0) mbar_arrive(empty(st));
        }
        if (j0 < S) {
            long long o = ((sb + j0) * Hkv + hk) * D;
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
                *(unsigned*)(dk + o + 8 * i + 2 * t) = pack2(ak[4 * i] * scale, ak[4 * i + 1] * scale);
                *(unsigned*)(dv + o + 8 * i + 2 * t) = pack2(av[4 * i], av[4 * i + 1]);
            }
        }
        if (j1 < S) {
            long long o = ((sb + j1) * Hkv + hk) * D;
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
                *(unsigned*)(dk + o + 8 * i + 2 * t) = pack2(ak[4 * i + 2] * scale, ak[4 * i + 3] * scale);
                *(unsigned*)(dv + o + 8 * i + 2 * t) = pack2(av[4 * i + 2], av[4 * i + 3]);
            }
        }
    }
}

#define ATTN_TC(DN)                                                                                       \
    extern "C" __global__ void __launch_bounds__(384, 1) attn_fwd_tc_d##DN(                               \
        const __grid_constant__ TmaMap tq, const __grid_constant__ TmaMap tk,                             \
        const __grid_constant__ TmaMap tv, const unsigned* seg, bf16* out, float* lse, int S, int Hq,     \
        int Hkv, int D, float scale) {                                                                    \
        fwd_tc<DN, 3>(&tq, &tk, &tv, seg, out, lse, S, Hq, Hkv, scale);                                   \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(384, 1) attn_bwd_dq_tc_d##DN(                            \
        const __grid_constant__ TmaMap tq, const __grid_constant__ TmaMap tk,                             \
        const __grid_constant__ TmaMap tv, const __grid_constant__ TmaMap tdo, const unsigned* seg,       \
        const float* lse, const float* Dd, bf16* dq, int S, int Hq, int Hkv, int D, float scale) {        \
        dq_tc<DN, 128, 2>(&tq, &tk, &tv, &tdo, seg, lse, Dd, dq, S, Hq, Hkv, scale);                      \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(384, 1) attn_bwd_dkdv_tc_d##DN(                          \
        const __grid_constant__ TmaMap tq, const __grid_constant__ TmaMap tk,                             \
        const __grid_constant__ TmaMap tv, const __grid_constant__ TmaMap tdo, const unsigned* seg,       \
        const float* lse, const float* Dd, bf16* dk, bf16* dv, int S, int Hq, int Hkv, int D,             \
        float scale) {                                                                                    \
        dkdv_tc<DN, 2>(&tq, &tk, &tv, &tdo, seg, lse, Dd, dk, dv, S, Hq, Hkv, scale);                     \
    }

ATTN_TC(64)
ATTN_TC(128)

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
