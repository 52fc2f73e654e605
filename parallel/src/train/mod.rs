//! Training: on one device, the optimizer step ([`Trainer`]) and the training loop with metrics and checkpoints
//! ([`run_training`]); over several ranks, the same loop on the parallel models ([`distributed`],
//! [`run_distributed_training`]); and the checkpoint format both read and write ([`checkpoint`]).
//!
//! # One optimizer step ([`Trainer::step`])
//!
//! ```text
//! micro-batches b_1 … b_M (M = grad_accum), W_m = Σ loss_weights(b_m), W = Σ_m W_m
//! g      = Σ_m (W_m / W) · ∇ loss(b_m)      // = ∇ of the token-weighted loss of the whole global batch
//! loss   = Σ_m (W_m / W) · loss(b_m)
//! lr     = schedule.lr(iteration)            // iteration = optimizer steps already taken
//! norm   = clip_grad_norm(g, clip_grad)      // pre-clip global L2 norm (clip_grad = 0: measure only)
//! if norm is finite: AdamW(lr) on the fp32 master weights, then copy them into the model
//! iteration += 1                             // also for a skipped (non-finite) step, as Megatron does
//! ```
//!
//! Because each micro-batch loss is already normalised by its own `W_m`, weighting by `W_m / W` gives exactly
//! the gradient of one big batch (up to f32 summation order); with one micro-batch the factor is 1 and the
//! gradient is used as the model returns it. For MoE models the aux loss of each micro-batch is weighted the
//! same way.
//!
//! # Invariants
//!
//! - The master weights ([`Trainer::master`]) are f32 host tensors keyed by HF name, the same names and shapes as
//!   the model's parameters and gradients; after every step the model's tensors equal them bit for bit.
//!   In LoRA mode ([`Trainer::new_lora`], [`TrainConfig::lora`]) the masters are the adapter factors only, keyed by
//!   PEFT name; the base stays frozen and the model's adapted weights equal `W + s·B·A` of the masters bit for bit
//!   (see [`crate::lora`]); checkpoints then hold PEFT adapters ([`checkpoint`]).
//! - Weight decay applies to tensors with `ndim ≥ 2` only ([`crate::optim::decays`]).
//! - Checkpoints do not depend on the parallel layout: both write the full HF weights; the single-rank run the
//!   full-shape moments, a multi-rank run each rank's own optimizer shard addressed by global offsets
//!   ([`optimizer_shards`]). Both formats are read by both loops, under any layout (see [`distributed`]).
//! - A run restarted from `checkpoint-N` produces the same parameters, losses and data order for steps `N+1…`
//!   as the uninterrupted run: weights and optimizer moments are saved in f32, the data cursor and the schedule
//!   position in `trainer_state.json`, and nothing else is random.

pub mod checkpoint;
mod config;
mod device_optimizer;
pub mod distributed;
pub mod optimizer_shards;
mod run;
pub mod tensorboard;
mod trainer;

pub use checkpoint::{
    CHECKPOINT_PREFIX, OPTIMIZER_FILE, SaveRequest, TRAINER_STATE_FILE, TrainerState,
    find_latest_checkpoint, read_optimizer, read_state, save as save_checkpoint,
    write_f32_safetensors,
};
pub use config::{ModelSource, Resume, TrainConfig};
pub use distributed::{EngineKind, run_distributed_training};
pub use run::{
    METRICS_FILE, NoProgress, PEAK_FLOPS, RunInfo, StepMetrics, TrainObserver, TrainSummary,
    run_training,
};
pub use trainer::{Gradients, OptimizerOptions, StepStats, Trainer};

use std::path::PathBuf;

use crate::comm::CommError;
use crate::context_parallel::CpError;
use crate::data::DataError;
use crate::dims::DimsError;
use crate::hf::HfError;
use crate::lora::LoraError;
use crate::model::ModelError;
use crate::optim::OptimError;
use crate::pipeline::PipelineError;
use crate::tensor_parallel::TpError;
use crate::zero::ZeroError;

/// Everything that can stop a training run; each variant names the file, key or step at fault.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Hf(#[from] HfError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    DeviceOptim(#[from] crate::optim::DeviceOptimError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint directory that cannot be resumed from.
    #[error("{}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    /// A training setting that cannot work.
    #[error("invalid training setting `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    /// A step whose micro-batches have no token with a positive loss weight.
    #[error("step {step}: no token of the batch has a positive loss weight")]
    EmptyBatch { step: u64 },
    #[error(transparent)]
    Dims(#[from] DimsError),
    #[error("collective failed: {0}")]
    Comm(#[from] CommError),
    #[error(transparent)]
    Tp(#[from] TpError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Cp(#[from] CpError),
    #[error(transparent)]
    Zero(#[from] ZeroError),
    /// A parallel layout no model of the engine trains with ([`distributed::EngineKind::for_dims`]).
    #[error("unsupported parallel layout for training: {0}")]
    Layout(String),
    /// Another rank of a multi-rank run failed (its own error is in its log); this rank stopped at the same point.
    #[error("rank {rank} failed while {phase}{}", message.as_deref().filter(|m| !m.is_empty()).map(|m| format!(": {m}")).unwrap_or_default())]
    PeerFailed {
        rank: usize,
        phase: String,
        message: Option<String>,
    },
}

/// Result alias of the training code.
pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
