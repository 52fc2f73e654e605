//! One CUDA device: context, stream, caching allocator, loaded kernels, cuBLASLt handle.
//!
//! A [`CudaDev`] is created on first use of `Device::Cuda(ordinal)` and kept for the life of the process in a
//! registry keyed by ordinal ([`get`]): [`Device`] is a plain `Copy` name, and the driver's primary
//! context is per process anyway. Creation fails with
//! [`KernelError::DeviceUnavailable`] when there is no driver or no such
//! GPU.
//!
//! Allocator: sizes are rounded up to a size class (512 B steps up to 1 MiB, then 2 MiB steps); a dropped
//! buffer goes back to its class's free list and is reused by the next allocation of that class, so a training
//! step that repeats the same shapes does no `cuMemAlloc` after the first step ([`PoolStats::mallocs`] stays
//! flat). On out-of-memory the cached buffers are freed and the allocation retried once. Reuse is safe because
//! every operation of the device runs on its one stream (see the module docs of [`crate::cuda`]).

use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::result as dr;
use cudarc::driver::sys;
use cudarc::driver::{CudaContext, DriverError};

use super::CudaError;
use super::gemm::Lt;
use crate::device::Device;
use crate::error::{KernelError, Result};

/// Allocator statistics of one device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Calls to `cuMemAlloc` so far.
    pub mallocs: u64,
    /// Allocations served from the cache.
    pub reuses: u64,
    /// Bytes held by live buffers (size classes, not requested sizes).
    pub live_bytes: usize,
    /// Bytes held in free lists.
    pub cached_bytes: usize,
}

#[derive(Default)]
struct Pool {
    free: HashMap<usize, Vec<sys::CUdeviceptr>>,
    stats: PoolStats,
}

/// A kernel argument, passed to `cuLaunchKernel` by address.
#[derive(Debug, Clone, Copy)]
pub enum KArg {
    /// A device pointer (0 for a null pointer).
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
    /// A by-value struct of up to 18 i64 (the strided-copy descriptor).
    Strides([i64; 18]),
}

/// See the module docs.
pub struct CudaDev {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: sys::CUstream,
    cc: (i32, i32),
    max_smem_optin: i32,
    sm_count: i32,
    pool: Mutex<Pool>,
    poison: AtomicBool,
    modules: Mutex<HashMap<&'static str, sys::CUmodule>>,
    funcs: Mutex<HashMap<String, (sys::CUfunction, i32)>>,
    lt: Mutex<Option<Lt>>,
}

// SAFETY: the raw handles (stream, modules, functions) are CUDA driver objects, which the driver allows to be
// used from any thread once the owning context is current; every method binds the context first, and the
// mutable maps are behind mutexes.
unsafe impl Send for CudaDev {}
// SAFETY: as above; shared access only reads the handles or goes through the mutexes.
unsafe impl Sync for CudaDev {}

static REGISTRY: OnceLock<Mutex<HashMap<usize, Arc<CudaDev>>>> = OnceLock::new();

/// The device with CUDA ordinal `ordinal`, created on first use.
pub fn get(ordinal: usize) -> Result<Arc<CudaDev>> {
    let reg = REGISTRY.get_or_init(|| Mutex::new(HashMap::new()));
    let mut reg = reg.lock().expect("CUDA registry poisoned");
    if let Some(d) = reg.get(&ordinal) {
        return Ok(d.clone());
    }
    let unavailable = |reason: String| KernelError::DeviceUnavailable {
        device: Device::Cuda(ordinal),
        reason,
    };
    if !super::driver_present() {
        return Err(unavailable(
            "the CUDA driver library (libcuda.so) cannot be loaded on this machine".into(),
        ));
    }
    let created = std::panic::catch_unwind(|| CudaDev::new(ordinal))
        .map_err(|_| unavailable("the CUDA driver panicked while opening the device".into()))?;
    let dev = Arc::new(created.map_err(|e| unavailable(e.to_string()))?);
    reg.insert(ordinal, dev.clone());
    Ok(dev)
}

impl CudaDev {
    fn new(ordinal: usize) -> std::result::Result<Self, DriverError> {
        dr::init()?;
        let count = dr::device::get_count()?;
        if ordinal as i32 >= count {
            // Reported as CUDA_ERROR_INVALID_DEVICE by the driver too, but this message names the count.
            return Err(DriverError(sys::cudaError_enum::CUDA_ERROR_INVALID_DEVICE));
        }
        let ctx = CudaContext::new(ordinal)?;
        let cc = ctx.compute_capability()?;
        let max_smem_optin = ctx.attribute(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )?;
        let sm_count =
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let stream = dr::stream::create(dr::stream::StreamKind::NonBlocking)?;
        Ok(CudaDev {
            ordinal,
            ctx,
            stream,
            cc,
            max_smem_optin,
            sm_count,
            pool: Mutex::new(Pool::default()),
            poison: AtomicBool::new(false),
            modules: Mutex::new(HashMap::new()),
            funcs: Mutex::new(HashMap::new()),
            lt: Mutex::new(None),
        })
    }

    /// CUDA ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// `Device::Cuda(ordinal)`.
    pub fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    /// Compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    /// Number of multiprocessors.
    pub fn sm_count(&self) -> i32 {
        self.sm_count
    }

    /// The NVRTC target of this device: `sm_90a` on Hopper (so `wgmma`/`setmaxnreg` are allowed), else `sm_XY`.
    pub fn arch(&self) -> String {
        let (ma, mi) = self.cc;
        if (ma, mi) == (9, 0) {
            "sm_90a".into()
        } else {
            format!("sm_{ma}{mi}")
        }
    }

    /// The device's stream (every op of this device runs on it).
    pub fn stream(&self) -> sys::CUstream {
        self.stream
    }

    /// Makes the device's context current on this thread.
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread()?;
        Ok(())
    }

    /// Blocks until the stream is idle.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: `self.stream` was created by this context and is destroyed only never (it lives as long as
        // the process-wide registry entry).
        unsafe { dr::stream::synchronize(self.stream) }?;
        Ok(())
    }

    pub(crate) fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// Allocator statistics.
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.lock().expect("pool poisoned").stats
    }

    /// `(free, total)` device memory in bytes as the driver sees it: the allocator's cached buffers count as
    /// used (call [`CudaDev::release_cache`] first to count them as free).
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        Ok(dr::mem_get_info()?)
    }

    fn size_class(bytes: usize) -> usize {
        const MIB: usize = 1 << 20;
        if bytes <= MIB {
            bytes.div_ceil(512) * 512
        } else {
            bytes.div_ceil(2 * MIB) * 2 * MIB
        }
    }

    /// A buffer of at least `bytes` bytes (uninitialised, or NaN-poisoned, see [`super::set_poison_allocations`]).
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DevBuf> {
        if bytes == 0 {
            return Ok(DevBuf {
                ptr: 0,
                class: 0,
                dev: self.clone(),
            });
        }
        self.bind()?;
        let class = Self::size_class(bytes);
        let cached = {
            let mut pool = self.pool.lock().expect("pool poisoned");
            let p = pool.free.get_mut(&class).and_then(|v| v.pop());
            if p.is_some() {
                pool.stats.reuses += 1;
                pool.stats.cached_bytes -= class;
                pool.stats.live_bytes += class;
            }
            p
        };
        let ptr = match cached {
            Some(p) => p,
            None => {
                // SAFETY: the context is current (bind above); the size is positive.
                let p = match unsafe { dr::malloc_sync(class) } {
                    Ok(p) => p,
                    Err(_) => {
                        self.release_cache()?;
                        // SAFETY: as above.
                        unsafe { dr::malloc_sync(class) }?
                    }
                };
                let mut pool = self.pool.lock().expect("pool poisoned");
                pool.stats.mallocs += 1;
                pool.stats.live_bytes += class;
                p
            }
        };
        if self.poison.load(Ordering::Relaxed) {
            // SAFETY: `ptr` addresses `class` bytes owned by this allocation; the memset is ordered on the stream
            // before any later use.
            unsafe { dr::memset_d8_async(ptr, 0xFF, class, self.stream) }?;
        }
        Ok(DevBuf {
            ptr,
            class,
            dev: self.clone(),
        })
    }

    /// Frees every cached (unused) buffer back to the driver.
    pub fn release_cache(&self) -> Result<()> {
        self.synchronize()?;
        let mut pool = self.pool.lock().expect("pool poisoned");
        for (_, v) in pool.free.drain() {
            for p in v {
                // SAFETY: `p` came from `malloc_sync` and is in no live `DevBuf`; the stream is idle.
                unsafe { dr::free_sync(p) }?;
            }
        }
        pool.stats.cached_bytes = 0;
        Ok(())
    }

    fn give_back(&self, ptr: sys::CUdeviceptr, class: usize) {
        let mut pool = self.pool.lock().expect("pool poisoned");
        pool.free.entry(class).or_default().push(ptr);
        pool.stats.live_bytes -= class;
        pool.stats.cached_bytes += class;
    }

    /// Copies `src` to device address `dst` and waits for the copy.
    pub fn htod<T>(&self, dst: u64, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the caller's `dst` buffer holds at least `size_of_val(src)` bytes; `src` outlives the copy
        // because we synchronise before returning.
        unsafe {
            dr::memcpy_htod_async(dst, src, self.stream)?;
            dr::stream::synchronize(self.stream)?;
        }
        Ok(())
    }

    /// Copies device address `src` into `dst` after every queued op, and waits.
    pub fn dtoh<T>(&self, dst: &mut [T], src: u64) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: `src` holds at least `size_of_val(dst)` bytes (caller's invariant) and `dst` is plain old data
        // (f32/u16/u32) for which any bit pattern is valid; we synchronise before `dst` is read.
        unsafe {
            dr::memcpy_dtoh_async(dst, src, self.stream)?;
            dr::stream::synchronize(self.stream)?;
        }
        Ok(())
    }

    /// Sets `bytes` bytes at `dst` to zero (stream-ordered).
    pub fn memset_zero(&self, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: `dst` holds at least `bytes` bytes (caller's invariant).
        unsafe { dr::memset_d8_async(dst, 0, bytes, self.stream) }?;
        Ok(())
    }

    /// Copies `bytes` bytes device to device (stream-ordered).
    pub fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both ranges hold at least `bytes` bytes (caller's invariant) and do not overlap (fresh dst).
        unsafe { dr::memcpy_dtod_async(dst, src, bytes, self.stream) }?;
        Ok(())
    }

    fn function(&self, module: &'static str, name: &str, smem: u32) -> Result<sys::CUfunction> {
        let mut funcs = self.funcs.lock().expect("funcs poisoned");
        if let Some((f, set)) = funcs.get_mut(name) {
            if smem as i32 > *set {
                Self::raise_smem(*f, smem, self.max_smem_optin, name)?;
                *set = smem as i32;
            }
            return Ok(*f);
        }
        let m = {
            let mut mods = self.modules.lock().expect("modules poisoned");
            match mods.get(module) {
                Some(m) => *m,
                None => {
                    let image = super::nvrtc::compile_cached(module, &self.arch())?;
                    // SAFETY: `image` is a complete CUBIN produced by NVRTC for this device's arch; the driver
                    // copies it during the call.
                    let m = unsafe { dr::module::load_data(image.as_ptr() as *const c_void) }?;
                    mods.insert(module, m);
                    m
                }
            }
        };
        let cname = CString::new(name).expect("kernel names have no NUL");
        // SAFETY: `m` is a loaded module that is never unloaded.
        let f = unsafe { dr::module::get_function(m, cname) }.map_err(|e| {
            KernelError::Cuda(CudaError::Missing(format!(
                "kernel {name} not found in module {module}: {e}"
            )))
        })?;
        if smem > 48 * 1024 {
            Self::raise_smem(f, smem, self.max_smem_optin, name)?;
        }
        funcs.insert(name.to_string(), (f, smem.max(48 * 1024) as i32));
        Ok(f)
    }

    fn raise_smem(f: sys::CUfunction, smem: u32, max: i32, name: &str) -> Result<()> {
        if smem as i32 > max {
            return Err(super::unsupported(
                "launch",
                format!("{name} needs {smem} B of shared memory, the device allows {max}"),
            ));
        }
        // SAFETY: `f` is a valid function handle; the value is within the device's opt-in limit.
        unsafe {
            dr::function::set_function_attribute(
                f,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
        }?;
        Ok(())
    }

    /// Launches kernel `name` of source `module` on the device's stream. A grid with a zero dimension is a no-op.
    ///
    /// The caller guarantees `args` match the kernel's parameter list in order and type, and that every pointer
    /// argument addresses a buffer large enough for the sizes it passes.
    pub fn launch(
        &self,
        module: &'static str,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &mut [KArg],
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        self.bind()?;
        let f = self.function(module, name, smem)?;
        let mut params: Vec<*mut c_void> = args
            .iter_mut()
            .map(|a| match a {
                KArg::Ptr(p) => p as *mut u64 as *mut c_void,
                KArg::I32(v) => v as *mut i32 as *mut c_void,
                KArg::I64(v) => v as *mut i64 as *mut c_void,
                KArg::F32(v) => v as *mut f32 as *mut c_void,
                KArg::Strides(v) => v.as_mut_ptr() as *mut c_void,
            })
            .collect();
        // SAFETY: `f` is a loaded kernel; `params` points at `args`, which outlive the call (the driver copies
        // parameter values at launch); argument types and buffer sizes are the caller's contract above.
        unsafe { dr::launch_kernel(f, grid, (block, 1, 1), smem, self.stream, &mut params) }?;
        Ok(())
    }

    /// Runs `f` with this device's cuBLASLt state (created on first use).
    pub(crate) fn with_lt<R>(self: &Arc<Self>, f: impl FnOnce(&mut Lt) -> Result<R>) -> Result<R> {
        self.bind()?;
        let mut g = self.lt.lock().expect("lt poisoned");
        if g.is_none() {
            *g = Some(Lt::new(self)?);
        }
        f(g.as_mut().expect("just set"))
    }
}

/// A device allocation; dropping it returns the memory to its device's cache.
pub struct DevBuf {
    ptr: u64,
    class: usize,
    dev: Arc<CudaDev>,
}

impl DevBuf {
    /// Device address (0 for an empty buffer).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The owning device.
    pub fn dev(&self) -> &Arc<CudaDev> {
        &self.dev
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.ptr != 0 {
            self.dev.give_back(self.ptr, self.class);
        }
    }
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DevBuf(cuda:{}, {:#x}, {} B)",
            self.dev.ordinal, self.ptr, self.class
        )
    }
}
