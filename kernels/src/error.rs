//! Typed errors of the device layer.
//!
//! Every op validates shapes, dtypes and devices before it touches a backend, so a caller gets a message naming
//! the op and the offending dimension instead of a backend-internal failure. Backend failures that slip through
//! (candle on the CPU) are wrapped, not stringified, so their cause chain survives.

use crate::device::{DType, Device};

/// Result alias used by every fallible function of this crate.
pub type Result<T> = std::result::Result<T, KernelError>;

/// Everything that can go wrong in the device layer.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Two operands (or an operand and an argument) disagree on a dimension.
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },

    /// An operand has a dtype the op does not accept.
    #[error("{op}: expected dtype {expected}, got {got}")]
    DType {
        op: &'static str,
        expected: DType,
        got: DType,
    },

    /// Operands live on different devices.
    #[error("{op}: operands on different devices ({a} and {b})")]
    DeviceMismatch {
        op: &'static str,
        a: Device,
        b: Device,
    },

    /// The requested device cannot be used in this build or on this machine.
    #[error("device {device} is not available: {reason}")]
    DeviceUnavailable { device: Device, reason: String },

    /// A scalar argument or an index is out of its valid range.
    #[error("{op}: invalid argument: {msg}")]
    InvalidArgument { op: &'static str, msg: String },

    /// Host data whose length does not match the shape it is given.
    #[error("host data has {len} elements but shape {shape:?} needs {expected}")]
    HostData {
        len: usize,
        shape: Vec<usize>,
        expected: usize,
    },

    /// A failure inside the CPU backend (candle).
    #[error("CPU backend: {0}")]
    Cpu(#[from] candle_core::Error),

    /// A failure inside the CUDA backend (driver, NVRTC, cuBLASLt, or an unsupported op/dtype).
    #[error("CUDA backend: {0}")]
    Cuda(#[from] crate::cuda::CudaError),
}

impl KernelError {
    /// Shorthand for [`KernelError::Shape`].
    pub(crate) fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        KernelError::Shape {
            op,
            msg: msg.into(),
        }
    }

    /// Shorthand for [`KernelError::InvalidArgument`].
    pub(crate) fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        KernelError::InvalidArgument {
            op,
            msg: msg.into(),
        }
    }
}
