//! Qwen3 self-attention block, explicit forward and backward.
//!
//! Input is the already-normalised hidden state `xn [T, hidden]` (`T = batch·seq` tokens, row-major by batch).
//!
//! Forward (shapes with `Hq` q heads, `Hkv` kv heads, `D = head_dim`):
//! ```text
//! q_lin = xn·Wqᵀ → [T, Hq, D]      k_lin = xn·Wkᵀ → [T, Hkv, D]      v = xn·Wvᵀ → [T, Hkv, D]
//! q = rope(rmsnorm_head(q_lin, q_norm))              k = rope(rmsnorm_head(k_lin, k_norm))
//! o = causal_gqa_attention(q, k, v) → [T, Hq·D]      y = o·Woᵀ → [T, hidden]
//! ```
//! Backward runs the same chain in reverse; the xn-gradients of the three projections are summed.

use qkernels::Tensor;
use qkernels::ops::{self, AttentionOut};

use super::error::Result;
use super::layer::LayerCtx;
use super::params::Attention;

/// What [`Attention::forward`] keeps for its backward.
#[derive(Debug, Clone)]
pub struct AttentionSaved {
    /// `[T, hidden]`: the block input (normalised hidden state).
    xn: Tensor,
    /// `[T, Hq, D]`: q projection before q_norm.
    q_lin: Tensor,
    /// `[T, Hq]`
    q_rstd: Tensor,
    /// `[T, Hkv, D]`: k projection before k_norm.
    k_lin: Tensor,
    /// `[T, Hkv]`
    k_rstd: Tensor,
    /// `[B, S, Hq, D]`: normalised, rotated q.
    q: Tensor,
    /// `[B, S, Hkv, D]`: normalised, rotated k.
    k: Tensor,
    /// `[B, S, Hkv, D]`
    v: Tensor,
    /// `out [B, S, Hq, D]` and `lse [B, Hq, S]`.
    attn: AttentionOut,
}

impl Attention {
    /// `y [T, hidden]` from `xn [T, hidden]`.
    pub fn forward(&self, xn: &Tensor, ctx: &LayerCtx<'_>) -> Result<(Tensor, AttentionSaved)> {
        let cfg = ctx.cfg;
        let (t, b, s) = (ctx.tokens(), ctx.batch, ctx.seq);
        let (hq, hkv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let eps = cfg.rms_norm_eps;

        let q_lin = ops::linear_fwd(xn, &self.q_proj)?.reshape(&[t, hq, d])?;
        let qn = ops::rmsnorm_fwd(&q_lin, &self.q_norm, eps)?;
        let q = ops::rope_fwd(&qn.y, ctx.rope)?.reshape(&[b, s, hq, d])?;

        let k_lin = ops::linear_fwd(xn, &self.k_proj)?.reshape(&[t, hkv, d])?;
        let kn = ops::rmsnorm_fwd(&k_lin, &self.k_norm, eps)?;
        let k = ops::rope_fwd(&kn.y, ctx.rope)?.reshape(&[b, s, hkv, d])?;

        let v = ops::linear_fwd(xn, &self.v_proj)?.reshape(&[b, s, hkv, d])?;

        let scale = 1.0 / (d as f32).sqrt();
        let attn = ops::attention_fwd(&q, &k, &v, ctx.segment_ids, scale)?;
        let y = ops::linear_fwd(&attn.out.reshape(&[t, hq * d])?, &self.o_proj)?; // [T, hidden]
        let saved = AttentionSaved {
            xn: xn.clone(),
            q_lin,
            q_rstd: qn.rstd,
            k_lin,
            k_rstd: kn.rstd,
            q,
            k,
            v,
            attn,
        };
        Ok((y, saved))
    }

    /// `(dxn [T, hidden], weight gradients)` from `dy [T, hidden]`.
    pub fn backward(
        &self,
        dy: &Tensor,
        saved: &AttentionSaved,
        ctx: &LayerCtx<'_>,
    ) -> Result<(Tensor, Attention)> {
        let cfg = ctx.cfg;
        let (t, b, s) = (ctx.tokens(), ctx.batch, ctx.seq);
        let (hq, hkv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );

        let o = saved.attn.out.reshape(&[t, hq * d])?;
        let g_o = ops::linear_bwd(dy, &o, &self.o_proj)?; // dx: [T, Hq·D]
        let scale = 1.0 / (d as f32).sqrt();
        let g_attn = ops::attention_bwd(
            &g_o.dx.reshape(&[b, s, hq, d])?,
            &saved.q,
            &saved.k,
            &saved.v,
            &saved.attn.out,
            &saved.attn.lse,
            ctx.segment_ids,
            scale,
        )?;

        let dq_n = ops::rope_bwd(&g_attn.dq.reshape(&[t, hq, d])?, ctx.rope)?;
        let g_qn = ops::rmsnorm_bwd(&dq_n, &saved.q_lin, &self.q_norm, &saved.q_rstd)?;
        let g_q = ops::linear_bwd(&g_qn.dx.reshape(&[t, hq * d])?, &saved.xn, &self.q_proj)?;

        let dk_n = ops::rope_bwd(&g_attn.dk.reshape(&[t, hkv, d])?, ctx.rope)?;
        let g_kn = ops::rmsnorm_bwd(&dk_n, &saved.k_lin, &self.k_norm, &saved.k_rstd)?;
        let g_k = ops::linear_bwd(&g_kn.dx.reshape(&[t, hkv * d])?, &saved.xn, &self.k_proj)?;

        let g_v = ops::linear_bwd(&g_attn.dv.reshape(&[t, hkv * d])?, &saved.xn, &self.v_proj)?;

        let dxn = g_q.dx.add(&g_k.dx)?.add(&g_v.dx)?;
        let grads = Attention {
            q_proj: g_q.dw,
            k_proj: g_k.dw,
            v_proj: g_v.dw,
            o_proj: g_o.dw,
            q_norm: g_qn.dw,
            k_norm: g_kn.dw,
        };
        Ok((dxn, grads))
    }
}
