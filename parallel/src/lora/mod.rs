//! LoRA: low-rank adapters on the linear layers of a frozen Qwen3 model, in PEFT's on-disk format.
//!
//! # The maths
//!
//! For a target weight `W [out, in]` (HF layout, `y = x·Wᵀ`) an adapter is `A [r, in]` and `B [out, r]` with
//! `scaling s = alpha / r`, and the adapted layer computes
//!
//! ```text
//! y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ  =  x·(W + s·B·A)ᵀ  =  x·W'ᵀ          (no dropout on the adapter input)
//! ```
//!
//! Training uses the right-hand side: the unchanged model runs on the *effective weights* `W' = W + s·B·A`
//! ([`effective_weight`]), its full backward gives `G = dL/dW'` for every target, and the chain rule through
//! `W'_{oi} = W_{oi} + s·Σ_k B_{ok}·A_{ki}` gives the adapter gradients ([`adapter_grads`])
//!
//! ```text
//! dL/dA = s·Bᵀ·G   [r, in]          dL/dB = s·G·Aᵀ   [out, r]
//! ```
//!
//! This is exact (the same function, not an approximation); it costs one extra `[out, in]` weight per target and a
//! full weight-gradient GEMM per target, which the frozen base would not need. The base weights `W` stay untouched:
//! the trainer keeps them aside and recomputes `W'` from them after every optimizer step.
//!
//! Initialisation ([`LoraAdapters::init`]) is PEFT's default: `A ~ kaiming_uniform(a = √5)`, i.e. uniform in
//! `[-1/√in, 1/√in)`, drawn from one `StdRng` seeded with the run's seed, targets in sorted HF-name order; `B = 0`,
//! so an untrained adapter leaves the model unchanged.
//!
//! # Dropout
//!
//! PEFT's `lora_dropout` drops elements of the adapter *input* `x` (not of `W`'s input), which the effective-weight
//! form cannot express. Training with `dropout > 0` is therefore refused ([`LoraConfig::validate_for_training`])
//! instead of being silently approximated. Adapters with `lora_dropout > 0` in their `adapter_config.json` are read
//! and merged normally: dropout does nothing at inference.
//!
//! # Targets
//!
//! Module names are HF weight names without `.weight` (`model.layers.3.self_attn.q_proj`). A target name matches a
//! module as in PEFT: equal to it, or a suffix after a dot (`q_proj`, `self_attn.q_proj`, or the full name).
//! [`TargetModules::AllLinear`] (`"all-linear"`) is what PEFT's `all-linear` resolves to on a Qwen3 model: every
//! `nn.Linear` except the output head, i.e. `q_proj, k_proj, v_proj, o_proj` and `gate_proj, up_proj, down_proj` of
//! every layer (never `lm_head`, nor the embeddings, which are not linear layers; with tied embeddings `lm_head` is
//! the embedding and is excluded too).
//!
//! MoE models: experts are supported. Our model keeps experts as separate weights
//! (`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, …), so they are ordinary targets: `all-linear` adapts every
//! expert's `gate_proj/up_proj/down_proj` (and the attention), but not the router `mlp.gate` (name it explicitly,
//! `"gate"`, to adapt it). The adapter keys are then `…mlp.experts.{e}.gate_proj.lora_A.weight`, the layout PEFT
//! writes on transformers 4, where experts are `nn.Linear` modules. transformers ≥ 5 fuses experts into one
//! parameter, so PEFT's `all-linear` there covers only the attention projections and cannot load per-expert
//! adapters: to train adapters for that stack, target `q_proj, k_proj, v_proj, o_proj` by name.
//! Embeddings and `lm_head` cannot be targets (an error names them).
//!
//! # Files (PEFT format)
//!
//! ```text
//! <dir>/adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout", "target_modules",
//!                                   "base_model_name_or_path", "bias": "none", "task_type": "CAUSAL_LM",
//!                                   "fan_in_fan_out": false, "inference_mode": true, …}
//! <dir>/adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, in]
//!                                  base_model.model.<module>.lora_B.weight [out, r]
//! ```
//!
//! [`read_adapters`] accepts what PEFT writes for plain LoRA and refuses, naming the key, what would change the maths:
//! `use_rslora`, `use_dora`, `bias != "none"`, `fan_in_fan_out`, `rank_pattern`/`alpha_pattern`, `modules_to_save`,
//! `target_parameters`, `trainable_token_indices`, regular-expression `target_modules`. The tensors in the file are
//! authoritative for which weights are adapted. [`merged_weights`] / [`merge_to_dir`] apply `W + s·B·A` to a base
//! model; [`base_model_dir`] finds the base an adapter directory names.
//!
//! # Invariants
//!
//! - `A` is `[r, in]`, `B` is `[out, r]` for a base weight `[out, in]`, one `r` for all targets.
//! - Adapters are keyed by the HF name of the base weight they adapt; PEFT keys are derived from it and back
//!   ([`peft_key`], [`parse_peft_key`]).
//! - The merged weight is computed by [`effective_weight`] both in training and in merging, so a merged model and the
//!   training model hold bit-identical weights on the same device.

mod adapters;
mod config;
mod peft;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use adapters::{
    LoraAdapters, LoraPair, adapter_grads, effective_weight, parse_peft_key, peft_key,
    target_weights,
};
pub use config::{ALL_LINEAR, ALL_LINEAR_MODULES, LoraConfig, TargetModules};
pub use peft::{
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterConfig, base_model_dir, is_adapter_dir,
    merge_to_dir, merge_to_dir_as, merged_weights, read_adapter_config, read_adapters,
    save_adapters, write_adapter_files,
};

use crate::hf::HfError;
use crate::model::ModelError;

/// Everything that can go wrong with LoRA settings, adapter files and merging; each variant names the key, file
/// or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A LoRA setting that cannot work.
    #[error("invalid LoRA setting `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    /// `adapter_config.json` is missing, malformed, or asks for something we do not support.
    #[error("{}: `{key}`: {reason}", path.display())]
    AdapterConfig {
        path: PathBuf,
        key: String,
        reason: String,
    },
    /// A tensor of `adapter_model.safetensors` is unexpected, missing or misshapen.
    #[error("{}: tensor `{tensor}`: {reason}", path.display())]
    AdapterTensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    /// The adapters do not fit the base model.
    #[error("adapter for `{weight}`: {reason}")]
    Mismatch { weight: String, reason: String },
    /// The base model directory cannot be found or used.
    #[error("base model: {reason}")]
    BaseModel { reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Hf(#[from] HfError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl From<qkernels::KernelError> for LoraError {
    fn from(e: qkernels::KernelError) -> Self {
        LoraError::Model(ModelError::Kernel(e))
    }
}

/// Result alias of the LoRA code.
pub type Result<T> = std::result::Result<T, LoraError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LoraError {
    let path = path.into();
    move |source| LoraError::Io { path, source }
}
