// MoE token un-permutation (the permutation itself is a row gather: embedding_fwd with ids = row_token).
//
// yp [tokens·k, H] (expert-grouped rows), w [tokens·k] (f32, slot order t·k + j), slot_row [tokens·k] (u32).
// Forward: y[t, c] = Σ_j w[t·k + j] · yp[slot_row[t·k + j], c] (one thread per (t, c), f32 accumulation).
// Backward, one warp per slot s = t·k + j with r = slot_row[s]:
//   dyp[r, c] = w[s] · dy[t, c];  dw[s] = Σ_c dy[t, c] · yp[r, c].

#define MOE(T, SFX)                                                                                \
    extern "C" __global__ void moe_unpermute_##SFX(const T* __restrict__ yp,                       \
                                                   const float* __restrict__ w,                    \
                                                   const unsigned* __restrict__ slot_row,          \
                                                   T* __restrict__ y, long long tokens, int k,     \
                                                   long long H) {                                  \
        long long n = tokens * H;                                                                  \
        for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;                \
             e += (long long)gridDim.x * blockDim.x) {                                             \
            long long t = e / H, c = e % H;                                                        \
            float acc = 0.0f;                                                                      \
            for (int j = 0; j < k; ++j) {                                                          \
                long long s = t * k + j;                                                           \
                acc += w[s] * to_f(yp[(long long)slot_row[s] * H + c]);                            \
            }                                                                                      \
            y[e] = from_f<T>(acc);                                                                 \
        }                                                                                          \
    }                                                                                              \
    extern "C" __global__ void moe_unpermute_bwd_##SFX(                                            \
        const T* __restrict__ dy, const T* __restrict__ yp, const float* __restrict__ w,           \
        const unsigned* __restrict__ slot_row, T* __restrict__ dyp, float* __restrict__ dw,        \
        long long tokens, int k, long long H) {                                                    \
        long long slots = tokens * k;                                                              \
        long long wpb = blockDim.x >> 5;                                                           \
        int lane = threadIdx.x & 31;                                                               \
        for (long long s = blockIdx.x * wpb + (threadIdx.x >> 5); s < slots;                       \
             s += gridDim.x * wpb) {                                                               \
            long long t = s / k, r = slot_row[s];                                                  \
            float ws = w[s], dot = 0.0f;                                                           \
            for (long long c = lane; c < H; c += 32) {                                             \
                float d = to_f(dy[t * H + c]);                                                     \
                dyp[r * H + c] = from_f<T>(ws * d);                                                \
                dot += d * to_f(yp[r * H + c]);                                                    \
            }                                                                                      \
            dot = warp_sum(dot);                                                                   \
            if (lane == 0) dw[s] = dot;                                                            \
        }                                                                                          \
    }
MOE(float, f32)
MOE(bf16, bf16)
