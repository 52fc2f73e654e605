//! [`Trainer`]: a model, its fp32 master weights, AdamW and the LR schedule; one optimizer step over a list of
//! micro-batches (see the module docs of [`crate::train`] for the maths).

use qkernels::Tensor;

use super::{Result, TrainError};
use crate::hf::{HostTensor, TensorMap};
use crate::model::{Batch, Qwen3Model};
use crate::optim::{self, AdamW, AdamWConfig, AdamWState, LrSchedule, ParamSlot};

/// Optimizer settings of a [`Trainer`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerOptions {
    pub schedule: LrSchedule,
    pub adam: AdamWConfig,
    /// Decoupled weight decay for tensors with `ndim ≥ 2` (1-D tensors get 0).
    pub weight_decay: f64,
    /// Global grad-norm clipping threshold; 0 = no clipping (the norm is still measured).
    pub clip_grad: f64,
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// 1-based number of this step (= iterations taken after it).
    pub step: u64,
    /// Token-weighted loss of the global batch (CE + aux coefficient · aux), before the update.
    pub loss: f64,
    /// Token-weighted cross-entropy.
    pub ce_loss: f64,
    /// Weighted MoE load-balancing loss (before its coefficient), `None` for dense models.
    pub aux_loss: Option<f64>,
    /// Learning rate used.
    pub lr: f64,
    /// Pre-clip global gradient norm.
    pub grad_norm: f64,
    /// `batch · seq` summed over the micro-batches.
    pub tokens: usize,
    /// `Σ loss_weights` over the micro-batches.
    pub loss_weight: f64,
    /// True when the norm was not finite and the update was skipped.
    pub skipped: bool,
}

/// The gradient of one global batch ([`Trainer::gradients`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients {
    /// `d loss / d parameter` by HF name, f32.
    pub grads: TensorMap,
    pub loss: f64,
    pub ce_loss: f64,
    pub aux_loss: Option<f64>,
    pub tokens: usize,
    pub loss_weight: f64,
}

/// Model + optimizer on one process (see [`crate::train`]).
pub struct Trainer {
    model: Qwen3Model,
    /// fp32 master weights by HF name.
    master: TensorMap,
    optimizer: AdamW,
    opts: OptimizerOptions,
    /// Optimizer steps taken (including skipped ones).
    iteration: u64,
    skipped: u64,
}

impl Trainer {
    /// Wraps `model`; its current parameters become the master weights.
    pub fn new(model: Qwen3Model, opts: OptimizerOptions) -> Result<Self> {
        if !(opts.weight_decay >= 0.0 && opts.weight_decay.is_finite()) {
            return Err(TrainError::Invalid {
                key: "weight_decay",
                reason: format!("must be a finite number >= 0, got {}", opts.weight_decay),
            });
        }
        if !(opts.clip_grad >= 0.0 && opts.clip_grad.is_finite()) {
            return Err(TrainError::Invalid {
                key: "clip_grad",
                reason: format!("must be a finite number >= 0, got {}", opts.clip_grad),
            });
        }
        let master = model.params.to_host()?;
        let optimizer = AdamW::new(opts.adam)?;
        Ok(Trainer {
            model,
            master,
            optimizer,
            opts,
            iteration: 0,
            skipped: 0,
        })
    }

    pub fn model(&self) -> &Qwen3Model {
        &self.model
    }

    /// The fp32 master weights by HF name (what a checkpoint saves).
    pub fn master(&self) -> &TensorMap {
        &self.master
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    pub fn options(&self) -> &OptimizerOptions {
        &self.opts
    }

    /// Optimizer steps taken so far (the schedule's iteration for the next step).
    pub fn iteration(&self) -> u64 {
        self.iteration
    }

    /// Steps skipped because of a non-finite gradient norm.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// Restores the position of a resumed run: steps taken, steps skipped and the AdamW state per parameter.
    /// Every parameter must get a state of its own length.
    pub fn restore(
        &mut self,
        iteration: u64,
        skipped: u64,
        states: impl IntoIterator<Item = (String, AdamWState)>,
    ) -> Result<()> {
        for (name, state) in states {
            let Some(p) = self.master.get(&name) else {
                return Err(TrainError::Invalid {
                    key: "optimizer state",
                    reason: format!("state for `{name}`, which the model does not have"),
                });
            };
            if p.data.len() != state.exp_avg.len() {
                return Err(TrainError::Invalid {
                    key: "optimizer state",
                    reason: format!(
                        "`{name}` has {} values, its state {}",
                        p.data.len(),
                        state.exp_avg.len()
                    ),
                });
            }
            self.optimizer.set_state(&name, state)?;
        }
        self.iteration = iteration;
        self.skipped = skipped;
        Ok(())
    }

    /// The token-weighted gradient and loss of one global batch made of `micro_batches`, without touching the
    /// weights: `Σ_m (W_m / W) · ∇ loss(b_m)` (see the module docs of [`crate::train`]).
    pub fn gradients(&self, micro_batches: &[Batch]) -> Result<Gradients> {
        let step = self.iteration + 1;
        let weights: Vec<f64> = micro_batches
            .iter()
            .map(|b| b.loss_weights.iter().map(|&w| w as f64).sum())
            .collect();
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            return Err(TrainError::EmptyBatch { step });
        }
        let mut g = Gradients {
            grads: TensorMap::new(),
            loss: 0.0,
            ce_loss: 0.0,
            aux_loss: None,
            tokens: 0,
            loss_weight: total,
        };
        for (batch, &w) in micro_batches.iter().zip(&weights) {
            g.tokens += batch.tokens();
            if w == 0.0 {
                continue; // contributes nothing to a token-weighted loss
            }
            let out = self.model.forward_backward(batch)?;
            let frac = w / total;
            g.loss += frac * out.loss;
            g.ce_loss += frac * out.ce_loss;
            if let Some(a) = out.aux_loss {
                *g.aux_loss.get_or_insert(0.0) += frac * a;
            }
            let factor = frac as f32;
            for (name, t) in out.grads {
                let mut data = t.to_vec_f32().map_err(crate::model::ModelError::from)?;
                if factor != 1.0 {
                    data.iter_mut().for_each(|x| *x *= factor);
                }
                match g.grads.get_mut(&name) {
                    Some(acc) => optim::accumulate(&mut acc.data, &data)?,
                    None => {
                        let shape = t.shape().to_vec();
                        g.grads.insert(name, HostTensor { shape, data });
                    }
                }
            }
        }
        if !g.grads.keys().eq(self.master.keys()) {
            return Err(TrainError::Invalid {
                key: "gradients",
                reason: "the model's gradient names differ from its parameter names".into(),
            });
        }
        Ok(g)
    }

    /// One optimizer step over `micro_batches` (one global batch). See the module docs for the maths.
    pub fn step(&mut self, micro_batches: &[Batch]) -> Result<StepStats> {
        let step = self.iteration + 1;
        let Gradients {
            mut grads,
            loss,
            ce_loss,
            aux_loss: aux,
            tokens,
            loss_weight: total,
        } = self.gradients(micro_batches)?;

        // Clip, then update (skip on a non-finite norm).
        let grad_norm = {
            let mut views: Vec<&mut [f32]> =
                grads.values_mut().map(|t| t.data.as_mut_slice()).collect();
            if self.opts.clip_grad > 0.0 {
                optim::clip_grad_norm(&mut views, self.opts.clip_grad)
            } else {
                let ro: Vec<&[f32]> = views.iter().map(|v| &**v).collect();
                optim::global_grad_norm(&ro)
            }
        };
        let lr = self.opts.schedule.lr(self.iteration);
        let skipped = !grad_norm.is_finite();
        if skipped {
            self.skipped += 1;
            tracing::warn!(step, grad_norm, "non-finite gradient norm: update skipped");
        } else {
            let wd = self.opts.weight_decay;
            let mut slots: Vec<ParamSlot<'_>> = self
                .master
                .iter_mut()
                .map(|(name, p)| ParamSlot {
                    name: name.as_str(),
                    weight_decay: if optim::decays(&p.shape) { wd } else { 0.0 },
                    param: p.data.as_mut_slice(),
                    grad: grads[name].data.as_slice(),
                })
                .collect();
            self.optimizer.step(lr, &mut slots)?;
            self.upload()?;
        }
        self.iteration += 1;
        Ok(StepStats {
            step,
            loss,
            ce_loss,
            aux_loss: aux,
            lr,
            grad_norm,
            tokens,
            loss_weight: total,
            skipped,
        })
    }

    /// Copies the master weights into the model's tensors.
    fn upload(&mut self) -> Result<()> {
        let device = self.model.device();
        let master = &self.master;
        let mut failed = None;
        self.model.params.visit_mut(&mut |name, t| {
            if failed.is_some() {
                return;
            }
            let host = &master[&name];
            match Tensor::from_f32(host.data.clone(), &host.shape, &device) {
                Ok(new) => *t = new,
                Err(e) => failed = Some(e),
            }
        });
        match failed {
            Some(e) => Err(crate::model::ModelError::from(e).into()),
            None => Ok(()),
        }
    }
}
