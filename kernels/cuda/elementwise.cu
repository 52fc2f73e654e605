// Elementwise arithmetic, casts, strided copies and column sums.
//
// - add/sub/mul: out[i] = a[i] (op) b[i], n elements, same dtype.
// - scale: out[i] = s·a[i].
// - cast_<from>_<to>: out[i] = (to) in[i] (bf16 rounds to nearest even).
// - copy_strided_<bytes>: for every index tuple `idx` of `shape[0..rank]` (rank ≤ 6),
//   dst[dst_off + Σ idx_k·dst_st_k] = src[src_off + Σ idx_k·src_st_k]; serves transpose, narrow and cat.
// - sum_rows: out[c] = Σ_r in[r, c] for in [rows, cols] (f32 accumulation).

#define BINARY(NAME, T, SFX, EXPR)                                                                  \
    extern "C" __global__ void NAME##_##SFX(const T* __restrict__ a, const T* __restrict__ b,      \
                                            T* __restrict__ out, long long n) {                    \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;                \
             i += (long long)gridDim.x * blockDim.x) {                                             \
            float x = to_f(a[i]), y = to_f(b[i]);                                                  \
            out[i] = from_f<T>(EXPR);                                                              \
        }                                                                                          \
    }

BINARY(add, float, f32, x + y)
BINARY(add, bf16, bf16, x + y)
BINARY(sub, float, f32, x - y)
BINARY(sub, bf16, bf16, x - y)
BINARY(mul, float, f32, x * y)
BINARY(mul, bf16, bf16, x * y)

#define SCALE(T, SFX)                                                                              \
    extern "C" __global__ void scale_##SFX(const T* __restrict__ a, T* __restrict__ out, float s,  \
                                           long long n) {                                          \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;                \
             i += (long long)gridDim.x * blockDim.x)                                               \
            out[i] = from_f<T>(s * to_f(a[i]));                                                    \
    }
SCALE(float, f32)
SCALE(bf16, bf16)

#define CAST(FROM, TO, NAME)                                                                       \
    extern "C" __global__ void NAME(const FROM* __restrict__ in, TO* __restrict__ out, long long n) { \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;                \
             i += (long long)gridDim.x * blockDim.x)                                               \
            out[i] = from_f<TO>(to_f(in[i]));                                                      \
    }
CAST(float, bf16, cast_f32_bf16)
CAST(bf16, float, cast_bf16_f32)
CAST(unsigned int, float, cast_u32_f32)
CAST(unsigned int, bf16, cast_u32_bf16)

struct Strides6 {
    long long shape[6];
    long long src[6];
    long long dst[6];
};

#define COPY_STRIDED(T, BYTES)                                                                     \
    extern "C" __global__ void copy_strided_##BYTES(const T* __restrict__ src, T* __restrict__ dst, \
                                                    Strides6 st, int rank, long long src_off,      \
                                                    long long dst_off, long long n) {              \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;                \
             i += (long long)gridDim.x * blockDim.x) {                                             \
            long long rem = i, so = src_off, d = dst_off;                                          \
            for (int k = rank - 1; k >= 0; --k) {                                                  \
                long long idx = rem % st.shape[k];                                                 \
                rem /= st.shape[k];                                                                \
                so += idx * st.src[k];                                                             \
                d += idx * st.dst[k];                                                              \
            }                                                                                      \
            dst[d] = src[so];                                                                      \
        }                                                                                          \
    }
COPY_STRIDED(unsigned short, 2)
COPY_STRIDED(unsigned int, 4)

#define SUM_ROWS(T, SFX)                                                                           \
    extern "C" __global__ void sum_rows_##SFX(const T* __restrict__ in, T* __restrict__ out,       \
                                              long long rows, long long cols) {                    \
        for (long long c = blockIdx.x * (long long)blockDim.x + threadIdx.x; c < cols;             \
             c += (long long)gridDim.x * blockDim.x) {                                             \
            float acc = 0.0f;                                                                      \
            for (long long r = 0; r < rows; ++r) acc += to_f(in[r * cols + c]);                    \
            out[c] = from_f<T>(acc);                                                               \
        }                                                                                          \
    }
SUM_ROWS(float, f32)
SUM_ROWS(bf16, bf16)
