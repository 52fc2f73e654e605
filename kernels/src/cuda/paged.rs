//! Launch wrappers of the inference kernels: `kernels/cuda/paged_attention.cu`, the CUDA side of
//! [`crate::ops::paged_attention`](mod@crate::ops::paged_attention) (shapes, invariants and the in-place contract are documented there), and
//! `kernels/cuda/argmax.cu` ([`crate::ops::argmax`]). The public ops have checked shapes,
//! dtypes and devices before calling in here.

use super::device::KArg;
use super::ops::{ptr, sfx};
use crate::device::DType;
use crate::error::Result;
use crate::ops::paged_attention::check_caches;
use crate::tensor::Tensor;

const THREADS: u32 = 128;
/// Keys per tile of the attention kernel.
const TILE_KEYS: usize = 32;
/// Largest head dim on CUDA (the shared-memory plan is sized for it).
pub const MAX_HEAD_DIM: usize = 256;
/// Most key partitions of one (row, kv head) when there are too few rows to fill the GPU.
const MAX_PARTS: usize = 16;

/// Blocks per SM the partitioning aims for (a block holds ~37 KiB of shared memory at D = 128, so several fit;
/// one block alone is latency-bound on its serial key tiles).
const BLOCKS_PER_SM: usize = 4;

/// Key partitions per (row, kv head): 1 when `blocks` (rows × kv heads) already give [`BLOCKS_PER_SM`] blocks
/// per SM, else enough to, at most [`MAX_PARTS`]. The count never depends on the context length (a part with no
/// key tile writes an empty result), so no host read of the positions is needed.
fn parts_for(blocks: usize, sms: usize) -> usize {
    let want = BLOCKS_PER_SM * sms;
    if blocks >= want {
        1
    } else {
        want.div_ceil(blocks.max(1)).clamp(1, MAX_PARTS)
    }
}

/// In-place `k_cache[slots[t]] = k[t]`, `v_cache[slots[t]] = v[t]` (checked by the caller).
pub fn kv_cache_write(
    k_cache: &mut Tensor,
    v_cache: &mut Tensor,
    k: &Tensor,
    v: &Tensor,
    slots: &Tensor,
) -> Result<()> {
    let op = "kv_cache_write";
    let c = check_caches(op, k_cache, v_cache)?;
    let sfx = sfx(op, k_cache.dtype())?;
    let dev = k_cache.cuda()?.dev().clone();
    let rows = k.shape()[0];
    let row = c.hkv * c.d;
    let n = rows * row;
    let grid = n
        .div_ceil(THREADS as usize)
        .clamp(1, dev.sm_count().max(1) as usize * 16) as u32;
    // The kernel writes rows of `k_cache`/`v_cache` only at slots below `NB·BS` (the buffers' size), reads
    // `rows·row` elements of `k`/`v` and `rows` slots: all within the checked shapes.
    dev.launch(
        "paged_attention",
        &format!("kv_cache_write_{sfx}"),
        (grid, 1, 1),
        THREADS,
        0,
        &mut [
            ptr(k)?,
            ptr(v)?,
            ptr(k_cache)?,
            ptr(v_cache)?,
            ptr(slots)?,
            KArg::I64(rows as i64),
            KArg::I32(row as i32),
            KArg::I64((c.num_blocks * c.block_size) as i64),
        ],
    )
}

/// Shared-memory bytes of one attention block (the layout in `paged_attention.cu`).
fn smem_bytes(tk: usize, group: usize, d: usize) -> usize {
    4 * (tk * (d + 1) + tk * d + group * d + group * tk + group * d + 3 * group)
}

/// `o [T, Hq, D]` (checked by the caller; `s`, `mb` are the block table's dims).
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_tables: &Tensor,
    row_seq: &Tensor,
    row_pos: &Tensor,
    s: usize,
    mb: usize,
) -> Result<Tensor> {
    let op = "paged_attention";
    let c = check_caches(op, k_cache, v_cache)?;
    let dt = q.dtype();
    let sfx = sfx(op, dt)?;
    let (t, hq, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    if d > MAX_HEAD_DIM {
        return Err(super::unsupported(
            op,
            format!("head_dim {d} > {MAX_HEAD_DIM}"),
        ));
    }
    let group = hq / c.hkv;
    let mut tk = TILE_KEYS;
    while tk > 8 && smem_bytes(tk, group, d) > 160 * 1024 {
        tk /= 2;
    }
    let smem = smem_bytes(tk, group, d);
    let dev = q.cuda()?.dev().clone();
    let o = super::storage::CudaStorage::alloc(&dev, q.shape(), dt)?;
    let nparts = parts_for(t * c.hkv, dev.sm_count().max(1) as usize);
    // f32 scratch of the partial results (empty when there is one part).
    let (part_acc, part_ml) = if nparts > 1 {
        (
            Some(super::storage::CudaStorage::alloc(
                &dev,
                &[t, c.hkv, nparts, group, d],
                DType::F32,
            )?),
            Some(super::storage::CudaStorage::alloc(
                &dev,
                &[t, c.hkv, nparts, group, 2],
                DType::F32,
            )?),
        )
    } else {
        (None, None)
    };
    let sptr =
        |s: &Option<super::storage::CudaStorage>| KArg::Ptr(s.as_ref().map_or(0, |s| s.ptr()));
    // Every cache read is bounds-checked against `num_blocks` in the kernel; table reads are limited to
    // `row_pos / BS < mb` of a sequence `< s`; q/o are `[T, Hq, D]`; the scratch is `[T, Hkv, nparts, G, ·]`.
    dev.launch(
        "paged_attention",
        &format!("paged_attention_{sfx}"),
        (t as u32, c.hkv as u32, nparts as u32),
        THREADS,
        smem as u32,
        &mut [
            ptr(q)?,
            ptr(k_cache)?,
            ptr(v_cache)?,
            ptr(block_tables)?,
            ptr(row_seq)?,
            ptr(row_pos)?,
            KArg::Ptr(o.ptr()),
            KArg::I32(hq as i32),
            KArg::I32(c.hkv as i32),
            KArg::I32(d as i32),
            KArg::I32(c.block_size as i32),
            KArg::I32(c.num_blocks as i32),
            KArg::I32(s as i32),
            KArg::I32(mb as i32),
            KArg::I32(tk as i32),
            KArg::F32(1.0 / (d as f32).sqrt()),
            KArg::I32(nparts as i32),
            sptr(&part_acc),
            sptr(&part_ml),
        ],
    )?;
    if nparts > 1 {
        // Reads the scratch written above (same stream), writes o.
        dev.launch(
            "paged_attention",
            &format!("paged_attention_combine_{sfx}"),
            (t as u32, c.hkv as u32, 1),
            THREADS,
            0,
            &mut [
                sptr(&part_acc),
                sptr(&part_ml),
                KArg::Ptr(o.ptr()),
                KArg::I32(hq as i32),
                KArg::I32(c.hkv as i32),
                KArg::I32(d as i32),
                KArg::I32(nparts as i32),
            ],
        )?;
    }
    Ok(Tensor::from_cuda(o))
}

/// `[rows]` u32 argmax of `x [rows, cols]` (checked by the caller).
pub fn argmax_rows(x: &Tensor, rows: usize, cols: usize) -> Result<Tensor> {
    let op = "argmax_rows";
    let sfx = sfx(op, x.dtype())?;
    let dev = x.cuda()?.dev().clone();
    let o = super::storage::CudaStorage::alloc(&dev, &[rows], DType::U32)?;
    // One block per row reads `cols` elements of its row and writes one u32.
    dev.launch(
        "argmax",
        &format!("argmax_rows_{sfx}"),
        (rows as u32, 1, 1),
        1024,
        0,
        &mut [ptr(x)?, KArg::Ptr(o.ptr()), KArg::I32(cols as i32)],
    )?;
    Ok(Tensor::from_cuda(o))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parts_fill_the_sms_only_when_rows_are_few() {
        assert_eq!(super::parts_for(8, 132), 16);
        assert_eq!(super::parts_for(128, 132), 5);
        assert_eq!(super::parts_for(512, 132), 2);
        assert_eq!(super::parts_for(528, 132), 1);
    }
}
