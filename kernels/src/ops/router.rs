//! MoE router: softmax over experts, top-k selection, optional renormalisation, and the load-balancing
//! auxiliary loss, as HF Qwen3-MoE (`Qwen3MoeTopKRouter`, `load_balancing_loss_func`).
//!
//! Shapes: router `logits [tokens, experts]` (= `x·W_gateᵀ`, computed by the caller with
//! [`linear_fwd`](crate::ops::linear::linear_fwd)) → `probs [tokens, experts]`, `topk_idx [tokens, k]` (u32,
//! highest probability first), `topk_weight [tokens, k]`.
//!
//! Maths: `p = softmax(logits)`; `topk_weight_j = p[idx_j]`, divided by `Σ_j p[idx_j]` when `norm_topk_prob`.
//! Backward (top-k indices are constants): with `S = Σ_j p[idx_j]` and `w_j` the normalised weights,
//! `dp[idx_j] += (dw_j − Σ_i dw_i·w_i)/S` (or `dw_j` without normalisation), plus any direct `dp` (from the
//! aux loss); then the softmax backward `dlogits = p ⊙ (dp − Σ_e p_e·dp_e)`.
//!
//! Aux loss (HF): over all MoE layers `l` and all rows, `A_e` = number of top-k assignments to expert `e`,
//! `P_e = Σ p_e`, `N` = number of rows summed over layers; `aux = E · Σ_e (A_e/N)·(P_e/N)`. `A_e` is a count (no
//! gradient), so `∂aux/∂p_{l,t,e} = E·A_e/N²`, the same for every row of every layer. All rows count, as HF with
//! `attention_mask=None`. The statistics are global over layers, so collect [`RouterStats`] from every layer's
//! forward, merge them, and only then build the per-layer `dprobs` with [`RouterStats::aux_dprobs`].
//!
//! Devices: on CUDA every function here runs on the device ([`crate::cuda::router`], `kernels/cuda/router.cu`):
//! `logits` may be F32 or BF16 there (F32 only on the CPU); the outputs have the same dtypes on both (`probs`,
//! `topk_weight`, `dlogits` F32, `topk_idx` U32). [`RouterStats::from_router`] reads back only the `2·E`
//! per-expert numbers (its column sums are f32 on CUDA, f64 on the CPU), and [`RouterStats::aux_dprobs`] uploads
//! one `[E]` row and broadcasts it on the device.

use crate::{DType, Device, KernelError, Result, Tensor};

/// Output of [`router_fwd`] (also what [`router_bwd`] needs).
#[derive(Debug, Clone)]
pub struct RouterOut {
    /// `[tokens, experts]` softmax probabilities.
    pub probs: Tensor,
    /// `[tokens, k]` (u32) selected experts, highest probability first (ties: lower expert index first).
    pub topk_idx: Tensor,
    /// `[tokens, k]` routing weights of the selected experts.
    pub topk_weight: Tensor,
}

/// Softmax, top-k and optional renormalisation (see module docs).
pub fn router_fwd(logits: &Tensor, top_k: usize, norm_topk_prob: bool) -> Result<RouterOut> {
    let op = "router_fwd";
    if logits.is_cuda() {
        return crate::cuda::router::router_fwd(logits, top_k, norm_topk_prob);
    }
    logits.expect_dtype(op, DType::F32)?;
    logits.expect_rank(op, "logits", 2)?;
    let (t, e) = (logits.shape()[0], logits.shape()[1]);
    if top_k == 0 || top_k > e {
        return Err(KernelError::invalid(
            op,
            format!("top_k {top_k} must be in 1..={e}"),
        ));
    }
    let l = logits.cpu()?;
    let ex = l.broadcast_sub(&l.max_keepdim(1)?)?.exp()?;
    let probs = ex.broadcast_div(&ex.sum_keepdim(1)?)?;
    let pv = probs.flatten_all()?.to_vec1::<f32>()?;
    let mut idx = Vec::with_capacity(t * top_k);
    let mut wts = Vec::with_capacity(t * top_k);
    let mut order: Vec<usize> = Vec::with_capacity(e);
    for row in pv.chunks(e) {
        order.clear();
        order.extend(0..e);
        // Stable sort: equal probabilities keep ascending expert order.
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let sel = &order[..top_k];
        let sum: f32 = sel.iter().map(|&i| row[i]).sum();
        for &i in sel {
            idx.push(i as u32);
            wts.push(if norm_topk_prob { row[i] / sum } else { row[i] });
        }
    }
    let dev = logits.device();
    Ok(RouterOut {
        probs: Tensor::from_cpu(probs),
        topk_idx: Tensor::from_u32(idx, &[t, top_k], &dev)?,
        topk_weight: Tensor::from_f32(wts, &[t, top_k], &dev)?,
    })
}

/// Backward of [`router_fwd`]: `dlogits [tokens, experts]` from `d_topk_weight [tokens, k]` and an optional
/// direct gradient on the probabilities `d_probs [tokens, experts]` (the aux loss's).
pub fn router_bwd(
    d_topk_weight: &Tensor,
    d_probs: Option<&Tensor>,
    out: &RouterOut,
    norm_topk_prob: bool,
) -> Result<Tensor> {
    let op = "router_bwd";
    if out.probs.is_cuda() {
        return crate::cuda::router::router_bwd(d_topk_weight, d_probs, out, norm_topk_prob);
    }
    let (t, e) = (out.probs.shape()[0], out.probs.shape()[1]);
    let k = out.topk_idx.shape()[1];
    d_topk_weight.expect_dtype(op, DType::F32)?;
    d_topk_weight.expect_shape(op, "d_topk_weight", &[t, k])?;
    Tensor::common_device(op, &[d_topk_weight, &out.probs])?;
    let mut dp = match d_probs {
        Some(d) => {
            d.expect_dtype(op, DType::F32)?;
            d.expect_shape(op, "d_probs", &[t, e])?;
            d.to_vec_f32()?
        }
        None => vec![0.0; t * e],
    };
    let p = out.probs.to_vec_f32()?;
    let idx = out.topk_idx.to_vec_u32()?;
    let w = out.topk_weight.to_vec_f32()?;
    let dw = d_topk_weight.to_vec_f32()?;
    let mut dl = vec![0.0f32; t * e];
    for r in 0..t {
        let (ir, wr, dwr) = (
            &idx[r * k..(r + 1) * k],
            &w[r * k..(r + 1) * k],
            &dw[r * k..(r + 1) * k],
        );
        let (pr, dpr) = (&p[r * e..(r + 1) * e], &mut dp[r * e..(r + 1) * e]);
        if norm_topk_prob {
            let s: f64 = ir.iter().map(|&i| pr[i as usize] as f64).sum();
            let c: f64 = dwr.iter().zip(wr).map(|(&d, &w)| d as f64 * w as f64).sum();
            for (j, &i) in ir.iter().enumerate() {
                dpr[i as usize] += ((dwr[j] as f64 - c) / s) as f32;
            }
        } else {
            for (j, &i) in ir.iter().enumerate() {
                dpr[i as usize] += dwr[j];
            }
        }
        let dot: f64 = pr
            .iter()
            .zip(dpr.iter())
            .map(|(&p, &d)| p as f64 * d as f64)
            .sum();
        for c in 0..e {
            dl[r * e + c] = (pr[c] as f64 * (dpr[c] as f64 - dot)) as f32;
        }
    }
    Tensor::from_f32(dl, &[t, e], &out.probs.device())
}

/// What the HF load-balancing loss accumulates over layers (host values, tiny).
#[derive(Debug, Clone, PartialEq)]
pub struct RouterStats {
    /// `[experts]`: number of top-k assignments per expert.
    pub assignments: Vec<f64>,
    /// `[experts]`: Σ over rows of the softmax probability per expert.
    pub prob_sums: Vec<f64>,
    /// Number of rows (tokens × layers) accumulated.
    pub rows: f64,
}

impl RouterStats {
    /// Empty statistics for `experts` experts.
    pub fn new(experts: usize) -> Self {
        RouterStats {
            assignments: vec![0.0; experts],
            prob_sums: vec![0.0; experts],
            rows: 0.0,
        }
    }

    /// Statistics of one layer's routing.
    pub fn from_router(out: &RouterOut) -> Result<Self> {
        let e = out.probs.shape()[1];
        let mut s = RouterStats::new(e);
        if out.probs.is_cuda() {
            let (counts, sums) = crate::cuda::router::router_stats(out)?;
            s.assignments = counts.into_iter().map(f64::from).collect();
            s.prob_sums = sums.into_iter().map(f64::from).collect();
            s.rows = out.probs.shape()[0] as f64;
            return Ok(s);
        }
        for i in out.topk_idx.to_vec_u32()? {
            s.assignments[i as usize] += 1.0;
        }
        for row in out.probs.to_vec_f32()?.chunks(e) {
            for (acc, &p) in s.prob_sums.iter_mut().zip(row) {
                *acc += p as f64;
            }
        }
        s.rows = out.probs.shape()[0] as f64;
        Ok(s)
    }

    /// Adds another layer's (or micro-batch's) statistics.
    pub fn merge(&mut self, other: &RouterStats) -> Result<()> {
        if other.assignments.len() != self.assignments.len() {
            return Err(KernelError::shape(
                "RouterStats::merge",
                format!(
                    "{} vs {} experts",
                    self.assignments.len(),
                    other.assignments.len()
                ),
            ));
        }
        for (a, b) in self.assignments.iter_mut().zip(&other.assignments) {
            *a += b;
        }
        for (a, b) in self.prob_sums.iter_mut().zip(&other.prob_sums) {
            *a += b;
        }
        self.rows += other.rows;
        Ok(())
    }

    /// `aux = E · Σ_e (A_e/N)·(P_e/N)` (0 when no rows were seen).
    pub fn aux_loss(&self) -> f64 {
        if self.rows == 0.0 {
            return 0.0;
        }
        let n = self.rows;
        let e = self.assignments.len() as f64;
        e * self
            .assignments
            .iter()
            .zip(&self.prob_sums)
            .map(|(a, p)| (a / n) * (p / n))
            .sum::<f64>()
    }

    /// `d(coef·aux)/dprobs` for one layer with `tokens` rows: `[tokens, experts]`, every row `coef·E·A_e/N²`.
    pub fn aux_dprobs(&self, tokens: usize, coef: f64, device: &Device) -> Result<Tensor> {
        let e = self.assignments.len();
        let n2 = self.rows * self.rows;
        let row: Vec<f32> = self
            .assignments
            .iter()
            .map(|a| {
                if n2 == 0.0 {
                    0.0
                } else {
                    (coef * e as f64 * a / n2) as f32
                }
            })
            .collect();
        if let Device::Cuda(i) = device {
            return crate::cuda::router::broadcast_row(&row, tokens, *i);
        }
        let data: Vec<f32> = (0..tokens).flat_map(|_| row.iter().copied()).collect();
        Tensor::from_f32(data, &[tokens, e], device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    fn softmax(row: &[f64]) -> Vec<f64> {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
        row.iter().map(|x| (x - m).exp() / z).collect()
    }

    /// Naive f64 routing weights for fixed indices (the indices are constants of the backward).
    fn weights(logits: &[f64], idx: &[u32], e: usize, k: usize, norm: bool) -> Vec<f64> {
        logits
            .chunks(e)
            .zip(idx.chunks(k))
            .flat_map(|(row, ir)| {
                let p = softmax(row);
                let s: f64 = ir.iter().map(|&i| p[i as usize]).sum();
                ir.iter()
                    .map(move |&i| {
                        if norm {
                            p[i as usize] / s
                        } else {
                            p[i as usize]
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn forward_selects_top_k_in_descending_order() {
        let mut r = rng(70);
        let (t, e, k) = (6, 8, 3);
        let (logits, lv) = rand_tensor(&mut r, &[t, e], 3.0);
        for norm in [false, true] {
            let out = router_fwd(&logits, k, norm).unwrap();
            let idx = out.topk_idx.to_vec_u32().unwrap();
            for (row, ir) in lv.chunks(e).zip(idx.chunks(k)) {
                let mut order: Vec<usize> = (0..e).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                assert_eq!(
                    ir.iter().map(|&i| i as usize).collect::<Vec<_>>(),
                    order[..k].to_vec()
                );
            }
            let want = weights(&f64s(&lv), &idx, e, k, norm);
            assert_close(
                "topk_weight",
                &out.topk_weight.to_vec_f32().unwrap(),
                &want,
                1e-6,
            );
            let probs: Vec<f64> = f64s(&lv).chunks(e).flat_map(softmax).collect();
            assert_close("probs", &out.probs.to_vec_f32().unwrap(), &probs, 1e-6);
        }
    }

    #[test]
    fn backward_matches_finite_differences_with_and_without_renorm() {
        let mut r = rng(71);
        let (t, e, k) = (5, 6, 2);
        let (logits, lv) = rand_tensor(&mut r, &[t, e], 2.0);
        let (dw, dwv) = rand_tensor(&mut r, &[t, k], 1.0);
        let (dp, dpv) = rand_tensor(&mut r, &[t, e], 1.0);
        for norm in [false, true] {
            let out = router_fwd(&logits, k, norm).unwrap();
            let idx = out.topk_idx.to_vec_u32().unwrap();
            let dl = router_bwd(&dw, Some(&dp), &out, norm).unwrap();
            let (dwd, dpd) = (f64s(&dwv), f64s(&dpv));
            let want = fd_grad(&f64s(&lv), 1e-6, |l| {
                let p: Vec<f64> = l.chunks(e).flat_map(softmax).collect();
                dot(&dwd, &weights(l, &idx, e, k, norm)) + dot(&dpd, &p)
            });
            assert_close("dlogits", &dl.to_vec_f32().unwrap(), &want, 1e-5);
        }
    }

    #[test]
    fn aux_loss_matches_hf_formula_and_its_gradient() {
        // Two "layers" of routing; the aux loss is global over both, as HF computes it.
        let mut r = rng(72);
        let (t, e, k) = (7, 4, 2);
        let (l0, l0v) = rand_tensor(&mut r, &[t, e], 2.0);
        let (l1, l1v) = rand_tensor(&mut r, &[t, e], 2.0);
        let (o0, o1) = (
            router_fwd(&l0, k, true).unwrap(),
            router_fwd(&l1, k, true).unwrap(),
        );
        let mut stats = RouterStats::from_router(&o0).unwrap();
        stats
            .merge(&RouterStats::from_router(&o1).unwrap())
            .unwrap();
        let idx0 = o0.topk_idx.to_vec_u32().unwrap();
        let idx1 = o1.topk_idx.to_vec_u32().unwrap();
        // HF: tokens_per_expert = mean over rows of the (summed over k) one-hot; router_prob = mean of probs.
        let hf = |l0: &[f64], l1: &[f64]| {
            let n = (2 * t) as f64;
            let mut f = vec![0.0; e];
            let mut p = vec![0.0; e];
            for (l, idx) in [(l0, &idx0), (l1, &idx1)] {
                for &i in idx.iter() {
                    f[i as usize] += 1.0 / n;
                }
                for row in l.chunks(e) {
                    for (c, v) in softmax(row).into_iter().enumerate() {
                        p[c] += v / n;
                    }
                }
            }
            e as f64 * f.iter().zip(&p).map(|(a, b)| a * b).sum::<f64>()
        };
        let (l0d, l1d) = (f64s(&l0v), f64s(&l1v));
        let want = hf(&l0d, &l1d);
        assert!(
            (stats.aux_loss() - want).abs() < 1e-6,
            "{} vs {want}",
            stats.aux_loss()
        );
        // Gradient through the layer-0 probabilities and softmax.
        let coef = 0.01;
        let dp0 = stats.aux_dprobs(t, coef, &Device::Cpu).unwrap();
        let zero_w = Tensor::zeros(&[t, k], DType::F32, &Device::Cpu).unwrap();
        let dl0 = router_bwd(&zero_w, Some(&dp0), &o0, true).unwrap();
        let want_dl0 = fd_grad(&l0d, 1e-6, |l| coef * hf(l, &l1d));
        assert_close("aux dlogits", &dl0.to_vec_f32().unwrap(), &want_dl0, 1e-5);
    }
}
