//! Rotary position embedding, "rotate-half" convention as HF Qwen3 (`apply_rotary_pos_emb`).
//!
//! Shapes: `x [tokens, heads, head_dim]`, positions `[tokens]` (u32) → `y [tokens, heads, head_dim]`.
//! Positions are explicit per token, so packed sequences restart at 0 for every sample.
//!
//! Maths: with `h = head_dim/2`, `inv_freq_i = 1/θ^(2i/head_dim)` and `a_{t,i} = pos_t·inv_freq_i`, the two
//! halves `x₁ = x[..h]`, `x₂ = x[h..]` rotate as `y₁ = x₁·cos a − x₂·sin a`, `y₂ = x₂·cos a + x₁·sin a`.
//! This is an orthogonal map per `(t, i)` pair, so backward is the inverse rotation (`sin → −sin`).
//!
//! The table is computed the way HF does it (f32 `inv_freq`, f32 angle, f32 cos/sin), so logits agree with
//! transformers to f32 rounding.

use crate::{DType, Device, KernelError, Result, Tensor};

/// Per-token cos/sin of the rotation angles; build once per batch, share across layers, q and k.
#[derive(Debug, Clone)]
pub struct RopeTable {
    /// `[tokens, head_dim/2]`
    cos: Tensor,
    /// `[tokens, head_dim/2]`
    sin: Tensor,
    head_dim: usize,
}

impl RopeTable {
    /// Angles for `positions [tokens]` (u32) with base `theta` (HF `rope_theta`).
    pub fn new(positions: &Tensor, head_dim: usize, theta: f64) -> Result<Self> {
        let op = "RopeTable::new";
        positions.expect_dtype(op, DType::U32)?;
        positions.expect_rank(op, "positions", 1)?;
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(KernelError::invalid(
                op,
                format!("head_dim {head_dim} must be even and positive"),
            ));
        }
        if theta.is_nan() || theta <= 0.0 {
            return Err(KernelError::invalid(
                op,
                format!("theta {theta} must be positive"),
            ));
        }
        let half = head_dim / 2;
        // HF: inv_freq = 1.0 / (base ** (arange(0, dim, 2, float32) / dim)), all in f32.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let pos = positions.to_vec_u32()?;
        let mut cos = Vec::with_capacity(pos.len() * half);
        let mut sin = Vec::with_capacity(pos.len() * half);
        for &p in &pos {
            for &f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let device: Device = positions.device();
        let shape = [pos.len(), half];
        Ok(RopeTable {
            cos: Tensor::from_f32(cos, &shape, &device)?,
            sin: Tensor::from_f32(sin, &shape, &device)?,
            head_dim,
        })
    }

    /// Number of tokens the table covers.
    pub fn tokens(&self) -> usize {
        self.cos.shape()[0]
    }

    /// The head dim the table was built for.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
}

/// Rotates by `+angle` (`sign = 1`) or `−angle` (`sign = −1`).
fn rotate(op: &'static str, x: &Tensor, table: &RopeTable, sign: f64) -> Result<Tensor> {
    if x.is_cuda() {
        if x.rank() == 3 && (x.shape()[0] != table.tokens() || x.shape()[2] != table.head_dim) {
            return Err(KernelError::shape(
                op,
                format!(
                    "x {:?} vs table for {} tokens × head_dim {}",
                    x.shape(),
                    table.tokens(),
                    table.head_dim
                ),
            ));
        }
        return crate::cuda::ops::rope(op, x, &table.cos, &table.sin, sign as f32);
    }
    x.expect_dtype(op, DType::F32)?;
    x.expect_rank(op, "x", 3)?;
    Tensor::common_device(op, &[x, &table.cos])?;
    let (t, _, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    if t != table.tokens() || d != table.head_dim {
        return Err(KernelError::shape(
            op,
            format!(
                "x {:?} vs table for {} tokens × head_dim {}",
                x.shape(),
                table.tokens(),
                table.head_dim
            ),
        ));
    }
    let h = d / 2;
    let xc = x.cpu()?;
    let c = table.cos.cpu()?.reshape((t, 1, h))?;
    let s = table.sin.cpu()?.reshape((t, 1, h))?.affine(sign, 0.0)?;
    let x1 = xc.narrow(2, 0, h)?;
    let x2 = xc.narrow(2, h, h)?;
    let y1 = x1.broadcast_mul(&c)?.sub(&x2.broadcast_mul(&s)?)?;
    let y2 = x2.broadcast_mul(&c)?.add(&x1.broadcast_mul(&s)?)?;
    Ok(Tensor::from_cpu(candle_core::Tensor::cat(&[&y1, &y2], 2)?))
}

/// RoPE forward: `x [tokens, heads, head_dim]` → rotated `[tokens, heads, head_dim]`.
pub fn rope_fwd(x: &Tensor, table: &RopeTable) -> Result<Tensor> {
    rotate("rope_fwd", x, table, 1.0)
}

/// RoPE backward: `dy [tokens, heads, head_dim]` → `dx` (the inverse rotation of `dy`).
pub fn rope_bwd(dy: &Tensor, table: &RopeTable) -> Result<Tensor> {
    rotate("rope_bwd", dy, table, -1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    /// Naive f64 rotate-half, literally `x·cos + rotate_half(x)·sin` with `emb = cat(freqs, freqs)`.
    fn naive(x: &[f64], pos: &[u32], heads: usize, d: usize, theta: f64) -> Vec<f64> {
        let mut y = vec![0.0; x.len()];
        for (t, &p) in pos.iter().enumerate() {
            for hh in 0..heads {
                let base = (t * heads + hh) * d;
                for j in 0..d {
                    let i = j % (d / 2);
                    let a = p as f64 / theta.powf((2 * i) as f64 / d as f64);
                    let rot = if j < d / 2 {
                        -x[base + j + d / 2]
                    } else {
                        x[base + j - d / 2]
                    };
                    y[base + j] = x[base + j] * a.cos() + rot * a.sin();
                }
            }
        }
        y
    }

    #[test]
    fn forward_matches_naive_with_restarting_positions() {
        let mut r = rng(20);
        let pos = vec![0u32, 1, 2, 0, 1, 7]; // two packed samples, then an arbitrary position
        let (t, h, d) = (pos.len(), 3, 8);
        let (x, xv) = rand_tensor(&mut r, &[t, h, d], 1.0);
        let p = Tensor::from_u32(pos.clone(), &[t], &Device::Cpu).unwrap();
        let table = RopeTable::new(&p, d, 10_000.0).unwrap();
        let y = rope_fwd(&x, &table).unwrap();
        assert_close(
            "rope y",
            &y.to_vec_f32().unwrap(),
            &naive(&f64s(&xv), &pos, h, d, 10_000.0),
            1e-6,
        );
        // Position 0 is the identity.
        assert_eq!(&y.to_vec_f32().unwrap()[..h * d], &xv[..h * d]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut r = rng(21);
        let pos = vec![3u32, 0, 5, 11];
        let (t, h, d) = (pos.len(), 2, 6);
        let (x, xv) = rand_tensor(&mut r, &[t, h, d], 1.0);
        let (dy, dyv) = rand_tensor(&mut r, &[t, h, d], 1.0);
        let p = Tensor::from_u32(pos.clone(), &[t], &Device::Cpu).unwrap();
        let table = RopeTable::new(&p, d, 1_000_000.0).unwrap();
        let dx = rope_bwd(&dy, &table).unwrap();
        let dyd = f64s(&dyv);
        let want = fd_grad(&f64s(&xv), 1e-6, |xp| {
            dot(&dyd, &naive(xp, &pos, h, d, 1_000_000.0))
        });
        assert_close("rope dx", &dx.to_vec_f32().unwrap(), &want, 1e-5);
        // Backward inverts forward.
        let back = rope_bwd(&rope_fwd(&x, &table).unwrap(), &table).unwrap();
        assert_close("inverse", &back.to_vec_f32().unwrap(), &f64s(&xv), 1e-6);
    }

    #[test]
    fn odd_head_dim_and_token_mismatch_are_rejected() {
        let p = Tensor::from_u32(vec![0, 1], &[2], &Device::Cpu).unwrap();
        assert!(RopeTable::new(&p, 5, 1e4).is_err());
        let table = RopeTable::new(&p, 4, 1e4).unwrap();
        let x = Tensor::full(0.5, &[3, 1, 4], &Device::Cpu).unwrap();
        assert!(matches!(
            rope_fwd(&x, &table),
            Err(KernelError::Shape { .. })
        ));
    }
}
