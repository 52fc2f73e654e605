//! [`DeviceAdamW`]: the optimizer step on device tensors — fp32 master weights and AdamW moments kept on the
//! model's device, the global gradient norm from one fused sum-of-squares pass, torch's clipping coefficient,
//! and one multi-tensor AdamW launch for all parameters ([`qkernels::ops::adamw::adamw_step_multi`]) that also
//! writes the model's compute weights (bf16 on GPU), with f32 or bf16 gradients read as they are.
//!
//! Same maths as the host optimizer ([`super::AdamW`] + [`super::clip_grad_norm`]); the clipping factor is not
//! applied to the gradients in a separate pass but folded into the AdamW kernel (`g·coef` is the first thing it
//! computes, the same f32 product `scale_grads` forms). A non-finite norm skips the update (nothing changes).
//!
//! Invariants: after [`DeviceAdamW::step`] every parameter of the model equals its master cast to the
//! model's dtype; masters and moments never leave the device (checkpoints read them back explicitly).
//!
//! In place (CUDA): a step overwrites the masters, moments and the model's weight tensors in their existing
//! device buffers — no allocation per parameter in steady state. What makes that safe:
//! - masters and moments are buffers this optimizer allocated itself (a fresh copy of each weight, two separate
//!   zero moments, fresh uploads on [`restore`](DeviceAdamW::restore)) and never hands out as values:
//!   [`master`](DeviceAdamW::master) lends a reference, and a clone of it taken by the caller is overwritten by
//!   the next step (copy it, e.g. `to_vec_f32`, to keep it);
//! - a model weight is written in place only if it is the very buffer this optimizer put into the model at its
//!   previous step (compared by device address against a clone the slot keeps). Any other weight (the first
//!   step, weights loaded or replaced since) is first replaced by an optimizer-owned buffer: a fresh one for
//!   bf16, the master itself for f32 (so an f32 model's weights are its masters, as before);
//! - consequently a clone of a model parameter taken after a step (e.g. `params.clone()`, `to_named()`) sees
//!   the next step's values; callers keep no such clones across a step (the trainers and benches here take
//!   clones only within a step or for an immediate gather/copy).
//!
//! On the CPU backend the same call replaces tensors instead (fresh values; clones keep the old ones).

use std::collections::BTreeMap;

use qkernels::{DType, Tensor, ops};

use super::{AdamWConfig, AdamWState, OptimError, clip_coefficient, decays};
use crate::hf::{HostTensor, TensorMap};
use crate::model::{NamedTensors, Qwen3Model};
use crate::zero::ParamSet;

/// Errors of the device optimizer.
#[derive(Debug, thiserror::Error)]
pub enum DeviceOptimError {
    #[error(transparent)]
    Kernel(#[from] qkernels::KernelError),
    #[error(transparent)]
    Config(#[from] OptimError),
    /// The gradients handed to a step lack a parameter of the model.
    #[error("no gradient for parameter `{name}`")]
    MissingGrad { name: String },
    /// A restored state names a parameter the optimizer does not have.
    #[error("optimizer state for `{name}`, which the model does not have")]
    UnknownParam { name: String },
    /// A restored state's length differs from its parameter's.
    #[error("`{name}` has {param_len} values, its optimizer state {state_len}")]
    StateLength {
        name: String,
        param_len: usize,
        state_len: usize,
    },
}

/// Per-parameter device state.
struct Slot {
    master: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    weight_decay: f64,
    /// The weight tensor this optimizer put into the model at its last step (CUDA only): a model weight with
    /// the same device buffer is written in place (see the module docs).
    weight: Option<Tensor>,
}

/// The device buffer of a CUDA tensor (`None` on the CPU).
fn device_addr(t: &Tensor) -> Option<u64> {
    t.cuda_storage().map(|s| s.ptr())
}

/// What one [`DeviceAdamW::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceStepReport {
    /// Pre-clip global gradient norm.
    pub grad_norm: f64,
    /// The factor gradients were scaled by (1 when not clipped).
    pub clip_coef: f32,
    /// True when the norm was not finite and nothing was updated.
    pub skipped: bool,
}

/// AdamW with fp32 masters on the model's device (see the module docs).
pub struct DeviceAdamW {
    config: AdamWConfig,
    slots: BTreeMap<String, Slot>,
    /// Optimizer steps taken (the bias-correction `t` of the next step is `steps + 1`).
    steps: u64,
}

impl DeviceAdamW {
    /// Master weights from the model's current parameters (cast to f32 on their device), zero moments.
    /// Matrices get `weight_decay`, 1-D tensors none ([`decays`]).
    pub fn new(
        model: &Qwen3Model,
        config: AdamWConfig,
        weight_decay: f64,
    ) -> Result<Self, DeviceOptimError> {
        Self::for_params(&model.params, config, weight_decay)
    }

    /// [`new`](Self::new) over any parameter set (a whole model, or one rank's tensor-parallel shard: with data
    /// parallelism every dp rank keeps the same masters and steps them with the dp-summed gradients).
    pub fn for_params(
        params: &(impl ParamSet + ?Sized),
        config: AdamWConfig,
        weight_decay: f64,
    ) -> Result<Self, DeviceOptimError> {
        config.validate()?;
        let mut slots = BTreeMap::new();
        let mut err = None;
        params.visit_params(&mut |name, t| {
            if err.is_some() {
                return;
            }
            let built = (|| -> Result<Slot, qkernels::KernelError> {
                // A private master: on CUDA an f32 weight is copied (×1 is exact) rather than shared, because
                // steps write the master in place.
                let master = if t.is_cuda() && t.dtype() == DType::F32 {
                    t.scale(1.0)?
                } else {
                    t.to_dtype(DType::F32)?
                };
                let zeros = || Tensor::zeros(t.shape(), DType::F32, &t.device());
                Ok(Slot {
                    master,
                    exp_avg: zeros()?,
                    exp_avg_sq: zeros()?,
                    weight_decay: if decays(t.shape()) { weight_decay } else { 0.0 },
                    weight: None,
                })
            })();
            match built {
                Ok(s) => {
                    slots.insert(name, s);
                }
                Err(e) => err = Some(e),
            }
        });
        if let Some(e) = err {
            return Err(e.into());
        }
        Ok(DeviceAdamW {
            config,
            slots,
            steps: 0,
        })
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The fp32 master of `name`. On CUDA the next step overwrites its buffer in place: a clone taken from
    /// this reference changes with it (copy the values out to keep them).
    pub fn master(&self, name: &str) -> Option<&Tensor> {
        self.slots.get(name).map(|s| &s.master)
    }

    /// Sets the number of steps taken (a resumed run: the next step's bias correction uses `steps + 1`).
    pub fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }

    /// Uploads the moments of `name` from a checkpoint (`state.step` is ignored here: see
    /// [`set_steps`](Self::set_steps)). Nothing changes on error.
    pub fn restore(&mut self, name: &str, state: &AdamWState) -> Result<(), DeviceOptimError> {
        let slot = self
            .slots
            .get_mut(name)
            .ok_or_else(|| DeviceOptimError::UnknownParam { name: name.into() })?;
        let n = slot.master.elem_count();
        for len in [state.exp_avg.len(), state.exp_avg_sq.len()] {
            if len != n {
                return Err(DeviceOptimError::StateLength {
                    name: name.into(),
                    param_len: n,
                    state_len: len,
                });
            }
        }
        let (shape, device) = (slot.master.shape().to_vec(), slot.master.device());
        let exp_avg = Tensor::from_f32(state.exp_avg.clone(), &shape, &device)?;
        let exp_avg_sq = Tensor::from_f32(state.exp_avg_sq.clone(), &shape, &device)?;
        slot.exp_avg = exp_avg;
        slot.exp_avg_sq = exp_avg_sq;
        Ok(())
    }

    /// The masters and, once a step was taken, the moments (with the step count as every state's `step`) copied
    /// to the host: what a checkpoint saves. Before the first step there are no states, as with
    /// [`super::AdamW`], whose states appear at the first step.
    pub fn to_host(&self) -> Result<(TensorMap, BTreeMap<String, AdamWState>), DeviceOptimError> {
        self.to_host_filtered(&|_| true)
    }

    /// [`to_host`](Self::to_host) for the parameters `keep` selects only.
    pub fn to_host_filtered(
        &self,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<(TensorMap, BTreeMap<String, AdamWState>), DeviceOptimError> {
        let mut masters = TensorMap::new();
        let mut states = BTreeMap::new();
        for (name, slot) in self.slots.iter().filter(|(n, _)| keep(n)) {
            let shape = slot.master.shape().to_vec();
            masters.insert(
                name.clone(),
                HostTensor {
                    shape,
                    data: slot.master.to_vec_f32()?,
                },
            );
            if self.steps > 0 {
                states.insert(
                    name.clone(),
                    AdamWState {
                        step: self.steps,
                        exp_avg: slot.exp_avg.to_vec_f32()?,
                        exp_avg_sq: slot.exp_avg_sq.to_vec_f32()?,
                    },
                );
            }
        }
        Ok((masters, states))
    }

    /// One step with learning rate `lr`: norm of `grads` (every parameter must have one), clip to `clip_grad`
    /// (0 = no clipping), AdamW on every master, the model's weights replaced by the new masters in its dtype.
    pub fn step(
        &mut self,
        model: &mut Qwen3Model,
        grads: &NamedTensors,
        lr: f64,
        clip_grad: f64,
    ) -> Result<DeviceStepReport, DeviceOptimError> {
        self.check_grads(grads)?;
        let views: Vec<&Tensor> = grads.values().collect();
        let grad_norm = ops::sum_squares(&views)?.sqrt();
        self.step_params(&mut model.params, grads, lr, clip_grad, grad_norm)
    }

    /// One step on `params` with a global gradient norm the caller computed (e.g. over a tensor-parallel group,
    /// each element counted once: [`crate::tensor_parallel::TpModel::grad_norm`]). Same clipping and update as
    /// [`step`](Self::step).
    pub fn step_params(
        &mut self,
        params: &mut (impl ParamSet + ?Sized),
        grads: &NamedTensors,
        lr: f64,
        clip_grad: f64,
        grad_norm: f64,
    ) -> Result<DeviceStepReport, DeviceOptimError> {
        self.check_grads(grads)?;
        if !grad_norm.is_finite() {
            // Skipped: no state changes, and the bias-correction count does not advance (as the host AdamW).
            return Ok(DeviceStepReport {
                grad_norm,
                clip_coef: 1.0,
                skipped: true,
            });
        }
        let clip_coef = if clip_grad > 0.0 {
            clip_coefficient(grad_norm, clip_grad)
        } else {
            1.0
        };
        let t = self.steps + 1;
        // Every scalar but the decay is shared; each parameter's decay is rounded exactly as
        // `AdamWScalars::new` rounds it.
        let (b1, b2, eps) = (self.config.beta1, self.config.beta2, self.config.eps);
        let shared = ops::AdamWScalars::new(b1, b2, eps, lr, 0.0, t);
        // The model's weights by name (clones share storage: on CUDA the step writes through them).
        let mut weights: BTreeMap<String, Tensor> = BTreeMap::new();
        params.visit_params(&mut |name, w| {
            if self.slots.contains_key(&name) {
                weights.insert(name, w.clone());
            }
        });
        if let Some(name) = self.slots.keys().find(|n| !weights.contains_key(*n)) {
            return Err(DeviceOptimError::UnknownParam { name: name.clone() });
        }
        // A weight not written by our previous step gets an optimizer-owned buffer first (module docs).
        for (name, slot) in self.slots.iter() {
            let w = weights.get_mut(name).expect("checked above");
            let Some(addr) = device_addr(w) else { continue };
            if slot.weight.as_ref().and_then(device_addr) == Some(addr) {
                continue;
            }
            *w = if w.dtype() == DType::F32 {
                slot.master.clone()
            } else {
                Tensor::zeros(w.shape(), w.dtype(), &w.device())?
            };
        }
        let mut list: Vec<ops::adamw::AdamWParam<'_>> = Vec::with_capacity(self.slots.len());
        // Both maps are keyed by the same names, so they iterate in the same order.
        for ((name, slot), w) in self.slots.iter_mut().zip(weights.values_mut()) {
            let decay = ops::AdamWScalars::new(b1, b2, eps, lr, slot.weight_decay, t).decay;
            list.push(ops::adamw::AdamWParam {
                master: &mut slot.master,
                exp_avg: &mut slot.exp_avg,
                exp_avg_sq: &mut slot.exp_avg_sq,
                grad: &grads[name],
                weight: w,
                decay,
            });
        }
        ops::adamw::adamw_step_multi(&mut list, &shared, clip_coef)?;
        drop(list);
        for (name, slot) in self.slots.iter_mut() {
            let w = &weights[name];
            slot.weight = w.is_cuda().then(|| w.clone());
        }
        params.visit_params_mut(&mut |name, w| {
            if let Some(n) = weights.remove(&name) {
                *w = n;
            }
        });
        self.steps = t;
        Ok(DeviceStepReport {
            grad_norm,
            clip_coef,
            skipped: false,
        })
    }

    fn check_grads(&self, grads: &NamedTensors) -> Result<(), DeviceOptimError> {
        match self.slots.keys().find(|n| !grads.contains_key(*n)) {
            Some(name) => Err(DeviceOptimError::MissingGrad { name: name.clone() }),
            None => Ok(()),
        }
    }
}
