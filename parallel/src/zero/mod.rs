//! Distributed optimizer (ZeRO stage 1, Megatron's `DistributedOptimizer`): the fp32 master weights and the AdamW
//! states are sharded over the data-parallel group; gradients are reduce-scattered into the shards and parameters
//! all-gathered after the step.
//!
//! # Layout
//!
//! A rank's local parameters (its TP shard, HF names, HF order from [`Qwen3Params::visit`]) are laid end to end
//! in one flat buffer of `N` f32 values, zero-padded to `N' = ⌈N/d⌉·d` for a DP group of `d` ranks. DP rank `r`
//! owns the contiguous range `S_r = [r·N'/d, (r+1)·N'/d)` (= [`chunk_range`](crate::comm::chunk_range)`(N', d, r)`, the chunk a
//! reduce-scatter leaves on rank `r`). A parameter may straddle shard boundaries; each rank steps the pieces that
//! intersect its range, named by the parameter (the AdamW state of that name has the piece's length).
//!
//! # One step
//!
//! ```text
//! ĝ_r   = reduce_scatter_sum(flat(grads))[S_r]        over DP        ĝ = Σ_dp-ranks g  (the loss is already
//!                                                                     normalised by the global weight sum)
//! s     = Σ_{i ∈ S_r, i counted} ĝ_i²                 all-reduce(sum) over DP, then over TP
//! norm  = √s;  c = min(1, max_norm/(norm + 1e-6))      (torch / Megatron clip; skipped if norm is not finite)
//! AdamW(master[S_r], c·ĝ_r)                           elementwise, exactly `optim::AdamW` on the pieces
//! flat(params) = all_gather(master[S_r])              over DP, written back into the model's tensors
//! ```
//! "Counted": each element of the global model once — TP-replicated tensors on TP rank 0 only, replicated kv heads
//! on the first rank of their replica group ([`TpModel::counts_in_norm`]). Because AdamW is elementwise and the
//! clip coefficient is global, the sharded step gives the same parameters as an unsharded AdamW on the full
//! gradient (up to the summation order of `s`).
//!
//! Memory per rank: parameters and gradients `N` each (the model's own tensors), master weights and two moments
//! `3·N'/d` — the ZeRO-1 saving. On the CPU backend params are already fp32, so the master copy equals them; with
//! bf16 device params the master stays fp32 and the all-gather moves the cast values.

mod device;
mod layout;

use std::ops::Range;

use thiserror::Error;

pub use device::DeviceDistributedOptimizer;
use layout::{FlatLayout, norm_and_clip};

use crate::comm::{CommError, Communicator, ReduceOp};
use crate::model::{NamedTensors, Qwen3Params};
use crate::optim::{AdamW, AdamWConfig, AdamWState, OptimError, ParamSlot};
use crate::tensor_parallel::{TpError, TpModel};

/// Errors of the distributed optimizer.
#[derive(Debug, Error)]
pub enum ZeroError {
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error("collective failed: {0}")]
    Comm(#[from] CommError),
    #[error(transparent)]
    Tp(#[from] TpError),
    #[error("no gradient for parameter `{name}`")]
    MissingGrad { name: String },
    #[error("gradient of `{name}` has shape {got:?}, the parameter {expected:?}")]
    GradShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("the model's parameters no longer match the optimizer's layout at `{name}`")]
    Layout { name: String },
}

impl From<qkernels::KernelError> for ZeroError {
    fn from(e: qkernels::KernelError) -> Self {
        ZeroError::Tp(TpError::from(e))
    }
}

impl From<crate::comm::TensorCommError> for ZeroError {
    fn from(e: crate::comm::TensorCommError) -> Self {
        ZeroError::Tp(TpError::from(e))
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, ZeroError>;

/// A fixed, ordered set of named parameters: what the optimizer lays out flat. Implemented by [`Qwen3Params`] (a
/// whole model or a TP shard) and by [`crate::pipeline::StageParams`] (one pipeline stage).
pub trait ParamSet {
    /// Calls `f(name, tensor)` for every parameter, always in the same order.
    fn visit_params(&self, f: &mut dyn FnMut(String, &qkernels::Tensor));
    /// The same walk, mutably.
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(String, &mut qkernels::Tensor));

    /// Casts every parameter to `dtype` on its device (bf16 compute weights from f32 ones, or back). On error
    /// the parameters before the failing one are already cast.
    fn cast_params(&mut self, dtype: qkernels::DType) -> qkernels::Result<()> {
        let mut err = None;
        self.visit_params_mut(&mut |_, t| {
            if err.is_some() || t.dtype() == dtype {
                return;
            }
            match t.to_dtype(dtype) {
                Ok(c) => *t = c,
                Err(e) => err = Some(e),
            }
        });
        err.map_or(Ok(()), Err)
    }
}

impl ParamSet for Qwen3Params {
    fn visit_params(&self, f: &mut dyn FnMut(String, &qkernels::Tensor)) {
        self.visit(&mut |n, t| f(n, t));
    }
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(String, &mut qkernels::Tensor)) {
        self.visit_mut(f);
    }
}

/// Settings of the distributed optimizer (AdamW's betas and eps are in [`AdamWConfig`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZeroConfig {
    /// Decoupled weight decay for matrices and embeddings (1-D tensors get none, [`decays`](crate::optim::decays)).
    pub weight_decay: f64,
    /// Global grad-norm clip; `None` = no clipping (the norm is still computed and reported).
    pub max_grad_norm: Option<f64>,
}

impl Default for ZeroConfig {
    /// Megatron's defaults: weight decay 0.01, clip 1.0.
    fn default() -> Self {
        ZeroConfig {
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
        }
    }
}

/// What one [`DistributedOptimizer::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global gradient L2 norm before clipping (over all ranks, each element once).
    pub grad_norm: f64,
    /// Factor the gradients were multiplied by (1 when not clipped).
    pub clip_coef: f32,
    /// The step was skipped because the norm was not finite (nothing changed).
    pub skipped: bool,
}

/// One parameter piece of a rank's shard ([`DistributedOptimizer::shard_pieces`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPiece<'a> {
    /// The local parameter (HF name of this rank's tensor).
    pub name: &'a str,
    /// Its elements in the local parameter (row-major).
    pub param: Range<usize>,
    /// Where they are in [`DistributedOptimizer::master_shard`] (and the piece's AdamW state has this length).
    pub shard: Range<usize>,
}

/// ZeRO-1 AdamW over a DP group (see the module docs).
#[derive(Debug, Clone)]
pub struct DistributedOptimizer {
    config: ZeroConfig,
    layout: FlatLayout,
    /// fp32 master weights of `S_r`.
    master: Vec<f32>,
    adam: AdamW,
    steps: u64,
}

impl DistributedOptimizer {
    /// The optimizer of one rank of a [`TpModel`] (its DP group and norm-counting rules come from the model).
    pub fn new(config: ZeroConfig, adam: AdamWConfig, model: &TpModel) -> Result<Self> {
        let dp = model.optimizer_dp();
        DistributedOptimizer::for_params(
            config,
            adam,
            &model.params,
            dp.size(),
            dp.rank(),
            &|n| model.counts_in_norm(n),
        )
    }

    /// The optimizer over any parameter set: `dp_size`/`dp_rank` of the DP group, `counts_in_norm(name)` says
    /// whether this rank counts the tensor in the global norm.
    pub fn for_params(
        config: ZeroConfig,
        adam: AdamWConfig,
        params: &(impl ParamSet + ?Sized),
        dp_size: usize,
        dp_rank: usize,
        counts_in_norm: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        let layout = FlatLayout::new(params, dp_size, dp_rank, config.weight_decay, counts_in_norm)?;
        let mut opt = DistributedOptimizer {
            config,
            layout,
            master: Vec::new(),
            adam: AdamW::new(adam)?,
            steps: 0,
        };
        let mut named = NamedTensors::new();
        params.visit_params(&mut |n, t| {
            named.insert(n, t.clone());
        });
        opt.master = opt.flatten(&|name| Ok(named.get(name).cloned()))?[opt.layout.shard.clone()].to_vec();
        Ok(opt)
    }

    /// This rank's range of the flat buffer and the flat (padded) length.
    pub fn shard_range(&self) -> (Range<usize>, usize) {
        (self.layout.shard.clone(), self.layout.padded)
    }

    /// `(name, range in the flat buffer)` of every parameter, in layout order (for checkpoints: a rank's pieces
    /// are the intersections with [`shard_range`](Self::shard_range)).
    pub fn layout(&self) -> impl Iterator<Item = (&str, Range<usize>)> {
        self.layout.ranges()
    }

    /// The fp32 master weights of this rank's shard. The optimizer owns them: parameters changed behind its back
    /// (e.g. a checkpoint load) need a new optimizer.
    pub fn master_shard(&self) -> &[f32] {
        &self.master
    }

    /// AdamW states of this rank's pieces (name → state of the piece), for checkpoints.
    pub fn shard_states(&self) -> impl Iterator<Item = (&str, &AdamWState)> {
        self.adam.states().iter().map(|(n, s)| (n.as_str(), s))
    }

    /// The pieces of this rank's shard, in layout order: for checkpoints that store each rank's state with
    /// global offsets ([`crate::train::optimizer_shards`]).
    pub fn shard_pieces(&self) -> Vec<ShardPiece<'_>> {
        self.layout.shard_pieces()
    }

    /// Restores this rank's shard from values laid out like [`master_shard`](Self::master_shard) (padding
    /// included, ignored): the master weights and, when `adam_step > 0`, every piece's moments with `adam_step`
    /// steps; [`steps`](Self::steps) becomes `adam_step`. The model's parameters are not touched: they must hold
    /// the same values (the checkpoint's weights), or the next step's all-gather replaces them.
    pub fn restore_shard(
        &mut self,
        master: &[f32],
        exp_avg: &[f32],
        exp_avg_sq: &[f32],
        adam_step: u64,
    ) -> Result<()> {
        self.layout.check_shard_values(&[master, exp_avg, exp_avg_sq])?;
        self.master.copy_from_slice(master);
        if adam_step > 0 {
            for (si, r) in self.layout.pieces() {
                self.adam.set_state(
                    &self.layout.segments[si].name,
                    AdamWState {
                        step: adam_step,
                        exp_avg: exp_avg[r.clone()].to_vec(),
                        exp_avg_sq: exp_avg_sq[r].to_vec(),
                    },
                )?;
            }
        }
        self.steps = adam_step;
        Ok(())
    }

    /// Optimizer steps taken (skipped steps excluded).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The AdamW moments `(exp_avg, exp_avg_sq)` of every parameter of the local layout (this rank's TP shard or
    /// pipeline stage, full over DP), keyed by parameter name with the parameter's shape: every DP rank's shard,
    /// all-gathered. A piece not stepped yet has zero moments. Collective over `dp` (the group this optimizer was
    /// built for); the layout-independent checkpoints of [`crate::train::distributed`] gather these further to the
    /// HF layout with the model's `gather_full`.
    pub fn gather_moments(
        &self,
        dp: &dyn Communicator,
        device: &qkernels::Device,
    ) -> Result<(NamedTensors, NamedTensors)> {
        self.layout.check_dp(dp)?;
        let mut m = vec![0f32; self.layout.shard.len()];
        let mut v = vec![0f32; self.layout.shard.len()];
        for (si, r) in self.layout.pieces() {
            if let Some(st) = self.adam.state(&self.layout.segments[si].name) {
                m[r.clone()].copy_from_slice(&st.exp_avg);
                v[r].copy_from_slice(&st.exp_avg_sq);
            }
        }
        let gather = |shard: Vec<f32>| -> Result<Vec<f32>> {
            if self.layout.dp == 1 {
                return Ok(shard);
            }
            let mut full = vec![0f32; self.layout.padded];
            dp.all_gather(&shard, &mut full)?;
            Ok(full)
        };
        let (m, v) = (gather(m)?, gather(v)?);
        Ok((self.unflatten(&m, device)?, self.unflatten(&v, device)?))
    }

    /// Restores the moments of this rank's pieces from `exp_avg` / `exp_avg_sq` given for every parameter of the
    /// local layout (e.g. a checkpoint's full moments sliced like the parameters), each piece having taken
    /// `adam_step` AdamW steps; [`steps`](Self::steps) becomes `adam_step`. With `adam_step = 0` nothing is
    /// restored (a fresh state is zeros anyway). The master weights are not touched: build the optimizer from the
    /// restored parameters.
    pub fn restore_moments(
        &mut self,
        exp_avg: &NamedTensors,
        exp_avg_sq: &NamedTensors,
        adam_step: u64,
    ) -> Result<()> {
        let m = self.flatten(&|n| Ok(exp_avg.get(n).cloned()))?;
        let v = self.flatten(&|n| Ok(exp_avg_sq.get(n).cloned()))?;
        if adam_step > 0 {
            let base = self.layout.shard.start;
            for (si, r) in self.layout.pieces() {
                let abs = r.start + base..r.end + base;
                self.adam.set_state(
                    &self.layout.segments[si].name,
                    AdamWState {
                        step: adam_step,
                        exp_avg: m[abs.clone()].to_vec(),
                        exp_avg_sq: v[abs].to_vec(),
                    },
                )?;
            }
        }
        self.steps = adam_step;
        Ok(())
    }

    /// Named tensors of a flat (padded) buffer in layout order.
    fn unflatten(&self, flat: &[f32], device: &qkernels::Device) -> Result<NamedTensors> {
        let mut out = NamedTensors::new();
        for s in &self.layout.segments {
            let t = qkernels::Tensor::from_f32(flat[s.range.clone()].to_vec(), &s.shape, device)?;
            out.insert(s.name.clone(), t);
        }
        Ok(out)
    }

    /// Flat, padded buffer of `get(name)` in layout order (shapes checked).
    fn flatten(&self, get: &dyn Fn(&str) -> Result<Option<qkernels::Tensor>>) -> Result<Vec<f32>> {
        let mut flat = vec![0f32; self.layout.padded];
        for s in &self.layout.segments {
            let t = get(&s.name)?.ok_or_else(|| ZeroError::MissingGrad {
                name: s.name.clone(),
            })?;
            self.layout.check_shape(s, &t)?;
            flat[s.range.clone()].copy_from_slice(&t.to_vec_f32()?);
        }
        Ok(flat)
    }

    /// Writes the current f32 masters, all-gathered over `dp`, into `params` (laid out like the optimizer's
    /// parameters) as f32 tensors on their devices: the full-precision weights of a run that computes in bf16,
    /// for checkpoints. Collective over `dp`.
    pub fn masters_into(
        &self,
        params: &mut (impl ParamSet + ?Sized),
        dp: &dyn Communicator,
    ) -> Result<()> {
        self.gather_into(params, dp, Some(qkernels::DType::F32))
    }

    /// All-gathers the master shards over `dp` and replaces every parameter of `params` by its values, in
    /// `dtype` (`None`: the parameter's own dtype). Collective over `dp`.
    fn gather_into(
        &self,
        params: &mut (impl ParamSet + ?Sized),
        dp: &dyn Communicator,
        dtype: Option<qkernels::DType>,
    ) -> Result<()> {
        let mut full = vec![0f32; self.layout.padded];
        if self.layout.dp == 1 {
            full.copy_from_slice(&self.master);
        } else {
            dp.all_gather(&self.master, &mut full)?;
        }
        self.layout.assign(params, &mut |seg, t| {
            let dtype = dtype.unwrap_or(t.dtype());
            let v = qkernels::Tensor::from_f32(full[seg.range.clone()].to_vec(), &seg.shape, &t.device())?;
            Ok(if dtype == qkernels::DType::F32 { v } else { v.to_dtype(dtype)? })
        })
    }

    /// One step on a [`TpModel`]: its DP group reduces the gradients, its TP group joins the norm (with expert
    /// shards: the model reduces them, every rank joins the norm — [`TpModel::reduce_optimizer_grads`]).
    pub fn step(
        &mut self,
        model: &mut TpModel,
        grads: &NamedTensors,
        lr: f64,
    ) -> Result<StepStats> {
        let grads = model.reduce_optimizer_grads(grads)?;
        let (params, groups) = model.params_and_groups_mut();
        let (dp, norm) = groups.optimizer_groups();
        self.step_with(params, &grads, lr, dp, &norm)
    }

    /// One step over explicit groups: `dp` reduces the gradients and holds the shards; the partial sums of
    /// squares are all-reduced over `dp` and then over every group of `norm_groups` (the model-parallel groups
    /// whose ranks hold different parts of the model). Collective over all of them.
    pub fn step_with(
        &mut self,
        params: &mut (impl ParamSet + ?Sized),
        grads: &NamedTensors,
        lr: f64,
        dp: &dyn Communicator,
        norm_groups: &[&dyn Communicator],
    ) -> Result<StepStats> {
        self.layout.check_dp(dp)?;
        // 1. Reduce-scatter the gradients into this rank's shard.
        let flat = self.flatten(&|n| Ok(grads.get(n).cloned()))?;
        let mut g = vec![0f32; self.layout.shard.len()];
        if self.layout.dp == 1 {
            g.copy_from_slice(&flat);
        } else {
            dp.reduce_scatter(&flat, &mut g, ReduceOp::Sum)?;
        }
        // 2. Global norm: each element of the model counted once.
        let pieces = self.layout.pieces();
        let sumsq: f64 = pieces
            .iter()
            .filter(|(si, _)| self.layout.segments[*si].counts_in_norm)
            .map(|(_, r)| {
                g[r.clone()]
                    .iter()
                    .map(|&x| (x as f64) * (x as f64))
                    .sum::<f64>()
            })
            .sum();
        let stats = norm_and_clip(sumsq, dp, norm_groups, self.config.max_grad_norm)?;
        if stats.skipped {
            return Ok(stats);
        }
        let clip_coef = stats.clip_coef;
        if clip_coef != 1.0 {
            g.iter_mut().for_each(|x| *x *= clip_coef);
        }
        // 3. AdamW on the pieces of this shard.
        let mut slots = Vec::with_capacity(pieces.len());
        let mut rest: &mut [f32] = &mut self.master;
        let mut cursor = 0;
        for (si, r) in &pieces {
            let seg = &self.layout.segments[*si];
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - cursor);
            let (piece, tail) = tail.split_at_mut(r.len());
            rest = tail;
            cursor = r.end;
            slots.push(ParamSlot {
                name: &seg.name,
                param: piece,
                grad: &g[r.clone()],
                weight_decay: seg.weight_decay,
            });
        }
        self.adam.step(lr, &mut slots)?;
        drop(slots);
        // 4. All-gather the updated shards into every rank's parameters.
        self.gather_into(params, dp, None)?;
        self.steps += 1;
        Ok(stats)
    }
}
