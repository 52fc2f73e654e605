//! CUDA side of [`crate::ops::adamw`]: the fused AdamW kernel (`optim.cu`, one launch per parameter), the
//! multi-tensor AdamW step (one launch for a whole parameter list, in place) and the sum of squares over many
//! tensors with one host synchronisation.
//!
//! Multi-tensor layout (`adamw_multi` in `optim.cu`): one device buffer of u64 words, uploaded per call —
//! first one 7-word descriptor per parameter (addresses of master, grad, exp_avg, exp_avg_sq, weight; the
//! element count; the f32 decay factor in the low and the flags in the high half of the last word), then one
//! word per thread block: `tensor | chunk << 32`, block `b` updating elements `[chunk·CHUNK, (chunk+1)·CHUNK)`
//! of its tensor (the last chunk shorter). The upload is synchronous (`htod` waits for the stream), which costs
//! nothing in the optimizer step: the caller has just read the gradient norm back.

use super::device::KArg;
use super::storage::CudaStorage;
use crate::device::DType;
use crate::error::{KernelError, Result};
use crate::ops::adamw::{AdamWOut, AdamWParam, AdamWScalars, check_distinct};
use crate::tensor::Tensor;

const BLOCK: u32 = 256;

fn grid_for(sm_count: i32, n: usize) -> u32 {
    let cap = (sm_count.max(1) as usize) * 8;
    n.div_ceil(BLOCK as usize).clamp(1, cap) as u32
}

fn suffix(op: &'static str, d: DType) -> Result<&'static str> {
    match d {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        got => Err(KernelError::DType { op, expected: DType::BF16, got }),
    }
}

/// See [`crate::ops::adamw::adamw_step`]; operands are already checked (F32, one shape, one device).
pub fn adamw_step(
    master: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    s: &AdamWScalars,
    grad_scale: f32,
    weight_dtype: DType,
) -> Result<AdamWOut> {
    let sfx = suffix("adamw_step", weight_dtype)?;
    let ms = master.cuda()?;
    let dev = ms.dev().clone();
    let shape = master.shape();
    let n = master.elem_count();
    let (p, m, v) = (
        CudaStorage::alloc(&dev, shape, DType::F32)?,
        CudaStorage::alloc(&dev, shape, DType::F32)?,
        CudaStorage::alloc(&dev, shape, DType::F32)?,
    );
    let w = if weight_dtype == DType::F32 { None } else { Some(CudaStorage::alloc(&dev, shape, weight_dtype)?) };
    let w_ptr = w.as_ref().map_or(p.ptr(), |w| w.ptr());
    dev.launch(
        "optim",
        &format!("adamw_{sfx}"),
        (grid_for(dev.sm_count(), n), 1, 1),
        BLOCK,
        0,
        &mut [
            &[
                KArg::Ptr(ms.ptr()),
                KArg::Ptr(grad.cuda()?.ptr()),
                KArg::Ptr(exp_avg.cuda()?.ptr()),
                KArg::Ptr(exp_avg_sq.cuda()?.ptr()),
                KArg::Ptr(p.ptr()),
                KArg::Ptr(m.ptr()),
                KArg::Ptr(v.ptr()),
                KArg::Ptr(w_ptr),
                KArg::F32(s.decay),
            ][..],
            &step_args(s, grad_scale),
            &[KArg::I64(n as i64)],
        ]
        .concat(),
    )?;
    let master = Tensor::from_cuda(p);
    let weight = match w {
        Some(w) => Tensor::from_cuda(w),
        None => master.clone(),
    };
    Ok(AdamWOut { master, exp_avg: Tensor::from_cuda(m), exp_avg_sq: Tensor::from_cuda(v), weight })
}

/// Elements per block of `adamw_multi` (256 per thread at [`BLOCK`] threads).
const CHUNK: usize = 1 << 16;
/// Words of one `AdamWTensor` descriptor (56 bytes, `static_assert`ed in `optim.cu`).
const DESC_WORDS: usize = 7;
const GRAD_BF16: u64 = 1;
const WEIGHT_BF16: u64 = 2;
const WEIGHT_IS_MASTER: u64 = 4;

/// See [`crate::ops::adamw::adamw_step_multi`]; operands are already checked (dtypes, shapes, one CUDA device,
/// `params` non-empty).
pub fn adamw_step_multi(params: &mut [AdamWParam<'_>], s: &AdamWScalars, grad_scale: f32) -> Result<()> {
    let op = "adamw_step_multi";
    let dev = params[0].master.cuda()?.dev().clone();
    let weight_is_master = check_distinct(params, |t| Ok(t.cuda()?.ptr()))?;
    let mut words: Vec<u64> = Vec::with_capacity(params.len() * DESC_WORDS);
    let mut chunks: Vec<u64> = Vec::new();
    for (i, (p, &same)) in params.iter().zip(&weight_is_master).enumerate() {
        let n = p.master.elem_count();
        let mut flags = 0u64;
        if p.grad.dtype() == DType::BF16 {
            flags |= GRAD_BF16;
        }
        if same {
            flags |= WEIGHT_IS_MASTER;
        } else if p.weight.dtype() == DType::BF16 {
            flags |= WEIGHT_BF16;
        }
        words.extend([
            p.master.cuda()?.ptr(),
            p.grad.cuda()?.ptr(),
            p.exp_avg.cuda()?.ptr(),
            p.exp_avg_sq.cuda()?.ptr(),
            p.weight.cuda()?.ptr(),
            n as u64,
            u64::from(p.decay.to_bits()) | flags << 32,
        ]);
        let (idx, nchunks) = (u32::try_from(i), u32::try_from(n.div_ceil(CHUNK)));
        let (Ok(idx), Ok(nchunks)) = (idx, nchunks) else {
            return Err(KernelError::invalid(op, format!("{} tensors, {n} elements: too many chunks", params.len())));
        };
        chunks.extend((0..nchunks).map(|c| u64::from(idx) | u64::from(c) << 32));
    }
    if chunks.is_empty() {
        return Ok(()); // every tensor is empty
    }
    if chunks.len() > i32::MAX as usize {
        return Err(KernelError::invalid(op, format!("{} chunks exceed one grid", chunks.len())));
    }
    let desc_bytes = (words.len() * 8) as u64;
    let nblocks = chunks.len() as u32;
    words.extend(chunks);
    // The table as u32 pairs (the allocator's dtype does not matter: it is raw words).
    let table = CudaStorage::alloc(&dev, &[words.len() * 2], DType::U32)?;
    dev.htod(table.ptr(), &words)?;
    // The kernel reads descriptor `tensor` for every chunk word, both within the table just written; each
    // descriptor's addresses are live storages of `params` (borrowed until we return, and the stream orders the
    // kernel before any later reuse of a buffer) holding `n` elements of the flagged dtypes (checked shapes).
    dev.launch(
        "optim",
        "adamw_multi",
        (nblocks, 1, 1),
        BLOCK,
        0,
        &mut [
            &[
                KArg::Ptr(table.ptr()),
                KArg::Ptr(table.ptr() + desc_bytes),
                KArg::I64(CHUNK as i64),
            ][..],
            &step_args(s, grad_scale),
        ]
        .concat(),
    )
}

/// The step scalars both AdamW kernels take after their per-tensor arguments, in kernel order.
fn step_args(s: &AdamWScalars, grad_scale: f32) -> [KArg; 7] {
    [
        KArg::F32(s.one_minus_beta1),
        KArg::F32(s.beta2),
        KArg::F32(s.one_minus_beta2),
        KArg::F32(s.neg_step_size),
        KArg::F32(s.bias2_sqrt),
        KArg::F32(s.eps),
        KArg::F32(grad_scale),
    ]
}

/// See [`crate::ops::adamw::sum_squares`]; `ts` is non-empty and on one CUDA device.
pub fn sum_squares(ts: &[&Tensor]) -> Result<f64> {
    let dev = ts[0].cuda()?.dev().clone();
    // One f64 accumulator (8 bytes; the allocator hands out at least that).
    let acc = CudaStorage::zeros(&dev, &[2], DType::F32)?;
    for t in ts {
        let st = t.cuda()?;
        let sfx = suffix("sum_squares", st.dtype())?;
        let n = st.elem_count();
        dev.launch(
            "optim",
            &format!("sum_squares_{sfx}"),
            (grid_for(dev.sm_count(), n), 1, 1),
            BLOCK,
            0,
            &mut [KArg::Ptr(st.ptr()), KArg::Ptr(acc.ptr()), KArg::I64(n as i64)],
        )?;
    }
    let mut out = [0f64; 1];
    dev.dtoh(&mut out, acc.ptr())?;
    Ok(out[0])
}
