//! The fine-tuning keys of a training job: supervised fine-tuning data (`loss_scale`, `packing`,
//! `truncation_strategy`, `strict`, `dataset_shuffle`, `model_name`, `model_author`) and the adapter choice
//! (`train_type`, `lora_rank`, `lora_alpha`, `lora_dropout`, `target_modules`). Names and meanings follow
//! ms-swift's command-line arguments.
//!
//! The SFT data keys are read by `kind: sft` only (a pretraining job concatenates plain text and has no
//! turns to weigh); the LoRA keys by every training kind. [`resolve`] checks them and fills in defaults;
//! the values are checked here so a bad job fails at submit, naming the key, not later in its ranks.

use serde::{Deserialize, Serialize};

use crate::{JobKind, JobSpec};

/// `train_type:` — which weights a training job updates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainType {
    /// Every weight (the default).
    #[default]
    Full,
    /// Low-rank adapters on the target linears; the base model stays frozen.
    Lora,
}

/// `truncation_strategy:` — what happens to an SFT sample longer than `max_length` tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Drop the sample (counted and reported) — ms-swift's default.
    #[default]
    Delete,
    /// Keep the last `max_length` tokens.
    Left,
    /// Keep the first `max_length` tokens.
    Right,
}

/// The parts a `loss_scale` value may combine with `+`.
pub const LOSS_SCALE_PARTS: [&str; 4] = ["default", "last_round", "all", "ignore_empty_think"];

/// Defaults of the fine-tuning keys (ms-swift's where it has one).
pub mod defaults {
    pub const LORA_RANK: u32 = 8;
    pub const LORA_ALPHA: f64 = 32.0;
    pub const LORA_DROPOUT: f64 = 0.0;
    pub const TARGET_MODULES: &str = "all-linear";
    pub const LOSS_SCALE: &str = "default";
}

/// A name in its Chinese and English forms (`model_name: [小黄, Xiao Huang]`; one value serves both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bilingual {
    pub zh: String,
    pub en: String,
}

/// Resolved LoRA settings (`train_type: lora`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub rank: u32,
    pub alpha: f64,
    pub dropout: f64,
    /// `["all-linear"]` or module names such as `q_proj`.
    pub target_modules: Vec<String>,
}

/// Resolved SFT data settings (`kind: sft`).
#[derive(Debug, Clone, PartialEq)]
pub struct SftSettings {
    /// A validated `loss_scale` value, e.g. `default` or `last_round+ignore_empty_think`.
    pub loss_scale: String,
    pub packing: bool,
    pub strict: bool,
    pub truncation: Truncation,
    pub shuffle: bool,
    pub model_name: Option<Bilingual>,
    pub model_author: Option<Bilingual>,
}

/// Checks `loss_scale` (parts from [`LOSS_SCALE_PARTS`] joined by `+`, at most one of `default`,
/// `last_round`, `all`).
pub fn check_loss_scale(value: &str) -> Result<(), String> {
    let parts: Vec<&str> = value.split('+').map(str::trim).collect();
    if let Some(bad) = parts.iter().find(|p| !LOSS_SCALE_PARTS.contains(p)) {
        return Err(format!(
            "unknown part {bad:?} in {value:?}; use {} joined by '+', e.g. last_round+ignore_empty_think",
            LOSS_SCALE_PARTS.join(", ")
        ));
    }
    let bases = parts.iter().filter(|p| **p != "ignore_empty_think").count();
    if bases > 1 {
        return Err(format!("{value:?} names more than one of default, last_round, all"));
    }
    Ok(())
}

fn bilingual(key: &str, values: &[String]) -> Result<Option<Bilingual>, (String, String)> {
    match values {
        [] => Ok(None),
        [one] if !one.trim().is_empty() => Ok(Some(Bilingual { zh: one.clone(), en: one.clone() })),
        [zh, en] if !zh.trim().is_empty() && !en.trim().is_empty() => {
            Ok(Some(Bilingual { zh: zh.clone(), en: en.clone() }))
        }
        _ => Err((
            key.to_string(),
            "give one name, or two: the Chinese form then the English form (none empty)".into(),
        )),
    }
}

/// Checks the fine-tuning keys of `spec` and fills in defaults. Errors are `(key, message)`.
pub(crate) fn resolve(spec: &JobSpec) -> Result<(Option<SftSettings>, Option<LoraSettings>), (String, String)> {
    let err = |key: &str, message: String| (key.to_string(), message);
    let sft_keys = [
        ("loss_scale", spec.loss_scale.is_some()),
        ("packing", spec.packing.is_some()),
        ("strict", spec.strict.is_some()),
        ("truncation_strategy", spec.truncation_strategy.is_some()),
        ("dataset_shuffle", spec.dataset_shuffle.is_some()),
        ("model_name", !spec.model_name.is_empty()),
        ("model_author", !spec.model_author.is_empty()),
    ];
    let sft = if spec.kind == JobKind::Sft {
        let loss_scale = spec.loss_scale.clone().unwrap_or_else(|| defaults::LOSS_SCALE.to_string());
        check_loss_scale(&loss_scale).map_err(|m| err("loss_scale", m))?;
        Some(SftSettings {
            loss_scale,
            packing: spec.packing.unwrap_or(false),
            strict: spec.strict.unwrap_or(false),
            truncation: spec.truncation_strategy.unwrap_or_default(),
            shuffle: spec.dataset_shuffle.unwrap_or(true),
            model_name: bilingual("model_name", &spec.model_name)?,
            model_author: bilingual("model_author", &spec.model_author)?,
        })
    } else {
        if let Some((key, _)) = sft_keys.iter().find(|(_, set)| *set) {
            return Err(err(key, format!("is an SFT data key; kind `{}` does not read it (use kind: sft)", spec.kind)));
        }
        None
    };

    let lora_keys = [
        ("lora_rank", spec.lora_rank.is_some()),
        ("lora_alpha", spec.lora_alpha.is_some()),
        ("lora_dropout", spec.lora_dropout.is_some()),
        ("target_modules", !spec.target_modules.is_empty()),
    ];
    let lora = match spec.train_type.unwrap_or_default() {
        TrainType::Full => {
            if let Some((key, _)) = lora_keys.iter().find(|(_, set)| *set) {
                return Err(err(key, "is a LoRA key; set `train_type: lora` to train adapters".into()));
            }
            None
        }
        TrainType::Lora => {
            let rank = spec.lora_rank.unwrap_or(defaults::LORA_RANK);
            if rank == 0 {
                return Err(err("lora_rank", "must be at least 1".into()));
            }
            let alpha = spec.lora_alpha.unwrap_or(defaults::LORA_ALPHA);
            if !(alpha.is_finite() && alpha > 0.0) {
                return Err(err("lora_alpha", format!("must be a finite number > 0, got {alpha}")));
            }
            let dropout = spec.lora_dropout.unwrap_or(defaults::LORA_DROPOUT);
            if !(0.0..1.0).contains(&dropout) {
                return Err(err("lora_dropout", format!("must be in [0, 1), got {dropout}")));
            }
            if dropout > 0.0 {
                // The engine trains adapters exactly through the merged weight W + s·B·A, which has no place for
                // dropout on the adapter input; refuse here rather than fail in the ranks.
                return Err(err(
                    "lora_dropout",
                    format!("{dropout}: adapter dropout is not supported by this build; set lora_dropout: 0"),
                ));
            }
            let target_modules = if spec.target_modules.is_empty() {
                vec![defaults::TARGET_MODULES.to_string()]
            } else {
                spec.target_modules.clone()
            };
            if let Some(bad) = target_modules.iter().find(|m| m.trim().is_empty()) {
                return Err(err("target_modules", format!("{bad:?} is not a module name")));
            }
            if target_modules.len() > 1 && target_modules.iter().any(|m| m == "all-linear") {
                return Err(err("target_modules", "`all-linear` already names every linear; give it alone".into()));
            }
            Some(LoraSettings { rank, alpha, dropout, target_modules })
        }
    };
    Ok((sft, lora))
}

/// Built-in dataset names (no file behind them); `resolve_relative_paths` leaves them alone.
pub const BUILTIN_DATASETS: [&str; 2] = ["self-cognition", "swift/self-cognition"];

/// True when `entry` (`name` or `name#N`) names a built-in dataset.
pub fn is_builtin_dataset(entry: &str) -> bool {
    let name = entry.rsplit_once('#').map_or(entry, |(n, _)| n);
    BUILTIN_DATASETS.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_scale_values() {
        for ok in ["default", "last_round", "all", "ignore_empty_think", "last_round+ignore_empty_think", "default+ignore_empty_think"] {
            check_loss_scale(ok).unwrap();
        }
        assert!(check_loss_scale("last").unwrap_err().contains("\"last\""));
        assert!(check_loss_scale("all+last_round").unwrap_err().contains("more than one"));
    }

    #[test]
    fn builtin_names() {
        assert!(is_builtin_dataset("self-cognition"));
        assert!(is_builtin_dataset("swift/self-cognition#500"));
        assert!(!is_builtin_dataset("data/self-cognition.jsonl"));
    }
}
