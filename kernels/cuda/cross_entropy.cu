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
