//! Device layer: one [`Tensor`] type over backends, and the op set Qwen3 training needs.
//!
//! - [`Device`] says where a tensor lives (`Cpu`, or `Cuda(ordinal)`: the [`cuda`] backend, which fails with
//!   [`KernelError::DeviceUnavailable`] on a machine without a usable GPU), [`DType`] what it holds.
//! - [`Tensor`] wraps a backend storage; host data goes in and out as `Vec<f32>` / `Vec<u32>` plus a shape.
//! - [`ops`] holds every op as a forward and an explicit backward (no autograd tape): GEMM, RMSNorm, RoPE,
//!   SwiGLU, attention, embedding, cross-entropy, MoE routing and permutation.
//!
//! The CPU backend is built on candle-core in f32 and is the reference: simple, composed, obviously correct.
//! Every backward is tested against finite differences of a naive f64 forward.
//!
//! Conventions: shapes are written outermost first (`[tokens, hidden]`); tokens are flattened `batch·seq` unless
//! an op says otherwise; weights use the HF/PyTorch `[out, in]` layout; ids and indices are `u32` tensors.

pub mod cuda;
pub mod device;
pub mod error;
pub mod ops;
pub mod tensor;

#[cfg(test)]
mod test_util;

pub use device::{DType, Device};
pub use error::{KernelError, Result};
pub use tensor::Tensor;
