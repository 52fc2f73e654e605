//! [`PipelineModel`]: one rank's pipeline stage (its model chunks, each run through the TP/SP blocks of
//! [`crate::tensor_parallel`]), the executor of a schedule's [`Action`] list, and the groups it talks over
//! ([`PipelineGroups`]). See the [module docs](super) for the maths.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use qkernels::ops::{self, RopeTable, RouterStats};
use qkernels::{DType, Device, Tensor};

use super::partition::StageLayout;
use super::schedule::{self, Action, next_stage, prev_stage, virtual_stage};
use super::{PipelineError, Result};
use crate::comm::{Communicator, ReduceOp};
use crate::dims::{GroupKind, ParallelConfig, ParallelDims};
use crate::model::layer::{LayerCtx, rope_and_segments};
use crate::model::moe::{AuxLossGrad, all_reduce_router_stats};
use crate::model::params::{NamedMismatch, fill_from_named};
use crate::model::{
    Batch, DecoderLayer, ModelConfig, ModelError, NamedTensors, Qwen3Params, param_shapes,
};
use crate::optim::{AdamWConfig, DeviceAdamW};
use crate::tensor_parallel::mappings::{
    all_reduce_sum, enter, enter_backward, exit, exit_backward,
};
use crate::tensor_parallel::{
    LayerSaved, ParallelGroups, Replication, TpPlan, layer_backward, layer_forward_saved,
    reduce_layer_grads, replication_of, shard_with_plan, unshard, vocab,
};
use crate::zero::{DeviceDistributedOptimizer, DistributedOptimizer, StepStats, ZeroConfig};

const EMBED: &str = "model.embed_tokens.weight";
const NORM: &str = "model.norm.weight";
const HEAD: &str = "lm_head.weight";

/// Message kinds in the header of a pipeline transfer.
const KIND_ACTIVATION: f32 = 1.0;
const KIND_GRAD: f32 = 2.0;
/// `[kind, micro-batch, receiving virtual stage]` (small integers, exact in f32).
const HEADER: usize = 3;

/// The communicators of one pipeline rank.
pub struct PipelineGroups {
    /// The groups inside this rank's stage (TP, DP, kv replicas, …): [`ParallelGroups::new`] over the full layout.
    pub stage: ParallelGroups,
    /// The pipeline group (the `pp` ranks that agree on every other coordinate), carrying activations forwards.
    pub pp: Box<dyn Communicator>,
    /// The same ranks on a second communicator, carrying gradients backwards: each direction between two ranks is
    /// then a FIFO of one kind (with `pp = 2` and interleaving, rank 0 sends rank 1 both activations and gradients).
    pub pp_grad: Box<dyn Communicator>,
    /// The embedding group (Megatron's): the first and last rank of the pipeline group, which both hold the word
    /// embedding when it is tied to the LM head; a group of one on middle ranks and when `pp = 1`.
    pub embedding: Box<dyn Communicator>,
}

impl std::fmt::Debug for PipelineGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineGroups")
            .field("stage", &self.stage)
            .field("pp", &self.pp.global_ranks())
            .field("embedding", &self.embedding.global_ranks())
            .finish()
    }
}

impl PipelineGroups {
    /// Splits `world` into the groups of `dims` (collective over `world`; every rank calls it, in the same order
    /// relative to other splits).
    pub fn new(world: &dyn Communicator, dims: &ParallelDims, cfg: &ModelConfig) -> Result<Self> {
        let stage = ParallelGroups::new(world, dims, cfg)?;
        let pp_groups = dims.groups(GroupKind::Pp);
        let pp = world.split(&pp_groups)?;
        let pp_grad = world.split(&pp_groups)?;
        let mut emb = dims.groups(GroupKind::Embedding);
        let covered: HashSet<usize> = emb.iter().flatten().copied().collect();
        emb.extend(
            (0..dims.world())
                .filter(|r| !covered.contains(r))
                .map(|r| vec![r]),
        );
        let embedding = world.split(&emb)?;
        Ok(PipelineGroups {
            stage,
            pp,
            pp_grad,
            embedding,
        })
    }
}

/// The layers of one model chunk (virtual stage): global layers `first_layer ..`.
#[derive(Debug, Clone)]
pub struct ModelChunk {
    pub first_layer: usize,
    pub layers: Vec<DecoderLayer>,
}

/// The parameters (or gradients) of one pipeline rank, TP-local shapes, HF names with *global* layer indices.
///
/// - `embed_tokens [V/tp, H]`: on the first rank; with tied embeddings also on the last rank, where it is the LM
///   head (a replica of the same parameter, kept equal by the embedding-group all-reduce of its gradient);
/// - `chunks[c]`: the layers of virtual stage `c·pp + rank` ([`StageLayout::chunk_layers`]);
/// - `norm [H]`, and `lm_head [V/tp, H]` when untied: on the last rank.
#[derive(Debug, Clone)]
pub struct StageParams {
    pub embed_tokens: Option<Tensor>,
    pub chunks: Vec<ModelChunk>,
    pub norm: Option<Tensor>,
    pub lm_head: Option<Tensor>,
}

impl StageParams {
    /// Calls `f(name, tensor)` for every tensor, in HF order (embedding, layers ascending, norm, head).
    pub fn visit<'a>(&'a self, f: &mut dyn FnMut(String, &'a Tensor)) {
        if let Some(e) = &self.embed_tokens {
            f(EMBED.into(), e);
        }
        for c in &self.chunks {
            for (i, l) in c.layers.iter().enumerate() {
                l.visit(c.first_layer + i, f);
            }
        }
        if let Some(n) = &self.norm {
            f(NORM.into(), n);
        }
        if let Some(h) = &self.lm_head {
            f(HEAD.into(), h);
        }
    }

    /// [`visit`](Self::visit), mutably (optimizer updates).
    pub fn visit_mut(&mut self, f: &mut dyn FnMut(String, &mut Tensor)) {
        if let Some(e) = &mut self.embed_tokens {
            f(EMBED.into(), e);
        }
        for c in &mut self.chunks {
            for (i, l) in c.layers.iter_mut().enumerate() {
                l.visit_mut(c.first_layer + i, f);
            }
        }
        if let Some(n) = &mut self.norm {
            f(NORM.into(), n);
        }
        if let Some(h) = &mut self.lm_head {
            f(HEAD.into(), h);
        }
    }

    /// `(name, tensor)` pairs in HF order.
    pub fn named(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        self.visit(&mut |n, t| out.push((n, t)));
        out
    }

    /// Tensors keyed by HF name (cheap: tensors are reference counted).
    pub fn to_named(&self) -> NamedTensors {
        self.named()
            .into_iter()
            .map(|(n, t)| (n, t.clone()))
            .collect()
    }

    /// Picks pipeline rank `pp_rank`'s share out of a TP rank's parameters over all layers.
    fn select(local: Qwen3Params, layout: &StageLayout, pp_rank: usize, tied: bool) -> Self {
        let (first, last) = (pp_rank == 0, pp_rank + 1 == layout.pp);
        let mut layers: Vec<Option<DecoderLayer>> = local.layers.into_iter().map(Some).collect();
        let chunks = (0..layout.vpp)
            .map(|c| {
                let r = layout.chunk_layers(pp_rank, c);
                ModelChunk {
                    first_layer: r.start,
                    layers: r.filter_map(|i| layers[i].take()).collect(),
                }
            })
            .collect();
        StageParams {
            embed_tokens: (first || (last && tied)).then_some(local.embed_tokens),
            chunks,
            norm: last.then_some(local.norm),
            lm_head: local.lm_head.filter(|_| last),
        }
    }
}

impl crate::zero::ParamSet for StageParams {
    fn visit_params(&self, f: &mut dyn FnMut(String, &Tensor)) {
        self.visit(&mut |n, t| f(n, t));
    }
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(String, &mut Tensor)) {
        self.visit_mut(f);
    }
}

/// `(name, TP-local shape)` of every tensor pipeline rank `pp_rank` holds, in [`StageParams::visit`] order.
fn stage_shapes(
    local_cfg: &ModelConfig,
    layout: &StageLayout,
    pp_rank: usize,
) -> Vec<(String, Vec<usize>)> {
    let (first, last) = (pp_rank == 0, pp_rank + 1 == layout.pp);
    let tied = local_cfg.tie_word_embeddings;
    param_shapes(local_cfg)
        .into_iter()
        .filter(|(name, _)| match name.as_str() {
            EMBED => first || (last && tied),
            NORM | HEAD => last,
            n => layer_index(n).is_some_and(|i| layout.owner(i).0 == pp_rank),
        })
        .collect()
}

/// The layer index of `model.layers.{i}.…`.
fn layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// PP composes with dp, tp and sp; `cp` and `ep` have their own model ([`crate::context_parallel`]) and are not
/// composed with pipelining yet.
fn check_pipeline_dims(dims: &ParallelDims) -> Result<()> {
    if dims.cp() > 1 || dims.ep() > 1 {
        return Err(crate::tensor_parallel::TpError::Unsupported(format!(
            "cp = {}, ep = {} with pp = {} (the pipeline composes with dp, tp and sp only)",
            dims.cp(),
            dims.ep(),
            dims.pp()
        ))
        .into());
    }
    Ok(())
}

/// The layout of one pipeline stage on its own: `dims` with `pp = vpp = 1` over `world/pp` ranks. Because `pp` is
/// the outermost coordinate, global rank `g` is rank `g mod (world/pp)` of it with the same tp/cp/dp coordinates.
pub fn stage_dims(dims: &ParallelDims) -> Result<ParallelDims> {
    Ok(ParallelDims::new(
        dims.world() / dims.pp(),
        ParallelConfig {
            tp: dims.tp(),
            pp: 1,
            vpp: 1,
            cp: dims.cp(),
            ep: dims.ep(),
            etp: Some(dims.etp()),
            sp: dims.sp(),
        },
    )?)
}

/// Result of [`PipelineModel::forward_backward`].
#[derive(Debug, Clone)]
pub struct PpStepOutput {
    /// `ce_loss + router_aux_loss_coef · aux_loss` of the global batch (identical on every rank).
    pub loss: f64,
    /// `Σ w·CE / Σ w` over the global batch.
    pub ce_loss: f64,
    /// `Σ_m (W_m/W)·aux_m` over the global micro-batches (MoE), see the module docs.
    pub aux_loss: Option<f64>,
    /// Gradients of this rank's parameters (TP-local shapes, global HF names), summed over its micro-batches, with
    /// the TP and embedding-group reductions done; the DP reduction is the optimizer's.
    pub grads: NamedTensors,
    /// Micro-batches this rank ran.
    pub micro_batches: usize,
}

/// One rank of a dp × tp (± sp) × pp (× vpp) layout.
pub struct PipelineModel {
    /// The full model's config (HF sizes).
    pub config: ModelConfig,
    /// The config the local blocks run with (local heads, kv heads, ffn, vocab).
    local_config: ModelConfig,
    /// This rank's parameters.
    pub params: StageParams,
    plan: TpPlan,
    layout: StageLayout,
    dims: ParallelDims,
    stage_dims: ParallelDims,
    rank: usize,
    pp_rank: usize,
    groups: PipelineGroups,
    device: Device,
    /// Recompute each layer's activations in backward instead of keeping them.
    pub gradient_checkpointing: bool,
}

impl std::fmt::Debug for PipelineModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineModel")
            .field("rank", &self.rank)
            .field("pp_rank", &self.pp_rank)
            .field("dims", &self.dims)
            .field("plan", &self.plan)
            .finish()
    }
}

impl PipelineModel {
    /// Wraps this rank's already-split parameters (names, shapes and chunk positions are checked).
    pub fn new(
        config: &ModelConfig,
        params: StageParams,
        dims: ParallelDims,
        rank: usize,
        groups: PipelineGroups,
    ) -> Result<Self> {
        check_pipeline_dims(&dims)?;
        let layout = StageLayout::new(config.num_hidden_layers, dims.pp(), dims.vpp())?;
        if rank >= dims.world() {
            return Err(PipelineError::Groups(format!(
                "rank {rank} is outside world size {}",
                dims.world()
            )));
        }
        let sdims = stage_dims(&dims)?;
        let plan = TpPlan::new(config, &sdims, rank % sdims.world())?;
        let c = dims.coord(rank);
        let last = c.pp + 1 == dims.pp();
        let emb = if dims.pp() > 1 && (c.pp == 0 || last) {
            2
        } else {
            1
        };
        let g = &groups;
        for (what, comm, size, pos) in [
            ("TP", &g.stage.tp, plan.tp, plan.tp_rank),
            ("DP", &g.stage.dp, dims.dp(), c.dp),
            ("PP", &g.pp, dims.pp(), c.pp),
            ("PP (gradients)", &g.pp_grad, dims.pp(), c.pp),
            (
                "embedding",
                &g.embedding,
                emb,
                if last && emb == 2 { 1 } else { 0 },
            ),
        ] {
            if comm.size() != size || comm.rank() != pos {
                return Err(PipelineError::Groups(format!(
                    "{what} communicator is rank {} of {}, the layout says rank {pos} of {size}",
                    comm.rank(),
                    comm.size()
                )));
            }
        }
        let local_config = plan.local_config(config);
        let want = stage_shapes(&local_config, &layout, c.pp);
        let got = params.named();
        if want.len() != got.len() {
            return Err(PipelineError::Shard {
                name: "<all>".into(),
                detail: format!("{} parameters, the stage holds {}", got.len(), want.len()),
            });
        }
        for ((wn, ws), (gn, gt)) in want.iter().zip(&got) {
            if wn != gn || ws.as_slice() != gt.shape() {
                return Err(PipelineError::Shard {
                    name: gn.clone(),
                    detail: format!("expected `{wn}` {ws:?}, got shape {:?}", gt.shape()),
                });
            }
        }
        let chunks_ok = params.chunks.len() == layout.vpp
            && params.chunks.iter().enumerate().all(|(i, ch)| {
                let r = layout.chunk_layers(c.pp, i);
                ch.first_layer == r.start && ch.layers.len() == r.len()
            });
        if !chunks_ok {
            return Err(PipelineError::Shard {
                name: "<chunks>".into(),
                detail: format!(
                    "rank {} must hold {} chunks of {} layers at {:?}",
                    c.pp,
                    layout.vpp,
                    layout.layers_per_chunk(),
                    (0..layout.vpp)
                        .map(|i| layout.chunk_layers(c.pp, i))
                        .collect::<Vec<_>>()
                ),
            });
        }
        let device = got.first().map(|(_, t)| t.device()).unwrap_or(Device::Cpu);
        Ok(PipelineModel {
            config: config.clone(),
            local_config,
            params,
            plan,
            layout,
            dims,
            stage_dims: sdims,
            rank,
            pp_rank: c.pp,
            groups,
            device,
            gradient_checkpointing: false,
        })
    }

    /// Slices the full parameters (HF layout) for global rank `rank`: its TP shard of its stage's tensors.
    pub fn from_full(
        config: &ModelConfig,
        full: &Qwen3Params,
        dims: ParallelDims,
        rank: usize,
        groups: PipelineGroups,
    ) -> Result<Self> {
        check_pipeline_dims(&dims)?;
        let layout = StageLayout::new(config.num_hidden_layers, dims.pp(), dims.vpp())?;
        let sdims = stage_dims(&dims)?;
        if rank >= dims.world() {
            return Err(PipelineError::Groups(format!(
                "rank {rank} is outside world size {}",
                dims.world()
            )));
        }
        let plan = TpPlan::new(config, &sdims, rank % sdims.world())?;
        let local = shard_with_plan(&plan, full)?;
        let params = StageParams::select(
            local,
            &layout,
            dims.coord(rank).pp,
            config.tie_word_embeddings,
        );
        PipelineModel::new(config, params, dims, rank, groups)
    }

    /// Turns per-layer activation recomputation on or off (gradients are bit-identical either way).
    pub fn with_gradient_checkpointing(mut self, on: bool) -> Self {
        self.gradient_checkpointing = on;
        self
    }

    pub fn dims(&self) -> &ParallelDims {
        &self.dims
    }
    pub fn plan(&self) -> &TpPlan {
        &self.plan
    }
    pub fn layout(&self) -> &StageLayout {
        &self.layout
    }
    pub fn groups(&self) -> &PipelineGroups {
        &self.groups
    }
    /// Global rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Position in the pipeline group.
    pub fn pp_rank(&self) -> usize {
        self.pp_rank
    }
    /// Position in the DP group (which rows of each global micro-batch this rank runs).
    pub fn dp_rank(&self) -> usize {
        self.dims.coord(self.rank).dp
    }
    pub fn is_first_stage(&self) -> bool {
        self.pp_rank == 0
    }
    pub fn is_last_stage(&self) -> bool {
        self.pp_rank + 1 == self.dims.pp()
    }
    pub fn device(&self) -> Device {
        self.device
    }

    /// Does parameter `name` count in a global gradient norm on this rank? The TP rules of
    /// [`TpModel::counts_in_norm`](crate::tensor_parallel::TpModel::counts_in_norm), and the tied embedding's replica
    /// on the last stage never (the first stage counts it).
    pub fn counts_in_norm(&self, name: &str) -> bool {
        if name == EMBED && self.pp_rank != 0 {
            return false;
        }
        match replication_of(name) {
            Replication::Sharded => true,
            Replication::Replicated => self.plan.tp_rank == 0,
            Replication::KvReplicated => self.plan.first_kv_replica(),
        }
    }

    /// The ZeRO-1 optimizer of this rank: its DP group holds the shards, the norm counts each element once.
    pub fn optimizer(&self, config: ZeroConfig, adam: AdamWConfig) -> Result<DistributedOptimizer> {
        let dp = &*self.groups.stage.dp;
        Ok(DistributedOptimizer::for_params(
            config,
            adam,
            &self.params,
            dp.size(),
            dp.rank(),
            &|n| self.counts_in_norm(n),
        )?)
    }

    /// One optimizer step: DP reduce-scatter of `grads`, global norm over DP, TP and PP, AdamW, all-gather.
    /// Collective over DP, TP and PP. The tied embedding's two replicas get the same gradient and the same update.
    pub fn step(
        &mut self,
        opt: &mut DistributedOptimizer,
        grads: &NamedTensors,
        lr: f64,
    ) -> Result<StepStats> {
        let g = &self.groups;
        Ok(opt.step_with(
            &mut self.params,
            grads,
            lr,
            &*g.stage.dp,
            &[&*g.stage.tp, &*g.pp],
        )?)
    }

    /// The ZeRO-1 optimizer of this rank on its device (the GPU engine with `use_distributed_optimizer`): its DP
    /// group holds the shards of the stage's masters and moments, the norm counts each element once.
    pub fn sharded_device_optimizer(
        &self,
        config: ZeroConfig,
        adam: AdamWConfig,
    ) -> Result<DeviceDistributedOptimizer> {
        let dp = &*self.groups.stage.dp;
        Ok(DeviceDistributedOptimizer::for_params(
            config,
            adam,
            &self.params,
            dp.size(),
            dp.rank(),
            &|n| self.counts_in_norm(n),
        )?)
    }

    /// [`step`](Self::step) with the device ZeRO-1 optimizer: `grads` (consumed) reduce-scattered over DP on the
    /// device, norm over DP, TP and PP, AdamW on the shard, all-gather. Collective over DP, TP and PP.
    pub fn step_device_sharded(
        &mut self,
        opt: &mut DeviceDistributedOptimizer,
        grads: NamedTensors,
        lr: f64,
    ) -> Result<StepStats> {
        let g = &self.groups;
        Ok(opt.step_with(&mut self.params, grads, lr, &*g.stage.dp, &[&*g.stage.tp, &*g.pp])?)
    }

    /// The dtype activations and their gradients flow in: the weights' (bf16 compute on GPUs, f32 on the CPU).
    pub fn activation_dtype(&self) -> DType {
        self.params
            .chunks
            .first()
            .and_then(|c| c.layers.first())
            .map_or(DType::F32, |l| l.input_layernorm.dtype())
    }

    /// The device optimizer of this rank (the GPU engine): f32 masters and moments of its stage's parameters on its
    /// device, replicated over DP ([`DeviceAdamW`]); matrices get `weight_decay`.
    pub fn device_optimizer(&self, adam: AdamWConfig, weight_decay: f64) -> Result<DeviceAdamW> {
        Ok(DeviceAdamW::for_params(&self.params, adam, weight_decay)?)
    }

    /// One step with the device optimizer: `grads` (this rank's, from [`forward_backward`](Self::forward_backward))
    /// summed over DP on the device, the global norm `√(Σ counted g²)` all-reduced over TP and PP (each element
    /// once, [`counts_in_norm`](Self::counts_in_norm)), clipping to `clip_grad` (0 = none), AdamW. Collective over
    /// DP, TP and PP; the tied embedding's replicas already carry the same summed gradient, so they stay equal.
    pub fn step_device(
        &mut self,
        opt: &mut DeviceAdamW,
        grads: NamedTensors,
        lr: f64,
        clip_grad: f64,
    ) -> Result<StepStats> {
        let g = &self.groups;
        let mut grads = grads
            .into_iter()
            .map(|(n, t)| Ok((n, if t.dtype() == DType::F32 { t } else { t.to_dtype(DType::F32)? })))
            .collect::<std::result::Result<NamedTensors, qkernels::KernelError>>()?;
        crate::comm::tensor::reduce_grads(&mut grads, &*g.stage.dp).map_err(crate::tensor_parallel::TpError::from)?;
        let counted: Vec<&Tensor> = grads
            .iter()
            .filter(|(n, _)| self.counts_in_norm(n))
            .map(|(_, t)| t)
            .collect();
        let local = if counted.is_empty() { 0.0 } else { ops::sum_squares(&counted)? };
        let mut total = [local as f32];
        for c in [&*g.stage.tp, &*g.pp] {
            if c.size() > 1 {
                c.all_reduce(&mut total, ReduceOp::Sum)?;
            }
        }
        let r = opt.step_params(&mut self.params, &grads, lr, clip_grad, (total[0] as f64).sqrt())?;
        Ok(StepStats {
            grad_norm: r.grad_norm,
            clip_coef: r.clip_coef,
            skipped: r.skipped,
        })
    }

    /// Forward and backward over this rank's micro-batches of one global batch (see
    /// [`micro_batches`](super::micro_batches); every rank of a DP replica passes the same ones), with the schedule
    /// of the layout: 1F1B, or interleaved 1F1B when `vpp > 1`. Collective over the pipeline, TP and DP groups.
    pub fn forward_backward(&self, micro_batches: &[Batch]) -> Result<PpStepOutput> {
        let actions = schedule::schedule(
            self.dims.pp(),
            self.dims.vpp(),
            self.pp_rank,
            micro_batches.len(),
        )?;
        self.run_schedule(micro_batches, &actions)
    }

    /// Forward-only `(loss, ce_loss, aux_loss)` of the global batch, as [`forward_backward`](Self::forward_backward)
    /// reports them (evaluation; [`schedule::forward_only`], no activations kept). Collective like it.
    pub fn loss(&self, micro_batches: &[Batch]) -> Result<(f64, f64, Option<f64>)> {
        self.check_micro_batches(micro_batches)?;
        let actions = schedule::forward_only(
            self.dims.pp(),
            self.dims.vpp(),
            self.pp_rank,
            micro_batches.len(),
        )?;
        let mut ex = Executor::new(self, micro_batches, false)?;
        for &a in &actions {
            ex.run(a)?;
        }
        let out = ex.finish()?;
        Ok((out.loss, out.ce_loss, out.aux_loss))
    }

    /// Runs any action list over this rank's micro-batches (the one [`forward_backward`](Self::forward_backward)
    /// uses, or another valid one: every rank's lists must pair up, see [`schedule::simulate`]). An action whose
    /// input is missing, or a received message of the wrong kind, micro-batch or stage, is a
    /// [`PipelineError::Protocol`] error.
    pub fn run_schedule(
        &self,
        micro_batches: &[Batch],
        actions: &[Action],
    ) -> Result<PpStepOutput> {
        self.check_micro_batches(micro_batches)?;
        let mut ex = Executor::new(self, micro_batches, true)?;
        for &a in actions {
            ex.run(a)?;
        }
        ex.finish()
    }

    fn check_micro_batches(&self, mbs: &[Batch]) -> Result<()> {
        let Some(first) = mbs.first() else {
            return Err(PipelineError::Batch("no micro-batches".into()));
        };
        for (i, b) in mbs.iter().enumerate() {
            b.validate(self.config.vocab_size)?;
            if (b.batch, b.seq) != (first.batch, first.seq) {
                return Err(PipelineError::Batch(format!(
                    "micro-batch {i} is {}×{}, micro-batch 0 {}×{} (all must have one shape)",
                    b.batch, b.seq, first.batch, first.seq
                )));
            }
        }
        let t = first.tokens();
        if self.plan.sp && !t.is_multiple_of(self.plan.tp) {
            return Err(crate::tensor_parallel::TpError::TokensNotDivisible {
                tokens: t,
                tp: self.plan.tp,
            }
            .into());
        }
        Ok(())
    }

    /// Gradients by HF name in the container of this rank's parameters (shapes checked).
    pub fn grads_as_params(&self, grads: &NamedTensors) -> Result<StageParams> {
        let mut out = self.params.clone();
        fill_from_named(grads, |f| out.visit_mut(f))
            .map_err(|NamedMismatch { name, detail }| PipelineError::Shard { name, detail })?;
        Ok(out)
    }

    /// Slices tensors laid out like the full (HF-layout) parameters — the weights, or per-parameter state such as a
    /// checkpoint's AdamW moments — exactly as this rank's parameters were sliced: its TP shard of its stage's
    /// tensors (no communication). The inverse of [`gather_full`](Self::gather_full).
    pub fn local_from_full(&self, full: &Qwen3Params) -> Result<StageParams> {
        let local = shard_with_plan(&self.plan, full)?;
        Ok(StageParams::select(
            local,
            &self.layout,
            self.pp_rank,
            self.config.tie_word_embeddings,
        ))
    }

    /// The full (HF-layout) parameters, gathered over the pipeline and TP groups (collective; every rank gets them).
    pub fn gather_full_params(&self) -> Result<Qwen3Params> {
        self.gather_full(&self.params)
    }

    /// Gathers tensors laid out like this rank's parameters (parameters, or gradients after
    /// [`grads_as_params`](Self::grads_as_params)) into the full HF layout: each pipeline rank broadcasts its
    /// stage over the pipeline group (the first stage's replica of a tied embedding wins), then the TP shards are
    /// all-gathered and [`unshard`]ed. Collective over PP and TP.
    pub fn gather_full(&self, local: &StageParams) -> Result<Qwen3Params> {
        let pp = self.dims.pp();
        let mut by_name: HashMap<String, Tensor> = HashMap::new();
        for s in 0..pp {
            let shapes = stage_shapes(&self.local_config, &self.layout, s);
            let n: usize = shapes
                .iter()
                .map(|(_, sh)| sh.iter().product::<usize>())
                .sum();
            let mut buf = if s == self.pp_rank {
                let named = local.named();
                let same = named.len() == shapes.len()
                    && named
                        .iter()
                        .zip(&shapes)
                        .all(|((n, t), (wn, ws))| n == wn && t.shape() == ws.as_slice());
                if !same {
                    return Err(PipelineError::Shard {
                        name: "<all>".into(),
                        detail: "tensors to gather are not laid out like this stage's parameters"
                            .into(),
                    });
                }
                let mut v = Vec::with_capacity(n);
                for (_, t) in named {
                    v.extend(t.to_vec_f32()?);
                }
                v
            } else {
                vec![0f32; n]
            };
            if pp > 1 {
                self.groups.pp.broadcast(&mut buf, s)?;
            }
            let mut off = 0;
            for (name, shape) in shapes {
                let k: usize = shape.iter().product();
                if let Entry::Vacant(e) = by_name.entry(name) {
                    e.insert(Tensor::from_f32(
                        buf[off..off + k].to_vec(),
                        &shape,
                        &self.device,
                    )?);
                }
                off += k;
            }
        }
        let tp_local = Qwen3Params::build(&self.local_config, &mut |name, _| {
            by_name
                .remove(&name)
                .ok_or(ModelError::MissingParam { name })
        })?;
        // Over TP, as TpModel::gather_full: every TP rank's local tensors have the same shapes.
        let tp = &*self.groups.stage.tp;
        let mut flat = Vec::new();
        for (_, t) in tp_local.named() {
            flat.extend(t.to_vec_f32()?);
        }
        let mut all = vec![0f32; flat.len() * tp.size()];
        if tp.size() > 1 {
            tp.all_gather(&flat, &mut all)?;
        } else {
            all.copy_from_slice(&flat);
        }
        let shards = all
            .chunks(flat.len().max(1))
            .map(|chunk| {
                let mut off = 0;
                Qwen3Params::build(&self.local_config, &mut |_, shape| {
                    let k: usize = shape.iter().product();
                    let t = Tensor::from_f32(chunk[off..off + k].to_vec(), &shape, &self.device)?;
                    off += k;
                    Ok(t)
                })
            })
            .collect::<std::result::Result<Vec<_>, ModelError>>()?;
        Ok(unshard(&self.config, &self.stage_dims, &shards)?)
    }

    fn head_weight(&self) -> Result<&Tensor> {
        self.params
            .lm_head
            .as_ref()
            .or(self.params.embed_tokens.as_ref())
            .ok_or_else(|| {
                PipelineError::Protocol("the LM head runs on the last stage only".into())
            })
    }

    fn moe_experts(&self) -> Option<usize> {
        self.config.moe.as_ref().map(|m| m.num_experts)
    }

    fn aux_coef(&self) -> f64 {
        self.config
            .moe
            .as_ref()
            .map_or(0.0, |m| m.router_aux_loss_coef)
    }
}

/// An activation or its gradient between two virtual stages, with the routing statistics that travel along (MoE):
/// forwards the partial sum over the stages so far, backwards the micro-batch's global statistics.
struct Flow {
    /// `[T_l, H]`, `T_l = T/tp` with SP, else `T`.
    x: Tensor,
    stats: Option<RouterStats>,
}

/// What the last stage's forward leaves for its backward.
struct HeadSaved {
    /// `[T_l, H]` input of the final norm.
    x_last: Tensor,
    rstd: Tensor,
    /// `[T, H]` normalised hidden state as the LM head saw it.
    hn: Tensor,
    /// `[T, V/tp]`
    dlogits: Tensor,
}

/// Gradient accumulators of one step (summed over micro-batches, reduced once in [`Executor::finish`]).
#[derive(Default)]
struct Accum {
    embed: Option<Tensor>,
    head: Option<Tensor>,
    norm: Option<Tensor>,
    /// `[chunk][layer in chunk]`
    layers: Vec<Vec<Option<DecoderLayer>>>,
}

fn accumulate(acc: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    match acc {
        Some(a) => a.add_assign(&g)?,
        None => *acc = Some(g),
    }
    Ok(())
}

fn accumulate_layer(acc: &mut Option<DecoderLayer>, g: DecoderLayer) -> Result<()> {
    let Some(a) = acc else {
        *acc = Some(g);
        return Ok(());
    };
    let mut parts = Vec::new();
    g.visit(0, &mut |_, t| parts.push(t.clone()));
    let mut it = parts.into_iter();
    let mut err = None;
    a.visit_mut(0, &mut |_, t| {
        if let Some(x) = it.next()
            && let Err(e) = t.add_assign(&x)
        {
            err.get_or_insert(e);
        }
    });
    match err {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// The read-only inputs of one step.
struct Step<'a> {
    mbs: &'a [Batch],
    /// RoPE table and segment ids of every micro-batch.
    inputs: Vec<(RopeTable, Option<Tensor>)>,
    /// `W_m`: loss-weight sum of global micro-batch `m` (all DP ranks).
    w: Vec<f64>,
    /// `W = Σ_m W_m`.
    total: f64,
}

impl Step<'_> {
    fn ctx<'b>(&'b self, cfg: &'b ModelConfig, mb: usize) -> LayerCtx<'b> {
        let b = &self.mbs[mb];
        LayerCtx {
            cfg,
            batch: b.batch,
            seq: b.seq,
            rope: &self.inputs[mb].0,
            segment_ids: self.inputs[mb].1.as_ref(),
        }
    }
}

/// Runs one step's actions on one rank.
struct Executor<'a> {
    m: &'a PipelineModel,
    step: Step<'a>,
    saved: HashMap<(usize, usize), Vec<LayerSaved>>,
    head: HashMap<usize, HeadSaved>,
    acts_in: HashMap<(usize, usize), Flow>,
    acts_out: HashMap<(usize, usize), Flow>,
    grads_in: HashMap<(usize, usize), Flow>,
    grads_out: HashMap<(usize, usize), Flow>,
    /// Last stage: global routing statistics per micro-batch, from its forward until its backward.
    global_stats: HashMap<usize, RouterStats>,
    acc: Accum,
    /// `Σ_m Σ_{t ∈ m, this DP rank} w·CE / W`.
    ce_sum: f64,
    /// `Σ_m (W_m/W)·aux_m`.
    aux_sum: f64,
    forwards: HashSet<(usize, usize)>,
    backwards: HashSet<(usize, usize)>,
    /// `false`: forward only (evaluation): nothing is kept for a backward, no gradients.
    training: bool,
}

impl<'a> Executor<'a> {
    /// Per-step setup: the RoPE tables and the global loss weights `W_m` (all-reduced over DP).
    fn new(m: &'a PipelineModel, mbs: &'a [Batch], training: bool) -> Result<Self> {
        let inputs = mbs
            .iter()
            .map(|b| {
                rope_and_segments(
                    &m.config,
                    &b.position_ids,
                    b.segment_ids.as_deref(),
                    b.batch,
                    b.seq,
                    &m.device,
                )
            })
            .collect::<std::result::Result<Vec<_>, ModelError>>()?;
        let mut w: Vec<f32> = mbs
            .iter()
            .map(|b| b.loss_weights.iter().map(|&x| x as f64).sum::<f64>() as f32)
            .collect();
        let dp = &*m.groups.stage.dp;
        if dp.size() > 1 {
            dp.all_reduce(&mut w, ReduceOp::Sum)?;
        }
        let w: Vec<f64> = w.into_iter().map(f64::from).collect();
        let total: f64 = w.iter().sum();
        if !(total > 0.0 && total.is_finite()) {
            return Err(PipelineError::EmptyBatch);
        }
        let layers = m
            .params
            .chunks
            .iter()
            .map(|c| c.layers.iter().map(|_| None).collect())
            .collect();
        Ok(Executor {
            m,
            step: Step {
                mbs,
                inputs,
                w,
                total,
            },
            saved: HashMap::new(),
            head: HashMap::new(),
            acts_in: HashMap::new(),
            acts_out: HashMap::new(),
            grads_in: HashMap::new(),
            grads_out: HashMap::new(),
            global_stats: HashMap::new(),
            acc: Accum {
                layers,
                ..Default::default()
            },
            ce_sum: 0.0,
            aux_sum: 0.0,
            forwards: HashSet::new(),
            backwards: HashSet::new(),
            training,
        })
    }

    fn stage(&self, chunk: usize) -> usize {
        virtual_stage(self.m.dims.pp(), self.m.pp_rank, chunk)
    }

    fn last_stage(&self) -> usize {
        self.m.layout.pp * self.m.layout.vpp - 1
    }

    /// Rows of the activation tensors: `T/tp` with SP, else `T`.
    fn local_tokens(&self) -> usize {
        let t = self.step.mbs[0].tokens();
        if self.m.plan.sp {
            t / self.m.plan.tp
        } else {
            t
        }
    }

    fn stats_len(&self) -> usize {
        self.m.moe_experts().map_or(0, |e| 2 * e + 1)
    }

    /// On GPUs with a device-capable pipeline group the activation or gradient tensor travels by itself through
    /// NCCL in its dtype ([`crate::comm::tensor::send`]) right after a host message of header + statistics;
    /// otherwise it rides inside the host message as f32.
    fn tensor_on_device(&self) -> bool {
        matches!(self.m.device, Device::Cuda(_)) && self.m.groups.pp.device().is_some()
    }

    /// Length of one activation or gradient message (what [`encode`](Self::encode) writes).
    fn msg_len(&self) -> usize {
        let x = if self.tensor_on_device() { 0 } else { self.local_tokens() * self.m.config.hidden_size };
        HEADER + x + self.stats_len()
    }

    fn protocol(&self, a: Action, what: &str) -> PipelineError {
        PipelineError::Protocol(format!("pipeline rank {}: {a:?}: {what}", self.m.pp_rank))
    }

    fn run(&mut self, a: Action) -> Result<()> {
        let (mb, chunk) = a.item();
        if mb >= self.step.mbs.len() || chunk >= self.m.layout.vpp {
            return Err(self.protocol(a, "micro-batch or chunk out of range"));
        }
        let (pp, vpp, r) = (self.m.layout.pp, self.m.layout.vpp, self.m.pp_rank);
        match a {
            Action::Forward { .. } => self.forward(a, mb, chunk),
            Action::Backward { .. } if !self.training => {
                Err(self.protocol(a, "backward in a forward-only run"))
            }
            Action::Backward { .. } => self.backward(a, mb, chunk),
            Action::SendActivation { to, .. } => {
                let Some((nr, nc)) = next_stage(pp, vpp, r, chunk).filter(|x| x.0 == to) else {
                    return Err(self.protocol(a, "the next virtual stage is not there"));
                };
                let f = self
                    .acts_out
                    .remove(&(mb, chunk))
                    .ok_or_else(|| self.protocol(a, "no activation to send (forward not run)"))?;
                let msg = self.encode(KIND_ACTIVATION, mb, virtual_stage(pp, nr, nc), &f)?;
                self.m.groups.pp.send(&msg, to)?;
                self.send_tensor(&f.x, &*self.m.groups.pp, to)
            }
            Action::RecvActivation { from, .. } => {
                if prev_stage(pp, r, chunk).map(|x| x.0) != Some(from) {
                    return Err(self.protocol(a, "the previous virtual stage is not there"));
                }
                let mut buf = vec![0f32; self.msg_len()];
                self.m.groups.pp.recv(&mut buf, from)?;
                let x = self.recv_tensor(&*self.m.groups.pp, from)?;
                let f = self.decode(a, &buf, KIND_ACTIVATION, mb, self.stage(chunk), x)?;
                self.acts_in.insert((mb, chunk), f);
                Ok(())
            }
            Action::SendGrad { to, .. } => {
                let Some((pr, pc)) = prev_stage(pp, r, chunk).filter(|x| x.0 == to) else {
                    return Err(self.protocol(a, "the previous virtual stage is not there"));
                };
                let f = self
                    .grads_out
                    .remove(&(mb, chunk))
                    .ok_or_else(|| self.protocol(a, "no gradient to send (backward not run)"))?;
                let msg = self.encode(KIND_GRAD, mb, virtual_stage(pp, pr, pc), &f)?;
                self.m.groups.pp_grad.send(&msg, to)?;
                self.send_tensor(&f.x, &*self.m.groups.pp_grad, to)
            }
            Action::RecvGrad { from, .. } => {
                if next_stage(pp, vpp, r, chunk).map(|x| x.0) != Some(from) {
                    return Err(self.protocol(a, "the next virtual stage is not there"));
                }
                let mut buf = vec![0f32; self.msg_len()];
                self.m.groups.pp_grad.recv(&mut buf, from)?;
                let x = self.recv_tensor(&*self.m.groups.pp_grad, from)?;
                let f = self.decode(a, &buf, KIND_GRAD, mb, self.stage(chunk), x)?;
                self.grads_in.insert((mb, chunk), f);
                Ok(())
            }
        }
    }

    /// The tensor half of a message on the device path ([`tensor_on_device`](Self::tensor_on_device)).
    fn send_tensor(&self, x: &Tensor, group: &dyn Communicator, to: usize) -> Result<()> {
        if self.tensor_on_device() {
            // Both ends agree on the dtype: the receiver allocates the activations' dtype.
            let dtype = self.m.activation_dtype();
            let cast;
            let x = if x.dtype() == dtype {
                x
            } else {
                cast = x.to_dtype(dtype)?;
                &cast
            };
            crate::comm::tensor::send(x, group, to).map_err(crate::tensor_parallel::TpError::from)?;
        }
        Ok(())
    }

    /// The conjugate of [`send_tensor`](Self::send_tensor): `[T_local, H]` in the activations' dtype.
    fn recv_tensor(&self, group: &dyn Communicator, from: usize) -> Result<Option<Tensor>> {
        if !self.tensor_on_device() {
            return Ok(None);
        }
        let shape = [self.local_tokens(), self.m.config.hidden_size];
        let dtype = self.m.activation_dtype();
        let x = crate::comm::tensor::recv(&shape, dtype, &self.m.device, group, from)
            .map_err(crate::tensor_parallel::TpError::from)?;
        Ok(Some(x))
    }

    /// `[kind, mb, receiving stage] ++ x ++ stats` (see the module docs); without `x` on the device path.
    fn encode(&self, kind: f32, mb: usize, to_stage: usize, f: &Flow) -> Result<Vec<f32>> {
        let mut msg = vec![kind, mb as f32, to_stage as f32];
        if !self.tensor_on_device() {
            msg.extend(f.x.to_vec_f32()?);
        }
        if let Some(s) = &f.stats {
            msg.extend(s.assignments.iter().chain(&s.prob_sums).map(|&v| v as f32));
            msg.push(s.rows as f32);
        }
        Ok(msg)
    }

    /// Parses a message; `x` is the tensor received beside it on the device path (`None`: it is in `buf`).
    fn decode(
        &self,
        a: Action,
        buf: &[f32],
        kind: f32,
        mb: usize,
        stage: usize,
        x: Option<Tensor>,
    ) -> Result<Flow> {
        if buf[..HEADER] != [kind, mb as f32, stage as f32] {
            return Err(self.protocol(
                a,
                &format!(
                    "received [kind {}, micro-batch {}, stage {}], expected [{kind}, {mb}, {stage}]",
                    buf[0], buf[1], buf[2]
                ),
            ));
        }
        let (x, stats_at) = match x {
            Some(x) => (x, HEADER),
            None => {
                let (tl, h) = (self.local_tokens(), self.m.config.hidden_size);
                let x = Tensor::from_f32(buf[HEADER..HEADER + tl * h].to_vec(), &[tl, h], &self.m.device)?;
                // The host wire is f32; activations and their gradients flow in the weights' dtype.
                let dtype = self.m.activation_dtype();
                (if dtype == DType::F32 { x } else { x.to_dtype(dtype)? }, HEADER + tl * h)
            }
        };
        let stats = self.m.moe_experts().map(|e| {
            let s = &buf[stats_at..];
            RouterStats {
                assignments: s[..e].iter().map(|&v| v as f64).collect(),
                prob_sums: s[e..2 * e].iter().map(|&v| v as f64).collect(),
                rows: s[2 * e] as f64,
            }
        });
        Ok(Flow { x, stats })
    }

    /// Micro-batch statistics summed over every rank that saw different tokens of it: the TP group with SP
    /// (without SP the TP ranks routed the same tokens) and the DP group.
    fn global_router_stats(&self, mut s: RouterStats) -> Result<RouterStats> {
        let g = &self.m.groups.stage;
        all_reduce_router_stats(&mut s, &*g.dp)?;
        if self.m.plan.sp {
            all_reduce_router_stats(&mut s, &*g.tp)?;
        }
        Ok(s)
    }

    fn forward(&mut self, a: Action, mb: usize, chunk: usize) -> Result<()> {
        if !self.forwards.insert((mb, chunk)) {
            return Err(self.protocol(a, "forward ran twice"));
        }
        let m = self.m;
        let (tp, sp) = (&*m.groups.stage.tp, m.plan.sp);
        let s = self.stage(chunk);
        let b = &self.step.mbs[mb];
        let Flow { mut x, mut stats } = if s == 0 {
            let e = m
                .params
                .embed_tokens
                .as_ref()
                .ok_or_else(|| self.protocol(a, "no embedding on this rank"))?;
            let x0 = vocab::embedding_fwd(&b.input_ids, e, m.plan.vocab_start)?; // [T, H] partial
            Flow {
                x: exit(&x0, tp, sp)?, // [T_l, H]
                stats: m.moe_experts().map(RouterStats::new),
            }
        } else {
            self.acts_in
                .remove(&(mb, chunk))
                .ok_or_else(|| self.protocol(a, "input activation not received"))?
        };
        let ctx = self.step.ctx(&m.local_config, mb);
        let layers = &m.params.chunks[chunk].layers;
        let mut saved = Vec::with_capacity(layers.len());
        // Forward only: keep nothing but the routing statistics (the recompute form holds just those and x).
        let recompute = m.gradient_checkpointing || !self.training;
        for layer in layers {
            let (y, sl) = layer_forward_saved(layer, &x, &ctx, tp, sp, None, recompute)?;
            if let (Some(acc), Some(st)) = (stats.as_mut(), sl.router_stats()) {
                acc.merge(st)?;
            }
            if self.training {
                saved.push(sl);
            }
            x = y;
        }
        if self.training {
            self.saved.insert((mb, chunk), saved);
        }
        if s != self.last_stage() {
            self.acts_out.insert((mb, chunk), Flow { x, stats });
            return Ok(());
        }
        // The last stage: global routing statistics, final norm, LM head, vocab-parallel CE over W.
        let stats = stats.map(|s| self.global_router_stats(s)).transpose()?;
        let norm = m
            .params
            .norm
            .as_ref()
            .ok_or_else(|| self.protocol(a, "no final norm on this rank"))?;
        let nf = ops::rmsnorm_fwd(&x, norm, m.config.rms_norm_eps)?;
        let hn = enter(&nf.y, tp, sp)?; // [T, H]
        let logits = ops::linear_fwd(&hn, m.head_weight()?)?; // [T, V/tp]
        let ce = vocab::cross_entropy_fwd_bwd(
            &logits,
            &b.targets,
            &b.loss_weights,
            self.step.total,
            m.plan.vocab_start,
            tp,
        )?;
        self.ce_sum += ce.loss;
        if let Some(g) = stats {
            self.aux_sum += self.step.w[mb] / self.step.total * g.aux_loss();
            if self.training {
                self.global_stats.insert(mb, g);
            }
        }
        if !self.training {
            return Ok(());
        }
        self.head.insert(
            mb,
            HeadSaved {
                x_last: x,
                rstd: nf.rstd,
                hn,
                dlogits: ce.dlogits,
            },
        );
        Ok(())
    }

    fn backward(&mut self, a: Action, mb: usize, chunk: usize) -> Result<()> {
        if !self.backwards.insert((mb, chunk)) {
            return Err(self.protocol(a, "backward ran twice"));
        }
        let m = self.m;
        let (tp, sp) = (&*m.groups.stage.tp, m.plan.sp);
        let s = self.stage(chunk);
        let saved = self
            .saved
            .remove(&(mb, chunk))
            .ok_or_else(|| self.protocol(a, "backward before its forward"))?;
        let (mut dx, stats) = if s == self.last_stage() {
            let h = self
                .head
                .remove(&mb)
                .ok_or_else(|| self.protocol(a, "no loss gradient"))?;
            let g_head = ops::linear_bwd(&h.dlogits, &h.hn, m.head_weight()?)?;
            accumulate(&mut self.acc.head, g_head.dw)?;
            let dnf = enter_backward(&g_head.dx, tp, sp)?;
            let norm = m
                .params
                .norm
                .as_ref()
                .ok_or_else(|| self.protocol(a, "no final norm"))?;
            let g_norm = ops::rmsnorm_bwd(&dnf, &h.x_last, norm, &h.rstd)?;
            accumulate(&mut self.acc.norm, g_norm.dw)?;
            (g_norm.dx, self.global_stats.remove(&mb))
        } else {
            let f = self
                .grads_in
                .remove(&(mb, chunk))
                .ok_or_else(|| self.protocol(a, "output gradient not received"))?;
            (f.x, f.stats)
        };
        // d(coef·(W_m/W)·aux_m): the aux loss of micro-batch m enters the step's loss with weight W_m/W.
        let coef = m.aux_coef() * self.step.w[mb] / self.step.total;
        let aux = stats.as_ref().map(|st| AuxLossGrad { stats: st, coef });
        let ctx = self.step.ctx(&m.local_config, mb);
        let layers = &m.params.chunks[chunk].layers;
        for (i, (layer, sl)) in layers.iter().zip(saved).enumerate().rev() {
            let (d, g) = layer_backward(layer, &dx, sl, &ctx, aux, tp, sp, None)?;
            accumulate_layer(&mut self.acc.layers[chunk][i], g)?;
            dx = d;
        }
        if s == 0 {
            let b = &self.step.mbs[mb];
            let dx0 = exit_backward(&dx, tp, sp)?; // [T, H]
            let d = vocab::embedding_bwd(&b.input_ids, &dx0, m.plan.vocab, m.plan.vocab_start)?;
            accumulate(&mut self.acc.embed, d)?;
        } else {
            self.grads_out.insert((mb, chunk), Flow { x: dx, stats });
        }
        Ok(())
    }

    /// After the last action: every item consumed, the TP reductions (once, on the sums over micro-batches) and the
    /// tied embedding's all-reduce over the embedding group ([`reduce_grads`]), and the losses of the last stage
    /// broadcast over the pipeline group.
    fn finish(self) -> Result<PpStepOutput> {
        let m = self.m;
        let n = self.step.mbs.len() * m.layout.vpp;
        let left = self.saved.len()
            + self.head.len()
            + self.acts_in.len()
            + self.acts_out.len()
            + self.grads_in.len()
            + self.grads_out.len();
        let want_b = if self.training { n } else { 0 };
        if self.forwards.len() != n || self.backwards.len() != want_b || left != 0 {
            return Err(PipelineError::Protocol(format!(
                "pipeline rank {}: the schedule ran {} forwards and {} backwards of {n} and left {left} tensors \
                 unconsumed",
                m.pp_rank,
                self.forwards.len(),
                self.backwards.len()
            )));
        }
        let grads = if self.training {
            reduce_grads(m, self.acc)?.to_named()
        } else {
            NamedTensors::new()
        };
        let last = m.is_last_stage();

        // Losses: the CE summed over DP on the last stage, then [ce, aux] from the last stage to every stage
        // (f64 bits split into two f32 words, so every rank reports the same bits).
        let mut ce = self.ce_sum;
        let dp = &*m.groups.stage.dp;
        if last && dp.size() > 1 {
            let mut l = [ce as f32];
            dp.all_reduce(&mut l, ReduceOp::Sum)?;
            ce = l[0] as f64;
        }
        let mut vals = [ce, self.aux_sum];
        let pp = &*m.groups.pp;
        if pp.size() > 1 {
            let mut words: Vec<f32> = vals
                .iter()
                .flat_map(|v| {
                    let b = v.to_bits();
                    [f32::from_bits(b as u32), f32::from_bits((b >> 32) as u32)]
                })
                .collect();
            pp.broadcast(&mut words, pp.size() - 1)?;
            for (v, w) in vals.iter_mut().zip(words.chunks(2)) {
                *v = f64::from_bits(u64::from(w[0].to_bits()) | (u64::from(w[1].to_bits()) << 32));
            }
        }
        let [ce_loss, aux] = vals;
        let aux_loss = m.moe_experts().map(|_| aux);
        Ok(PpStepOutput {
            loss: ce_loss + m.aux_coef() * aux_loss.unwrap_or(0.0),
            ce_loss,
            aux_loss,
            grads,
            micro_batches: self.step.mbs.len(),
        })
    }
}

/// The once-per-step gradient reductions (see [`Executor::finish`]).
fn reduce_grads(m: &PipelineModel, acc: Accum) -> Result<StageParams> {
    let (tp, sp) = (&*m.groups.stage.tp, m.plan.sp);
    let (first, last) = (m.is_first_stage(), m.is_last_stage());
    let tied = m.config.tie_word_embeddings;
    let missing = |what: &str| PipelineError::Protocol(format!("no gradient for {what}"));
    let Accum {
        embed,
        head,
        norm,
        layers,
    } = acc;
    let mut chunks = Vec::with_capacity(layers.len());
    for (gs, ch) in layers.into_iter().zip(&m.params.chunks) {
        let layers = gs
            .into_iter()
            .map(|g| {
                Ok(reduce_layer_grads(
                    &m.groups.stage,
                    sp,
                    g.ok_or_else(|| missing("a layer"))?,
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        chunks.push(ModelChunk {
            first_layer: ch.first_layer,
            layers,
        });
    }
    let norm = match (last, norm) {
        (false, _) => None,
        (true, Some(g)) if sp => Some(all_reduce_sum(&g, tp)?),
        (true, g) => Some(g.ok_or_else(|| missing(NORM))?),
    };
    // The word embedding: the lookup's gradient on the first stage, the head's on the last when tied; the
    // embedding group sums the two replicas' gradients so both apply the same update.
    let (mut embed, lm_head) = match (first, last, tied) {
        (true, true, true) => {
            let mut e = embed.ok_or_else(|| missing(EMBED))?;
            e.add_assign(&head.ok_or_else(|| missing("the head"))?)?;
            (Some(e), None)
        }
        (true, true, false) => (
            Some(embed.ok_or_else(|| missing(EMBED))?),
            Some(head.ok_or_else(|| missing(HEAD))?),
        ),
        (true, false, _) => (Some(embed.ok_or_else(|| missing(EMBED))?), None),
        (false, true, true) => (Some(head.ok_or_else(|| missing("the head"))?), None),
        (false, true, false) => (None, Some(head.ok_or_else(|| missing(HEAD))?)),
        (false, false, _) => (None, None),
    };
    if let Some(e) = &mut embed
        && tied
        && m.groups.embedding.size() > 1
    {
        *e = all_reduce_sum(e, &*m.groups.embedding)?;
    }
    Ok(StageParams {
        embed_tokens: embed,
        chunks,
        norm,
        lm_head,
    })
}
