//! The conjugate collective pairs of tensor and sequence parallelism, on `[rows, cols]` f32 tensors
//! (see the [module docs](super) for the maths). Each forward map has a `*_backward` that is its adjoint.
//!
//! | forward | backward |
//! | --- | --- |
//! | [`copy_to_tp_region`] `f`: identity | [`copy_to_tp_region_backward`]: all-reduce (sum) |
//! | [`reduce_from_tp_region`] `g`: all-reduce (sum) | [`reduce_from_tp_region_backward`]: identity |
//! | [`gather_from_sp_region`]: all-gather rows `[R/p, C] → [R, C]` | [`gather_from_sp_region_backward`]: reduce-scatter rows |
//! | [`reduce_scatter_to_sp_region`]: reduce-scatter rows `[R, C] → [R/p, C]` | [`reduce_scatter_to_sp_region_backward`]: all-gather rows |
//!
//! [`enter`] / [`exit`] pick the pair for a TP region (before a column-parallel / after a row-parallel layer)
//! from the `sp` flag, so the layer code states *where* a region starts and ends, not *how*.
//!
//! Where the data moves: [`crate::comm::tensor`] — through NCCL on device buffers when the tensors live on a GPU
//! and the group is an [`NcclGroup`](crate::comm::NcclGroup) (bf16 activations stay bf16 on the wire, f32
//! gradients f32), through the host communicator otherwise (the CPU reference).

use qkernels::Tensor;

use super::{Result, TpError};
use crate::comm::{Communicator, ReduceOp, tensor};

fn rows_cols(x: &Tensor) -> Result<(usize, usize)> {
    match x.shape() {
        [r, c] => Ok((*r, *c)),
        s => Err(TpError::Shard {
            name: "activation".into(),
            detail: format!("expected a [rows, cols] tensor, got {s:?}"),
        }),
    }
}

/// `f` forward: identity (the input is already replicated on every TP rank).
pub fn copy_to_tp_region(x: &Tensor) -> Tensor {
    x.clone()
}

/// `f` backward: `dX = Σ_i dX^{(i)}` (all-reduce over the TP group).
pub fn copy_to_tp_region_backward(dx: &Tensor, tp: &dyn Communicator) -> Result<Tensor> {
    all_reduce_sum(dx, tp)
}

/// `g` forward: `Y = Σ_i Y^{(i)}` (all-reduce over the TP group).
pub fn reduce_from_tp_region(y: &Tensor, tp: &dyn Communicator) -> Result<Tensor> {
    all_reduce_sum(y, tp)
}

/// `g` backward: identity.
pub fn reduce_from_tp_region_backward(dy: &Tensor) -> Tensor {
    dy.clone()
}

/// SP forward before a column-parallel layer: all-gather row shards `[R/p, C]` into `[R, C]` (rank order).
pub fn gather_from_sp_region(x: &Tensor, tp: &dyn Communicator) -> Result<Tensor> {
    rows_cols(x)?;
    Ok(tensor::all_gather_rows(x, tp)?)
}

/// Adjoint of [`gather_from_sp_region`]: reduce-scatter `[R, C]` into this rank's summed row shard `[R/p, C]`.
pub fn gather_from_sp_region_backward(dx: &Tensor, tp: &dyn Communicator) -> Result<Tensor> {
    reduce_scatter_rows(dx, tp)
}

/// SP forward after a row-parallel layer: reduce-scatter partial sums `[R, C]` into this rank's row shard of
/// `Σ_i Y^{(i)}`, `[R/p, C]`.
pub fn reduce_scatter_to_sp_region(y: &Tensor, tp: &dyn Communicator) -> Result<Tensor> {
    reduce_scatter_rows(y, tp)
}

/// Adjoint of [`reduce_scatter_to_sp_region`]: all-gather the row shards of `dY`.
pub fn reduce_scatter_to_sp_region_backward(dy: &Tensor, tp: &dyn Communicator) -> Result<Tensor> {
    gather_from_sp_region(dy, tp)
}

/// Entering a TP region (before column-parallel layers): `f` without SP, the SP all-gather with it.
pub fn enter(x: &Tensor, tp: &dyn Communicator, sp: bool) -> Result<Tensor> {
    if sp {
        gather_from_sp_region(x, tp)
    } else {
        Ok(copy_to_tp_region(x))
    }
}

/// Backward of [`enter`]: all-reduce without SP, reduce-scatter with it.
pub fn enter_backward(dx: &Tensor, tp: &dyn Communicator, sp: bool) -> Result<Tensor> {
    if sp {
        gather_from_sp_region_backward(dx, tp)
    } else {
        copy_to_tp_region_backward(dx, tp)
    }
}

/// Leaving a TP region (after row-parallel layers): `g` without SP, the SP reduce-scatter with it.
pub fn exit(y: &Tensor, tp: &dyn Communicator, sp: bool) -> Result<Tensor> {
    if sp {
        reduce_scatter_to_sp_region(y, tp)
    } else {
        reduce_from_tp_region(y, tp)
    }
}

/// Backward of [`exit`]: identity without SP, all-gather with it.
pub fn exit_backward(dy: &Tensor, tp: &dyn Communicator, sp: bool) -> Result<Tensor> {
    if sp {
        reduce_scatter_to_sp_region_backward(dy, tp)
    } else {
        Ok(reduce_from_tp_region_backward(dy))
    }
}

/// Sum over `comm` of a tensor of any shape (a clone for a group of one), in the tensor's dtype.
pub fn all_reduce_sum(x: &Tensor, comm: &dyn Communicator) -> Result<Tensor> {
    Ok(tensor::all_reduce(x, comm, ReduceOp::Sum)?)
}

fn reduce_scatter_rows(x: &Tensor, tp: &dyn Communicator) -> Result<Tensor> {
    let (r, _) = rows_cols(x)?;
    let p = tp.size();
    if !r.is_multiple_of(p) {
        return Err(TpError::TokensNotDivisible { tokens: r, tp: p });
    }
    Ok(tensor::reduce_scatter_rows(x, tp, ReduceOp::Sum)?)
}

/// Row shard `rank` of `[R, C]`: rows `[rank·R/p, (rank+1)·R/p)`.
pub fn split_rows(x: &Tensor, parts: usize, rank: usize) -> Result<Tensor> {
    let (r, _) = rows_cols(x)?;
    if !r.is_multiple_of(parts) {
        return Err(TpError::TokensNotDivisible {
            tokens: r,
            tp: parts,
        });
    }
    Ok(x.narrow(0, rank * r / parts, r / parts)?)
}
