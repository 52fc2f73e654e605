// RMSNorm over the last dim (hidden-size norms and per-head q/k norms alike): x [rows, d], w [d].
//
// Forward: one warp per row; rstd = 1/sqrt(mean(x²) + eps), y = w·x·rstd (f32 math, one rounding to T).
// Backward: g = dy·w, x̂ = x·rstd, dx = rstd·(g − x̂·mean(g·x̂)); dw = Σ_rows dy·x̂ accumulated per block in
// shared memory (d floats of dynamic shared memory), then added to the f32 `dw` (which the host zeroes first)
// with one atomic per column per block. Launch: blockDim 256 (8 warps), any grid (rows are grid-strided).

template <typename T>
__device__ __forceinline__ void rmsnorm_fwd_impl(const T* __restrict__ x, const T* __restrict__ w,
                                                 T* __restrict__ y, float* __restrict__ rstd,
                                                 long long rows, int d, float eps) {
    int lane = threadIdx.x & 31;
    long long wpb = blockDim.x >> 5;
    for (long long row = blockIdx.x * wpb + (threadIdx.x >> 5); row < rows; row += gridDim.x * wpb) {
        const T* xr = x + row * d;
        float ss = 0.0f;
        for (int i = lane; i < d; i += 32) {
            float v = to_f(xr[i]);
            ss += v * v;
        }
        ss = warp_sum(ss);
        float r = 1.0f / sqrtf(ss / (float)d + eps);
        T* yr = y + row * d;
        for (int i = lane; i < d; i += 32) yr[i] = from_f<T>(to_f(w[i]) * (to_f(xr[i]) * r));
        if (lane == 0) rstd[row] = r;
    }
}

template <typename T>
__device__ __forceinline__ void rmsnorm_bwd_impl(const T* __restrict__ dy, const T* __restrict__ x,
                                                 const T* __restrict__ w, const float* __restrict__ rstd,
                                                 T* __restrict__ dx, float* __restrict__ dw,
                                                 long long rows, int d) {
    extern __shared__ float dwp[];
    for (int i = threadIdx.x; i < d; i += blockDim.x) dwp[i] = 0.0f;
    __syncthreads();
    int lane = threadIdx.x & 31;
    long long wpb = blockDim.x >> 5;
    for (long long row = blockIdx.x * wpb + (threadIdx.x >> 5); row < rows; row += gridDim.x * wpb) {
        const T* xr = x + row * d;
        const T* dyr = dy + row * d;
        float r = rstd[row];
        float acc = 0.0f;
        for (int i = lane; i < d; i += 32) {
            float dyv = to_f(dyr[i]);
            float xh = to_f(xr[i]) * r;
            acc += dyv * to_f(w[i]) * xh;
            atomicAdd(&dwp[i], dyv * xh);
        }
        float m = warp_sum(acc) / (float)d;
        T* dxr = dx + row * d;
        for (int i = lane; i < d; i += 32) {
            float xh = to_f(xr[i]) * r;
            float g = to_f(dyr[i]) * to_f(w[i]);
            dxr[i] = from_f<T>(r * (g - xh * m));
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < d; i += blockDim.x) atomicAdd(&dw[i], dwp[i]);
}

#define RMSNORM(T, SFX)                                                                            \
    extern "C" __global__ void rmsnorm_fwd_##SFX(const T* x, const T* w, T* y, float* rstd,        \
                                                 long long rows, int d, float eps) {               \
        rmsnorm_fwd_impl<T>(x, w, y, rstd, rows, d, eps);                                          \
    }                                                                                              \
    extern "C" __global__ void rmsnorm_bwd_##SFX(const T* dy, const T* x, const T* w,              \
                                                 const float* rstd, T* dx, float* dw,              \
                                                 long long rows, int d) {                          \
        rmsnorm_bwd_impl<T>(dy, x, w, rstd, dx, dw, rows, d);                                      \
    }
RMSNORM(float, f32)
RMSNORM(bf16, bf16)
