//! [`DeviceDistributedOptimizer`]: ZeRO-1 on device tensors — the distributed optimizer of the GPU engines. Same
//! sharding ([`FlatLayout`]), same maths and same checkpoint pieces as the host [`super::DistributedOptimizer`];
//! the masters, moments and every step's arithmetic stay on the parameters' device, and the collectives run on
//! device buffers through NCCL ([`crate::comm::tensor`]; on CPU tensors the host collectives, which is how the CPU
//! tests check it against the host optimizer).
//!
//! # One step (`d` DP ranks, `N` local parameter values, `N' = ⌈N/d⌉·d`, shard `S_r` of `N'/d` values)
//!
//! ```text
//! flat  = cat(reshape(g_p, [n_p]) for p in layout order, zeros[N' − N])      [N'] f32   (gradients consumed)
//! ĝ_r   = reduce_scatter_rows(flat as [N', 1], dp, sum)                      [N'/d] f32
//! ĝ_r,k = ĝ_r[piece k]                                                       one tensor per piece of S_r
//! norm  = √(all-reduce over dp, then the norm groups, of Σ_{counted k} ‖ĝ_r,k‖²)
//! AdamW(master_k, m_k, v_k; ĝ_r,k · c) → weight_k                            one multi-tensor launch, in place
//! w_r   = cat(weight_k …, zeros[pad])                                        [N'/d] in the weights' dtype
//! full  = all_gather_rows(w_r as [N'/d, 1], dp)                              [N'] → each parameter a narrow of it
//! ```
//! `c = min(1, max_grad_norm/(norm + 1e-6))`; a non-finite norm skips the update. Since AdamW is elementwise and
//! `c` global, the parameters equal those of an unsharded AdamW on the dp-summed gradient (to the summation order
//! of the norm). Memory per rank: the model's weights and gradients, one flat f32 gradient buffer `N'` during
//! the reduce-scatter, and masters + moments `3·N'/d` f32 — against `3·N` for the replicated
//! [`crate::optim::DeviceAdamW`] (Qwen3-8B at DP=8: 12 GB of optimizer state per GPU instead of 96 GB).
//!
//! Invariants: the pieces are [`FlatLayout::pieces`] in order; every piece's master, moments and weight have the
//! piece's length; after a step every parameter equals the all-gathered masters cast to its dtype. All
//! parameters share one dtype (the all-gather moves one buffer).

use std::ops::Range;

use qkernels::{DType, Device, Tensor, ops};

use super::layout::{FlatLayout, norm_and_clip};
use super::{ParamSet, Result, ShardPiece, StepStats, ZeroConfig, ZeroError};
use crate::comm::tensor::{all_gather_rows, reduce_scatter_rows};
use crate::comm::{Communicator, ReduceOp};
use crate::model::NamedTensors;
use crate::optim::{AdamWConfig, OptimError};

/// One piece of a shard on the host: `(parameter name, its elements in the parameter, [master, exp_avg,
/// exp_avg_sq])`.
pub type HostPiece<'a> = (&'a str, Range<usize>, [Vec<f32>; 3]);

/// The device state of one piece of this rank's shard.
struct DevicePiece {
    /// Index of the piece's parameter in the layout.
    segment: usize,
    /// Its range relative to the shard.
    shard: Range<usize>,
    master: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The piece in the weights' dtype, written by the step (for f32 weights the master itself).
    weight: Option<Tensor>,
}

/// ZeRO-1 AdamW over a DP group with its state on the parameters' device (see the module docs).
pub struct DeviceDistributedOptimizer {
    config: ZeroConfig,
    adam: AdamWConfig,
    layout: FlatLayout,
    pieces: Vec<DevicePiece>,
    device: Device,
    steps: u64,
}

impl DeviceDistributedOptimizer {
    /// The optimizer of DP rank `dp_rank` of `dp_size` over `params` (masters are the current values, cast to
    /// f32 on their device; moments zero); `counts_in_norm(name)` says whether this rank counts the tensor in
    /// the global norm.
    pub fn for_params(
        config: ZeroConfig,
        adam: AdamWConfig,
        params: &(impl ParamSet + ?Sized),
        dp_size: usize,
        dp_rank: usize,
        counts_in_norm: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        adam.validate()?;
        let layout = FlatLayout::new(
            params,
            dp_size,
            dp_rank,
            config.weight_decay,
            counts_in_norm,
        )?;
        let mut named = NamedTensors::new();
        params.visit_params(&mut |n, t| {
            named.insert(n, t.clone());
        });
        let device = named.values().next().map_or(Device::Cpu, |t| t.device());
        let base = layout.shard.start;
        let mut pieces = Vec::new();
        for (si, r) in layout.pieces() {
            let seg = &layout.segments[si];
            let start = r.start + base - seg.range.start;
            let flat = named[&seg.name].reshape(&[seg.range.len()])?;
            // `narrow` copies on both backends: the master is a private buffer (steps write it in place).
            let master = flat.narrow(0, start, r.len())?.to_dtype(DType::F32)?;
            let zeros = || Tensor::zeros(&[r.len()], DType::F32, &device);
            pieces.push(DevicePiece {
                segment: si,
                shard: r.clone(),
                exp_avg: zeros()?,
                exp_avg_sq: zeros()?,
                master,
                weight: None,
            });
        }
        Ok(DeviceDistributedOptimizer {
            config,
            adam,
            layout,
            pieces,
            device,
            steps: 0,
        })
    }

    /// This rank's range of the flat buffer and the flat (padded) length.
    pub fn shard_range(&self) -> (Range<usize>, usize) {
        (self.layout.shard.clone(), self.layout.padded)
    }

    /// The pieces of this rank's shard, in layout order (as [`super::DistributedOptimizer::shard_pieces`]).
    pub fn shard_pieces(&self) -> Vec<ShardPiece<'_>> {
        self.layout.shard_pieces()
    }

    /// Optimizer steps taken (skipped steps excluded).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The state of every piece whose parameter `keep` selects, copied to the host, in layout order (moments are
    /// zeros before the first step): what a checkpoint saves (only the pieces it writes are downloaded).
    pub fn pieces_to_host(&self, keep: &dyn Fn(&str) -> bool) -> Result<Vec<HostPiece<'_>>> {
        self.layout
            .shard_pieces()
            .into_iter()
            .zip(&self.pieces)
            .filter(|(sp, _)| keep(sp.name))
            .map(|(sp, p)| {
                Ok((
                    sp.name,
                    sp.param,
                    [
                        p.master.to_vec_f32()?,
                        p.exp_avg.to_vec_f32()?,
                        p.exp_avg_sq.to_vec_f32()?,
                    ],
                ))
            })
            .collect()
    }

    /// Restores this rank's shard from values laid out like the shard (padding included, ignored), as
    /// [`super::DistributedOptimizer::restore_shard`]: masters always, moments when `adam_step > 0`;
    /// [`steps`](Self::steps) becomes `adam_step`. The model's parameters are not touched.
    pub fn restore_shard(
        &mut self,
        master: &[f32],
        exp_avg: &[f32],
        exp_avg_sq: &[f32],
        adam_step: u64,
    ) -> Result<()> {
        self.layout.check_shard_values(&[master, exp_avg, exp_avg_sq])?;
        let upload = |v: &[f32]| Tensor::from_f32(v.to_vec(), &[v.len()], &self.device);
        let mut fresh = Vec::with_capacity(self.pieces.len());
        for p in &self.pieces {
            let r = p.shard.clone();
            let moments = if adam_step > 0 {
                Some((
                    upload(&exp_avg[r.clone()])?,
                    upload(&exp_avg_sq[r.clone()])?,
                ))
            } else {
                None
            };
            fresh.push((upload(&master[r])?, moments));
        }
        for (p, (m, moments)) in self.pieces.iter_mut().zip(fresh) {
            p.master = m;
            p.weight = None;
            if let Some((a, b)) = moments {
                p.exp_avg = a;
                p.exp_avg_sq = b;
            }
        }
        self.steps = adam_step;
        Ok(())
    }

    /// Restores the moments of this rank's pieces from `exp_avg` / `exp_avg_sq` given for every parameter of the
    /// local layout, each piece having taken `adam_step` steps (as
    /// [`super::DistributedOptimizer::restore_moments`]); with `adam_step = 0` only the step count is set.
    pub fn restore_moments(
        &mut self,
        exp_avg: &NamedTensors,
        exp_avg_sq: &NamedTensors,
        adam_step: u64,
    ) -> Result<()> {
        if adam_step > 0 {
            let base = self.layout.shard.start;
            let mut fresh = Vec::with_capacity(self.pieces.len());
            for p in &self.pieces {
                let seg = &self.layout.segments[p.segment];
                let start = p.shard.start + base - seg.range.start;
                let slice = |named: &NamedTensors| -> Result<Tensor> {
                    let t = named.get(&seg.name).ok_or_else(|| ZeroError::MissingGrad {
                        name: seg.name.clone(),
                    })?;
                    self.layout.check_shape(seg, t)?;
                    let flat = t.to_device(&self.device)?.reshape(&[seg.range.len()])?;
                    Ok(flat.narrow(0, start, p.shard.len())?.to_dtype(DType::F32)?)
                };
                fresh.push((slice(exp_avg)?, slice(exp_avg_sq)?));
            }
            for (p, (m, v)) in self.pieces.iter_mut().zip(fresh) {
                p.exp_avg = m;
                p.exp_avg_sq = v;
            }
        }
        self.steps = adam_step;
        Ok(())
    }

    /// Replaces every parameter of `params` (laid out like the optimizer's) by the f32 masters, all-gathered over
    /// `dp`: the full-precision weights of a run that computes in bf16, for checkpoints. Collective over `dp`.
    pub fn masters_into(
        &self,
        params: &mut (impl ParamSet + ?Sized),
        dp: &dyn Communicator,
    ) -> Result<()> {
        self.layout.check_dp(dp)?;
        let masters: Vec<&Tensor> = self.pieces.iter().map(|p| &p.master).collect();
        self.gather_into(params, dp, &masters, DType::F32)
    }

    /// One step: `dp` reduce-scatters the gradients (every parameter of the layout needs one; they are consumed)
    /// and holds the shards; the norm is all-reduced over `dp`, then over every group of `norm_groups`; the
    /// updated shards are all-gathered into `params`. Collective over all of them.
    pub fn step_with(
        &mut self,
        params: &mut (impl ParamSet + ?Sized),
        grads: NamedTensors,
        lr: f64,
        dp: &dyn Communicator,
        norm_groups: &[&dyn Communicator],
    ) -> Result<StepStats> {
        self.layout.check_dp(dp)?;
        let dtype = self.weight_dtype(params)?;
        // 1. Reduce-scatter the flat gradient into this rank's shard.
        let shard = self.reduce_scatter(grads, dp)?;
        let piece_grads = self
            .pieces
            .iter()
            .map(|p| shard.narrow(0, p.shard.start, p.shard.len()))
            .collect::<qkernels::Result<Vec<_>>>()?;
        drop(shard);
        // 2. Global norm, each element of the model counted once.
        let counted: Vec<&Tensor> = self
            .pieces
            .iter()
            .zip(&piece_grads)
            .filter(|(p, _)| self.layout.segments[p.segment].counts_in_norm)
            .map(|(_, g)| g)
            .collect();
        let local = if counted.is_empty() {
            0.0
        } else {
            ops::sum_squares(&counted)?
        };
        let stats = norm_and_clip(local, dp, norm_groups, self.config.max_grad_norm)?;
        if stats.skipped {
            return Ok(stats);
        }
        // 3. AdamW on the pieces, writing each piece's weight in the parameters' dtype.
        let t = self.steps + 1;
        let (b1, b2, eps) = (self.adam.beta1, self.adam.beta2, self.adam.eps);
        let shared = ops::AdamWScalars::new(b1, b2, eps, lr, 0.0, t);
        for p in &mut self.pieces {
            let fits = p.weight.as_ref().is_some_and(|w| w.dtype() == dtype);
            if !fits {
                p.weight = Some(if dtype == DType::F32 {
                    p.master.clone() // shares the master's buffer: the kernel writes it once
                } else {
                    Tensor::zeros(&[p.shard.len()], dtype, &self.device)?
                });
            }
        }
        let mut list = Vec::with_capacity(self.pieces.len());
        for (p, g) in self.pieces.iter_mut().zip(&piece_grads) {
            let decay = self.layout.segments[p.segment].weight_decay;
            list.push(ops::adamw::AdamWParam {
                master: &mut p.master,
                exp_avg: &mut p.exp_avg,
                exp_avg_sq: &mut p.exp_avg_sq,
                grad: g,
                weight: p.weight.as_mut().expect("set above"),
                decay: ops::AdamWScalars::new(b1, b2, eps, lr, decay, t).decay,
            });
        }
        ops::adamw::adamw_step_multi(&mut list, &shared, stats.clip_coef)?;
        drop(list);
        drop(piece_grads);
        // 4. All-gather the updated weights into every rank's parameters.
        let weights: Vec<&Tensor> = self
            .pieces
            .iter()
            .map(|p| p.weight.as_ref().expect("set above"))
            .collect();
        self.gather_into(params, dp, &weights, dtype)?;
        self.steps = t;
        Ok(stats)
    }

    /// The one dtype of every parameter of `params` (checked against the layout's count).
    fn weight_dtype(&self, params: &(impl ParamSet + ?Sized)) -> Result<DType> {
        let mut dtypes = Vec::new();
        params.visit_params(&mut |name, t| dtypes.push((name, t.dtype())));
        let Some((_, first)) = dtypes.first().cloned() else {
            return Err(ZeroError::Layout {
                name: "<no parameters>".into(),
            });
        };
        match dtypes.iter().find(|(_, d)| *d != first) {
            Some((name, d)) => Err(ZeroError::Optim(OptimError::Invalid {
                key: "torch_dtype",
                reason: format!(
                    "the distributed optimizer needs one weight dtype; `{name}` is {d:?}, others {first:?}"
                ),
            })),
            None => Ok(first),
        }
    }

    /// `ĝ_r`: the flat f32 gradient (layout order, zero padded) reduce-scattered over `dp` → `[N'/d]`.
    fn reduce_scatter(&self, mut grads: NamedTensors, dp: &dyn Communicator) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(self.layout.segments.len() + 1);
        for seg in &self.layout.segments {
            let g = grads
                .remove(&seg.name)
                .ok_or_else(|| ZeroError::MissingGrad {
                    name: seg.name.clone(),
                })?;
            self.layout.check_shape(seg, &g)?;
            let g = g.reshape(&[seg.range.len()])?;
            parts.push(if g.dtype() == DType::F32 {
                g
            } else {
                g.to_dtype(DType::F32)?
            });
        }
        drop(grads);
        let total = self.layout.segments.last().map_or(0, |s| s.range.end);
        if self.layout.padded > total {
            parts.push(Tensor::zeros(
                &[self.layout.padded - total],
                DType::F32,
                &self.device,
            )?);
        }
        let refs: Vec<&Tensor> = parts.iter().collect();
        let flat = Tensor::cat(&refs, 0)?;
        drop(refs);
        drop(parts);
        if self.layout.dp == 1 {
            return Ok(flat);
        }
        let out = reduce_scatter_rows(&flat.reshape(&[self.layout.padded, 1])?, dp, ReduceOp::Sum)?;
        Ok(out.reshape(&[self.layout.shard.len()])?)
    }

    /// All-gathers this rank's `pieces` (one per piece, laid out like the shard; padding added here) in `dtype`
    /// over `dp` and replaces every parameter of `params` by its part of the result.
    fn gather_into(
        &self,
        params: &mut (impl ParamSet + ?Sized),
        dp: &dyn Communicator,
        pieces: &[&Tensor],
        dtype: DType,
    ) -> Result<()> {
        let mut parts: Vec<Tensor> = pieces
            .iter()
            .map(|t| {
                if t.dtype() == dtype {
                    Ok((*t).clone())
                } else {
                    t.to_dtype(dtype)
                }
            })
            .collect::<qkernels::Result<_>>()?;
        let covered = self.pieces.last().map_or(0, |p| p.shard.end);
        if self.layout.shard.len() > covered {
            parts.push(Tensor::zeros(
                &[self.layout.shard.len() - covered],
                dtype,
                &self.device,
            )?);
        }
        let refs: Vec<&Tensor> = parts.iter().collect();
        let shard = Tensor::cat(&refs, 0)?;
        let full = if self.layout.dp == 1 {
            shard
        } else {
            all_gather_rows(&shard.reshape(&[self.layout.shard.len(), 1])?, dp)?
                .reshape(&[self.layout.padded])?
        };
        self.layout.assign(params, &mut |seg, _| {
            Ok(full
                .narrow(0, seg.range.start, seg.range.len())?
                .reshape(&seg.shape)?)
        })
    }
}
