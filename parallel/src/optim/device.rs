//! [`DeviceAdamW`]: the optimizer step on device tensors — fp32 master weights and AdamW moments kept on the
//! model's device, the global gradient norm from one fused sum-of-squares pass, torch's clipping coefficient,
//! and one fused AdamW kernel per parameter that also writes the model's compute weights (bf16 on GPU).
//!
//! Same maths as the host optimizer ([`super::AdamW`] + [`super::clip_grad_norm`]); the clipping factor is not
//! applied to the gradients in a separate pass but folded into the AdamW kernel (`g·coef` is the first thing it
//! computes, the same f32 product `scale_grads` forms). A non-finite norm skips the update (nothing changes).
//!
//! Invariants: after [`DeviceAdamW::step`] every parameter of the model equals its master cast to the
//! model's dtype; masters and moments never leave the device (checkpoints read them back explicitly).

use std::collections::BTreeMap;

use qkernels::{DType, Tensor, ops};

use super::{AdamWConfig, AdamWState, OptimError, clip_coefficient, decays};
use crate::hf::{HostTensor, TensorMap};
use crate::model::{NamedTensors, Qwen3Model, Qwen3Params};

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
        params: &Qwen3Params,
        config: AdamWConfig,
        weight_decay: f64,
    ) -> Result<Self, DeviceOptimError> {
        config.validate()?;
        let mut slots = BTreeMap::new();
        let mut err = None;
        params.visit(&mut |name, t| {
            if err.is_some() {
                return;
            }
            let built = (|| -> Result<Slot, qkernels::KernelError> {
                let master = t.to_dtype(DType::F32)?;
                let zeros = Tensor::zeros(t.shape(), DType::F32, &t.device())?;
                Ok(Slot {
                    master,
                    exp_avg: zeros.clone(),
                    exp_avg_sq: zeros,
                    weight_decay: if decays(t.shape()) { weight_decay } else { 0.0 },
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

    /// The fp32 master of `name`.
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
        params: &mut Qwen3Params,
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
        let mut dtypes = BTreeMap::new();
        params.visit(&mut |name, w| {
            dtypes.insert(name, w.dtype());
        });
        let mut new_weights = BTreeMap::new();
        for (name, slot) in self.slots.iter_mut() {
            let g = &grads[name];
            let g32 = if g.dtype() == DType::F32 {
                g.clone()
            } else {
                g.to_dtype(DType::F32)?
            };
            let s = ops::AdamWScalars::new(
                self.config.beta1,
                self.config.beta2,
                self.config.eps,
                lr,
                slot.weight_decay,
                t,
            );
            let weight_dtype = dtypes.get(name).copied().unwrap_or(DType::F32);
            let out = ops::adamw_step(
                &slot.master,
                &g32,
                &slot.exp_avg,
                &slot.exp_avg_sq,
                &s,
                clip_coef,
                weight_dtype,
            )?;
            slot.master = out.master;
            slot.exp_avg = out.exp_avg;
            slot.exp_avg_sq = out.exp_avg_sq;
            new_weights.insert(name.clone(), out.weight);
        }
        params.visit_mut(&mut |name, w| {
            if let Some(n) = new_weights.remove(&name) {
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
