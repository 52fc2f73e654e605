//! Dense SwiGLU MLP, explicit forward and backward: `y = (silu(xn·Wgᵀ) ⊙ xn·Wuᵀ)·Wdᵀ`.
//!
//! Shapes: `xn [T, hidden]` → `gate, up, h [T, ffn]` → `y [T, hidden]`.

use qkernels::Tensor;
use qkernels::ops;

use super::error::Result;
use super::params::Mlp;

/// What [`Mlp::forward`] keeps for its backward.
#[derive(Debug, Clone)]
pub struct MlpSaved {
    /// `[T, hidden]`
    xn: Tensor,
    /// `[T, ffn]`
    gate: Tensor,
    /// `[T, ffn]`
    up: Tensor,
    /// `[T, ffn]`: `silu(gate) ⊙ up`, the down projection's input.
    h: Tensor,
}

impl Mlp {
    /// `y [T, hidden]` from `xn [T, hidden]`.
    pub fn forward(&self, xn: &Tensor) -> Result<(Tensor, MlpSaved)> {
        let gate = ops::linear_fwd(xn, &self.gate_proj)?;
        let up = ops::linear_fwd(xn, &self.up_proj)?;
        let h = ops::swiglu_fwd(&gate, &up)?;
        let y = ops::linear_fwd(&h, &self.down_proj)?;
        Ok((
            y,
            MlpSaved {
                xn: xn.clone(),
                gate,
                up,
                h,
            },
        ))
    }

    /// `(dxn [T, hidden], weight gradients)` from `dy [T, hidden]`.
    pub fn backward(&self, dy: &Tensor, saved: &MlpSaved) -> Result<(Tensor, Mlp)> {
        let g_down = ops::linear_bwd(dy, &saved.h, &self.down_proj)?;
        let g_act = ops::swiglu_bwd(&g_down.dx, &saved.gate, &saved.up)?;
        let g_gate = ops::linear_bwd(&g_act.dgate, &saved.xn, &self.gate_proj)?;
        let g_up = ops::linear_bwd(&g_act.dup, &saved.xn, &self.up_proj)?;
        let dxn = g_gate.dx.add(&g_up.dx)?;
        Ok((
            dxn,
            Mlp {
                gate_proj: g_gate.dw,
                up_proj: g_up.dw,
                down_proj: g_down.dw,
            },
        ))
    }
}
