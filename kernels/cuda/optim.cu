// Optimizer kernels (see src/ops/adamw.rs for the maths and its invariants).
//
// - adamw_f32 / adamw_bf16: one fused AdamW step of one parameter of n elements: reads master, grad, exp_avg,
//   exp_avg_sq (f32), writes the new master, moments (f32) and the weights in the suffix dtype. Output buffers
//   may alias the inputs element for element (each element is read before it is written by the same thread).
// - adamw_multi: the same step for a list of parameters in one launch, in place. `tensors` holds one
//   AdamWTensor descriptor per parameter, `chunks` one entry per block: (tensor index, chunk number) packed as
//   index | chunk << 32; block b updates elements [chunk·chunk_elems, min((chunk+1)·chunk_elems, n)) of that
//   tensor. Masters and moments are f32 and updated in place; the grad is f32 or bf16 and the weight f32 or bf16
//   (flags), the weight write is skipped when the weight is the master's own buffer (ADAMW_WEIGHT_IS_MASTER).
//   The host guarantees every written buffer is distinct from every other buffer of the call, so each element
//   is read and written by one thread only.
// - sum_squares_f32 / sum_squares_bf16: out[0] += Σ x[i]² (f32 within a block, one f64 atomicAdd per block).
//
// Both AdamW kernels call adamw_elem, so they run the same float operations in the same order and agree bit
// for bit (the multi-tensor step is checked against the per-tensor one by `qcluster-gpu-bench optim-parity`).

struct AdamWOut3 {
    float p, m, v;
};

__device__ __forceinline__ AdamWOut3 adamw_elem(float grad, float master, float exp_avg, float exp_avg_sq,
                                                float decay, float one_minus_beta1, float beta2,
                                                float one_minus_beta2, float neg_step_size, float bias2_sqrt,
                                                float eps, float grad_scale) {
    float g = grad_scale == 1.0f ? grad : grad * grad_scale;
    float p = master * decay;
    float m = exp_avg + one_minus_beta1 * (g - exp_avg);
    float v = exp_avg_sq * beta2 + one_minus_beta2 * g * g;
    float denom = sqrtf(v) / bias2_sqrt + eps;
    p = p + neg_step_size * m / denom;
    AdamWOut3 r;
    r.p = p;
    r.m = m;
    r.v = v;
    return r;
}

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
            AdamWOut3 r = adamw_elem(grad[i], master[i], exp_avg[i], exp_avg_sq[i], decay,         \
                                     one_minus_beta1, beta2, one_minus_beta2, neg_step_size,       \
                                     bias2_sqrt, eps, grad_scale);                                 \
            master_out[i] = r.p;                                                                   \
            exp_avg_out[i] = r.m;                                                                  \
            exp_avg_sq_out[i] = r.v;                                                               \
            weight_out[i] = from_f<T>(r.p);                                                        \
        }                                                                                          \
    }
ADAMW(float, f32)
ADAMW(bf16, bf16)

// One parameter of adamw_multi; the host writes it as 7 little-endian u64 words (src/cuda/optim.rs).
struct AdamWTensor {
    unsigned long long master;      // f32 [n], updated in place
    unsigned long long grad;        // f32 or bf16 [n] (ADAMW_GRAD_BF16)
    unsigned long long exp_avg;     // f32 [n], updated in place
    unsigned long long exp_avg_sq;  // f32 [n], updated in place
    unsigned long long weight;      // f32 or bf16 [n] (ADAMW_WEIGHT_BF16), written; unused with ADAMW_WEIGHT_IS_MASTER
    long long n;                    // elements
    float decay;                    // 1 − lr·weight_decay of this parameter
    unsigned int flags;
};
static_assert(sizeof(AdamWTensor) == 56, "AdamWTensor layout is shared with the host");

#define ADAMW_GRAD_BF16 1u
#define ADAMW_WEIGHT_BF16 2u
#define ADAMW_WEIGHT_IS_MASTER 4u

template <typename G, typename W, bool WRITE_WEIGHT>
__device__ __forceinline__ void adamw_multi_range(const AdamWTensor& d, long long begin, long long end,
                                                  float one_minus_beta1, float beta2, float one_minus_beta2,
                                                  float neg_step_size, float bias2_sqrt, float eps,
                                                  float grad_scale) {
    float* master = reinterpret_cast<float*>(d.master);
    const G* grad = reinterpret_cast<const G*>(d.grad);
    float* exp_avg = reinterpret_cast<float*>(d.exp_avg);
    float* exp_avg_sq = reinterpret_cast<float*>(d.exp_avg_sq);
    W* weight = reinterpret_cast<W*>(d.weight);
    const float decay = d.decay;
    for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
        AdamWOut3 r = adamw_elem(to_f(grad[i]), master[i], exp_avg[i], exp_avg_sq[i], decay, one_minus_beta1,
                                 beta2, one_minus_beta2, neg_step_size, bias2_sqrt, eps, grad_scale);
        master[i] = r.p;
        exp_avg[i] = r.m;
        exp_avg_sq[i] = r.v;
        if (WRITE_WEIGHT) weight[i] = from_f<W>(r.p);
    }
}

template <typename G>
__device__ __forceinline__ void adamw_multi_grad(const AdamWTensor& d, long long begin, long long end,
                                                 float one_minus_beta1, float beta2, float one_minus_beta2,
                                                 float neg_step_size, float bias2_sqrt, float eps,
                                                 float grad_scale) {
    if (d.flags & ADAMW_WEIGHT_IS_MASTER) {
        adamw_multi_range<G, float, false>(d, begin, end, one_minus_beta1, beta2, one_minus_beta2,
                                           neg_step_size, bias2_sqrt, eps, grad_scale);
    } else if (d.flags & ADAMW_WEIGHT_BF16) {
        adamw_multi_range<G, bf16, true>(d, begin, end, one_minus_beta1, beta2, one_minus_beta2,
                                         neg_step_size, bias2_sqrt, eps, grad_scale);
    } else {
        adamw_multi_range<G, float, true>(d, begin, end, one_minus_beta1, beta2, one_minus_beta2,
                                          neg_step_size, bias2_sqrt, eps, grad_scale);
    }
}

extern "C" __global__ void adamw_multi(const AdamWTensor* __restrict__ tensors,
                                       const unsigned long long* __restrict__ chunks, long long chunk_elems,
                                       float one_minus_beta1, float beta2, float one_minus_beta2,
                                       float neg_step_size, float bias2_sqrt, float eps, float grad_scale) {
    const unsigned long long c = chunks[blockIdx.x];
    const AdamWTensor d = tensors[(unsigned int)(c & 0xffffffffull)];
    const long long begin = (long long)(c >> 32) * chunk_elems;
    const long long end = min(begin + chunk_elems, d.n);
    if (d.flags & ADAMW_GRAD_BF16) {
        adamw_multi_grad<bf16>(d, begin, end, one_minus_beta1, beta2, one_minus_beta2, neg_step_size,
                               bias2_sqrt, eps, grad_scale);
    } else {
        adamw_multi_grad<float>(d, begin, end, one_minus_beta1, beta2, one_minus_beta2, neg_step_size,
                                bias2_sqrt, eps, grad_scale);
    }
}

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
