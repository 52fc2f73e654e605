//! Token embedding lookup and its scatter-add backward.
//!
//! Shapes: `ids [tokens]` (u32, each `< vocab`), `table [vocab, hidden]` → `x [tokens, hidden]`.
//! Backward: `dtable [vocab, hidden]` with `dtable[v] = Σ_{t: ids[t] = v} dx[t]` (rows of unused ids are zero).

use crate::{DType, KernelError, Result, Tensor};

fn check_ids(op: &'static str, ids: &Tensor, vocab: usize) -> Result<()> {
    ids.expect_dtype(op, DType::U32)?;
    ids.expect_rank(op, "ids", 1)?;
    if let Some(bad) = ids.to_vec_u32()?.into_iter().find(|&i| i as usize >= vocab) {
        return Err(KernelError::invalid(
            op,
            format!("token id {bad} >= vocab size {vocab}"),
        ));
    }
    Ok(())
}

/// `x [tokens, hidden] = table[ids]`.
pub fn embedding_fwd(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    let op = "embedding_fwd";
    if table.is_cuda() {
        return crate::cuda::ops::embedding_fwd(ids, table);
    }
    Tensor::common_device(op, &[ids, table])?;
    table.expect_dtype(op, DType::F32)?;
    table.expect_rank(op, "table", 2)?;
    check_ids(op, ids, table.shape()[0])?;
    Ok(Tensor::from_cpu(table.cpu()?.index_select(ids.cpu()?, 0)?))
}

/// `dtable [vocab, hidden]`: scatter-add of `dx [tokens, hidden]` into the rows named by `ids`.
pub fn embedding_bwd(ids: &Tensor, dx: &Tensor, vocab: usize) -> Result<Tensor> {
    let op = "embedding_bwd";
    if dx.is_cuda() {
        return crate::cuda::ops::embedding_bwd(ids, dx, vocab);
    }
    Tensor::common_device(op, &[ids, dx])?;
    dx.expect_dtype(op, DType::F32)?;
    dx.expect_rank(op, "dx", 2)?;
    check_ids(op, ids, vocab)?;
    if dx.shape()[0] != ids.shape()[0] {
        return Err(KernelError::shape(
            op,
            format!("dx {:?} vs ids {:?}", dx.shape(), ids.shape()),
        ));
    }
    let zeros = candle_core::Tensor::zeros(
        (vocab, dx.shape()[1]),
        candle_core::DType::F32,
        dx.cpu()?.device(),
    )?;
    Ok(Tensor::from_cpu(zeros.index_add(
        ids.cpu()?,
        dx.cpu()?,
        0,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;
    use crate::test_util::*;

    #[test]
    fn lookup_and_scatter_add_with_repeated_ids() {
        let mut r = rng(50);
        let (vocab, hidden) = (6, 3);
        let (table, tv) = rand_tensor(&mut r, &[vocab, hidden], 1.0);
        let idv = vec![4u32, 1, 4, 0, 4];
        let ids = Tensor::from_u32(idv.clone(), &[5], &Device::Cpu).unwrap();
        let x = embedding_fwd(&ids, &table).unwrap();
        let want: Vec<f64> = idv
            .iter()
            .flat_map(|&i| f64s(&tv[i as usize * hidden..(i as usize + 1) * hidden]))
            .collect();
        assert_close("x", &x.to_vec_f32().unwrap(), &want, 0.0 + 1e-12);

        let (dx, dxv) = rand_tensor(&mut r, &[5, hidden], 1.0);
        let dt = embedding_bwd(&ids, &dx, vocab).unwrap();
        // Finite differences of ⟨dx, table[ids]⟩ with respect to the table.
        let dxd = f64s(&dxv);
        let want_dt = fd_grad(&f64s(&tv), 1e-6, |t| {
            let xs: Vec<f64> = idv
                .iter()
                .flat_map(|&i| t[i as usize * hidden..(i as usize + 1) * hidden].to_vec())
                .collect();
            dot(&dxd, &xs)
        });
        assert_close("dtable", &dt.to_vec_f32().unwrap(), &want_dt, 1e-6);
        let dtv = dt.to_vec_f32().unwrap();
        assert_eq!(
            &dtv[2 * hidden..4 * hidden],
            &[0.0; 6],
            "unused ids get zero rows"
        );
        assert!((dtv[4 * hidden] - (dxv[0] + dxv[2 * hidden] + dxv[4 * hidden])).abs() < 1e-6);
    }

    #[test]
    fn out_of_range_id_is_a_typed_error() {
        let table = Tensor::full(0.5, &[3, 2], &Device::Cpu).unwrap();
        let ids = Tensor::from_u32(vec![1, 3], &[2], &Device::Cpu).unwrap();
        assert!(matches!(
            embedding_fwd(&ids, &table),
            Err(KernelError::InvalidArgument { .. })
        ));
    }
}
