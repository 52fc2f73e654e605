//! Helpers shared by the op tests: seeded random inputs, f64 finite differences, norm-relative errors.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Device, Tensor};

/// A seeded RNG, so every test draws the same inputs on every run.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in `[-scale, scale)`, never exactly 0 or ±1 in practice.
pub fn uniform(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

/// An f32 CPU tensor of `shape` with values uniform in `[-scale, scale)`.
pub fn rand_tensor(rng: &mut StdRng, shape: &[usize], scale: f32) -> (Tensor, Vec<f32>) {
    let n = shape.iter().product();
    let v = uniform(rng, n, scale);
    (Tensor::from_f32(v.clone(), shape, &Device::Cpu).unwrap(), v)
}

/// Widens to f64.
pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// `‖got − want‖₂ / ‖want‖₂` (plain `‖got − want‖₂` when `want` is all zeros).
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = want.iter().map(|w| w * w).sum::<f64>().sqrt();
    if norm == 0.0 { diff } else { diff / norm }
}

/// Asserts `rel_err(got, want) < tol`, naming `what` on failure.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let e = rel_err(got, want);
    assert!(e < tol, "{what}: relative error {e:.3e} >= {tol:.1e}");
    assert!(
        want.iter().any(|&w| w != 0.0),
        "{what}: reference is all zeros, the test proves nothing"
    );
}

/// Central finite-difference gradient of the scalar `f` at `x` (all in f64).
pub fn fd_grad(x: &[f64], eps: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + eps;
            let up = f(&xp);
            xp[i] = orig - eps;
            let down = f(&xp);
            xp[i] = orig;
            (up - down) / (2.0 * eps)
        })
        .collect()
}

/// `Σ a_i b_i` in f64: the scalar objective `L = ⟨dy, f(x)⟩` whose gradient a backward computes.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
