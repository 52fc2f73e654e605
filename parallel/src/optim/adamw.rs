//! AdamW with decoupled weight decay, exactly as `torch.optim.AdamW(foreach=False)` (no amsgrad, no maximize).
//!
//! For each parameter `p` with gradient `g`, at its step `t = 1, 2, …` with learning rate `lr`:
//!
//! ```text
//! p  ← p · (1 − lr·wd)                     // decoupled weight decay, before the moment updates
//! m  ← m + (1−β1)·(g − m)                  // torch's lerp(m, g, 1−β1) (weight < 0.5 branch)
//! v  ← v·β2 + ((1−β2)·g)·g
//! p  ← p + (−lr/(1−β1^t)) · m / (√v / √(1−β2^t) + ε)      // ε outside the square root
//! ```
//!
//! Scalars (`1−lr·wd`, bias corrections, step size) are computed in f64 and rounded to f32 once, as torch does
//! with Python floats; the elementwise maths is f32 in the order above.

use std::collections::{BTreeMap, BTreeSet};

use super::OptimError;

/// AdamW hyperparameters shared by all parameters (the learning rate comes per step, weight decay per slot).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamWConfig {
    /// Megatron / ms-swift defaults for LLM training: β = (0.9, 0.95), ε = 1e-8.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
        }
    }
}

impl AdamWConfig {
    /// Checks `0 ≤ β1, β2 < 1` and `ε ≥ 0` (all finite).
    pub fn validate(&self) -> Result<(), OptimError> {
        for (key, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(OptimError::Invalid {
                    key,
                    reason: format!("must be in [0, 1), got {b}"),
                });
            }
        }
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            return Err(OptimError::Invalid {
                key: "eps",
                reason: format!("must be a finite number >= 0, got {}", self.eps),
            });
        }
        Ok(())
    }
}

/// Per-parameter optimizer state. `exp_avg.len() == exp_avg_sq.len() ==` the parameter's length.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWState {
    /// Number of steps taken on this parameter.
    pub step: u64,
    /// First moment `m`.
    pub exp_avg: Vec<f32>,
    /// Second moment `v`.
    pub exp_avg_sq: Vec<f32>,
}

/// One parameter for one step: its name, values, gradient and weight decay.
pub struct ParamSlot<'a> {
    pub name: &'a str,
    pub param: &'a mut [f32],
    pub grad: &'a [f32],
    /// Decoupled weight decay coefficient for this parameter (0 for norms; see [`decays`]).
    pub weight_decay: f64,
}

/// Megatron's and HF Trainer's rule for which parameters get weight decay: matrices and embeddings
/// (`shape.len() >= 2`) do; 1-D tensors (RMSNorm weights, biases) do not.
pub fn decays(shape: &[usize]) -> bool {
    shape.len() >= 2
}

/// AdamW over named flat f32 buffers. State is created (zeros, step 0) the first time a name is stepped.
#[derive(Debug, Clone)]
pub struct AdamW {
    config: AdamWConfig,
    state: BTreeMap<String, AdamWState>,
}

impl AdamW {
    /// A fresh optimizer; fails on invalid hyperparameters.
    pub fn new(config: AdamWConfig) -> Result<Self, OptimError> {
        config.validate()?;
        Ok(AdamW {
            config,
            state: BTreeMap::new(),
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The state of parameter `name`, once it has been stepped or loaded.
    pub fn state(&self, name: &str) -> Option<&AdamWState> {
        self.state.get(name)
    }

    /// All states, by name (for checkpoints).
    pub fn states(&self) -> &BTreeMap<String, AdamWState> {
        &self.state
    }

    /// Restores the state of `name` (from a checkpoint); `exp_avg` and `exp_avg_sq` must have equal lengths.
    pub fn set_state(&mut self, name: &str, state: AdamWState) -> Result<(), OptimError> {
        if state.exp_avg.len() != state.exp_avg_sq.len() {
            return Err(OptimError::StateLength {
                name: name.to_string(),
                param_len: state.exp_avg.len(),
                state_len: state.exp_avg_sq.len(),
            });
        }
        self.state.insert(name.to_string(), state);
        Ok(())
    }

    /// One AdamW step with learning rate `lr` on every slot. All lengths are checked before anything is modified,
    /// so on error no parameter or state has changed.
    pub fn step(&mut self, lr: f64, slots: &mut [ParamSlot<'_>]) -> Result<(), OptimError> {
        if !(lr >= 0.0 && lr.is_finite()) {
            return Err(OptimError::Invalid {
                key: "lr",
                reason: format!("must be a finite number >= 0, got {lr}"),
            });
        }
        let mut seen = BTreeSet::new();
        for s in slots.iter() {
            if !seen.insert(s.name) {
                return Err(OptimError::DuplicateParam {
                    name: s.name.to_string(),
                });
            }
            if s.param.len() != s.grad.len() {
                return Err(OptimError::GradLength {
                    name: s.name.to_string(),
                    param_len: s.param.len(),
                    grad_len: s.grad.len(),
                });
            }
            if let Some(st) = self.state.get(s.name)
                && st.exp_avg.len() != s.param.len()
            {
                return Err(OptimError::StateLength {
                    name: s.name.to_string(),
                    param_len: s.param.len(),
                    state_len: st.exp_avg.len(),
                });
            }
            if !(s.weight_decay >= 0.0 && s.weight_decay.is_finite()) {
                return Err(OptimError::Invalid {
                    key: "weight_decay",
                    reason: format!(
                        "parameter `{}`: must be a finite number >= 0, got {}",
                        s.name, s.weight_decay
                    ),
                });
            }
        }
        let cfg = self.config;
        for s in slots.iter_mut() {
            let st = self
                .state
                .entry(s.name.to_string())
                .or_insert_with(|| AdamWState {
                    step: 0,
                    exp_avg: vec![0.0; s.param.len()],
                    exp_avg_sq: vec![0.0; s.param.len()],
                });
            st.step += 1;
            adamw_kernel(
                &cfg,
                lr,
                s.weight_decay,
                st.step,
                s.param,
                s.grad,
                &mut st.exp_avg,
                &mut st.exp_avg_sq,
            );
        }
        Ok(())
    }
}

/// The elementwise update for one parameter at step `step` (≥ 1): the device layer's host loop
/// ([`qkernels::ops::adamw_update_host`], the same maths the CUDA kernel runs). All slices have equal length.
#[allow(clippy::too_many_arguments)]
fn adamw_kernel(
    cfg: &AdamWConfig,
    lr: f64,
    weight_decay: f64,
    step: u64,
    param: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
) {
    let scalars =
        qkernels::ops::AdamWScalars::new(cfg.beta1, cfg.beta2, cfg.eps, lr, weight_decay, step);
    qkernels::ops::adamw_update_host(&scalars, 1.0, param, grad, exp_avg, exp_avg_sq);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_by_about_lr() {
        // At t = 1, m̂ = g and v̂ = g², so the update is lr·g/(|g| + ε) ≈ lr·sign(g).
        let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
        let mut p = vec![1.0f32, -2.0, 0.5];
        let g = vec![0.3f32, -4.0, 1e-3];
        opt.step(
            0.01,
            &mut [ParamSlot {
                name: "w",
                param: &mut p,
                grad: &g,
                weight_decay: 0.0,
            }],
        )
        .unwrap();
        assert!((p[0] - 0.99).abs() < 1e-6, "{p:?}");
        assert!((p[1] + 1.99).abs() < 1e-6, "{p:?}");
        assert!((p[2] - 0.49).abs() < 1e-5, "{p:?}");
        assert_eq!(opt.state("w").unwrap().step, 1);
    }

    #[test]
    fn weight_decay_is_decoupled() {
        // Zero gradient: only p·(1 − lr·wd) remains (m = v = 0 → update 0/ε = 0).
        let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
        let mut p = vec![2.0f32];
        opt.step(
            0.1,
            &mut [ParamSlot {
                name: "w",
                param: &mut p,
                grad: &[0.0],
                weight_decay: 0.5,
            }],
        )
        .unwrap();
        assert_eq!(p[0], 2.0 * (1.0 - 0.05) as f32);
    }

    #[test]
    fn errors_leave_everything_untouched() {
        let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
        let mut a = vec![1.0f32; 3];
        let mut b = vec![1.0f32; 2];
        let err = opt
            .step(
                0.1,
                &mut [
                    ParamSlot {
                        name: "a",
                        param: &mut a,
                        grad: &[1.0; 3],
                        weight_decay: 0.0,
                    },
                    ParamSlot {
                        name: "b",
                        param: &mut b,
                        grad: &[1.0; 3],
                        weight_decay: 0.0,
                    },
                ],
            )
            .unwrap_err();
        assert_eq!(
            err,
            OptimError::GradLength {
                name: "b".into(),
                param_len: 2,
                grad_len: 3
            }
        );
        assert_eq!(a, vec![1.0; 3]);
        assert!(opt.states().is_empty());
        assert!(
            AdamW::new(AdamWConfig {
                beta2: 1.0,
                ..Default::default()
            })
            .is_err()
        );
    }
}
