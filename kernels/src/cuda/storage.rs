//! The device side of a [`Tensor`](crate::Tensor): a reference-counted device buffer, a shape and a dtype.
//!
//! Invariants: the buffer holds at least `elem_count · dtype size` bytes, densely row-major; storages are never
//! written after the op that created them returns (ops always allocate fresh outputs), so sharing a buffer
//! between clones and reshapes is safe. Exceptions, updated in place (stream-ordered) by owners that hold them
//! exclusively: the inference KV-cache pools ([`crate::ops::kv_cache_write`]) and the optimizer state and weights
//! of [`crate::ops::adamw::adamw_step_multi`].

use std::sync::Arc;

use half::bf16;

use super::device::{CudaDev, DevBuf};
use crate::device::DType;
use crate::error::Result;

/// See the module docs.
#[derive(Clone, Debug)]
pub struct CudaStorage {
    buf: Arc<DevBuf>,
    shape: Vec<usize>,
    dtype: DType,
}

impl CudaStorage {
    /// A fresh, uninitialised storage of `shape` and `dtype` on `dev`.
    pub fn alloc(dev: &Arc<CudaDev>, shape: &[usize], dtype: DType) -> Result<Self> {
        let n: usize = shape.iter().product();
        let buf = dev.alloc(n * dtype.size_in_bytes())?;
        Ok(CudaStorage {
            buf: Arc::new(buf),
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// A zero-filled storage.
    pub fn zeros(dev: &Arc<CudaDev>, shape: &[usize], dtype: DType) -> Result<Self> {
        let s = Self::alloc(dev, shape, dtype)?;
        dev.memset_zero(s.ptr(), s.bytes())?;
        Ok(s)
    }

    /// Uploads f32 host data.
    pub fn from_f32(dev: &Arc<CudaDev>, data: &[f32], shape: &[usize]) -> Result<Self> {
        let s = Self::alloc(dev, shape, DType::F32)?;
        dev.htod(s.ptr(), data)?;
        Ok(s)
    }

    /// Uploads f32 host data rounded to bf16 (nearest even).
    pub fn from_f32_as_bf16(dev: &Arc<CudaDev>, data: &[f32], shape: &[usize]) -> Result<Self> {
        let s = Self::alloc(dev, shape, DType::BF16)?;
        let h: Vec<u16> = data.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        dev.htod(s.ptr(), &h)?;
        Ok(s)
    }

    /// Uploads u32 host data.
    pub fn from_u32(dev: &Arc<CudaDev>, data: &[u32], shape: &[usize]) -> Result<Self> {
        let s = Self::alloc(dev, shape, DType::U32)?;
        dev.htod(s.ptr(), data)?;
        Ok(s)
    }

    /// Downloads as f32 (bf16 widened exactly). The caller checks the dtype is F32 or BF16.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let n = self.elem_count();
        match self.dtype {
            DType::BF16 => {
                let mut h = vec![0u16; n];
                self.dev().dtoh(&mut h, self.ptr())?;
                Ok(h.into_iter().map(|b| bf16::from_bits(b).to_f32()).collect())
            }
            _ => {
                let mut h = vec![0f32; n];
                self.dev().dtoh(&mut h, self.ptr())?;
                Ok(h)
            }
        }
    }

    /// Downloads the raw 32-bit words (u32 data).
    pub fn to_u32(&self) -> Result<Vec<u32>> {
        let mut h = vec![0u32; self.elem_count()];
        self.dev().dtoh(&mut h, self.ptr())?;
        Ok(h)
    }

    /// Same buffer, new shape (same element count: the caller checks).
    pub fn reshaped(&self, shape: &[usize]) -> Self {
        CudaStorage {
            buf: self.buf.clone(),
            shape: shape.to_vec(),
            dtype: self.dtype,
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> usize {
        self.elem_count() * self.dtype.size_in_bytes()
    }

    /// Device address of element 0.
    pub fn ptr(&self) -> u64 {
        self.buf.ptr()
    }

    pub fn dev(&self) -> &Arc<CudaDev> {
        self.buf.dev()
    }
}
