//! The NCCL communicator: [`Communicator<DeviceBuffer>`](super::Communicator) over `libnccl`, loaded at run time.
//!
//! # Loading
//!
//! cudarc's `nccl` module with `dynamic-loading`: nothing NCCL is linked, the binary builds and runs on machines
//! without CUDA or NCCL. [`nccl_available`] tries to `dlopen` the library under cudarc's candidate names
//! (`libnccl.so`, `libnccl.so.<cuda major>`, …, **not** `libnccl.so.2`); every constructor checks it first and
//! returns [`NcclError::LibraryMissing`] instead of letting cudarc panic. The PyPI wheel `nvidia-nccl-cu13`
//! ships only `libnccl.so.2`: put a `libnccl.so` symbolic link to it in a directory on `LD_LIBRARY_PATH`.
//! Any panic inside cudarc's loader (a missing symbol in an old NCCL) is caught and reported the same way.
//!
//! # One communicator per group
//!
//! [`NcclCommunicator::init`] is collective over the members of one group: group rank 0 calls `ncclGetUniqueId`
//! and publishes the 128-byte id under `nccl/<group-name>` in a rendezvous key-value store ([`NcclIdStore`]:
//! the coordinator's `Rendezvous.Put/Get` or the TCP store of `qctl launch`); the others wait for the key, then
//! all call `ncclCommInitRank`. [`Communicator::split`] is `ncclCommSplit` (colour = index of the caller's group
//! in `groups`, key = its position there), so sub-groups need no further rendezvous.
//!
//! # Streams and ordering
//!
//! Each communicator has its own non-blocking CUDA stream. Every call records an event on the device's compute
//! stream ([`CudaDev::stream`], where every kernel, copy and GEMM of `qkernels` runs), makes the communication
//! stream wait on it (so the collective reads buffers only after the kernels that wrote them), enqueues the NCCL
//! call(s), records an event on the communication stream and makes the compute stream wait on that (so later
//! kernels, host copies and the allocator's reuse of a dropped buffer come after the collective). Calls return
//! once the work is *enqueued*: stream order is the synchronisation, as the module docs of [`super`] allow.
//! [`NcclCommunicator::synchronize`] waits on the host, with the communicator's timeout.
//! (Overlap of communication with independent compute — the compute stream not waiting at once — is a later
//! step; it needs the caller to say when it next touches the buffer.)
//!
//! # How the trait's contract maps
//!
//! | trait method | NCCL |
//! | --- | --- |
//! | `all_reduce` (in place) | `ncclAllReduce(buf, buf)` |
//! | `all_gather` | `ncclAllGather`, output `n·m` in group-rank order (NCCL's layout) |
//! | `reduce_scatter` | `L % n == 0`: `ncclReduceScatter` (rank `r` gets chunk `r`, NCCL's convention); otherwise the uneven contract of [`chunk_range`]: one `ncclReduce` per non-empty chunk `i` with root `i`, all in one `ncclGroupStart/End` |
//! | `all_to_all_v` | `ncclSend`/`ncclRecv` per peer with a non-zero count, in one group |
//! | `broadcast` | `ncclBroadcast(buf, buf, root)` |
//! | `send` / `recv` | `ncclSend` / `ncclRecv` (a sender and its receiver must both call; NCCL matches in order) |
//! | `barrier` | an all-reduce of one `f32` followed by a host wait on the communication stream |
//! | `split` | `ncclCommSplit` |
//!
//! Differences from the CPU communicator, by nature of NCCL: sizes are checked locally (lengths, dtypes,
//! `recv_counts` sum) but not against the peers — NCCL has no message headers, so mismatched calls hang until the
//! timeout instead of being [`CommError::Mismatch`]; results of a collective are deterministic for a fixed
//! topology and size but the reduction order is NCCL's. Errors: a failed NCCL call, an asynchronous NCCL error
//! (`ncclCommGetAsyncError`, polled in every wait) or a wait past the timeout *aborts* the communicator
//! (`ncclCommAbort`), and later calls fail with [`NcclError::Aborted`]. Through the trait the errors become
//! [`CommError`]: setup failures → [`CommError::Connect`], bad arguments → [`CommError::InvalidArgument`],
//! a wait past the timeout → [`CommError::Timeout`] (`peer` is the caller's own global rank: NCCL does not say
//! which peer is late), everything else → [`CommError::Aborted`] with NCCL's message.

use std::ffi::{CStr, c_void};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::result as dr;
use cudarc::driver::sys as cu;
use cudarc::nccl::sys as nc;
use qkernels::DType as KDType;
use qkernels::cuda::device::{self as kdev, CudaDev};
use qkernels::cuda::storage::CudaStorage;
use thiserror::Error;

use super::{CommBuffer, CommError, CommResult, Communicator, ReduceOp, chunk_range};

/// Errors of the NCCL communicator (typed; the [`Communicator`] impl maps them to [`CommError`]).
#[derive(Debug, Error)]
pub enum NcclError {
    /// `libnccl` cannot be loaded (or lacks a symbol this build calls).
    #[error("NCCL library not available: {0}")]
    LibraryMissing(String),
    /// The CUDA device cannot be opened (no driver, no such GPU).
    #[error("CUDA device {ordinal} not available: {reason}")]
    Device { ordinal: usize, reason: String },
    /// A CUDA driver call around the collectives (stream, event, copy) failed.
    #[error("CUDA driver call {op} failed: {detail}")]
    Cuda { op: &'static str, detail: String },
    /// An NCCL call returned an error.
    #[error("{op} failed: {code:?}: {message}")]
    Nccl {
        op: &'static str,
        code: nc::ncclResult_t,
        message: String,
    },
    /// Exchanging the unique id through the rendezvous store failed.
    #[error("rendezvous of NCCL group {group:?}: {detail}")]
    Rendezvous { group: String, detail: String },
    /// The caller's buffers or ranks do not fit the call (detected before anything is enqueued).
    #[error("invalid arguments to {op}: {detail}")]
    InvalidArgument { op: &'static str, detail: String },
    /// Waiting for the communication stream took longer than the communicator's timeout.
    #[error("timed out after {after:?} waiting for {op} to finish")]
    Timeout { op: &'static str, after: Duration },
    /// An earlier error aborted this communicator.
    #[error("NCCL communicator aborted by an earlier error: {0}")]
    Aborted(String),
}

impl NcclError {
    /// The [`CommError`] this becomes through the trait (`me` = the caller's global rank, see the module docs).
    pub fn into_comm_error(self, me: usize) -> CommError {
        match self {
            NcclError::LibraryMissing(_)
            | NcclError::Device { .. }
            | NcclError::Rendezvous { .. } => CommError::Connect(self.to_string()),
            NcclError::InvalidArgument { op, detail } => CommError::InvalidArgument { op, detail },
            NcclError::Timeout { op, after } => CommError::Timeout {
                peer: me,
                op,
                after,
            },
            NcclError::Aborted(m) => CommError::Aborted(m),
            other => CommError::Aborted(other.to_string()),
        }
    }
}

/// The key-value store the group's rank 0 publishes its NCCL unique id in (coordinator KV or TCP store).
pub trait NcclIdStore {
    /// Stores `value` under `key` (overwrites).
    fn put(&mut self, key: &str, value: &[u8]) -> Result<(), String>;
    /// Waits up to `timeout` for `key` to exist and returns its value.
    fn get(&mut self, key: &str, timeout: Duration) -> Result<Vec<u8>, String>;
}

/// An in-process [`NcclIdStore`] (one process driving several GPUs from threads; tests and examples).
#[derive(Clone, Default)]
pub struct MemIdStore(Arc<(Mutex<IdMap>, std::sync::Condvar)>);

type IdMap = std::collections::HashMap<String, Vec<u8>>;

impl NcclIdStore for MemIdStore {
    fn put(&mut self, key: &str, value: &[u8]) -> Result<(), String> {
        let (m, cv) = &*self.0;
        m.lock()
            .map_err(|e| e.to_string())?
            .insert(key.to_string(), value.to_vec());
        cv.notify_all();
        Ok(())
    }

    fn get(&mut self, key: &str, timeout: Duration) -> Result<Vec<u8>, String> {
        let (m, cv) = &*self.0;
        let g = m.lock().map_err(|e| e.to_string())?;
        let (g, _) = cv
            .wait_timeout_while(g, timeout, |map| !map.contains_key(key))
            .map_err(|e| e.to_string())?;
        g.get(key)
            .cloned()
            .ok_or_else(|| format!("key {key:?} not set within {timeout:?}"))
    }
}

/// Whether `libnccl` can be loaded under cudarc's names (see the module docs). Never panics.
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the library by cudarc's candidate names; no symbol is called.
    std::panic::catch_unwind(|| unsafe { nc::is_culib_present() }).unwrap_or(false)
}

/// Number of CUDA devices visible to this process (0 without a driver or GPU). Never panics.
pub fn cuda_device_count() -> usize {
    qkernels::cuda::device_count()
}

/// The loaded NCCL's version code (e.g. 22703 for 2.27.3), or [`NcclError::LibraryMissing`].
pub fn nccl_version() -> Result<i32, NcclError> {
    ensure_library()?;
    let r = std::panic::catch_unwind(|| {
        let mut v = 0i32;
        // SAFETY: `v` is a valid out-pointer for the duration of the call.
        let rc = unsafe { nc::ncclGetVersion(&mut v) };
        (rc, v)
    })
    .map_err(|_| NcclError::LibraryMissing("ncclGetVersion could not be loaded".into()))?;
    check("ncclGetVersion", r.0, None)?;
    Ok(r.1)
}

fn ensure_library() -> Result<(), NcclError> {
    if nccl_available() {
        Ok(())
    } else {
        Err(NcclError::LibraryMissing(
            "no libnccl.so on the loader path (LD_LIBRARY_PATH); the nvidia-nccl wheels ship only libnccl.so.2 — \
             add a libnccl.so symbolic link to it"
                .into(),
        ))
    }
}

fn error_string(code: nc::ncclResult_t, comm: Option<nc::ncclComm_t>) -> String {
    std::panic::catch_unwind(|| {
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code; ncclGetLastError takes
        // a live communicator (or null) and returns a NUL-terminated string owned by NCCL.
        unsafe {
            let mut s = CStr::from_ptr(nc::ncclGetErrorString(code))
                .to_string_lossy()
                .into_owned();
            let last = nc::ncclGetLastError(comm.unwrap_or(std::ptr::null_mut()));
            if !last.is_null() {
                let l = CStr::from_ptr(last).to_string_lossy();
                if !l.is_empty() {
                    s = format!("{s} ({l})");
                }
            }
            s
        }
    })
    .unwrap_or_else(|_| format!("{code:?}"))
}

fn check(
    op: &'static str,
    rc: nc::ncclResult_t,
    comm: Option<nc::ncclComm_t>,
) -> Result<(), NcclError> {
    match rc {
        nc::ncclResult_t::ncclSuccess | nc::ncclResult_t::ncclInProgress => Ok(()),
        code => Err(NcclError::Nccl {
            op,
            code,
            message: error_string(code, comm),
        }),
    }
}

fn cuda(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> NcclError {
    move |e| NcclError::Cuda {
        op,
        detail: e.to_string(),
    }
}

fn nccl_dtype(d: KDType) -> nc::ncclDataType_t {
    match d {
        KDType::F32 => nc::ncclDataType_t::ncclFloat32,
        KDType::BF16 => nc::ncclDataType_t::ncclBfloat16,
        KDType::U32 => nc::ncclDataType_t::ncclUint32,
    }
}

fn nccl_op(op: ReduceOp) -> nc::ncclRedOp_t {
    match op {
        ReduceOp::Sum => nc::ncclRedOp_t::ncclSum,
        ReduceOp::Prod => nc::ncclRedOp_t::ncclProd,
        ReduceOp::Max => nc::ncclRedOp_t::ncclMax,
        ReduceOp::Min => nc::ncclRedOp_t::ncclMin,
        ReduceOp::Avg => nc::ncclRedOp_t::ncclAvg,
    }
}

/// A contiguous device buffer of one dtype: what [`NcclCommunicator`] moves. Owns a [`CudaStorage`] (so it can
/// become a tensor's storage afterwards, [`DeviceBuffer::into_storage`]).
///
/// Communicators *write* into output buffers, unlike tensor ops (which always allocate fresh storages): a
/// buffer made with [`DeviceBuffer::from_storage`] must not share its storage with a live tensor.
#[derive(Debug, Clone)]
pub struct DeviceBuffer {
    storage: CudaStorage,
}

impl DeviceBuffer {
    /// `len` uninitialised elements of `dtype` on CUDA device `ordinal`.
    pub fn alloc(ordinal: usize, len: usize, dtype: KDType) -> Result<DeviceBuffer, NcclError> {
        let dev = open_device(ordinal)?;
        let storage = CudaStorage::alloc(&dev, &[len], dtype).map_err(|e| NcclError::Cuda {
            op: "alloc",
            detail: e.to_string(),
        })?;
        Ok(DeviceBuffer { storage })
    }

    /// Wraps a storage (see the type docs for the aliasing rule).
    pub fn from_storage(storage: CudaStorage) -> DeviceBuffer {
        DeviceBuffer { storage }
    }

    pub fn into_storage(self) -> CudaStorage {
        self.storage
    }

    pub fn storage(&self) -> &CudaStorage {
        &self.storage
    }

    pub fn dtype(&self) -> KDType {
        self.storage.dtype()
    }

    /// Device address of element 0.
    pub fn ptr(&self) -> u64 {
        self.storage.ptr()
    }

    pub fn bytes(&self) -> usize {
        self.storage.bytes()
    }

    /// Copies host `f32` values in (rounded to bf16 for a bf16 buffer, cast for u32); waits for the copy.
    pub fn upload_f32(&mut self, data: &[f32]) -> Result<(), NcclError> {
        if data.len() != self.len() {
            return Err(NcclError::InvalidArgument {
                op: "upload_f32",
                detail: format!("{} values for a buffer of {}", data.len(), self.len()),
            });
        }
        let dev = self.storage.dev().clone();
        let r = match self.dtype() {
            KDType::F32 => dev.htod(self.ptr(), data),
            KDType::BF16 => {
                let h: Vec<u16> = data
                    .iter()
                    .map(|&x| half::bf16::from_f32(x).to_bits())
                    .collect();
                dev.htod(self.ptr(), &h)
            }
            KDType::U32 => {
                let h: Vec<u32> = data.iter().map(|&x| x as u32).collect();
                dev.htod(self.ptr(), &h)
            }
        };
        r.map_err(|e| NcclError::Cuda {
            op: "upload",
            detail: e.to_string(),
        })
    }

    /// Copies the buffer out as `f32` after every queued op of the device (collectives included); waits.
    pub fn download_f32(&self) -> Result<Vec<f32>, NcclError> {
        let dev = self.storage.dev();
        let n = self.len();
        let r = match self.dtype() {
            KDType::F32 => {
                let mut h = vec![0f32; n];
                dev.dtoh(&mut h, self.ptr()).map(|_| h)
            }
            KDType::BF16 => {
                let mut h = vec![0u16; n];
                dev.dtoh(&mut h, self.ptr()).map(|_| {
                    h.into_iter()
                        .map(|b| half::bf16::from_bits(b).to_f32())
                        .collect()
                })
            }
            KDType::U32 => {
                let mut h = vec![0u32; n];
                dev.dtoh(&mut h, self.ptr())
                    .map(|_| h.into_iter().map(|b| b as f32).collect())
            }
        };
        r.map_err(|e| NcclError::Cuda {
            op: "download",
            detail: e.to_string(),
        })
    }

    /// Fills every byte with `0xFF` (NaN for f32 and bf16), stream-ordered: a poison for unwritten elements.
    pub fn poison(&mut self) -> Result<(), NcclError> {
        let dev = self.storage.dev();
        if self.bytes() == 0 {
            return Ok(());
        }
        dev.bind().map_err(|e| NcclError::Cuda {
            op: "bind",
            detail: e.to_string(),
        })?;
        // SAFETY: the storage owns at least `bytes()` bytes at `ptr()`; the memset is on the device's stream,
        // ordered with every other use of the buffer.
        unsafe { dr::memset_d8_async(self.ptr(), 0xFF, self.bytes(), dev.stream()) }
            .map_err(cuda("memset"))
    }

    /// Copies `src` (same length and dtype) into this buffer, stream-ordered.
    pub fn copy_from(&mut self, src: &DeviceBuffer) -> Result<(), NcclError> {
        if src.len() != self.len() || src.dtype() != self.dtype() {
            return Err(NcclError::InvalidArgument {
                op: "copy_from",
                detail: "length or dtype differ".into(),
            });
        }
        self.storage
            .dev()
            .dtod(self.ptr(), src.ptr(), self.bytes())
            .map_err(|e| NcclError::Cuda {
                op: "copy",
                detail: e.to_string(),
            })
    }
}

impl CommBuffer for DeviceBuffer {
    fn len(&self) -> usize {
        self.storage.elem_count()
    }
}

fn open_device(ordinal: usize) -> Result<Arc<CudaDev>, NcclError> {
    kdev::get(ordinal).map_err(|e| NcclError::Device {
        ordinal,
        reason: e.to_string(),
    })
}

struct State {
    comm: nc::ncclComm_t,
    aborted: Option<String>,
}

/// See the module docs.
pub struct NcclCommunicator {
    dev: Arc<CudaDev>,
    state: Mutex<State>,
    stream: cu::CUstream,
    ev_compute: cu::CUevent,
    ev_comm: cu::CUevent,
    rank: usize,
    global_ranks: Vec<usize>,
    timeout: Duration,
    scratch: DeviceBuffer,
}

// SAFETY: the raw handles (NCCL communicator, stream, events) are used only while holding `state`'s mutex
// (one NCCL call sequence at a time, as NCCL requires per communicator) with the device's context bound; the
// CUDA driver allows its handles to be used from any thread.
unsafe impl Send for NcclCommunicator {}
// SAFETY: as above.
unsafe impl Sync for NcclCommunicator {}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclCommunicator(cuda:{}, rank {} of {:?})",
            self.dev.ordinal(),
            self.rank,
            self.global_ranks
        )
    }
}

/// Default wait limit of [`NcclCommunicator::synchronize`] and [`Communicator::barrier`].
pub const NCCL_DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

impl NcclCommunicator {
    /// Collective over the group `global_ranks` (this process is `global_ranks[rank]`): exchanges the unique id
    /// under `nccl/<group>` in `store` and creates the communicator on CUDA device `ordinal`.
    pub fn init(
        ordinal: usize,
        rank: usize,
        global_ranks: Vec<usize>,
        group: &str,
        store: &mut dyn NcclIdStore,
        timeout: Duration,
    ) -> Result<NcclCommunicator, NcclError> {
        let n = global_ranks.len();
        if rank >= n {
            return Err(NcclError::InvalidArgument {
                op: "init",
                detail: format!("rank {rank} of a group of {n}"),
            });
        }
        ensure_library()?;
        let dev = open_device(ordinal)?;
        let key = format!("nccl/{group}");
        let rendezvous = |detail: String| NcclError::Rendezvous {
            group: group.to_string(),
            detail,
        };
        let id = if rank == 0 {
            let mut id = std::mem::MaybeUninit::<nc::ncclUniqueId>::uninit();
            let out = std::panic::AssertUnwindSafe(&mut id);
            let rc = std::panic::catch_unwind(move || {
                let out = out;
                // SAFETY: `id` is a valid out-pointer of the right type.
                unsafe { nc::ncclGetUniqueId(out.0.as_mut_ptr()) }
            })
            .map_err(|_| NcclError::LibraryMissing("ncclGetUniqueId could not be loaded".into()))?;
            check("ncclGetUniqueId", rc, None)?;
            // SAFETY: ncclGetUniqueId succeeded and wrote the whole id.
            let id = unsafe { id.assume_init() };
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            store.put(&key, &bytes).map_err(rendezvous)?;
            id
        } else {
            let bytes = store.get(&key, timeout).map_err(rendezvous)?;
            let mut id = nc::ncclUniqueId { internal: [0; 128] };
            if bytes.len() != id.internal.len() {
                return Err(rendezvous(format!(
                    "unique id of {} bytes, expected 128",
                    bytes.len()
                )));
            }
            for (d, s) in id.internal.iter_mut().zip(&bytes) {
                *d = *s as _;
            }
            id
        };
        dev.bind().map_err(|e| NcclError::Device {
            ordinal,
            reason: e.to_string(),
        })?;
        let mut comm: nc::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the device's context is current on this thread, which is how
        // NCCL picks the device.
        let rc = unsafe { nc::ncclCommInitRank(&mut comm, n as i32, id, rank as i32) };
        check("ncclCommInitRank", rc, None)?;
        Self::with_comm(dev, comm, rank, global_ranks, timeout)
    }

    fn with_comm(
        dev: Arc<CudaDev>,
        comm: nc::ncclComm_t,
        rank: usize,
        global_ranks: Vec<usize>,
        timeout: Duration,
    ) -> Result<NcclCommunicator, NcclError> {
        let made = (|| -> Result<_, NcclError> {
            dev.bind().map_err(|e| NcclError::Cuda {
                op: "bind",
                detail: e.to_string(),
            })?;
            let stream = dr::stream::create(dr::stream::StreamKind::NonBlocking)
                .map_err(cuda("cuStreamCreate"))?;
            let ev_compute = dr::event::create(cu::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(cuda("cuEventCreate"))?;
            let ev_comm = dr::event::create(cu::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(cuda("cuEventCreate"))?;
            let scratch = DeviceBuffer::alloc(dev.ordinal(), 1, KDType::F32)?;
            Ok((stream, ev_compute, ev_comm, scratch))
        })();
        let (stream, ev_compute, ev_comm, scratch) = match made {
            Ok(v) => v,
            Err(e) => {
                // SAFETY: `comm` is a live communicator that nobody else holds.
                unsafe { nc::ncclCommAbort(comm) };
                return Err(e);
            }
        };
        Ok(NcclCommunicator {
            dev,
            state: Mutex::new(State {
                comm,
                aborted: None,
            }),
            stream,
            ev_compute,
            ev_comm,
            rank,
            global_ranks,
            timeout,
            scratch,
        })
    }

    /// The CUDA device this communicator runs on.
    pub fn device(&self) -> &Arc<CudaDev> {
        &self.dev
    }

    /// The communication stream.
    pub fn stream(&self) -> cu::CUstream {
        self.stream
    }

    /// Changes the wait limit of [`NcclCommunicator::synchronize`] and barriers.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn me(&self) -> usize {
        self.global_ranks[self.rank]
    }

    fn abort(state: &mut State, why: String) {
        if state.aborted.is_none() {
            // SAFETY: `state.comm` is live (not yet aborted or destroyed); it is never used after this.
            unsafe { nc::ncclCommAbort(state.comm) };
            state.aborted = Some(why);
        }
    }

    /// Runs `enqueue(comm, stream)` ordered after the compute stream's work, and the compute stream after it.
    fn run(
        &self,
        op: &'static str,
        enqueue: impl FnOnce(nc::ncclComm_t, nc::cudaStream_t) -> Result<(), NcclError>,
    ) -> Result<(), NcclError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &st.aborted {
            return Err(NcclError::Aborted(why.clone()));
        }
        let result = (|| {
            self.dev.bind().map_err(|e| NcclError::Cuda {
                op: "bind",
                detail: e.to_string(),
            })?;
            // SAFETY: both streams and both events are live handles of this context.
            unsafe {
                dr::event::record(self.ev_compute, self.dev.stream())
                    .map_err(cuda("cuEventRecord"))?;
                dr::stream::wait_event(
                    self.stream,
                    self.ev_compute,
                    cu::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
                .map_err(cuda("cuStreamWaitEvent"))?;
            }
            enqueue(st.comm, self.stream as nc::cudaStream_t)?;
            // SAFETY: as above.
            unsafe {
                dr::event::record(self.ev_comm, self.stream).map_err(cuda("cuEventRecord"))?;
                dr::stream::wait_event(
                    self.dev.stream(),
                    self.ev_comm,
                    cu::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
                .map_err(cuda("cuStreamWaitEvent"))?;
            }
            Ok(())
        })();
        if let Err(e) = &result
            && !matches!(e, NcclError::InvalidArgument { .. })
        {
            Self::abort(&mut st, format!("{op}: {e}"));
        }
        result.map_err(|e| tag(op, e))
    }

    /// Waits on the host until everything enqueued on the communication stream has finished, polling NCCL's
    /// asynchronous error state; past the timeout the communicator is aborted ([`NcclError::Timeout`]).
    pub fn synchronize(&self) -> Result<(), NcclError> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(why) = &st.aborted {
                return Err(NcclError::Aborted(why.clone()));
            }
            self.dev.bind().map_err(|e| NcclError::Cuda {
                op: "bind",
                detail: e.to_string(),
            })?;
            // SAFETY: the stream is a live handle of the bound context.
            let q = unsafe { cu::cuStreamQuery(self.stream) };
            match q {
                cu::cudaError_enum::CUDA_SUCCESS => return Ok(()),
                cu::cudaError_enum::CUDA_ERROR_NOT_READY => {}
                other => {
                    let e = NcclError::Cuda {
                        op: "cuStreamQuery",
                        detail: format!("{other:?}"),
                    };
                    Self::abort(&mut st, e.to_string());
                    return Err(e);
                }
            }
            let mut async_rc = nc::ncclResult_t::ncclSuccess;
            // SAFETY: `st.comm` is live (not aborted, checked above); `async_rc` is a valid out-pointer.
            let rc = unsafe { nc::ncclCommGetAsyncError(st.comm, &mut async_rc) };
            let bad = check("ncclCommGetAsyncError", rc, Some(st.comm))
                .and_then(|_| check("asynchronous NCCL error", async_rc, Some(st.comm)));
            if let Err(e) = bad {
                Self::abort(&mut st, e.to_string());
                return Err(e);
            }
            if start.elapsed() > self.timeout {
                let e = NcclError::Timeout {
                    op: "synchronize",
                    after: self.timeout,
                };
                Self::abort(&mut st, e.to_string());
                return Err(e);
            }
            drop(st);
            spins += 1;
            if spins < 1000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    fn same_dtype(op: &'static str, a: &DeviceBuffer, b: &DeviceBuffer) -> Result<(), NcclError> {
        if a.dtype() != b.dtype() {
            return Err(NcclError::InvalidArgument {
                op,
                detail: format!("dtypes differ: {:?} and {:?}", a.dtype(), b.dtype()),
            });
        }
        Ok(())
    }

    fn peer(&self, op: &'static str, peer: usize) -> Result<i32, NcclError> {
        if peer >= self.size() {
            return Err(NcclError::InvalidArgument {
                op,
                detail: format!("peer {peer} of a group of {}", self.size()),
            });
        }
        Ok(peer as i32)
    }

    /// [`Communicator::all_reduce`] with the typed error.
    pub fn all_reduce_dev(&self, buf: &mut DeviceBuffer, op: ReduceOp) -> Result<(), NcclError> {
        if buf.is_empty() {
            return Ok(());
        }
        let (p, n, t) = (buf.ptr(), buf.len(), nccl_dtype(buf.dtype()));
        self.run("ncclAllReduce", |c, s| {
            // SAFETY: `p` addresses `n` elements of `t` (the buffer's invariant), valid until the compute stream
            // (which waits for this call) frees it.
            let rc = unsafe {
                nc::ncclAllReduce(
                    p as *const c_void,
                    p as *mut c_void,
                    n,
                    t,
                    nccl_op(op),
                    c,
                    s,
                )
            };
            check("ncclAllReduce", rc, Some(c))
        })
    }

    /// [`Communicator::all_gather`] with the typed error.
    pub fn all_gather_dev(
        &self,
        input: &DeviceBuffer,
        output: &mut DeviceBuffer,
    ) -> Result<(), NcclError> {
        Self::same_dtype("all_gather", input, output)?;
        let m = input.len();
        if output.len() != m * self.size() {
            return Err(NcclError::InvalidArgument {
                op: "all_gather",
                detail: format!(
                    "output of {} elements for {} ranks × {m}",
                    output.len(),
                    self.size()
                ),
            });
        }
        if m == 0 {
            return Ok(());
        }
        let (i, o, t) = (input.ptr(), output.ptr(), nccl_dtype(input.dtype()));
        self.run("ncclAllGather", |c, s| {
            // SAFETY: `i` holds `m` elements and `o` holds `n·m` (checked above).
            let rc = unsafe { nc::ncclAllGather(i as *const c_void, o as *mut c_void, m, t, c, s) };
            check("ncclAllGather", rc, Some(c))
        })
    }

    /// [`Communicator::reduce_scatter`] with the typed error (any input length, see the module docs).
    pub fn reduce_scatter_dev(
        &self,
        input: &DeviceBuffer,
        output: &mut DeviceBuffer,
        op: ReduceOp,
    ) -> Result<(), NcclError> {
        Self::same_dtype("reduce_scatter", input, output)?;
        let (n, l) = (self.size(), input.len());
        let mine = chunk_range(l, n, self.rank);
        if output.len() != mine.len() {
            return Err(NcclError::InvalidArgument {
                op: "reduce_scatter",
                detail: format!(
                    "output of {} elements; chunk {} of {l} over {n} ranks has {}",
                    output.len(),
                    self.rank,
                    mine.len()
                ),
            });
        }
        if l == 0 {
            return Ok(());
        }
        let (i, o, t, es) = (
            input.ptr(),
            output.ptr(),
            nccl_dtype(input.dtype()),
            input.dtype().size_in_bytes(),
        );
        let red = nccl_op(op);
        if l % n == 0 {
            return self.run("ncclReduceScatter", |c, s| {
                // SAFETY: `i` holds `l` elements, `o` holds `l / n` (checked above).
                let rc = unsafe {
                    nc::ncclReduceScatter(i as *const c_void, o as *mut c_void, l / n, t, red, c, s)
                };
                check("ncclReduceScatter", rc, Some(c))
            });
        }
        self.run("ncclReduce (uneven reduce-scatter)", |c, s| {
            // SAFETY: group calls have no preconditions.
            check("ncclGroupStart", unsafe { nc::ncclGroupStart() }, Some(c))?;
            let mut first_err = Ok(());
            for root in 0..n {
                let r = chunk_range(l, n, root);
                if r.is_empty() {
                    continue;
                }
                // SAFETY: chunk `root` lies inside the input; `o` is only written on the root, where it holds
                // exactly that chunk's length (checked above).
                let rc = unsafe {
                    nc::ncclReduce(
                        (i + (r.start * es) as u64) as *const c_void,
                        o as *mut c_void,
                        r.len(),
                        t,
                        red,
                        root as i32,
                        c,
                        s,
                    )
                };
                if first_err.is_ok() {
                    first_err = check("ncclReduce", rc, Some(c));
                }
            }
            // SAFETY: closes the group opened above.
            let end = check("ncclGroupEnd", unsafe { nc::ncclGroupEnd() }, Some(c));
            first_err.and(end)
        })
    }

    /// [`Communicator::all_to_all_v`] with the typed error.
    pub fn all_to_all_v_dev(
        &self,
        input: &DeviceBuffer,
        send_counts: &[usize],
        output: &mut DeviceBuffer,
        recv_counts: &[usize],
    ) -> Result<(), NcclError> {
        Self::same_dtype("all_to_all_v", input, output)?;
        let n = self.size();
        let bad = |detail: String| NcclError::InvalidArgument {
            op: "all_to_all_v",
            detail,
        };
        if send_counts.len() != n || recv_counts.len() != n {
            return Err(bad(format!(
                "{} send and {} receive counts for {n} ranks",
                send_counts.len(),
                recv_counts.len()
            )));
        }
        if send_counts.iter().sum::<usize>() != input.len()
            || recv_counts.iter().sum::<usize>() != output.len()
        {
            return Err(bad("counts do not add up to the buffer lengths".into()));
        }
        let (i, o, t, es) = (
            input.ptr(),
            output.ptr(),
            nccl_dtype(input.dtype()),
            input.dtype().size_in_bytes(),
        );
        self.run("ncclSend/ncclRecv (all_to_all_v)", |c, s| {
            // SAFETY: group calls have no preconditions.
            check("ncclGroupStart", unsafe { nc::ncclGroupStart() }, Some(c))?;
            let mut res = Ok(());
            let (mut so, mut ro) = (0usize, 0usize);
            for q in 0..n {
                if send_counts[q] > 0 && res.is_ok() {
                    // SAFETY: `[so, so + send_counts[q])` lies inside the input (the counts add up to its length).
                    let rc = unsafe {
                        nc::ncclSend(
                            (i + (so * es) as u64) as *const c_void,
                            send_counts[q],
                            t,
                            q as i32,
                            c,
                            s,
                        )
                    };
                    res = check("ncclSend", rc, Some(c));
                }
                if recv_counts[q] > 0 && res.is_ok() {
                    // SAFETY: as above for the output.
                    let rc = unsafe {
                        nc::ncclRecv(
                            (o + (ro * es) as u64) as *mut c_void,
                            recv_counts[q],
                            t,
                            q as i32,
                            c,
                            s,
                        )
                    };
                    res = check("ncclRecv", rc, Some(c));
                }
                so += send_counts[q];
                ro += recv_counts[q];
            }
            // SAFETY: closes the group opened above.
            let end = check("ncclGroupEnd", unsafe { nc::ncclGroupEnd() }, Some(c));
            res.and(end)
        })
    }

    /// [`Communicator::broadcast`] with the typed error.
    pub fn broadcast_dev(&self, buf: &mut DeviceBuffer, root: usize) -> Result<(), NcclError> {
        let root = self.peer("broadcast", root)?;
        if buf.is_empty() {
            return Ok(());
        }
        let (p, n, t) = (buf.ptr(), buf.len(), nccl_dtype(buf.dtype()));
        self.run("ncclBroadcast", |c, s| {
            // SAFETY: `p` holds `n` elements.
            let rc = unsafe {
                nc::ncclBroadcast(p as *const c_void, p as *mut c_void, n, t, root, c, s)
            };
            check("ncclBroadcast", rc, Some(c))
        })
    }

    /// [`Communicator::send`] with the typed error.
    pub fn send_dev(&self, buf: &DeviceBuffer, peer: usize) -> Result<(), NcclError> {
        let peer = self.peer("send", peer)?;
        if buf.is_empty() {
            return Ok(());
        }
        let (p, n, t) = (buf.ptr(), buf.len(), nccl_dtype(buf.dtype()));
        self.run("ncclSend", |c, s| {
            // SAFETY: `p` holds `n` elements.
            let rc = unsafe { nc::ncclSend(p as *const c_void, n, t, peer, c, s) };
            check("ncclSend", rc, Some(c))
        })
    }

    /// [`Communicator::recv`] with the typed error.
    pub fn recv_dev(&self, buf: &mut DeviceBuffer, peer: usize) -> Result<(), NcclError> {
        let peer = self.peer("recv", peer)?;
        if buf.is_empty() {
            return Ok(());
        }
        let (p, n, t) = (buf.ptr(), buf.len(), nccl_dtype(buf.dtype()));
        self.run("ncclRecv", |c, s| {
            // SAFETY: `p` holds `n` elements.
            let rc = unsafe { nc::ncclRecv(p as *mut c_void, n, t, peer, c, s) };
            check("ncclRecv", rc, Some(c))
        })
    }

    /// [`Communicator::barrier`] with the typed error: a one-element all-reduce, then a host wait.
    pub fn barrier_dev(&self) -> Result<(), NcclError> {
        let (p, t) = (self.scratch.ptr(), nccl_dtype(KDType::F32));
        self.run("ncclAllReduce (barrier)", |c, s| {
            // SAFETY: the scratch buffer holds one f32 and lives as long as `self`.
            let rc = unsafe {
                nc::ncclAllReduce(
                    p as *const c_void,
                    p as *mut c_void,
                    1,
                    t,
                    nc::ncclRedOp_t::ncclSum,
                    c,
                    s,
                )
            };
            check("ncclAllReduce", rc, Some(c))
        })?;
        self.synchronize()
    }

    /// [`Communicator::split`] with the typed error (the concrete type).
    pub fn split_dev(&self, groups: &[Vec<usize>]) -> Result<NcclCommunicator, NcclError> {
        let me = self.me();
        let bad = |detail: String| NcclError::InvalidArgument {
            op: "split",
            detail,
        };
        let mut seen = std::collections::HashSet::new();
        for g in groups {
            for r in g {
                if !self.global_ranks.contains(r) {
                    return Err(bad(format!(
                        "rank {r} is not a member of {:?}",
                        self.global_ranks
                    )));
                }
                if !seen.insert(*r) {
                    return Err(bad(format!("rank {r} is in two groups")));
                }
            }
        }
        let found = groups
            .iter()
            .enumerate()
            .find_map(|(ci, g)| g.iter().position(|&r| r == me).map(|k| (ci, k)));
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &st.aborted {
            return Err(NcclError::Aborted(why.clone()));
        }
        self.dev.bind().map_err(|e| NcclError::Cuda {
            op: "bind",
            detail: e.to_string(),
        })?;
        // NCCL_SPLIT_NOCOLOR: a member in no group still takes part (others would wait for it) and gets none.
        let (color, key) = found.map(|(c, k)| (c as i32, k as i32)).unwrap_or((-1, 0));
        let mut newcomm: nc::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `st.comm` is live; `newcomm` is a valid out-pointer; a null config inherits the parent's.
        let rc =
            unsafe { nc::ncclCommSplit(st.comm, color, key, &mut newcomm, std::ptr::null_mut()) };
        if let Err(e) = check("ncclCommSplit", rc, Some(st.comm)) {
            Self::abort(&mut st, e.to_string());
            return Err(e);
        }
        drop(st);
        let Some((ci, k)) = found else {
            return Err(bad(format!("rank {me} is in none of the groups")));
        };
        Self::with_comm(
            self.dev.clone(),
            newcomm,
            k,
            groups[ci].clone(),
            self.timeout,
        )
    }
}

fn tag(op: &'static str, e: NcclError) -> NcclError {
    match e {
        NcclError::Cuda { op: o, detail } => NcclError::Cuda {
            op: o,
            detail: format!("{detail} (in {op})"),
        },
        other => other,
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = self.dev.bind();
        // SAFETY: the handles are live and used by nobody else any more (we own `self` mutably). A healthy
        // communicator is destroyed after its stream drains; an aborted one was freed by ncclCommAbort.
        unsafe {
            if st.aborted.is_none() {
                if dr::stream::synchronize(self.stream).is_ok() {
                    nc::ncclCommDestroy(st.comm);
                } else {
                    nc::ncclCommAbort(st.comm);
                }
            }
            let _ = dr::event::destroy(self.ev_compute);
            let _ = dr::event::destroy(self.ev_comm);
            let _ = dr::stream::destroy(self.stream);
        }
    }
}

impl Communicator<DeviceBuffer> for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.global_ranks.len()
    }

    fn global_ranks(&self) -> &[usize] {
        &self.global_ranks
    }

    fn all_reduce(&self, buf: &mut DeviceBuffer, op: ReduceOp) -> CommResult<()> {
        self.all_reduce_dev(buf, op)
            .map_err(|e| e.into_comm_error(self.me()))
    }

    fn all_gather(&self, input: &DeviceBuffer, output: &mut DeviceBuffer) -> CommResult<()> {
        self.all_gather_dev(input, output)
            .map_err(|e| e.into_comm_error(self.me()))
    }

    fn reduce_scatter(
        &self,
        input: &DeviceBuffer,
        output: &mut DeviceBuffer,
        op: ReduceOp,
    ) -> CommResult<()> {
        self.reduce_scatter_dev(input, output, op)
            .map_err(|e| e.into_comm_error(self.me()))
    }

    fn all_to_all_v(
        &self,
        input: &DeviceBuffer,
        send_counts: &[usize],
        output: &mut DeviceBuffer,
        recv_counts: &[usize],
    ) -> CommResult<()> {
        self.all_to_all_v_dev(input, send_counts, output, recv_counts)
            .map_err(|e| e.into_comm_error(self.me()))
    }

    fn broadcast(&self, buf: &mut DeviceBuffer, root: usize) -> CommResult<()> {
        self.broadcast_dev(buf, root)
            .map_err(|e| e.into_comm_error(self.me()))
    }

    fn send(&self, buf: &DeviceBuffer, peer: usize) -> CommResult<()> {
        self.send_dev(buf, peer)
            .map_err(|e| e.into_comm_error(self.me()))
    }

    fn recv(&self, buf: &mut DeviceBuffer, peer: usize) -> CommResult<()> {
        self.recv_dev(buf, peer)
            .map_err(|e| e.into_comm_error(self.me()))
    }

    fn barrier(&self) -> CommResult<()> {
        self.barrier_dev().map_err(|e| e.into_comm_error(self.me()))
    }

    fn split(&self, groups: &[Vec<usize>]) -> CommResult<Box<dyn Communicator<DeviceBuffer>>> {
        self.split_dev(groups)
            .map(|c| Box::new(c) as Box<dyn Communicator<DeviceBuffer>>)
            .map_err(|e| e.into_comm_error(self.me()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_or_device_is_an_error_not_a_panic() {
        let mut store = MemIdStore::default();
        // On a machine without NCCL (CI) this is LibraryMissing; without a GPU, Device. Either way no panic.
        if nccl_available() && qkernels::cuda::device_count() > 0 {
            return; // a real GPU machine: the examples cover it
        }
        let err = NcclCommunicator::init(
            0,
            0,
            vec![0],
            "world",
            &mut store,
            Duration::from_millis(10),
        )
        .unwrap_err();
        assert!(
            matches!(err, NcclError::LibraryMissing(_) | NcclError::Device { .. }),
            "{err}"
        );
        let ce = err.into_comm_error(0);
        assert!(matches!(ce, CommError::Connect(_)), "{ce}");
        if !nccl_available() {
            assert!(matches!(nccl_version(), Err(NcclError::LibraryMissing(_))));
        }
    }

    #[test]
    fn bad_rank_is_rejected_before_loading_anything() {
        let mut store = MemIdStore::default();
        let err =
            NcclCommunicator::init(0, 3, vec![0, 1], "g", &mut store, Duration::from_millis(10))
                .unwrap_err();
        assert!(matches!(err, NcclError::InvalidArgument { .. }), "{err}");
    }

    #[test]
    fn mem_store_waits_and_times_out() {
        let mut a = MemIdStore::default();
        let mut b = a.clone();
        let t = std::thread::spawn(move || b.get("nccl/world", Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(20));
        a.put("nccl/world", &[7u8; 128]).unwrap();
        assert_eq!(t.join().unwrap().unwrap(), vec![7u8; 128]);
        assert!(
            a.get("nccl/none", Duration::from_millis(10))
                .unwrap_err()
                .contains("nccl/none")
        );
    }
}
