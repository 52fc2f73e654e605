//! Expert parallelism inside a tensor-parallel model (`ep > 1` with `tp ≥ 1`, `pp = cp = 1`; with `tp > 1` sequence
//! parallelism is required, as in Megatron-Core): Megatron's "expert-parallel folding" of [`crate::dims`] puts the
//! MoE layers on the same `dp·tp` ranks as the dense layers, re-factored as `edp·ep·etp` (`etp` defaults to `tp`).
//!
//! # Where the tokens are
//!
//! With SP the residual stream of TP rank `i` is its own `T/tp` rows, so every rank of a dp × tp layout holds
//! *different* tokens — exactly what the EP token dispatcher of [`crate::expert_parallel`] assumes of the ranks of
//! one EP×ETP group. The sparse block therefore runs on the rank's SP rows `n2 [T/tp, H]` directly
//! ([`moe_forward`](crate::expert_parallel::moe_forward) / [`moe_backward`](crate::expert_parallel::moe_backward), collective over EP and ETP) and its output `[T/tp, H]` is already in the
//! residual's layout: no TP enter/exit around it. (Without SP the TP ranks hold the same tokens and would route them
//! twice; that layout is refused.)
//!
//! # Gradients and the optimizer
//!
//! - The router `gate [E, H]` is replicated: its per-rank gradient covers the rank's tokens, so it is summed over
//!   TP (SP, as the norms) and then over DP.
//! - Expert shards (`E/ep` experts, each `f/etp` wide) differ across the EP and ETP ranks; ranks with the same shard
//!   (the expert-dp group, `edp = dp·tp/(ep·etp)`) hold different tokens, so their gradients are summed over
//!   expert-dp, not over dp.
//! - Since dp ranks then hold different parameter sets, the DP-sharded ZeRO layout does not apply: the model reduces
//!   its gradients itself ([`TpModel::reduce_optimizer_grads`](super::TpModel::reduce_optimizer_grads): non-expert
//!   tensors over dp, experts over expert-dp) and the optimizer steps every local parameter with a dp group of one
//!   ([`TpModel::optimizer_dp`](super::TpModel::optimizer_dp)), the norm summed over all ranks with each element
//!   counted once (non-expert tensors on dp rank 0 by the TP rule, expert shards on expert-dp rank 0).
//!
//! Checkpoints stay layout-independent: `local_from_full` shards the experts after the TP slicing, `gather_full`
//! gathers them over the etp-ep group before the TP gather.

use super::{Result, TpError};
use crate::dims::ParallelDims;
use crate::expert_parallel::ExpertLayout;
use crate::model::ModelConfig;

/// Checks that `dims` can run expert parallelism in a TP model and returns this rank's expert layout (`None` when
/// `ep = 1`: the MoE experts are then replicated over TP as before).
pub(crate) fn expert_layout(cfg: &ModelConfig, dims: &ParallelDims, rank: usize) -> Result<Option<ExpertLayout>> {
    if dims.ep() == 1 {
        return Ok(None);
    }
    let moe = cfg.moe.as_ref().ok_or_else(|| {
        TpError::Unsupported(format!("ep = {} but the model has no experts", dims.ep()))
    })?;
    if dims.pp() > 1 || dims.cp() > 1 {
        return Err(TpError::Unsupported(format!(
            "ep = {} with pp = {}, cp = {}: expert parallelism runs with dp × tp (+ sp) only",
            dims.ep(),
            dims.pp(),
            dims.cp()
        )));
    }
    if dims.tp() > 1 && !dims.sp() {
        return Err(TpError::Unsupported(format!(
            "ep = {} with tp = {} needs sequence parallelism (sp: true), so that every rank routes its own tokens",
            dims.ep(),
            dims.tp()
        )));
    }
    Ok(Some(
        ExpertLayout::from_dims(dims, rank, moe.num_experts, moe.moe_intermediate_size)
            .map_err(TpError::from)?,
    ))
}
