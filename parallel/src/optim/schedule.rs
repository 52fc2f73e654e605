//! Learning-rate schedules with Megatron-LM's semantics (`OptimizerParamScheduler.get_lr`, `lr_warmup_init = 0`),
//! which ms-swift's Megatron path uses.
//!
//! `lr(i)` is the learning rate of the optimizer step taken at 0-based iteration `i` (i = number of steps already
//! taken), with `W = warmup_iters`, `D = decay_iters`:
//!
//! ```text
//! W > 0 and i ≤ W        max_lr · i / W                    (so the very first step has lr 0 when W > 0)
//! constant               max_lr
//! i > D                  min_lr
//! otherwise              r = (i − W) / (D − W)
//!   linear               min_lr + (1 − r) · (max_lr − min_lr)
//!   cosine               min_lr + ½ (1 + cos(π r)) · (max_lr − min_lr)
//! ```
//!
//! Option names map as: `lr` → `max_lr`, `min_lr`, `lr_decay_style` (`constant` | `linear` | `cosine`),
//! `lr_decay_iters` (Megatron's default: `train_iters`) → `decay_iters`, `lr_warmup_iters` →
//! [`Warmup::Iters`], `warmup_ratio` / `lr_warmup_fraction` → [`Warmup::Ratio`] = `ceil(ratio · decay_iters)` iterations
//! (transformers' rounding; Megatron keeps the fraction unrounded — the two differ only when it is not an integer).
//! On `[0, D]` this equals transformers' `get_cosine_with_min_lr_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup` (min_lr 0) and `get_constant_schedule_with_warmup`; past `D` it stays at
//! `min_lr` (transformers' cosine would rise again).

use super::OptimError;

/// Decay after warmup (`lr_decay_style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecayStyle {
    Constant,
    Linear,
    Cosine,
}

impl DecayStyle {
    /// Parses Megatron / ms-swift spellings: `constant`, `linear`, `cosine`.
    pub fn parse(s: &str) -> Result<Self, OptimError> {
        match s {
            "constant" => Ok(DecayStyle::Constant),
            "linear" => Ok(DecayStyle::Linear),
            "cosine" => Ok(DecayStyle::Cosine),
            other => Err(OptimError::Invalid {
                key: "lr_decay_style",
                reason: format!("{other:?} (expected constant, linear or cosine)"),
            }),
        }
    }
}

/// Warmup length: an iteration count or a fraction of the decay iterations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Warmup {
    Iters(u64),
    Ratio(f64),
}

/// A validated schedule: `0 ≤ min_lr ≤ max_lr`, `warmup_iters ≤ decay_iters`, `decay_iters ≥ 1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub max_lr: f64,
    pub min_lr: f64,
    pub warmup_iters: u64,
    pub decay_iters: u64,
    pub style: DecayStyle,
}

impl LrSchedule {
    pub fn new(
        max_lr: f64,
        min_lr: f64,
        warmup: Warmup,
        decay_iters: u64,
        style: DecayStyle,
    ) -> Result<Self, OptimError> {
        let invalid = |key, reason: String| Err(OptimError::Invalid { key, reason });
        if !(max_lr >= 0.0 && max_lr.is_finite()) {
            return invalid("lr", format!("must be a finite number >= 0, got {max_lr}"));
        }
        if !(min_lr >= 0.0 && min_lr <= max_lr) {
            return invalid(
                "min_lr",
                format!("must be in [0, lr = {max_lr}], got {min_lr}"),
            );
        }
        if decay_iters == 0 {
            return invalid("lr_decay_iters", "must be >= 1, got 0".into());
        }
        let warmup_iters = match warmup {
            Warmup::Iters(n) => n,
            Warmup::Ratio(r) => {
                if !(0.0..=1.0).contains(&r) {
                    return invalid("warmup_ratio", format!("must be in [0, 1], got {r}"));
                }
                (r * decay_iters as f64).ceil() as u64
            }
        };
        if warmup_iters > decay_iters {
            return invalid(
                "lr_warmup_iters",
                format!("{warmup_iters} warmup iterations exceed lr_decay_iters {decay_iters}"),
            );
        }
        Ok(LrSchedule {
            max_lr,
            min_lr,
            warmup_iters,
            decay_iters,
            style,
        })
    }

    /// A constant learning rate, no warmup.
    pub fn constant(lr: f64) -> Result<Self, OptimError> {
        Self::new(lr, 0.0, Warmup::Iters(0), 1, DecayStyle::Constant)
    }

    /// The learning rate of the step at 0-based iteration `iter` (see the module docs).
    pub fn lr(&self, iter: u64) -> f64 {
        let (w, d) = (self.warmup_iters, self.decay_iters);
        if w > 0 && iter <= w {
            return self.max_lr * iter as f64 / w as f64;
        }
        if self.style == DecayStyle::Constant {
            return self.max_lr;
        }
        if iter > d {
            return self.min_lr;
        }
        // Here w < iter ≤ d, so d − w ≥ 1.
        let ratio = (iter - w) as f64 / (d - w) as f64;
        let coeff = match self.style {
            DecayStyle::Linear => 1.0 - ratio,
            DecayStyle::Cosine => 0.5 * ((std::f64::consts::PI * ratio).cos() + 1.0),
            DecayStyle::Constant => unreachable!("handled above"),
        };
        self.min_lr + coeff * (self.max_lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_min() {
        let s = LrSchedule::new(1.0, 0.1, Warmup::Iters(4), 12, DecayStyle::Cosine).unwrap();
        assert_eq!(s.lr(0), 0.0);
        assert_eq!(s.lr(2), 0.5);
        assert_eq!(s.lr(4), 1.0);
        assert!((s.lr(8) - 0.55).abs() < 1e-15); // halfway: min + ½(max − min)
        assert!((s.lr(12) - 0.1).abs() < 1e-15);
        assert_eq!(s.lr(100), 0.1);
    }

    #[test]
    fn ratio_rounds_up_and_bad_settings_fail() {
        let s = LrSchedule::new(1.0, 0.0, Warmup::Ratio(0.05), 30, DecayStyle::Linear).unwrap();
        assert_eq!(s.warmup_iters, 2); // ceil(1.5)
        assert_eq!(s.lr(16), 0.5);
        assert!(LrSchedule::new(1.0, 2.0, Warmup::Iters(0), 10, DecayStyle::Linear).is_err());
        assert!(LrSchedule::new(1.0, 0.0, Warmup::Iters(11), 10, DecayStyle::Linear).is_err());
        assert!(DecayStyle::parse("wsd").is_err());
        let c = LrSchedule::constant(3e-4).unwrap();
        assert_eq!((c.lr(0), c.lr(1_000_000)), (3e-4, 3e-4));
    }
}
