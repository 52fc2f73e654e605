//! Row argmax for greedy decoding on the device: `x [R, C]` (f32, or bf16 on CUDA) → `[R]` u32, the first index
//! of each row's maximum (ties go to the smallest index; a row with no value above -inf gives 0). Only the ids
//! cross to the host, instead of `R × C` logits.

use crate::{DType, KernelError, Result, Tensor};

/// See the module docs.
pub fn argmax_rows(x: &Tensor) -> Result<Tensor> {
    let op = "argmax_rows";
    let &[rows, cols] = x.shape() else {
        return Err(KernelError::shape(
            op,
            format!("x must be [rows, cols], got {:?}", x.shape()),
        ));
    };
    if cols == 0 || cols > i32::MAX as usize {
        return Err(KernelError::invalid(op, format!("{cols} columns")));
    }
    if x.is_cuda() {
        return crate::cuda::paged::argmax_rows(x, rows, cols);
    }
    x.expect_dtype(op, DType::F32)?;
    let v = x.to_vec_f32()?;
    let ids = v
        .chunks(cols)
        .map(|row| {
            let mut best = 0;
            for (i, &y) in row.iter().enumerate() {
                if y > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect();
    Tensor::from_u32(ids, &[rows], &x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    #[test]
    fn first_maximum_of_every_row() {
        let x = Tensor::from_f32(
            vec![
                1.0, 3.0, 3.0, -1.0, -5.0, -2.0, -2.0, -9.0, 0.5, 0.25, 0.5, 0.75,
            ],
            &[3, 4],
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            argmax_rows(&x).unwrap().to_vec_u32().unwrap(),
            vec![1, 1, 3]
        );
        assert!(argmax_rows(&x.reshape(&[12]).unwrap()).is_err());
    }
}
