// Embedding: ids [tokens] (u32, < vocab, checked by the host), table [vocab, hidden].
// Forward: x[t, c] = table[ids[t], c]. Backward: dtable[ids[t], c] += dx[t, c] with f32 atomics into a
// zeroed f32 dtable (summation order across repeated ids is not deterministic).

#define EMBEDDING(T, SFX)                                                                          \
    extern "C" __global__ void embedding_fwd_##SFX(const unsigned int* __restrict__ ids,           \
                                                   const T* __restrict__ table, T* __restrict__ x, \
                                                   long long tokens, long long hidden) {           \
        long long n = tokens * hidden;                                                             \
        for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;                \
             e += (long long)gridDim.x * blockDim.x) {                                             \
            long long t = e / hidden, c = e % hidden;                                              \
            x[e] = table[(long long)ids[t] * hidden + c];                                          \
        }                                                                                          \
    }                                                                                              \
    extern "C" __global__ void embedding_bwd_##SFX(const unsigned int* __restrict__ ids,           \
                                                   const T* __restrict__ dx,                       \
                                                   float* __restrict__ dtable, long long tokens,   \
                                                   long long hidden) {                             \
        long long n = tokens * hidden;                                                             \
        for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;                \
             e += (long long)gridDim.x * blockDim.x) {                                             \
            long long t = e / hidden, c = e % hidden;                                              \
            atomicAdd(&dtable[(long long)ids[t] * hidden + c], to_f(dx[e]));                       \
        }                                                                                          \
    }
EMBEDDING(float, f32)
EMBEDDING(bf16, bf16)
