// Optimizer kernels (see src/ops/adamw.rs for the maths and its invariants).
//
// - adamw_f32 / adamw_bf16: one fused AdamW step of one parameter of n elements: reads master, grad, exp_avg,
//   exp_avg_sq (f32), writes the new master, moments (f32) and the weights in the suffix dtype. Output buffers
//   may alias the inputs element for element (each element is read before it is written by the same thread).
// - sum_squares_f32 / sum_squares_bf16: out[0] += Σ x[i]² (f32 within a block, one f64 atomicAdd per block).

#define ADAMW(T, SFX)                                                                              \
    extern "C" __global__ void adamw_##SFX(                                                        \
        const float* __restrict__ master, const float* __restrict__ grad,                          \
        const float* __restrict__ exp_avg, const float* __restrict__ exp_avg_sq,                   \
        float* __restrict__ master_out, float* __restrict__ exp_avg_out,                           \
        float* __restrict__ exp_avg_sq_out, T* __restrict__ weight_out, float decay,               \
        float one_minus_beta1, float beta2, float one_minus_beta2, float neg_step_size,            \
        float bias2_sqrt, float eps, float grad_scale, long long n) {                              \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;                \
             i += (long long)gridDim.x * blockDim.x) {                                             \
            float g = grad_scale == 1.0f ? grad[i] : grad[i] * grad_scale;                         \
            float p = master[i] * decay;                                                         \
            float m = exp_avg[i] + one_minus_beta1 * (g - exp_avg[i]);                           \
            float v = exp_avg_sq[i] * beta2 + one_minus_beta2 * g * g;                         \
            float denom = sqrtf(v) / bias2_sqrt + eps;                                         \
            p = p + neg_step_size * m / denom;                                                   \
            master_out[i] = p;                                                                     \
            exp_avg_out[i] = m;                                                                    \
            exp_avg_sq_out[i] = v;                                                                 \
            weight_out[i] = from_f<T>(p);                                                          \
        }                                                                                          \
    }
ADAMW(float, f32)
ADAMW(bf16, bf16)

#define SUM_SQUARES(T, SFX)                                                                        \
    extern "C" __global__ void sum_squares_##SFX(const T* __restrict__ x, double* out,             \
                                                 long long n) {                                    \
        __shared__ float scratch[32];                                                              \
        float acc = 0.0f;                                                                          \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;                \
             i += (long long)gridDim.x * blockDim.x) {                                             \
            float v = to_f(x[i]);                                                                  \
            acc += v * v;                                                                          \
        }                                                                                          \
        acc = block_sum(acc, scratch);                                                             \
        if (threadIdx.x == 0) atomicAdd(out, (double)acc);                                         \
    }
SUM_SQUARES(float, f32)
SUM_SQUARES(bf16, bf16)
