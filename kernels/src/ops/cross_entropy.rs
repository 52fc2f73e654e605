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
