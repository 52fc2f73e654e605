//! Typed errors of the inference engine.

use qkernels::KernelError;
use qparallel::model::ModelError;

use super::quant::QuantError;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A device-layer op failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),

    /// Loading the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),

    /// Quantizing the weights or a quantized matmul failed.
    #[error(transparent)]
    Quant(#[from] QuantError),

    /// The KV cache has too few free blocks.
    #[error("KV cache exhausted: {needed} more blocks needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },

    /// A request can never be served (too long, bad token ids, …).
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// An engine setting is inconsistent.
    #[error("invalid engine config: {0}")]
    InvalidConfig(String),

    /// The engine thread has stopped.
    #[error("the engine has stopped")]
    Stopped,
}
