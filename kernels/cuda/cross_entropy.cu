// Weighted cross-entropy, forward and backward in one pass: logits [tokens, vocab], targets [tokens] (u32,
// < vocab, checked by the host), weights [tokens] (f32).
//
// One block (blockDim a multiple of 32) per token row. ce[t] = logsumexp(logits_t) − logits_t[target_t]
// (f32). When `dlogits` is not null, dlogits_t[v] = (w_t/denom)·(softmax(logits_t)[v] − [v = target_t]).

template <typename T>
__device__ __forceinline__ void ce_impl(const T* __restrict__ logits, const unsigned int* __restrict__ tg,
                                        const float* __restrict__ w, float* __restrict__ ce,
                                        T* __restrict__ dl, long long vocab, float inv_denom) {
    __shared__ float scratch[32];
    long long t = blockIdx.x;
    const T* row = logits + t * vocab;
    float m = -INFINITY, s = 0.0f;
    for (long long v = threadIdx.x; v < vocab; v += blockDim.x) {
        float x = to_f(row[v]);
        if (x > m) {
            s = s * expf(m - x) + 1.0f;
            m = x;
        } else {
            s += expf(x - m);
        }
    }
    float mb = block_max(m, scratch);
    float sb = block_sum(m == -INFINITY ? 0.0f : s * expf(m - mb), scratch);
    float lse = mb + logf(sb);
    unsigned int target = tg[t];
    if (threadIdx.x == 0) ce[t] = lse - to_f(row[target]);
    if (dl != nullptr) {
        float coef = w[t] * inv_denom;
        T* drow = dl + t * vocab;
        for (long long v = threadIdx.x; v < vocab; v += blockDim.x) {
            float p = expf(to_f(row[v]) - lse);
            drow[v] = from_f<T>(coef * (p - (v == (long long)target ? 1.0f : 0.0f)));
        }
    }
}

#define CE(T, SFX)                                                                                 \
    extern "C" __global__ void cross_entropy_##SFX(const T* logits, const unsigned int* tg,        \
                                                   const float* w, float* ce, T* dl,               \
                                                   long long vocab, float inv_denom) {             \
        ce_impl<T>(logits, tg, w, ce, dl, vocab, inv_denom);                                       \
    }
CE(float, f32)
CE(bf16, bf16)

// Vocab-parallel cross-entropy (tensor parallelism): this rank holds the column block [tokens, vocab_local] of the
// logits. `tg[t]` is the target's local column, or 0xFFFFFFFF when another rank owns it.
//
// vp_ce_stats: one block per row, out[t] = m_t = max_v x_tv, out[rows + t] = Σ_v exp(x_tv − m_t),
// out[2·rows + t] = x_t[tg_t] when this rank owns the target, else 0. The caller combines the ranks' rows:
// M = max_i m_i, S = Σ_i s_i·exp(m_i − M), lse = M + log S.
template <typename T>
__device__ __forceinline__ void vp_stats_impl(const T* __restrict__ logits, const unsigned int* __restrict__ tg,
                                              float* __restrict__ out, long long rows, long long vocab) {
    __shared__ float scratch[32];
    long long t = blockIdx.x;
    const T* row = logits + t * vocab;
    float m = -INFINITY, s = 0.0f;
    for (long long v = threadIdx.x; v < vocab; v += blockDim.x) {
        float x = to_f(row[v]);
        if (x > m) {
            s = s * expf(m - x) + 1.0f;
            m = x;
        } else {
            s += expf(x - m);
        }
    }
    float mb = block_max(m, scratch);
    float sb = block_sum(m == -INFINITY ? 0.0f : s * expf(m - mb), scratch);
    if (threadIdx.x == 0) {
        unsigned int target = tg[t];
        out[t] = mb;
        out[rows + t] = sb;
        out[2 * rows + t] = (long long)target < vocab ? to_f(row[target]) : 0.0f;
    }
}

// vp_ce_grad: dl_tv = coef_t·(exp(x_tv − lse_t) − [v = tg_t]) with the global lse and coef_t = w_t / denom.
template <typename T>
__device__ __forceinline__ void vp_grad_impl(const T* __restrict__ logits, const unsigned int* __restrict__ tg,
                                             const float* __restrict__ lse, const float* __restrict__ coef,
                                             T* __restrict__ dl, long long vocab) {
    long long t = blockIdx.x;
    const T* row = logits + t * vocab;
    T* drow = dl + t * vocab;
    float c = coef[t], l = lse[t];
    long long target = (long long)tg[t];
    for (long long v = threadIdx.x; v < vocab; v += blockDim.x) {
        float p = c == 0.0f ? 0.0f : expf(to_f(row[v]) - l);
        drow[v] = from_f<T>(c * (p - (v == target ? 1.0f : 0.0f)));
    }
}

#define VPCE(T, SFX)                                                                                     \
    extern "C" __global__ void vp_ce_stats_##SFX(const T* logits, const unsigned int* tg, float* out,    \
                                                 long long rows, long long vocab) {                      \
        vp_stats_impl<T>(logits, tg, out, rows, vocab);                                                  \
    }                                                                                                    \
    extern "C" __global__ void vp_ce_grad_##SFX(const T* logits, const unsigned int* tg, const float* lse, \
                                                const float* coef, T* dl, long long vocab) {             \
        vp_grad_impl<T>(logits, tg, lse, coef, dl, vocab);                                               \
    }
VPCE(float, f32)
VPCE(bf16, bf16)
