//! CUDA side of the MoE router ([`crate::ops::router`]) and of the MoE permutation plan ([`crate::ops::moe`]);
//! kernels in `kernels/cuda/router.cu`.
//!
//! Shapes and dtypes (identical to the CPU path): `logits [T, E]` F32 or BF16 → `probs [T, E]` F32,
//! `topk_idx [T, k]` U32, `topk_weight [T, k]` F32; the backward takes and returns F32 only. Compute is f32 (the
//! CPU reference accumulates the backward in f64; the difference is at f32 rounding level).
//!
//! - [`router_fwd`]: one warp per token row: softmax, top-k by repeated arg-max in the order "higher probability
//!   first, equal → lower expert index first" (the CPU's stable sort), renormalisation summed in pick order.
//! - [`router_bwd`]: one warp per row, the formula of the [`crate::ops::router`] module docs.
//! - [`router_stats`]: the aux-loss statistics on the device; only `2·E` numbers come back to the host.
//! - [`broadcast_row`]: `[T, E]` from one `[E]` row (the aux loss's `dprobs`), uploading `E` floats, not `T·E`.
//! - [`moe_plan`]: expert counts on the device (one `[E+1]` read-back, the grouped GEMMs need the sizes on the
//!   host), then a stable counting sort by expert on the device; the `[T·k]` index tensors never leave it.

use std::sync::Arc;

use super::device::{CudaDev, KArg};
use super::ops::ptr;
use super::storage::CudaStorage;
use crate::device::DType;
use crate::error::{KernelError, Result};
use crate::ops::router::RouterOut;
use crate::tensor::Tensor;

const MODULE: &str = "router";
/// Threads per block; the row kernels run one warp per row, so 8 rows a block.
const BLOCK: u32 = 256;

fn dev_of(op: &'static str, ts: &[&Tensor]) -> Result<Arc<CudaDev>> {
    Tensor::common_device(op, ts)?;
    Ok(ts[0].cuda()?.dev().clone())
}

/// Grid for a grid-strided loop over `items` with `per_block` items a block (at most 16 blocks per SM).
fn grid(dev: &CudaDev, items: usize, per_block: usize) -> u32 {
    let cap = (dev.sm_count().max(1) as usize) * 16;
    items.div_ceil(per_block).clamp(1, cap) as u32
}

/// `E` and `k` as kernel `int`s, with the `[T, E]` / `[T, k]` element counts checked against `u32` indexing.
fn dims(op: &'static str, t: usize, e: usize, k: usize) -> Result<(i32, i32)> {
    if e > i32::MAX as usize || k > i32::MAX as usize || t.saturating_mul(k) > u32::MAX as usize {
        return Err(KernelError::invalid(
            op,
            format!("tokens {t}, experts {e}, top_k {k} too large"),
        ));
    }
    Ok((e as i32, k as i32))
}

/// See [`crate::ops::router::router_fwd`]; the caller has not checked anything.
pub fn router_fwd(logits: &Tensor, top_k: usize, norm_topk_prob: bool) -> Result<RouterOut> {
    let op = "router_fwd";
    logits.expect_rank(op, "logits", 2)?;
    let dt = logits.dtype();
    let name = match dt {
        DType::F32 => "router_fwd_f32",
        DType::BF16 => "router_fwd_bf16",
        got => {
            return Err(KernelError::DType {
                op,
                expected: DType::F32,
                got,
            });
        }
    };
    let (t, e) = (logits.shape()[0], logits.shape()[1]);
    if top_k == 0 || top_k > e {
        return Err(KernelError::invalid(
            op,
            format!("top_k {top_k} must be in 1..={e}"),
        ));
    }
    let (ei, ki) = dims(op, t, e, top_k)?;
    let dev = dev_of(op, &[logits])?;
    let probs = CudaStorage::alloc(&dev, &[t, e], DType::F32)?;
    let idx = CudaStorage::alloc(&dev, &[t, top_k], DType::U32)?;
    let w = CudaStorage::alloc(&dev, &[t, top_k], DType::F32)?;
    dev.launch(
        MODULE,
        name,
        (grid(&dev, t, (BLOCK / 32) as usize), 1, 1),
        BLOCK,
        0,
        &mut [
            ptr(logits)?,
            KArg::Ptr(probs.ptr()),
            KArg::Ptr(idx.ptr()),
            KArg::Ptr(w.ptr()),
            KArg::I64(t as i64),
            KArg::I32(ei),
            KArg::I32(ki),
            KArg::I32(norm_topk_prob as i32),
        ],
    )?;
    Ok(RouterOut {
        probs: Tensor::from_cuda(probs),
        topk_idx: Tensor::from_cuda(idx),
        topk_weight: Tensor::from_cuda(w),
    })
}

/// Checks `out` (the router's saved outputs) and returns `(tokens, experts, k)`.
fn check_out(op: &'static str, out: &RouterOut) -> Result<(usize, usize, usize)> {
    out.probs.expect_dtype(op, DType::F32)?;
    out.probs.expect_rank(op, "probs", 2)?;
    let (t, e) = (out.probs.shape()[0], out.probs.shape()[1]);
    out.topk_idx.expect_dtype(op, DType::U32)?;
    out.topk_idx.expect_rank(op, "topk_idx", 2)?;
    let k = out.topk_idx.shape()[1];
    out.topk_idx.expect_shape(op, "topk_idx", &[t, k])?;
    out.topk_weight.expect_dtype(op, DType::F32)?;
    out.topk_weight.expect_shape(op, "topk_weight", &[t, k])?;
    Ok((t, e, k))
}

/// See [`crate::ops::router::router_bwd`]: F32 `dlogits [T, E]`. Indices ≥ E contribute nothing.
pub fn router_bwd(
    d_topk_weight: &Tensor,
    d_probs: Option<&Tensor>,
    out: &RouterOut,
    norm_topk_prob: bool,
) -> Result<Tensor> {
    let op = "router_bwd";
    let (t, e, k) = check_out(op, out)?;
    d_topk_weight.expect_dtype(op, DType::F32)?;
    d_topk_weight.expect_shape(op, "d_topk_weight", &[t, k])?;
    let mut all = vec![d_topk_weight, &out.probs, &out.topk_idx, &out.topk_weight];
    if let Some(d) = d_probs {
        d.expect_dtype(op, DType::F32)?;
        d.expect_shape(op, "d_probs", &[t, e])?;
        all.push(d);
    }
    let (ei, ki) = dims(op, t, e, k)?;
    let dev = dev_of(op, &all)?;
    let dl = CudaStorage::alloc(&dev, &[t, e], DType::F32)?;
    dev.launch(
        MODULE,
        "router_bwd",
        (grid(&dev, t, (BLOCK / 32) as usize), 1, 1),
        BLOCK,
        0,
        &mut [
            ptr(&out.probs)?,
            ptr(&out.topk_idx)?,
            ptr(&out.topk_weight)?,
            ptr(d_topk_weight)?,
            match d_probs {
                Some(d) => ptr(d)?,
                None => KArg::Ptr(0),
            },
            KArg::Ptr(dl.ptr()),
            KArg::I64(t as i64),
            KArg::I32(ei),
            KArg::I32(ki),
            KArg::I32(norm_topk_prob as i32),
        ],
    )?;
    Ok(Tensor::from_cuda(dl))
}

/// Queues the per-expert counts of `idx [slots]` (u32) into a fresh zeroed `[E+1]` u32 tensor (the last entry
/// counts indices ≥ E).
fn expert_counts(dev: &Arc<CudaDev>, idx: &Tensor, e: usize) -> Result<CudaStorage> {
    let slots = idx.elem_count();
    let counts = CudaStorage::zeros(dev, &[e + 1], DType::U32)?;
    dev.launch(
        MODULE,
        "expert_counts",
        (grid(dev, slots, BLOCK as usize), 1, 1),
        BLOCK,
        0,
        &mut [
            ptr(idx)?,
            KArg::Ptr(counts.ptr()),
            KArg::I64(slots as i64),
            KArg::I32(e as i32),
        ],
    )?;
    Ok(counts)
}

/// `(assignments [E], prob_sums [E])` of one layer's routing, computed on the device (counts exact, column sums
/// f32). An index ≥ E is an [`KernelError::InvalidArgument`].
pub fn router_stats(out: &RouterOut) -> Result<(Vec<u32>, Vec<f32>)> {
    let op = "RouterStats::from_router";
    let (t, e, k) = check_out(op, out)?;
    let (ei, _) = dims(op, t, e, k)?;
    let dev = dev_of(op, &[&out.probs, &out.topk_idx])?;
    let counts = expert_counts(&dev, &out.topk_idx, e)?;
    let sums = CudaStorage::alloc(&dev, &[e], DType::F32)?;
    dev.launch(
        MODULE,
        "prob_colsum",
        ((e.min(65_535) as u32).max(1), 1, 1),
        BLOCK,
        0,
        &mut [
            ptr(&out.probs)?,
            KArg::Ptr(sums.ptr()),
            KArg::I64(t as i64),
            KArg::I32(ei),
        ],
    )?;
    let mut c = counts.to_u32()?;
    let bad = c.pop().unwrap_or(0);
    if bad > 0 {
        return Err(KernelError::invalid(
            op,
            format!("{bad} expert indices >= num_experts {e}"),
        ));
    }
    Ok((c, sums.to_f32()?))
}

/// `[tokens, row.len()]` F32 on `device` (a CUDA device), every row equal to `row`.
pub fn broadcast_row(row: &[f32], tokens: usize, ordinal: usize) -> Result<Tensor> {
    let op = "broadcast_row";
    let e = row.len();
    let (ei, _) = dims(op, tokens, e, 1)?;
    let dev = super::device::get(ordinal)?;
    let src = CudaStorage::from_f32(&dev, row, &[e])?;
    let o = CudaStorage::alloc(&dev, &[tokens, e], DType::F32)?;
    dev.launch(
        MODULE,
        "bcast_rows",
        (grid(&dev, tokens * e, BLOCK as usize), 1, 1),
        BLOCK,
        0,
        &mut [
            KArg::Ptr(src.ptr()),
            KArg::Ptr(o.ptr()),
            KArg::I64(tokens as i64),
            KArg::I32(ei),
        ],
    )?;
    Ok(Tensor::from_cuda(o))
}

/// The device part of [`crate::ops::moe::moe_plan`] for `topk_idx [T, k]` (u32, on CUDA, checked by the caller):
/// `(expert_offsets [E+1] on the host, row_token, slot_row, row_slot)`, the three `[T·k]` u32 tensors on the
/// device, with exactly the CPU plan's layout.
pub fn moe_plan(
    topk_idx: &Tensor,
    num_experts: usize,
) -> Result<(Vec<usize>, Tensor, Tensor, Tensor)> {
    let op = "moe_plan";
    let (t, k) = (topk_idx.shape()[0], topk_idx.shape()[1]);
    let (ei, ki) = dims(op, t, num_experts, k)?;
    let dev = dev_of(op, &[topk_idx])?;
    let mut counts = expert_counts(&dev, topk_idx, num_experts)?.to_u32()?;
    let bad = counts.pop().unwrap_or(0);
    if bad > 0 {
        return Err(KernelError::invalid(
            op,
            format!("{bad} expert indices >= num_experts {num_experts}"),
        ));
    }
    let mut offsets = vec![0usize; num_experts + 1];
    for (i, &c) in counts.iter().enumerate() {
        offsets[i + 1] = offsets[i] + c as usize;
    }
    let off32: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
    let off_dev = CudaStorage::from_u32(&dev, &off32, &[num_experts + 1])?;
    let slots = t * k;
    let row_token = CudaStorage::alloc(&dev, &[slots], DType::U32)?;
    let slot_row = CudaStorage::alloc(&dev, &[slots], DType::U32)?;
    let row_slot = CudaStorage::alloc(&dev, &[slots], DType::U32)?;
    let blocks = if slots == 0 {
        0
    } else {
        num_experts.min(65_535) as u32
    };
    dev.launch(
        MODULE,
        "moe_plan_rows",
        (blocks, 1, 1),
        BLOCK,
        0,
        &mut [
            ptr(topk_idx)?,
            KArg::Ptr(off_dev.ptr()),
            KArg::Ptr(row_token.ptr()),
            KArg::Ptr(slot_row.ptr()),
            KArg::Ptr(row_slot.ptr()),
            KArg::I64(slots as i64),
            KArg::I32(ki),
            KArg::I32(ei),
        ],
    )?;
    Ok((
        offsets,
        Tensor::from_cuda(row_token),
        Tensor::from_cuda(slot_row),
        Tensor::from_cuda(row_slot),
    ))
}
