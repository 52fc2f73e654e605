//! Communicators: one object per process group, offering the collective set the training engine needs.
//!
//! # Layers
//!
//! ```text
//! Communicator<B>   (trait)  all_reduce, all_gather, reduce_scatter, all_to_all_v, send/recv, broadcast, barrier, split
//!   ├── CpuCommunicator      the collectives written once over a point-to-point Transport (this module)
//!   │     └── Transport (trait): send bytes to a global rank / receive bytes from one, tagged
//!   │           ├── ThreadTransport   in-process, one endpoint per thread (tests)
//!   │           └── TcpTransport      full TCP mesh between rank processes (CPU runs, development)
//!   ├── NcclCommunicator     device buffers (`DeviceBuffer`), its own CUDA stream — see [`nccl`]
//!   └── NcclGroup            host slices staged through NCCL + `device()` = its NcclCommunicator — see [`tensor`]
//! ```
//!
//! [`tensor`] runs collectives on `qkernels::Tensor`s: through NCCL when the tensor is on a GPU and the group has
//! a device side ([`Communicator::device`]), through the host slices otherwise — what the tensor/sequence/data
//! parallel code calls.
//!
//! # Use in a rank process
//!
//! ```no_run
//! use std::net::TcpListener;
//! use std::time::Duration;
//! use qparallel::comm::{Communicator, CpuCommunicator, ReduceOp};
//! use qparallel::dims::{GroupKind, ParallelConfig, ParallelDims};
//!
//! # fn rendezvous(_my_address: String) -> (usize, Vec<String>) { unimplemented!() }
//! let listener = TcpListener::bind("0.0.0.0:0")?;
//! // The caller publishes its address and learns everyone's (coordinator or TCP store).
//! let (rank, addresses) = rendezvous(listener.local_addr()?.to_string());
//! let world = CpuCommunicator::connect_tcp(rank, listener, &addresses, Duration::from_secs(60))?;
//! let dims = ParallelDims::new(addresses.len(), ParallelConfig { tp: 2, ..Default::default() })?;
//! let tp = world.split(&dims.groups(GroupKind::Tp))?; // every rank calls every split, in the same order
//! let mut partial = vec![0.0f32; 1024];
//! tp.all_reduce(&mut partial, ReduceOp::Sum)?;
//! let as_trait: &dyn Communicator = &tp; // what the model code takes
//! # let _ = as_trait;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The trait and an NCCL implementation
//!
//! [`Communicator`] is generic over the *buffer* type `B` (default `[f32]`, host memory), not over a backend:
//! every method takes the caller's buffers (`&B` in, `&mut B` out) and never allocates a result, so a device
//! implementation can provide `impl Communicator<CudaView<bf16>> for NcclCommunicator` with the same method set and
//! the same semantics — `all_reduce` → `ncclAllReduce`, `all_gather` → `ncclAllGather`, `reduce_scatter` →
//! `ncclReduceScatter` (for lengths not divisible by `n`, one `ncclReduce` per chunk in an `ncclGroupStart/End`),
//! `all_to_all_v` → grouped `ncclSend`/`ncclRecv`, `broadcast` → `ncclBroadcast`, `split` → `ncclCommSplit` (color =
//! index of the caller's group, key = position in it). The NCCL implementation enqueues on its own stream and may
//! return before the data has moved (stream order is its synchronisation); the CPU implementation completes
//! before returning. Both report failures as [`CommError`]; an NCCL implementation maps an asynchronous error or a
//! watchdog timeout to [`CommError::Timeout`] / [`CommError::PeerGone`] and aborts the communicator.
//!
//! # Contract (all implementations)
//!
//! - Every member calls the same collectives, on the same communicator, in the same order, with matching sizes.
//!   The CPU implementation checks this: every message carries the collective kind, element type, a sequence
//!   number and the size parameter; a disagreement is [`CommError::Mismatch`] or [`CommError::SizeMismatch`] instead
//!   of silently mixed data.
//! - Different communicators (groups) are independent and may be used concurrently from different threads, even
//!   when they share one transport: messages are tagged per group.
//! - A peer that dies produces an error, never a hang: a dropped endpoint or closed connection is
//!   [`CommError::PeerGone`]; a peer that stays silent longer than the communicator's timeout is
//!   [`CommError::Timeout`]. After any error the communicator is *aborted* (later calls fail with
//!   [`CommError::Aborted`]) because the members' message streams may no longer line up — as with NCCL, the job
//!   restarts from a checkpoint.
//! - Errors are not collective: the member that detects a problem returns it; the others then see `PeerGone` (when
//!   the failing rank exits) or `Timeout`.
//! - Results are bit-identical on all members (each reduced chunk is computed once, by its owner, then copied).
//!
//! # Ring algorithms and their maths
//!
//! Let `n` be the group size and `x_r` the buffer of group rank `r` (length `L`), cut into `n` balanced chunks
//! `C_0 … C_{n-1}` ([`chunk_range`]: the first `L mod n` chunks have `⌈L/n⌉` elements, the rest `⌊L/n⌋`; any `L`,
//! including `L < n`, works). All indices are mod `n`; rank `r` sends to `r+1` and receives from `r-1`.
//!
//! **Reduce-scatter**, steps `s = 0 … n-2`: rank `r` sends its partial chunk `C_{r-s-1}` and receives chunk
//! `C_{r-s-2}`, which it reduces into its own. Invariant: *after step `s`, rank `r`'s chunk `C_{r-s-2}` holds the
//! reduction over the `s+2` ranks `r-s-1, …, r`* (step 0: own data + the predecessor's; step `s`: the predecessor
//! sent chunk `C_{(r-1)-(s-1)-2} = C_{r-s-2}` reduced over `s+1` ranks, plus our own). After step `n-2` rank `r`
//! holds `C_{r-n} = C_r` reduced over all `n` ranks: **rank `r` owns chunk `r`** (NCCL's convention).
//!
//! **All-gather**, steps `s = 0 … n-2`: rank `r` sends `C_{r-s}` (which it owns or received at step `s-1`) and
//! receives `C_{r-s-1}`. After `n-1` steps every rank holds every chunk.
//!
//! **All-reduce = reduce-scatter + all-gather.** Each rank sends `2(n-1)` chunks of `L/n` elements, i.e.
//! `2(n-1)/n · L` elements, independent of `n` for large `n`, which is optimal. nccl-tests reports
//! `algbw = S / t` (`S` the buffer size in bytes) and `busbw = algbw · 2(n-1)/n` for all-reduce, `algbw · (n-1)/n`
//! for all-gather and reduce-scatter (`S` = the full gathered/scattered buffer): busbw is the per-link traffic and is
//! comparable with the hardware link bandwidth whatever `n` is. [`ReduceOp::Avg`] divides the owned chunk by `n`
//! between the two phases.
//!
//! # Conjugate (adjoint) pairs
//!
//! With the sum over ranks as inner product on distributed vectors, `⟨u, v⟩ = Σ_r ⟨u_r, v_r⟩`:
//!
//! - all-gather `AG: (x_r ∈ ℝ^m) ↦ (y_r = [x_0; …; x_{n-1}] ∈ ℝ^{nm})` and reduce-scatter-sum
//!   `RS: (y_r ∈ ℝ^{nm}) ↦ (Σ_q y_q[chunk r])` are adjoint: `Σ_r ⟨AG(x)_r, y_r⟩ = Σ_r Σ_q ⟨x_q, y_r[q]⟩ =
//!   Σ_q ⟨x_q, Σ_r y_r[q]⟩ = Σ_q ⟨x_q, RS(y)_q⟩`. So the backward of an all-gather is a reduce-scatter and vice
//!   versa (sequence parallelism's pair).
//! - all-reduce `AR = AG ∘ RS` is self-adjoint; its conjugate in Megatron's `f`/`g` pair is the identity
//!   (identity forward ↔ all-reduce backward, and the reverse).
//! - broadcast from `root` is the adjoint of reduce-to-`root`; `send` is the adjoint of `recv`;
//!   `all_to_all_v(send_counts, recv_counts)` is the adjoint of `all_to_all_v(recv_counts, send_counts)` (a
//!   permutation's adjoint is its inverse) — MoE dispatch and combine.
//!
//! `parallel/tests/comm_collectives.rs` checks the AG/RS adjoint identity numerically.

mod cpu;
pub mod nccl;
mod tcp;
pub mod tensor;
mod transport;

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use thiserror::Error;

pub use cpu::{CpuCommunicator, DEFAULT_TIMEOUT};
pub use nccl::{
    DeviceBuffer, MemIdStore, NcclCommunicator, NcclError, NcclIdStore, nccl_available,
};
pub use tcp::TcpTransport;
pub use tensor::{NcclGroup, TensorCommError};
pub use transport::{Tag, ThreadTransport, Transport};

/// Errors of communicators and transports. Ranks are **global** ranks unless the field says otherwise.
#[derive(Debug, Error)]
pub enum CommError {
    /// The peer's endpoint was dropped or its connection closed.
    #[error("peer rank {peer} is gone: {reason}")]
    PeerGone { peer: usize, reason: String },
    /// No message from `peer` within the communicator's timeout.
    #[error("timed out after {after:?} waiting for rank {peer} in {op}")]
    Timeout {
        peer: usize,
        op: &'static str,
        after: Duration,
    },
    /// Two members called a collective with different sizes, or a received message has the wrong length.
    #[error("size mismatch in {op} with rank {peer}: we expected {expected}, it has {got}")]
    SizeMismatch {
        op: &'static str,
        peer: usize,
        expected: usize,
        got: usize,
    },
    /// The caller's buffers do not fit the collective (detected locally, before any communication).
    #[error("invalid arguments to {op}: {detail}")]
    InvalidArgument { op: &'static str, detail: String },
    /// A received message belongs to a different collective, element type or sequence number: the members did
    /// not call the same collectives in the same order.
    #[error("protocol mismatch with rank {peer}: expected {expected}, got {got}")]
    Mismatch {
        peer: usize,
        expected: String,
        got: String,
    },
    /// An earlier error aborted this communicator.
    #[error("communicator aborted by an earlier error: {0}")]
    Aborted(String),
    /// Setting up a connection failed (bad address, handshake, wrong peer).
    #[error("connect: {0}")]
    Connect(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// Result alias of this module.
pub type CommResult<T> = Result<T, CommError>;

/// Reduction operators (NCCL's set). `Max`/`Min` on floats propagate NaN (so a NaN anywhere is seen everywhere).
/// `Avg` is the sum divided by the group size (integer division for integer types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Prod,
    Max,
    Min,
    Avg,
}

/// Element types carried by the CPU communicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    F32 = 1,
    F64 = 2,
    I32 = 3,
    I64 = 4,
    U32 = 5,
    U64 = 6,
}

impl DType {
    pub(crate) fn from_u8(v: u8) -> Option<DType> {
        Some(match v {
            1 => DType::F32,
            2 => DType::F64,
            3 => DType::I32,
            4 => DType::I64,
            5 => DType::U32,
            6 => DType::U64,
            _ => return None,
        })
    }
}

/// A plain numeric element: little-endian encoding and the reduction operators.
pub trait Element: Copy + Send + Sync + PartialEq + fmt::Debug + 'static {
    const DTYPE: DType;
    /// Encoded size in bytes.
    const SIZE: usize;
    /// Writes the little-endian encoding of `self` into exactly `SIZE` bytes.
    fn write_le(self, out: &mut [u8]);
    /// Decodes from exactly `SIZE` bytes.
    fn read_le(bytes: &[u8]) -> Self;
    /// `op(a, b)` for `Sum`, `Prod`, `Max`, `Min`; `Avg` reduces as `Sum` (the division happens once, at the end).
    fn reduce(op: ReduceOp, a: Self, b: Self) -> Self;
    /// `self / n` (for [`ReduceOp::Avg`]).
    fn div_count(self, n: usize) -> Self;
}

macro_rules! float_element {
    ($t:ty, $d:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            const SIZE: usize = std::mem::size_of::<$t>();
            #[inline]
            fn write_le(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            #[inline]
            fn read_le(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("element size"))
            }
            #[inline]
            fn reduce(op: ReduceOp, a: Self, b: Self) -> Self {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => a + b,
                    ReduceOp::Prod => a * b,
                    ReduceOp::Max => {
                        if a.is_nan() || b.is_nan() {
                            <$t>::NAN
                        } else {
                            a.max(b)
                        }
                    }
                    ReduceOp::Min => {
                        if a.is_nan() || b.is_nan() {
                            <$t>::NAN
                        } else {
                            a.min(b)
                        }
                    }
                }
            }
            fn div_count(self, n: usize) -> Self {
                self / n as $t
            }
        }
    };
}

macro_rules! int_element {
    ($t:ty, $d:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            const SIZE: usize = std::mem::size_of::<$t>();
            #[inline]
            fn write_le(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            #[inline]
            fn read_le(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("element size"))
            }
            #[inline]
            fn reduce(op: ReduceOp, a: Self, b: Self) -> Self {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => a.wrapping_add(b),
                    ReduceOp::Prod => a.wrapping_mul(b),
                    ReduceOp::Max => a.max(b),
                    ReduceOp::Min => a.min(b),
                }
            }
            fn div_count(self, n: usize) -> Self {
                self / n as $t
            }
        }
    };
}

float_element!(f32, DType::F32);
float_element!(f64, DType::F64);
int_element!(i32, DType::I32);
int_element!(i64, DType::I64);
int_element!(u32, DType::U32);
int_element!(u64, DType::U64);

/// A buffer a communicator can move: host slices here, device views in the NCCL implementation.
pub trait CommBuffer {
    /// Number of elements.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Element> CommBuffer for [T] {
    fn len(&self) -> usize {
        <[T]>::len(self)
    }
}

/// The collectives of one process group. See the module docs for the contract.
///
/// Ranks passed to and returned by methods are **group ranks** (`0..size()`) unless named `global_*`. Length rules
/// (`n = size()`):
///
/// | method | input | output |
/// | --- | --- | --- |
/// | `all_reduce` | `L` (in place) | `L` |
/// | `all_gather` | `m` | `n·m`, rank `q`'s input at `[q·m, (q+1)·m)` |
/// | `reduce_scatter` | `L` (any `L`) | `chunk_range(L, n, rank).len()`: the reduced chunk `rank` |
/// | `all_to_all_v` | `Σ send_counts`, the part for rank `q` at offset `Σ_{j<q} send_counts[j]` | `Σ recv_counts`, likewise |
/// | `broadcast` | `L` on every rank, meaningful on `root` | `L` |
/// | `send` / `recv` | `L` / `L` (must match) | |
pub trait Communicator<B: ?Sized + CommBuffer = [f32]>: Send + Sync {
    /// This member's rank in the group.
    fn rank(&self) -> usize;
    /// Number of members.
    fn size(&self) -> usize;
    /// The members' global ranks, indexed by group rank.
    fn global_ranks(&self) -> &[usize];

    /// In-place reduction: afterwards every member holds `op` over all members' `buf`.
    fn all_reduce(&self, buf: &mut B, op: ReduceOp) -> CommResult<()>;
    /// Concatenation of every member's `input` in group-rank order.
    fn all_gather(&self, input: &B, output: &mut B) -> CommResult<()>;
    /// `output` = chunk `rank()` ([`chunk_range`]) of the reduction of all members' `input`.
    fn reduce_scatter(&self, input: &B, output: &mut B, op: ReduceOp) -> CommResult<()>;
    /// Personalised exchange with uneven counts: `send_counts[q]` elements go to rank `q`, `recv_counts[q]` come
    /// from rank `q` (which must equal rank `q`'s `send_counts[rank()]`).
    fn all_to_all_v(
        &self,
        input: &B,
        send_counts: &[usize],
        output: &mut B,
        recv_counts: &[usize],
    ) -> CommResult<()>;
    /// Copies `root`'s `buf` into every member's `buf`.
    fn broadcast(&self, buf: &mut B, root: usize) -> CommResult<()>;
    /// Point-to-point send to group rank `peer` (matched in order by the peer's `recv` from us).
    fn send(&self, buf: &B, peer: usize) -> CommResult<()>;
    /// Point-to-point receive from group rank `peer`; `buf.len()` must equal the sent length.
    fn recv(&self, buf: &mut B, peer: usize) -> CommResult<()>;
    /// Returns once every member has entered the barrier.
    fn barrier(&self) -> CommResult<()>;

    /// Sub-communicators: `groups` lists disjoint groups of **global** ranks, all members of this communicator
    /// (e.g. `dims.groups(GroupKind::Tp)`); returns the communicator of the group that contains the caller.
    /// Collective over this communicator: every member calls it, in the same order relative to other `split`s,
    /// with the same `groups` (checked). A rank's position in its list is its group rank.
    fn split(&self, groups: &[Vec<usize>]) -> CommResult<Box<dyn Communicator<B>>>;

    /// The device-buffer communicator of the *same* group, when this one has a device side ([`NcclGroup`]); the
    /// tensor collectives of [`tensor`] use it for tensors on a GPU. `None` (the default) for host-only groups.
    fn device(&self) -> Option<&dyn Communicator<DeviceBuffer>> {
        None
    }
}

/// Convenience wrappers that allocate their result, for host slices.
pub trait CommExt<T: Element> {
    /// [`Communicator::all_gather`] into a new vector of `n·input.len()` elements.
    fn all_gather_vec(&self, input: &[T]) -> CommResult<Vec<T>>;
    /// [`Communicator::reduce_scatter`] into a new vector (this rank's chunk).
    fn reduce_scatter_vec(&self, input: &[T], op: ReduceOp) -> CommResult<Vec<T>>;
    /// [`Communicator::all_to_all_v`] into a new vector of `Σ recv_counts` elements.
    fn all_to_all_v_vec(
        &self,
        input: &[T],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> CommResult<Vec<T>>;
}

impl<T: Element + Default, C: Communicator<[T]> + ?Sized> CommExt<T> for C {
    fn all_gather_vec(&self, input: &[T]) -> CommResult<Vec<T>> {
        let mut out = vec![T::default(); input.len() * self.size()];
        self.all_gather(input, &mut out)?;
        Ok(out)
    }

    fn reduce_scatter_vec(&self, input: &[T], op: ReduceOp) -> CommResult<Vec<T>> {
        let mut out = vec![T::default(); chunk_range(input.len(), self.size(), self.rank()).len()];
        self.reduce_scatter(input, &mut out, op)?;
        Ok(out)
    }

    fn all_to_all_v_vec(
        &self,
        input: &[T],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> CommResult<Vec<T>> {
        let mut out = vec![T::default(); recv_counts.iter().sum()];
        self.all_to_all_v(input, send_counts, &mut out, recv_counts)?;
        Ok(out)
    }
}

/// Chunk `i` of `len` elements cut into `n` balanced chunks: the first `len % n` chunks have one element more.
/// Chunks are contiguous, in order, and cover `0..len`.
///
/// # Panics
/// If `n == 0` or `i >= n`.
pub fn chunk_range(len: usize, n: usize, i: usize) -> Range<usize> {
    assert!(n > 0 && i < n, "chunk {i} of {n}");
    let base = len / n;
    let extra = len % n;
    let start = i * base + i.min(extra);
    let size = base + usize::from(i < extra);
    start..start + size
}
