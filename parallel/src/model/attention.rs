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
//!
//! # The attention core
//!
//! The step `o = attention(q, k, v)` goes through an [`AttentionCore`]: `(k_ctx, v_ctx) = gather_kv(k, v)` (the
//! keys/values the local queries see), `o = core.forward(q, k_ctx, v_ctx)`; backward runs `core.backward` and then
//! `gather_kv_backward`, the adjoint of `gather_kv`, to bring `(dk_ctx, dv_ctx)` back to the local `(dk, dv)`.
//! [`Attention::forward`] uses [`LocalAttention`] (identity gather, causal attention over the batch's own tokens
//! with segments); context parallelism (`crate::context_parallel`) plugs in an all-gather / reduce-scatter pair and
//! the index-masked op, without a second copy of the projection / norm / RoPE chain.

use qkernels::Tensor;
use qkernels::ops::{self, AttentionGrads, AttentionOut};

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
    /// `[B, S_k, Hkv, D]`: normalised, rotated keys the queries attended to (`gather_kv`'s output; the local
    /// `k`, `S_k = S`, for [`LocalAttention`]).
    k: Tensor,
    /// `[B, S_k, Hkv, D]`
    v: Tensor,
    /// `out [B, S, Hq, D]` and `lse [B, Hq, S]`.
    attn: AttentionOut,
}

/// How the local queries reach their keys and values (see the module docs). Implementations must make
/// `gather_kv_backward` the adjoint of `gather_kv` (`⟨gather_kv(k), dk_ctx⟩ = ⟨k, gather_kv_backward(dk_ctx)⟩`,
/// summed over the ranks of a group) and `backward` the gradient of `forward`.
pub trait AttentionCore {
    /// `(k_ctx, v_ctx) [B, S_k, Hkv, D]` the local queries attend to, from the local `k, v [B, S, Hkv, D]`.
    fn gather_kv(&self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)>;
    /// Adjoint of [`gather_kv`](Self::gather_kv): local `(dk, dv) [B, S, Hkv, D]` from `(dk_ctx, dv_ctx)`.
    fn gather_kv_backward(&self, dk_ctx: &Tensor, dv_ctx: &Tensor) -> Result<(Tensor, Tensor)>;
    /// `out [B, S, Hq, D]`, `lse [B, Hq, S]` of the local queries `q [B, S, Hq, D]` over `k_ctx, v_ctx`.
    fn forward(
        &self,
        q: &Tensor,
        k_ctx: &Tensor,
        v_ctx: &Tensor,
        scale: f32,
    ) -> Result<AttentionOut>;
    /// Gradients of [`forward`](Self::forward): `dq` local, `dk_ctx`, `dv_ctx` in the gathered layout.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        dout: &Tensor,
        q: &Tensor,
        k_ctx: &Tensor,
        v_ctx: &Tensor,
        out: &AttentionOut,
        scale: f32,
    ) -> Result<AttentionGrads>;
}

/// The single-device core: no exchange, causal attention over the batch's own tokens (with packed segments).
#[derive(Debug, Clone, Copy)]
pub struct LocalAttention<'a> {
    /// `[B, S]` (u32) segment ids, or `None`.
    pub segment_ids: Option<&'a Tensor>,
}

impl AttentionCore for LocalAttention<'_> {
    fn gather_kv(&self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((k.clone(), v.clone()))
    }
    fn gather_kv_backward(&self, dk: &Tensor, dv: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((dk.clone(), dv.clone()))
    }
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<AttentionOut> {
        Ok(ops::attention_fwd(q, k, v, self.segment_ids, scale)?)
    }
    fn backward(
        &self,
        dout: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &AttentionOut,
        scale: f32,
    ) -> Result<AttentionGrads> {
        Ok(ops::attention_bwd(
            dout,
            q,
            k,
            v,
            &out.out,
            &out.lse,
            self.segment_ids,
            scale,
        )?)
    }
}

impl Attention {
    /// `y [T, hidden]` from `xn [T, hidden]`.
    pub fn forward(&self, xn: &Tensor, ctx: &LayerCtx<'_>) -> Result<(Tensor, AttentionSaved)> {
        let core = LocalAttention {
            segment_ids: ctx.segment_ids,
        };
        self.forward_with(xn, ctx, &core)
    }

    /// [`forward`](Self::forward) with an explicit [`AttentionCore`] (`ctx.segment_ids` is then unused: the core
    /// carries its own mask).
    pub fn forward_with(
        &self,
        xn: &Tensor,
        ctx: &LayerCtx<'_>,
        core: &dyn AttentionCore,
    ) -> Result<(Tensor, AttentionSaved)> {
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
        let (k, v) = core.gather_kv(&k, &v)?; // [B, S_k, Hkv, D]

        let scale = 1.0 / (d as f32).sqrt();
        let attn = core.forward(&q, &k, &v, scale)?;
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
        let core = LocalAttention {
            segment_ids: ctx.segment_ids,
        };
        self.backward_with(dy, saved, ctx, &core)
    }

    /// [`backward`](Self::backward) through the core the forward used.
    pub fn backward_with(
        &self,
        dy: &Tensor,
        saved: &AttentionSaved,
        ctx: &LayerCtx<'_>,
        core: &dyn AttentionCore,
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
        let g_attn = core.backward(
            &g_o.dx.reshape(&[b, s, hq, d])?,
            &saved.q,
            &saved.k,
            &saved.v,
            &saved.attn,
            scale,
        )?;
        let (dk, dv) = core.gather_kv_backward(&g_attn.dk, &g_attn.dv)?; // local [B, S, Hkv, D]

        let dq_n = ops::rope_bwd(&g_attn.dq.reshape(&[t, hq, d])?, ctx.rope)?;
        let g_qn = ops::rmsnorm_bwd(&dq_n, &saved.q_lin, &self.q_norm, &saved.q_rstd)?;
        let g_q = ops::linear_bwd(&g_qn.dx.reshape(&[t, hq * d])?, &saved.xn, &self.q_proj)?;

        let dk_n = ops::rope_bwd(&dk.reshape(&[t, hkv, d])?, ctx.rope)?;
        let g_kn = ops::rmsnorm_bwd(&dk_n, &saved.k_lin, &self.k_norm, &saved.k_rstd)?;
        let g_k = ops::linear_bwd(&g_kn.dx.reshape(&[t, hkv * d])?, &saved.xn, &self.k_proj)?;

        let g_v = ops::linear_bwd(&dv.reshape(&[t, hkv * d])?, &saved.xn, &self.v_proj)?;

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
