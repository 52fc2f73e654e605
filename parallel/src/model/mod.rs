//! Qwen3 and Qwen3-MoE, written once for one device with explicit forward and backward per layer.
//!
//! Every block has `forward(&self, x, …) -> (y, Saved)` and `backward(&self, dy, saved, …) -> (dx, Grads)`,
//! in the style of llm.c; there is no autograd tape. Parameter and gradient containers share one generic type
//! per block ([`params`]) and carry HF names, so a gradient map lines up with the checkpoint.
//!
//! Map:
//! - [`config`]: `ModelConfig` from an HF `config.json`;
//! - [`params`]: parameter containers, HF names and shapes, loading and random init;
//! - [`batch`]: the [`Batch`] the model consumes (ids, positions, segments, targets, loss weights);
//! - [`attention`], [`mlp`], [`moe`]: the blocks; [`layer`]: a decoder layer with recomputation;
//! - [`qwen3`]: the whole causal LM, [`Qwen3Model::forward_backward`] and [`Qwen3Model::logits`].

pub mod attention;
pub mod batch;
pub mod config;
pub mod error;
pub mod layer;
pub mod mlp;
pub mod moe;
pub mod params;
pub mod qwen3;

pub use batch::Batch;
pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use params::{
    Attention, DecoderLayer, Ffn, Mlp, NamedTensors, Qwen3Params, SparseMoe, param_shapes,
};
pub use qwen3::{ForwardTrace, Qwen3Model, StepOutput};

#[cfg(test)]
mod tests;
