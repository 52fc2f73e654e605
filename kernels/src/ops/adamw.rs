//! The optimizer's elementwise work on device tensors: the fused AdamW update of one parameter (fp32 master
//! weights and moments, gradient in, the new compute-dtype weights out) and the sum of squares of many
//! gradients (for the global norm that clipping needs).
//!
//! AdamW is `torch.optim.AdamW(foreach=False)` exactly; for each element, with `g = grad · grad_scale`
//! (`grad_scale` is the clipping coefficient, 1 without clipping) and the step's scalars [`AdamWScalars`]:
//!
//! ```text
//! p  ← p · decay                                  // decay = 1 − lr·wd (decoupled weight decay)
//! m  ← m + (1−β1)·(g − m)                         // torch's lerp
//! v  ← v·β2 + ((1−β2)·g)·g
//! p  ← p + neg_step_size · m / (√v / bias2_sqrt + ε)
//! ```
//!
//! The scalars are computed in f64 and rounded to f32 once (as torch does with Python floats); the elementwise
//! maths is f32 in the order above. [`adamw_update_host`] is the host loop (the CPU reference and the host
//! optimizer's kernel); `adamw_step` runs the same maths on any device. On CUDA the compiler may fuse a multiply
//! and an add into one FMA, so results agree with the host to f32 rounding (≈1e-7 relative), not bit for bit.
//!
//! Tensors are immutable values (see [`crate::Tensor`]): `adamw_step` returns new master, moments and weights;
//! on CUDA the old buffers go back to the caching allocator as soon as the caller drops them.

use crate::device::DType;
use crate::error::{KernelError, Result};
use crate::tensor::Tensor;

/// The per-step scalars of one parameter's AdamW update (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    /// `1 − lr·weight_decay`.
    pub decay: f32,
    /// `1 − β1`.
    pub one_minus_beta1: f32,
    /// `β2`.
    pub beta2: f32,
    /// `1 − β2`.
    pub one_minus_beta2: f32,
    /// `−lr / (1 − β1^t)`.
    pub neg_step_size: f32,
    /// `√(1 − β2^t)`.
    pub bias2_sqrt: f32,
    pub eps: f32,
}

impl AdamWScalars {
    /// The scalars of step `step` (≥ 1) with learning rate `lr` and weight decay `weight_decay`.
    pub fn new(beta1: f64, beta2: f64, eps: f64, lr: f64, weight_decay: f64, step: u64) -> Self {
        let t = step as f64;
        AdamWScalars {
            decay: (1.0 - lr * weight_decay) as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            neg_step_size: (-(lr / (1.0 - beta1.powf(t)))) as f32,
            bias2_sqrt: (1.0 - beta2.powf(t)).sqrt() as f32,
            eps: eps as f32,
        }
    }
}

/// The AdamW update in place on host slices of equal length (see the module docs); `grad_scale` multiplies
/// every gradient first (skipped when it is 1).
pub fn adamw_update_host(
    s: &AdamWScalars,
    grad_scale: f32,
    param: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
) {
    debug_assert!(param.len() == grad.len() && grad.len() == exp_avg.len() && grad.len() == exp_avg_sq.len());
    for i in 0..param.len() {
        let g = if grad_scale == 1.0 { grad[i] } else { grad[i] * grad_scale };
        let p = param[i] * s.decay;
        let m = exp_avg[i] + s.one_minus_beta1 * (g - exp_avg[i]);
        let v = exp_avg_sq[i] * s.beta2 + s.one_minus_beta2 * g * g;
        let denom = v.sqrt() / s.bias2_sqrt + s.eps;
        param[i] = p + s.neg_step_size * m / denom;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
    }
}

/// What [`adamw_step`] returns: the new fp32 master, moments, and the master cast to the weights' dtype.
#[derive(Clone)]
pub struct AdamWOut {
    pub master: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// `master` in `weight_dtype` (the model's compute weights); equal to `master` for F32.
    pub weight: Tensor,
}

fn check(master: &Tensor, grad: &Tensor, exp_avg: &Tensor, exp_avg_sq: &Tensor) -> Result<()> {
    let op = "adamw_step";
    Tensor::common_device(op, &[master, grad, exp_avg, exp_avg_sq])?;
    for t in [master, grad, exp_avg, exp_avg_sq] {
        t.expect_dtype(op, DType::F32)?;
        if t.shape() != master.shape() {
            return Err(KernelError::shape(
                op,
                format!("operand shape {:?} differs from the master's {:?}", t.shape(), master.shape()),
            ));
        }
    }
    Ok(())
}

/// One AdamW step of one parameter (see the module docs). `master`, `grad`, `exp_avg`, `exp_avg_sq` are F32 of
/// one shape on one device; `weight_dtype` is the dtype of the returned compute weights (F32 or BF16).
pub fn adamw_step(
    master: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    s: &AdamWScalars,
    grad_scale: f32,
    weight_dtype: DType,
) -> Result<AdamWOut> {
    check(master, grad, exp_avg, exp_avg_sq)?;
    if master.is_cuda() {
        return crate::cuda::optim::adamw_step(master, grad, exp_avg, exp_avg_sq, s, grad_scale, weight_dtype);
    }
    let device = master.device();
    let shape = master.shape().to_vec();
    let mut p = master.to_vec_f32()?;
    let (mut m, mut v) = (exp_avg.to_vec_f32()?, exp_avg_sq.to_vec_f32()?);
    adamw_update_host(s, grad_scale, &mut p, &grad.to_vec_f32()?, &mut m, &mut v);
    let master = Tensor::from_f32(p, &shape, &device)?;
    let weight = master.to_dtype(weight_dtype)?;
    Ok(AdamWOut {
        master,
        exp_avg: Tensor::from_f32(m, &shape, &device)?,
        exp_avg_sq: Tensor::from_f32(v, &shape, &device)?,
        weight,
    })
}

/// `Σ_t Σ_i t[i]²` over float tensors of one device, accumulated in f64 across tensors (f32 within a block on
/// CUDA); one host synchronisation for the whole list.
pub fn sum_squares(ts: &[&Tensor]) -> Result<f64> {
    if ts.is_empty() {
        return Ok(0.0);
    }
    Tensor::common_device("sum_squares", ts)?;
    if ts[0].is_cuda() {
        return crate::cuda::optim::sum_squares(ts);
    }
    let mut total = 0.0f64;
    for t in ts {
        total += t.to_vec_f32()?.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Device;

    fn draw(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn step_matches_the_scalar_formula() {
        let n = 37;
        let (p0, g, m0, v0) = (draw(n, 1), draw(n, 2), draw(n, 3), draw(n, 4).iter().map(|x| x.abs()).collect::<Vec<_>>());
        let s = AdamWScalars::new(0.9, 0.95, 1e-8, 1e-3, 0.1, 3);
        let dev = Device::Cpu;
        let t = |v: &Vec<f32>| Tensor::from_f32(v.clone(), &[n], &dev).unwrap();
        let out = adamw_step(&t(&p0), &t(&g), &t(&m0), &t(&v0), &s, 0.5, DType::BF16).unwrap();
        let (p, m, v) = (out.master.to_vec_f32().unwrap(), out.exp_avg.to_vec_f32().unwrap(), out.exp_avg_sq.to_vec_f32().unwrap());
        for i in 0..n {
            // f64 evaluation of the same formula.
            let gi = g[i] as f64 * 0.5;
            let mi = m0[i] as f64 + 0.1 * (gi - m0[i] as f64);
            let vi = v0[i] as f64 * 0.95 + 0.05 * gi * gi;
            let pi = p0[i] as f64 * (1.0 - 1e-4)
                - 1e-3 / (1.0 - 0.9f64.powi(3)) * mi / (vi.sqrt() / (1.0 - 0.95f64.powi(3)).sqrt() + 1e-8);
            assert!((m[i] as f64 - mi).abs() <= 1e-6 * mi.abs().max(1e-3), "m[{i}]");
            assert!((v[i] as f64 - vi).abs() <= 1e-6 * vi.abs().max(1e-3), "v[{i}]");
            assert!((p[i] as f64 - pi).abs() <= 1e-6 * pi.abs().max(1e-3), "p[{i}] {} vs {pi}", p[i]);
        }
        assert_eq!(out.weight.dtype(), DType::BF16);
        let w = out.weight.to_vec_f32().unwrap();
        assert!(w.iter().zip(&p).all(|(a, b)| (a - b).abs() <= b.abs() / 128.0 + 1e-6));
    }

    #[test]
    fn sum_squares_adds_every_tensor() {
        let dev = Device::Cpu;
        let a = Tensor::from_f32(vec![1.0, -2.0, 3.0], &[3], &dev).unwrap();
        let b = Tensor::from_f32(vec![0.5; 4], &[2, 2], &dev).unwrap();
        assert_eq!(sum_squares(&[&a, &b]).unwrap(), 14.0 + 1.0);
        assert!(adamw_step(&a, &b, &a, &a, &AdamWScalars::new(0.9, 0.95, 1e-8, 1e-3, 0.0, 1), 1.0, DType::F32).is_err());
    }
}
