//! Vocab-parallel embedding and cross-entropy (maths in the [module docs](super)).
//!
//! Rank `i` owns vocabulary ids `[start, start + V/p)`. Neither op ever materialises a `[T, V]` tensor: the
//! embedding works on the local `[V/p, H]` table, the cross-entropy on local logits `[T, V/p]` plus three `[T]`
//! vectors that are all-reduced.
//!
//! Both run on the tensors' device: the embedding is a lookup into the local table extended by one zero row (ids
//! this rank does not own point at it), its backward a scatter-add into the extended table with that row dropped;
//! the cross-entropy is two device passes over the local logits ([`ops::vocab_shard_stats`],
//! [`ops::vocab_shard_grad`]) around the two all-reduces, with only `[T]` vectors on the host.

use qkernels::Tensor;
use qkernels::ops;

use super::{Result, TpError};
use crate::comm::{Communicator, ReduceOp};

/// Local ids: `id − start` for ids this rank owns, `vocab` (the extra zero row) for the others.
fn localize(ids: &[u32], start: usize, vocab: usize) -> Vec<u32> {
    ids.iter()
        .map(|&id| {
            let id = id as usize;
            if (start..start + vocab).contains(&id) {
                (id - start) as u32
            } else {
                vocab as u32
            }
        })
        .collect()
}

/// Partial embedding `x^{(i)} [T, H]`: `table_i[id − start]` for ids this rank owns, zero rows elsewhere. Sum over
/// the TP group (all-reduce, or reduce-scatter with SP) to get the embedding.
pub fn embedding_fwd(ids: &[u32], table: &Tensor, start: usize) -> Result<Tensor> {
    let [vocab, hidden] = *table.shape() else {
        return Err(TpError::Shard {
            name: "embed_tokens".into(),
            detail: format!("expected [vocab/tp, hidden], got {:?}", table.shape()),
        });
    };
    let local = Tensor::from_u32(localize(ids, start, vocab), &[ids.len()], &table.device())?;
    let zero = Tensor::zeros(&[1, hidden], table.dtype(), &table.device())?;
    let extended = Tensor::cat(&[table, &zero], 0)?;
    Ok(ops::embedding_fwd(&local, &extended)?)
}

/// `d table_i [V/p, H]` (f32) from the full `dx [T, H]` (replicated on the TP ranks): scatter-add of the rows whose
/// ids this rank owns.
pub fn embedding_bwd(ids: &[u32], dx: &Tensor, vocab: usize, start: usize) -> Result<Tensor> {
    let local = Tensor::from_u32(localize(ids, start, vocab), &[ids.len()], &dx.device())?;
    let extended = ops::embedding_bwd(&local, dx, vocab + 1)?;
    Ok(extended.narrow(0, 0, vocab)?)
}

/// Result of [`cross_entropy_fwd_bwd`].
#[derive(Debug, Clone)]
pub struct VocabParallelCe {
    /// `Σ_t w_t·CE_t / denom` over this rank's tokens (identical on every TP rank).
    pub loss: f64,
    /// `[T, V/p]`: gradient of `loss` with respect to the local logits (dtype of the logits).
    pub dlogits: Tensor,
}

/// Weighted cross-entropy of vocab-split logits `[T, V/p]` (this rank's columns `[start, start + V/p)` of the full
/// logits) against `targets [T]` (full vocabulary ids) with weights `[T]`, normalised by `denom`. Two all-reduces
/// over `tp` of `[T]`-sized host vectors:
/// ```text
/// (m_i, s_i, π_i) = vocab_shard_stats(ℓ^{(i)})      local row max, Σ exp(ℓ − m_i), target logit or 0   (device)
/// M   = all-reduce(max) of m_i
/// S,π = all-reduce(sum) of [s_i·exp(m_i − M) ; π_i]  (one buffer of 2T)
/// lse = M + log S,  CE = lse − π,  loss = Σ w·CE / denom
/// dℓ^{(i)} = vocab_shard_grad(ℓ^{(i)}, lse, w/denom) = (w/denom)·(exp(ℓ^{(i)} − lse) − onehot)                (device)
/// ```
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
    let local: Vec<u32> = targets
        .iter()
        .map(|&y| {
            let y = y as usize;
            if (start..start + v).contains(&y) {
                (y - start) as u32
            } else {
                ops::NOT_OWNED
            }
        })
        .collect();
    let local = Tensor::from_u32(local, &[t], &logits.device())?;
    let st = ops::vocab_shard_stats(logits, &local)?;
    let mut m = st.max.clone();
    tp.all_reduce(&mut m, ReduceOp::Max)?;
    let mut zp = vec![0f32; 2 * t];
    for r in 0..t {
        zp[r] = (st.sum_exp[r] as f64 * ((st.max[r] - m[r]) as f64).exp()) as f32;
        zp[t + r] = st.picked[r];
    }
    tp.all_reduce(&mut zp, ReduceOp::Sum)?;
    let (z, picked) = zp.split_at(t);
    let mut loss = 0f64;
    let mut lse = vec![0f32; t];
    let mut coef = vec![0f32; t];
    for r in 0..t {
        let l = m[r] as f64 + (z[r] as f64).ln();
        lse[r] = l as f32;
        loss += weights[r] as f64 * (l - picked[r] as f64);
        coef[r] = (weights[r] as f64 / denom) as f32;
    }
    let dlogits = ops::vocab_shard_grad(logits, &local, &lse, &coef)?;
    Ok(VocabParallelCe {
        loss: loss / denom,
        dlogits,
    })
}
