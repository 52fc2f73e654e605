//! Global gradient-norm clipping, as `torch.nn.utils.clip_grad_norm_` (L2) and Megatron's `clip_grad_norm_fp32`.
//!
//! `norm = sqrt(Σ_tensors Σ_i g_i²)`; if it exceeds `max_norm`, every gradient is multiplied by
//! `min(1, max_norm / (norm + 1e-6))` (computed in f32 like torch). The pre-clip norm is returned, so callers log
//! it and skip the step when it is not finite (then nothing is scaled).
//!
//! With data / tensor / pipeline parallelism the norm covers the whole model: each rank computes
//! [`sum_of_squares`] over the gradient elements it owns (counting a replicated tensor on one rank only),
//! the sums are all-reduced, and every rank applies [`clip_coefficient`] of `sqrt(total)` with [`scale_grads`].

/// The `1e-6` torch and Megatron add to the norm before dividing.
pub const TORCH_CLIP_EPS: f32 = 1e-6;

/// `Σ g²` over all buffers, accumulated in f64.
pub fn sum_of_squares(grads: &[&[f32]]) -> f64 {
    grads
        .iter()
        .map(|g| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        .sum()
}

/// Global L2 norm of all buffers.
pub fn global_grad_norm(grads: &[&[f32]]) -> f64 {
    sum_of_squares(grads).sqrt()
}

/// The factor torch multiplies gradients by: `min(1, max_norm / (norm + 1e-6))` in f32. 1 when `norm` is not
/// finite (the step is to be skipped, not clipped).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f32 {
    if !norm.is_finite() {
        return 1.0;
    }
    let coef = max_norm as f32 / (norm as f32 + TORCH_CLIP_EPS);
    coef.min(1.0)
}

/// Multiplies every buffer by `coef` (no-op for exactly 1).
pub fn scale_grads(grads: &mut [&mut [f32]], coef: f32) {
    if coef == 1.0 {
        return;
    }
    for g in grads.iter_mut() {
        g.iter_mut().for_each(|x| *x *= coef);
    }
}

/// Clips the global norm of `grads` to `max_norm` in place; returns the pre-clip norm.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f64 {
    let views: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
    let norm = global_grad_norm(&views);
    scale_grads(grads, clip_coefficient(norm, max_norm));
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_only_above_max() {
        let mut a = vec![3.0f32, 0.0];
        let mut b = vec![4.0f32];
        let norm = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
        assert_eq!(norm, 5.0);
        let c = 1.0f32 / (5.0 + 1e-6);
        assert_eq!((a[0], b[0]), (3.0 * c, 4.0 * c));
        let mut small = vec![0.3f32, 0.4];
        assert!((clip_grad_norm(&mut [&mut small], 1.0) - 0.5).abs() < 1e-7);
        assert_eq!(small, vec![0.3, 0.4]);
    }

    #[test]
    fn non_finite_norm_leaves_grads() {
        let mut a = vec![f32::INFINITY, 1.0];
        assert!(clip_grad_norm(&mut [&mut a], 1.0).is_infinite());
        assert_eq!(a[1], 1.0);
        let mut n = vec![f32::NAN];
        assert!(clip_grad_norm(&mut [&mut n], 1.0).is_nan());
    }
}
