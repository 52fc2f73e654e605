//! [`Trainer`]: a model, its fp32 master weights, AdamW and the LR schedule; one optimizer step over a list of
//! micro-batches (see the module docs of [`crate::train`] for the maths).
//!
//! # LoRA mode ([`Trainer::new_lora`])
//!
//! The base weights are frozen: the trainable parameters (masters, AdamW states, clipping, weight decay) are the
//! adapter factors only, keyed by their PEFT names (`base_model.model.<module>.lora_A.weight` / `lora_B`). The model
//! runs on the effective weights `W' = W + s·B·A` of every target (the frozen `W` are kept aside on the model
//! device) and the adapter gradients come from `G = dL/dW'` as `dA = s·Bᵀ·G`, `dB = s·G·Aᵀ` (see
//! [`crate::lora`]). After every update `W'` is recomputed from `W` and the new masters, so the model's target
//! weights always equal [`lora::effective_weight`] of the masters bit for bit and every other weight is the base's.
//!
//! # Where the optimizer runs
//!
//! A model on the CPU (and every LoRA run) keeps its masters and AdamW states on the host ([`AdamW`]). A full
//! training run of a model on a GPU ([`Trainer::new`] on a CUDA model, or [`Trainer::with_device_optimizer`])
//! keeps them on the model's device ([`DeviceAdamW`]): the micro-batch gradients are summed in f32 on the device,
//! the norm, clipping and update run there, and the model's weights are rewritten in their own dtype (bf16 after
//! [`Trainer::cast_model`]). The host copies ([`Trainer::master`], [`Trainer::optimizer`]) are then refreshed only
//! by [`Trainer::sync_host_state`], which a checkpoint needs first ([`Trainer::host_state_current`]). Same maths
//! on both: the device optimizer on a CPU model equals the host one (`parallel/tests/train_loop.rs`).

use qkernels::{DType, Tensor};

use super::{Result, TrainError};
use crate::hf::{HostTensor, TensorMap};
use crate::lora::{self, LoraAdapters, LoraConfig};
use crate::model::{Batch, ModelError, NamedTensors, Qwen3Model};
use crate::optim::{self, AdamW, AdamWConfig, AdamWState, DeviceAdamW, LrSchedule, ParamSlot};

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
    /// `d loss / d parameter` by master name (HF name; LoRA: the adapter factors by PEFT key), f32.
    pub grads: TensorMap,
    pub loss: f64,
    pub ce_loss: f64,
    pub aux_loss: Option<f64>,
    pub tokens: usize,
    pub loss_weight: f64,
}

/// One adapted weight in LoRA mode.
struct LoraTarget {
    /// HF name of the base weight.
    weight: String,
    /// PEFT keys of its factors in the masters.
    a_key: String,
    b_key: String,
    /// The frozen base weight `W [out, in]` on the model device.
    base: Tensor,
    /// The current factors on the model device (refreshed after every update).
    a: Tensor,
    b: Tensor,
}

/// The LoRA part of a [`Trainer`].
struct LoraState {
    config: LoraConfig,
    scaling: f32,
    targets: Vec<LoraTarget>,
}

/// The optimizer on the model's device (see the module docs).
struct DeviceState {
    opt: DeviceAdamW,
    /// `Trainer::master` / `Trainer::optimizer` hold the device state as of now.
    host_current: bool,
}

/// Loss sums of one global batch (the gradients went to a sink).
struct BatchSums {
    loss: f64,
    ce_loss: f64,
    aux_loss: Option<f64>,
    tokens: usize,
    loss_weight: f64,
}

/// Model + optimizer on one process (see [`crate::train`]).
pub struct Trainer {
    model: Qwen3Model,
    /// fp32 master weights by HF name (LoRA: the adapter factors by PEFT key). With a device optimizer: the copy
    /// of the last [`Trainer::sync_host_state`].
    master: TensorMap,
    optimizer: AdamW,
    opts: OptimizerOptions,
    /// Optimizer steps taken (including skipped ones).
    iteration: u64,
    skipped: u64,
    lora: Option<LoraState>,
    device: Option<DeviceState>,
}

fn check_options(opts: &OptimizerOptions) -> Result<()> {
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
    Ok(())
}

impl Trainer {
    /// LoRA training of `adapters` on the frozen `model` (see the module docs): the adapters become the master
    /// weights. `config` must allow training ([`LoraConfig::validate_for_training`]: no dropout) and agree with the
    /// adapters' rank and scaling; every adapted weight must be a parameter of `model` of shape `[out, in]`.
    pub fn new_lora(
        model: Qwen3Model,
        opts: OptimizerOptions,
        config: LoraConfig,
        adapters: LoraAdapters,
    ) -> Result<Self> {
        check_options(&opts)?;
        config.validate_for_training()?;
        if adapters.rank != config.rank || adapters.scaling != config.scaling() {
            return Err(TrainError::Invalid {
                key: "lora",
                reason: format!(
                    "the adapters have rank {} and scaling {}, the config rank {} and scaling {}",
                    adapters.rank,
                    adapters.scaling,
                    config.rank,
                    config.scaling()
                ),
            });
        }
        let device = model.device();
        let mut params: NamedTensors = model.params.to_named();
        adapters.check_against(|n| params.get(n).map(|t| t.shape()))?;
        let mut targets = Vec::with_capacity(adapters.pairs.len());
        for (name, p) in &adapters.pairs {
            let base = params.remove(name).expect("checked above");
            let upload = |t: &HostTensor| {
                Tensor::from_f32(t.data.clone(), &t.shape, &device).map_err(ModelError::from)
            };
            targets.push(LoraTarget {
                weight: name.clone(),
                a_key: lora::peft_key(name, "lora_A"),
                b_key: lora::peft_key(name, "lora_B"),
                base,
                a: upload(&p.a)?,
                b: upload(&p.b)?,
            });
        }
        let master = adapters.to_peft_tensors();
        let optimizer = AdamW::new(opts.adam)?;
        let scaling = adapters.scaling;
        let mut t = Trainer {
            model,
            master,
            optimizer,
            opts,
            iteration: 0,
            skipped: 0,
            lora: Some(LoraState {
                config,
                scaling,
                targets,
            }),
            device: None,
        };
        t.upload()?;
        Ok(t)
    }

    /// Wraps `model`; its current parameters become the master weights — on the host for a CPU model, on the
    /// model's GPU otherwise (see the module docs).
    pub fn new(model: Qwen3Model, opts: OptimizerOptions) -> Result<Self> {
        if matches!(model.device(), qkernels::Device::Cuda(_)) {
            return Trainer::with_device_optimizer(model, opts);
        }
        check_options(&opts)?;
        let master = model.params.to_host()?;
        let optimizer = AdamW::new(opts.adam)?;
        Ok(Trainer {
            model,
            master,
            optimizer,
            opts,
            iteration: 0,
            skipped: 0,
            lora: None,
            device: None,
        })
    }

    /// Wraps `model` with the optimizer on the model's device ([`DeviceAdamW`]) whatever that device is: its
    /// current parameters, cast to f32, become the masters. Build it before [`Trainer::cast_model`], so the
    /// masters keep full precision.
    pub fn with_device_optimizer(model: Qwen3Model, opts: OptimizerOptions) -> Result<Self> {
        check_options(&opts)?;
        let opt = DeviceAdamW::new(&model, opts.adam, opts.weight_decay)?;
        let optimizer = AdamW::new(opts.adam)?;
        Ok(Trainer {
            model,
            master: TensorMap::new(),
            optimizer,
            opts,
            iteration: 0,
            skipped: 0,
            lora: None,
            device: Some(DeviceState {
                opt,
                host_current: false,
            }),
        })
    }

    /// Casts the model's weights to `dtype` (bf16 compute on a GPU); the masters keep f32. Only with the device
    /// optimizer, which writes the updated weights back in the model's dtype.
    pub fn cast_model(&mut self, dtype: DType) -> Result<()> {
        if self.device.is_none() && dtype != DType::F32 {
            return Err(TrainError::Invalid {
                key: "torch_dtype",
                reason: format!(
                    "{dtype:?} weights need the optimizer on the model's device (a GPU run without LoRA)"
                ),
            });
        }
        crate::zero::ParamSet::cast_params(&mut self.model.params, dtype)
            .map_err(ModelError::from)?;
        Ok(())
    }

    /// True when the device optimizer runs the update ([`Trainer::with_device_optimizer`]).
    pub fn optimizer_on_device(&self) -> bool {
        self.device.is_some()
    }

    /// Whether [`Trainer::master`] and [`Trainer::optimizer`] hold the current state (always, with the host
    /// optimizer; after [`Trainer::sync_host_state`] with the device one).
    pub fn host_state_current(&self) -> bool {
        self.device.as_ref().is_none_or(|d| d.host_current)
    }

    /// Copies the device optimizer's masters and moments to the host copies (no-op with the host optimizer).
    pub fn sync_host_state(&mut self) -> Result<()> {
        let Some(d) = &mut self.device else {
            return Ok(());
        };
        if d.host_current {
            return Ok(());
        }
        let (masters, states) = d.opt.to_host()?;
        let mut optimizer = AdamW::new(self.opts.adam)?;
        for (name, st) in states {
            optimizer.set_state(&name, st)?;
        }
        self.master = masters;
        self.optimizer = optimizer;
        d.host_current = true;
        Ok(())
    }

    /// Drops the host copies of the device optimizer's state (after a checkpoint: they would hold 12 bytes per
    /// parameter of host memory for nothing). No-op with the host optimizer.
    pub fn release_host_state(&mut self) -> Result<()> {
        if let Some(d) = &mut self.device {
            self.master = TensorMap::new();
            self.optimizer = AdamW::new(self.opts.adam)?;
            d.host_current = false;
        }
        Ok(())
    }

    /// Number of trainable values (the masters' elements).
    pub fn trainable_params(&self) -> u64 {
        if self.device.is_some() {
            let mut n = 0;
            self.model.params.visit(&mut |_, t| n += t.elem_count() as u64);
            return n;
        }
        self.master.values().map(|t| t.data.len() as u64).sum()
    }

    /// The LoRA settings in LoRA mode, `None` for full training.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref().map(|l| &l.config)
    }

    /// The current adapters in LoRA mode (a copy of the masters, keyed by base weight name).
    pub fn adapters(&self) -> Option<LoraAdapters> {
        let l = self.lora.as_ref()?;
        let pairs = l
            .targets
            .iter()
            .map(|t| {
                let pair = lora::LoraPair {
                    a: self.master[&t.a_key].clone(),
                    b: self.master[&t.b_key].clone(),
                };
                (t.weight.clone(), pair)
            })
            .collect();
        Some(LoraAdapters {
            rank: l.config.rank,
            scaling: l.scaling,
            pairs,
        })
    }

    pub fn model(&self) -> &Qwen3Model {
        &self.model
    }

    /// The fp32 master weights by HF name (what a checkpoint saves); in LoRA mode the adapter factors by PEFT key.
    /// With the device optimizer: the copy of the last [`Trainer::sync_host_state`] (empty before the first, and
    /// after [`Trainer::release_host_state`]; see [`Trainer::host_state_current`]).
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
            if let Some(d) = &mut self.device {
                // Checked against the device masters there. Every parameter has stepped as often as the run
                // (skipped steps step none).
                d.opt.restore(&name, &state)?;
                d.opt.set_steps(state.step);
                d.host_current = false;
                continue;
            }
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

    /// Runs forward and backward over `micro_batches` and hands each micro-batch's gradients (by master name) to
    /// `sink` with their weight `W_m / W`; returns the token-weighted losses (see the module docs of
    /// [`crate::train`]).
    fn run_micro_batches(
        &self,
        micro_batches: &[Batch],
        sink: &mut dyn FnMut(NamedTensors, f32) -> Result<()>,
    ) -> Result<BatchSums> {
        let step = self.iteration + 1;
        let weights: Vec<f64> = micro_batches
            .iter()
            .map(|b| b.loss_weights.iter().map(|&w| w as f64).sum())
            .collect();
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            return Err(TrainError::EmptyBatch { step });
        }
        let mut sums = BatchSums {
            loss: 0.0,
            ce_loss: 0.0,
            aux_loss: None,
            tokens: 0,
            loss_weight: total,
        };
        for (batch, &w) in micro_batches.iter().zip(&weights) {
            sums.tokens += batch.tokens();
            if w == 0.0 {
                continue; // contributes nothing to a token-weighted loss
            }
            let out = self.model.forward_backward(batch)?;
            let frac = w / total;
            sums.loss += frac * out.loss;
            sums.ce_loss += frac * out.ce_loss;
            if let Some(a) = out.aux_loss {
                *sums.aux_loss.get_or_insert(0.0) += frac * a;
            }
            let grads = match &self.lora {
                None => out.grads,
                Some(l) => {
                    // dL/dA = s·Bᵀ·G, dL/dB = s·G·Aᵀ with G = dL/dW' (see crate::lora).
                    let mut ab = NamedTensors::new();
                    for t in &l.targets {
                        let gw = &out.grads[&t.weight];
                        let (da, db) = lora::adapter_grads(gw, &t.a, &t.b, l.scaling)
                            .map_err(ModelError::from)?;
                        ab.insert(t.a_key.clone(), da);
                        ab.insert(t.b_key.clone(), db);
                    }
                    ab
                }
            };
            sink(grads, frac as f32)?;
        }
        Ok(sums)
    }

    /// The token-weighted gradient and loss of one global batch made of `micro_batches`, without touching the
    /// weights: `Σ_m (W_m / W) · ∇ loss(b_m)` (see the module docs of [`crate::train`]), on the host.
    pub fn gradients(&self, micro_batches: &[Batch]) -> Result<Gradients> {
        let mut acc = TensorMap::new();
        let sums = self.run_micro_batches(micro_batches, &mut |grads, factor| {
            for (name, t) in grads {
                let mut data = t.to_vec_f32().map_err(ModelError::from)?;
                if factor != 1.0 {
                    data.iter_mut().for_each(|x| *x *= factor);
                }
                match acc.get_mut(&name) {
                    Some(a) => optim::accumulate(&mut a.data, &data)?,
                    None => {
                        let shape = t.shape().to_vec();
                        acc.insert(name, HostTensor { shape, data });
                    }
                }
            }
            Ok(())
        })?;
        let names_match = match &self.device {
            Some(_) => {
                let mut names = Vec::new();
                self.model.params.visit(&mut |n, _| names.push(n));
                names.sort();
                acc.keys().eq(names.iter())
            }
            None => acc.keys().eq(self.master.keys()),
        };
        if !names_match {
            return Err(TrainError::Invalid {
                key: "gradients",
                reason: "the model's gradient names differ from its parameter names".into(),
            });
        }
        Ok(Gradients {
            grads: acc,
            loss: sums.loss,
            ce_loss: sums.ce_loss,
            aux_loss: sums.aux_loss,
            tokens: sums.tokens,
            loss_weight: sums.loss_weight,
        })
    }

    /// The same gradient summed in f32 on the model's device (the device optimizer's input).
    fn device_gradients(&self, micro_batches: &[Batch]) -> Result<(NamedTensors, BatchSums)> {
        let mut acc = NamedTensors::new();
        let sums = self.run_micro_batches(micro_batches, &mut |grads, factor| {
            optim::accumulate_scaled(&mut acc, grads, factor).map_err(|e| ModelError::from(e).into())
        })?;
        Ok((acc, sums))
    }

    /// One optimizer step over `micro_batches` (one global batch). See the module docs for the maths.
    pub fn step(&mut self, micro_batches: &[Batch]) -> Result<StepStats> {
        if self.device.is_some() {
            return self.device_step(micro_batches);
        }
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

    /// [`Trainer::step`] with the device optimizer: gradients summed on the device, norm, clip and AdamW there.
    fn device_step(&mut self, micro_batches: &[Batch]) -> Result<StepStats> {
        let step = self.iteration + 1;
        let (grads, sums) = self.device_gradients(micro_batches)?;
        let lr = self.opts.schedule.lr(self.iteration);
        let d = self.device.as_mut().expect("device_step runs with the device optimizer");
        let report = d
            .opt
            .step(&mut self.model, &grads, lr, self.opts.clip_grad)?;
        d.host_current = false;
        if report.skipped {
            self.skipped += 1;
            tracing::warn!(step, grad_norm = report.grad_norm, "non-finite gradient norm: update skipped");
        }
        self.iteration += 1;
        Ok(StepStats {
            step,
            loss: sums.loss,
            ce_loss: sums.ce_loss,
            aux_loss: sums.aux_loss,
            lr,
            grad_norm: report.grad_norm,
            tokens: sums.tokens,
            loss_weight: sums.loss_weight,
            skipped: report.skipped,
        })
    }

    /// Copies the master weights into the model's tensors (LoRA: recomputes the effective weights).
    fn upload(&mut self) -> Result<()> {
        let device = self.model.device();
        if let Some(l) = &mut self.lora {
            let mut effective = NamedTensors::new();
            for t in &mut l.targets {
                let (a, b) = (&self.master[&t.a_key], &self.master[&t.b_key]);
                t.a = Tensor::from_f32(a.data.clone(), &a.shape, &device)
                    .map_err(ModelError::from)?;
                t.b = Tensor::from_f32(b.data.clone(), &b.shape, &device)
                    .map_err(ModelError::from)?;
                let w = lora::effective_weight(&t.base, &t.a, &t.b, l.scaling)
                    .map_err(ModelError::from)?;
                effective.insert(t.weight.clone(), w);
            }
            self.model.params.visit_mut(&mut |name, t| {
                if let Some(w) = effective.remove(&name) {
                    *t = w;
                }
            });
            return Ok(());
        }
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
