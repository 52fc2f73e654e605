//! Optimizer on flat f32 host buffers: AdamW as torch implements it, global grad-norm clipping, Megatron-style
//! learning-rate schedules, and gradient-accumulation helpers.
//!
//! # Shapes and invariants
//!
//! Every parameter is a flat `&mut [f32]` with a gradient `&[f32]` of the same length, addressed by its HF name
//! (a [`ParamSlot`]). The optimizer keeps, per name, fp32 `exp_avg` and `exp_avg_sq` buffers of that length and a
//! step count ([`AdamWState`]); a name's length may not change between steps. Host buffers are the CPU reference;
//! [`DeviceAdamW`] keeps the same per-name state as device tensors (fp32 masters and moments on the model's
//! device) and runs the same maths through `qkernels::ops::adamw_step`.
//!
//! # One training step, as Megatron does it
//!
//! ```text
//! lr   = schedule.lr(iteration)                       // iteration = number of optimizer steps already taken
//! norm = clip_grad_norm(&mut grads, max_grad_norm)    // pre-clip global L2 norm over all grads
//! if norm.is_finite() { adamw.step(lr, &mut slots) }  // skip the step on inf/NaN gradients
//! ```
//!
//! The numerics follow `torch.optim.AdamW(foreach=False)` and `torch.nn.utils.clip_grad_norm_` operation by
//! operation (scalars computed in f64, elementwise maths in f32, same order), and are checked against torch golden
//! values in `tests/fixtures/optim` (`parallel/tests/optim_golden.rs`).

mod accum;
mod adamw;
mod clip;
mod device;
mod schedule;

pub use accum::{accumulate, accumulate_scaled, scale, zero};
pub use adamw::{AdamW, AdamWConfig, AdamWState, ParamSlot, decays};
pub use clip::{
    TORCH_CLIP_EPS, clip_coefficient, clip_grad_norm, global_grad_norm, scale_grads, sum_of_squares,
};
pub use device::{DeviceAdamW, DeviceOptimError, DeviceStepReport};
pub use schedule::{DecayStyle, LrSchedule, Warmup};

/// Optimizer errors; each names the parameter or the setting at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptimError {
    #[error("parameter `{name}`: {param_len} values but {grad_len} gradient values")]
    GradLength {
        name: String,
        param_len: usize,
        grad_len: usize,
    },
    #[error("parameter `{name}`: {param_len} values but its optimizer state has {state_len}")]
    StateLength {
        name: String,
        param_len: usize,
        state_len: usize,
    },
    #[error("parameter `{name}` appears twice in one step")]
    DuplicateParam { name: String },
    #[error("buffer lengths differ: {dst} vs {src}")]
    BufferLength { dst: usize, src: usize },
    #[error("invalid optimizer setting `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}
