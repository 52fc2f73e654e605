// Rotate-half RoPE: x [tokens, heads, D], cos/sin [tokens, D/2] (f32). One thread per (token, head, i < D/2):
// y[i] = x[i]·c − sign·x[i+h]·s, y[i+h] = x[i+h]·c + sign·x[i]·s with sign = +1 forward, −1 backward.

template <typename T>
__device__ __forceinline__ void rope_impl(const T* __restrict__ x, const float* __restrict__ cs,
                                          const float* __restrict__ sn, T* __restrict__ y,
                                          long long tokens, int heads, int d, float sign) {
    int h = d / 2;
    long long n = tokens * heads * h;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        int i = (int)(e % h);
        long long th = e / h;  // token·heads + head
        long long t = th / heads;
        float c = cs[t * h + i], s = sign * sn[t * h + i];
        const T* xr = x + th * d;
        float x1 = to_f(xr[i]), x2 = to_f(xr[i + h]);
        T* yr = y + th * d;
        yr[i] = from_f<T>(x1 * c - x2 * s);
        yr[i + h] = from_f<T>(x2 * c + x1 * s);
    }
}

#define ROPE(T, SFX)                                                                               \
    extern "C" __global__ void rope_##SFX(const T* x, const float* cs, const float* sn, T* y,      \
                                          long long tokens, int heads, int d, float sign) {        \
        rope_impl<T>(x, cs, sn, y, tokens, heads, d, sign);                                        \
    }
ROPE(float, f32)
ROPE(bf16, bf16)
