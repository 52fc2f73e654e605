//! RMSNorm over the last dimension, as HF Qwen3's `Qwen3RMSNorm`.
//!
//! Shapes: `x [..., d]`, `w [d]` → `y [..., d]`, plus `rstd [...]` (one value per row, saved for backward).
//! The same op serves the hidden-size norms (`x [tokens, hidden]`) and the per-head `q_norm`/`k_norm`
//! (`x [tokens, heads, head_dim]`, `w [head_dim]`).
//!
//! Maths (per row `x ∈ ℝᵈ`): `rstd = 1/√(mean(x²) + eps)`, `x̂ = x·rstd`, `y = w ⊙ x̂`.
//! Backward with `g = dy ⊙ w`: `dx = rstd·(g − x̂·mean(g ⊙ x̂))`, `dw = Σ_rows dy ⊙ x̂`.

use crate::{DType, KernelError, Result, Tensor};

/// Output of [`rmsnorm_fwd`].
#[derive(Debug, Clone)]
pub struct RmsNormOut {
    /// `[..., d]`, same shape as `x`.
    pub y: Tensor,
    /// `[...]`: `x`'s shape without the last dim.
    pub rstd: Tensor,
}

/// Gradients of [`rmsnorm_fwd`].
#[derive(Debug, Clone)]
pub struct RmsNormGrads {
    /// `[..., d]`
    pub dx: Tensor,
    /// `[d]`
    pub dw: Tensor,
}

fn check(op: &'static str, x: &Tensor, w: &Tensor) -> Result<usize> {
    Tensor::common_device(op, &[x, w])?;
    x.expect_dtype(op, DType::F32)?;
    w.expect_dtype(op, DType::F32)?;
    let d = *x
        .shape()
        .last()
        .ok_or_else(|| KernelError::shape(op, "x is a scalar"))?;
    w.expect_shape(op, "w", &[d])?;
    Ok(d)
}

/// RMSNorm forward (see module docs).
pub fn rmsnorm_fwd(x: &Tensor, w: &Tensor, eps: f64) -> Result<RmsNormOut> {
    let op = "rmsnorm_fwd";
    if x.is_cuda() {
        let (y, rstd) = crate::cuda::ops::rmsnorm_fwd(x, w, eps)?;
        return Ok(RmsNormOut { y, rstd });
    }
    let d = check(op, x, w)?;
    let rows = x.elem_count() / d.max(1);
    let xc = x.cpu()?.reshape((rows, d))?;
    let rstd = xc
        .sqr()?
        .mean_keepdim(1)?
        .affine(1.0, eps)?
        .sqrt()?
        .recip()?; // [rows, 1]
    // HF order: (x · rstd) first, then · w.
    let y = xc
        .broadcast_mul(&rstd)?
        .broadcast_mul(w.cpu()?)?
        .reshape(x.shape())?;
    let rstd = rstd.reshape(&x.shape()[..x.rank() - 1])?;
    Ok(RmsNormOut {
        y: Tensor::from_cpu(y),
        rstd: Tensor::from_cpu(rstd),
    })
}

/// RMSNorm backward (see module docs). `x`, `w`, `rstd` are the forward's input, weight and saved `rstd`.
pub fn rmsnorm_bwd(dy: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor) -> Result<RmsNormGrads> {
    let op = "rmsnorm_bwd";
    if x.is_cuda() {
        let (dx, dw) = crate::cuda::ops::rmsnorm_bwd(dy, x, w, rstd)?;
        return Ok(RmsNormGrads { dx, dw });
    }
    let d = check(op, x, w)?;
    dy.expect_shape(op, "dy", x.shape())?;
    rstd.expect_shape(op, "rstd", &x.shape()[..x.rank() - 1])?;
    Tensor::common_device(op, &[dy, x, rstd])?;
    let rows = x.elem_count() / d.max(1);
    let xc = x.cpu()?.reshape((rows, d))?;
    let dyc = dy.cpu()?.reshape((rows, d))?;
    let r = rstd.cpu()?.reshape((rows, 1))?;
    let xhat = xc.broadcast_mul(&r)?; // [rows, d]
    let g = dyc.broadcast_mul(w.cpu()?)?; // [rows, d]
    let m = g.mul(&xhat)?.mean_keepdim(1)?; // [rows, 1]
    let dx = g
        .sub(&xhat.broadcast_mul(&m)?)?
        .broadcast_mul(&r)?
        .reshape(x.shape())?;
    let dw = dyc.mul(&xhat)?.sum(0)?; // [d]
    Ok(RmsNormGrads {
        dx: Tensor::from_cpu(dx),
        dw: Tensor::from_cpu(dw),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    fn naive(x: &[f64], w: &[f64], d: usize, eps: f64) -> Vec<f64> {
        x.chunks(d)
            .flat_map(|row| {
                let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
                let r = 1.0 / (ms + eps).sqrt();
                row.iter().zip(w).map(move |(v, wi)| v * r * wi)
            })
            .collect()
    }

    #[test]
    fn forward_matches_naive_and_rstd_is_per_row() {
        let mut r = rng(10);
        let (x, xv) = rand_tensor(&mut r, &[3, 2, 8], 2.0); // per-head form: [tokens, heads, head_dim]
        let (w, wv) = rand_tensor(&mut r, &[8], 1.5);
        let out = rmsnorm_fwd(&x, &w, 1e-6).unwrap();
        assert_eq!(out.rstd.shape(), &[3, 2]);
        assert_close(
            "y",
            &out.y.to_vec_f32().unwrap(),
            &naive(&f64s(&xv), &f64s(&wv), 8, 1e-6),
            1e-6,
        );
        let row0 = &xv[..8];
        let want_r0 =
            1.0 / (row0.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 8.0 + 1e-6).sqrt();
        assert!((out.rstd.to_vec_f32().unwrap()[0] as f64 - want_r0).abs() < 1e-5 * want_r0);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut r = rng(11);
        let d = 6;
        let (x, xv) = rand_tensor(&mut r, &[5, d], 1.0);
        let (w, wv) = rand_tensor(&mut r, &[d], 1.0);
        let (dy, dyv) = rand_tensor(&mut r, &[5, d], 1.0);
        let eps = 1e-5;
        let out = rmsnorm_fwd(&x, &w, eps).unwrap();
        let g = rmsnorm_bwd(&dy, &x, &w, &out.rstd).unwrap();
        let (xd, wd, dyd) = (f64s(&xv), f64s(&wv), f64s(&dyv));
        let want_dx = fd_grad(&xd, 1e-6, |xp| dot(&dyd, &naive(xp, &wd, d, eps)));
        let want_dw = fd_grad(&wd, 1e-6, |wp| dot(&dyd, &naive(&xd, wp, d, eps)));
        assert_close("dx", &g.dx.to_vec_f32().unwrap(), &want_dx, 1e-5);
        assert_close("dw", &g.dw.to_vec_f32().unwrap(), &want_dw, 1e-5);
    }

    #[test]
    fn weight_of_wrong_size_is_rejected() {
        let mut r = rng(12);
        let (x, _) = rand_tensor(&mut r, &[2, 4], 1.0);
        let (w, _) = rand_tensor(&mut r, &[3], 1.0);
        assert!(matches!(
            rmsnorm_fwd(&x, &w, 1e-6),
            Err(KernelError::Shape { .. })
        ));
    }
}
