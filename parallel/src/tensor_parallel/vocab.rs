//! Vocab-parallel embedding and cross-entropy (maths in the [module docs](super)).
//!
//! Rank `i` owns vocabulary ids `[start, start + V/p)`. Neither op ever materialises a `[T, V]` tensor: the
//! embedding works on the local `[V/p, H]` table, the cross-entropy on local logits `[T, V/p]` plus three `[T]`
//! vectors that are all-reduced.
//!
//! The cross-entropy's per-token reductions are done on the host in f64 (the CPU reference); a CUDA kernel will do
//! the same three passes on the device with the same two all-reduces.

use qkernels::Tensor;
use qkernels::ops;

use super::{Result, TpError};
use crate::comm::{Communicator, ReduceOp};

/// Local ids (`id − start`, or 0 outside the range) and the `[T]` in-range mask.
fn localize(ids: &[u32], start: usize, vocab: usize) -> (Vec<u32>, Vec<bool>) {
    ids.iter()
        .map(|&id| {
            let id = id as usize;
            if (start..start + vocab).contains(&id) {
                ((id - start) as u32, true)
            } else {
                (0, false)
            }
        })
        .unzip()
}

fn mask_rows(x: &Tensor, mask: &[bool]) -> Result<Tensor> {
    let cols = x.shape()[1];
    let m: Vec<f32> = mask
        .iter()
        .flat_map(|&k| std::iter::repeat_n(if k { 1.0 } else { 0.0 }, cols))
        .collect();
    let m = Tensor::from_f32(m, x.shape(), &x.device())?;
    Ok(x.mul(&m)?)
}

/// Partial embedding `x^{(i)} [T, H]`: `table_i[id − start]` for ids this rank owns, zero rows elsewhere. Sum over
/// the TP group (all-reduce, or reduce-scatter with SP) to get the embedding.
pub fn embedding_fwd(ids: &[u32], table: &Tensor, start: usize) -> Result<Tensor> {
    let vocab = table.shape()[0];
    let (local, mask) = localize(ids, start, vocab);
    let local = Tensor::from_u32(local, &[ids.len()], &table.device())?;
    mask_rows(&ops::embedding_fwd(&local, table)?, &mask)
}

/// `d table_i [V/p, H]` from the full `dx [T, H]` (replicated on the TP ranks): scatter-add of the rows whose ids
/// this rank owns.
pub fn embedding_bwd(ids: &[u32], dx: &Tensor, vocab: usize, start: usize) -> Result<Tensor> {
    let (local, mask) = localize(ids, start, vocab);
    let local = Tensor::from_u32(local, &[ids.len()], &dx.device())?;
    Ok(ops::embedding_bwd(&local, &mask_rows(dx, &mask)?, vocab)?)
}

/// Result of [`cross_entropy_fwd_bwd`].
#[derive(Debug, Clone)]
pub struct VocabParallelCe {
    /// `Σ_t w_t·CE_t / denom` over this rank's tokens (identical on every TP rank).
    pub loss: f64,
    /// `[T, V/p]`: gradient of `loss` with respect to the local logits.
    pub dlogits: Tensor,
}

/// Weighted cross-entropy of vocab-split logits `[T, V/p]` (this rank's columns `[start, start + V/p)` of the full
/// logits) against `targets [T]` (full vocabulary ids) with weights `[T]`, normalised by `denom`. Two all-reduces
/// over `tp`: the row max (max), then the sum of exponentials and the target logit (sum, one buffer of `2T`).
pub fn cross_entropy_fwd_bwd(
    logits: &Tensor,
    targets: &[u32],
    weights: &[f32],
    denom: f64,
    start: usize,
    tp: &dyn Communicator,
) -> Result<VocabParallelCe> {
    let [t, v] = logits.shape() else {
        return Err(TpError::Shard {
            name: "logits".into(),
            detail: format!("expected [tokens, vocab/tp], got {:?}", logits.shape()),
        });
    };
    let (t, v) = (*t, *v);
    if targets.len() != t || weights.len() != t {
        return Err(TpError::Shard {
            name: "logits".into(),
            detail: format!(
                "{t} token rows but {} targets and {} weights",
                targets.len(),
                weights.len()
            ),
        });
    }
    if !(denom.is_finite() && denom != 0.0) {
        return Err(TpError::Model(crate::model::ModelError::Batch(format!(
            "loss denominator {denom} (all weights zero?)"
        ))));
    }
    let l = logits.to_vec_f32()?;
    // Row maxima, then the global max.
    let mut m: Vec<f32> = l
        .chunks(v)
        .map(|row| row.iter().copied().fold(f32::NEG_INFINITY, f32::max))
        .collect();
    tp.all_reduce(&mut m, ReduceOp::Max)?;
    // Local Σ exp(ℓ − m) and the target logit if we own it, in one buffer.
    let mut zp = vec![0f32; 2 * t];
    for (r, row) in l.chunks(v).enumerate() {
        zp[r] = row.iter().map(|&x| ((x - m[r]) as f64).exp()).sum::<f64>() as f32;
        let y = targets[r] as usize;
        if (start..start + v).contains(&y) {
            zp[t + r] = row[y - start];
        }
    }
    tp.all_reduce(&mut zp, ReduceOp::Sum)?;
    let (z, picked) = zp.split_at(t);
    let mut loss = 0f64;
    let mut dl = vec![0f32; t * v];
    for r in 0..t {
        let ce = m[r] as f64 + (z[r] as f64).ln() - picked[r] as f64;
        loss += weights[r] as f64 * ce;
        let coef = weights[r] as f64 / denom;
        if coef == 0.0 {
            continue;
        }
        let inv_z = 1.0 / z[r] as f64;
        let row = &l[r * v..(r + 1) * v];
        let out = &mut dl[r * v..(r + 1) * v];
        for (o, &x) in out.iter_mut().zip(row) {
            *o = (coef * ((x - m[r]) as f64).exp() * inv_z) as f32;
        }
        let y = targets[r] as usize;
        if (start..start + v).contains(&y) {
            out[y - start] -= coef as f32;
        }
    }
    Ok(VocabParallelCe {
        loss: loss / denom,
        dlogits: Tensor::from_f32(dl, &[t, v], &logits.device())?,
    })
}
