//! Typed errors of the model code.

use qkernels::KernelError;

use super::config::ConfigError;
use crate::hf::HfError;

/// Result alias of the model code.
pub type Result<T> = std::result::Result<T, ModelError>;

/// Everything that can go wrong building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A device-layer op failed (shape, dtype, device, backend).
    #[error(transparent)]
    Kernel(#[from] KernelError),

    /// The model config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// Reading a checkpoint failed.
    #[error(transparent)]
    Hf(#[from] HfError),

    /// A parameter the config requires is absent from the checkpoint.
    #[error("parameter `{name}` is missing")]
    MissingParam { name: String },

    /// A parameter has a shape other than the config implies.
    #[error("parameter `{name}` has shape {got:?}, the config implies {expected:?}")]
    ParamShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    /// The checkpoint holds tensors the config does not explain.
    #[error("unexpected parameters (not implied by the config): {}", names.join(", "))]
    UnexpectedParams { names: Vec<String> },

    /// `tie_word_embeddings` is set but the checkpoint's `lm_head.weight` differs from the embedding.
    #[error(
        "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight"
    )]
    TiedHeadMismatch,

    /// A layer's backward was handed activations saved by a layer of another kind.
    #[error("saved activations do not belong to this layer ({0})")]
    SavedMismatch(&'static str),

    /// The batch is malformed (lengths, ids out of range, …).
    #[error("invalid batch: {0}")]
    Batch(String),

    /// A collective inside a block failed (a parallel [`AttentionCore`](super::attention::AttentionCore), e.g.
    /// context parallelism's K/V all-gather).
    #[error("collective failed: {0}")]
    Comm(#[from] crate::comm::CommError),
}
