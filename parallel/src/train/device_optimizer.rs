//! [`DeviceOptimizer`]: the optimizer of the device engines of [`super::distributed`] (GPU ranks, or CPU ranks
//! with `optimizer_on_device`) — either AdamW replicated over dp ([`DeviceAdamW`]: gradients all-reduced, every dp
//! rank steps every parameter) or ZeRO-1 ([`DeviceDistributedOptimizer`], `use_distributed_optimizer`: gradients
//! reduce-scattered, each dp rank steps its shard, weights all-gathered). Both keep f32 masters and moments on the
//! device and write the same checkpoint pieces ([`optimizer_shards`]), so a run resumes under either, under the
//! host ZeRO-1 engines, or on one rank.
//!
//! Who writes which state: replicated — dp rank 0 writes every local parameter it counts in the norm, whole;
//! sharded — every rank writes the pieces of its shard whose parameter it counts (each element once either way).

use std::path::Path;

use super::Result;
use super::optimizer_shards::{self, GlobalMap, PieceState, ShardedOptimizer};
use crate::model::{ModelError, NamedTensors};
use crate::optim::{AdamWConfig, AdamWState, DeviceAdamW, DeviceOptimError};
use crate::context_parallel::CpEpModel;
use crate::pipeline::PipelineModel;
use crate::tensor_parallel::TpModel;
use crate::zero::{DeviceDistributedOptimizer, ParamSet, StepStats, ZeroConfig};

/// The device engines' optimizer (see the module docs).
pub(super) enum DeviceOptimizer {
    /// Replicated over dp; `clip_grad` 0 = no clipping.
    Replicated { opt: DeviceAdamW, clip_grad: f64 },
    /// ZeRO-1 over dp.
    Sharded(DeviceDistributedOptimizer),
}

impl From<crate::optim::DeviceStepReport> for StepStats {
    fn from(r: crate::optim::DeviceStepReport) -> Self {
        StepStats {
            grad_norm: r.grad_norm,
            clip_coef: r.clip_coef,
            skipped: r.skipped,
        }
    }
}

impl DeviceOptimizer {
    /// The optimizer of a tensor-parallel rank: sharded over its dp group when `sharded`; always the ZeRO
    /// layout (over its optimizer dp group of one) with expert shards.
    pub(super) fn for_tp(
        model: &TpModel,
        zero: ZeroConfig,
        adam: AdamWConfig,
        sharded: bool,
    ) -> Result<Self> {
        Ok(if sharded || model.groups().experts.is_some() {
            let dp = model.optimizer_dp();
            DeviceOptimizer::Sharded(DeviceDistributedOptimizer::for_params(
                zero,
                adam,
                &model.params,
                dp.size(),
                dp.rank(),
                &|n| model.counts_in_norm(n),
            )?)
        } else {
            DeviceOptimizer::Replicated {
                opt: DeviceAdamW::for_params(&model.params, adam, zero.weight_decay)?,
                clip_grad: zero.max_grad_norm.unwrap_or(0.0),
            }
        })
    }

    /// The optimizer of a pipeline rank: sharded over its stage's dp group when `sharded`.
    pub(super) fn for_pipeline(
        model: &PipelineModel,
        zero: ZeroConfig,
        adam: AdamWConfig,
        sharded: bool,
    ) -> Result<Self> {
        Ok(if sharded {
            DeviceOptimizer::Sharded(model.sharded_device_optimizer(zero, adam)?)
        } else {
            DeviceOptimizer::Replicated {
                opt: model.device_optimizer(adam, zero.weight_decay)?,
                clip_grad: zero.max_grad_norm.unwrap_or(0.0),
            }
        })
    }

    /// The optimizer of a context/expert-parallel rank: its full local parameters (the model reduces the
    /// gradients over its dp-cp and expert-dp groups itself), so a dp group of one.
    pub(super) fn for_cp_ep(model: &CpEpModel, zero: ZeroConfig, adam: AdamWConfig) -> Result<Self> {
        Ok(DeviceOptimizer::Sharded(model.device_optimizer(zero, adam)?))
    }

    /// One step of a context/expert-parallel rank on its micro-batch gradient sum. Collective over its groups.
    pub(super) fn step_cp_ep(&mut self, model: &mut CpEpModel, grads: &NamedTensors, lr: f64) -> Result<StepStats> {
        match self {
            DeviceOptimizer::Sharded(opt) => Ok(model.step_device(opt, grads, lr)?),
            DeviceOptimizer::Replicated { .. } => Err(super::TrainError::Invalid {
                key: "parallel",
                reason: "the context/expert-parallel engine steps the ZeRO layout of one rank only".into(),
            }),
        }
    }

    /// One step of a tensor-parallel rank on its micro-batch gradient sum `grads`. Collective over dp and tp.
    pub(super) fn step_tp(
        &mut self,
        model: &mut TpModel,
        mut grads: NamedTensors,
        lr: f64,
    ) -> Result<StepStats> {
        Ok(match self {
            DeviceOptimizer::Replicated { opt, clip_grad } => {
                model.reduce_dp_grads(&mut grads)?;
                let norm = model.grad_norm(&grads)?;
                opt.step_params(&mut model.params, &grads, lr, *clip_grad, norm)?
                    .into()
            }
            DeviceOptimizer::Sharded(opt) => {
                let grads = model.reduce_optimizer_grads(&grads)?;
                let (params, groups) = model.params_and_groups_mut();
                let (dp, norm) = groups.optimizer_groups();
                opt.step_with(params, grads, lr, dp, &norm)?
            }
        })
    }

    /// One step of a pipeline rank on its gradients. Collective over dp, tp and pp.
    pub(super) fn step_pipeline(
        &mut self,
        model: &mut PipelineModel,
        grads: NamedTensors,
        lr: f64,
    ) -> Result<StepStats> {
        Ok(match self {
            DeviceOptimizer::Replicated { opt, clip_grad } => {
                model.step_device(opt, grads, lr, *clip_grad)?
            }
            DeviceOptimizer::Sharded(opt) => model.step_device_sharded(opt, grads, lr)?,
        })
    }

    /// AdamW steps taken.
    pub(super) fn steps(&self) -> u64 {
        match self {
            DeviceOptimizer::Replicated { opt, .. } => opt.steps(),
            DeviceOptimizer::Sharded(opt) => opt.steps(),
        }
    }

    /// Does this rank write the state of its local parameter `name`, given whether it counts it in the norm and
    /// its dp rank (see the module docs)?
    pub(super) fn writes(&self, counts_in_norm: bool, dp_rank: usize) -> bool {
        match self {
            DeviceOptimizer::Replicated { .. } => counts_in_norm && dp_rank == 0,
            DeviceOptimizer::Sharded(_) => counts_in_norm,
        }
    }

    /// Gives the optimizer the moments `m`, `v` (laid out like this rank's parameters) with `adam_step` steps.
    pub(super) fn restore_moments(
        &mut self,
        m: NamedTensors,
        mut v: NamedTensors,
        adam_step: u64,
    ) -> Result<()> {
        match self {
            DeviceOptimizer::Replicated { opt, .. } => {
                for (name, t) in m {
                    let vt = v.remove(&name).expect("m and v have the same layout");
                    let state = AdamWState {
                        step: adam_step,
                        exp_avg: t.to_vec_f32().map_err(ModelError::from)?,
                        exp_avg_sq: vt.to_vec_f32().map_err(ModelError::from)?,
                    };
                    opt.restore(&name, &state)?;
                }
                opt.set_steps(adam_step);
            }
            DeviceOptimizer::Sharded(opt) => opt.restore_moments(&m, &v, adam_step)?,
        }
        Ok(())
    }

    /// Reads this rank's state from a sharded checkpoint: every local parameter of `params` whole (replicated;
    /// its masters are already the checkpoint's weights) or the pieces of its shard.
    pub(super) fn restore_shards(
        &mut self,
        params: &dyn ParamSet,
        shards: &ShardedOptimizer,
        map: &GlobalMap,
    ) -> Result<()> {
        match self {
            DeviceOptimizer::Replicated { opt, .. } => {
                let mut list = Vec::new();
                params.visit_params(&mut |n, t| list.push((n, t.elem_count())));
                let vals = shards.read_params(&list, map)?;
                let mut at = 0;
                for (name, n) in &list {
                    let state = AdamWState {
                        step: shards.adam_step(),
                        exp_avg: vals.exp_avg[at..at + n].to_vec(),
                        exp_avg_sq: vals.exp_avg_sq[at..at + n].to_vec(),
                    };
                    opt.restore(name, &state)?;
                    at += n;
                }
                opt.set_steps(shards.adam_step());
            }
            DeviceOptimizer::Sharded(opt) => {
                let (shard, _) = opt.shard_range();
                let vals = shards.read_pieces(shard.len(), &opt.shard_pieces(), map)?;
                opt.restore_shard(
                    &vals.master,
                    &vals.exp_avg,
                    &vals.exp_avg_sq,
                    shards.adam_step(),
                )?;
            }
        }
        Ok(())
    }

    /// Writes the state this rank owns (`owns(name)`, see [`writes`](Self::writes)) as its shard of the
    /// checkpoint `tmp` (the format of [`optimizer_shards`]).
    pub(super) fn write_shard(
        &self,
        params: &dyn ParamSet,
        owns: &dyn Fn(&str) -> bool,
        tmp: &Path,
        rank: usize,
        map: &GlobalMap,
    ) -> Result<()> {
        let pieces = match self {
            DeviceOptimizer::Replicated { opt, .. } => {
                let mut owned = Vec::new();
                params.visit_params(&mut |n, t| {
                    if owns(&n) {
                        owned.push((n, t.elem_count()));
                    }
                });
                let (masters, mut states) = opt.to_host_filtered(owns)?;
                owned
                    .into_iter()
                    .map(|(name, n)| {
                        let st = states.remove(&name).unwrap_or_else(|| AdamWState {
                            step: 0,
                            exp_avg: vec![0.0; n],
                            exp_avg_sq: vec![0.0; n],
                        });
                        let master = masters[&name].data.clone();
                        (name, 0..n, [master, st.exp_avg, st.exp_avg_sq])
                    })
                    .collect::<Vec<_>>()
            }
            DeviceOptimizer::Sharded(opt) => opt
                .pieces_to_host(owns)?
                .into_iter()
                .map(|(name, r, vals)| (name.to_string(), r, vals))
                .collect(),
        };
        let (names, values): (Vec<String>, Vec<_>) =
            pieces.into_iter().map(|(n, r, v)| (n, (r, v))).unzip();
        let pieces = names
            .iter()
            .zip(values)
            .map(
                |(name, (param, [master, exp_avg, exp_avg_sq]))| PieceState {
                    name,
                    param,
                    master,
                    exp_avg,
                    exp_avg_sq,
                },
            )
            .collect();
        optimizer_shards::write_pieces(tmp, rank, map, pieces)?;
        Ok(())
    }

    /// `local` (laid out like this rank's parameters) with every parameter replaced by its f32 master; the
    /// sharded optimizer all-gathers them over `dp` (collective over `dp`).
    pub(super) fn with_masters<P: ParamSet>(
        &self,
        mut local: P,
        dp: &dyn crate::comm::Communicator,
    ) -> Result<P> {
        match self {
            DeviceOptimizer::Replicated { opt, .. } => {
                let mut missing = None;
                local.visit_params_mut(&mut |n, t| match opt.master(&n) {
                    Some(m) => *t = m.clone(),
                    None => missing = Some(n),
                });
                if let Some(name) = missing {
                    return Err(DeviceOptimError::UnknownParam { name }.into());
                }
            }
            DeviceOptimizer::Sharded(opt) => opt.masters_into(&mut local, dp)?,
        }
        Ok(local)
    }
}
