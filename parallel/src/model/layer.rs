//! One Qwen3 decoder layer, explicit forward and backward, with optional activation recomputation.
//!
//! ```text
//! x [T, hidden] ─┬─ rmsnorm(input_layernorm) ── self_attn ──(+)── h ─┬─ rmsnorm(post_attention_layernorm) ── mlp ──(+)── y
//!                └──────────────────────────────────────────────┘    └──────────────────────────────────────────────┘
//! ```
//! The residual adds pass gradients through unchanged, so backward is
//! `dh = dy + norm2_bwd(mlp_bwd(dy))` and `dx = dh + norm1_bwd(attn_bwd(dh))`.
//!
//! Recomputation (`gradient_checkpointing`): the forward keeps only the layer input (and the tiny routing
//! statistics the aux loss needs); backward reruns the forward from it, then the usual backward. The forward is
//! deterministic, so gradients are bit-identical to the non-recomputed ones.

use qkernels::ops::{self, RopeTable, RouterStats};
use qkernels::{Device, Tensor};

use super::attention::AttentionSaved;
use super::config::ModelConfig;
use super::error::{ModelError, Result};
use super::mlp::MlpSaved;
use super::moe::{AuxLossGrad, MoeSaved};
use super::params::{DecoderLayer, Ffn};

/// Per-batch values every layer needs.
#[derive(Debug, Clone, Copy)]
pub struct LayerCtx<'a> {
    pub cfg: &'a ModelConfig,
    /// Rows of the batch.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// cos/sin for the batch's position ids, `[T, head_dim/2]`.
    pub rope: &'a RopeTable,
    /// `[batch, seq]` (u32) packed-sample ids, or `None`.
    pub segment_ids: Option<&'a Tensor>,
}

impl LayerCtx<'_> {
    /// `T = batch·seq`.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }
}

/// Saved activations of the feed-forward part.
#[derive(Debug, Clone)]
pub enum FfnSaved {
    Dense(MlpSaved),
    Moe(MoeSaved),
}

/// Every activation a layer's backward needs.
#[derive(Debug, Clone)]
pub struct LayerActs {
    /// `[T, hidden]`: layer input.
    x: Tensor,
    /// `[T]`
    rstd1: Tensor,
    attn: AttentionSaved,
    /// `[T, hidden]`: residual stream after attention.
    h: Tensor,
    /// `[T]`
    rstd2: Tensor,
    ffn: FfnSaved,
}

/// What a layer's forward leaves for its backward.
#[derive(Debug, Clone)]
pub enum LayerSaved {
    /// All activations.
    Full(Box<LayerActs>),
    /// Only the input `[T, hidden]` and the routing statistics; backward recomputes the rest.
    Recompute {
        x: Tensor,
        router_stats: Option<RouterStats>,
    },
}

impl LayerSaved {
    /// This layer's MoE routing statistics (`None` for dense layers).
    pub fn router_stats(&self) -> Option<&RouterStats> {
        match self {
            LayerSaved::Full(a) => match &a.ffn {
                FfnSaved::Moe(m) => Some(m.stats()),
                FfnSaved::Dense(_) => None,
            },
            LayerSaved::Recompute { router_stats, .. } => router_stats.as_ref(),
        }
    }
}

/// `(top_k, norm_topk_prob)` of a MoE config.
fn routing_of(cfg: &ModelConfig) -> (usize, bool) {
    cfg.moe
        .as_ref()
        .map(|m| (m.num_experts_per_tok, m.norm_topk_prob))
        .unwrap_or((1, false))
}

impl DecoderLayer {
    fn forward_acts(&self, x: &Tensor, ctx: &LayerCtx<'_>) -> Result<(Tensor, LayerActs)> {
        let eps = ctx.cfg.rms_norm_eps;
        let n1 = ops::rmsnorm_fwd(x, &self.input_layernorm, eps)?;
        let (a, attn) = self.self_attn.forward(&n1.y, ctx)?;
        let h = x.add(&a)?;
        let n2 = ops::rmsnorm_fwd(&h, &self.post_attention_layernorm, eps)?;
        let (m, ffn) = match &self.mlp {
            Ffn::Dense(mlp) => {
                let (m, s) = mlp.forward(&n2.y)?;
                (m, FfnSaved::Dense(s))
            }
            Ffn::Moe(moe) => {
                let (top_k, norm) = routing_of(ctx.cfg);
                let (m, s) = moe.forward(&n2.y, top_k, norm)?;
                (m, FfnSaved::Moe(s))
            }
        };
        let y = h.add(&m)?;
        Ok((
            y,
            LayerActs {
                x: x.clone(),
                rstd1: n1.rstd,
                attn,
                h,
                rstd2: n2.rstd,
                ffn,
            },
        ))
    }

    /// `y [T, hidden]` from `x [T, hidden]`. With `recompute`, only `x` is kept for backward.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &LayerCtx<'_>,
        recompute: bool,
    ) -> Result<(Tensor, LayerSaved)> {
        let (y, acts) = self.forward_acts(x, ctx)?;
        let saved = if recompute {
            let router_stats = match acts.ffn {
                FfnSaved::Moe(m) => Some(m.stats),
                FfnSaved::Dense(_) => None,
            };
            LayerSaved::Recompute {
                x: acts.x,
                router_stats,
            }
        } else {
            LayerSaved::Full(Box::new(acts))
        };
        Ok((y, saved))
    }

    /// `(dx [T, hidden], gradients)` from `dy [T, hidden]`. `aux` is the load-balancing loss gradient (used by
    /// MoE layers only).
    pub fn backward(
        &self,
        dy: &Tensor,
        saved: LayerSaved,
        ctx: &LayerCtx<'_>,
        aux: Option<AuxLossGrad<'_>>,
    ) -> Result<(Tensor, DecoderLayer)> {
        let acts = match saved {
            LayerSaved::Full(a) => *a,
            LayerSaved::Recompute { x, .. } => self.forward_acts(&x, ctx)?.1,
        };
        let (mlp_dx, mlp_grads) = match (&self.mlp, &acts.ffn) {
            (Ffn::Dense(mlp), FfnSaved::Dense(s)) => {
                let (d, g) = mlp.backward(dy, s)?;
                (d, Ffn::Dense(g))
            }
            (Ffn::Moe(moe), FfnSaved::Moe(s)) => {
                let (_, norm) = routing_of(ctx.cfg);
                let (d, g) = moe.backward(dy, s, norm, aux)?;
                (d, Ffn::Moe(g))
            }
            (Ffn::Dense(_), FfnSaved::Moe(_)) => {
                return Err(ModelError::SavedMismatch("dense layer, MoE activations"));
            }
            (Ffn::Moe(_), FfnSaved::Dense(_)) => {
                return Err(ModelError::SavedMismatch("MoE layer, dense activations"));
            }
        };
        let g_n2 = ops::rmsnorm_bwd(
            &mlp_dx,
            &acts.h,
            &self.post_attention_layernorm,
            &acts.rstd2,
        )?;
        let dh = dy.add(&g_n2.dx)?;
        let (attn_dx, attn_grads) = self.self_attn.backward(&dh, &acts.attn, ctx)?;
        let g_n1 = ops::rmsnorm_bwd(&attn_dx, &acts.x, &self.input_layernorm, &acts.rstd1)?;
        let dx = dh.add(&g_n1.dx)?;
        let grads = DecoderLayer {
            input_layernorm: g_n1.dw,
            self_attn: attn_grads,
            post_attention_layernorm: g_n2.dw,
            mlp: mlp_grads,
        };
        Ok((dx, grads))
    }
}

/// Builds the per-batch RoPE table and segment tensor on `device`.
pub(crate) fn rope_and_segments(
    cfg: &ModelConfig,
    position_ids: &[u32],
    segment_ids: Option<&[u32]>,
    batch: usize,
    seq: usize,
    device: &Device,
) -> Result<(RopeTable, Option<Tensor>)> {
    let pos = Tensor::from_u32(position_ids.to_vec(), &[batch * seq], device)?;
    let rope = RopeTable::new(&pos, cfg.head_dim, cfg.rope_theta)?;
    let seg = segment_ids
        .map(|s| Tensor::from_u32(s.to_vec(), &[batch, seq], device))
        .transpose()?;
    Ok((rope, seg))
}
