//! Qwen3-MoE sparse block, explicit forward and backward.
//!
//! ```text
//! xn [T, hidden] ──router── logits = xn·Wrᵀ [T, E] → softmax → top-k (idx, weight [T, k], renormalised if
//!                           norm_topk_prob)
//!    ──permute── xp [T·k, hidden], rows grouped by expert
//!    ──experts── gate, up [T·k, f] → h = silu(gate) ⊙ up → yp = h·Wdᵀ [T·k, hidden] (grouped GEMMs)
//!    ──unpermute── y_t = Σ_j weight[t, j] · yp[row(t, j)]  [T, hidden]
//! ```
//! Backward: unpermute gives `dyp` and `dweight`; the experts give `dxp` (scattered back to tokens) and the
//! expert weight gradients; `dweight` plus the aux-loss gradient on the probabilities go through the router
//! backward to `dlogits`, then to `dxn` and the router weight gradient. The top-k indices are constants.
//!
//! The aux loss needs statistics over all MoE layers, so the forward returns this layer's [`RouterStats`] and
//! the backward takes the merged ones (see [`qkernels::ops::router`]); the distributed drivers first sum them over
//! the ranks that saw other tokens ([`all_reduce_router_stats`]).

use qkernels::Tensor;
use qkernels::ops::{self, MoePlan, RouterOut, RouterStats};

use super::error::Result;
use super::params::{Mlp, SparseMoe};

/// The gradient of the load-balancing loss: merged statistics of every MoE layer and the coefficient.
#[derive(Debug, Clone, Copy)]
pub struct AuxLossGrad<'a> {
    /// Statistics merged over all MoE layers of the forward pass.
    pub stats: &'a RouterStats,
    /// `router_aux_loss_coef` (times the upstream gradient of the total loss, 1 for plain training).
    pub coef: f64,
}

/// Sums `s` over `group`, whose ranks saw different tokens: routing statistics are sums over tokens, so the sum over
/// every such rank is the statistics of all their tokens (what the distributed drivers need before any backward).
/// Collective over `group`; no-op for a group of one.
pub fn all_reduce_router_stats(
    s: &mut RouterStats,
    group: &dyn crate::comm::Communicator,
) -> std::result::Result<(), crate::comm::CommError> {
    if group.size() == 1 {
        return Ok(());
    }
    let e = s.assignments.len();
    let mut buf: Vec<f32> = s
        .assignments
        .iter()
        .chain(&s.prob_sums)
        .chain(std::iter::once(&s.rows))
        .map(|&v| v as f32)
        .collect();
    group.all_reduce(&mut buf, crate::comm::ReduceOp::Sum)?;
    s.assignments = buf[..e].iter().map(|&v| v as f64).collect();
    s.prob_sums = buf[e..2 * e].iter().map(|&v| v as f64).collect();
    s.rows = buf[2 * e] as f64;
    Ok(())
}

/// What [`SparseMoe::forward`] keeps for its backward.
#[derive(Debug, Clone)]
pub struct MoeSaved {
    /// `[T, hidden]`
    xn: Tensor,
    /// probs `[T, E]`, topk_idx / topk_weight `[T, k]`.
    routing: RouterOut,
    /// Expert-grouped layout of the `T·k` (token, slot) rows.
    plan: MoePlan,
    /// `[T·k, hidden]`
    xp: Tensor,
    /// `[T·k, f]`
    gate: Tensor,
    /// `[T·k, f]`
    up: Tensor,
    /// `[T·k, f]`
    h: Tensor,
    /// `[T·k, hidden]`: expert outputs before weighting.
    yp: Tensor,
    /// This layer's contribution to the aux-loss statistics.
    pub(crate) stats: RouterStats,
}

impl MoeSaved {
    /// This layer's routing statistics (merge them over layers for the aux loss).
    pub fn stats(&self) -> &RouterStats {
        &self.stats
    }

    /// The router's outputs (probabilities, selected experts, weights).
    pub fn routing(&self) -> &RouterOut {
        &self.routing
    }
}

/// `(gate, up, down)` weight lists of the experts, for the grouped GEMMs.
pub(crate) fn expert_weights(experts: &[Mlp]) -> [Vec<&Tensor>; 3] {
    [
        experts.iter().map(|e| &e.gate_proj).collect(),
        experts.iter().map(|e| &e.up_proj).collect(),
        experts.iter().map(|e| &e.down_proj).collect(),
    ]
}

impl SparseMoe {
    /// `y [T, hidden]` from `xn [T, hidden]`.
    pub fn forward(
        &self,
        xn: &Tensor,
        top_k: usize,
        norm_topk_prob: bool,
    ) -> Result<(Tensor, MoeSaved)> {
        let e = self.experts.len();
        let logits = ops::linear_fwd(xn, &self.gate)?; // [T, E]
        let routing = ops::router_fwd(&logits, top_k, norm_topk_prob)?;
        let plan = ops::moe_plan(&routing.topk_idx, e)?;
        let xp = ops::moe_permute(xn, &plan)?; // [T·k, hidden]
        let [wg, wu, wd] = expert_weights(&self.experts);
        let offs = &plan.expert_offsets;
        let gate = ops::grouped_linear_fwd(&xp, &wg, offs)?;
        let up = ops::grouped_linear_fwd(&xp, &wu, offs)?;
        let h = ops::swiglu_fwd(&gate, &up)?;
        let yp = ops::grouped_linear_fwd(&h, &wd, offs)?;
        let y = ops::moe_unpermute(&yp, &routing.topk_weight, &plan)?;
        let stats = RouterStats::from_router(&routing)?;
        Ok((
            y,
            MoeSaved {
                xn: xn.clone(),
                routing,
                plan,
                xp,
                gate,
                up,
                h,
                yp,
                stats,
            },
        ))
    }

    /// `(dxn [T, hidden], weight gradients)` from `dy [T, hidden]`; `aux` adds the load-balancing loss gradient.
    pub fn backward(
        &self,
        dy: &Tensor,
        saved: &MoeSaved,
        norm_topk_prob: bool,
        aux: Option<AuxLossGrad<'_>>,
    ) -> Result<(Tensor, SparseMoe)> {
        let t = saved.plan.tokens;
        let (dyp, dweight) =
            ops::moe_unpermute_bwd(dy, &saved.yp, &saved.routing.topk_weight, &saved.plan)?;
        let [wg, wu, wd] = expert_weights(&self.experts);
        let offs = &saved.plan.expert_offsets;
        let (dh, d_down) = ops::grouped_linear_bwd(&dyp, &saved.h, &wd, offs)?;
        let g_act = ops::swiglu_bwd(&dh, &saved.gate, &saved.up)?;
        let (dxp_g, d_gate) = ops::grouped_linear_bwd(&g_act.dgate, &saved.xp, &wg, offs)?;
        let (dxp_u, d_up) = ops::grouped_linear_bwd(&g_act.dup, &saved.xp, &wu, offs)?;
        let dxn_experts = ops::moe_permute_bwd(&dxp_g.add(&dxp_u)?, &saved.plan)?;

        let dprobs = match aux {
            Some(a) if a.coef != 0.0 => Some(a.stats.aux_dprobs(t, a.coef, &dy.device())?),
            _ => None,
        };
        let dlogits = ops::router_bwd(&dweight, dprobs.as_ref(), &saved.routing, norm_topk_prob)?
            .to_dtype(saved.xn.dtype())?; // router maths is f32; the GEMM takes the activations' dtype
        let g_router = ops::linear_bwd(&dlogits, &saved.xn, &self.gate)?;
        let dxn = dxn_experts
            .to_dtype(g_router.dx.dtype())?
            .add(&g_router.dx)?; // scatter-add is f32

        let experts = d_gate
            .into_iter()
            .zip(d_up)
            .zip(d_down)
            .map(|((gate_proj, up_proj), down_proj)| Mlp {
                gate_proj,
                up_proj,
                down_proj,
            })
            .collect();
        Ok((
            dxn,
            SparseMoe {
                gate: g_router.dw,
                experts,
            },
        ))
    }
}
