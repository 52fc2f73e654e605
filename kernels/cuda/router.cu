// MoE router (softmax, top-k, renormalisation), its backward, the aux-loss statistics and the device side of the
// MoE permutation plan. Maths and tie rule: kernels/src/ops/router.rs and kernels/src/ops/moe.rs.
//
// router_fwd_{f32,bf16}: one warp per token row r of logits [T, E] (T, E any size):
//   m = max_c x[c];  probs[r, c] = exp(x[c] − m) / Σ_c exp(x[c] − m)   (f32, division as the CPU reference);
//   top-k by repeated arg-max over the row's probabilities in the strict order "higher probability first,
//   equal probabilities → lower expert index first": the j-th pick is the best element strictly after the
//   (j−1)-th pick in that order, so nothing needs marking and k may be anything in 1..=E;
//   topk_idx[r, j] (u32), topk_weight[r, j] = p[idx_j] (÷ Σ_j p[idx_j], summed in pick order, when norm).
//   NaN probabilities are never picked; a row with fewer than k non-NaN entries gets index 0xffffffff in the
//   missing slots (moe_plan rejects it).
// router_bwd: one warp per row, all f32; d_probs may be a null pointer (zeros):
//   dp = d_probs[r];  dp[idx_j] += norm ? (dw_j − Σ_i dw_i·w_i) / Σ_i p[idx_i] : dw_j   (sequential over j, so
//   repeated indices accumulate);  dlogits[r, c] = p[c]·(dp[c] − Σ_e p[e]·dp[e]). dlogits holds dp meanwhile.
//   Indices ≥ E are skipped (never an out-of-bounds write).
// expert_counts: counts[e] += #{slots s : idx[s] == e} for idx [slots] (u32); counts [E+1] (u32, zeroed by the
//   caller), counts[E] counts out-of-range indices. Integer atomics, so the result is deterministic.
// prob_colsum: out[e] = Σ_r probs[r, e] (f32), one block per expert column (deterministic tree order).
// bcast_rows: out[r, c] = row[c] for out [T, E] (f32).
// moe_plan_rows: stable counting sort of the slots s = t·k + j by expert idx[s], one block per expert e:
//   row = offsets[e] + #{s' < s : idx[s'] == e};  row_token[row] = s / k, slot_row[s] = row, row_slot[row] = s.
//   offsets [E+1] (u32) are the exclusive prefix sums of expert_counts (the host computes them).

#define ROUTER_NONE 0xffffffffu

// (v, i) comes before (bv, bi) in the selection order.
__device__ __forceinline__ bool router_before(float v, unsigned i, float bv, unsigned bi) {
    return v > bv || (v == bv && i < bi);
}

template <typename T>
__device__ __forceinline__ void router_fwd_row(const T* __restrict__ x, float* __restrict__ p,
                                               unsigned* __restrict__ idx, float* __restrict__ w, int E,
                                               int k, int norm, int lane) {
    float m = -INFINITY;
    for (int c = lane; c < E; c += 32) m = fmaxf(m, to_f(x[c]));
    m = warp_max(m);
    float s = 0.0f;
    for (int c = lane; c < E; c += 32) {
        float v = expf(to_f(x[c]) - m);
        p[c] = v;
        s += v;
    }
    s = warp_sum(s);
    // Each lane only re-reads the columns it wrote itself.
    for (int c = lane; c < E; c += 32) p[c] = p[c] / s;

    float prev_p = INFINITY, tot = 0.0f;
    unsigned prev_i = 0;
    bool first = true;
    for (int j = 0; j < k; ++j) {
        float bp = -INFINITY;
        unsigned bi = ROUTER_NONE;
        for (int c = lane; c < E; c += 32) {
            float v = p[c];
            bool after = first || router_before(prev_p, prev_i, v, (unsigned)c);
            if (after && router_before(v, (unsigned)c, bp, bi)) {
                bp = v;
                bi = (unsigned)c;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bp, o);
            unsigned oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (router_before(ov, oi, bp, bi)) {
                bp = ov;
                bi = oi;
            }
        }
        if (lane == 0) {
            idx[j] = bi;
            w[j] = bp;
        }
        tot += bp;
        prev_p = bp;
        prev_i = bi;
        first = false;
    }
    if (norm) {
        __syncwarp();  // lane 0's writes of w are visible to the whole warp after this
        for (int j = lane; j < k; j += 32) w[j] = w[j] / tot;
    }
}

#define ROUTER_FWD(T, SFX)                                                                         \
    extern "C" __global__ void router_fwd_##SFX(const T* __restrict__ logits,                      \
                                                float* __restrict__ probs,                         \
                                                unsigned* __restrict__ topk_idx,                   \
                                                float* __restrict__ topk_w, long long tokens,      \
                                                int E, int k, int norm) {                          \
        long long wpb = blockDim.x >> 5;                                                           \
        int lane = threadIdx.x & 31;                                                               \
        for (long long r = blockIdx.x * wpb + (threadIdx.x >> 5); r < tokens;                      \
             r += gridDim.x * wpb) {                                                               \
            router_fwd_row<T>(logits + r * E, probs + r * E, topk_idx + r * k, topk_w + r * k, E,  \
                              k, norm, lane);                                                      \
        }                                                                                          \
    }
ROUTER_FWD(float, f32)
ROUTER_FWD(bf16, bf16)

extern "C" __global__ void router_bwd(const float* __restrict__ probs, const unsigned* __restrict__ topk_idx,
                                      const float* __restrict__ topk_w, const float* __restrict__ dw,
                                      const float* __restrict__ dprobs, float* __restrict__ dl,
                                      long long tokens, int E, int k, int norm) {
    long long wpb = blockDim.x >> 5;
    int lane = threadIdx.x & 31;
    for (long long r = blockIdx.x * wpb + (threadIdx.x >> 5); r < tokens; r += gridDim.x * wpb) {
        const float* p = probs + r * E;
        const unsigned* ir = topk_idx + r * k;
        const float* wr = topk_w + r * k;
        const float* dwr = dw + r * k;
        float* d = dl + r * E;
        for (int c = lane; c < E; c += 32) d[c] = dprobs ? dprobs[r * E + c] : 0.0f;
        float S = 0.0f, C = 0.0f;
        for (int j = lane; j < k; j += 32) {
            unsigned i = ir[j];
            if (i < (unsigned)E) S += p[i];
            C += dwr[j] * wr[j];
        }
        S = warp_sum(S);
        C = warp_sum(C);
        __syncwarp();
        if (lane == 0) {
            for (int j = 0; j < k; ++j) {
                unsigned i = ir[j];
                if (i < (unsigned)E) d[i] += norm ? (dwr[j] - C) / S : dwr[j];
            }
        }
        __syncwarp();
        float dot = 0.0f;
        for (int c = lane; c < E; c += 32) dot += p[c] * d[c];
        dot = warp_sum(dot);
        for (int c = lane; c < E; c += 32) d[c] = p[c] * (d[c] - dot);
    }
}

extern "C" __global__ void expert_counts(const unsigned* __restrict__ idx, unsigned* __restrict__ counts,
                                         long long slots, int E) {
    for (long long s = blockIdx.x * (long long)blockDim.x + threadIdx.x; s < slots;
         s += (long long)gridDim.x * blockDim.x) {
        unsigned e = idx[s];
        atomicAdd(&counts[e < (unsigned)E ? e : (unsigned)E], 1u);
    }
}

extern "C" __global__ void prob_colsum(const float* __restrict__ probs, float* __restrict__ out,
                                       long long tokens, int E) {
    __shared__ float scratch[32];
    for (int e = blockIdx.x; e < E; e += gridDim.x) {
        float acc = 0.0f;
        for (long long r = threadIdx.x; r < tokens; r += blockDim.x) acc += probs[r * E + e];
        acc = block_sum(acc, scratch);
        if (threadIdx.x == 0) out[e] = acc;
    }
}

extern "C" __global__ void bcast_rows(const float* __restrict__ row, float* __restrict__ out, long long tokens,
                                      int E) {
    long long n = tokens * E;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = row[i % E];
}

// Items per thread of moe_plan_rows: each thread owns ROUTER_ITEMS consecutive slots of a chunk.
#define ROUTER_ITEMS 4

extern "C" __global__ void moe_plan_rows(const unsigned* __restrict__ idx, const unsigned* __restrict__ offsets,
                                         unsigned* __restrict__ row_token, unsigned* __restrict__ slot_row,
                                         unsigned* __restrict__ row_slot, long long slots, int k, int E) {
    __shared__ unsigned warp_tot[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    long long chunk = (long long)blockDim.x * ROUTER_ITEMS;
    for (int e = blockIdx.x; e < E; e += gridDim.x) {
        unsigned base = offsets[e];
        for (long long c0 = 0; c0 < slots; c0 += chunk) {
            long long s0 = c0 + (long long)threadIdx.x * ROUTER_ITEMS;
            unsigned cnt = 0;
#pragma unroll
            for (int q = 0; q < ROUTER_ITEMS; ++q)
                cnt += (s0 + q < slots && idx[s0 + q] == (unsigned)e) ? 1u : 0u;
            // Inclusive scan of cnt over the warp, then over the warps of the block.
            unsigned inc = cnt;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                unsigned v = __shfl_up_sync(0xffffffffu, inc, o);
                if (lane >= o) inc += v;
            }
            if (lane == 31) warp_tot[warp] = inc;
            __syncthreads();
            unsigned before = 0, total = 0;
            for (int w = 0; w < nw; ++w) {
                unsigned t = warp_tot[w];
                if (w < warp) before += t;
                total += t;
            }
            unsigned row = base + before + inc - cnt;
#pragma unroll
            for (int q = 0; q < ROUTER_ITEMS; ++q) {
                long long s = s0 + q;
                if (s < slots && idx[s] == (unsigned)e) {
                    row_token[row] = (unsigned)(s / k);
                    slot_row[s] = row;
                    row_slot[row] = (unsigned)s;
                    ++row;
                }
            }
            base += total;
            __syncthreads();  // warp_tot is rewritten by the next chunk
        }
    }
}
