//! [`LoraConfig`]: rank, alpha, dropout and target modules, with validation.

use std::fmt;
use std::str::FromStr;

use super::{LoraError, Result};

/// The `target_modules` shorthand for every linear layer of the decoder (see [`TargetModules::AllLinear`]).
pub const ALL_LINEAR: &str = "all-linear";

/// The module names `all-linear` covers in a Qwen3 decoder layer (dense MLP or each MoE expert).
pub const ALL_LINEAR_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Which linear layers get adapters (see the module docs of [`crate::lora`] for the matching rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// `q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj` of every layer (every expert of MoE layers),
    /// not the router, embeddings or `lm_head` — what PEFT's `"all-linear"` resolves to on Qwen3.
    AllLinear,
    /// Module names, matched as PEFT does: equal to the module name or a dot-separated suffix of it.
    Names(Vec<String>),
}

impl FromStr for TargetModules {
    type Err = LoraError;

    /// `all-linear` (any case), or a comma-separated list of module names.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.eq_ignore_ascii_case(ALL_LINEAR) {
            return Ok(TargetModules::AllLinear);
        }
        let names: Vec<String> = s
            .split(',')
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        let t = TargetModules::Names(names);
        t.validate()?;
        Ok(t)
    }
}

impl fmt::Display for TargetModules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetModules::AllLinear => f.write_str(ALL_LINEAR),
            TargetModules::Names(n) => f.write_str(&n.join(",")),
        }
    }
}

impl TargetModules {
    fn validate(&self) -> Result<()> {
        let TargetModules::Names(names) = self else {
            return Ok(());
        };
        if names.is_empty() {
            return Err(LoraError::Invalid {
                key: "lora.target_modules",
                reason: format!("no module names given (use `{ALL_LINEAR}` or names like q_proj)"),
            });
        }
        for n in names {
            if n.trim().is_empty() || n.starts_with('.') || n.ends_with('.') || n.contains("..") {
                return Err(LoraError::Invalid {
                    key: "lora.target_modules",
                    reason: format!("`{n}` is not a module name"),
                });
            }
            if n.eq_ignore_ascii_case(ALL_LINEAR) {
                return Err(LoraError::Invalid {
                    key: "lora.target_modules",
                    reason: format!("`{ALL_LINEAR}` must stand alone, not inside a list"),
                });
            }
        }
        Ok(())
    }

    /// Whether the module `module` (an HF weight name without `.weight`) is a target. `AllLinear` matches on the
    /// last name component only; the caller restricts it to decoder-layer weights.
    pub fn matches(&self, module: &str) -> bool {
        match self {
            TargetModules::AllLinear => {
                let last = module.rsplit('.').next().unwrap_or(module);
                ALL_LINEAR_MODULES.contains(&last)
            }
            TargetModules::Names(names) => names.iter().any(|n| name_matches(n, module)),
        }
    }
}

/// PEFT's rule for a string in a target list: the module name equals it or ends with `.` + it.
pub(crate) fn name_matches(target: &str, module: &str) -> bool {
    module == target
        || (module.len() > target.len()
            && module.ends_with(target)
            && module.as_bytes()[module.len() - target.len() - 1] == b'.')
}

/// LoRA hyperparameters (PEFT's `r`, `lora_alpha`, `lora_dropout`, `target_modules`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// `r`: rank of every adapter, ≥ 1.
    pub rank: usize,
    /// `lora_alpha`: the adapter output is scaled by `alpha / rank`; finite and > 0.
    pub alpha: f64,
    /// `lora_dropout` on the adapter input, in `[0, 1)`. Training needs 0 (see the module docs).
    pub dropout: f64,
    pub target_modules: TargetModules,
}

impl LoraConfig {
    /// `rank`, `alpha`, no dropout, `all-linear`.
    pub fn new(rank: usize, alpha: f64) -> Self {
        LoraConfig {
            rank,
            alpha,
            dropout: 0.0,
            target_modules: TargetModules::AllLinear,
        }
    }

    /// `scaling = alpha / rank`, the factor of the adapter path.
    pub fn scaling(&self) -> f32 {
        (self.alpha / self.rank as f64) as f32
    }

    /// Checks every setting; errors name the key (`lora.rank`, `lora.alpha`, `lora.dropout`, `lora.target_modules`).
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(LoraError::Invalid {
                key: "lora.rank",
                reason: "must be at least 1".into(),
            });
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(LoraError::Invalid {
                key: "lora.alpha",
                reason: format!("must be a finite number > 0, got {}", self.alpha),
            });
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return Err(LoraError::Invalid {
                key: "lora.dropout",
                reason: format!("must be in [0, 1), got {}", self.dropout),
            });
        }
        self.target_modules.validate()
    }

    /// [`validate`](Self::validate), and `dropout == 0`: training is exact through effective weights, which cannot
    /// express dropout on the adapter input.
    pub fn validate_for_training(&self) -> Result<()> {
        self.validate()?;
        if self.dropout != 0.0 {
            return Err(LoraError::Invalid {
                key: "lora.dropout",
                reason: format!(
                    "{} > 0 is not supported for training: adapters are trained exactly through the effective \
                     weights W + (alpha/r)·B·A, which cannot express dropout on the adapter input; set it to 0 \
                     (an adapter_config.json with dropout is fine for inference and merging)",
                    self.dropout
                ),
            });
        }
        Ok(())
    }
}
