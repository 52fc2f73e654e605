//! Collectives on [`qkernels::Tensor`]s, on whichever side the tensor lives: device buffers through NCCL when the
//! tensor is on a GPU and its group has a device communicator, host slices through the [`Communicator`] trait
//! otherwise. The model code (tensor/sequence parallel mappings, the data-parallel gradient reduction) calls these
//! and never asks where the data is.
//!
//! # The abstraction
//!
//! A process group is still one `&dyn Communicator` (host `[f32]` slices) — what [`ParallelGroups`] holds and
//! every existing caller passes. [`Communicator::device`] (default `None`) lets a group also expose a
//! [`Communicator<DeviceBuffer>`] *of the same members*. [`NcclGroup`] is such a group: its host methods stage
//! through device buffers (upload, NCCL collective, host wait with the communicator's timeout, download) — for the
//! few small host vectors the model reduces (loss sums, the cross-entropy's per-token statistics, routing
//! statistics, the norm) — and its `device()` is the [`NcclCommunicator`] itself. The CPU communicator has no
//! device side. So:
//!
//! | tensor | group | path |
//! | --- | --- | --- |
//! | CPU | any | host: `to_vec_f32` → host collective → `from_f32` (unchanged CPU behaviour) |
//! | CUDA | [`NcclGroup`] (`device()` is `Some`) | device: the tensor's storage handed to NCCL, result in a fresh storage |
//! | CUDA | host only (CPU communicator) | host round trip, cast back to the tensor's dtype |
//!
//! The device path keeps the tensor's dtype on the wire: bf16 activations move (and sum) as bf16, f32 weight
//! gradients as f32. Tensors are immutable values, so an in-place NCCL all-reduce runs on a fresh copy (one
//! device-to-device copy); all-gather and reduce-scatter read the input storage directly and write a fresh output.
//! Everything is stream-ordered (see [`super::nccl`]): the calls return once enqueued, and later kernels on the
//! device's compute stream wait for the collective.
//!
//! # The collectives and their conjugate pairs
//!
//! `p` members, group rank `i`, `x_i` the tensor on rank `i`. With the inner product on distributed values
//! `⟨u, v⟩ = Σ_i ⟨u_i, v_i⟩`, a forward map's backward is its adjoint:
//!
//! - [`all_reduce`] `AR: (x_i) ↦ (Σ_j x_j)` on every rank (any shape). Self-adjoint:
//!   `Σ_i ⟨Σ_j x_j, y_i⟩ = Σ_j ⟨x_j, Σ_i y_i⟩`. Its conjugate in Megatron's `f`/`g` pairs is the identity:
//!   the identity forward (a replicated input `X` feeding every rank's `X·A_iᵀ`) has backward
//!   `∂L/∂X = Σ_i ∂L/∂X^{(i)}` = all-reduce, and the all-reduce forward (`Y = Σ_i Y^{(i)}`) has backward
//!   `∂L/∂Y^{(i)} = ∂L/∂Y`, already replicated = identity.
//! - [`all_gather_rows`] `AG: x_i [r, c] ↦ [x_0; …; x_{p−1}] [p·r, c]` and [`reduce_scatter_rows`]
//!   `RS: y_i [p·r, c] ↦ Σ_j y_j[i·r..(i+1)·r]` are adjoint: `Σ_i ⟨AG(x), y_i⟩ = Σ_i Σ_j ⟨x_j, y_i[j]⟩ =
//!   Σ_j ⟨x_j, Σ_i y_i[j]⟩ = Σ_j ⟨x_j, RS(y)_j⟩` — sequence parallelism's pair (gather before a column-parallel
//!   layer ↔ reduce-scatter its input gradient; reduce-scatter after a row-parallel layer ↔ gather its output
//!   gradient). `AR = AG ∘ RS`, the same traffic as the pair.
//! - Data parallelism: the loss is normalised by the *global* batch's weight sum, so the full-batch gradient is
//!   the plain sum `Σ_i g_i` of the ranks' gradients — [`all_reduce`] (sum, f32) over the dp group, after which
//!   every dp rank holds the same gradient and steps the same optimizer ([`reduce_grads`]). (Its forward partner
//!   is the replication of the parameters, identity per rank.)
//!
//! Row layout: rank `i`'s shard is the contiguous rows `[i·R/p, (i+1)·R/p)`, NCCL's chunk `i` of the flattened
//! row-major buffer, so `R % p == 0` is required ([`TensorCommError::Shape`] otherwise).
//!
//! [`ParallelGroups`]: crate::tensor_parallel::ParallelGroups

use std::time::Duration;

use qkernels::cuda::storage::CudaStorage;
use qkernels::{KernelError, Tensor};
use thiserror::Error;

use super::nccl::{DeviceBuffer, NcclCommunicator, NcclError, NcclIdStore};
use super::{CommError, CommExt, CommResult, Communicator, ReduceOp};
use crate::model::NamedTensors;

/// Errors of the tensor collectives.
#[derive(Debug, Error)]
pub enum TensorCommError {
    #[error("collective failed: {0}")]
    Comm(#[from] CommError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The tensor does not fit the collective (rank, row count).
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, TensorCommError>;

/// `(device storage, device communicator)` when `x` lives on a GPU and `comm` has a device side.
fn device_side<'a>(
    x: &'a Tensor,
    comm: &'a dyn Communicator,
) -> Option<(&'a CudaStorage, &'a dyn Communicator<DeviceBuffer>)> {
    Some((x.cuda_storage()?, comm.device()?))
}

fn rows_cols(op: &'static str, x: &Tensor) -> Result<(usize, usize)> {
    match x.shape() {
        [r, c] => Ok((*r, *c)),
        s => Err(TensorCommError::Shape {
            op,
            detail: format!("expected a [rows, cols] tensor, got {s:?}"),
        }),
    }
}

/// A host result back into a tensor like `like` (same device and dtype).
fn from_host(v: Vec<f32>, shape: &[usize], like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_f32_as(v, shape, &like.device(), like.dtype())?)
}

/// `Σ_j x_j` (or another [`ReduceOp`]) over `comm`, any shape, in `x`'s dtype; a clone for a group of one.
pub fn all_reduce(x: &Tensor, comm: &dyn Communicator, op: ReduceOp) -> Result<Tensor> {
    if comm.size() == 1 {
        return Ok(x.clone());
    }
    if let Some((s, d)) = device_side(x, comm) {
        let copy = CudaStorage::alloc(s.dev(), s.shape(), s.dtype())?;
        s.dev().dtod(copy.ptr(), s.ptr(), s.bytes())?;
        let mut buf = DeviceBuffer::from_storage(copy);
        d.all_reduce(&mut buf, op)?;
        return Ok(Tensor::from_cuda_storage(buf.into_storage()));
    }
    let mut v = x.to_vec_f32()?;
    comm.all_reduce(&mut v, op)?;
    from_host(v, x.shape(), x)
}

/// All-gather of row shards: `[r, c]` on every rank → `[p·r, c]`, rank `j`'s rows at `[j·r, (j+1)·r)`.
pub fn all_gather_rows(x: &Tensor, comm: &dyn Communicator) -> Result<Tensor> {
    let (r, c) = rows_cols("all_gather_rows", x)?;
    let p = comm.size();
    if p == 1 {
        return Ok(x.clone());
    }
    if let Some((s, d)) = device_side(x, comm) {
        let input = DeviceBuffer::from_storage(s.clone()); // read only
        let mut out =
            DeviceBuffer::from_storage(CudaStorage::alloc(s.dev(), &[p * r, c], s.dtype())?);
        d.all_gather(&input, &mut out)?;
        return Ok(Tensor::from_cuda_storage(out.into_storage()));
    }
    let mut out = vec![0f32; p * r * c];
    comm.all_gather(&x.to_vec_f32()?, &mut out)?;
    from_host(out, &[p * r, c], x)
}

/// Reduce-scatter of rows: `[R, c]` on every rank → this rank's rows `[i·R/p, (i+1)·R/p)` of `op` over the
/// ranks (`R % p == 0`).
pub fn reduce_scatter_rows(x: &Tensor, comm: &dyn Communicator, op: ReduceOp) -> Result<Tensor> {
    let (r, c) = rows_cols("reduce_scatter_rows", x)?;
    let p = comm.size();
    if !r.is_multiple_of(p) {
        return Err(TensorCommError::Shape {
            op: "reduce_scatter_rows",
            detail: format!("{r} rows do not split over {p} ranks"),
        });
    }
    if p == 1 {
        return Ok(x.clone());
    }
    if let Some((s, d)) = device_side(x, comm) {
        let input = DeviceBuffer::from_storage(s.clone()); // read only
        let mut out =
            DeviceBuffer::from_storage(CudaStorage::alloc(s.dev(), &[r / p, c], s.dtype())?);
        d.reduce_scatter(&input, &mut out, op)?;
        return Ok(Tensor::from_cuda_storage(out.into_storage()));
    }
    let mut out = vec![0f32; r / p * c];
    comm.reduce_scatter(&x.to_vec_f32()?, &mut out, op)?;
    from_host(out, &[r / p, c], x)
}

/// All-to-all of rows: `x [Σ_k send_rows[k], c]` holds, in rank order, the `send_rows[k]` rows for group rank `k`;
/// the result `[Σ_k recv_rows[k], c]` holds, in rank order, the rows every rank `k` sent here (`recv_rows[k]` of
/// them), in `x`'s dtype. Through NCCL (grouped send/recv) on a GPU with a device side, host vectors otherwise.
/// A permutation of rows across the ranks, so its adjoint is its inverse: the same call with the counts swapped
/// (EP's dispatch ↔ combine).
pub fn all_to_all_rows(
    x: &Tensor,
    send_rows: &[usize],
    recv_rows: &[usize],
    comm: &dyn Communicator,
) -> Result<Tensor> {
    let (r, c) = rows_cols("all_to_all_rows", x)?;
    let p = comm.size();
    if send_rows.len() != p || recv_rows.len() != p || send_rows.iter().sum::<usize>() != r {
        return Err(TensorCommError::Shape {
            op: "all_to_all_rows",
            detail: format!("{r} rows, send counts {send_rows:?}, receive counts {recv_rows:?}, {p} ranks"),
        });
    }
    let rows_out: usize = recv_rows.iter().sum();
    let times = |counts: &[usize]| counts.iter().map(|n| n * c).collect::<Vec<_>>();
    if let Some((s, d)) = device_side(x, comm) {
        let input = DeviceBuffer::from_storage(s.clone()); // read only
        let mut out = DeviceBuffer::from_storage(CudaStorage::alloc(s.dev(), &[rows_out, c], s.dtype())?);
        d.all_to_all_v(&input, &times(send_rows), &mut out, &times(recv_rows))?;
        return Ok(Tensor::from_cuda_storage(out.into_storage()));
    }
    let out = comm.all_to_all_v_vec(&x.to_vec_f32()?, &times(send_rows), &times(recv_rows))?;
    from_host(out, &[rows_out, c], x)
}

/// Point-to-point: `x` to rank `peer` of `comm` — its device buffer, in its dtype, through NCCL when `x` is on a
/// GPU and `comm` has a device side (ordered with the compute stream, so `x` may be dropped at once); f32 host
/// values otherwise. The receiver calls [`recv`] with the same shape (and dtype, on the device path).
pub fn send(x: &Tensor, comm: &dyn Communicator, peer: usize) -> Result<()> {
    if let Some((s, d)) = device_side(x, comm) {
        d.send(&DeviceBuffer::from_storage(s.clone()), peer)?; // read only
        return Ok(());
    }
    Ok(comm.send(&x.to_vec_f32()?, peer)?)
}

/// The conjugate of [`send`]: a `shape` tensor of `dtype` on `device` from rank `peer` of `comm` (device path when
/// `device` is a GPU and `comm` has a device side, as the sender's).
pub fn recv(
    shape: &[usize],
    dtype: qkernels::DType,
    device: &qkernels::Device,
    comm: &dyn Communicator,
    peer: usize,
) -> Result<Tensor> {
    if let (qkernels::Device::Cuda(_), Some(d)) = (device, comm.device()) {
        let fresh = Tensor::zeros(shape, dtype, device)?;
        let s = fresh.cuda_storage().expect("a tensor on a CUDA device").clone();
        drop(fresh);
        let mut buf = DeviceBuffer::from_storage(s);
        d.recv(&mut buf, peer)?;
        return Ok(Tensor::from_cuda_storage(buf.into_storage()));
    }
    let mut v = vec![0f32; shape.iter().product()];
    comm.recv(&mut v, peer)?;
    let t = Tensor::from_f32(v, shape, device)?;
    Ok(if dtype == t.dtype() { t } else { t.to_dtype(dtype)? })
}

/// The data-parallel gradient reduction: every gradient replaced by its sum over `dp` (f32 on the wire for f32
/// gradients). Collective over `dp`; a no-op for a group of one.
pub fn reduce_grads(grads: &mut NamedTensors, dp: &dyn Communicator) -> Result<()> {
    if dp.size() == 1 {
        return Ok(());
    }
    for g in grads.values_mut() {
        *g = all_reduce(g, dp, ReduceOp::Sum)?;
    }
    Ok(())
}

/// A process group on GPUs: NCCL for device tensors ([`Communicator::device`]) and, through the same NCCL
/// communicator, the host-slice collectives of [`Communicator`] (staged through device buffers, each call waits on
/// the host with the communicator's timeout). See the module docs.
#[derive(Debug)]
pub struct NcclGroup {
    nccl: NcclCommunicator,
}

impl NcclGroup {
    /// Wraps a communicator.
    pub fn new(nccl: NcclCommunicator) -> NcclGroup {
        NcclGroup { nccl }
    }

    /// [`NcclCommunicator::init`] (collective over `global_ranks`; the unique id goes through `store`).
    pub fn init(
        ordinal: usize,
        rank: usize,
        global_ranks: Vec<usize>,
        group: &str,
        store: &mut dyn NcclIdStore,
        timeout: Duration,
    ) -> std::result::Result<NcclGroup, NcclError> {
        NcclCommunicator::init(ordinal, rank, global_ranks, group, store, timeout)
            .map(NcclGroup::new)
    }

    /// The NCCL communicator.
    pub fn nccl(&self) -> &NcclCommunicator {
        &self.nccl
    }

    fn me(&self) -> usize {
        self.nccl.global_ranks()[Communicator::<DeviceBuffer>::rank(&self.nccl)]
    }

    fn err(&self) -> impl Fn(NcclError) -> CommError + '_ {
        move |e| e.into_comm_error(self.me())
    }

    fn stage(&self, data: &[f32]) -> CommResult<DeviceBuffer> {
        let mut b = self.alloc(data.len())?;
        b.upload_f32(data).map_err(self.err())?;
        Ok(b)
    }

    fn alloc(&self, len: usize) -> CommResult<DeviceBuffer> {
        DeviceBuffer::alloc(self.nccl.device().ordinal(), len, qkernels::DType::F32)
            .map_err(self.err())
    }

    /// Waits for the collective (timeout, asynchronous errors), then copies `buf` out into `out`.
    fn finish(&self, buf: &DeviceBuffer, out: &mut [f32]) -> CommResult<()> {
        self.nccl.synchronize().map_err(self.err())?;
        let v = buf.download_f32().map_err(self.err())?;
        out.copy_from_slice(&v);
        Ok(())
    }
}

impl Communicator<[f32]> for NcclGroup {
    fn rank(&self) -> usize {
        Communicator::<DeviceBuffer>::rank(&self.nccl)
    }

    fn size(&self) -> usize {
        Communicator::<DeviceBuffer>::size(&self.nccl)
    }

    fn global_ranks(&self) -> &[usize] {
        Communicator::<DeviceBuffer>::global_ranks(&self.nccl)
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> CommResult<()> {
        if buf.is_empty() || Communicator::<[f32]>::size(self) == 1 {
            return Ok(()); // a sum/avg/max/… over one member is the value itself
        }
        let mut d = self.stage(buf)?;
        self.nccl.all_reduce_dev(&mut d, op).map_err(self.err())?;
        self.finish(&d, buf)
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> CommResult<()> {
        let i = self.stage(input)?;
        let mut o = self.alloc(output.len())?;
        self.nccl.all_gather_dev(&i, &mut o).map_err(self.err())?;
        self.finish(&o, output)
    }

    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], op: ReduceOp) -> CommResult<()> {
        let i = self.stage(input)?;
        let mut o = self.alloc(output.len())?;
        self.nccl
            .reduce_scatter_dev(&i, &mut o, op)
            .map_err(self.err())?;
        self.finish(&o, output)
    }

    fn all_to_all_v(
        &self,
        input: &[f32],
        send_counts: &[usize],
        output: &mut [f32],
        recv_counts: &[usize],
    ) -> CommResult<()> {
        let i = self.stage(input)?;
        let mut o = self.alloc(output.len())?;
        self.nccl
            .all_to_all_v_dev(&i, send_counts, &mut o, recv_counts)
            .map_err(self.err())?;
        self.finish(&o, output)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> CommResult<()> {
        let mut d = self.stage(buf)?;
        self.nccl.broadcast_dev(&mut d, root).map_err(self.err())?;
        self.finish(&d, buf)
    }

    fn send(&self, buf: &[f32], peer: usize) -> CommResult<()> {
        let d = self.stage(buf)?;
        self.nccl.send_dev(&d, peer).map_err(self.err())?;
        // The staging buffer must outlive the send: wait for it.
        self.nccl.synchronize().map_err(self.err())
    }

    fn recv(&self, buf: &mut [f32], peer: usize) -> CommResult<()> {
        let mut d = self.alloc(buf.len())?;
        self.nccl.recv_dev(&mut d, peer).map_err(self.err())?;
        self.finish(&d, buf)
    }

    fn barrier(&self) -> CommResult<()> {
        self.nccl.barrier_dev().map_err(self.err())
    }

    fn split(&self, groups: &[Vec<usize>]) -> CommResult<Box<dyn Communicator<[f32]>>> {
        let c = self.nccl.split_dev(groups).map_err(self.err())?;
        Ok(Box::new(NcclGroup::new(c)))
    }

    fn device(&self) -> Option<&dyn Communicator<DeviceBuffer>> {
        Some(&self.nccl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::CpuCommunicator;
    use qkernels::Device;

    fn ranks<R: Send>(n: usize, f: impl Fn(usize, CpuCommunicator) -> R + Sync) -> Vec<R> {
        let comms = CpuCommunicator::thread_group(n);
        std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .enumerate()
                .map(|(r, c)| {
                    let f = &f;
                    s.spawn(move || f(r, c))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn t(v: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_f32(v, shape, &Device::Cpu).unwrap()
    }

    /// Rank `r` sends `r + k + 1` rows to rank `k` (row value `100·r + 10·k + i`); rank `k` must receive, in rank
    /// order, exactly those rows; the swapped call brings every row home; counts that do not match are refused.
    #[test]
    fn all_to_all_rows_moves_uneven_blocks_and_its_inverse_brings_them_back() {
        let p = 3;
        ranks(p, |r, c| {
            let send: Vec<usize> = (0..p).map(|k| r + k + 1).collect();
            let recv: Vec<usize> = (0..p).map(|s| s + r + 1).collect();
            let mut rows = Vec::new();
            for (k, &n) in send.iter().enumerate() {
                rows.extend((0..n).flat_map(|i| [(100 * r + 10 * k + i) as f32, -1.0]));
            }
            let x = t(rows.clone(), &[send.iter().sum(), 2]);
            let y = all_to_all_rows(&x, &send, &recv, &c).unwrap();
            let mut want = Vec::new();
            for (s, &n) in recv.iter().enumerate() {
                want.extend((0..n).flat_map(|i| [(100 * s + 10 * r + i) as f32, -1.0]));
            }
            assert_eq!(y.shape(), &[recv.iter().sum::<usize>(), 2]);
            assert_eq!(y.to_vec_f32().unwrap(), want, "rank {r}");
            let back = all_to_all_rows(&y, &recv, &send, &c).unwrap();
            assert_eq!(back.to_vec_f32().unwrap(), rows, "rank {r}: the inverse");
            let bad = all_to_all_rows(&x, &recv[..2], &send, &c).unwrap_err();
            assert!(matches!(bad, TensorCommError::Shape { op: "all_to_all_rows", .. }), "{bad}");
        });
    }

    #[test]
    fn host_path_collectives_on_thread_ranks() {
        // Rank r holds x_r[i] = 10·r + i on a [2, 3] tensor.
        let out = ranks(3, |r, c| {
            let x = t((0..6).map(|i| (10 * r + i) as f32).collect(), &[2, 3]);
            assert!(
                Communicator::<[f32]>::device(&c).is_none(),
                "the CPU communicator has no device side"
            );
            let ar = all_reduce(&x, &c, ReduceOp::Sum)
                .unwrap()
                .to_vec_f32()
                .unwrap();
            let ag = all_gather_rows(&x, &c).unwrap();
            let big = t((0..18).map(|i| (r * 100 + i) as f32).collect(), &[6, 3]);
            let rs = reduce_scatter_rows(&big, &c, ReduceOp::Sum).unwrap();
            let bad = reduce_scatter_rows(&x, &c, ReduceOp::Sum).unwrap_err();
            (
                ar,
                ag.shape().to_vec(),
                ag.to_vec_f32().unwrap(),
                rs.shape().to_vec(),
                rs.to_vec_f32().unwrap(),
                bad,
            )
        });
        for (r, (ar, ags, ag, rss, rs, bad)) in out.into_iter().enumerate() {
            assert_eq!(ar, (0..6).map(|i| (30 + 3 * i) as f32).collect::<Vec<_>>());
            assert_eq!(ags, vec![6, 3]);
            assert_eq!(
                ag,
                (0..3)
                    .flat_map(|q| (0..6).map(move |i| (10 * q + i) as f32))
                    .collect::<Vec<_>>()
            );
            assert_eq!(rss, vec![2, 3]);
            // Σ_q (100·q + 6r + j) = 300 + 3·(6r + j).
            assert_eq!(
                rs,
                (0..6)
                    .map(|j| (300 + 3 * (6 * r + j)) as f32)
                    .collect::<Vec<_>>()
            );
            assert!(matches!(bad, TensorCommError::Shape { .. }), "{bad}");
        }
    }

    #[test]
    fn gather_and_scatter_are_adjoint_and_grads_sum() {
        // ⟨AG(x), y⟩ summed over ranks = ⟨x, RS(y)⟩ summed over ranks.
        let out = ranks(2, |r, c| {
            let x = t(
                (0..4)
                    .map(|i| (i as f32 + 1.0) * (r as f32 + 0.5))
                    .collect(),
                &[2, 2],
            );
            let y = t(
                (0..8)
                    .map(|i| (i as f32 - 3.0) * (r as f32 + 1.5))
                    .collect(),
                &[4, 2],
            );
            let ag = all_gather_rows(&x, &c).unwrap().to_vec_f32().unwrap();
            let rs = reduce_scatter_rows(&y, &c, ReduceOp::Sum)
                .unwrap()
                .to_vec_f32()
                .unwrap();
            let lhs: f64 = ag
                .iter()
                .zip(y.to_vec_f32().unwrap())
                .map(|(a, b)| (*a * b) as f64)
                .sum();
            let rhs: f64 = x
                .to_vec_f32()
                .unwrap()
                .iter()
                .zip(&rs)
                .map(|(a, b)| (*a * *b) as f64)
                .sum();
            let mut g = NamedTensors::new();
            g.insert("w".into(), t(vec![r as f32, 1.0], &[2]));
            reduce_grads(&mut g, &c).unwrap();
            (lhs, rhs, g["w"].to_vec_f32().unwrap())
        });
        let (l, r): (f64, f64) = out.iter().fold((0.0, 0.0), |a, o| (a.0 + o.0, a.1 + o.1));
        assert!((l - r).abs() < 1e-9, "{l} vs {r}");
        for o in &out {
            assert_eq!(o.2, vec![1.0, 2.0]);
        }
    }
}
