//! SwiGLU activation of the Qwen3 MLP: `h = silu(gate) ⊙ up`.
//!
//! Shapes: `gate [tokens, ffn]`, `up [tokens, ffn]` → `h [tokens, ffn]` (any equal shapes work).
//!
//! Maths: `silu(g) = g·σ(g)`, `silu'(g) = σ(g)·(1 + g·(1 − σ(g)))`;
//! backward `dgate = dh ⊙ up ⊙ silu'(gate)`, `dup = dh ⊙ silu(gate)`.

use crate::{DType, KernelError, Result, Tensor};

/// Gradients of [`swiglu_fwd`].
#[derive(Debug, Clone)]
pub struct SwigluGrads {
    /// same shape as `gate`
    pub dgate: Tensor,
    /// same shape as `up`
    pub dup: Tensor,
}

fn check(op: &'static str, gate: &Tensor, up: &Tensor) -> Result<()> {
    Tensor::common_device(op, &[gate, up])?;
    gate.expect_dtype(op, DType::F32)?;
    up.expect_dtype(op, DType::F32)?;
    if gate.shape() != up.shape() {
        return Err(KernelError::shape(
            op,
            format!("gate {:?} vs up {:?}", gate.shape(), up.shape()),
        ));
    }
    Ok(())
}

/// `h = silu(gate) ⊙ up`.
pub fn swiglu_fwd(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.is_cuda() {
        return crate::cuda::ops::swiglu_fwd(gate, up);
    }
    check("swiglu_fwd", gate, up)?;
    Ok(Tensor::from_cpu(gate.cpu()?.silu()?.mul(up.cpu()?)?))
}

/// Backward of [`swiglu_fwd`] given `dh` and the forward inputs.
pub fn swiglu_bwd(dh: &Tensor, gate: &Tensor, up: &Tensor) -> Result<SwigluGrads> {
    let op = "swiglu_bwd";
    if gate.is_cuda() {
        let (dgate, dup) = crate::cuda::ops::swiglu_bwd(dh, gate, up)?;
        return Ok(SwigluGrads { dgate, dup });
    }
    check(op, gate, up)?;
    dh.expect_shape(op, "dh", gate.shape())?;
    let (g, u, d) = (gate.cpu()?, up.cpu()?, dh.cpu()?);
    let sig = g.neg()?.exp()?.affine(1.0, 1.0)?.recip()?; // σ(g)
    let silu = g.mul(&sig)?;
    // σ·(1 + g·(1 − σ)) = σ + silu·(1 − σ)
    let dsilu = sig.add(&silu.mul(&sig.affine(-1.0, 1.0)?)?)?;
    let dgate = d.mul(u)?.mul(&dsilu)?;
    let dup = d.mul(&silu)?;
    Ok(SwigluGrads {
        dgate: Tensor::from_cpu(dgate),
        dup: Tensor::from_cpu(dup),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    fn naive(g: &[f64], u: &[f64]) -> Vec<f64> {
        g.iter()
            .zip(u)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect()
    }

    #[test]
    fn forward_and_backward_match_reference() {
        let mut r = rng(30);
        let (g, gv) = rand_tensor(&mut r, &[4, 7], 4.0);
        let (u, uv) = rand_tensor(&mut r, &[4, 7], 2.0);
        let (dh, dhv) = rand_tensor(&mut r, &[4, 7], 1.0);
        let (gd, ud, dhd) = (f64s(&gv), f64s(&uv), f64s(&dhv));
        let h = swiglu_fwd(&g, &u).unwrap();
        assert_close("h", &h.to_vec_f32().unwrap(), &naive(&gd, &ud), 1e-6);
        let gr = swiglu_bwd(&dh, &g, &u).unwrap();
        let want_dg = fd_grad(&gd, 1e-6, |gp| dot(&dhd, &naive(gp, &ud)));
        let want_du = fd_grad(&ud, 1e-6, |up| dot(&dhd, &naive(&gd, up)));
        assert_close("dgate", &gr.dgate.to_vec_f32().unwrap(), &want_dg, 1e-5);
        assert_close("dup", &gr.dup.to_vec_f32().unwrap(), &want_du, 1e-5);
    }
}
