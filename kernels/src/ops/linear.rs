//! Linear layers (GEMMs): `y = x·Wᵀ`, and the grouped variant used by MoE experts.
//!
//! Shapes (HF/PyTorch weight layout, `W` is `[out, in]`):
//! - [`linear_fwd`]: `x [n, in]`, `w [out, in]` → `y [n, out]`, `y = x·Wᵀ`.
//! - [`linear_bwd`]: `dy [n, out]` → `dx [n, in] = dy·W`, `dw [out, in] = dyᵀ·x`.
//! - [`grouped_linear_fwd`]: rows of `x [rows, in]` are split into consecutive groups by `offsets`
//!   (`offsets.len() == groups + 1`, `offsets[0] == 0`, `offsets[groups] == rows`, non-decreasing); group `g`
//!   (rows `offsets[g]..offsets[g+1]`) is multiplied by its own `ws[g] [out, in]`. Empty groups are allowed.
//!
//! All operands are f32 and on one device.

use crate::{DType, KernelError, Result, Tensor};

/// Gradients of [`linear_fwd`].
#[derive(Debug, Clone)]
pub struct LinearGrads {
    /// `[n, in]`
    pub dx: Tensor,
    /// `[out, in]`
    pub dw: Tensor,
}

fn check_linear(op: &'static str, x: &Tensor, w: &Tensor) -> Result<(usize, usize, usize)> {
    Tensor::common_device(op, &[x, w])?;
    x.expect_dtype(op, DType::F32)?;
    w.expect_dtype(op, DType::F32)?;
    x.expect_rank(op, "x", 2)?;
    w.expect_rank(op, "w", 2)?;
    let (n, k) = (x.shape()[0], x.shape()[1]);
    let (out, k2) = (w.shape()[0], w.shape()[1]);
    if k != k2 {
        return Err(KernelError::shape(
            op,
            format!(
                "x {:?} · wᵀ with w {:?}: inner dims differ",
                x.shape(),
                w.shape()
            ),
        ));
    }
    Ok((n, k, out))
}

/// `y [n, out] = x [n, in] · w [out, in]ᵀ`.
pub fn linear_fwd(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.is_cuda() {
        return crate::cuda::ops::linear_fwd(x, w);
    }
    check_linear("linear_fwd", x, w)?;
    Ok(Tensor::from_cpu(x.cpu()?.matmul(&w.cpu()?.t()?)?))
}

/// Backward of [`linear_fwd`]: `dx = dy·W`, `dw = dyᵀ·x`.
pub fn linear_bwd(dy: &Tensor, x: &Tensor, w: &Tensor) -> Result<LinearGrads> {
    let op = "linear_bwd";
    if x.is_cuda() {
        let (dx, dw) = crate::cuda::ops::linear_bwd(dy, x, w)?;
        return Ok(LinearGrads { dx, dw });
    }
    let (n, _, out) = check_linear(op, x, w)?;
    Tensor::common_device(op, &[dy, x])?;
    dy.expect_dtype(op, DType::F32)?;
    dy.expect_shape(op, "dy", &[n, out])?;
    let (dyc, xc, wc) = (dy.cpu()?, x.cpu()?, w.cpu()?);
    let dx = dyc.matmul(wc)?; // [n, out]·[out, in] = [n, in]
    let dw = dyc.t()?.matmul(xc)?; // [out, n]·[n, in] = [out, in]
    Ok(LinearGrads {
        dx: Tensor::from_cpu(dx),
        dw: Tensor::from_cpu(dw),
    })
}

/// `a [m, k] · b [k, n] → [m, n]` (plain matrix product).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let op = "matmul";
    if a.is_cuda() {
        return crate::cuda::ops::matmul(a, b);
    }
    Tensor::common_device(op, &[a, b])?;
    a.expect_dtype(op, DType::F32)?;
    b.expect_dtype(op, DType::F32)?;
    a.expect_rank(op, "a", 2)?;
    b.expect_rank(op, "b", 2)?;
    if a.shape()[1] != b.shape()[0] {
        return Err(KernelError::shape(
            op,
            format!("{:?} · {:?}", a.shape(), b.shape()),
        ));
    }
    Ok(Tensor::from_cpu(a.cpu()?.matmul(b.cpu()?)?))
}

fn check_groups(
    op: &'static str,
    x: &Tensor,
    ws: &[&Tensor],
    offsets: &[usize],
) -> Result<(usize, usize)> {
    x.expect_dtype(op, DType::F32)?;
    x.expect_rank(op, "x", 2)?;
    if ws.is_empty() {
        return Err(KernelError::invalid(op, "no weight groups"));
    }
    let rows = x.shape()[0];
    if offsets.len() != ws.len() + 1
        || offsets[0] != 0
        || offsets[ws.len()] != rows
        || offsets.windows(2).any(|p| p[0] > p[1])
    {
        return Err(KernelError::invalid(
            op,
            format!(
                "offsets {offsets:?} must be non-decreasing from 0 to rows={rows} with {} groups",
                ws.len()
            ),
        ));
    }
    let out = ws[0].shape().first().copied().unwrap_or(0);
    for (g, w) in ws.iter().enumerate() {
        w.expect_dtype(op, DType::F32)?;
        w.expect_shape(op, &format!("ws[{g}]"), &[out, x.shape()[1]])?;
    }
    let mut all: Vec<&Tensor> = ws.to_vec();
    all.push(x);
    Tensor::common_device(op, &all)?;
    Ok((rows, out))
}

/// Grouped `y [rows, out]`: rows `offsets[g]..offsets[g+1]` of `x [rows, in]` times `ws[g] [out, in]ᵀ`.
pub fn grouped_linear_fwd(x: &Tensor, ws: &[&Tensor], offsets: &[usize]) -> Result<Tensor> {
    let op = "grouped_linear_fwd";
    if x.is_cuda() {
        return crate::cuda::ops::grouped_linear_fwd(x, ws, offsets);
    }
    let (rows, out) = check_groups(op, x, ws, offsets)?;
    let mut parts = Vec::with_capacity(ws.len());
    for (g, w) in ws.iter().enumerate() {
        let len = offsets[g + 1] - offsets[g];
        if len > 0 {
            parts.push(linear_fwd(&x.narrow(0, offsets[g], len)?, w)?);
        }
    }
    if parts.is_empty() {
        return Tensor::zeros(&[rows, out], DType::F32, &x.device());
    }
    Tensor::cat(&parts.iter().collect::<Vec<_>>(), 0)
}

/// Backward of [`grouped_linear_fwd`]: `dx [rows, in]` and one `dw [out, in]` per group (zeros for empty groups).
pub fn grouped_linear_bwd(
    dy: &Tensor,
    x: &Tensor,
    ws: &[&Tensor],
    offsets: &[usize],
) -> Result<(Tensor, Vec<Tensor>)> {
    let op = "grouped_linear_bwd";
    if x.is_cuda() {
        return crate::cuda::ops::grouped_linear_bwd(dy, x, ws, offsets);
    }
    let (rows, out) = check_groups(op, x, ws, offsets)?;
    dy.expect_shape(op, "dy", &[rows, out])?;
    let mut dx_parts = Vec::new();
    let mut dws = Vec::with_capacity(ws.len());
    for (g, w) in ws.iter().enumerate() {
        let len = offsets[g + 1] - offsets[g];
        if len == 0 {
            dws.push(Tensor::zeros(w.shape(), DType::F32, &x.device())?);
            continue;
        }
        let gr = linear_bwd(
            &dy.narrow(0, offsets[g], len)?,
            &x.narrow(0, offsets[g], len)?,
            w,
        )?;
        dx_parts.push(gr.dx);
        dws.push(gr.dw);
    }
    let dx = if dx_parts.is_empty() {
        Tensor::zeros(x.shape(), DType::F32, &x.device())?
    } else {
        Tensor::cat(&dx_parts.iter().collect::<Vec<_>>(), 0)?
    };
    Ok((dx, dws))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    /// Naive f64 `x·Wᵀ`.
    fn naive(x: &[f64], w: &[f64], n: usize, k: usize, out: usize) -> Vec<f64> {
        let mut y = vec![0.0; n * out];
        for i in 0..n {
            for o in 0..out {
                y[i * out + o] = (0..k).map(|j| x[i * k + j] * w[o * k + j]).sum();
            }
        }
        y
    }

    #[test]
    fn forward_matches_naive_loops() {
        let mut r = rng(1);
        let (n, k, out) = (5, 7, 3);
        let (x, xv) = rand_tensor(&mut r, &[n, k], 1.0);
        let (w, wv) = rand_tensor(&mut r, &[out, k], 1.0);
        let y = linear_fwd(&x, &w).unwrap();
        assert_eq!(y.shape(), &[n, out]);
        assert_close(
            "y",
            &y.to_vec_f32().unwrap(),
            &naive(&f64s(&xv), &f64s(&wv), n, k, out),
            1e-6,
        );
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut r = rng(2);
        let (n, k, out) = (4, 6, 5);
        let (x, xv) = rand_tensor(&mut r, &[n, k], 1.0);
        let (w, wv) = rand_tensor(&mut r, &[out, k], 1.0);
        let (dy, dyv) = rand_tensor(&mut r, &[n, out], 1.0);
        let g = linear_bwd(&dy, &x, &w).unwrap();
        let (xd, wd, dyd) = (f64s(&xv), f64s(&wv), f64s(&dyv));
        let want_dx = fd_grad(&xd, 1e-6, |xp| dot(&dyd, &naive(xp, &wd, n, k, out)));
        let want_dw = fd_grad(&wd, 1e-6, |wp| dot(&dyd, &naive(&xd, wp, n, k, out)));
        assert_close("dx", &g.dx.to_vec_f32().unwrap(), &want_dx, 1e-5);
        assert_close("dw", &g.dw.to_vec_f32().unwrap(), &want_dw, 1e-5);
    }

    #[test]
    fn grouped_matches_per_group_linear_including_empty_groups() {
        let mut r = rng(3);
        let (k, out) = (4, 3);
        let offsets = [0, 2, 2, 5]; // group 1 is empty
        let (x, xv) = rand_tensor(&mut r, &[5, k], 1.0);
        let ws: Vec<(Tensor, Vec<f32>)> = (0..3)
            .map(|_| rand_tensor(&mut r, &[out, k], 1.0))
            .collect();
        let wrefs: Vec<&Tensor> = ws.iter().map(|w| &w.0).collect();
        let y = grouped_linear_fwd(&x, &wrefs, &offsets).unwrap();
        let mut want = Vec::new();
        for g in 0..3 {
            let (a, b) = (offsets[g], offsets[g + 1]);
            want.extend(naive(
                &f64s(&xv[a * k..b * k]),
                &f64s(&ws[g].1),
                b - a,
                k,
                out,
            ));
        }
        assert_close("grouped y", &y.to_vec_f32().unwrap(), &want, 1e-6);

        let (dy, dyv) = rand_tensor(&mut r, &[5, out], 1.0);
        let (dx, dws) = grouped_linear_bwd(&dy, &x, &wrefs, &offsets).unwrap();
        let dyd = f64s(&dyv);
        let wds: Vec<Vec<f64>> = ws.iter().map(|w| f64s(&w.1)).collect();
        let f = |xp: &[f64], wp: &[Vec<f64>]| {
            let mut y = Vec::new();
            for g in 0..3 {
                let (a, b) = (offsets[g], offsets[g + 1]);
                y.extend(naive(&xp[a * k..b * k], &wp[g], b - a, k, out));
            }
            dot(&dyd, &y)
        };
        let want_dx = fd_grad(&f64s(&xv), 1e-6, |xp| f(xp, &wds));
        assert_close("grouped dx", &dx.to_vec_f32().unwrap(), &want_dx, 1e-5);
        for g in [0, 2] {
            let want_dw = fd_grad(&wds[g], 1e-6, |wp| {
                let mut all = wds.clone();
                all[g] = wp.to_vec();
                f(&f64s(&xv), &all)
            });
            assert_close("grouped dw", &dws[g].to_vec_f32().unwrap(), &want_dw, 1e-5);
        }
        assert_eq!(
            dws[1].to_vec_f32().unwrap(),
            vec![0.0; out * k],
            "empty group gets a zero gradient"
        );
    }

    #[test]
    fn mismatched_inner_dims_are_rejected() {
        let mut r = rng(4);
        let (x, _) = rand_tensor(&mut r, &[2, 3], 1.0);
        let (w, _) = rand_tensor(&mut r, &[4, 5], 1.0);
        assert!(matches!(linear_fwd(&x, &w), Err(KernelError::Shape { .. })));
        assert!(grouped_linear_fwd(&x, &[&w], &[0, 1]).is_err());
    }
}
