//! Context parallelism (CP): the sequence dimension split over the `cp` ranks of a CP group, with causal load
//! balancing, attention across the chunks by an all-gather of K/V, and — in [`CpEpModel`] — the driver that runs
//! the Qwen3 model under `dp × cp × ep × etp` (with `tp = pp = 1`), composing CP with the expert parallelism of
//! [`crate::expert_parallel`].
//!
//! # Chunks (causal load balance)
//!
//! A row of `S` tokens is cut into `2·cp` chunks of `c = S/(2·cp)` tokens (`S % 2·cp == 0`, else
//! [`CpError::SeqNotDivisible`]); CP rank `i` holds chunks `i` and `2·cp−1−i`, concatenated ([`CpLayout`]):
//! ```text
//! local token j ∈ [0, S/cp)  ↦  global index  g_i(j) = i·c + j                     (j < c)
//!                                              (2·cp−1−i)·c + (j − c)         (j ≥ c)
//! ```
//! Under a causal mask the work of a query grows with its index, so pairing an early with a late chunk gives every
//! rank the same number of (query, key) pairs: `c·(i·c + c/2) + c·((2cp−1−i)·c + c/2) ∝ 2cp·c²`, independent of `i`.
//!
//! Every per-token input moves with its token ([`shard_batch`]): ids, **position ids** (so RoPE rotates each token
//! by its own position, which restarts inside packed samples), targets, loss weights, segment ids. Nothing is
//! recomputed from the local index.
//!
//! # Attention across chunks: all-gather K/V, reduce-scatter dK/dV
//!
//! Everything except attention is per token and runs on the local `S/cp` tokens unchanged. Attention
//! ([`CpAttention`], an [`AttentionCore`] plugged into the unchanged
//! [`Attention`](crate::model::Attention) block):
//! ```text
//! q, k, v  = the local projections (+ q/k norm, RoPE)           [B, S/cp, H, D]
//! K, V     = AG_cp(k, v), reordered to the global order          [B, S, Hkv, D]   (one all-gather for both)
//! O        = softmax(scale·q·Kᵀ + M)·V,   M_ij = 0 iff g(j) ≤ g(i) ∧ seg_q(i) = seg_k(j), else −∞
//! ```
//! The mask is computed on **global** sequence indices (query `g_i(j)`, key `0..S`), not on RoPE positions, and on
//! the global segment ids of the row, so packed samples never see each other across chunk boundaries
//! ([`qkernels::ops::attention_fwd_indexed`]). The query rows of rank `i` are exactly the rows `g_i(·)` of the
//! single-device attention, with the same keys, values and mask, so `O` is those rows of the single-device output.
//!
//! Backward: `dq`, `dK`, `dV` from the indexed backward, where `dK`, `dV` hold only the contributions of the local
//! queries; the true `dk` of a local key is the sum over every rank's queries, so
//! ```text
//! (dk, dv) = RS_cp(reorder⁻¹(dK, dV))                                  [B, S/cp, Hkv, D]
//! ```
//! **The conjugate pair.** With `⟨u, v⟩ = Σ_ranks ⟨u_r, v_r⟩`, the forward map is `G = P ∘ AG` (`AG` the
//! all-gather of the `cp` local blocks, `P` the fixed permutation from rank-major to global order). All-gather and
//! reduce-scatter-sum are adjoint ([`crate::comm`]) and a permutation's adjoint is its inverse, so
//! `Gᵀ = AGᵀ ∘ Pᵀ = RS ∘ P⁻¹`: the backward of the K/V all-gather is the reduce-scatter of the reordered gradients.
//! (`∂L/∂k_r = Σ_{ranks q} ∂L_q/∂K[block r]`, since every rank's queries read `k_r`.)
//!
//! # Loss, statistics, gradients
//!
//! - The CE is normalised by the weight sum `W` of the **global** batch: `W = Σ_{dp×cp ranks} Σ_local w`
//!   (all-reduced over the dp-cp group), each rank computes `Σ_local w·CE/W`, and the reported loss is the sum
//!   over dp-cp. Then `∂L/∂logits` on every rank is exactly the single-device gradient's rows.
//! - MoE routing statistics are sums over tokens, all-reduced over dp-cp before the aux loss (see
//!   [`crate::expert_parallel`]).
//! - Gradients: every rank's gradients are the partial sums over its own tokens, so the weights replicated over
//!   dp × cp (everything but the experts) are **summed over the dp-cp group** — Megatron folds cp into the
//!   data-parallel gradient reduction the same way (`dp_cp` group); the expert shards are summed over the expert-dp
//!   group ([`CpEpModel::reduce_grads`]).
//!
//! # Limits
//!
//! - `tp = pp = 1`: composing with tensor/sequence and pipeline parallelism is not wired ([`CpError::Unsupported`]).
//! - The indexed attention has only the CPU reference (CUDA operands go through the host); K/V travel through host
//!   buffers (the CPU communicator); the gathered `[B, S, Hkv, D]` K/V are kept for backward (memory `cp×` the
//!   local K/V, like Megatron's all-gather CP). No activation recomputation in [`CpEpModel`].
//! - `W`, the loss sum and the routing statistics travel as f32 (exact for integer weights up to 2²⁴ tokens).

mod model;

use qkernels::ops::{self, AttentionGrads, AttentionIndex, AttentionOut};
use qkernels::{Device, Tensor};
use thiserror::Error;

use crate::comm::{CommError, CommExt, Communicator, ReduceOp};
use crate::dims::DimsError;
use crate::expert_parallel::EpError;
use crate::model::attention::AttentionCore;
use crate::model::{Batch, ModelError};
use crate::tensor_parallel::TpError;
use crate::zero::ZeroError;

pub use model::{CpEpGroups, CpEpModel, CpEpStepOutput};

/// Errors of context parallelism and of the [`CpEpModel`] driver.
#[derive(Debug, Error)]
pub enum CpError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Dims(#[from] DimsError),
    #[error("collective failed: {0}")]
    Comm(#[from] CommError),
    #[error(transparent)]
    Ep(#[from] EpError),
    #[error(transparent)]
    Tp(#[from] TpError),
    #[error(transparent)]
    Zero(#[from] ZeroError),
    /// A parallel dimension the driver does not implement (tp, pp, vpp > 1).
    #[error("unsupported parallel layout: {0}")]
    Unsupported(String),
    /// The communicators handed in do not match the layout.
    #[error("process groups do not match the layout: {0}")]
    Groups(String),
    /// The sequence length does not split into `2·cp` chunks.
    #[error("sequence length {seq} is not divisible by 2·cp({cp}) = {} (causal load balancing)", 2 * cp)]
    SeqNotDivisible { seq: usize, cp: usize },
    /// A tensor given as a full or local parameter / gradient has the wrong shape or is missing.
    #[error("parameter `{name}`: {detail}")]
    Shard { name: String, detail: String },
}

impl From<qkernels::KernelError> for CpError {
    fn from(e: qkernels::KernelError) -> Self {
        CpError::Model(ModelError::Kernel(e))
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, CpError>;

/// The chunk layout of one CP rank (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpLayout {
    /// `S`: tokens per row of the full sequence.
    pub seq: usize,
    pub cp: usize,
    /// This rank's position in the CP group.
    pub rank: usize,
}

impl CpLayout {
    /// Checks `S % 2·cp == 0`, `S > 0` and `rank < cp`.
    pub fn new(seq: usize, cp: usize, rank: usize) -> Result<Self> {
        if cp == 0 || rank >= cp {
            return Err(CpError::Groups(format!("cp rank {rank} of {cp}")));
        }
        if seq == 0 || !seq.is_multiple_of(2 * cp) {
            return Err(CpError::SeqNotDivisible { seq, cp });
        }
        Ok(CpLayout { seq, cp, rank })
    }

    /// `c = S/(2·cp)`.
    pub fn chunk(&self) -> usize {
        self.seq / (2 * self.cp)
    }

    /// `S/cp`: tokens per row on each rank.
    pub fn local_len(&self) -> usize {
        self.seq / self.cp
    }

    /// `g_r(j)`: the global index of local token `j` of CP rank `r`.
    pub fn global_index_of(&self, r: usize, j: usize) -> usize {
        let c = self.chunk();
        if j < c {
            r * c + j
        } else {
            (2 * self.cp - 1 - r) * c + (j - c)
        }
    }

    /// `g_rank(0..S/cp)`: this rank's global indices, in local order.
    pub fn local_indices(&self) -> Vec<usize> {
        (0..self.local_len())
            .map(|j| self.global_index_of(self.rank, j))
            .collect()
    }

    /// `(rank, j)` holding global index `s` (inverse of [`global_index_of`](Self::global_index_of)).
    pub fn owner(&self, s: usize) -> (usize, usize) {
        let c = self.chunk();
        let (chunk, off) = (s / c, s % c);
        if chunk < self.cp {
            (chunk, off)
        } else {
            (2 * self.cp - 1 - chunk, c + off)
        }
    }
}

/// One CP rank's share of a batch: its tokens as a [`Batch`] of `S/cp` tokens per row (in local order), the
/// layout, and the global segment ids the keys need.
#[derive(Debug, Clone, PartialEq)]
pub struct CpBatch {
    /// `batch` rows × `S/cp` tokens: ids, positions, targets, weights and segments of the local tokens.
    pub local: Batch,
    pub layout: CpLayout,
    /// `[batch·S]`: the segment ids of the whole rows (the keys' segments), when the batch is packed.
    pub key_segment_ids: Option<Vec<u32>>,
}

/// The tokens of CP rank `rank` (chunks `rank` and `2·cp−1−rank` of every row) of `global` (`batch × S`).
pub fn shard_batch(global: &Batch, cp: usize, rank: usize) -> Result<CpBatch> {
    let layout = CpLayout::new(global.seq, cp, rank)?;
    let idx = layout.local_indices();
    let (b, s) = (global.batch, global.seq);
    fn take<T: Copy>(v: &[T], b: usize, s: usize, idx: &[usize]) -> Vec<T> {
        (0..b)
            .flat_map(|r| idx.iter().map(move |&j| v[r * s + j]))
            .collect()
    }
    let local = Batch {
        batch: b,
        seq: layout.local_len(),
        input_ids: take(&global.input_ids, b, s, &idx),
        position_ids: take(&global.position_ids, b, s, &idx),
        segment_ids: global.segment_ids.as_ref().map(|g| take(g, b, s, &idx)),
        targets: take(&global.targets, b, s, &idx),
        loss_weights: take(&global.loss_weights, b, s, &idx),
    };
    Ok(CpBatch {
        local,
        layout,
        key_segment_ids: global.segment_ids.clone(),
    })
}

/// The CP [`AttentionCore`]: all-gather of K/V over the CP group, the index-masked attention, reduce-scatter of
/// dK/dV (see the module docs).
pub struct CpAttention<'a> {
    cp: &'a dyn Communicator,
    layout: CpLayout,
    batch: usize,
    /// `[S/cp]` (u32) global indices of the local queries.
    q_index: Tensor,
    /// `[S]` (u32): `0..S` (the gathered keys are put back in global order).
    k_index: Tensor,
    /// `[B, S/cp]` query and `[B, S]` key segment ids.
    segments: Option<(Tensor, Tensor)>,
}

impl<'a> CpAttention<'a> {
    /// The core for `batch` on `device`; `cp` must be the batch's CP group (size and rank checked).
    pub fn new(cp: &'a dyn Communicator, batch: &CpBatch, device: &Device) -> Result<Self> {
        let l = batch.layout;
        if cp.size() != l.cp || cp.rank() != l.rank {
            return Err(CpError::Groups(format!(
                "cp communicator is rank {} of {}, the batch was cut for rank {} of {}",
                cp.rank(),
                cp.size(),
                l.rank,
                l.cp
            )));
        }
        let u32s = |v: Vec<usize>| v.into_iter().map(|x| x as u32).collect::<Vec<_>>();
        let q_index = Tensor::from_u32(u32s(l.local_indices()), &[l.local_len()], device)?;
        let k_index = Tensor::from_u32(u32s((0..l.seq).collect()), &[l.seq], device)?;
        let b = batch.local.batch;
        let segments = match (&batch.local.segment_ids, &batch.key_segment_ids) {
            (Some(q), Some(k)) => Some((
                Tensor::from_u32(q.clone(), &[b, l.local_len()], device)?,
                Tensor::from_u32(k.clone(), &[b, l.seq], device)?,
            )),
            (None, None) => None,
            _ => {
                return Err(CpError::Model(ModelError::Batch(
                    "segment ids on the local tokens but not on the keys (or the reverse)".into(),
                )));
            }
        };
        Ok(CpAttention {
            cp,
            layout: l,
            batch: b,
            q_index,
            k_index,
            segments,
        })
    }

    fn index(&self) -> AttentionIndex<'_> {
        AttentionIndex {
            q_index: &self.q_index,
            k_index: &self.k_index,
            segments: self.segments.as_ref().map(|(q, k)| (q, k)),
        }
    }

    /// `(B, S/cp, Hkv·D)` of a local `[B, S/cp, Hkv, D]` tensor, checked.
    fn local_dims(&self, t: &Tensor, seq: usize) -> crate::model::Result<(usize, usize)> {
        match t.shape() {
            [b, s, h, d] if *b == self.batch && *s == seq => Ok((*h, *d)),
            s => Err(ModelError::Batch(format!(
                "context parallel attention: expected [{}, {seq}, heads, dim], got {s:?}",
                self.batch
            ))),
        }
    }
}

impl AttentionCore for CpAttention<'_> {
    /// `AG` then `P`: `[B, S/cp, Hkv, D]` local → `[B, S, Hkv, D]` global order (K and V in one all-gather).
    fn gather_kv(&self, k: &Tensor, v: &Tensor) -> crate::model::Result<(Tensor, Tensor)> {
        let l = &self.layout;
        let (sl, s, b) = (l.local_len(), l.seq, self.batch);
        let (h, d) = self.local_dims(k, sl)?;
        self.local_dims(v, sl)?;
        let hd = h * d;
        let piece = b * sl * hd;
        let mut send = k.to_vec_f32()?;
        send.extend(v.to_vec_f32()?);
        let all = self.cp.all_gather_vec(&send)?; // [cp][k|v][B][S/cp][hd]
        let (mut kf, mut vf) = (vec![0f32; b * s * hd], vec![0f32; b * s * hd]);
        for r in 0..l.cp {
            let base = r * 2 * piece;
            for bi in 0..b {
                for j in 0..sl {
                    let g = l.global_index_of(r, j);
                    let src = (bi * sl + j) * hd;
                    let dst = (bi * s + g) * hd;
                    kf[dst..dst + hd].copy_from_slice(&all[base + src..base + src + hd]);
                    vf[dst..dst + hd]
                        .copy_from_slice(&all[base + piece + src..base + piece + src + hd]);
                }
            }
        }
        let (dev, dt) = (k.device(), k.dtype());
        Ok((
            Tensor::from_f32_as(kf, &[b, s, h, d], &dev, dt)?,
            Tensor::from_f32_as(vf, &[b, s, h, d], &dev, dt)?,
        ))
    }

    /// `P⁻¹` then `RS`: `[B, S, Hkv, D]` (this rank's queries' contributions) → the local `[B, S/cp, Hkv, D]`
    /// summed over every rank's queries.
    fn gather_kv_backward(
        &self,
        dk: &Tensor,
        dv: &Tensor,
    ) -> crate::model::Result<(Tensor, Tensor)> {
        let l = &self.layout;
        let (sl, s, b) = (l.local_len(), l.seq, self.batch);
        let (h, d) = self.local_dims(dk, s)?;
        self.local_dims(dv, s)?;
        let hd = h * d;
        let piece = b * sl * hd;
        let (dkv, dvv) = (dk.to_vec_f32()?, dv.to_vec_f32()?);
        let mut buf = vec![0f32; l.cp * 2 * piece]; // [cp][k|v][B][S/cp][hd]
        for r in 0..l.cp {
            let base = r * 2 * piece;
            for bi in 0..b {
                for j in 0..sl {
                    let g = l.global_index_of(r, j);
                    let dst = base + (bi * sl + j) * hd;
                    let src = (bi * s + g) * hd;
                    buf[dst..dst + hd].copy_from_slice(&dkv[src..src + hd]);
                    buf[dst + piece..dst + piece + hd].copy_from_slice(&dvv[src..src + hd]);
                }
            }
        }
        let mine = self.cp.reduce_scatter_vec(&buf, ReduceOp::Sum)?; // [k|v][B][S/cp][hd]
        let (dev, dt) = (dk.device(), dk.dtype());
        Ok((
            Tensor::from_f32_as(mine[..piece].to_vec(), &[b, sl, h, d], &dev, dt)?,
            Tensor::from_f32_as(mine[piece..].to_vec(), &[b, sl, h, d], &dev, dt)?,
        ))
    }

    fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
    ) -> crate::model::Result<AttentionOut> {
        Ok(ops::attention_fwd_indexed(q, k, v, &self.index(), scale)?)
    }

    fn backward(
        &self,
        dout: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &AttentionOut,
        scale: f32,
    ) -> crate::model::Result<AttentionGrads> {
        Ok(ops::attention_bwd_indexed(
            dout,
            q,
            k,
            v,
            &out.out,
            &out.lse,
            &self.index(),
            scale,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_pair_early_with_late_and_cover_the_sequence() {
        // S = 16, cp = 2: chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
        let l0 = CpLayout::new(16, 2, 0).unwrap();
        let l1 = CpLayout::new(16, 2, 1).unwrap();
        assert_eq!(l0.local_indices(), vec![0, 1, 2, 3, 12, 13, 14, 15]);
        assert_eq!(l1.local_indices(), vec![4, 5, 6, 7, 8, 9, 10, 11]);
        for s in 0..16 {
            let (r, j) = l0.owner(s);
            assert_eq!(l0.global_index_of(r, j), s);
        }
        // Causal work balance: Σ over local queries of (index + 1) is the same on every rank.
        for cp in [2usize, 4] {
            let work: Vec<usize> = (0..cp)
                .map(|r| {
                    CpLayout::new(8 * cp, cp, r)
                        .unwrap()
                        .local_indices()
                        .iter()
                        .map(|g| g + 1)
                        .sum()
                })
                .collect();
            assert!(work.iter().all(|w| *w == work[0]), "cp {cp}: {work:?}");
        }
        assert!(matches!(
            CpLayout::new(12, 4, 0),
            Err(CpError::SeqNotDivisible { seq: 12, cp: 4 })
        ));
    }

    #[test]
    fn shard_batch_moves_every_per_token_input() {
        let seg = [0, 0, 0, 0, 0, 1, 1, 1].repeat(2);
        let g = Batch::packed((0..16).collect(), seg, 2, 8).unwrap();
        let b = shard_batch(&g, 2, 1).unwrap(); // chunks 1 and 2 (of 2 tokens each): indices 2..6
        assert_eq!(b.local.seq, 4);
        assert_eq!(b.local.input_ids, vec![2, 3, 4, 5, 10, 11, 12, 13]);
        assert_eq!(b.local.position_ids, vec![2, 3, 4, 0, 2, 3, 4, 0]);
        assert_eq!(b.local.segment_ids, Some(vec![0, 0, 0, 1, 0, 0, 0, 1]));
        assert_eq!(b.local.targets, vec![3, 4, 0, 6, 11, 12, 0, 14]);
        assert_eq!(b.key_segment_ids, g.segment_ids);
    }
}
