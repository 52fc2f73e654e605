//! Weighted token cross-entropy over the vocabulary, forward and backward in one pass.
//!
//! Shapes: `logits [tokens, vocab]` (f32), `targets [tokens]` (u32, `< vocab`), `weights [tokens]` (f32).
//!
//! Maths: `CE_t = logsumexp(logits_t) − logits_t[target_t]`, `loss = Σ_t w_t·CE_t / denom` with
//! `denom = Σ_t w_t` unless the caller passes one (gradient accumulation or data parallelism normalise by a
//! global count). `dlogits_t = (w_t / denom)·(softmax(logits_t) − onehot(target_t))`.
//! Tokens that must not count (prompt, padding, the last position of a sample) get weight 0; their target must
//! still be a valid id (use 0).

use crate::{DType, KernelError, Result, Tensor};

/// Output of [`cross_entropy_fwd_bwd`].
#[derive(Debug, Clone)]
pub struct CrossEntropyOut {
    /// `Σ w·CE / denom`
    pub loss: f64,
    /// `[tokens, vocab]`: gradient of `loss` with respect to the logits.
    pub dlogits: Tensor,
}

fn check(op: &'static str, logits: &Tensor, targets: &Tensor) -> Result<(usize, usize)> {
    Tensor::common_device(op, &[logits, targets])?;
    logits.expect_dtype(op, DType::F32)?;
    logits.expect_rank(op, "logits", 2)?;
    targets.expect_dtype(op, DType::U32)?;
    let (t, v) = (logits.shape()[0], logits.shape()[1]);
    targets.expect_shape(op, "targets", &[t])?;
    if let Some(bad) = targets.to_vec_u32()?.into_iter().find(|&i| i as usize >= v) {
        return Err(KernelError::invalid(
            op,
            format!("target {bad} >= vocab size {v}"),
        ));
    }
    Ok((t, v))
}

/// `(lse [t, 1], exp(logits − max) [t, v], Σexp [t, 1], picked logit [t, 1])`.
fn lse_parts(logits: &Tensor, targets: &Tensor) -> Result<[candle_core::Tensor; 4]> {
    let (l, t) = (logits.cpu()?, targets.cpu()?);
    let m = l.max_keepdim(1)?;
    let e = l.broadcast_sub(&m)?.exp()?;
    let z = e.sum_keepdim(1)?;
    let lse = m.add(&z.log()?)?;
    let picked = l.gather(&t.unsqueeze(1)?, 1)?;
    Ok([lse, e, z, picked])
}

/// Per-token `CE_t` as `[tokens]` (no weights, no reduction): for evaluation and perplexity.
pub fn cross_entropy_per_token(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.is_cuda() {
        let (ce, _) =
            crate::cuda::ops::cross_entropy("cross_entropy_per_token", logits, targets, None)?;
        return Ok(ce);
    }
    check("cross_entropy_per_token", logits, targets)?;
    let [lse, _, _, picked] = lse_parts(logits, targets)?;
    Ok(Tensor::from_cpu(lse.sub(&picked)?.squeeze(1)?))
}

/// Weighted mean cross-entropy and its gradient (see module docs).
pub fn cross_entropy_fwd_bwd(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    denom: Option<f64>,
) -> Result<CrossEntropyOut> {
    let op = "cross_entropy_fwd_bwd";
    if logits.is_cuda() {
        // Same maths as below; the per-token CE comes back to the host for the f64 loss sum.
        Tensor::common_device(op, &[logits, weights])?;
        weights.expect_dtype(op, DType::F32)?;
        let wv = weights.to_vec_f32()?;
        let denom = denom.unwrap_or_else(|| wv.iter().map(|&w| w as f64).sum());
        if !(denom.is_finite() && denom != 0.0) {
            return Err(KernelError::invalid(
                op,
                format!("loss denominator {denom} (all weights zero?)"),
            ));
        }
        let (ce, dl) =
            crate::cuda::ops::cross_entropy(op, logits, targets, Some((weights, denom)))?;
        let ce = ce.to_vec_f32()?;
        let loss = ce
            .iter()
            .zip(&wv)
            .map(|(&c, &w)| c as f64 * w as f64)
            .sum::<f64>()
            / denom;
        return Ok(CrossEntropyOut {
            loss,
            dlogits: dl.expect("gradient requested"),
        });
    }
    let (t, _) = check(op, logits, targets)?;
    weights.expect_dtype(op, DType::F32)?;
    weights.expect_shape(op, "weights", &[t])?;
    let wv = weights.to_vec_f32()?;
    let denom = denom.unwrap_or_else(|| wv.iter().map(|&w| w as f64).sum());
    if !(denom.is_finite() && denom != 0.0) {
        return Err(KernelError::invalid(
            op,
            format!("loss denominator {denom} (all weights zero?)"),
        ));
    }
    let [lse, e, z, picked] = lse_parts(logits, targets)?;
    let ce = lse.sub(&picked)?.flatten_all()?.to_vec1::<f32>()?;
    let loss = ce
        .iter()
        .zip(&wv)
        .map(|(&c, &w)| c as f64 * w as f64)
        .sum::<f64>()
        / denom;
    let coef: Vec<f32> = wv.iter().map(|&w| (w as f64 / denom) as f32).collect();
    let dev = logits.cpu()?.device().clone();
    let coef = candle_core::Tensor::from_vec(coef, (t, 1), &dev)?;
    let p = e.broadcast_div(&z)?; // softmax [t, v]
    let dl = p
        .broadcast_mul(&coef)?
        .scatter_add(&targets.cpu()?.unsqueeze(1)?, &coef.neg()?, 1)?;
    Ok(CrossEntropyOut {
        loss,
        dlogits: Tensor::from_cpu(dl),
    })
}

/// Per-row statistics of one rank's vocabulary shard of the logits (vocab-parallel cross-entropy under tensor
/// parallelism; the combination over ranks is the caller's, see [`vocab_shard_stats`]).
#[derive(Debug, Clone, PartialEq)]
pub struct VocabShardStats {
    /// `m_t = max_v x_tv` over the local columns.
    pub max: Vec<f32>,
    /// `s_t = Σ_v exp(x_tv − m_t)`.
    pub sum_exp: Vec<f32>,
    /// `x_t[local_t]` where this shard owns the target, else 0.
    pub picked: Vec<f32>,
}

/// Marks a row whose target another vocabulary shard owns (in the `local` targets of the vocab-shard ops).
pub const NOT_OWNED: u32 = u32::MAX;

fn check_shard(op: &'static str, logits: &Tensor, local: &Tensor) -> Result<(usize, usize)> {
    Tensor::common_device(op, &[logits, local])?;
    logits.expect_rank(op, "logits", 2)?;
    local.expect_dtype(op, DType::U32)?;
    let (t, v) = (logits.shape()[0], logits.shape()[1]);
    local.expect_shape(op, "local targets", &[t])?;
    Ok((t, v))
}

/// Pass 1 of the vocab-parallel cross-entropy on `logits [t, v]` (this rank's columns `[start, start + v)` of the
/// full logits, f32 or bf16) with `local [t]` (u32: the target's local column `y_t − start` when this rank owns
/// it, else [`NOT_OWNED`]). The ranks' rows combine as `M = max_i m_i`, `S = Σ_i s_i·exp(m_i − M)`,
/// `lse = M + log S`, `picked = Σ_i picked_i` (one owner). One small read-back; CUDA kernel `vp_ce_stats`.
pub fn vocab_shard_stats(logits: &Tensor, local: &Tensor) -> Result<VocabShardStats> {
    let op = "vocab_shard_stats";
    let (t, v) = check_shard(op, logits, local)?;
    let flat = if logits.is_cuda() {
        crate::cuda::ops::vocab_shard_stats(logits, local)?
    } else {
        // CPU reference: the same one-pass online max/sum per row, accumulated in f64.
        let l = logits.to_vec_f32()?;
        let tg = local.to_vec_u32()?;
        let mut o = vec![0f32; 3 * t];
        for (r, row) in l.chunks(v.max(1)).take(t).enumerate() {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let s: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
            o[r] = m;
            o[t + r] = s as f32;
            o[2 * t + r] = if (tg[r] as usize) < v {
                row[tg[r] as usize]
            } else {
                0.0
            };
        }
        o
    };
    Ok(VocabShardStats {
        max: flat[..t].to_vec(),
        sum_exp: flat[t..2 * t].to_vec(),
        picked: flat[2 * t..].to_vec(),
    })
}

/// Pass 2: `dlogits [t, v]` (dtype of the logits) with `dl_tv = coef_t·(exp(x_tv − lse_t) − [v = local_t])`, the
/// global `lse` of pass 1 and `coef_t = w_t / denom`. CUDA kernel `vp_ce_grad`.
pub fn vocab_shard_grad(
    logits: &Tensor,
    local: &Tensor,
    lse: &[f32],
    coef: &[f32],
) -> Result<Tensor> {
    let op = "vocab_shard_grad";
    let (t, v) = check_shard(op, logits, local)?;
    if lse.len() != t || coef.len() != t {
        return Err(KernelError::shape(
            op,
            format!(
                "{t} rows, {} lse and {} coefficients",
                lse.len(),
                coef.len()
            ),
        ));
    }
    if logits.is_cuda() {
        return crate::cuda::ops::vocab_shard_grad(logits, local, lse, coef);
    }
    let l = logits.to_vec_f32()?;
    let tg = local.to_vec_u32()?;
    let mut dl = vec![0f32; t * v];
    for r in 0..t {
        let c = coef[r] as f64;
        if c == 0.0 {
            continue;
        }
        let row = &l[r * v..(r + 1) * v];
        let out = &mut dl[r * v..(r + 1) * v];
        for (o, &x) in out.iter_mut().zip(row) {
            *o = (c * ((x - lse[r]) as f64).exp()) as f32;
        }
        if (tg[r] as usize) < v {
            out[tg[r] as usize] -= coef[r];
        }
    }
    Tensor::from_f32(dl, &[t, v], &logits.device())?.to_dtype(logits.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;
    use crate::test_util::*;

    fn naive(logits: &[f64], targets: &[u32], w: &[f64], v: usize) -> f64 {
        let mut num = 0.0;
        for (t, row) in logits.chunks(v).enumerate() {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            num += w[t] * (lse - row[targets[t] as usize]);
        }
        num / w.iter().sum::<f64>()
    }

    #[test]
    fn loss_and_gradient_match_reference() {
        let mut r = rng(60);
        let (t, v) = (5, 11);
        let (logits, lv) = rand_tensor(&mut r, &[t, v], 4.0);
        let tv = vec![3u32, 0, 10, 7, 3];
        let wv = vec![1.0f32, 0.0, 0.5, 2.0, 1.0];
        let targets = Tensor::from_u32(tv.clone(), &[t], &Device::Cpu).unwrap();
        let weights = Tensor::from_f32(wv.clone(), &[t], &Device::Cpu).unwrap();
        let out = cross_entropy_fwd_bwd(&logits, &targets, &weights, None).unwrap();
        let wd = f64s(&wv);
        let want = naive(&f64s(&lv), &tv, &wd, v);
        assert!(
            (out.loss - want).abs() < 1e-6 * want.abs(),
            "loss {} vs {want}",
            out.loss
        );
        let want_d = fd_grad(&f64s(&lv), 1e-6, |l| naive(l, &tv, &wd, v));
        assert_close("dlogits", &out.dlogits.to_vec_f32().unwrap(), &want_d, 1e-5);
        // Zero-weight token: zero gradient row.
        assert!(
            out.dlogits.to_vec_f32().unwrap()[v..2 * v]
                .iter()
                .all(|&g| g == 0.0)
        );

        // An explicit denominator rescales both.
        let out2 = cross_entropy_fwd_bwd(&logits, &targets, &weights, Some(9.0)).unwrap();
        assert!((out2.loss - want * 4.5 / 9.0).abs() < 1e-6);
        let per = cross_entropy_per_token(&logits, &targets)
            .unwrap()
            .to_vec_f32()
            .unwrap();
        let single = naive(&f64s(&lv[..v]), &tv[..1], &[1.0], v);
        assert!((per[0] as f64 - single).abs() < 1e-5);
    }

    #[test]
    fn vocab_shards_combine_to_the_full_cross_entropy() {
        let mut r = rng(61);
        let (t, v, p) = (6, 12, 3);
        let (logits, lv) = rand_tensor(&mut r, &[t, v], 4.0);
        let tv = vec![3u32, 0, 11, 7, 4, 8];
        let wv = vec![1.0f32, 0.0, 0.5, 2.0, 1.0, 1.5];
        let denom: f64 = wv.iter().map(|&w| w as f64).sum();
        let full = cross_entropy_fwd_bwd(
            &logits,
            &Tensor::from_u32(tv.clone(), &[t], &Device::Cpu).unwrap(),
            &Tensor::from_f32(wv.clone(), &[t], &Device::Cpu).unwrap(),
            None,
        )
        .unwrap();
        let vl = v / p;
        let shard = |i: usize| {
            let data: Vec<f32> = lv
                .chunks(v)
                .flat_map(|row| row[i * vl..(i + 1) * vl].to_vec())
                .collect();
            let local: Vec<u32> = tv
                .iter()
                .map(|&y| {
                    if (i * vl..(i + 1) * vl).contains(&(y as usize)) {
                        y - (i * vl) as u32
                    } else {
                        NOT_OWNED
                    }
                })
                .collect();
            (
                Tensor::from_f32(data, &[t, vl], &Device::Cpu).unwrap(),
                Tensor::from_u32(local, &[t], &Device::Cpu).unwrap(),
            )
        };
        let shards: Vec<_> = (0..p).map(shard).collect();
        let stats: Vec<_> = shards
            .iter()
            .map(|(l, y)| vocab_shard_stats(l, y).unwrap())
            .collect();
        let mut lse = vec![0f32; t];
        let mut loss = 0.0;
        for r in 0..t {
            let m = stats
                .iter()
                .map(|s| s.max[r])
                .fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = stats
                .iter()
                .map(|s| s.sum_exp[r] as f64 * ((s.max[r] - m) as f64).exp())
                .sum();
            lse[r] = (m as f64 + z.ln()) as f32;
            let picked: f32 = stats.iter().map(|s| s.picked[r]).sum();
            loss += wv[r] as f64 * (lse[r] - picked) as f64;
        }
        loss /= denom;
        assert!(
            (loss - full.loss).abs() < 1e-5 * full.loss.abs(),
            "loss {loss} vs {}",
            full.loss
        );
        let coef: Vec<f32> = wv.iter().map(|&w| (w as f64 / denom) as f32).collect();
        let want = full.dlogits.to_vec_f32().unwrap();
        for (i, (l, y)) in shards.iter().enumerate() {
            let dl = vocab_shard_grad(l, y, &lse, &coef)
                .unwrap()
                .to_vec_f32()
                .unwrap();
            for r in 0..t {
                for c in 0..vl {
                    let (a, b) = (dl[r * vl + c], want[r * v + i * vl + c]);
                    assert!((a - b).abs() < 1e-6, "shard {i} [{r},{c}]: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let logits = Tensor::full(0.5, &[2, 3], &Device::Cpu).unwrap();
        let targets = Tensor::from_u32(vec![1, 3], &[2], &Device::Cpu).unwrap();
        let weights = Tensor::full(1.0, &[2], &Device::Cpu).unwrap();
        assert!(matches!(
            cross_entropy_fwd_bwd(&logits, &targets, &weights, None),
            Err(KernelError::InvalidArgument { .. })
        ));
        let targets = Tensor::from_u32(vec![1, 2], &[2], &Device::Cpu).unwrap();
        let zero = Tensor::zeros(&[2], DType::F32, &Device::Cpu).unwrap();
        assert!(cross_entropy_fwd_bwd(&logits, &targets, &zero, None).is_err());
    }
}
