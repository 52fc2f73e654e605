//! Devices and element types.
//!
//! A [`Device`] names where a tensor lives: the CPU reference backend, or a GPU served by [`crate::cuda`]
//! (loaded at run time; on a machine without a driver or GPU every attempt to allocate on one fails with
//! [`KernelError::DeviceUnavailable`](crate::KernelError::DeviceUnavailable)).

use std::fmt;

/// Where a tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory, computed by the candle-based reference backend (f32).
    Cpu,
    /// The GPU with this CUDA ordinal (see [`crate::cuda`]).
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Element type of a tensor.
///
/// Ops compute in `F32` on the CPU backend; `BF16` exists there for storage and casts, and is the GPU compute type
/// (the CUDA ops accept `F32` or `BF16`, see [`crate::cuda`]); `U32` holds token ids, positions, segment ids and
/// expert indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    U32,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 => 2,
        }
    }

    pub(crate) fn to_candle(self) -> candle_core::DType {
        match self {
            DType::F32 => candle_core::DType::F32,
            DType::BF16 => candle_core::DType::BF16,
            DType::U32 => candle_core::DType::U32,
        }
    }

    /// `None` for candle dtypes this layer never creates.
    pub(crate) fn from_candle(d: candle_core::DType) -> Option<Self> {
        match d {
            candle_core::DType::F32 => Some(DType::F32),
            candle_core::DType::BF16 => Some(DType::BF16),
            candle_core::DType::U32 => Some(DType::U32),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
        };
        f.write_str(s)
    }
}
