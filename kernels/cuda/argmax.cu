// Greedy decoding on the device: the index of the largest value of every row (see kernels/src/ops/argmax.rs).
//
// One block per row, any block size that is a multiple of 32 (the host uses 1024). Each thread scans its strided
// columns in increasing order and keeps the first strict maximum; the block then reduces (value, index) pairs,
// preferring the larger value and, on a tie, the smaller index — so the result is the first index of the row's
// maximum, as the host's argmax. A row with no value above -inf (all -inf or NaN) gives 0.

// Butterfly reduction of (value, index) over the 32 lanes of a warp: every lane ends with the larger value, the
// smaller index on a tie.
__device__ __forceinline__ void warp_argmax(float& best, int& bi) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) {
            best = ov;
            bi = oi;
        }
    }
}

template <typename T>
__device__ __forceinline__ void argmax_row(const T* __restrict__ x, unsigned int* __restrict__ out, int cols) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const T* row = x + (long long)blockIdx.x * cols;
    float best = -INFINITY;
    int bi = cols;  // sentinel: nothing above -inf yet
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = to_f(row[c]);
        if (v > best) {
            best = v;
            bi = c;
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    warp_argmax(best, bi);
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        best = lane < nw ? sv[lane] : -INFINITY;
        bi = lane < nw ? si[lane] : cols;
        warp_argmax(best, bi);
        if (lane == 0) out[blockIdx.x] = bi >= cols ? 0u : (unsigned int)bi;
    }
}

extern "C" __global__ void argmax_rows_f32(const float* x, unsigned int* out, int cols) {
    argmax_row<float>(x, out, cols);
}

extern "C" __global__ void argmax_rows_bf16(const bf16* x, unsigned int* out, int cols) {
    argmax_row<bf16>(x, out, cols);
}
