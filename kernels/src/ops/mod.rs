//! The op set of the Qwen3 model: each op is a forward and, where training needs it, an explicit backward.
//!
//! There is no autograd tape: a forward returns what its backward needs (or the caller keeps the inputs), and a
//! backward takes the upstream gradient plus those saved values. Every op validates shapes, dtypes and devices,
//! then dispatches on the backend. Module docs state each op's shapes and maths.
//!
//! | module | forward | backward |
//! |---|---|---|
//! | [`linear`] | `y = x·Wᵀ`, grouped per expert | `dx`, `dW` |
//! | [`rmsnorm`] | RMSNorm over the last dim (hidden or per head) | `dx`, `dw` |
//! | [`rope`] | rotate-half RoPE with explicit positions | inverse rotation |
//! | [`swiglu`] | `silu(gate)·up` | `dgate`, `dup` |
//! | [`attention`] | causal GQA attention with segments; indexed variant (query subset vs placed keys, CP) | `dq`, `dk`, `dv` |
//! | [`embedding`] | row lookup | scatter-add |
//! | [`cross_entropy`] | weighted mean CE; per-row statistics of one vocabulary shard (vocab-parallel CE) | `dlogits` (same pass); the shard's `dlogits` from the global `lse` |
//! | [`router`] | softmax top-k router, aux-loss statistics | `dlogits` |
//! | [`moe`] | token permute / weighted unpermute | scatter-add / `dyp`, `dweights` |
//! | [`argmax`] | inference only: row argmax (greedy decoding on the device) | — |
//! | [`paged_attention`](mod@paged_attention) | inference only: in-place paged KV-cache write; causal GQA attention through block tables | — |
//!
//! Optimizer work on device tensors lives in [`adamw`] (fused AdamW step, sum of squares for the grad norm).

pub mod adamw;
pub mod argmax;
pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod linear;
pub mod moe;
pub mod paged_attention;
pub mod rmsnorm;
pub mod rope;
pub mod router;
pub mod swiglu;

pub use adamw::{AdamWOut, AdamWScalars, adamw_step, adamw_update_host, sum_squares};
pub use attention::{
    AttentionGrads, AttentionIndex, AttentionOut, attention_bwd, attention_bwd_indexed, attention_fwd,
    attention_fwd_indexed,
};
pub use cross_entropy::{
    CrossEntropyOut, NOT_OWNED, VocabShardStats, cross_entropy_fwd_bwd, cross_entropy_per_token,
    vocab_shard_grad, vocab_shard_stats,
};
pub use embedding::{embedding_bwd, embedding_fwd};
pub use linear::{
    LinearGrads, grouped_linear_bwd, grouped_linear_fwd, linear_bwd, linear_fwd, matmul,
};
pub use moe::{MoePlan, moe_permute, moe_permute_bwd, moe_plan, moe_unpermute, moe_unpermute_bwd};
pub use argmax::argmax_rows;
pub use paged_attention::{kv_cache_write, paged_attention};
pub use rmsnorm::{RmsNormGrads, RmsNormOut, rmsnorm_bwd, rmsnorm_fwd};
pub use rope::{RopeTable, rope_bwd, rope_fwd};
pub use router::{RouterOut, RouterStats, router_bwd, router_fwd};
pub use swiglu::{SwigluGrads, swiglu_bwd, swiglu_fwd};
