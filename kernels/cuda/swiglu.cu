// SwiGLU: h = silu(g)·u; backward dgate = dh·u·σ(g)·(1 + g·(1 − σ(g))), dup = dh·silu(g). n elements each.

#define SWIGLU(T, SFX)                                                                             \
    extern "C" __global__ void swiglu_fwd_##SFX(const T* __restrict__ g, const T* __restrict__ u,  \
                                                T* __restrict__ h, long long n) {                  \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;                \
             i += (long long)gridDim.x * blockDim.x) {                                             \
            float gv = to_f(g[i]);                                                                 \
            float sig = 1.0f / (1.0f + expf(-gv));                                                 \
            h[i] = from_f<T>(gv * sig * to_f(u[i]));                                               \
        }                                                                                          \
    }                                                                                              \
    extern "C" __global__ void swiglu_bwd_##SFX(const T* __restrict__ dh, const T* __restrict__ g, \
                                                const T* __restrict__ u, T* __restrict__ dg,       \
                                                T* __restrict__ du, long long n) {                 \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;                \
             i += (long long)gridDim.x * blockDim.x) {                                             \
            float gv = to_f(g[i]), d = to_f(dh[i]);                                                \
            float sig = 1.0f / (1.0f + expf(-gv));                                                 \
            float silu = gv * sig;                                                                 \
            dg[i] = from_f<T>(d * to_f(u[i]) * (sig + silu * (1.0f - sig)));                       \
            du[i] = from_f<T>(d * silu);                                                           \
        }                                                                                          \
    }
SWIGLU(float, f32)
SWIGLU(bf16, bf16)
