//! CUDA implementations of the tensor primitives and model ops. Called from the dispatch arms in
//! [`crate::Tensor`] and [`crate::ops`] when the operands live on a CUDA device; the shapes and maths are those
//! documented on the public functions there. Every function here validates its operands (dtype rules in the
//! [`crate::cuda`] module docs), allocates fresh outputs and queues kernels on the device's stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::device::{CudaDev, KArg};
use super::storage::CudaStorage;
use crate::device::DType;
use crate::error::{KernelError, Result};
use crate::tensor::Tensor;

const BLOCK: u32 = 256;

fn st(t: &Tensor) -> Result<&CudaStorage> {
    t.cuda()
}

fn out(s: CudaStorage) -> Tensor {
    Tensor::from_cuda(s)
}

/// Grid for a grid-strided loop over `n` items with [`BLOCK`] threads a block.
fn grid_for(dev: &CudaDev, n: usize) -> u32 {
    let cap = (dev.sm_count().max(1) as usize) * 16;
    n.div_ceil(BLOCK as usize).clamp(1, cap) as u32
}

/// The kernel-name suffix of a float dtype (shared by the other launch modules of `cuda/`).
pub(crate) fn sfx(op: &'static str, d: DType) -> Result<&'static str> {
    match d {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        got => Err(KernelError::DType {
            op,
            expected: DType::BF16,
            got,
        }),
    }
}

/// The common float dtype of `ts` (F32 or BF16), or a typed error naming the first that differs.
fn float_dtype(op: &'static str, ts: &[&Tensor]) -> Result<DType> {
    let d = ts[0].dtype();
    sfx(op, d)?;
    for t in ts {
        t.expect_dtype(op, d)?;
    }
    Ok(d)
}

fn dev_of(op: &'static str, ts: &[&Tensor]) -> Result<Arc<CudaDev>> {
    Tensor::common_device(op, ts)?;
    Ok(st(ts[0])?.dev().clone())
}

pub(crate) fn ptr(t: &Tensor) -> Result<KArg> {
    Ok(KArg::Ptr(st(t)?.ptr()))
}

// --------------------------------------------------------------------------------------------------------------
// Tensor primitives.

/// Casts to `to` (f32 ↔ bf16 round to nearest even, u32 → f32/bf16).
pub fn cast(x: &Tensor, to: DType) -> Result<Tensor> {
    let s = st(x)?;
    if s.dtype() == to {
        return Ok(x.clone());
    }
    let name = match (s.dtype(), to) {
        (DType::F32, DType::BF16) => "cast_f32_bf16",
        (DType::BF16, DType::F32) => "cast_bf16_f32",
        (DType::U32, DType::F32) => "cast_u32_f32",
        (DType::U32, DType::BF16) => "cast_u32_bf16",
        (from, to) => {
            return Err(super::unsupported(
                "to_dtype",
                format!("cast {from} -> {to}"),
            ));
        }
    };
    let dev = s.dev().clone();
    let o = CudaStorage::alloc(&dev, s.shape(), to)?;
    let n = s.elem_count();
    dev.launch(
        "elementwise",
        name,
        (grid_for(&dev, n), 1, 1),
        BLOCK,
        0,
        &mut [KArg::Ptr(s.ptr()), KArg::Ptr(o.ptr()), KArg::I64(n as i64)],
    )?;
    Ok(out(o))
}

/// `a (op) b` for `op` in `add`, `sub`, `mul` (same shape and float dtype: the caller checked shape).
pub fn binary(op: &'static str, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let d = float_dtype(op, &[a, b])?;
    let dev = dev_of(op, &[a, b])?;
    let o = CudaStorage::alloc(&dev, a.shape(), d)?;
    let n = a.elem_count();
    dev.launch(
        "elementwise",
        &format!("{op}_{}", sfx(op, d)?),
        (grid_for(&dev, n), 1, 1),
        BLOCK,
        0,
        &mut [ptr(a)?, ptr(b)?, KArg::Ptr(o.ptr()), KArg::I64(n as i64)],
    )?;
    Ok(out(o))
}

/// `s · a`.
pub fn scale(a: &Tensor, s: f32) -> Result<Tensor> {
    let d = float_dtype("scale", &[a])?;
    let dev = st(a)?.dev().clone();
    let o = CudaStorage::alloc(&dev, a.shape(), d)?;
    let n = a.elem_count();
    dev.launch(
        "elementwise",
        &format!("scale_{}", sfx("scale", d)?),
        (grid_for(&dev, n), 1, 1),
        BLOCK,
        0,
        &mut [
            ptr(a)?,
            KArg::Ptr(o.ptr()),
            KArg::F32(s),
            KArg::I64(n as i64),
        ],
    )?;
    Ok(out(o))
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        st[i] = st[i + 1] * shape[i + 1];
    }
    st
}

/// Queues `dst[dst_off + Σ idx·dst_st] = src[src_off + Σ idx·src_st]` over every index of `shape` (rank ≤ 6).
#[allow(clippy::too_many_arguments)]
fn copy_strided(
    dev: &CudaDev,
    src: &CudaStorage,
    dst: &CudaStorage,
    shape: &[usize],
    src_st: &[usize],
    src_off: usize,
    dst_st: &[usize],
    dst_off: usize,
) -> Result<()> {
    let op = "copy_strided";
    if shape.len() > 6 {
        return Err(super::unsupported(op, format!("rank {} > 6", shape.len())));
    }
    let n: usize = shape.iter().product();
    let mut desc = [0i64; 18];
    for (i, &s) in shape.iter().enumerate() {
        desc[i] = s as i64;
        desc[6 + i] = src_st[i] as i64;
        desc[12 + i] = dst_st[i] as i64;
    }
    let name = match src.dtype().size_in_bytes() {
        2 => "copy_strided_2",
        _ => "copy_strided_4",
    };
    dev.launch(
        "elementwise",
        name,
        (grid_for(dev, n), 1, 1),
        BLOCK,
        0,
        &mut [
            KArg::Ptr(src.ptr()),
            KArg::Ptr(dst.ptr()),
            KArg::Strides(desc),
            KArg::I32(shape.len() as i32),
            KArg::I64(src_off as i64),
            KArg::I64(dst_off as i64),
            KArg::I64(n as i64),
        ],
    )
}

/// Swaps dims `d1`, `d2` (the caller checked them); the result is contiguous.
pub fn transpose(x: &Tensor, d1: usize, d2: usize) -> Result<Tensor> {
    let s = st(x)?;
    let dev = s.dev().clone();
    let mut shape = s.shape().to_vec();
    shape.swap(d1, d2);
    let mut src_st = contiguous_strides(s.shape());
    src_st.swap(d1, d2);
    let o = CudaStorage::alloc(&dev, &shape, s.dtype())?;
    copy_strided(
        &dev,
        s,
        &o,
        &shape,
        &src_st,
        0,
        &contiguous_strides(&shape),
        0,
    )?;
    Ok(out(o))
}

/// Elements `start..start+len` along `dim` (the caller checked the range), contiguous.
pub fn narrow(x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    let s = st(x)?;
    let dev = s.dev().clone();
    let mut shape = s.shape().to_vec();
    shape[dim] = len;
    let src_st = contiguous_strides(s.shape());
    let o = CudaStorage::alloc(&dev, &shape, s.dtype())?;
    if dim == 0 {
        let row = src_st.first().copied().unwrap_or(1) * s.dtype().size_in_bytes();
        dev.dtod(o.ptr(), s.ptr() + (start * row) as u64, len * row)?;
    } else {
        copy_strided(
            &dev,
            s,
            &o,
            &shape,
            &src_st,
            start * src_st[dim],
            &contiguous_strides(&shape),
            0,
        )?;
    }
    Ok(out(o))
}

/// Concatenation along `dim` (the caller checked devices; shapes and dtypes are checked here).
pub fn cat(ts: &[&Tensor], dim: usize) -> Result<Tensor> {
    let op = "cat";
    let first = st(ts[0])?;
    let rank = first.shape().len();
    if dim >= rank {
        return Err(KernelError::invalid(
            op,
            format!("dim {dim} of rank {rank}"),
        ));
    }
    let mut shape = first.shape().to_vec();
    shape[dim] = 0;
    for t in ts {
        t.expect_dtype(op, first.dtype())?;
        let s = t.shape();
        if s.len() != rank || (0..rank).any(|i| i != dim && s[i] != first.shape()[i]) {
            return Err(KernelError::shape(
                op,
                format!("{:?} vs {:?} along dim {dim}", first.shape(), s),
            ));
        }
        shape[dim] += s[dim];
    }
    let dev = first.dev().clone();
    let o = CudaStorage::alloc(&dev, &shape, first.dtype())?;
    let dst_st = contiguous_strides(&shape);
    let mut off = 0;
    for t in ts {
        let s = st(t)?;
        copy_strided(
            &dev,
            s,
            &o,
            s.shape(),
            &contiguous_strides(s.shape()),
            0,
            &dst_st,
            off * dst_st[dim],
        )?;
        off += s.shape()[dim];
    }
    Ok(out(o))
}

/// Σ over dim 0: `[n, rest…] → [rest…]` (f32 accumulation, same dtype out).
pub fn sum_dim0(x: &Tensor) -> Result<Tensor> {
    let op = "sum_dim0";
    let d = float_dtype(op, &[x])?;
    let s = st(x)?;
    let dev = s.dev().clone();
    let rows = s.shape()[0];
    let shape = &s.shape()[1..];
    let cols: usize = shape.iter().product();
    let o = CudaStorage::alloc(&dev, shape, d)?;
    dev.launch(
        "elementwise",
        &format!("sum_rows_{}", sfx(op, d)?),
        (grid_for(&dev, cols), 1, 1),
        BLOCK,
        0,
        &mut [
            KArg::Ptr(s.ptr()),
            KArg::Ptr(o.ptr()),
            KArg::I64(rows as i64),
            KArg::I64(cols as i64),
        ],
    )?;
    Ok(out(o))
}

// --------------------------------------------------------------------------------------------------------------
// RMSNorm, RoPE, SwiGLU.

fn last_dim(op: &'static str, x: &Tensor) -> Result<usize> {
    x.shape()
        .last()
        .copied()
        .ok_or_else(|| KernelError::shape(op, "x is a scalar"))
}

/// `(y, rstd)`; see [`crate::ops::rmsnorm`].
pub fn rmsnorm_fwd(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let op = "rmsnorm_fwd";
    let dt = float_dtype(op, &[x, w])?;
    let dev = dev_of(op, &[x, w])?;
    let d = last_dim(op, x)?;
    w.expect_shape(op, "w", &[d])?;
    let rows = x.elem_count() / d.max(1);
    let y = CudaStorage::alloc(&dev, x.shape(), dt)?;
    let rstd = CudaStorage::alloc(&dev, &x.shape()[..x.rank() - 1], DType::F32)?;
    let blocks = rows
        .div_ceil(8)
        .clamp(1, dev.sm_count().max(1) as usize * 16) as u32;
    dev.launch(
        "rmsnorm",
        &format!("rmsnorm_fwd_{}", sfx(op, dt)?),
        (blocks, 1, 1),
        BLOCK,
        0,
        &mut [
            ptr(x)?,
            ptr(w)?,
            KArg::Ptr(y.ptr()),
            KArg::Ptr(rstd.ptr()),
            KArg::I64(rows as i64),
            KArg::I32(d as i32),
            KArg::F32(eps as f32),
        ],
    )?;
    Ok((out(y), out(rstd)))
}

/// `(dx, dw)` with `dw` in f32; see [`crate::ops::rmsnorm`].
pub fn rmsnorm_bwd(dy: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor) -> Result<(Tensor, Tensor)> {
    let op = "rmsnorm_bwd";
    let dt = float_dtype(op, &[dy, x, w])?;
    let dev = dev_of(op, &[dy, x, w, rstd])?;
    let d = last_dim(op, x)?;
    w.expect_shape(op, "w", &[d])?;
    dy.expect_shape(op, "dy", x.shape())?;
    rstd.expect_dtype(op, DType::F32)?;
    rstd.expect_shape(op, "rstd", &x.shape()[..x.rank() - 1])?;
    let rows = x.elem_count() / d.max(1);
    let dx = CudaStorage::alloc(&dev, x.shape(), dt)?;
    let dw = CudaStorage::zeros(&dev, &[d], DType::F32)?;
    let blocks = rows
        .div_ceil(8)
        .clamp(1, dev.sm_count().max(1) as usize * 4) as u32;
    dev.launch(
        "rmsnorm",
        &format!("rmsnorm_bwd_{}", sfx(op, dt)?),
        (blocks, 1, 1),
        BLOCK,
        (d * 4) as u32,
        &mut [
            ptr(dy)?,
            ptr(x)?,
            ptr(w)?,
            ptr(rstd)?,
            KArg::Ptr(dx.ptr()),
            KArg::Ptr(dw.ptr()),
            KArg::I64(rows as i64),
            KArg::I32(d as i32),
        ],
    )?;
    Ok((out(dx), out(dw)))
}

/// Rotation of `x [tokens, heads, head_dim]` by the table angles times `sign` (±1).
pub fn rope(op: &'static str, x: &Tensor, cos: &Tensor, sin: &Tensor, sign: f32) -> Result<Tensor> {
    let dt = float_dtype(op, &[x])?;
    let dev = dev_of(op, &[x, cos, sin])?;
    x.expect_rank(op, "x", 3)?;
    let (t, h, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    cos.expect_shape(op, "table", &[t, d / 2])?;
    let y = CudaStorage::alloc(&dev, x.shape(), dt)?;
    let n = t * h * (d / 2);
    dev.launch(
        "rope",
        &format!("rope_{}", sfx(op, dt)?),
        (grid_for(&dev, n), 1, 1),
        BLOCK,
        0,
        &mut [
            ptr(x)?,
            ptr(cos)?,
            ptr(sin)?,
            KArg::Ptr(y.ptr()),
            KArg::I64(t as i64),
            KArg::I32(h as i32),
            KArg::I32(d as i32),
            KArg::F32(sign),
        ],
    )?;
    Ok(out(y))
}

fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(KernelError::shape(
            op,
            format!("{:?} vs {:?}", a.shape(), b.shape()),
        ));
    }
    Ok(())
}

/// `silu(gate)·up`.
pub fn swiglu_fwd(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let op = "swiglu_fwd";
    let dt = float_dtype(op, &[gate, up])?;
    let dev = dev_of(op, &[gate, up])?;
    same_shape(op, gate, up)?;
    let h = CudaStorage::alloc(&dev, gate.shape(), dt)?;
    let n = gate.elem_count();
    dev.launch(
        "swiglu",
        &format!("swiglu_fwd_{}", sfx(op, dt)?),
        (grid_for(&dev, n), 1, 1),
        BLOCK,
        0,
        &mut [
            ptr(gate)?,
            ptr(up)?,
            KArg::Ptr(h.ptr()),
            KArg::I64(n as i64),
        ],
    )?;
    Ok(out(h))
}

/// `(dgate, dup)`.
pub fn swiglu_bwd(dh: &Tensor, gate: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor)> {
    let op = "swiglu_bwd";
    let dt = float_dtype(op, &[dh, gate, up])?;
    let dev = dev_of(op, &[dh, gate, up])?;
    same_shape(op, gate, up)?;
    same_shape(op, gate, dh)?;
    let dg = CudaStorage::alloc(&dev, gate.shape(), dt)?;
    let du = CudaStorage::alloc(&dev, gate.shape(), dt)?;
    let n = gate.elem_count();
    dev.launch(
        "swiglu",
        &format!("swiglu_bwd_{}", sfx(op, dt)?),
        (grid_for(&dev, n), 1, 1),
        BLOCK,
        0,
        &mut [
            ptr(dh)?,
            ptr(gate)?,
            ptr(up)?,
            KArg::Ptr(dg.ptr()),
            KArg::Ptr(du.ptr()),
            KArg::I64(n as i64),
        ],
    )?;
    Ok((out(dg), out(du)))
}

// --------------------------------------------------------------------------------------------------------------
// Embedding and cross-entropy.

fn check_ids(op: &'static str, ids: &Tensor, vocab: usize, what: &str) -> Result<()> {
    ids.expect_dtype(op, DType::U32)?;
    ids.expect_rank(op, what, 1)?;
    // Host check (one small read-back), so a bad id is a typed error rather than an out-of-bounds access.
    if let Some(bad) = ids.to_vec_u32()?.into_iter().find(|&i| i as usize >= vocab) {
        return Err(KernelError::invalid(
            op,
            format!("{what} {bad} >= vocab size {vocab}"),
        ));
    }
    Ok(())
}

/// `table[ids]`.
pub fn embedding_fwd(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    let op = "embedding_fwd";
    let dt = float_dtype(op, &[table])?;
    let dev = dev_of(op, &[ids, table])?;
    table.expect_rank(op, "table", 2)?;
    let (vocab, hidden) = (table.shape()[0], table.shape()[1]);
    check_ids(op, ids, vocab, "token id")?;
    let t = ids.shape()[0];
    let x = CudaStorage::alloc(&dev, &[t, hidden], dt)?;
    dev.launch(
        "embedding",
        &format!("embedding_fwd_{}", sfx(op, dt)?),
        (grid_for(&dev, t * hidden), 1, 1),
        BLOCK,
        0,
        &mut [
            ptr(ids)?,
            ptr(table)?,
            KArg::Ptr(x.ptr()),
            KArg::I64(t as i64),
            KArg::I64(hidden as i64),
        ],
    )?;
    Ok(out(x))
}

/// f32 `dtable [vocab, hidden]`.
pub fn embedding_bwd(ids: &Tensor, dx: &Tensor, vocab: usize) -> Result<Tensor> {
    let op = "embedding_bwd";
    let dt = float_dtype(op, &[dx])?;
    let dev = dev_of(op, &[ids, dx])?;
    dx.expect_rank(op, "dx", 2)?;
    check_ids(op, ids, vocab, "token id")?;
    let (t, hidden) = (dx.shape()[0], dx.shape()[1]);
    if ids.shape()[0] != t {
        return Err(KernelError::shape(
            op,
            format!("dx {:?} vs ids {:?}", dx.shape(), ids.shape()),
        ));
    }
    let dtab = CudaStorage::zeros(&dev, &[vocab, hidden], DType::F32)?;
    dev.launch(
        "embedding",
        &format!("embedding_bwd_{}", sfx(op, dt)?),
        (grid_for(&dev, t * hidden), 1, 1),
        BLOCK,
        0,
        &mut [
            ptr(ids)?,
            ptr(dx)?,
            KArg::Ptr(dtab.ptr()),
            KArg::I64(t as i64),
            KArg::I64(hidden as i64),
        ],
    )?;
    Ok(out(dtab))
}

/// Per-token `CE_t` (f32 `[tokens]`) and, when `grad` is `Some((weights, denom))`, `dlogits` (dtype of logits).
pub fn cross_entropy(
    op: &'static str,
    logits: &Tensor,
    targets: &Tensor,
    grad: Option<(&Tensor, f64)>,
) -> Result<(Tensor, Option<Tensor>)> {
    let dt = float_dtype(op, &[logits])?;
    let dev = dev_of(op, &[logits, targets])?;
    logits.expect_rank(op, "logits", 2)?;
    let (t, v) = (logits.shape()[0], logits.shape()[1]);
    targets.expect_shape(op, "targets", &[t])?;
    check_ids(op, targets, v, "target")?;
    let ce = CudaStorage::alloc(&dev, &[t], DType::F32)?;
    let (wptr, dl, inv) = match grad {
        Some((w, denom)) => {
            Tensor::common_device(op, &[logits, w])?;
            w.expect_dtype(op, DType::F32)?;
            w.expect_shape(op, "weights", &[t])?;
            let dl = CudaStorage::alloc(&dev, logits.shape(), dt)?;
            (st(w)?.ptr(), Some(dl), (1.0 / denom) as f32)
        }
        None => (0, None, 0.0),
    };
    let block = if v >= 4096 { 1024 } else { 256 };
    dev.launch(
        "cross_entropy",
        &format!("cross_entropy_{}", sfx(op, dt)?),
        (t as u32, 1, 1),
        block,
        0,
        &mut [
            ptr(logits)?,
            ptr(targets)?,
            KArg::Ptr(wptr),
            KArg::Ptr(ce.ptr()),
            KArg::Ptr(dl.as_ref().map(|d| d.ptr()).unwrap_or(0)),
            KArg::I64(v as i64),
            KArg::F32(inv),
        ],
    )?;
    Ok((out(ce), dl.map(out)))
}

/// Vocab-parallel cross-entropy, pass 1 (see `kernels/cuda/cross_entropy.cu`): per row of the local logits
/// `[t, v]`, `[m (t) | Σexp(x − m) (t) | x[target] or 0 (t)]` as one f32 vector of `3t` on the host. `local`
/// holds each row's local target column, or `u32::MAX` when another rank owns it.
pub fn vocab_shard_stats(logits: &Tensor, local: &Tensor) -> Result<Vec<f32>> {
    let op = "vocab_shard_stats";
    let dt = float_dtype(op, &[logits])?;
    let dev = dev_of(op, &[logits, local])?;
    logits.expect_rank(op, "logits", 2)?;
    let (t, v) = (logits.shape()[0], logits.shape()[1]);
    local.expect_dtype(op, DType::U32)?;
    local.expect_shape(op, "local targets", &[t])?;
    let o = CudaStorage::alloc(&dev, &[3 * t], DType::F32)?;
    if t > 0 {
        let block = if v >= 4096 { 1024 } else { 256 };
        dev.launch(
            "cross_entropy",
            &format!("vp_ce_stats_{}", sfx(op, dt)?),
            (t as u32, 1, 1),
            block,
            0,
            &mut [
                ptr(logits)?,
                ptr(local)?,
                KArg::Ptr(o.ptr()),
                KArg::I64(t as i64),
                KArg::I64(v as i64),
            ],
        )?;
    }
    o.to_f32()
}

/// Vocab-parallel cross-entropy, pass 2: `dl [t, v]` (dtype of the logits) with
/// `dl_tv = coef_t·(exp(x_tv − lse_t) − [v = local_t])`.
pub fn vocab_shard_grad(
    logits: &Tensor,
    local: &Tensor,
    lse: &[f32],
    coef: &[f32],
) -> Result<Tensor> {
    let op = "vocab_shard_grad";
    let dt = float_dtype(op, &[logits])?;
    let dev = dev_of(op, &[logits, local])?;
    logits.expect_rank(op, "logits", 2)?;
    let (t, v) = (logits.shape()[0], logits.shape()[1]);
    local.expect_dtype(op, DType::U32)?;
    local.expect_shape(op, "local targets", &[t])?;
    if lse.len() != t || coef.len() != t {
        return Err(KernelError::shape(
            op,
            format!(
                "{t} rows, {} lse and {} coefficients",
                lse.len(),
                coef.len()
            ),
        ));
    }
    let l = CudaStorage::from_f32(&dev, lse, &[t])?;
    let c = CudaStorage::from_f32(&dev, coef, &[t])?;
    let dl = CudaStorage::alloc(&dev, logits.shape(), dt)?;
    if t > 0 {
        let block = if v >= 4096 { 1024 } else { 256 };
        dev.launch(
            "cross_entropy",
            &format!("vp_ce_grad_{}", sfx(op, dt)?),
            (t as u32, 1, 1),
            block,
            0,
            &mut [
                ptr(logits)?,
                ptr(local)?,
                KArg::Ptr(l.ptr()),
                KArg::Ptr(c.ptr()),
                KArg::Ptr(dl.ptr()),
                KArg::I64(v as i64),
            ],
        )?;
    }
    Ok(out(dl))
}

// --------------------------------------------------------------------------------------------------------------
// MoE permutation (the plan is built on the host; its index tensors live on the device).

fn check_moe_rows(op: &'static str, t: &Tensor, what: &str, rows: usize) -> Result<usize> {
    t.expect_rank(op, what, 2)?;
    if t.shape()[0] != rows {
        return Err(KernelError::shape(
            op,
            format!("{what} {:?} must have {rows} rows", t.shape()),
        ));
    }
    Ok(t.shape()[1])
}

/// `xp [tokens·k, hidden] = x[row_token]` (a row gather).
pub fn moe_permute(x: &Tensor, row_token: &Tensor, tokens: usize) -> Result<Tensor> {
    check_moe_rows("moe_permute", x, "x", tokens)?;
    embedding_fwd(row_token, x)
}

/// `dx [tokens, hidden]` (f32): scatter-add of the `k` copies of each token.
pub fn moe_permute_bwd(
    dxp: &Tensor,
    row_token: &Tensor,
    tokens: usize,
    k: usize,
) -> Result<Tensor> {
    check_moe_rows("moe_permute_bwd", dxp, "dxp", tokens * k)?;
    embedding_bwd(row_token, dxp, tokens)
}

fn check_moe_weights(op: &'static str, w: &Tensor, tokens: usize, k: usize) -> Result<()> {
    w.expect_dtype(op, DType::F32)?;
    w.expect_shape(op, "weights", &[tokens, k])
}

/// `y [tokens, hidden] = Σ_j weights[t, j]·yp[slot_row[t·k + j]]` (dtype of yp).
pub fn moe_unpermute(
    yp: &Tensor,
    weights: &Tensor,
    slot_row: &Tensor,
    tokens: usize,
    k: usize,
) -> Result<Tensor> {
    let op = "moe_unpermute";
    let dt = float_dtype(op, &[yp])?;
    let dev = dev_of(op, &[yp, weights, slot_row])?;
    let h = check_moe_rows(op, yp, "yp", tokens * k)?;
    check_moe_weights(op, weights, tokens, k)?;
    let y = CudaStorage::alloc(&dev, &[tokens, h], dt)?;
    dev.launch(
        "moe",
        &format!("moe_unpermute_{}", sfx(op, dt)?),
        (grid_for(&dev, tokens * h), 1, 1),
        BLOCK,
        0,
        &mut [
            ptr(yp)?,
            ptr(weights)?,
            ptr(slot_row)?,
            KArg::Ptr(y.ptr()),
            KArg::I64(tokens as i64),
            KArg::I32(k as i32),
            KArg::I64(h as i64),
        ],
    )?;
    Ok(out(y))
}

/// `(dyp [tokens·k, hidden]` in the dtype of yp, `dweights [tokens, k]` in f32`)`.
pub fn moe_unpermute_bwd(
    dy: &Tensor,
    yp: &Tensor,
    weights: &Tensor,
    slot_row: &Tensor,
    tokens: usize,
    k: usize,
) -> Result<(Tensor, Tensor)> {
    let op = "moe_unpermute_bwd";
    let dt = float_dtype(op, &[dy, yp])?;
    let dev = dev_of(op, &[dy, yp, weights, slot_row])?;
    let h = check_moe_rows(op, yp, "yp", tokens * k)?;
    dy.expect_shape(op, "dy", &[tokens, h])?;
    check_moe_weights(op, weights, tokens, k)?;
    let dyp = CudaStorage::alloc(&dev, yp.shape(), dt)?;
    let dw = CudaStorage::alloc(&dev, &[tokens, k], DType::F32)?;
    let slots = tokens * k;
    dev.launch(
        "moe",
        &format!("moe_unpermute_bwd_{}", sfx(op, dt)?),
        (
            slots
                .div_ceil(8)
                .clamp(1, dev.sm_count().max(1) as usize * 16) as u32,
            1,
            1,
        ),
        BLOCK,
        0,
        &mut [
            ptr(dy)?,
            ptr(yp)?,
            ptr(weights)?,
            ptr(slot_row)?,
            KArg::Ptr(dyp.ptr()),
            KArg::Ptr(dw.ptr()),
            KArg::I64(tokens as i64),
            KArg::I32(k as i32),
            KArg::I64(h as i64),
        ],
    )?;
    Ok((out(dyp), out(dw)))
}

// --------------------------------------------------------------------------------------------------------------
// GEMMs.

/// Row-major `C = op(A)·op(B)` into a fresh `[m, n]` tensor of dtype `c_dtype`.
#[allow(clippy::too_many_arguments)]
fn gemm_new(
    dev: &Arc<CudaDev>,
    a: u64,
    b: u64,
    mnk: (usize, usize, usize),
    trans: (bool, bool),
    ab: DType,
    c_dtype: DType,
) -> Result<CudaStorage> {
    let c = CudaStorage::alloc(dev, &[mnk.0, mnk.1], c_dtype)?;
    if mnk.2 == 0 {
        dev.memset_zero(c.ptr(), c.bytes())?;
        return Ok(c);
    }
    let stream = dev.stream();
    dev.with_lt(|lt| lt.gemm(stream, a, b, c.ptr(), mnk, trans, (ab, c_dtype), 0.0))?;
    Ok(c)
}

fn check_linear(op: &'static str, x: &Tensor, w: &Tensor) -> Result<(usize, usize, usize, DType)> {
    let dt = float_dtype(op, &[x, w])?;
    x.expect_rank(op, "x", 2)?;
    w.expect_rank(op, "w", 2)?;
    let (n, k) = (x.shape()[0], x.shape()[1]);
    let out = w.shape()[0];
    if w.shape()[1] != k {
        return Err(KernelError::shape(
            op,
            format!(
                "x {:?} · wᵀ with w {:?}: inner dims differ",
                x.shape(),
                w.shape()
            ),
        ));
    }
    Ok((n, k, out, dt))
}

/// `y = x·wᵀ` (dtype of x).
pub fn linear_fwd(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let op = "linear_fwd";
    let dev = dev_of(op, &[x, w])?;
    let (n, k, o, dt) = check_linear(op, x, w)?;
    Ok(out(gemm_new(
        &dev,
        st(x)?.ptr(),
        st(w)?.ptr(),
        (n, o, k),
        (false, true),
        dt,
        dt,
    )?))
}

/// `(dx = dy·w` in the dtype of x, `dw = dyᵀ·x` in f32`)`.
pub fn linear_bwd(dy: &Tensor, x: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor)> {
    let op = "linear_bwd";
    let dev = dev_of(op, &[dy, x, w])?;
    let (n, k, o, dt) = check_linear(op, x, w)?;
    dy.expect_dtype(op, dt)?;
    dy.expect_shape(op, "dy", &[n, o])?;
    let dx = gemm_new(
        &dev,
        st(dy)?.ptr(),
        st(w)?.ptr(),
        (n, k, o),
        (false, false),
        dt,
        dt,
    )?;
    let dw = gemm_new(
        &dev,
        st(dy)?.ptr(),
        st(x)?.ptr(),
        (o, k, n),
        (true, false),
        dt,
        DType::F32,
    )?;
    Ok((out(dx), out(dw)))
}

/// `a [m, k] · b [k, n]`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let op = "matmul";
    let dt = float_dtype(op, &[a, b])?;
    let dev = dev_of(op, &[a, b])?;
    a.expect_rank(op, "a", 2)?;
    b.expect_rank(op, "b", 2)?;
    if a.shape()[1] != b.shape()[0] {
        return Err(KernelError::shape(
            op,
            format!("{:?} · {:?}", a.shape(), b.shape()),
        ));
    }
    let (m, k, n) = (a.shape()[0], a.shape()[1], b.shape()[1]);
    Ok(out(gemm_new(
        &dev,
        st(a)?.ptr(),
        st(b)?.ptr(),
        (m, n, k),
        (false, false),
        dt,
        dt,
    )?))
}

fn check_groups(
    op: &'static str,
    x: &Tensor,
    ws: &[&Tensor],
    offsets: &[usize],
) -> Result<(usize, usize, DType)> {
    if ws.is_empty() {
        return Err(KernelError::invalid(op, "no weight groups"));
    }
    let mut all: Vec<&Tensor> = ws.to_vec();
    all.push(x);
    Tensor::common_device(op, &all)?;
    let dt = float_dtype(op, &all)?;
    x.expect_rank(op, "x", 2)?;
    let rows = x.shape()[0];
    if offsets.len() != ws.len() + 1
        || offsets[0] != 0
        || offsets[ws.len()] != rows
        || offsets.windows(2).any(|p| p[0] > p[1])
    {
        return Err(KernelError::invalid(
            op,
            format!(
                "offsets {offsets:?} must be non-decreasing from 0 to rows={rows} with {} groups",
                ws.len()
            ),
        ));
    }
    let o = ws[0].shape().first().copied().unwrap_or(0);
    for (g, w) in ws.iter().enumerate() {
        w.expect_shape(op, &format!("ws[{g}]"), &[o, x.shape()[1]])?;
    }
    Ok((rows, o, dt))
}

/// Grouped `y`: one GEMM per non-empty group, written in place into one output (no copies).
pub fn grouped_linear_fwd(x: &Tensor, ws: &[&Tensor], offsets: &[usize]) -> Result<Tensor> {
    let op = "grouped_linear_fwd";
    let (rows, o, dt) = check_groups(op, x, ws, offsets)?;
    let dev = st(x)?.dev().clone();
    let k = x.shape()[1];
    let es = dt.size_in_bytes();
    let y = CudaStorage::alloc(&dev, &[rows, o], dt)?;
    let stream = dev.stream();
    for (g, w) in ws.iter().enumerate() {
        let (r0, len) = (offsets[g], offsets[g + 1] - offsets[g]);
        if len == 0 {
            continue;
        }
        let xa = st(x)?.ptr() + (r0 * k * es) as u64;
        let ya = y.ptr() + (r0 * o * es) as u64;
        let wa = st(w)?.ptr();
        dev.with_lt(|lt| {
            lt.gemm(
                stream,
                xa,
                wa,
                ya,
                (len, o, k),
                (false, true),
                (dt, dt),
                0.0,
            )
        })?;
    }
    Ok(out(y))
}

/// Grouped backward: `dx` (dtype of x) and one f32 `dw` per group (zeros for empty groups).
pub fn grouped_linear_bwd(
    dy: &Tensor,
    x: &Tensor,
    ws: &[&Tensor],
    offsets: &[usize],
) -> Result<(Tensor, Vec<Tensor>)> {
    let op = "grouped_linear_bwd";
    let (rows, o, dt) = check_groups(op, x, ws, offsets)?;
    Tensor::common_device(op, &[dy, x])?;
    dy.expect_dtype(op, dt)?;
    dy.expect_shape(op, "dy", &[rows, o])?;
    let dev = st(x)?.dev().clone();
    let k = x.shape()[1];
    let es = dt.size_in_bytes();
    let dx = CudaStorage::alloc(&dev, &[rows, k], dt)?;
    let stream = dev.stream();
    let mut dws = Vec::with_capacity(ws.len());
    for (g, w) in ws.iter().enumerate() {
        let (r0, len) = (offsets[g], offsets[g + 1] - offsets[g]);
        let dw = CudaStorage::alloc(&dev, &[o, k], DType::F32)?;
        if len == 0 {
            dev.memset_zero(dw.ptr(), dw.bytes())?;
            dws.push(out(dw));
            continue;
        }
        let dya = st(dy)?.ptr() + (r0 * o * es) as u64;
        let xa = st(x)?.ptr() + (r0 * k * es) as u64;
        let dxa = dx.ptr() + (r0 * k * es) as u64;
        let wa = st(w)?.ptr();
        let dwa = dw.ptr();
        dev.with_lt(|lt| {
            lt.gemm(
                stream,
                dya,
                wa,
                dxa,
                (len, k, o),
                (false, false),
                (dt, dt),
                0.0,
            )?;
            lt.gemm(
                stream,
                dya,
                xa,
                dwa,
                (o, k, len),
                (true, false),
                (dt, DType::F32),
                0.0,
            )
        })?;
        dws.push(out(dw));
    }
    Ok((out(dx), dws))
}

// --------------------------------------------------------------------------------------------------------------
// Attention.

struct AttnDims {
    b: usize,
    s: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    dt: DType,
}

fn check_attn(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seg: Option<&Tensor>,
) -> Result<AttnDims> {
    let dt = float_dtype(op, &[q, k, v])?;
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        t.expect_rank(op, name, 4)?;
    }
    let (b, s, hq, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let hkv = k.shape()[2];
    k.expect_shape(op, "k", &[b, s, hkv, d])?;
    v.expect_shape(op, "v", &[b, s, hkv, d])?;
    if hkv == 0 || hq % hkv != 0 {
        return Err(KernelError::shape(
            op,
            format!("q_heads {hq} is not a multiple of kv_heads {hkv}"),
        ));
    }
    if d > 256 {
        return Err(super::unsupported(op, format!("head_dim {d} > 256")));
    }
    if let Some(seg) = seg {
        Tensor::common_device(op, &[q, seg])?;
        seg.expect_dtype(op, DType::U32)?;
        seg.expect_shape(op, "segment_ids", &[b, s])?;
    }
    Ok(AttnDims {
        b,
        s,
        hq,
        hkv,
        d,
        dt,
    })
}

fn d_bucket(d: usize) -> usize {
    if d <= 64 {
        64
    } else if d <= 128 {
        128
    } else {
        256
    }
}

const TILE: usize = 32;
const PTILES: usize = 4 * 8 * 32;

static ATTN_TC: AtomicBool = AtomicBool::new(true);

/// Chooses the tensor-core attention kernels (`attention_tc.cu`: Hopper, bf16, head_dim 64 or 128) when `on` (the
/// default), or forces the CUDA-core kernels (`attention.cu`: any float dtype, head_dim ≤ 256) for every call in
/// this process. The parity example checks both.
pub fn set_attention_tensor_cores(on: bool) {
    ATTN_TC.store(on, Ordering::Relaxed);
}

/// The tensor-core kernels are Hopper code (wgmma, TMA, setmaxnreg; built only for `sm_90a`); other GPUs use
/// `attention.cu`.
fn use_tc(dev: &CudaDev, dt: DType, d: usize) -> bool {
    dt == DType::BF16
        && (d == 64 || d == 128)
        && dev.compute_capability() == (9, 0)
        && ATTN_TC.load(Ordering::Relaxed)
}

// Launch shapes of the tensor-core kernels (see the header of attention_tc.cu): 384 threads (a producer and two
// consumer warpgroups) a block; fwd and dq own 128 queries a block, dkdv 128 keys; grid (batch·heads, blocks along
// the sequence). Dynamic shared memory (1024 B of it for aligning the swizzled tiles): fwd Q + 3 stages of K,V
// (128 rows) + 7 mbarriers; dq Q, dO + 2 stages of K,V (128 rows) + 5 mbarriers; dkdv K, V (128 rows) + 2 stages of
// Q, dO (64 rows) + 5 mbarriers + 2 stages of the tile's lse, Dd and segments.
const TC_ROWS: usize = 128;
const TC_THREADS: u32 = 384;

fn tc_smem_fwd(d: usize) -> usize {
    1024 + 128 * d * 2 + 3 * 2 * 128 * d * 2 + 8 * 7
}

fn tc_smem_dq(d: usize) -> usize {
    1024 + 2 * 128 * d * 2 + 2 * 2 * 128 * d * 2 + 8 * 5
}

fn tc_smem_dkdv(d: usize) -> usize {
    1024 + 2 * 128 * d * 2 + 2 * 2 * 64 * d * 2 + 8 * 5 + 2 * 3 * 64 * 4
}

/// TMA descriptor (`CUtensorMap`, passed by value) of a contiguous `[B, S, H, D]` bf16 tensor: boxes of 64 columns
/// × `rows` rows of one (batch, head), 128-byte swizzle (the layout the kernels' wgmma descriptors expect), rows
/// past S read as zeros.
fn tma_map(t: &Tensor, rows: usize) -> Result<KArg> {
    use cudarc::driver::sys;
    let sh = t.shape();
    let (b, s, h, d) = (sh[0], sh[1], sh[2], sh[3]);
    let dims: [u64; 4] = [d as u64, h as u64, s as u64, b as u64];
    let strides: [u64; 3] = [(d * 2) as u64, (h * d * 2) as u64, (s * h * d * 2) as u64];
    let boxd: [u32; 4] = [64, 1, rows as u32, 1];
    let elem: [u32; 4] = [1; 4];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::uninit();
    // SAFETY: `map` is a properly aligned CUtensorMap to write; the arrays outlive the call and have the lengths
    // the rank (4) implies; the address is a live device allocation of b·s·h·d bf16 elements.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            4,
            st(t)?.ptr() as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxd.as_ptr(),
            elem.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()?;
    }
    // SAFETY: initialised by the successful call above.
    let map = unsafe { map.assume_init() };
    let mut words = [0i64; 18];
    for (w, v) in words.iter_mut().zip(map.opaque.iter()) {
        *w = *v as i64;
    }
    Ok(KArg::Strides(words))
}

/// `(out, lse)`; see [`crate::ops::attention`].
pub fn attention_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seg: Option<&Tensor>,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let op = "attention_fwd";
    let dev = dev_of(op, &[q, k, v])?;
    let AttnDims {
        b,
        s,
        hq,
        hkv,
        d,
        dt,
    } = check_attn(op, q, k, v, seg)?;
    let o = CudaStorage::alloc(&dev, q.shape(), dt)?;
    let lse = CudaStorage::alloc(&dev, &[b, hq, s], DType::F32)?;
    let segp = match seg {
        Some(t) => st(t)?.ptr(),
        None => 0,
    };
    let tail = [
        KArg::Ptr(segp),
        KArg::Ptr(o.ptr()),
        KArg::Ptr(lse.ptr()),
        KArg::I32(s as i32),
        KArg::I32(hq as i32),
        KArg::I32(hkv as i32),
        KArg::I32(d as i32),
        KArg::F32(scale),
    ];
    if use_tc(&dev, dt, d) {
        let mut args = vec![tma_map(q, 128)?, tma_map(k, 128)?, tma_map(v, 128)?];
        args.extend(tail);
        dev.launch(
            "attention_tc",
            &format!("attn_fwd_tc_d{d}"),
            ((b * hq) as u32, s.div_ceil(TC_ROWS) as u32, 1),
            TC_THREADS,
            tc_smem_fwd(d) as u32,
            &mut args,
        )?;
    } else {
        let smem = 4 * (TILE * d + TILE * (d + 1) + TILE * d + TILE + PTILES);
        let mut args = vec![ptr(q)?, ptr(k)?, ptr(v)?];
        args.extend(tail);
        dev.launch(
            "attention",
            &format!("attn_fwd_{}_d{}", sfx(op, dt)?, d_bucket(d)),
            (s.div_ceil(TILE) as u32, hq as u32, b as u32),
            128,
            smem as u32,
            &mut args,
        )?;
    }
    Ok((out(o), out(lse)))
}

/// `(dq, dk, dv)` in the dtype of q; see [`crate::ops::attention`].
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    seg: Option<&Tensor>,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "attention_bwd";
    let dev = dev_of(op, &[dout, q, k, v, o, lse])?;
    let AttnDims {
        b,
        s,
        hq,
        hkv,
        d,
        dt,
    } = check_attn(op, q, k, v, seg)?;
    dout.expect_dtype(op, dt)?;
    o.expect_dtype(op, dt)?;
    dout.expect_shape(op, "dout", q.shape())?;
    o.expect_shape(op, "out", q.shape())?;
    lse.expect_dtype(op, DType::F32)?;
    lse.expect_shape(op, "lse", &[b, hq, s])?;
    let sf = sfx(op, dt)?;
    let segp = match seg {
        Some(t) => st(t)?.ptr(),
        None => 0,
    };
    let dd = CudaStorage::alloc(&dev, &[b, hq, s], DType::F32)?;
    let rows = b * s * hq;
    dev.launch(
        "attention",
        &format!("attn_bwd_dot_{sf}"),
        (
            rows.div_ceil(8)
                .clamp(1, dev.sm_count().max(1) as usize * 16) as u32,
            1,
            1,
        ),
        BLOCK,
        0,
        &mut [
            ptr(dout)?,
            ptr(o)?,
            KArg::Ptr(dd.ptr()),
            KArg::I32(b as i32),
            KArg::I32(s as i32),
            KArg::I32(hq as i32),
            KArg::I32(d as i32),
        ],
    )?;
    let dq = CudaStorage::alloc(&dev, q.shape(), dt)?;
    let dk = CudaStorage::alloc(&dev, k.shape(), dt)?;
    let dv = CudaStorage::alloc(&dev, v.shape(), dt)?;
    let dims = [
        KArg::I32(s as i32),
        KArg::I32(hq as i32),
        KArg::I32(hkv as i32),
        KArg::I32(d as i32),
        KArg::F32(scale),
    ];
    if use_tc(&dev, dt, d) {
        let mut args = vec![
            tma_map(q, 128)?,
            tma_map(k, 128)?,
            tma_map(v, 128)?,
            tma_map(dout, 128)?,
            KArg::Ptr(segp),
            ptr(lse)?,
            KArg::Ptr(dd.ptr()),
            KArg::Ptr(dq.ptr()),
        ];
        args.extend(dims);
        dev.launch(
            "attention_tc",
            &format!("attn_bwd_dq_tc_d{d}"),
            ((b * hq) as u32, s.div_ceil(TC_ROWS) as u32, 1),
            TC_THREADS,
            tc_smem_dq(d) as u32,
            &mut args,
        )?;
        let mut args = vec![
            tma_map(q, 64)?,
            tma_map(k, 128)?,
            tma_map(v, 128)?,
            tma_map(dout, 64)?,
            KArg::Ptr(segp),
            ptr(lse)?,
            KArg::Ptr(dd.ptr()),
            KArg::Ptr(dk.ptr()),
            KArg::Ptr(dv.ptr()),
        ];
        args.extend(dims);
        dev.launch(
            "attention_tc",
            &format!("attn_bwd_dkdv_tc_d{d}"),
            ((b * hkv) as u32, s.div_ceil(TC_ROWS) as u32, 1),
            TC_THREADS,
            tc_smem_dkdv(d) as u32,
            &mut args,
        )?;
    } else {
        let grid = (s.div_ceil(TILE) as u32, hq as u32, b as u32);
        let smem = 4 * (2 * TILE * d + 2 * TILE * (d + 1) + TILE + PTILES);
        let mut args = vec![
            ptr(q)?,
            ptr(k)?,
            ptr(v)?,
            KArg::Ptr(segp),
            ptr(dout)?,
            ptr(lse)?,
            KArg::Ptr(dd.ptr()),
            KArg::Ptr(dq.ptr()),
        ];
        args.extend(dims);
        let name = format!("attn_bwd_dq_{sf}_d{}", d_bucket(d));
        dev.launch("attention", &name, grid, 128, smem as u32, &mut args)?;
        let grid = (s.div_ceil(TILE) as u32, hkv as u32, b as u32);
        let smem = 4 * (2 * TILE * d + 2 * TILE * (d + 1) + 3 * TILE + 2 * PTILES);
        let mut args = vec![
            ptr(q)?,
            ptr(k)?,
            ptr(v)?,
            KArg::Ptr(segp),
            ptr(dout)?,
            ptr(lse)?,
            KArg::Ptr(dd.ptr()),
            KArg::Ptr(dk.ptr()),
            KArg::Ptr(dv.ptr()),
        ];
        args.extend(dims);
        let name = format!("attn_bwd_dkdv_{sf}_d{}", d_bucket(d));
        dev.launch("attention", &name, grid, 128, smem as u32, &mut args)?;
    }
    Ok((out(dq), out(dk), out(dv)))
}
