//! [`CpEpModel`]: one rank's share of a Qwen3 model under `dp × cp` (dense view) folded into `edp × ep × etp`
//! (expert view), `tp = pp = 1`; explicit forward and backward over the unchanged blocks, and the process groups
//! it talks over ([`CpEpGroups`]).
//!
//! Per rank: the full dense weights (replicated over dp × cp), the router (replicated), and the expert shards of
//! [`ExpertLayout`]; the tokens of its dp rows and cp chunks ([`CpEpModel::local_batch`]).
//!
//! ```text
//! ids (local) ── embed ── x ─┬ layer: n1 = rmsnorm(x) ── attention (CpAttention core: AG K/V, indexed mask) ── h = x + ·
//!                            │        n2 = rmsnorm(h) ── dense MLP (local)  |  MoE (expert_parallel: D, experts, C) ── y = h + ·
//!                            └ … ── rmsnorm ── head ── CE(Σ local w·CE / W_global)
//! ```
//! See the [module docs](super) and [`crate::expert_parallel`] for the maths and the collective pairs.

use qkernels::ops::{self, RopeTable, RouterStats};
use qkernels::{Device, Tensor};

use super::{CpAttention, CpBatch, CpError, Result, shard_batch};
use crate::comm::{Communicator, ReduceOp};
use crate::dims::{GroupKind, ModelShape, ParallelDims};
use crate::expert_parallel::{
    EpMoeSaved, ExpertComms, ExpertGroups, ExpertLayout, gather_experts, is_expert_param, moe_backward, moe_forward,
    reduce_split, shard_experts,
};
use crate::model::attention::{AttentionCore, AttentionSaved, LocalAttention};
use crate::model::layer::{LayerCtx, rope_and_segments};
use crate::model::mlp::MlpSaved;
use crate::model::moe::{AuxLossGrad, all_reduce_router_stats};
use crate::model::params::{NamedMismatch, fill_from_named};
use crate::model::{Batch, DecoderLayer, Ffn, ModelConfig, NamedTensors, Qwen3Params};
use crate::optim::AdamWConfig;
use crate::tensor_parallel::split_batch_rows;
use crate::zero::{DeviceDistributedOptimizer, DistributedOptimizer, StepStats, ZeroConfig};

/// The communicators of one rank (every one a group of one when its dimension is 1).
pub struct CpEpGroups {
    /// Context parallel: the K/V all-gather and dK/dV reduce-scatter.
    pub cp: Box<dyn Communicator>,
    /// Data × context parallel: loss normaliser, loss, routing statistics, replicated-weight gradients.
    pub dp_cp: Box<dyn Communicator>,
    /// Expert parallelism (groups of one when ep = etp = 1), the norm's group of every rank and the optimizer's
    /// dp group of one ([`CpEpModel::step`]).
    pub experts: ExpertComms,
}

impl std::fmt::Debug for CpEpGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpEpGroups")
            .field("cp", &self.cp.global_ranks())
            .field("dp_cp", &self.dp_cp.global_ranks())
            .field("ep", &self.experts.ep.global_ranks())
            .field("etp", &self.experts.etp.global_ranks())
            .field("expert_dp", &self.experts.expert_dp.global_ranks())
            .finish()
    }
}

fn check_supported(dims: &ParallelDims) -> Result<()> {
    let bad: Vec<String> = [("tp", dims.tp()), ("pp", dims.pp()), ("vpp", dims.vpp())]
        .into_iter()
        .filter(|(_, v)| *v != 1)
        .map(|(n, v)| format!("{n} = {v}"))
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(CpError::Unsupported(format!(
            "{} (the cp/ep driver runs dp × cp × ep × etp with tp = pp = 1)",
            bad.join(", ")
        )))
    }
}

impl CpEpGroups {
    /// Splits `world` into the groups of `dims`. Collective over `world` (every rank calls it, in the same order
    /// relative to other splits).
    pub fn new(world: &dyn Communicator, dims: &ParallelDims) -> Result<Self> {
        check_supported(dims)?;
        if world.size() != dims.world() {
            return Err(CpError::Groups(format!(
                "world communicator has {} ranks, the layout {}",
                world.size(),
                dims.world()
            )));
        }
        Ok(CpEpGroups {
            cp: world.split(&dims.groups(GroupKind::Cp))?,
            dp_cp: world.split(&dims.groups(GroupKind::DpCp))?,
            experts: ExpertComms::new(world, dims)?,
        })
    }

    fn experts(&self) -> ExpertGroups<'_> {
        self.experts.dispatch()
    }
}

/// Result of [`CpEpModel::forward_backward`].
#[derive(Debug, Clone)]
pub struct CpEpStepOutput {
    /// `ce_loss + router_aux_loss_coef · aux_loss` of the *global* batch (identical on every rank).
    pub loss: f64,
    pub ce_loss: f64,
    pub aux_loss: Option<f64>,
    /// Gradient of the global loss with respect to this rank's local parameters over this rank's tokens only, by
    /// the names of [`Qwen3Params::to_named`] on the local parameters (local expert `j` is named `experts.{j}`;
    /// its global index is `first_expert + j`). Not yet reduced: [`CpEpModel::reduce_grads`] sums them over dp-cp
    /// (replicated weights) and expert-dp (expert shards).
    pub grads: NamedTensors,
}

/// Saved activations of the feed-forward part.
enum FfnSaved {
    Dense(MlpSaved),
    Moe(Box<EpMoeSaved>),
}

struct LayerActs {
    /// `[T_l, H]`
    x: Tensor,
    rstd1: Tensor,
    attn: AttentionSaved,
    /// `[T_l, H]`
    h: Tensor,
    rstd2: Tensor,
    ffn: FfnSaved,
}

struct Forward {
    layers: Vec<LayerActs>,
    x_last: Tensor,
    rstd_final: Tensor,
    hn: Tensor,
    dlogits: Tensor,
    loss: f64,
    ce_loss: f64,
    aux_loss: Option<f64>,
    stats: Option<RouterStats>,
    coef: f64,
}

/// Per-batch device inputs.
struct Inputs<'a> {
    ids: Tensor,
    rope: RopeTable,
    segments: Option<Tensor>,
    core: Box<dyn AttentionCore + 'a>,
}

/// One rank of a `dp × cp × ep × etp` Qwen3 model (see the [module docs](super)).
pub struct CpEpModel {
    pub config: ModelConfig,
    /// Local parameters: everything replicated except the MoE experts (this rank's [`ExpertLayout`] shards).
    pub params: Qwen3Params,
    dims: ParallelDims,
    rank: usize,
    groups: CpEpGroups,
    device: Device,
    /// `Some` for MoE models.
    experts: Option<ExpertLayout>,
}

impl std::fmt::Debug for CpEpModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpEpModel")
            .field("dims", &self.dims)
            .field("rank", &self.rank)
            .field("groups", &self.groups)
            .field("experts", &self.experts)
            .finish()
    }
}

/// `(top_k, norm_topk_prob)` of a MoE config.
fn routing_of(cfg: &ModelConfig) -> (usize, bool) {
    cfg.moe
        .as_ref()
        .map_or((1, false), |m| (m.num_experts_per_tok, m.norm_topk_prob))
}


impl CpEpModel {
    /// Slices the full parameters (HF layout) for global rank `rank` and wraps them with its groups.
    pub fn from_full(
        config: &ModelConfig,
        full: &Qwen3Params,
        dims: ParallelDims,
        rank: usize,
        groups: CpEpGroups,
    ) -> Result<Self> {
        check_supported(&dims)?;
        config.validate().map_err(crate::model::ModelError::from)?;
        let moe = config.moe.as_ref();
        dims.validate_model(&ModelShape {
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            layers: config.num_hidden_layers,
            experts: moe.map_or(0, |m| m.num_experts),
            intermediate_size: config.intermediate_size,
            moe_intermediate_size: moe.map_or(0, |m| m.moe_intermediate_size),
            // The sequence length is checked per batch (CpLayout::new).
            seq_len: 2 * dims.cp(),
        })?;
        let c = dims.coord(rank);
        let e = dims.expert_coord(rank);
        let want = [
            ("cp", &groups.cp, dims.cp(), c.cp),
            (
                "dp-cp",
                &groups.dp_cp,
                dims.dp() * dims.cp(),
                c.cp + dims.cp() * c.dp,
            ),
            ("ep", &groups.experts.ep, dims.ep(), e.ep),
            ("etp", &groups.experts.etp, dims.etp(), e.etp),
            (
                "etp-ep",
                &groups.experts.etp_ep,
                dims.ep() * dims.etp(),
                e.etp + dims.etp() * e.ep,
            ),
            ("expert-dp", &groups.experts.expert_dp, dims.edp(), e.edp),
            ("stage", &groups.experts.all, dims.world(), rank),
            ("solo", &groups.experts.solo, 1, 0),
        ];
        for (name, g, size, r) in want {
            if g.size() != size || g.rank() != r {
                return Err(CpError::Groups(format!(
                    "{name} group: rank {} of {}, the layout puts global rank {rank} at {r} of {size}",
                    g.rank(),
                    g.size()
                )));
            }
        }
        let experts = moe
            .map(|m| ExpertLayout::from_dims(&dims, rank, m.num_experts, m.moe_intermediate_size))
            .transpose()?;
        let params = match &experts {
            Some(layout) => shard_experts(full, layout)?,
            None => full.clone(),
        };
        Ok(CpEpModel {
            config: config.clone(),
            device: full.embed_tokens.device(),
            params,
            dims,
            rank,
            groups,
            experts,
        })
    }

    pub fn dims(&self) -> &ParallelDims {
        &self.dims
    }
    /// Global rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn groups(&self) -> &CpEpGroups {
        &self.groups
    }
    /// The device the rank computes on.
    pub fn device(&self) -> Device {
        self.device
    }
    /// This rank's expert shards (`None` for dense models).
    pub fn expert_layout(&self) -> Option<&ExpertLayout> {
        self.experts.as_ref()
    }

    /// This rank's tokens of a global batch: rows `[dp_i·B/dp, (dp_i+1)·B/dp)`, then chunks `cp_i` and
    /// `2·cp−1−cp_i` of each row.
    pub fn local_batch(&self, global: &Batch) -> Result<CpBatch> {
        let c = self.dims.coord(self.rank);
        let rows = split_batch_rows(global, self.dims.dp(), c.dp)?;
        shard_batch(&rows, self.dims.cp(), c.cp)
    }

    /// Forward and backward over this rank's tokens. Collective over every group. See the module docs.
    pub fn forward_backward(&self, batch: &CpBatch) -> Result<CpEpStepOutput> {
        let inputs = self.inputs(batch)?;
        let ctx = self.ctx(&batch.local, &inputs);
        let f = self.forward_loss(&batch.local, &inputs, &ctx)?;
        let aux = f.stats.as_ref().map(|s| AuxLossGrad {
            stats: s,
            coef: f.coef,
        });
        let head = self.head_weight();
        let g_head = ops::linear_bwd(&f.dlogits, &f.hn, head)?;
        let g_norm = ops::rmsnorm_bwd(&g_head.dx, &f.x_last, &self.params.norm, &f.rstd_final)?;
        let mut dx = g_norm.dx;
        let mut layer_grads = Vec::with_capacity(f.layers.len());
        for (layer, acts) in self.params.layers.iter().zip(f.layers).rev() {
            let (d, g) = self.layer_backward(layer, &dx, acts, &ctx, &*inputs.core, aux)?;
            layer_grads.push(g);
            dx = d;
        }
        layer_grads.reverse();
        let tied = self.params.lm_head.is_none();
        let grads = crate::model::qwen3::assemble_grads(
            self.config.vocab_size,
            tied,
            &inputs.ids,
            &dx,
            layer_grads,
            g_norm.dw,
            g_head.dw,
        )?;
        Ok(CpEpStepOutput {
            loss: f.loss,
            ce_loss: f.ce_loss,
            aux_loss: f.aux_loss,
            grads: grads.to_named(),
        })
    }

    /// Forward-only `(loss, ce_loss, aux_loss)` of the global batch, as
    /// [`forward_backward`](Self::forward_backward) reports them. Collective.
    pub fn loss(&self, batch: &CpBatch) -> Result<(f64, f64, Option<f64>)> {
        let inputs = self.inputs(batch)?;
        let ctx = self.ctx(&batch.local, &inputs);
        let f = self.forward_loss(&batch.local, &inputs, &ctx)?;
        Ok((f.loss, f.ce_loss, f.aux_loss))
    }

    /// The data-parallel gradient reduction: weights replicated over dp × cp (all but the experts) summed over the
    /// dp-cp group, expert shards over the expert-dp group — one f32 all-reduce per group of the gradients laid end
    /// to end, on their device (NCCL on GPUs). Afterwards every replica holds the gradient of the global loss.
    /// Collective over dp-cp and expert-dp.
    pub fn reduce_grads(&self, grads: &NamedTensors) -> Result<NamedTensors> {
        Ok(reduce_split(grads, &*self.groups.dp_cp, &*self.groups.experts.expert_dp)?)
    }

    /// Does `name` count in the global gradient norm on this rank? Each element of the global model once: replicated
    /// weights on dp-cp rank 0, each expert shard on expert-dp rank 0 of its replicas.
    pub fn counts_in_norm(&self, name: &str) -> bool {
        if is_expert_param(name) {
            self.groups.experts.expert_dp.rank() == 0
        } else {
            self.groups.dp_cp.rank() == 0
        }
    }

    /// An AdamW over this rank's local parameters for [`step`](Self::step): gradients are reduced by
    /// [`reduce_grads`](Self::reduce_grads) first, so each rank steps its full local copy (no ZeRO sharding here);
    /// the global norm counts every element once ([`counts_in_norm`](Self::counts_in_norm)).
    pub fn optimizer(&self, config: ZeroConfig, adam: AdamWConfig) -> Result<DistributedOptimizer> {
        Ok(DistributedOptimizer::for_params(
            config,
            adam,
            &self.params,
            1,
            0,
            &|n| self.counts_in_norm(n),
        )?)
    }

    /// [`optimizer`](Self::optimizer) on the device (the GPU engine): f32 masters and moments of the full local
    /// parameters on this rank's device ([`DeviceDistributedOptimizer`] over a dp group of one).
    pub fn device_optimizer(&self, config: ZeroConfig, adam: AdamWConfig) -> Result<DeviceDistributedOptimizer> {
        Ok(DeviceDistributedOptimizer::for_params(
            config,
            adam,
            &self.params,
            1,
            0,
            &|n| self.counts_in_norm(n),
        )?)
    }

    /// [`step`](Self::step) with the device optimizer. Collective.
    pub fn step_device(
        &mut self,
        opt: &mut DeviceDistributedOptimizer,
        grads: &NamedTensors,
        lr: f64,
    ) -> Result<StepStats> {
        let reduced = self.reduce_grads(grads)?;
        Ok(opt.step_with(&mut self.params, reduced, lr, &*self.groups.experts.solo, &[&*self.groups.experts.all])?)
    }

    /// One optimizer step: [`reduce_grads`](Self::reduce_grads), the global-norm clip over the stage, AdamW.
    /// Collective.
    pub fn step(
        &mut self,
        opt: &mut DistributedOptimizer,
        grads: &NamedTensors,
        lr: f64,
    ) -> Result<StepStats> {
        let reduced = self.reduce_grads(grads)?;
        Ok(opt.step_with(
            &mut self.params,
            &reduced,
            lr,
            &*self.groups.experts.solo,
            &[&*self.groups.experts.all],
        )?)
    }

    /// Gradients by name in the container of this rank's parameters (shapes checked).
    pub fn grads_as_params(&self, grads: &NamedTensors) -> Result<Qwen3Params> {
        let mut out = self.params.clone();
        fill_from_named(grads, |f| out.visit_mut(f))
            .map_err(|NamedMismatch { name, detail }| CpError::Shard { name, detail })?;
        Ok(out)
    }

    /// Slices tensors laid out like the full (HF-layout) parameters — the weights, or per-parameter state such as a
    /// checkpoint's AdamW moments — exactly as this rank's parameters were sliced: everything replicated but the
    /// MoE experts, which become this rank's [`ExpertLayout`] shards (no communication). The inverse of
    /// [`gather_full`](Self::gather_full).
    pub fn local_from_full(&self, full: &Qwen3Params) -> Result<Qwen3Params> {
        match &self.experts {
            Some(layout) => Ok(shard_experts(full, layout)?),
            None => Ok(full.clone()),
        }
    }

    /// The full (HF-layout) parameters. Collective over the etp-ep group.
    pub fn gather_full_params(&self) -> Result<Qwen3Params> {
        self.gather_full(&self.params)
    }

    /// Gathers tensors laid out like this rank's parameters (parameters, or gradients after their reduction) into
    /// the full HF layout: the expert shards over the etp-ep group ([`crate::expert_parallel::gather_experts`]); everything else is
    /// replicated and taken as is. Collective over the etp-ep group.
    pub fn gather_full(&self, local: &Qwen3Params) -> Result<Qwen3Params> {
        match &self.experts {
            Some(layout) => Ok(gather_experts(local, layout, &*self.groups.experts.etp_ep, self.device)?),
            None => Ok(local.clone()),
        }
    }

    fn head_weight(&self) -> &Tensor {
        self.params
            .lm_head
            .as_ref()
            .unwrap_or(&self.params.embed_tokens)
    }

    fn inputs<'a>(&'a self, batch: &CpBatch) -> Result<Inputs<'a>> {
        let local = &batch.local;
        local.validate(self.config.vocab_size)?;
        let c = self.dims.coord(self.rank);
        if batch.layout.cp != self.dims.cp() || batch.layout.rank != c.cp {
            return Err(CpError::Groups(format!(
                "batch cut for cp rank {} of {}, this is cp rank {} of {}",
                batch.layout.rank,
                batch.layout.cp,
                c.cp,
                self.dims.cp()
            )));
        }
        let ids = Tensor::from_u32(local.input_ids.clone(), &[local.tokens()], &self.device)?;
        let (rope, segments) = rope_and_segments(
            &self.config,
            &local.position_ids,
            local.segment_ids.as_deref(),
            local.batch,
            local.seq,
            &self.device,
        )?;
        let core: Box<dyn AttentionCore + 'a> = if self.dims.cp() > 1 {
            Box::new(CpAttention::new(&*self.groups.cp, batch, &self.device)?)
        } else {
            Box::new(OwnedLocal {
                segments: segments.clone(),
            })
        };
        Ok(Inputs {
            ids,
            rope,
            segments,
            core,
        })
    }

    fn ctx<'a>(&'a self, batch: &Batch, inputs: &'a Inputs<'_>) -> LayerCtx<'a> {
        LayerCtx {
            cfg: &self.config,
            batch: batch.batch,
            seq: batch.seq,
            rope: &inputs.rope,
            segment_ids: inputs.segments.as_ref(),
        }
    }

    /// Embedding, layers, final norm, head and the globally normalised loss (with its logit gradient).
    fn forward_loss(
        &self,
        batch: &Batch,
        inputs: &Inputs<'_>,
        ctx: &LayerCtx<'_>,
    ) -> Result<Forward> {
        let dp_cp = &*self.groups.dp_cp;
        let mut x = ops::embedding_fwd(&inputs.ids, &self.params.embed_tokens)?;
        let mut layers = Vec::with_capacity(self.params.layers.len());
        for layer in &self.params.layers {
            let (y, acts) = self.layer_forward(layer, &x, ctx, &*inputs.core)?;
            layers.push(acts);
            x = y;
        }
        let nf = ops::rmsnorm_fwd(&x, &self.params.norm, self.config.rms_norm_eps)?;
        let logits = ops::linear_fwd(&nf.y, self.head_weight())?;

        let t = batch.tokens();
        let mut wsum = [batch.loss_weights.iter().map(|&w| w as f64).sum::<f64>() as f32];
        dp_cp.all_reduce(&mut wsum, ReduceOp::Sum)?;
        let targets = Tensor::from_u32(batch.targets.clone(), &[t], &self.device)?;
        let weights = Tensor::from_f32(batch.loss_weights.clone(), &[t], &self.device)?;
        let ce = ops::cross_entropy_fwd_bwd(&logits, &targets, &weights, Some(wsum[0] as f64))?;
        let ce_loss = if dp_cp.size() == 1 {
            ce.loss
        } else {
            let mut l = [ce.loss as f32];
            dp_cp.all_reduce(&mut l, ReduceOp::Sum)?;
            l[0] as f64
        };
        let stats = self.global_router_stats(&layers)?;
        let coef = self
            .config
            .moe
            .as_ref()
            .map_or(0.0, |m| m.router_aux_loss_coef);
        let aux_loss = stats.as_ref().map(RouterStats::aux_loss);
        Ok(Forward {
            layers,
            x_last: x,
            rstd_final: nf.rstd,
            hn: nf.y,
            dlogits: ce.dlogits,
            loss: ce_loss + coef * aux_loss.unwrap_or(0.0),
            ce_loss,
            aux_loss,
            stats,
            coef,
        })
    }

    /// Routing statistics merged over the MoE layers and summed over the dp-cp group (every rank holds different
    /// tokens).
    fn global_router_stats(&self, layers: &[LayerActs]) -> Result<Option<RouterStats>> {
        let Some(moe) = &self.config.moe else {
            return Ok(None);
        };
        let mut s = RouterStats::new(moe.num_experts);
        for a in layers {
            if let FfnSaved::Moe(m) = &a.ffn {
                s.merge(m.stats())?;
            }
        }
        all_reduce_router_stats(&mut s, &*self.groups.dp_cp)?;
        Ok(Some(s))
    }

    fn layer_forward(
        &self,
        l: &DecoderLayer,
        x: &Tensor,
        ctx: &LayerCtx<'_>,
        core: &dyn AttentionCore,
    ) -> Result<(Tensor, LayerActs)> {
        let eps = ctx.cfg.rms_norm_eps;
        let n1 = ops::rmsnorm_fwd(x, &l.input_layernorm, eps)?;
        let (a, attn) = l.self_attn.forward_with(&n1.y, ctx, core)?;
        let h = x.add(&a)?;
        let n2 = ops::rmsnorm_fwd(&h, &l.post_attention_layernorm, eps)?;
        let (m, ffn) = match &l.mlp {
            Ffn::Dense(mlp) => {
                let (m, s) = mlp.forward(&n2.y)?;
                (m, FfnSaved::Dense(s))
            }
            Ffn::Moe(moe) => {
                let layout = self.experts.as_ref().ok_or_else(|| CpError::Shard {
                    name: "mlp".into(),
                    detail: "MoE layer in a model whose config has no experts".into(),
                })?;
                let (m, s) = moe_forward(
                    moe,
                    &n2.y,
                    routing_of(ctx.cfg),
                    layout,
                    self.groups.experts(),
                )?;
                (m, FfnSaved::Moe(Box::new(s)))
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

    fn layer_backward(
        &self,
        l: &DecoderLayer,
        dy: &Tensor,
        s: LayerActs,
        ctx: &LayerCtx<'_>,
        core: &dyn AttentionCore,
        aux: Option<AuxLossGrad<'_>>,
    ) -> Result<(Tensor, DecoderLayer)> {
        let (dn2, mlp_grads) = match (&l.mlp, &s.ffn) {
            (Ffn::Dense(mlp), FfnSaved::Dense(saved)) => {
                let (d, g) = mlp.backward(dy, saved)?;
                (d, Ffn::Dense(g))
            }
            (Ffn::Moe(moe), FfnSaved::Moe(saved)) => {
                let (_, norm) = routing_of(ctx.cfg);
                let (d, g) = moe_backward(moe, dy, saved, norm, aux, self.groups.experts())?;
                (d, Ffn::Moe(g))
            }
            _ => {
                return Err(CpError::Model(crate::model::ModelError::SavedMismatch(
                    "cp/ep layer: dense/MoE activations do not match the layer",
                )));
            }
        };
        let g_n2 = ops::rmsnorm_bwd(&dn2, &s.h, &l.post_attention_layernorm, &s.rstd2)?;
        let dh = dy.add(&g_n2.dx)?;
        let (dxn, attn_grads) = l.self_attn.backward_with(&dh, &s.attn, ctx, core)?;
        let g_n1 = ops::rmsnorm_bwd(&dxn, &s.x, &l.input_layernorm, &s.rstd1)?;
        let dx = dh.add(&g_n1.dx)?;
        Ok((
            dx,
            DecoderLayer {
                input_layernorm: g_n1.dw,
                self_attn: attn_grads,
                post_attention_layernorm: g_n2.dw,
                mlp: mlp_grads,
            },
        ))
    }
}

/// [`LocalAttention`] owning its segment tensor (for `cp = 1`).
struct OwnedLocal {
    segments: Option<Tensor>,
}

impl AttentionCore for OwnedLocal {
    fn gather_kv(&self, k: &Tensor, v: &Tensor) -> crate::model::Result<(Tensor, Tensor)> {
        self.local().gather_kv(k, v)
    }
    fn gather_kv_backward(
        &self,
        dk: &Tensor,
        dv: &Tensor,
    ) -> crate::model::Result<(Tensor, Tensor)> {
        self.local().gather_kv_backward(dk, dv)
    }
    fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
    ) -> crate::model::Result<ops::AttentionOut> {
        self.local().forward(q, k, v, scale)
    }
    fn backward(
        &self,
        dout: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &ops::AttentionOut,
        scale: f32,
    ) -> crate::model::Result<ops::AttentionGrads> {
        self.local().backward(dout, q, k, v, out, scale)
    }
}

impl OwnedLocal {
    fn local(&self) -> LocalAttention<'_> {
        LocalAttention {
            segment_ids: self.segments.as_ref(),
        }
    }
}
