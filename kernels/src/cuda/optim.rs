//! CUDA side of [`crate::ops::adamw`]: the fused AdamW kernel (`optim.cu`, one launch per parameter) and the
//! sum of squares over many tensors with one host synchronisation.

use super::device::KArg;
use super::storage::CudaStorage;
use crate::device::DType;
use crate::error::{KernelError, Result};
use crate::ops::adamw::{AdamWOut, AdamWScalars};
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
            KArg::Ptr(ms.ptr()),
            KArg::Ptr(grad.cuda()?.ptr()),
            KArg::Ptr(exp_avg.cuda()?.ptr()),
            KArg::Ptr(exp_avg_sq.cuda()?.ptr()),
            KArg::Ptr(p.ptr()),
            KArg::Ptr(m.ptr()),
            KArg::Ptr(v.ptr()),
            KArg::Ptr(w_ptr),
            KArg::F32(s.decay),
            KArg::F32(s.one_minus_beta1),
            KArg::F32(s.beta2),
            KArg::F32(s.one_minus_beta2),
            KArg::F32(s.neg_step_size),
            KArg::F32(s.bias2_sqrt),
            KArg::F32(s.eps),
            KArg::F32(grad_scale),
            KArg::I64(n as i64),
        ],
    )?;
    let master = Tensor::from_cuda(p);
    let weight = match w {
        Some(w) => Tensor::from_cuda(w),
        None => master.clone(),
    };
    Ok(AdamWOut { master, exp_avg: Tensor::from_cuda(m), exp_avg_sq: Tensor::from_cuda(v), weight })
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
