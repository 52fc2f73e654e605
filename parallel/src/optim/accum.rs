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

/// `acc[name] += factor · g` for every gradient of `grads`, in f32 on the gradients' device (a gradient of another
/// dtype is cast first; a name seen for the first time starts its sum). The device-side counterpart of
/// [`accumulate`] + [`scale`] for micro-batch gradients weighted `W_m / W`.
pub fn accumulate_scaled(
    acc: &mut crate::model::NamedTensors,
    grads: crate::model::NamedTensors,
    factor: f32,
) -> qkernels::Result<()> {
    for (name, t) in grads {
        let mut g = if t.dtype() == qkernels::DType::F32 {
            t
        } else {
            t.to_dtype(qkernels::DType::F32)?
        };
        if factor != 1.0 {
            g = g.scale(factor)?;
        }
        match acc.get_mut(&name) {
            Some(a) => a.add_assign(&g)?,
            None => {
                acc.insert(name, g);
            }
        }
    }
    Ok(())
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
