//! Gradient accumulation over micro-batches, in fp32 (Megatron's `main_grad`).
//!
//! The loss of a global batch is `Σ w·CE / Σ w` over all its tokens (see tests/fixtures/README.md). To get the
//! same gradient from micro-batches: let each micro-batch backpropagate its *unnormalised* `Σ w·CE` (plus, for MoE,
//! its share of the aux loss), [`accumulate`] the gradients, then [`scale`] the sum by `1 / Σ w` of the whole global
//! batch (all micro-batches, all data-parallel ranks). Averaging per-micro-batch means instead weights tokens
//! unequally when micro-batches have different `Σ w`.

use super::OptimError;

/// `dst += src`, elementwise.
pub fn accumulate(dst: &mut [f32], src: &[f32]) -> Result<(), OptimError> {
    if dst.len() != src.len() {
        return Err(OptimError::BufferLength {
            dst: dst.len(),
            src: src.len(),
        });
    }
    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
    Ok(())
}

/// `buf *= factor`, elementwise.
pub fn scale(buf: &mut [f32], factor: f32) {
    buf.iter_mut().for_each(|x| *x *= factor);
}

/// `buf = 0`.
pub fn zero(buf: &mut [f32]) {
    buf.fill(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulate_then_normalise() {
        let mut acc = vec![0.0f32; 2];
        accumulate(&mut acc, &[1.0, 2.0]).unwrap();
        accumulate(&mut acc, &[3.0, -2.0]).unwrap();
        scale(&mut acc, 0.5);
        assert_eq!(acc, vec![2.0, 0.0]);
        assert_eq!(
            accumulate(&mut acc, &[1.0]),
            Err(OptimError::BufferLength { dst: 2, src: 1 })
        );
        zero(&mut acc);
        assert_eq!(acc, vec![0.0, 0.0]);
    }
}
