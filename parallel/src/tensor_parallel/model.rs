//! [`TpModel`]: one rank's share of a Qwen3 model under dp × tp (± sp), explicit forward and backward, and the
//! process groups it talks over ([`ParallelGroups`]).

use qkernels::ops::{self, RopeTable, RouterStats};
use qkernels::{Device, Tensor};

use super::experts::expert_layout;
use super::mappings::{all_reduce_sum, enter, enter_backward, exit, exit_backward};
use super::shard::{TpPlan, check_supported_in_pipeline, shard_with_plan, unshard};
use super::vocab;
use super::{Result, TpError};
use crate::comm::{Communicator, ReduceOp};
use crate::dims::{GroupKind, ParallelDims};
use crate::model::attention::AttentionSaved;
use crate::model::layer::{FfnSaved, LayerCtx, rope_and_segments};
use crate::model::moe::{AuxLossGrad, all_reduce_router_stats};
use crate::model::params::{NamedMismatch, fill_from_named};
use crate::expert_parallel::{
    EpMoeSaved, ExpertComms, ExpertGroups, ExpertLayout, gather_experts, is_expert_param, moe_backward, moe_forward,
    reduce_split, shard_experts,
};
use crate::model::{Batch, DecoderLayer, Ffn, ModelConfig, NamedTensors, Qwen3Params, SparseMoe};

/// The communicators one rank needs: its TP group, its DP group and its kv replica group (the TP ranks holding
/// the same kv head; a group of one unless `tp > kv_heads`), plus the expert groups when `ep > 1`
/// ([`super::experts`]).
pub struct ParallelGroups {
    pub tp: Box<dyn Communicator>,
    pub dp: Box<dyn Communicator>,
    pub kv_replica: Box<dyn Communicator>,
    pub experts: Option<ExpertComms>,
}

impl std::fmt::Debug for ParallelGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParallelGroups")
            .field("tp", &self.tp.global_ranks())
            .field("dp", &self.dp.global_ranks())
            .field("kv_replica", &self.kv_replica.global_ranks())
            .finish()
    }
}

impl ParallelGroups {
    /// Splits `world` into the groups of `dims` (collective over `world`: every rank calls it, in the same order
    /// relative to other splits). `cfg` decides the kv replica groups. With `pp > 1` (for [`crate::pipeline`]) the
    /// groups are those inside the rank's pipeline stage; [`TpModel`] itself still rejects `pp > 1`.
    pub fn new(world: &dyn Communicator, dims: &ParallelDims, cfg: &ModelConfig) -> Result<Self> {
        check_supported_in_pipeline(dims)?;
        if world.size() != dims.world() {
            return Err(TpError::Groups(format!(
                "world communicator has {} ranks, the layout {} ranks",
                world.size(),
                dims.world()
            )));
        }
        let tp_groups = dims.groups(GroupKind::Tp);
        let hkv = cfg.num_key_value_heads.max(1);
        let replicas = if hkv >= dims.tp() { 1 } else { dims.tp() / hkv };
        let kv_groups: Vec<Vec<usize>> = tp_groups
            .iter()
            .flat_map(|g| {
                g.chunks(replicas)
                    .map(<[usize]>::to_vec)
                    .collect::<Vec<_>>()
            })
            .collect();
        Ok(ParallelGroups {
            tp: world.split(&tp_groups)?,
            dp: world.split(&dims.groups(GroupKind::Dp))?,
            kv_replica: world.split(&kv_groups)?,
            experts: if dims.ep() > 1 {
                Some(ExpertComms::new(world, dims)?)
            } else {
                None
            },
        })
    }

    /// The groups an optimizer steps over: `(dp, norm groups)` = the DP group (ZeRO shards) and TP, or — with
    /// expert shards, whose dp ranks hold different parameters — this rank alone and every rank
    /// ([`super::experts`]).
    pub fn optimizer_groups(&self) -> (&dyn Communicator, Vec<&dyn Communicator>) {
        match &self.experts {
            Some(e) => (&*e.solo, vec![&*e.all]),
            None => (&*self.dp, vec![&*self.tp]),
        }
    }
}

/// Result of [`TpModel::forward_backward`].
#[derive(Debug, Clone)]
pub struct TpStepOutput {
    /// `ce_loss + router_aux_loss_coef · aux_loss` of the *global* batch (identical on every rank).
    pub loss: f64,
    pub ce_loss: f64,
    pub aux_loss: Option<f64>,
    /// Gradient of the global loss with respect to this rank's *local* parameters, by HF name (local shapes),
    /// over this rank's rows of the batch only: TP reductions are done, the DP reduction is the optimizer's.
    pub grads: NamedTensors,
}

/// Every activation of one layer's backward (see [`layer_forward`]).
pub(crate) struct LayerActs {
    /// `[T_l, H]` layer input (`T_l = T/p` with SP, else `T`).
    x: Tensor,
    rstd1: Tensor,
    attn: AttentionSaved,
    /// `[T_l, H]`
    h: Tensor,
    rstd2: Tensor,
    ffn: TpFfnSaved,
}

/// The FFN activations of a TP layer: the single-device block's, or the expert-parallel sparse block's.
#[allow(clippy::large_enum_variant)] // one per layer, moved once: boxing the common variant buys nothing
pub(crate) enum TpFfnSaved {
    Local(FfnSaved),
    Experts(Box<EpMoeSaved>),
}

impl TpFfnSaved {
    fn router_stats(&self) -> Option<&RouterStats> {
        match self {
            TpFfnSaved::Local(FfnSaved::Moe(m)) => Some(m.stats()),
            TpFfnSaved::Local(FfnSaved::Dense(_)) => None,
            TpFfnSaved::Experts(m) => Some(m.stats()),
        }
    }
}

/// Expert parallelism of a TP model's MoE layers: this rank's shard layout and the dispatcher's groups.
#[derive(Clone, Copy)]
pub(crate) struct TpExperts<'a> {
    layout: &'a ExpertLayout,
    groups: ExpertGroups<'a>,
}

/// What a layer's forward leaves for its backward (crate-visible for [`crate::pipeline`]).
pub(crate) enum LayerSaved {
    Full(Box<LayerActs>),
    /// Activation recomputation: the layer input `[T_l, H]` and the MoE routing statistics only; the backward
    /// reruns the forward, collectives included (every rank reruns the same ones in the same order).
    Recompute {
        x: Tensor,
        router_stats: Option<RouterStats>,
    },
}

impl LayerSaved {
    pub(crate) fn router_stats(&self) -> Option<&RouterStats> {
        match self {
            LayerSaved::Full(a) => a.ffn.router_stats(),
            LayerSaved::Recompute { router_stats, .. } => router_stats.as_ref(),
        }
    }
}

/// What [`TpModel::forward_loss`] leaves for the backward.
struct Forward {
    saved: Vec<LayerSaved>,
    /// `[T_l, H]` input of the final norm.
    x_last: Tensor,
    rstd_final: Tensor,
    /// `[T, H]` normalised final hidden state, as the LM head saw it.
    hn: Tensor,
    /// `[T, V/p]`
    dlogits: Tensor,
    loss: f64,
    ce_loss: f64,
    aux_loss: Option<f64>,
    /// Global routing statistics (MoE).
    stats: Option<RouterStats>,
    coef: f64,
}

/// One rank's share of a Qwen3 model under `dims` (dp × tp, optional sp).
pub struct TpModel {
    /// The full model's config (HF sizes).
    pub config: ModelConfig,
    /// The config the local blocks run with (local heads, kv heads, ffn, vocab).
    local_config: ModelConfig,
    /// Local parameter shards (HF names, local shapes).
    pub params: Qwen3Params,
    plan: TpPlan,
    dims: ParallelDims,
    rank: usize,
    groups: ParallelGroups,
    /// This rank's expert shards when `ep > 1` ([`super::experts`]).
    experts: Option<ExpertLayout>,
    device: Device,
    /// Recompute each layer's activations in backward instead of keeping them.
    pub gradient_checkpointing: bool,
}

impl std::fmt::Debug for TpModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpModel")
            .field("rank", &self.rank)
            .field("dims", &self.dims)
            .field("plan", &self.plan)
            .finish()
    }
}

/// Which TP ranks hold a parameter (decides its gradient reductions and whether it counts in the global norm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// Split over TP: every rank holds a distinct slice.
    Sharded,
    /// Every TP rank holds the whole tensor.
    Replicated,
    /// k/v projections when `tp > kv_heads`: identical on the ranks of a kv replica group.
    KvReplicated,
}

/// Replication of a parameter by HF name (the table in [`super::shard`]).
pub fn replication_of(name: &str) -> Replication {
    let sharded = [
        "q_proj.weight",
        "o_proj.weight",
        "gate_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
    ];
    if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
        Replication::Sharded
    } else if name.contains(".experts.") {
        Replication::Replicated
    } else if sharded.iter().any(|s| name.ends_with(s)) {
        Replication::Sharded
    } else if name.ends_with("k_proj.weight") || name.ends_with("v_proj.weight") {
        Replication::KvReplicated
    } else {
        Replication::Replicated
    }
}

impl TpModel {
    /// Wraps this rank's already-sharded parameters (shapes are checked against the plan).
    pub fn new(
        config: &ModelConfig,
        params: Qwen3Params,
        dims: ParallelDims,
        rank: usize,
        groups: ParallelGroups,
    ) -> Result<Self> {
        let plan = TpPlan::new(config, &dims, rank)?;
        if groups.tp.size() != plan.tp || groups.tp.rank() != plan.tp_rank {
            return Err(TpError::Groups(format!(
                "TP communicator is rank {} of {}, the layout says rank {} of {}",
                groups.tp.rank(),
                groups.tp.size(),
                plan.tp_rank,
                plan.tp
            )));
        }
        let dp_rank = dims.coord(rank).dp;
        if groups.dp.size() != dims.dp() || groups.dp.rank() != dp_rank {
            return Err(TpError::Groups(format!(
                "DP communicator is rank {} of {}, the layout says rank {dp_rank} of {}",
                groups.dp.rank(),
                groups.dp.size(),
                dims.dp()
            )));
        }
        let experts = expert_layout(config, &dims, rank)?;
        if experts.is_some() != groups.experts.is_some() {
            return Err(TpError::Groups(format!(
                "ep = {} but the groups {} expert communicators",
                dims.ep(),
                if groups.experts.is_some() { "have" } else { "lack" }
            )));
        }
        let local_config = plan.local_config(config);
        // Every local shape must be what the plan (and the expert layout) implies.
        let want = local_param_shapes(&local_config, experts.as_ref());
        let got = params.named();
        for ((wn, ws), (gn, gt)) in want.iter().zip(&got) {
            if wn != gn || ws.as_slice() != gt.shape() {
                return Err(TpError::Shard {
                    name: gn.clone(),
                    detail: format!("expected `{wn}` {ws:?}, got shape {:?}", gt.shape()),
                });
            }
        }
        if want.len() != got.len() {
            return Err(TpError::Shard {
                name: "<all>".into(),
                detail: format!("{} parameters, expected {}", got.len(), want.len()),
            });
        }
        let device = params.embed_tokens.device();
        Ok(TpModel {
            config: config.clone(),
            local_config,
            params,
            plan,
            dims,
            rank,
            groups,
            experts,
            device,
            gradient_checkpointing: false,
        })
    }

    /// Slices the full parameters (HF layout, built once from one seed or loaded from a checkpoint) for global
    /// rank `rank` and wraps them.
    pub fn from_full(
        config: &ModelConfig,
        full: &Qwen3Params,
        dims: ParallelDims,
        rank: usize,
        groups: ParallelGroups,
    ) -> Result<Self> {
        let plan = TpPlan::new(config, &dims, rank)?;
        let mut params = shard_with_plan(&plan, full)?;
        if let Some(layout) = expert_layout(config, &dims, rank)? {
            params = shard_experts(&params, &layout)?;
        }
        TpModel::new(config, params, dims, rank, groups)
    }

    /// Turns per-layer activation recomputation on or off (gradients are bit-identical either way).
    pub fn with_gradient_checkpointing(mut self, on: bool) -> Self {
        self.gradient_checkpointing = on;
        self
    }

    pub fn plan(&self) -> &TpPlan {
        &self.plan
    }
    pub fn dims(&self) -> &ParallelDims {
        &self.dims
    }
    /// Global rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Position in the DP group (which rows of the global batch this rank runs).
    pub fn dp_rank(&self) -> usize {
        self.dims.coord(self.rank).dp
    }
    pub fn groups(&self) -> &ParallelGroups {
        &self.groups
    }
    /// The parameters (mutable, for an optimizer) together with the groups (shared).
    pub fn params_and_groups_mut(&mut self) -> (&mut Qwen3Params, &ParallelGroups) {
        (&mut self.params, &self.groups)
    }
    pub fn device(&self) -> Device {
        self.device
    }

    /// Does parameter `name` count in a global gradient norm on this rank? Sharded tensors count everywhere,
    /// TP-replicated ones on TP rank 0 only, replicated kv heads on the first rank of their replica group.
    /// With expert shards (no ZeRO over dp, [`super::experts`]): non-expert tensors by that rule on dp rank 0, each
    /// expert shard on the first rank of its expert-dp group.
    pub fn counts_in_norm(&self, name: &str) -> bool {
        if let Some(e) = &self.groups.experts {
            if is_expert_param(name) {
                return e.expert_dp.rank() == 0;
            }
            if self.groups.dp.rank() != 0 {
                return false;
            }
        }
        match replication_of(name) {
            Replication::Sharded => true,
            Replication::Replicated => self.plan.tp_rank == 0,
            Replication::KvReplicated => self.plan.first_kv_replica(),
        }
    }

    /// The optimizer's dp group: the DP group, or this rank alone with expert shards ([`super::experts`]).
    pub fn optimizer_dp(&self) -> &dyn Communicator {
        self.groups.optimizer_groups().0
    }

    /// What the optimizer is handed: the gradients as they are (it reduces them over dp itself), or with expert
    /// shards the non-expert tensors summed over dp and the expert shards over expert-dp. Collective over those.
    pub fn reduce_optimizer_grads(&self, grads: &NamedTensors) -> Result<NamedTensors> {
        match &self.groups.experts {
            Some(e) => Ok(reduce_split(grads, &*self.groups.dp, &*e.expert_dp)?),
            None => Ok(grads.clone()),
        }
    }

    /// Slices tensors laid out like the full (HF-layout) parameters — the weights themselves, or per-parameter
    /// state such as a checkpoint's AdamW moments — exactly as this rank's parameters were sliced (no
    /// communication). The inverse of [`gather_full`](Self::gather_full).
    pub fn local_from_full(&self, full: &Qwen3Params) -> Result<Qwen3Params> {
        let local = shard_with_plan(&self.plan, full)?;
        match &self.experts {
            Some(layout) => Ok(shard_experts(&local, layout)?),
            None => Ok(local),
        }
    }

    /// Global L2 norm of gradients laid out like this rank's parameters (after the DP reduction,
    /// [`reduce_dp_grads`](Self::reduce_dp_grads)): each element of the model counted once
    /// ([`counts_in_norm`](Self::counts_in_norm)), the partial sums of squares summed over TP (f32 on the wire).
    /// The squares are summed on the tensors' device. Collective over TP.
    pub fn grad_norm(&self, grads: &NamedTensors) -> Result<f64> {
        if self.experts.is_some() {
            return Err(TpError::Unsupported(
                "with expert shards the norm runs over every rank: use the distributed optimizer".into(),
            ));
        }
        let counted: Vec<&Tensor> = grads
            .iter()
            .filter(|(n, _)| self.counts_in_norm(n))
            .map(|(_, t)| t)
            .collect();
        let local = if counted.is_empty() {
            0.0
        } else {
            ops::sum_squares(&counted)?
        };
        let mut total = [local as f32];
        if self.groups.tp.size() > 1 {
            self.groups.tp.all_reduce(&mut total, ReduceOp::Sum)?;
        }
        Ok((total[0] as f64).sqrt())
    }

    /// The data-parallel gradient reduction without ZeRO: every gradient summed over the DP group (the loss is
    /// normalised by the global batch, so the sum is the full-batch gradient), through NCCL on device tensors
    /// ([`crate::comm::tensor::reduce_grads`]). Afterwards every DP rank holds the same gradients and can step a
    /// replicated optimizer ([`crate::optim::DeviceAdamW`]). Collective over DP.
    pub fn reduce_dp_grads(&self, grads: &mut NamedTensors) -> Result<()> {
        if self.experts.is_some() {
            return Err(TpError::Unsupported(
                "expert shards are reduced over expert-dp: use reduce_optimizer_grads".into(),
            ));
        }
        Ok(crate::comm::tensor::reduce_grads(grads, &*self.groups.dp)?)
    }

    /// The full (HF-layout) parameters, gathered over the TP group (collective over TP; every TP rank gets them).
    pub fn gather_full_params(&self) -> Result<Qwen3Params> {
        self.gather_full(&self.params)
    }

    /// Gathers any tensors laid out like this rank's parameters (parameters, or gradients after
    /// [`grads_as_params`](Self::grads_as_params)) into the full HF layout over the TP group. Collective over TP.
    pub fn gather_full(&self, local: &Qwen3Params) -> Result<Qwen3Params> {
        // Expert shards first (over etp-ep): afterwards every TP rank holds the full experts, as without ep.
        let with_experts;
        let local = match (&self.experts, &self.groups.experts) {
            (Some(layout), Some(e)) => {
                with_experts = gather_experts(local, layout, &*e.etp_ep, self.device)?;
                &with_experts
            }
            _ => local,
        };
        let tp = &*self.groups.tp;
        let mut parts = Vec::new();
        local.visit(&mut |_, t| parts.push(t.clone()));
        let flat: Vec<f32> = parts
            .iter()
            .map(|t| t.to_vec_f32())
            .collect::<qkernels::Result<Vec<_>>>()?
            .concat();
        let mut all = vec![0f32; flat.len() * tp.size()];
        tp.all_gather(&flat, &mut all)?;
        let shards = all
            .chunks(flat.len().max(1))
            .map(|chunk| fill_like(local, chunk, self.device))
            .collect::<Result<Vec<_>>>()?;
        unshard(&self.config, &self.dims, &shards)
    }

    /// Gradients by HF name, in the container of this rank's parameters (shapes checked).
    pub fn grads_as_params(&self, grads: &NamedTensors) -> Result<Qwen3Params> {
        let mut out = self.params.clone();
        fill_from_named(grads, |f| out.visit_mut(f))
            .map_err(|NamedMismatch { name, detail }| TpError::Shard { name, detail })?;
        Ok(out)
    }

    fn head_weight(&self) -> &Tensor {
        self.params
            .lm_head
            .as_ref()
            .unwrap_or(&self.params.embed_tokens)
    }

    /// Forward and backward over this rank's rows of the global batch (every TP rank of a DP rank gets the same
    /// rows). Collective over TP and DP. See the [module docs](super) for the maths.
    pub fn forward_backward(&self, batch: &Batch) -> Result<TpStepOutput> {
        let (tp, sp) = (&*self.groups.tp, self.plan.sp);
        let (rope, segments) = self.inputs(batch)?;
        let ctx = self.ctx(batch, &rope, segments.as_ref());
        let f = self.forward_loss(batch, &ctx, self.gradient_checkpointing)?;
        let aux = f.stats.as_ref().map(|s| AuxLossGrad {
            stats: s,
            coef: f.coef,
        });

        // Head and final norm, then the layers last to first, then the embedding.
        let g_head = ops::linear_bwd(&f.dlogits, &f.hn, self.head_weight())?;
        let dnf = enter_backward(&g_head.dx, tp, sp)?;
        let g_norm = ops::rmsnorm_bwd(&dnf, &f.x_last, &self.params.norm, &f.rstd_final)?;
        let mut dx = g_norm.dx;
        let mut layer_grads = Vec::with_capacity(f.saved.len());
        for (layer, s) in self.params.layers.iter().zip(f.saved).rev() {
            let (d, g) = layer_backward(layer, &dx, s, &ctx, aux, tp, sp, self.tp_experts())?;
            layer_grads.push(self.reduce_layer_grads(g)?);
            dx = d;
        }
        layer_grads.reverse();
        let dx0 = exit_backward(&dx, tp, sp)?; // [T, H]
        let mut d_embed = vocab::embedding_bwd(
            &batch.input_ids,
            &dx0,
            self.plan.vocab,
            self.plan.vocab_start,
        )?;
        let lm_head = if self.params.lm_head.is_some() {
            Some(g_head.dw)
        } else {
            d_embed.add_assign(&g_head.dw)?;
            None
        };
        let norm = if sp {
            all_reduce_sum(&g_norm.dw, tp)?
        } else {
            g_norm.dw
        };
        let grads = Qwen3Params {
            embed_tokens: d_embed,
            layers: layer_grads,
            norm,
            lm_head,
        };
        Ok(TpStepOutput {
            loss: f.loss,
            ce_loss: f.ce_loss,
            aux_loss: f.aux_loss,
            grads: grads.to_named(),
        })
    }

    /// Forward-only `(loss, ce_loss, aux_loss)` of the global batch, as [`forward_backward`](Self::forward_backward)
    /// reports them (for evaluation). Collective over TP and DP.
    pub fn loss(&self, batch: &Batch) -> Result<(f64, f64, Option<f64>)> {
        let (rope, segments) = self.inputs(batch)?;
        let ctx = self.ctx(batch, &rope, segments.as_ref());
        let f = self.forward_loss(batch, &ctx, true)?;
        Ok((f.loss, f.ce_loss, f.aux_loss))
    }

    /// Checks the batch against the layout; the RoPE table and segment tensor of all its tokens.
    fn inputs(&self, batch: &Batch) -> Result<(RopeTable, Option<Tensor>)> {
        batch.validate(self.config.vocab_size)?;
        let t = batch.tokens();
        if self.plan.sp && !t.is_multiple_of(self.plan.tp) {
            return Err(TpError::TokensNotDivisible {
                tokens: t,
                tp: self.plan.tp,
            });
        }
        Ok(rope_and_segments(
            &self.config,
            &batch.position_ids,
            batch.segment_ids.as_deref(),
            batch.batch,
            batch.seq,
            &self.device,
        )?)
    }

    fn ctx<'a>(
        &'a self,
        batch: &Batch,
        rope: &'a RopeTable,
        segments: Option<&'a Tensor>,
    ) -> LayerCtx<'a> {
        LayerCtx {
            cfg: &self.local_config,
            batch: batch.batch,
            seq: batch.seq,
            rope,
            segment_ids: segments,
        }
    }

    /// Embedding, layers, final norm, LM head and the vocab-parallel loss (with its logit gradient).
    fn forward_loss(&self, batch: &Batch, ctx: &LayerCtx<'_>, recompute: bool) -> Result<Forward> {
        let (tp, dp) = (&*self.groups.tp, &*self.groups.dp);
        let sp = self.plan.sp;
        let x0 = vocab::embedding_fwd(
            &batch.input_ids,
            &self.params.embed_tokens,
            self.plan.vocab_start,
        )?;
        let mut x = exit(&x0, tp, sp)?; // [T_l, H]
        let mut saved = Vec::with_capacity(self.params.layers.len());
        for layer in &self.params.layers {
            let (y, s) = layer_forward_saved(layer, &x, ctx, tp, sp, self.tp_experts(), recompute)?;
            saved.push(s);
            x = y;
        }
        let nf = ops::rmsnorm_fwd(&x, &self.params.norm, self.config.rms_norm_eps)?;
        let hn = enter(&nf.y, tp, sp)?; // [T, H]
        let logits = ops::linear_fwd(&hn, self.head_weight())?; // [T, V/p]

        // Loss normalised by the global batch's weight sum.
        let mut wsum = [batch.loss_weights.iter().map(|&w| w as f64).sum::<f64>() as f32];
        dp.all_reduce(&mut wsum, ReduceOp::Sum)?;
        let ce = vocab::cross_entropy_fwd_bwd(
            &logits,
            &batch.targets,
            &batch.loss_weights,
            wsum[0] as f64,
            self.plan.vocab_start,
            tp,
        )?;
        let ce_loss = if dp.size() == 1 {
            ce.loss
        } else {
            let mut l = [ce.loss as f32];
            dp.all_reduce(&mut l, ReduceOp::Sum)?;
            l[0] as f64
        };
        let stats = self.global_router_stats(&saved)?;
        let coef = self
            .config
            .moe
            .as_ref()
            .map_or(0.0, |m| m.router_aux_loss_coef);
        let aux_loss = stats.as_ref().map(RouterStats::aux_loss);
        Ok(Forward {
            saved,
            x_last: x,
            rstd_final: nf.rstd,
            hn,
            dlogits: ce.dlogits,
            loss: ce_loss + coef * aux_loss.unwrap_or(0.0),
            ce_loss,
            aux_loss,
            stats,
            coef,
        })
    }

    /// Routing statistics merged over the MoE layers and summed over every rank that saw different tokens: the
    /// DP group, and the TP group with SP (without SP the TP ranks ran the same tokens).
    fn global_router_stats(&self, saved: &[LayerSaved]) -> Result<Option<RouterStats>> {
        let Some(moe) = &self.config.moe else {
            return Ok(None);
        };
        let mut s = RouterStats::new(moe.num_experts);
        for st in saved.iter().filter_map(LayerSaved::router_stats) {
            s.merge(st)?;
        }
        all_reduce_router_stats(&mut s, &*self.groups.dp)?;
        if self.plan.sp {
            all_reduce_router_stats(&mut s, &*self.groups.tp)?;
        }
        Ok(Some(s))
    }

    /// The TP reductions of one layer's gradients (see [`reduce_layer_grads`]).
    fn reduce_layer_grads(&self, g: DecoderLayer) -> Result<DecoderLayer> {
        reduce_layer_grads(&self.groups, self.plan.sp, g)
    }

    /// The expert-parallel view of the MoE layers (`None` without ep).
    fn tp_experts(&self) -> Option<TpExperts<'_>> {
        match (&self.experts, &self.groups.experts) {
            (Some(layout), Some(e)) => Some(TpExperts {
                layout,
                groups: e.dispatch(),
            }),
            _ => None,
        }
    }
}

/// `(HF name, shape)` of one rank's parameters: the plan's local config, with the MoE experts as this rank's
/// shards when `experts` is given (`E/ep` experts of `f/etp`; the router keeps all `E` rows).
fn local_param_shapes(local: &ModelConfig, experts: Option<&ExpertLayout>) -> Vec<(String, Vec<usize>)> {
    let full = crate::model::param_shapes(local);
    let (Some(layout), Some(moe)) = (experts, &local.moe) else {
        return full;
    };
    let mut c = local.clone();
    if let Some(m) = c.moe.as_mut() {
        m.num_experts = layout.local_experts();
        m.moe_intermediate_size = layout.local_ffn();
    }
    crate::model::param_shapes(&c)
        .into_iter()
        .map(|(name, shape)| {
            if name.ends_with(".mlp.gate.weight") {
                (name, vec![moe.num_experts, local.hidden_size])
            } else {
                (name, shape)
            }
        })
        .collect()
}

/// The TP reductions of one layer's gradients (see the module docs): `q_norm`/`k_norm` over TP, k/v over the
/// kv replica group, and with SP the norms and the (replicated) MoE block over TP. Linear in `g`, so a sum of
/// per-micro-batch gradients may be reduced once ([`crate::pipeline`] does). Collective over TP.
pub(crate) fn reduce_layer_grads(
    groups: &ParallelGroups,
    sp: bool,
    mut g: DecoderLayer,
) -> Result<DecoderLayer> {
    let tp = &*groups.tp;
    let kv = &*groups.kv_replica;
    let a = &mut g.self_attn;
    a.q_norm = all_reduce_sum(&a.q_norm, tp)?;
    a.k_norm = all_reduce_sum(&a.k_norm, tp)?;
    a.k_proj = all_reduce_sum(&a.k_proj, kv)?;
    a.v_proj = all_reduce_sum(&a.v_proj, kv)?;
    if sp {
        g.input_layernorm = all_reduce_sum(&g.input_layernorm, tp)?;
        g.post_attention_layernorm = all_reduce_sum(&g.post_attention_layernorm, tp)?;
        if let Ffn::Moe(m) = &mut g.mlp {
            if groups.experts.is_some() {
                // Expert shards differ across TP ranks; only the replicated router sums its token partials.
                m.gate = all_reduce_sum(&m.gate, tp)?;
            } else {
                *m = reduce_moe(m, tp)?;
            }
        }
    }
    Ok(g)
}

fn reduce_moe(m: &SparseMoe, tp: &dyn Communicator) -> Result<SparseMoe> {
    let mut out = m.clone();
    out.gate = all_reduce_sum(&m.gate, tp)?;
    for e in &mut out.experts {
        e.gate_proj = all_reduce_sum(&e.gate_proj, tp)?;
        e.up_proj = all_reduce_sum(&e.up_proj, tp)?;
        e.down_proj = all_reduce_sum(&e.down_proj, tp)?;
    }
    Ok(out)
}

/// `(top_k, norm_topk_prob)` of a MoE config.
fn routing_of(cfg: &ModelConfig) -> (usize, bool) {
    cfg.moe
        .as_ref()
        .map_or((1, false), |m| (m.num_experts_per_tok, m.norm_topk_prob))
}

/// One decoder layer on a TP rank. `x [T_l, H]` is the residual stream (replicated, or the SP shard):
/// ```text
/// n1 = rmsnorm(x)  → enter → attention on local heads (partial o-proj sums) → exit → h = x + ·
/// n2 = rmsnorm(h)  → enter → mlp on local ffn columns (partial down sums)    → exit → y = h + ·
///                  (MoE, replicated: runs on n2 directly, no communication)
/// ```
fn layer_forward(
    l: &DecoderLayer,
    x: &Tensor,
    ctx: &LayerCtx<'_>,
    tp: &dyn Communicator,
    sp: bool,
    experts: Option<TpExperts<'_>>,
) -> Result<(Tensor, LayerActs)> {
    let eps = ctx.cfg.rms_norm_eps;
    let n1 = ops::rmsnorm_fwd(x, &l.input_layernorm, eps)?;
    let xn = enter(&n1.y, tp, sp)?;
    let (a, attn) = l.self_attn.forward(&xn, ctx)?;
    let h = x.add(&exit(&a, tp, sp)?)?;
    let n2 = ops::rmsnorm_fwd(&h, &l.post_attention_layernorm, eps)?;
    let (m, ffn) = match (&l.mlp, experts) {
        (Ffn::Dense(mlp), _) => {
            let (m, s) = mlp.forward(&enter(&n2.y, tp, sp)?)?;
            (exit(&m, tp, sp)?, TpFfnSaved::Local(FfnSaved::Dense(s)))
        }
        (Ffn::Moe(moe), None) => {
            let (top_k, norm) = routing_of(ctx.cfg);
            let (m, s) = moe.forward(&n2.y, top_k, norm)?;
            (m, TpFfnSaved::Local(FfnSaved::Moe(s)))
        }
        // Expert shards: this rank's SP rows go straight to the dispatcher (see super::experts).
        (Ffn::Moe(moe), Some(e)) => {
            let (m, s) = moe_forward(moe, &n2.y, routing_of(ctx.cfg), e.layout, e.groups)?;
            (m, TpFfnSaved::Experts(Box::new(s)))
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

/// [`layer_forward`], keeping all activations or, with `recompute`, only the input and the routing statistics.
pub(crate) fn layer_forward_saved(
    l: &DecoderLayer,
    x: &Tensor,
    ctx: &LayerCtx<'_>,
    tp: &dyn Communicator,
    sp: bool,
    experts: Option<TpExperts<'_>>,
    recompute: bool,
) -> Result<(Tensor, LayerSaved)> {
    let (y, acts) = layer_forward(l, x, ctx, tp, sp, experts)?;
    let saved = if recompute {
        let router_stats = acts.ffn.router_stats().cloned();
        LayerSaved::Recompute {
            x: acts.x,
            router_stats,
        }
    } else {
        LayerSaved::Full(Box::new(acts))
    };
    Ok((y, saved))
}

/// Backward of [`layer_forward`]: `(dx [T_l, H], local gradients before the TP reductions)`.
#[allow(clippy::too_many_arguments)] // the layer, its gradient, activations, context and the four layouts
pub(crate) fn layer_backward(
    l: &DecoderLayer,
    dy: &Tensor,
    saved: LayerSaved,
    ctx: &LayerCtx<'_>,
    aux: Option<AuxLossGrad<'_>>,
    tp: &dyn Communicator,
    sp: bool,
    experts: Option<TpExperts<'_>>,
) -> Result<(Tensor, DecoderLayer)> {
    let s = match saved {
        LayerSaved::Full(a) => *a,
        LayerSaved::Recompute { x, .. } => layer_forward(l, &x, ctx, tp, sp, experts)?.1,
    };
    let (dn2, mlp_grads) = match (&l.mlp, &s.ffn) {
        (Ffn::Dense(mlp), TpFfnSaved::Local(FfnSaved::Dense(saved))) => {
            let (d, g) = mlp.backward(&exit_backward(dy, tp, sp)?, saved)?;
            (enter_backward(&d, tp, sp)?, Ffn::Dense(g))
        }
        (Ffn::Moe(moe), TpFfnSaved::Local(FfnSaved::Moe(saved))) => {
            let (_, norm) = routing_of(ctx.cfg);
            let (d, g) = moe.backward(dy, saved, norm, aux)?;
            (d, Ffn::Moe(g))
        }
        (Ffn::Moe(moe), TpFfnSaved::Experts(saved)) => {
            let e = experts.ok_or(TpError::Model(crate::model::ModelError::SavedMismatch(
                "TP layer: expert-parallel activations without the expert groups",
            )))?;
            let (_, norm) = routing_of(ctx.cfg);
            let (d, g) = moe_backward(moe, dy, saved, norm, aux, e.groups)?;
            (d, Ffn::Moe(g))
        }
        _ => {
            return Err(TpError::Model(crate::model::ModelError::SavedMismatch(
                "TP layer: dense/MoE activations do not match the layer",
            )));
        }
    };
    let g_n2 = ops::rmsnorm_bwd(&dn2, &s.h, &l.post_attention_layernorm, &s.rstd2)?;
    let dh = dy.add(&g_n2.dx)?;
    let (dxn, attn_grads) = l
        .self_attn
        .backward(&exit_backward(&dh, tp, sp)?, &s.attn, ctx)?;
    let dn1 = enter_backward(&dxn, tp, sp)?;
    let g_n1 = ops::rmsnorm_bwd(&dn1, &s.x, &l.input_layernorm, &s.rstd1)?;
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

/// A copy of `like` with its tensors refilled, in visit order, from `flat`.
fn fill_like(like: &Qwen3Params, flat: &[f32], device: Device) -> Result<Qwen3Params> {
    let mut p = like.clone();
    let mut off = 0;
    let mut err = None;
    p.visit_mut(&mut |_, t| {
        let n = t.elem_count();
        match flat
            .get(off..off + n)
            .map(|d| Tensor::from_f32(d.to_vec(), t.shape(), &device))
        {
            Some(Ok(v)) => *t = v,
            Some(Err(e)) => {
                err.get_or_insert(TpError::from(e));
            }
            None => {
                err.get_or_insert(TpError::Shard {
                    name: "<flat>".into(),
                    detail: format!("{} values, more needed", flat.len()),
                });
            }
        }
        off += n;
    });
    match err {
        Some(e) => Err(e),
        None => Ok(p),
    }
}

/// Rows `[r·B/dp, (r+1)·B/dp)` of a global batch of `B` rows: what DP rank `r` runs.
pub fn split_batch_rows(global: &Batch, dp: usize, dp_rank: usize) -> Result<Batch> {
    if dp == 0 || !global.batch.is_multiple_of(dp) || dp_rank >= dp {
        return Err(TpError::BatchNotDivisible {
            rows: global.batch,
            dp,
        });
    }
    let rows = global.batch / dp;
    let range = dp_rank * rows * global.seq..(dp_rank + 1) * rows * global.seq;
    Ok(Batch {
        batch: rows,
        seq: global.seq,
        input_ids: global.input_ids[range.clone()].to_vec(),
        position_ids: global.position_ids[range.clone()].to_vec(),
        segment_ids: global
            .segment_ids
            .as_ref()
            .map(|s| s[range.clone()].to_vec()),
        targets: global.targets[range.clone()].to_vec(),
        loss_weights: global.loss_weights[range].to_vec(),
    })
}
