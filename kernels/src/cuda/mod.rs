//! CUDA backend: device buffers, NVRTC-compiled kernels and cuBLASLt GEMMs behind [`Device::Cuda`].
//!
//! Everything CUDA is loaded at run time (cudarc with `dynamic-loading`): this crate builds and its CPU tests
//! run on a machine with no CUDA at all. Asking for `Device::Cuda(i)` there is a
//! [`KernelError::DeviceUnavailable`], never a panic.
//!
//! Pieces:
//! - [`device`]: one [`CudaDev`](device::CudaDev) per ordinal (primary context, one stream, caching allocator,
//!   loaded modules, cuBLASLt handle). Looked up by ordinal because [`Device`] is a plain `Copy` name.
//! - [`nvrtc`]: the CUDA C sources of `kernels/cuda/*.cu`, compiled for the device's arch (`sm_90a` on
//!   Hopper), cached on disk by a hash of source, options and NVRTC version.
//! - [`storage`]: [`CudaStorage`](storage::CudaStorage), the device side of a [`Tensor`](crate::Tensor).
//! - [`gemm`]: row-major GEMMs on cuBLASLt (bf16 or f32 in, f32 accumulate).
//! - [`ops`]: the CUDA implementation of every op the model needs, called from the dispatch arms in
//!   [`crate::ops`] and [`crate::Tensor`].
//! - [`paged`]: launch wrappers of the inference kernels (`paged_attention.cu`: in-place cache writes,
//!   decode/prefill attention through block tables, see [`crate::ops::paged_attention`](mod@crate::ops::paged_attention); `argmax.cu`: row
//!   argmax for greedy decoding, see [`crate::ops::argmax`]).
//! - [`optim`]: the fused AdamW step and the sum of squares for the gradient norm ([`crate::ops::adamw`]).
//!
//! Dtypes on CUDA: activations and weights may be `F32` or `BF16` (all float operands of one call share one
//! dtype); compute is f32; saved statistics (`rstd`, `lse`) and weight gradients (`dw`, `dtable`, MoE
//! `dweights`, `moe_permute_bwd`'s `dx`) are `F32`; cross-entropy weights and router outputs are `F32`.
//!
//! Kernels (`kernels/cuda/*.cu`): elementwise/cast/strided copy/column sum, RMSNorm fwd/bwd (rows of any width:
//! hidden or per head), RoPE fwd/bwd, SwiGLU fwd/bwd, embedding fwd/bwd (f32 atomics), cross-entropy fwd+bwd with
//! per-token weights, MoE unpermute fwd/bwd (permute is a row gather), and causal GQA attention with segment ids
//! in two flavours, both flash-style (no S×S buffer, online softmax, `lse` saved for backward, no atomics):
//! - `attention_tc.cu`: tensor cores (`mma.sync` m16n8k16 bf16, f32 accumulate, cp.async double buffering), used
//!   for bf16 with head_dim 64 or 128 — the model's case;
//! - `attention.cu`: CUDA-core f32 FMAs, any float dtype, head_dim ≤ 256 — the fallback, 15–20× slower
//!   ([`set_attention_tensor_cores`] forces it, for comparisons).
//!
//! MoE router ([`router`], `router.cu`): forward/backward, the aux-loss statistics and the MoE plan's counting
//! sort run on the device; only the `[E+1]` expert counts come back to the host (the grouped GEMMs need them).
//!
//! The GEMMs are cuBLASLt; grouped GEMMs are one cuBLASLt call per expert.
//!
//! Ordering invariant: every kernel, copy and GEMM of a device runs on that device's single stream, so a buffer
//! returned to the cache by a dropped tensor can be handed out again at once: its next user is queued after
//! every earlier user. Host reads synchronise that stream.

pub mod device;
pub mod gemm;
pub mod nvrtc;
pub mod ops;
pub mod optim;
pub mod paged;
pub mod router;
pub mod storage;

use crate::device::Device;
use crate::error::{KernelError, Result};

/// Failures inside the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// An NVRTC call failed (other than a compile error, see [`CudaError::Compile`]).
    #[error("NVRTC: {0:?}")]
    Nvrtc(cudarc::nvrtc::result::NvrtcError),
    /// A kernel source did not compile; `log` is NVRTC's program log.
    #[error("NVRTC compile of {source_name} for {arch} failed:\n{log}")]
    Compile {
        source_name: String,
        arch: String,
        log: String,
    },
    /// A cuBLASLt call failed.
    #[error("cuBLASLt: {0:?}")]
    Cublas(cudarc::cublaslt::result::CublasError),
    /// A shared library the backend needs cannot be loaded, or headers are missing.
    #[error("{0}")]
    Missing(String),
    /// The op or dtype combination has no CUDA implementation.
    #[error("{op}: not supported on CUDA: {msg}")]
    Unsupported { op: &'static str, msg: String },
}

impl From<cudarc::nvrtc::result::NvrtcError> for CudaError {
    fn from(e: cudarc::nvrtc::result::NvrtcError) -> Self {
        CudaError::Nvrtc(e)
    }
}

impl From<cudarc::cublaslt::result::CublasError> for CudaError {
    fn from(e: cudarc::cublaslt::result::CublasError) -> Self {
        CudaError::Cublas(e)
    }
}

impl From<cudarc::driver::DriverError> for KernelError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        KernelError::Cuda(CudaError::Driver(e))
    }
}

/// True when the CUDA driver library (`libcuda.so`) can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its usual names; no symbol is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// True when `libnvrtc.so` can be loaded (the kernels need it; see [`nvrtc`] for where it is looked up).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the NVRTC library by its usual names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Number of CUDA devices, 0 when there is no driver or no GPU.
pub fn device_count() -> usize {
    if !driver_present() {
        return 0;
    }
    let r = std::panic::catch_unwind(|| {
        cudarc::driver::result::init().ok()?;
        cudarc::driver::result::device::get_count().ok()
    });
    r.ok().flatten().map(|n| n.max(0) as usize).unwrap_or(0)
}

/// Waits until every queued op on `device` has finished (a no-op on the CPU).
pub fn synchronize(device: &Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(i) => device::get(*i)?.synchronize(),
    }
}

/// Fills every buffer the allocator hands out on `device` with NaN bytes (0xFF) before use, so an output element
/// a kernel forgets to write shows up as NaN. For parity tests; costs a memset per allocation.
pub fn set_poison_allocations(device: &Device, on: bool) -> Result<()> {
    if let Device::Cuda(i) = device {
        device::get(*i)?.set_poison(on);
    }
    Ok(())
}

pub use device::PoolStats;
pub use ops::set_attention_tensor_cores;

/// `(free, total)` bytes of `device` after handing the allocator's cached buffers back to the driver (`None` on the
/// CPU). For sizing long-lived pools such as the serving engine's KV cache.
pub fn memory_info(device: &Device) -> Result<Option<(usize, usize)>> {
    match device {
        Device::Cpu => Ok(None),
        Device::Cuda(i) => {
            let dev = device::get(*i)?;
            dev.release_cache()?;
            Ok(Some(dev.mem_info()?))
        }
    }
}

/// Allocator statistics of `device` (`None` on the CPU).
pub fn pool_stats(device: &Device) -> Result<Option<PoolStats>> {
    match device {
        Device::Cpu => Ok(None),
        Device::Cuda(i) => Ok(Some(device::get(*i)?.pool_stats())),
    }
}

pub(crate) fn unsupported(op: &'static str, msg: impl Into<String>) -> KernelError {
    KernelError::Cuda(CudaError::Unsupported {
        op,
        msg: msg.into(),
    })
}
