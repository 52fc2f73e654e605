// Paged KV cache for inference (see kernels/src/ops/paged_attention.rs for shapes and invariants).
//
// Caches are [num_blocks, block_size, Hkv, D]; a slot s = block * block_size + offset is the row [Hkv, D] at
// element offset s * Hkv * D. Compute is f32 whatever the storage dtype T.

// ------------------------------------------------------------------------------------------------------------
// kv_cache_write: cache[slots[t]] = x[t] for k and v. Grid-strided over T * Hkv * D elements; slots >= n_slots
// are skipped (never written out of bounds).

template <typename T>
__device__ __forceinline__ void kv_write(const T* __restrict__ k, const T* __restrict__ v, T* kc, T* vc,
                                         const unsigned int* __restrict__ slots, long long rows, int row,
                                         long long n_slots) {
    long long n = rows * (long long)row;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long t = i / row;
        int j = (int)(i - t * row);
        unsigned int s = slots[t];
        if ((long long)s < n_slots) {
            long long o = (long long)s * row + j;
            kc[o] = k[i];
            vc[o] = v[i];
        }
    }
}

extern "C" __global__ void kv_cache_write_f32(const float* k, const float* v, float* kc, float* vc,
                                              const unsigned int* slots, long long rows, int row,
                                              long long n_slots) {
    kv_write<float>(k, v, kc, vc, slots, rows, row, n_slots);
}

extern "C" __global__ void kv_cache_write_bf16(const bf16* k, const bf16* v, bf16* kc, bf16* vc,
                                               const unsigned int* slots, long long rows, int row,
                                               long long n_slots) {
    kv_write<bf16>(k, v, kc, vc, slots, rows, row, n_slots);
}

// ------------------------------------------------------------------------------------------------------------
// paged_attention: grid (T, Hkv, nparts), one block per (row t, kv head g, part) computing the G = Hq/Hkv query
// heads g*G .. g*G+G-1 over the keys 0..=row_pos[t] of sequence row_seq[t], TK keys at a time. With nparts > 1
// (few rows: decode at low concurrency, where T*Hkv blocks would leave most SMs idle) part p takes the key tiles
// p, p + nparts, p + 2*nparts, ... and writes its unnormalised accumulators and its (max, sum) per head to the
// f32 scratch `part_acc` [T, Hkv, nparts, G, D] / `part_ml` [T, Hkv, nparts, G, 2]; paged_attention_combine_*
// then merges the parts (o = Σ_p acc_p e^(m_p - M) / Σ_p l_p e^(m_p - M), M = max_p m_p). A part with no tile
// writes m = -inf, l = 0, acc = 0.
//
// Dynamic shared memory (floats): K tile TK*(D+1) (padded: the score loop reads rows across threads), V tile
// TK*D, q G*D (pre-scaled by `scale`), scores/probabilities G*TK, output accumulators G*D, then per head the
// running max, running sum and the tile's rescale factor (3*G). The host computes the same size.
//
// Per tile: (1) gather K/V rows through the block table (coalesced along D); (2) one thread per (head, key)
// computes a score; (3) one warp per head updates the running max m and sum l (online softmax) and turns the
// scores into exp(s - m_new); (4) one thread per (head, d) rescales its accumulator by exp(m_old - m_new) and
// adds the tile's probabilities times V. At the end o = acc / l.
//
// Invalid inputs (sequence >= num_seqs, a position past the table, a block id >= num_blocks) read nothing from
// the cache: the affected row/head outputs are NaN.

// Four consecutive elements as f32 (one 16-byte load for f32, one 8-byte load for bf16); `p` is 4-aligned.
__device__ __forceinline__ void load4(const float* p, float* o) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    o[0] = v.x;
    o[1] = v.y;
    o[2] = v.z;
    o[3] = v.w;
}

__device__ __forceinline__ void load4(const bf16* p, float* o) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.y));
    o[0] = a.x;
    o[1] = a.y;
    o[2] = b.x;
    o[3] = b.y;
}

template <typename T>
__device__ __forceinline__ void paged_attn(const T* __restrict__ q, const T* __restrict__ kc,
                                           const T* __restrict__ vc, const unsigned int* __restrict__ tables,
                                           const unsigned int* __restrict__ row_seq,
                                           const unsigned int* __restrict__ row_pos, T* __restrict__ o, int hq,
                                           int hkv, int d, int block_size, int num_blocks, int num_seqs,
                                           int max_blocks, int tk, float scale, int nparts,
                                           float* __restrict__ part_acc, float* __restrict__ part_ml) {
    const int t = blockIdx.x, g = blockIdx.y, part = blockIdx.z;
    const int G = hq / hkv;
    const int dp = d + 1;
    extern __shared__ float sm[];
    float* ks = sm;
    float* vs = ks + tk * dp;
    float* qs = vs + tk * d;
    float* ss = qs + G * d;
    float* acc = ss + G * tk;
    float* mx = acc + G * d;
    float* lsum = mx + G;
    float* alpha = lsum + G;
    __shared__ int bad;

    const unsigned int seq = row_seq[t];
    const unsigned int pos = row_pos[t];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const long long qbase = ((long long)t * hq + (long long)g * G) * d;

    if (threadIdx.x == 0)
        bad = (seq >= (unsigned int)num_seqs) || (pos / (unsigned int)block_size >= (unsigned int)max_blocks);
    for (int i = threadIdx.x; i < G * d; i += blockDim.x) {
        qs[i] = to_f(q[qbase + i]) * scale;
        acc[i] = 0.0f;
    }
    for (int h = threadIdx.x; h < G; h += blockDim.x) {
        mx[h] = -INFINITY;
        lsum[h] = 0.0f;
    }
    __syncthreads();
    const long long pbase = ((long long)t * hkv + g) * nparts + part;  // this part's slot in the scratch
    if (bad) {
        const float nan = __int_as_float(0x7fc00000);
        if (nparts == 1) {
            for (int i = threadIdx.x; i < G * d; i += blockDim.x) o[qbase + i] = from_f<T>(nan);
        } else {
            for (int i = threadIdx.x; i < G * d; i += blockDim.x) part_acc[pbase * G * d + i] = nan;
            for (int i = threadIdx.x; i < 2 * G; i += blockDim.x) part_ml[pbase * 2 * G + i] = nan;
        }
        return;
    }
    const unsigned int* table = tables + (long long)seq * max_blocks;
    const int n = (int)pos + 1;
    const long long row = (long long)hkv * d;

    for (int p0 = part * tk; p0 < n; p0 += nparts * tk) {
        const int cnt = min(tk, n - p0);
        // (1) gather the tile: 4 elements per load when D % 4 == 0 (then every row offset is a multiple of 4
        // elements, so the loads are aligned), else one at a time.
        if ((d & 3) == 0) {
            const int d4 = d >> 2;
            for (int i = threadIdx.x; i < cnt * d4; i += blockDim.x) {
                const int pp = i / d4, j = (i - pp * d4) * 4;
                const int p = p0 + pp;
                const unsigned int blk = table[p / block_size];
                float kx[4], vx[4];
                if (blk < (unsigned int)num_blocks) {
                    const long long off =
                        ((long long)blk * block_size + p % block_size) * row + (long long)g * d + j;
                    load4(kc + off, kx);
                    load4(vc + off, vx);
                } else {
                    for (int c = 0; c < 4; ++c) kx[c] = vx[c] = __int_as_float(0x7fc00000);
                }
                for (int c = 0; c < 4; ++c) {
                    ks[pp * dp + j + c] = kx[c];
                    vs[pp * d + j + c] = vx[c];
                }
            }
        } else {
            for (int i = threadIdx.x; i < cnt * d; i += blockDim.x) {
                const int pp = i / d, j = i - pp * d;
                const int p = p0 + pp;
                const unsigned int blk = table[p / block_size];
                float kx, vx;
                if (blk < (unsigned int)num_blocks) {
                    const long long off =
                        ((long long)blk * block_size + p % block_size) * row + (long long)g * d + j;
                    kx = to_f(kc[off]);
                    vx = to_f(vc[off]);
                } else {
                    kx = __int_as_float(0x7fc00000);
                    vx = kx;
                }
                ks[pp * dp + j] = kx;
                vs[pp * d + j] = vx;
            }
        }
        __syncthreads();
        // (2) scores.
        for (int i = threadIdx.x; i < G * cnt; i += blockDim.x) {
            const int h = i / cnt, pp = i - h * cnt;
            const float* qh = qs + h * d;
            const float* kr = ks + pp * dp;
            float s = 0.0f;
            for (int j = 0; j < d; ++j) s = fmaf(qh[j], kr[j], s);
            ss[h * tk + pp] = s;
        }
        __syncthreads();
        // (3) online softmax, one warp per head.
        for (int h = warp; h < G; h += nw) {
            float m = -INFINITY;
            for (int pp = lane; pp < cnt; pp += 32) m = fmaxf(m, ss[h * tk + pp]);
            m = warp_max(m);
            const float m_old = mx[h];
            const float m_new = fmaxf(m_old, m);
            float sum = 0.0f;
            for (int pp = lane; pp < cnt; pp += 32) {
                const float e = expf(ss[h * tk + pp] - m_new);
                ss[h * tk + pp] = e;
                sum += e;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                const float a = expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
                alpha[h] = a;
                mx[h] = m_new;
                lsum[h] = lsum[h] * a + sum;
            }
        }
        __syncthreads();
        // (4) rescale and accumulate P·V.
        for (int i = threadIdx.x; i < G * d; i += blockDim.x) {
            const int h = i / d, j = i - h * d;
            const float* ph = ss + h * tk;
            float a = acc[i] * alpha[h];
            for (int pp = 0; pp < cnt; ++pp) a = fmaf(ph[pp], vs[pp * d + j], a);
            acc[i] = a;
        }
        __syncthreads();
    }
    if (nparts == 1) {
        for (int i = threadIdx.x; i < G * d; i += blockDim.x) o[qbase + i] = from_f<T>(acc[i] / lsum[i / d]);
    } else {
        for (int i = threadIdx.x; i < G * d; i += blockDim.x) part_acc[pbase * G * d + i] = acc[i];
        for (int h = threadIdx.x; h < G; h += blockDim.x) {
            part_ml[(pbase * G + h) * 2] = mx[h];
            part_ml[(pbase * G + h) * 2 + 1] = lsum[h];
        }
    }
}

// Merges the nparts partial results of paged_attn; grid (T, Hkv), one thread per (head, d) element.
template <typename T>
__device__ __forceinline__ void paged_combine(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                                              T* __restrict__ o, int hq, int hkv, int d, int nparts) {
    const int t = blockIdx.x, g = blockIdx.y;
    const int G = hq / hkv;
    const long long base = ((long long)t * hkv + g) * nparts;
    const long long qbase = ((long long)t * hq + (long long)g * G) * d;
    for (int i = threadIdx.x; i < G * d; i += blockDim.x) {
        const int h = i / d;
        float m = -INFINITY;
        for (int p = 0; p < nparts; ++p) m = fmaxf(m, part_ml[((base + p) * G + h) * 2]);
        float l = 0.0f, a = 0.0f;
        for (int p = 0; p < nparts; ++p) {
            const float w = expf(part_ml[((base + p) * G + h) * 2] - m);
            l = fmaf(part_ml[((base + p) * G + h) * 2 + 1], w, l);
            a = fmaf(part_acc[(base + p) * G * d + i], w, a);
        }
        o[qbase + i] = from_f<T>(a / l);
    }
}

extern "C" __global__ void paged_attention_combine_f32(const float* part_acc, const float* part_ml, float* o,
                                                       int hq, int hkv, int d, int nparts) {
    paged_combine<float>(part_acc, part_ml, o, hq, hkv, d, nparts);
}

extern "C" __global__ void paged_attention_combine_bf16(const float* part_acc, const float* part_ml, bf16* o,
                                                        int hq, int hkv, int d, int nparts) {
    paged_combine<bf16>(part_acc, part_ml, o, hq, hkv, d, nparts);
}

extern "C" __global__ void paged_attention_f32(const float* q, const float* kc, const float* vc,
                                               const unsigned int* tables, const unsigned int* row_seq,
                                               const unsigned int* row_pos, float* o, int hq, int hkv, int d,
                                               int block_size, int num_blocks, int num_seqs, int max_blocks,
                                               int tk, float scale, int nparts, float* part_acc,
                                               float* part_ml) {
    paged_attn<float>(q, kc, vc, tables, row_seq, row_pos, o, hq, hkv, d, block_size, num_blocks, num_seqs,
                      max_blocks, tk, scale, nparts, part_acc, part_ml);
}

extern "C" __global__ void paged_attention_bf16(const bf16* q, const bf16* kc, const bf16* vc,
                                                const unsigned int* tables, const unsigned int* row_seq,
                                                const unsigned int* row_pos, bf16* o, int hq, int hkv, int d,
                                                int block_size, int num_blocks, int num_seqs, int max_blocks,
                                                int tk, float scale, int nparts, float* part_acc,
                                                float* part_ml) {
    paged_attn<bf16>(q, kc, vc, tables, row_seq, row_pos, o, hq, hkv, d, block_size, num_blocks, num_seqs,
                     max_blocks, tk, scale, nparts, part_acc, part_ml);
}
