//! The one tensor type of the device layer, and host-side tensors.
//!
//! A [`Tensor`] is a dense, row-major, n-dimensional array on one [`Device`]. It wraps a backend storage enum
//! (today only the candle CPU backend), so model code is written once against [`Tensor`] and the ops in
//! [`crate::ops`], and a CUDA backend plugs in behind the same functions.
//!
//! Invariants:
//! - a tensor's dtype is one of [`DType`]; its shape is fixed at creation (ops return new tensors);
//! - cloning is cheap (the storage is reference counted) and never copies data;
//! - tensors are immutable values: "in-place" helpers such as [`Tensor::add_assign`] replace `self` with a new
//!   value, so a tensor saved for backward is never modified behind the saver's back. Two exceptions write into
//!   existing storage, each on buffers its owner holds exclusively: the inference KV cache
//!   ([`crate::ops::kv_cache_write`], see [`crate::ops::paged_attention`](mod@crate::ops::paged_attention)) and the optimizer's masters, moments and
//!   the weights it last wrote ([`crate::ops::adamw::adamw_step_multi`]).
//!
//! Host data moves in and out as `(Vec<f32> | Vec<u32>, shape)`: [`Tensor::from_f32`], [`Tensor::to_vec_f32`],
//! [`Tensor::shape`]. (Checkpoint IO's `(shape, data)` type lives in `qparallel::hf`.)

use std::fmt;

use crate::device::{DType, Device};
use crate::error::{KernelError, Result};

/// Backend storage. One variant per backend; ops dispatch on it.
#[derive(Clone)]
pub(crate) enum Storage {
    /// candle tensor in host memory.
    Cpu(candle_core::Tensor),
    /// Device buffer on a GPU (see [`crate::cuda`]).
    Cuda(crate::cuda::storage::CudaStorage),
}

/// A dense tensor on a [`Device`]. See the module docs for invariants.
#[derive(Clone)]
pub struct Tensor {
    storage: Storage,
}

fn candle_device(device: &Device) -> Result<candle_core::Device> {
    match device {
        Device::Cpu => Ok(candle_core::Device::Cpu),
        Device::Cuda(_) => Err(KernelError::DeviceUnavailable {
            device: *device,
            reason: "candle's CUDA backend is not used; CUDA tensors go through crate::cuda".into(),
        }),
    }
}

/// The CUDA device behind `device`, if it is one (fails with `DeviceUnavailable` when it cannot be opened).
fn cuda_dev(device: &Device) -> Result<Option<std::sync::Arc<crate::cuda::device::CudaDev>>> {
    match device {
        Device::Cpu => Ok(None),
        Device::Cuda(i) => Ok(Some(crate::cuda::device::get(*i)?)),
    }
}

fn check_len(len: usize, shape: &[usize]) -> Result<()> {
    let expected: usize = shape.iter().product();
    if len != expected {
        return Err(KernelError::HostData {
            len,
            shape: shape.to_vec(),
            expected,
        });
    }
    Ok(())
}

impl Tensor {
    // ----------------------------------------------------------------------------------------------------------
    // Backend plumbing (crate-internal).

    /// Wraps a candle tensor. The caller guarantees its dtype is one of [`DType`].
    pub(crate) fn from_cpu(t: candle_core::Tensor) -> Self {
        debug_assert!(
            DType::from_candle(t.dtype()).is_some(),
            "candle dtype {:?} leaked",
            t.dtype()
        );
        Tensor {
            storage: Storage::Cpu(t),
        }
    }

    /// The candle tensor behind a CPU tensor.
    pub(crate) fn cpu(&self) -> Result<&candle_core::Tensor> {
        match &self.storage {
            Storage::Cpu(t) => Ok(t),
            Storage::Cuda(_) => Err(KernelError::DeviceMismatch {
                op: "cpu backend",
                a: Device::Cpu,
                b: self.device(),
            }),
        }
    }

    /// Wraps a CUDA storage.
    pub(crate) fn from_cuda(s: crate::cuda::storage::CudaStorage) -> Self {
        Tensor {
            storage: Storage::Cuda(s),
        }
    }

    /// The device storage behind a CUDA tensor.
    pub(crate) fn cuda(&self) -> Result<&crate::cuda::storage::CudaStorage> {
        match &self.storage {
            Storage::Cuda(s) => Ok(s),
            Storage::Cpu(_) => Err(KernelError::DeviceMismatch {
                op: "cuda backend",
                a: Device::Cuda(0),
                b: Device::Cpu,
            }),
        }
    }

    /// The device storage of a CUDA tensor, `None` on the CPU. For code that hands device memory to another
    /// library (NCCL collectives in `qparallel::comm`): the storage must only be *read* (tensors are immutable
    /// values, and clones share it).
    pub fn cuda_storage(&self) -> Option<&crate::cuda::storage::CudaStorage> {
        match &self.storage {
            Storage::Cuda(s) => Some(s),
            Storage::Cpu(_) => None,
        }
    }

    /// A tensor over a CUDA storage (its shape and dtype). The storage becomes immutable from here on: whoever
    /// wrote it (a collective into a fresh buffer) must be done or stream-ordered before the tensor's next use.
    pub fn from_cuda_storage(s: crate::cuda::storage::CudaStorage) -> Tensor {
        Tensor::from_cuda(s)
    }

    /// True when the tensor lives on a GPU.
    pub fn is_cuda(&self) -> bool {
        matches!(self.storage, Storage::Cuda(_))
    }

    /// Fails unless `self` has dtype `want`.
    pub(crate) fn expect_dtype(&self, op: &'static str, want: DType) -> Result<()> {
        let got = self.dtype();
        if got != want {
            return Err(KernelError::DType {
                op,
                expected: want,
                got,
            });
        }
        Ok(())
    }

    /// Fails unless `self` has `rank` dimensions; `what` names the operand in the message.
    pub(crate) fn expect_rank(&self, op: &'static str, what: &str, rank: usize) -> Result<()> {
        if self.rank() != rank {
            return Err(KernelError::shape(
                op,
                format!("{what} must have {rank} dims, got shape {:?}", self.shape()),
            ));
        }
        Ok(())
    }

    /// Fails unless `self` has exactly `shape`; `what` names the operand in the message.
    pub(crate) fn expect_shape(&self, op: &'static str, what: &str, shape: &[usize]) -> Result<()> {
        if self.shape() != shape {
            return Err(KernelError::shape(
                op,
                format!("{what} must have shape {shape:?}, got {:?}", self.shape()),
            ));
        }
        Ok(())
    }

    /// The common device of `tensors`, or an error naming the first two that differ.
    pub(crate) fn common_device(op: &'static str, tensors: &[&Tensor]) -> Result<Device> {
        let first = tensors.first().map(|t| t.device()).unwrap_or(Device::Cpu);
        for t in tensors {
            if t.device() != first {
                return Err(KernelError::DeviceMismatch {
                    op,
                    a: first,
                    b: t.device(),
                });
            }
        }
        Ok(first)
    }

    // ----------------------------------------------------------------------------------------------------------
    // Construction and read-back.

    /// An f32 tensor of `shape` holding `data` (row-major).
    pub fn from_f32(data: Vec<f32>, shape: &[usize], device: &Device) -> Result<Tensor> {
        check_len(data.len(), shape)?;
        if let Some(dev) = cuda_dev(device)? {
            let s = crate::cuda::storage::CudaStorage::from_f32(&dev, &data, shape)?;
            return Ok(Tensor::from_cuda(s));
        }
        let t = candle_core::Tensor::from_vec(data, shape, &candle_device(device)?)?;
        Ok(Tensor::from_cpu(t))
    }

    /// `data` as a `dtype` tensor on `device`: uploaded as f32, then cast (f32 → bf16 rounds to nearest even).
    /// How host results (collectives on host vectors) come back in the dtype of the tensors they replace.
    pub fn from_f32_as(data: Vec<f32>, shape: &[usize], device: &Device, dtype: DType) -> Result<Tensor> {
        let t = Tensor::from_f32(data, shape, device)?;
        if t.dtype() == dtype { Ok(t) } else { t.to_dtype(dtype) }
    }

    /// A u32 tensor of `shape` holding `data` (ids, positions, indices).
    pub fn from_u32(data: Vec<u32>, shape: &[usize], device: &Device) -> Result<Tensor> {
        check_len(data.len(), shape)?;
        if let Some(dev) = cuda_dev(device)? {
            let s = crate::cuda::storage::CudaStorage::from_u32(&dev, &data, shape)?;
            return Ok(Tensor::from_cuda(s));
        }
        let t = candle_core::Tensor::from_vec(data, shape, &candle_device(device)?)?;
        Ok(Tensor::from_cpu(t))
    }

    /// A tensor of `shape` filled with zeros.
    pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        if let Some(dev) = cuda_dev(device)? {
            let s = crate::cuda::storage::CudaStorage::zeros(&dev, shape, dtype)?;
            return Ok(Tensor::from_cuda(s));
        }
        let t = candle_core::Tensor::zeros(shape, dtype.to_candle(), &candle_device(device)?)?;
        Ok(Tensor::from_cpu(t))
    }

    /// An f32 tensor of `shape` filled with `value`.
    pub fn full(value: f32, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        Tensor::from_f32(vec![value; n], shape, device)
    }

    /// All elements as f32, row-major (bf16 is widened; u32 is rejected).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        if let Storage::Cuda(s) = &self.storage
            && matches!(s.dtype(), DType::F32 | DType::BF16)
        {
            return s.to_f32();
        }
        match self.dtype() {
            DType::F32 | DType::BF16 => {
                let t = self
                    .cpu()?
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?;
                Ok(t.to_vec1::<f32>()?)
            }
            got => Err(KernelError::DType {
                op: "to_vec_f32",
                expected: DType::F32,
                got,
            }),
        }
    }

    /// All elements of a u32 tensor, row-major.
    pub fn to_vec_u32(&self) -> Result<Vec<u32>> {
        self.expect_dtype("to_vec_u32", DType::U32)?;
        if let Storage::Cuda(s) = &self.storage {
            return s.to_u32();
        }
        Ok(self.cpu()?.flatten_all()?.to_vec1::<u32>()?)
    }

    // ----------------------------------------------------------------------------------------------------------
    // Metadata.

    /// Dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        match &self.storage {
            Storage::Cpu(t) => t.dims(),
            Storage::Cuda(s) => s.shape(),
        }
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape().len()
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape().iter().product()
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Cpu(t) => {
                DType::from_candle(t.dtype()).expect("only DType values are ever stored")
            }
            Storage::Cuda(s) => s.dtype(),
        }
    }

    /// Where the data lives.
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => s.dev().device(),
        }
    }

    // ----------------------------------------------------------------------------------------------------------
    // Layout.

    /// Same data, new shape with the same element count. The result is contiguous.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.elem_count() {
            return Err(KernelError::shape(
                "reshape",
                format!(
                    "cannot reshape {:?} ({} elements) to {shape:?} ({n})",
                    self.shape(),
                    self.elem_count()
                ),
            ));
        }
        if let Storage::Cuda(s) = &self.storage {
            return Ok(Tensor::from_cuda(s.reshaped(shape)));
        }
        Ok(Tensor::from_cpu(self.cpu()?.contiguous()?.reshape(shape)?))
    }

    /// Swaps two dimensions; the result is contiguous.
    pub fn transpose(&self, d1: usize, d2: usize) -> Result<Tensor> {
        if d1 >= self.rank() || d2 >= self.rank() {
            return Err(KernelError::invalid(
                "transpose",
                format!("dims {d1},{d2} for shape {:?}", self.shape()),
            ));
        }
        if self.is_cuda() {
            return crate::cuda::ops::transpose(self, d1, d2);
        }
        Ok(Tensor::from_cpu(
            self.cpu()?.transpose(d1, d2)?.contiguous()?,
        ))
    }

    /// Elements `start..start+len` along `dim`, as a contiguous tensor.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        if dim >= self.rank() || start + len > self.shape()[dim] {
            return Err(KernelError::invalid(
                "narrow",
                format!(
                    "dim {dim} range {start}..{} of shape {:?}",
                    start + len,
                    self.shape()
                ),
            ));
        }
        if self.is_cuda() {
            return crate::cuda::ops::narrow(self, dim, start, len);
        }
        Ok(Tensor::from_cpu(
            self.cpu()?.narrow(dim, start, len)?.contiguous()?,
        ))
    }

    /// Concatenates `tensors` along `dim`; all other dims must agree.
    pub fn cat(tensors: &[&Tensor], dim: usize) -> Result<Tensor> {
        if tensors.is_empty() {
            return Err(KernelError::invalid("cat", "no tensors"));
        }
        Tensor::common_device("cat", tensors)?;
        if tensors[0].is_cuda() {
            return crate::cuda::ops::cat(tensors, dim);
        }
        let cs = tensors
            .iter()
            .map(|t| t.cpu())
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::from_cpu(candle_core::Tensor::cat(&cs, dim)?))
    }

    /// Casts to `dtype` (f32 ↔ bf16 round to nearest even; u32 → f32 is exact below 2^24).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if self.is_cuda() {
            return crate::cuda::ops::cast(self, dtype);
        }
        Ok(Tensor::from_cpu(self.cpu()?.to_dtype(dtype.to_candle())?))
    }

    /// A copy of this tensor on `device` (same dtype; a clone when it is already there). Host↔device copies
    /// wait for completion; GPU↔GPU goes through the host.
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device() == *device {
            return Ok(self.clone());
        }
        let shape = self.shape().to_vec();
        match (self.dtype(), cuda_dev(device)?) {
            (DType::U32, None) => Tensor::from_u32(self.to_vec_u32()?, &shape, device),
            (DType::F32, None) => Tensor::from_f32(self.to_vec_f32()?, &shape, device),
            (DType::BF16, None) => {
                Tensor::from_f32(self.to_vec_f32()?, &shape, device)?.to_dtype(DType::BF16)
            }
            (DType::U32, Some(dev)) => Ok(Tensor::from_cuda(
                crate::cuda::storage::CudaStorage::from_u32(&dev, &self.to_vec_u32()?, &shape)?,
            )),
            (DType::F32, Some(dev)) => Ok(Tensor::from_cuda(
                crate::cuda::storage::CudaStorage::from_f32(&dev, &self.to_vec_f32()?, &shape)?,
            )),
            (DType::BF16, Some(dev)) => Ok(Tensor::from_cuda(
                crate::cuda::storage::CudaStorage::from_f32_as_bf16(
                    &dev,
                    &self.to_vec_f32()?,
                    &shape,
                )?,
            )),
        }
    }

    // ----------------------------------------------------------------------------------------------------------
    // Elementwise arithmetic (same shape, same dtype, no broadcasting).

    fn binary<'a>(
        &'a self,
        op: &'static str,
        rhs: &'a Tensor,
    ) -> Result<(&'a candle_core::Tensor, &'a candle_core::Tensor)> {
        Tensor::common_device(op, &[self, rhs])?;
        if self.shape() != rhs.shape() {
            return Err(KernelError::shape(
                op,
                format!("{:?} vs {:?}", self.shape(), rhs.shape()),
            ));
        }
        if self.dtype() != rhs.dtype() {
            return Err(KernelError::DType {
                op,
                expected: self.dtype(),
                got: rhs.dtype(),
            });
        }
        Ok((self.cpu()?, rhs.cpu()?))
    }

    /// Checks shapes and dtypes, then runs the CUDA kernel `op` (`add`, `sub`, `mul`) when `self` is on a GPU.
    fn cuda_binary(&self, op: &'static str, rhs: &Tensor) -> Option<Result<Tensor>> {
        if !self.is_cuda() && !rhs.is_cuda() {
            return None;
        }
        Some((|| {
            Tensor::common_device(op, &[self, rhs])?;
            if self.shape() != rhs.shape() {
                return Err(KernelError::shape(
                    op,
                    format!("{:?} vs {:?}", self.shape(), rhs.shape()),
                ));
            }
            crate::cuda::ops::binary(op, self, rhs)
        })())
    }

    /// `self + rhs`.
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        if let Some(r) = self.cuda_binary("add", rhs) {
            return r;
        }
        let (a, b) = self.binary("add", rhs)?;
        Ok(Tensor::from_cpu(a.add(b)?))
    }

    /// `self - rhs`.
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        if let Some(r) = self.cuda_binary("sub", rhs) {
            return r;
        }
        let (a, b) = self.binary("sub", rhs)?;
        Ok(Tensor::from_cpu(a.sub(b)?))
    }

    /// `self ⊙ rhs` (elementwise product).
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        if let Some(r) = self.cuda_binary("mul", rhs) {
            return r;
        }
        let (a, b) = self.binary("mul", rhs)?;
        Ok(Tensor::from_cpu(a.mul(b)?))
    }

    /// `s · self`.
    pub fn scale(&self, s: f32) -> Result<Tensor> {
        if self.is_cuda() {
            return crate::cuda::ops::scale(self, s);
        }
        Ok(Tensor::from_cpu(self.cpu()?.affine(s as f64, 0.0)?))
    }

    /// `self ← self + rhs` (gradient accumulation).
    pub fn add_assign(&mut self, rhs: &Tensor) -> Result<()> {
        *self = self.add(rhs)?;
        Ok(())
    }

    // ----------------------------------------------------------------------------------------------------------
    // Reductions (read back to the host).

    /// Σ of all elements of an f32 tensor, accumulated in f64 on the host.
    pub fn sum_all(&self) -> Result<f64> {
        self.expect_dtype("sum_all", DType::F32)?;
        Ok(self.to_vec_f32()?.iter().map(|&v| v as f64).sum())
    }

    /// Σ x² of all elements of an f32 tensor (squared L2 norm), accumulated in f64.
    pub fn sqr_sum(&self) -> Result<f64> {
        self.expect_dtype("sqr_sum", DType::F32)?;
        Ok(self
            .to_vec_f32()?
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum())
    }

    /// Mean of all elements of an f32 tensor, accumulated in f64.
    pub fn mean_all(&self) -> Result<f64> {
        let n = self.elem_count();
        if n == 0 {
            return Err(KernelError::invalid("mean_all", "empty tensor"));
        }
        Ok(self.sum_all()? / n as f64)
    }

    /// Σ over dimension 0: `[n, rest…] → [rest…]`.
    pub fn sum_dim0(&self) -> Result<Tensor> {
        if self.rank() == 0 {
            return Err(KernelError::invalid("sum_dim0", "scalar tensor"));
        }
        if self.is_cuda() {
            return crate::cuda::ops::sum_dim0(self);
        }
        Ok(Tensor::from_cpu(self.cpu()?.sum(0)?))
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({:?}, {}, {})",
            self.shape(),
            self.dtype(),
            self.device()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_round_trip_and_metadata() {
        let data: Vec<f32> = (0..6).map(|i| 0.25 * i as f32 - 0.3).collect();
        let t = Tensor::from_f32(data.clone(), &[2, 3], &Device::Cpu).unwrap();
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(t.device(), Device::Cpu);
        assert_eq!(t.to_vec_f32().unwrap(), data);
        let ids = Tensor::from_u32(vec![3, 1, 4], &[3], &Device::Cpu).unwrap();
        assert_eq!(ids.dtype(), DType::U32);
        assert_eq!(ids.to_vec_u32().unwrap(), vec![3, 1, 4]);
        assert!(matches!(ids.to_vec_f32(), Err(KernelError::DType { .. })));
    }

    #[test]
    fn wrong_length_and_cuda_are_typed_errors() {
        let e = Tensor::from_f32(vec![1.5; 5], &[2, 3], &Device::Cpu).unwrap_err();
        assert!(
            matches!(
                e,
                KernelError::HostData {
                    len: 5,
                    expected: 6,
                    ..
                }
            ),
            "{e}"
        );
        let e = Tensor::zeros(&[2], DType::F32, &Device::Cuda(0)).unwrap_err();
        assert!(matches!(e, KernelError::DeviceUnavailable { .. }), "{e}");
    }

    #[test]
    fn arithmetic_layout_and_reductions() {
        let a = Tensor::from_f32(vec![1.5, -2.0, 3.25, 0.5], &[2, 2], &Device::Cpu).unwrap();
        let b = Tensor::from_f32(vec![0.5, 4.0, -1.25, 2.0], &[2, 2], &Device::Cpu).unwrap();
        assert_eq!(
            a.add(&b).unwrap().to_vec_f32().unwrap(),
            vec![2.0, 2.0, 2.0, 2.5]
        );
        assert_eq!(
            a.sub(&b).unwrap().to_vec_f32().unwrap(),
            vec![1.0, -6.0, 4.5, -1.5]
        );
        assert_eq!(
            a.mul(&b).unwrap().to_vec_f32().unwrap(),
            vec![0.75, -8.0, -4.0625, 1.0]
        );
        assert_eq!(
            a.scale(2.0).unwrap().to_vec_f32().unwrap(),
            vec![3.0, -4.0, 6.5, 1.0]
        );
        assert_eq!(
            a.transpose(0, 1).unwrap().to_vec_f32().unwrap(),
            vec![1.5, 3.25, -2.0, 0.5]
        );
        assert_eq!(
            a.narrow(1, 1, 1).unwrap().to_vec_f32().unwrap(),
            vec![-2.0, 0.5]
        );
        assert_eq!(Tensor::cat(&[&a, &b], 0).unwrap().shape(), &[4, 2]);
        assert_eq!(
            a.sum_dim0().unwrap().to_vec_f32().unwrap(),
            vec![4.75, -1.5]
        );
        assert_eq!(a.sum_all().unwrap(), 3.25);
        assert_eq!(a.sqr_sum().unwrap(), 1.5 * 1.5 + 4.0 + 3.25 * 3.25 + 0.25);
        let mut c = a.clone();
        c.add_assign(&b).unwrap();
        assert_eq!(c.to_vec_f32().unwrap(), vec![2.0, 2.0, 2.0, 2.5]);
        assert_eq!(
            a.to_vec_f32().unwrap()[0],
            1.5,
            "add_assign must not alias the clone"
        );
        assert!(matches!(
            a.add(&a.reshape(&[4]).unwrap()),
            Err(KernelError::Shape { .. })
        ));
        assert!(a.reshape(&[3]).is_err());
    }

    #[test]
    fn bf16_cast_rounds_to_nearest() {
        // 1 + 2^-9 is not representable in bf16 (7 mantissa bits) and rounds to 1.0; 1 + 2^-7 is exact.
        let a = Tensor::from_f32(
            vec![1.0 + 1.0 / 512.0, 1.0 + 1.0 / 128.0, -3.0],
            &[3],
            &Device::Cpu,
        )
        .unwrap();
        let b = a.to_dtype(DType::BF16).unwrap();
        assert_eq!(b.dtype(), DType::BF16);
        assert_eq!(b.to_vec_f32().unwrap(), vec![1.0, 1.0 + 1.0 / 128.0, -3.0]);
        assert_eq!(b.to_dtype(DType::F32).unwrap().dtype(), DType::F32);
    }
}
