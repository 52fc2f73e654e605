//! MoE token permutation: gather the tokens routed to each expert into one contiguous block per expert, and
//! scatter the expert outputs back, weighted by the routing weights.
//!
//! Shapes: `topk_idx [tokens, k]` (u32) → a [`MoePlan`]; `x [tokens, hidden]` →
//! [`moe_permute`] → `xp [tokens·k, hidden]`, rows grouped by expert (expert 0's rows first; inside one expert,
//! in (token, slot) order, so the layout is deterministic). Expert `e` owns rows
//! `plan.expert_offsets[e]..plan.expert_offsets[e+1]` (feed them to
//! [`grouped_linear_fwd`](crate::ops::linear::grouped_linear_fwd)).
//! [`moe_unpermute`]: `yp [tokens·k, hidden]`, `weights [tokens, k]` → `y [tokens, hidden]`,
//! `y_t = Σ_j weights[t, j] · yp[row(t, j)]`.
//!
//! [`moe_plan`] on CUDA counts and sorts on the device (`kernels/cuda/router.cu`, the same layout) and reads back
//! only the `[experts + 1]` counts that `expert_offsets` needs on the host.
//!
//! Backward: permute is a gather, so its backward is a scatter-add over the `k` copies of each token;
//! unpermute's backward gives `dyp[row(t, j)] = weights[t, j]·dy_t` and `dweights[t, j] = ⟨dy_t, yp[row(t, j)]⟩`.

use crate::{DType, KernelError, Result, Tensor};

/// Where each (token, slot) pair goes in the expert-grouped layout.
#[derive(Debug, Clone)]
pub struct MoePlan {
    /// Number of experts.
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Number of tokens.
    pub tokens: usize,
    /// `[experts + 1]` (host): expert `e` owns permuted rows `expert_offsets[e]..expert_offsets[e+1]`.
    pub expert_offsets: Vec<usize>,
    /// `[tokens·k]` (u32): the token of each permuted row.
    row_token: Tensor,
    /// `[tokens·k]` (u32): the permuted row of each flat slot `t·k + j`.
    slot_row: Tensor,
    /// `[tokens·k]` (u32): the flat slot of each permuted row (inverse of `slot_row`).
    row_slot: Tensor,
}

impl MoePlan {
    /// Rows routed to expert `e`.
    pub fn expert_count(&self, e: usize) -> usize {
        self.expert_offsets[e + 1] - self.expert_offsets[e]
    }
}

/// Builds the permutation for `topk_idx [tokens, k]` over `num_experts` experts.
pub fn moe_plan(topk_idx: &Tensor, num_experts: usize) -> Result<MoePlan> {
    let op = "moe_plan";
    topk_idx.expect_dtype(op, DType::U32)?;
    topk_idx.expect_rank(op, "topk_idx", 2)?;
    let (t, k) = (topk_idx.shape()[0], topk_idx.shape()[1]);
    if topk_idx.is_cuda() {
        // Counting and the stable sort on the device; only the [E+1] counts come back.
        let (expert_offsets, row_token, slot_row, row_slot) =
            crate::cuda::router::moe_plan(topk_idx, num_experts)?;
        return Ok(MoePlan {
            num_experts,
            top_k: k,
            tokens: t,
            expert_offsets,
            row_token,
            slot_row,
            row_slot,
        });
    }
    let idx = topk_idx.to_vec_u32()?;
    if let Some(bad) = idx.iter().find(|&&i| i as usize >= num_experts) {
        return Err(KernelError::invalid(
            op,
            format!("expert index {bad} >= num_experts {num_experts}"),
        ));
    }
    let mut offsets = vec![0usize; num_experts + 1];
    for &i in &idx {
        offsets[i as usize + 1] += 1;
    }
    for e in 0..num_experts {
        offsets[e + 1] += offsets[e];
    }
    let mut next = offsets.clone();
    let mut row_token = vec![0u32; t * k];
    let mut slot_row = vec![0u32; t * k];
    let mut row_slot = vec![0u32; t * k];
    for (slot, &e) in idx.iter().enumerate() {
        let row = next[e as usize];
        next[e as usize] += 1;
        row_token[row] = (slot / k) as u32;
        slot_row[slot] = row as u32;
        row_slot[row] = slot as u32;
    }
    let dev = topk_idx.device();
    Ok(MoePlan {
        num_experts,
        top_k: k,
        tokens: t,
        expert_offsets: offsets,
        row_token: Tensor::from_u32(row_token, &[t * k], &dev)?,
        slot_row: Tensor::from_u32(slot_row, &[t * k], &dev)?,
        row_slot: Tensor::from_u32(row_slot, &[t * k], &dev)?,
    })
}

fn check_rows(op: &'static str, t: &Tensor, what: &str, rows: usize) -> Result<usize> {
    t.expect_dtype(op, DType::F32)?;
    t.expect_rank(op, what, 2)?;
    if t.shape()[0] != rows {
        return Err(KernelError::shape(
            op,
            format!("{what} {:?} must have {rows} rows", t.shape()),
        ));
    }
    Ok(t.shape()[1])
}

/// `xp [tokens·k, hidden]`: token rows copied into the expert-grouped layout.
pub fn moe_permute(x: &Tensor, plan: &MoePlan) -> Result<Tensor> {
    if x.is_cuda() {
        return crate::cuda::ops::moe_permute(x, &plan.row_token, plan.tokens);
    }
    check_rows("moe_permute", x, "x", plan.tokens)?;
    Ok(Tensor::from_cpu(
        x.cpu()?.index_select(plan.row_token.cpu()?, 0)?,
    ))
}

/// Backward of [`moe_permute`]: `dx [tokens, hidden]`, the sum of the gradients of each token's `k` copies.
pub fn moe_permute_bwd(dxp: &Tensor, plan: &MoePlan) -> Result<Tensor> {
    if dxp.is_cuda() {
        return crate::cuda::ops::moe_permute_bwd(dxp, &plan.row_token, plan.tokens, plan.top_k);
    }
    let h = check_rows("moe_permute_bwd", dxp, "dxp", plan.tokens * plan.top_k)?;
    let c = dxp.cpu()?;
    let zeros = candle_core::Tensor::zeros((plan.tokens, h), candle_core::DType::F32, c.device())?;
    Ok(Tensor::from_cpu(zeros.index_add(
        plan.row_token.cpu()?,
        c,
        0,
    )?))
}

/// `weights [tokens, k]` as `[tokens, k, 1]`, after checking its shape.
fn weights3(op: &'static str, weights: &Tensor, plan: &MoePlan) -> Result<candle_core::Tensor> {
    weights.expect_dtype(op, DType::F32)?;
    weights.expect_shape(op, "weights", &[plan.tokens, plan.top_k])?;
    Ok(weights.cpu()?.reshape((plan.tokens, plan.top_k, 1))?)
}

/// `y [tokens, hidden] = Σ_j weights[t, j]·yp[row(t, j)]`.
pub fn moe_unpermute(yp: &Tensor, weights: &Tensor, plan: &MoePlan) -> Result<Tensor> {
    let op = "moe_unpermute";
    if yp.is_cuda() {
        return crate::cuda::ops::moe_unpermute(
            yp,
            weights,
            &plan.slot_row,
            plan.tokens,
            plan.top_k,
        );
    }
    let h = check_rows(op, yp, "yp", plan.tokens * plan.top_k)?;
    let w = weights3(op, weights, plan)?;
    let ys =
        yp.cpu()?
            .index_select(plan.slot_row.cpu()?, 0)?
            .reshape((plan.tokens, plan.top_k, h))?;
    Ok(Tensor::from_cpu(ys.broadcast_mul(&w)?.sum(1)?))
}

/// Backward of [`moe_unpermute`]: `(dyp [tokens·k, hidden], dweights [tokens, k])`.
pub fn moe_unpermute_bwd(
    dy: &Tensor,
    yp: &Tensor,
    weights: &Tensor,
    plan: &MoePlan,
) -> Result<(Tensor, Tensor)> {
    let op = "moe_unpermute_bwd";
    if yp.is_cuda() {
        return crate::cuda::ops::moe_unpermute_bwd(
            dy,
            yp,
            weights,
            &plan.slot_row,
            plan.tokens,
            plan.top_k,
        );
    }
    let h = check_rows(op, yp, "yp", plan.tokens * plan.top_k)?;
    check_rows(op, dy, "dy", plan.tokens)?;
    let w = weights3(op, weights, plan)?;
    let (t, k) = (plan.tokens, plan.top_k);
    let dy3 = dy.cpu()?.reshape((t, 1, h))?;
    let dys = dy3.broadcast_mul(&w)?.reshape((t * k, h))?; // slot order
    let dyp = dys.index_select(plan.row_slot.cpu()?, 0)?; // permuted order
    let ys = yp
        .cpu()?
        .index_select(plan.slot_row.cpu()?, 0)?
        .reshape((t, k, h))?;
    let dw = ys.broadcast_mul(&dy3)?.sum(2)?; // [t, k]
    Ok((Tensor::from_cpu(dyp), Tensor::from_cpu(dw)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;
    use crate::test_util::*;

    #[test]
    fn plan_groups_rows_by_expert_and_round_trips() {
        let mut r = rng(80);
        let (t, k, e, h) = (5, 2, 4, 3);
        let idxv = vec![2u32, 0, 3, 2, 0, 1, 2, 3, 1, 0];
        let idx = Tensor::from_u32(idxv.clone(), &[t, k], &Device::Cpu).unwrap();
        let plan = moe_plan(&idx, e).unwrap();
        assert_eq!(plan.expert_offsets, vec![0, 3, 5, 8, 10]);
        let (x, xv) = rand_tensor(&mut r, &[t, h], 1.0);
        let xp = moe_permute(&x, &plan).unwrap().to_vec_f32().unwrap();
        // Expert 0's rows are tokens 0, 2, 4 in that order.
        for (row, tok) in [(0, 0), (1, 2), (2, 4), (3, 2), (4, 4)] {
            assert_eq!(&xp[row * h..(row + 1) * h], &xv[tok * h..(tok + 1) * h]);
        }
        // Unpermute with weights of a per-row "expert output" equal to the permuted input.
        let (w, wv) = rand_tensor(&mut r, &[t, k], 1.0);
        let xpt = Tensor::from_f32(xp, &[t * k, h], &Device::Cpu).unwrap();
        let y = moe_unpermute(&xpt, &w, &plan).unwrap();
        let want: Vec<f64> = (0..t * h)
            .map(|i| xv[i] as f64 * (wv[(i / h) * k] as f64 + wv[(i / h) * k + 1] as f64))
            .collect();
        assert_close("round trip", &y.to_vec_f32().unwrap(), &want, 1e-6);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut r = rng(81);
        let (t, k, e, h) = (6, 3, 5, 4);
        let (logits, _) = rand_tensor(&mut r, &[t, e], 2.0);
        let routed = crate::ops::router::router_fwd(&logits, k, true).unwrap();
        let idxv = routed.topk_idx.to_vec_u32().unwrap();
        let plan = moe_plan(&routed.topk_idx, e).unwrap();
        let (x, xv) = rand_tensor(&mut r, &[t, h], 1.0);
        let (w, wv) = rand_tensor(&mut r, &[t, k], 1.0);
        // A per-expert elementwise "expert" so the composition is not trivially linear in x: y = x ⊙ s_e.
        let scales: Vec<f64> = (0..e * h).map(|i| 0.3 + 0.1 * i as f64).collect();
        let reference = |x: &[f64], w: &[f64]| -> Vec<f64> {
            let mut y = vec![0.0; t * h];
            for tok in 0..t {
                for j in 0..k {
                    let ex = idxv[tok * k + j] as usize;
                    for c in 0..h {
                        y[tok * h + c] += w[tok * k + j] * x[tok * h + c] * scales[ex * h + c];
                    }
                }
            }
            y
        };
        // Ours: permute, per-expert scale on the host, unpermute.
        let xp = moe_permute(&x, &plan).unwrap();
        let mut ypv = xp.to_vec_f32().unwrap();
        let mut row_expert = vec![0usize; t * k];
        for ex in 0..e {
            for row in plan.expert_offsets[ex]..plan.expert_offsets[ex + 1] {
                row_expert[row] = ex;
                for c in 0..h {
                    ypv[row * h + c] *= scales[ex * h + c] as f32;
                }
            }
        }
        let yp = Tensor::from_f32(ypv, &[t * k, h], &Device::Cpu).unwrap();
        let y = moe_unpermute(&yp, &w, &plan).unwrap();
        assert_close(
            "y",
            &y.to_vec_f32().unwrap(),
            &reference(&f64s(&xv), &f64s(&wv)),
            1e-6,
        );

        let (dy, dyv) = rand_tensor(&mut r, &[t, h], 1.0);
        let (dyp, dw) = moe_unpermute_bwd(&dy, &yp, &w, &plan).unwrap();
        let mut dypv = dyp.to_vec_f32().unwrap();
        for row in 0..t * k {
            for c in 0..h {
                dypv[row * h + c] *= scales[row_expert[row] * h + c] as f32;
            }
        }
        let dx = moe_permute_bwd(
            &Tensor::from_f32(dypv, &[t * k, h], &Device::Cpu).unwrap(),
            &plan,
        )
        .unwrap();
        let dyd = f64s(&dyv);
        let want_dx = fd_grad(&f64s(&xv), 1e-6, |xp| dot(&dyd, &reference(xp, &f64s(&wv))));
        let want_dw = fd_grad(&f64s(&wv), 1e-6, |wp| dot(&dyd, &reference(&f64s(&xv), wp)));
        assert_close("dx", &dx.to_vec_f32().unwrap(), &want_dx, 1e-5);
        assert_close("dweights", &dw.to_vec_f32().unwrap(), &want_dw, 1e-5);
    }

    #[test]
    fn expert_index_out_of_range_is_rejected() {
        let idx = Tensor::from_u32(vec![0, 4], &[1, 2], &Device::Cpu).unwrap();
        assert!(matches!(
            moe_plan(&idx, 4),
            Err(KernelError::InvalidArgument { .. })
        ));
    }
}
