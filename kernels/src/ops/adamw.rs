//! The optimizer's elementwise work on device tensors: the fused AdamW update of one parameter
//! ([`adamw_step`]: fp32 master weights and moments, gradient in, new tensors out), the same update of a whole
//! parameter list in one launch, in place ([`adamw_step_multi`]), and the sum of squares of many gradients (for
//! the global norm that clipping needs).
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
//! The per-tensor and the multi-tensor CUDA kernels share one per-element function, so they agree with each
//! other bit for bit.
//!
//! Shapes and dtypes: master, moments F32 of the parameter's shape; the gradient F32 ([`adamw_step`]) or F32 /
//! BF16 ([`adamw_step_multi`], widened exactly); weights F32 or BF16 of the same shape, `weight = master` rounded
//! to nearest even.
//!
//! Tensors are immutable values (see [`crate::Tensor`]): `adamw_step` returns new master, moments and weights;
//! on CUDA the old buffers go back to the caching allocator as soon as the caller drops them.
//!
//! In-place exception ([`adamw_step_multi`], like [`crate::ops::kv_cache_write`]): on CUDA the masters, moments
//! and weights of the list are overwritten in their existing storage, so every clone or reshape of those
//! tensors sees the new values (ordered on the device's single stream: ops queued before the step read the old
//! values, ops queued after it the new). The caller must own those storages exclusively — hand out no clones it
//! expects to keep their values across a step — and no two written tensors of one call may share a buffer (the
//! op checks this; a weight that *is* its master's buffer, an F32 weight handed out as `master.clone()`, is
//! allowed and written once). On the CPU the same call replaces the `&mut Tensor`s by fresh tensors (clones
//! keep the old values); callers must not depend on either behaviour of clones.

use std::collections::HashSet;

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

/// One parameter of [`adamw_step_multi`]: its fp32 state and compute weights (all written in place, see the module
/// docs), its gradient, and its own decoupled weight-decay factor.
pub struct AdamWParam<'a> {
    /// F32 master weights, updated in place.
    pub master: &'a mut Tensor,
    /// F32 first moment, updated in place.
    pub exp_avg: &'a mut Tensor,
    /// F32 second moment, updated in place.
    pub exp_avg_sq: &'a mut Tensor,
    /// F32 or BF16 gradient of the master's shape (read only).
    pub grad: &'a Tensor,
    /// F32 or BF16 compute weights of the master's shape, overwritten with the new master in their dtype.
    pub weight: &'a mut Tensor,
    /// `1 − lr·weight_decay` of this parameter (rounded to f32 once, as [`AdamWScalars::new`] does).
    pub decay: f32,
}

fn check_multi(params: &[AdamWParam<'_>]) -> Result<()> {
    let op = "adamw_step_multi";
    let mut all: Vec<&Tensor> = Vec::with_capacity(params.len() * 5);
    for p in params {
        all.extend([&*p.master, &*p.exp_avg, &*p.exp_avg_sq, p.grad, &*p.weight]);
    }
    Tensor::common_device(op, &all)?;
    for p in params {
        for t in [&*p.master, &*p.exp_avg, &*p.exp_avg_sq] {
            t.expect_dtype(op, DType::F32)?;
        }
        for t in [&*p.exp_avg, &*p.exp_avg_sq, p.grad, &*p.weight] {
            if t.shape() != p.master.shape() {
                return Err(KernelError::shape(
                    op,
                    format!("operand shape {:?} differs from the master's {:?}", t.shape(), p.master.shape()),
                ));
            }
        }
        for t in [p.grad, &*p.weight] {
            if !matches!(t.dtype(), DType::F32 | DType::BF16) {
                return Err(KernelError::DType { op, expected: DType::F32, got: t.dtype() });
            }
        }
    }
    Ok(())
}

/// The device addresses an [`adamw_step_multi`] call writes and reads, checked for sharing: every written buffer
/// (master, moments, weight unless it is its master's buffer) is distinct from every other buffer of the call.
/// Storages start at their allocation's base (no views with offsets), so equal addresses are the only overlap.
pub(crate) fn check_distinct(params: &[AdamWParam<'_>], addr: impl Fn(&Tensor) -> Result<u64>) -> Result<Vec<bool>> {
    let op = "adamw_step_multi";
    let mut written = HashSet::with_capacity(params.len() * 4);
    let mut weight_is_master = Vec::with_capacity(params.len());
    for p in params {
        let master = addr(p.master)?;
        let w = addr(p.weight)?;
        let same = w == master && p.weight.dtype() == DType::F32;
        weight_is_master.push(same);
        let mut outs = vec![master, addr(p.exp_avg)?, addr(p.exp_avg_sq)?];
        if !same {
            outs.push(w);
        }
        for a in outs {
            // Zero-size tensors have no buffer (address 0) and are never touched.
            if a != 0 && !written.insert(a) {
                return Err(KernelError::invalid(op, format!("two written tensors share the buffer {a:#x}")));
            }
        }
    }
    for p in params {
        let g = addr(p.grad)?;
        if g != 0 && written.contains(&g) {
            return Err(KernelError::invalid(op, format!("a gradient shares the written buffer {g:#x}")));
        }
    }
    Ok(weight_is_master)
}

/// One AdamW step of every parameter of `params` (see the module docs), in place. `s` holds the step's scalars
/// except the weight decay (its `decay` field is ignored: each parameter brings its own); `grad_scale` is the
/// clipping coefficient. On CUDA one launch updates the whole list (plus one small upload of its descriptor
/// table); nothing is allocated for the outputs. Every operand is checked first, so on error nothing changed.
pub fn adamw_step_multi(params: &mut [AdamWParam<'_>], s: &AdamWScalars, grad_scale: f32) -> Result<()> {
    if params.is_empty() {
        return Ok(());
    }
    check_multi(params)?;
    if params[0].master.is_cuda() {
        return crate::cuda::optim::adamw_step_multi(params, s, grad_scale);
    }
    // The CPU reference: the host loop per parameter, then every result assigned (nothing changes on error).
    let mut outs = Vec::with_capacity(params.len());
    for p in params.iter() {
        let (device, shape) = (p.master.device(), p.master.shape().to_vec());
        let mut master = p.master.to_vec_f32()?;
        let (mut m, mut v) = (p.exp_avg.to_vec_f32()?, p.exp_avg_sq.to_vec_f32()?);
        let sp = AdamWScalars { decay: p.decay, ..*s };
        adamw_update_host(&sp, grad_scale, &mut master, &p.grad.to_vec_f32()?, &mut m, &mut v);
        let master = Tensor::from_f32(master, &shape, &device)?;
        let weight = master.to_dtype(p.weight.dtype())?;
        outs.push((master, Tensor::from_f32(m, &shape, &device)?, Tensor::from_f32(v, &shape, &device)?, weight));
    }
    for (p, (master, m, v, w)) in params.iter_mut().zip(outs) {
        *p.master = master;
        *p.exp_avg = m;
        *p.exp_avg_sq = v;
        *p.weight = w;
    }
    Ok(())
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
    fn multi_step_equals_the_per_tensor_step() {
        let dev = Device::Cpu;
        let s = AdamWScalars::new(0.9, 0.95, 1e-8, 1e-3, 0.0, 2);
        let sizes: [(usize, f64, DType); 4] = [(1, 0.1, DType::F32), (37, 0.0, DType::BF16), (5, 0.3, DType::BF16), (0, 0.1, DType::F32)];
        let mut state = Vec::new();
        for (k, &(n, wd, wdt)) in sizes.iter().enumerate() {
            let t = |seed: u64, abs: bool| {
                let v: Vec<f32> = draw(n, seed + 10 * k as u64).iter().map(|x| if abs { x.abs() } else { *x }).collect();
                Tensor::from_f32(v, &[n], &dev).unwrap()
            };
            let master = t(1, false);
            let grad = if k == 1 { t(2, false).to_dtype(DType::BF16).unwrap() } else { t(2, false) };
            state.push((master.clone(), t(3, false), t(4, true), grad, master.to_dtype(wdt).unwrap(), wd));
        }
        // The per-tensor reference (f32 gradients: the bf16 one widened).
        let want: Vec<AdamWOut> = state
            .iter()
            .map(|(p, m, v, g, w, wd)| {
                let si = AdamWScalars::new(0.9, 0.95, 1e-8, 1e-3, *wd, 2);
                adamw_step(p, &g.to_dtype(DType::F32).unwrap(), m, v, &si, 0.5, w.dtype()).unwrap()
            })
            .collect();
        let mut list: Vec<AdamWParam<'_>> = state
            .iter_mut()
            .map(|(p, m, v, g, w, wd)| AdamWParam {
                master: p,
                exp_avg: m,
                exp_avg_sq: v,
                grad: g,
                weight: w,
                decay: AdamWScalars::new(0.9, 0.95, 1e-8, 1e-3, *wd, 2).decay,
            })
            .collect();
        adamw_step_multi(&mut list, &s, 0.5).unwrap();
        drop(list);
        for ((p, m, v, _, w, _), o) in state.iter().zip(&want) {
            assert_eq!(p.to_vec_f32().unwrap(), o.master.to_vec_f32().unwrap());
            assert_eq!(m.to_vec_f32().unwrap(), o.exp_avg.to_vec_f32().unwrap());
            assert_eq!(v.to_vec_f32().unwrap(), o.exp_avg_sq.to_vec_f32().unwrap());
            assert_eq!(w.dtype(), o.weight.dtype());
            assert_eq!(w.to_vec_f32().unwrap(), o.weight.to_vec_f32().unwrap());
        }
    }

    #[test]
    fn multi_step_checks_before_it_writes() {
        let dev = Device::Cpu;
        let s = AdamWScalars::new(0.9, 0.95, 1e-8, 1e-3, 0.0, 1);
        let f = |n: usize| Tensor::from_f32(vec![0.5; n], &[n], &dev).unwrap();
        let (mut p0, mut m0, mut v0, g0, mut w0) = (f(3), f(3), f(3), f(3), f(3));
        let (mut p1, mut m1, mut v1, g1, mut w1) = (f(4), f(4), f(4), f(3), f(4));
        let mut list = vec![
            AdamWParam { master: &mut p0, exp_avg: &mut m0, exp_avg_sq: &mut v0, grad: &g0, weight: &mut w0, decay: 1.0 },
            AdamWParam { master: &mut p1, exp_avg: &mut m1, exp_avg_sq: &mut v1, grad: &g1, weight: &mut w1, decay: 1.0 },
        ];
        assert!(adamw_step_multi(&mut list, &s, 1.0).is_err(), "grad shape differs");
        drop(list);
        assert_eq!(p0.to_vec_f32().unwrap(), vec![0.5; 3], "nothing changed");
        assert!(adamw_step_multi(&mut [], &s, 1.0).is_ok());
        // Written buffers must be distinct; addresses [master, m, v, grad, weight] stand in for device buffers.
        let distinct = |addrs: [u64; 5]| {
            let (mut p, mut m, mut v, g, mut w) = (f(2), f(2), f(2), f(2), f(2));
            let ids: Vec<(*const Tensor, u64)> = vec![
                (&p as *const Tensor, addrs[0]),
                (&m as *const Tensor, addrs[1]),
                (&v as *const Tensor, addrs[2]),
                (&g as *const Tensor, addrs[3]),
                (&w as *const Tensor, addrs[4]),
            ];
            let list = [AdamWParam { master: &mut p, exp_avg: &mut m, exp_avg_sq: &mut v, grad: &g, weight: &mut w, decay: 1.0 }];
            check_distinct(&list, |t| Ok(ids.iter().find(|(q, _)| std::ptr::eq(*q, t)).expect("known").1))
        };
        assert_eq!(distinct([1, 2, 3, 4, 5]).unwrap(), vec![false]);
        assert_eq!(distinct([1, 2, 3, 4, 1]).unwrap(), vec![true], "an f32 weight may be its master");
        assert!(distinct([1, 2, 2, 4, 5]).is_err(), "moments share a buffer");
        assert!(distinct([1, 2, 3, 2, 5]).is_err(), "the gradient is a written buffer");
        assert!(distinct([1, 2, 3, 4, 3]).is_err(), "the weight is a moment");
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
