//! Row-major GEMMs on cuBLASLt: `C [M, N] = op(A)·op(B) (+ C when accumulating)`, f32 accumulation.
//!
//! cuBLASLt is column-major; a row-major `C = op(A)·op(B)` is the column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`, so the
//! call swaps the operands and keeps each one's transpose flag (a row-major `[r, c]` buffer is a column-major
//! `[c, r]` one with leading dimension `c`).
//!
//! Supported dtypes: inputs both BF16 or both F32; output BF16 or F32 (BF16 inputs with an F32 output give the
//! f32 weight gradients of mixed precision). F32 inputs compute in full f32 (no TF32), BF16 inputs on the tensor
//! cores. One descriptor set and algorithm per shape is cached, so steady-state calls do only the matmul.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::result as lr;
use cudarc::cublaslt::sys as ls;

use super::CudaError;
use super::device::{CudaDev, DevBuf};
use crate::device::DType;
use crate::error::{KernelError, Result};

const WORKSPACE: usize = 32 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    m: u64,
    n: u64,
    k: u64,
    ta: bool,
    tb: bool,
    ab: DType,
    c: DType,
    /// Smallest power-of-two alignment (bytes, ≤ 256) of the three pointers: grouped GEMMs pass row offsets.
    align: u32,
}

fn alignment(ptrs: &[u64]) -> u32 {
    ptrs.iter()
        .map(|&p| {
            if p == 0 {
                256
            } else {
                (1u64 << p.trailing_zeros().min(8)) as u32
            }
        })
        .min()
        .unwrap_or(256)
}

struct Plan {
    desc: ls::cublasLtMatmulDesc_t,
    a: ls::cublasLtMatrixLayout_t,
    b: ls::cublasLtMatrixLayout_t,
    c: ls::cublasLtMatrixLayout_t,
    algo: ls::cublasLtMatmulAlgo_t,
}

/// cuBLASLt state of one device: handle, workspace, cached plans.
pub struct Lt {
    handle: ls::cublasLtHandle_t,
    ws: DevBuf,
    plans: HashMap<PlanKey, Plan>,
}

fn lt_err(e: lr::CublasError) -> KernelError {
    KernelError::Cuda(CudaError::from(e))
}

fn data_type(op: &'static str, d: DType) -> Result<ls::cudaDataType> {
    match d {
        DType::F32 => Ok(ls::cudaDataType::CUDA_R_32F),
        DType::BF16 => Ok(ls::cudaDataType::CUDA_R_16BF),
        DType::U32 => Err(super::unsupported(op, "u32 GEMM")),
    }
}

impl Lt {
    pub(crate) fn new(dev: &Arc<CudaDev>) -> Result<Self> {
        // SAFETY: only checks that the library can be dlopened.
        if !unsafe { ls::is_culib_present() } {
            return Err(KernelError::Cuda(CudaError::Missing(
                "libcublasLt.so cannot be loaded: install CUDA 13 or the nvidia-cublas wheel and put its lib folder \
                 on LD_LIBRARY_PATH"
                    .into(),
            )));
        }
        let handle = lr::create_handle().map_err(lt_err)?;
        let ws = dev.alloc(WORKSPACE)?;
        Ok(Lt {
            handle,
            ws,
            plans: HashMap::new(),
        })
    }

    fn plan(&mut self, key: PlanKey) -> Result<&Plan> {
        if !self.plans.contains_key(&key) {
            let op = "gemm";
            let ab = data_type(op, key.ab)?;
            let ct = data_type(op, key.c)?;
            let desc = lr::create_matmul_desc(
                ls::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                ls::cudaDataType::CUDA_R_32F,
            )
            .map_err(lt_err)?;
            // Column-major problem: C' [N, M] = op(B') [N, K] · op(A') [K, M] with A' = row-major B, B' = row-major A.
            let (m, n, k) = (key.n, key.m, key.k);
            let ta = key.tb as i32;
            let tb = key.ta as i32;
            // SAFETY: `desc` is a fresh descriptor; the attribute values are i32 as cuBLASLt expects.
            unsafe {
                lr::set_matmul_desc_attribute(
                    desc,
                    ls::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    &ta as *const i32 as *const c_void,
                    4,
                )
                .map_err(lt_err)?;
                lr::set_matmul_desc_attribute(
                    desc,
                    ls::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                    &tb as *const i32 as *const c_void,
                    4,
                )
                .map_err(lt_err)?;
            }
            // Stored (pre-op) shapes, column-major.
            let (ar, ac) = if ta == 0 { (m, k) } else { (k, m) };
            let (br, bc) = if tb == 0 { (k, n) } else { (n, k) };
            let a = lr::create_matrix_layout(ab, ar, ac, ar as i64).map_err(lt_err)?;
            let b = lr::create_matrix_layout(ab, br, bc, br as i64).map_err(lt_err)?;
            let c = lr::create_matrix_layout(ct, m, n, m as i64).map_err(lt_err)?;
            let pref = lr::create_matmul_pref().map_err(lt_err)?;
            let ws = WORKSPACE as u64;
            // SAFETY: all descriptors are fresh and valid; the attribute is a u64 byte count.
            let heur = unsafe {
                lr::set_matmul_pref_attribute(
                    pref,
                    ls::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const c_void,
                    8,
                )
                .map_err(lt_err)?;
                for attr in [
                    ls::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    ls::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    ls::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    ls::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                ] {
                    lr::set_matmul_pref_attribute(
                        pref,
                        attr,
                        &key.align as *const u32 as *const c_void,
                        4,
                    )
                    .map_err(lt_err)?;
                }
                let h = lr::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref);
                let _ = lr::destroy_matmul_pref(pref);
                h
            }
            .map_err(|e| {
                super::unsupported(
                    op,
                    format!("no cuBLASLt algorithm for {key:?}: {e:?}"),
                )
            })?;
            self.plans.insert(
                key,
                Plan {
                    desc,
                    a,
                    b,
                    c,
                    algo: heur.algo,
                },
            );
        }
        Ok(self.plans.get(&key).expect("inserted above"))
    }

    /// Row-major `C [M, N] = op(A)·op(B) + beta·C`, where `A` is stored `[M, K]` (`[K, M]` when `ta`) and `B`
    /// is stored `[K, N]` (`[N, K]` when `tb`).
    ///
    /// The caller guarantees the three pointers address buffers of those sizes in dtypes `ab`, `ab`, `c`, on
    /// the device `stream` belongs to.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &mut self,
        stream: cudarc::driver::sys::CUstream,
        a: u64,
        b: u64,
        c: u64,
        (m, n, k): (usize, usize, usize),
        (ta, tb): (bool, bool),
        (ab, ct): (DType, DType),
        beta: f32,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let key = PlanKey {
            m: m as u64,
            n: n as u64,
            k: k as u64,
            ta,
            tb,
            ab,
            c: ct,
            align: alignment(&[a, b, c]),
        };
        let ws_ptr = self.ws.ptr();
        let handle = self.handle;
        let plan = self.plan(key)?;
        let alpha = 1.0f32;
        // SAFETY: the plan's descriptors match the shapes; operand buffers are the caller's contract; the
        // workspace buffer has WORKSPACE bytes and lives as long as `self`; the stream belongs to the device whose
        // context is current (the caller bound it).
        unsafe {
            lr::matmul(
                handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                b as *const c_void,
                plan.a,
                a as *const c_void,
                plan.b,
                c as *const c_void,
                plan.c,
                c as *mut c_void,
                plan.c,
                &plan.algo,
                ws_ptr as *mut c_void,
                WORKSPACE,
                stream as ls::cudaStream_t,
            )
        }
        .map_err(lt_err)
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: each descriptor and the handle are destroyed once; nothing uses them afterwards.
        unsafe {
            for (_, p) in self.plans.drain() {
                let _ = lr::destroy_matrix_layout(p.a);
                let _ = lr::destroy_matrix_layout(p.b);
                let _ = lr::destroy_matrix_layout(p.c);
                let _ = lr::destroy_matmul_desc(p.desc);
            }
            let _ = lr::destroy_handle(self.handle);
        }
    }
}
