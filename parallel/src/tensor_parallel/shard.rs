//! Which slice of every full (HF-layout) parameter a TP rank holds, slicing the full weights per rank
//! ([`shard_for_rank`]) and reassembling them ([`unshard`]), so checkpoints keep the HF full layout.
//!
//! | parameter (HF shape) | split | rank `i` holds |
//! | --- | --- | --- |
//! | `embed_tokens`, `lm_head` `[V, H]` | rows (vocab) | rows `[i·V/p, (i+1)·V/p)` |
//! | `q_proj` `[Hq·D, H]` | rows (heads) | heads `[i·Hq/p, (i+1)·Hq/p)` |
//! | `k_proj`, `v_proj` `[Hkv·D, H]` | rows (kv heads) | kv heads `[i·Hkv/p, …)`, or kv head `i/(p/Hkv)` when `p > Hkv` |
//! | `o_proj` `[H, Hq·D]` | columns (heads) | columns of its q heads |
//! | `gate_proj`, `up_proj` `[F, H]` | rows | rows `[i·F/p, (i+1)·F/p)` |
//! | `down_proj` `[H, F]` | columns | columns `[i·F/p, (i+1)·F/p)` |
//! | norms, `q_norm`, `k_norm`, MoE router and experts | replicated | everything |

use qkernels::Tensor;

use super::{Result, TpError};
use crate::dims::{ModelShape, ParallelDims};
use crate::model::{Attention, DecoderLayer, Ffn, Mlp, ModelConfig, Qwen3Params};

/// The local sizes and offsets of one TP rank (see the module table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpPlan {
    /// TP group size `p`.
    pub tp: usize,
    /// This rank's position in its TP group.
    pub tp_rank: usize,
    /// Sequence parallelism on.
    pub sp: bool,
    pub head_dim: usize,
    /// Local q heads `Hq/p`.
    pub q_heads: usize,
    /// Local kv heads: `Hkv/p`, or 1 when replicated.
    pub kv_heads: usize,
    /// First (global) kv head this rank holds.
    pub kv_head_start: usize,
    /// Ranks holding each kv head: `p/Hkv` when `p > Hkv`, else 1.
    pub kv_replicas: usize,
    /// Local dense MLP size `F/p`.
    pub ffn: usize,
    /// Local vocabulary rows `V/p`.
    pub vocab: usize,
    /// First vocabulary id this rank owns.
    pub vocab_start: usize,
}

impl TpPlan {
    /// Checks `dims` against `cfg` (heads, kv heads, ffn, vocab divisibility; only dp, tp and sp implemented) and
    /// derives global rank `rank`'s local sizes.
    pub fn new(cfg: &ModelConfig, dims: &ParallelDims, rank: usize) -> Result<TpPlan> {
        check_supported(dims)?;
        if rank >= dims.world() {
            return Err(TpError::Unsupported(format!(
                "rank {rank} is outside world size {}",
                dims.world()
            )));
        }
        dims.validate_model(&ModelShape {
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            layers: cfg.num_hidden_layers,
            experts: cfg.moe.as_ref().map_or(0, |m| m.num_experts),
            intermediate_size: cfg.intermediate_size,
            moe_intermediate_size: cfg.moe.as_ref().map_or(0, |m| m.moe_intermediate_size),
            // The token count is checked per batch (`TpError::TokensNotDivisible`); `tp` always passes here.
            seq_len: dims.tp() * dims.cp(),
        })?;
        let p = dims.tp();
        if !cfg.vocab_size.is_multiple_of(p) {
            return Err(TpError::VocabNotDivisible {
                vocab: cfg.vocab_size,
                tp: p,
            });
        }
        let i = dims.coord(rank).tp;
        let hkv = cfg.num_key_value_heads;
        let (kv_heads, kv_head_start, kv_replicas) = if hkv >= p {
            (hkv / p, i * hkv / p, 1)
        } else {
            (1, i / (p / hkv), p / hkv)
        };
        Ok(TpPlan {
            tp: p,
            tp_rank: i,
            sp: dims.sp(),
            head_dim: cfg.head_dim,
            q_heads: cfg.num_attention_heads / p,
            kv_heads,
            kv_head_start,
            kv_replicas,
            ffn: cfg.intermediate_size / p,
            vocab: cfg.vocab_size / p,
            vocab_start: i * cfg.vocab_size / p,
        })
    }

    /// The config the unchanged single-device blocks run with on this rank: local heads, kv heads and ffn size.
    pub fn local_config(&self, cfg: &ModelConfig) -> ModelConfig {
        let mut c = cfg.clone();
        c.num_attention_heads = self.q_heads;
        c.num_key_value_heads = self.kv_heads;
        c.intermediate_size = self.ffn;
        c.vocab_size = self.vocab;
        c
    }

    /// Is this rank the first of its kv replica group (counts replicated k/v weights once in a global norm)?
    pub fn first_kv_replica(&self) -> bool {
        self.tp_rank.is_multiple_of(self.kv_replicas)
    }

    fn q_rows(&self) -> (usize, usize) {
        let n = self.q_heads * self.head_dim;
        (self.tp_rank * n, n)
    }

    fn kv_rows(&self) -> (usize, usize) {
        (
            self.kv_head_start * self.head_dim,
            self.kv_heads * self.head_dim,
        )
    }

    fn ffn_rows(&self) -> (usize, usize) {
        (self.tp_rank * self.ffn, self.ffn)
    }
}

pub(crate) fn check_supported(dims: &ParallelDims) -> Result<()> {
    check_factors(dims, true)
}

/// [`check_supported`] with the pipeline factors (`pp`, `vpp`) allowed: what a rank of one pipeline stage
/// ([`crate::pipeline`]) needs from this module (the groups inside a stage; the stage runs its own layers).
pub(crate) fn check_supported_in_pipeline(dims: &ParallelDims) -> Result<()> {
    check_factors(dims, false)
}

fn check_factors(dims: &ParallelDims, reject_pipeline: bool) -> Result<()> {
    let mut missing = Vec::new();
    for (name, v) in [
        ("pp", dims.pp()),
        ("vpp", dims.vpp()),
        ("cp", dims.cp()),
        // Expert parallelism runs inside the TP model without pp / cp (checked in `super::experts`).
        ("ep", if dims.pp() > 1 || dims.cp() > 1 { dims.ep() } else { 1 }),
    ] {
        if !reject_pipeline && (name == "pp" || name == "vpp") {
            continue;
        }
        if v != 1 {
            missing.push(format!("{name} = {v}"));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(TpError::Unsupported(format!(
            "{} (only dp, tp and sp are implemented)",
            missing.join(", ")
        )))
    }
}

fn narrow(t: &Tensor, dim: usize, (start, len): (usize, usize)) -> Result<Tensor> {
    Ok(t.narrow(dim, start, len)?)
}

/// The parameters global rank `rank` holds under `dims`, sliced from the full model's parameters.
pub fn shard_for_rank(
    cfg: &ModelConfig,
    full: &Qwen3Params,
    dims: &ParallelDims,
    rank: usize,
) -> Result<Qwen3Params> {
    let plan = TpPlan::new(cfg, dims, rank)?;
    shard_with_plan(&plan, full)
}

pub(crate) fn shard_with_plan(plan: &TpPlan, full: &Qwen3Params) -> Result<Qwen3Params> {
    let vocab = (plan.vocab_start, plan.vocab);
    let (q, kv, f) = (plan.q_rows(), plan.kv_rows(), plan.ffn_rows());
    let layers = full
        .layers
        .iter()
        .map(|l| {
            let a = &l.self_attn;
            let mlp = match &l.mlp {
                Ffn::Dense(m) => Ffn::Dense(Mlp {
                    gate_proj: narrow(&m.gate_proj, 0, f)?,
                    up_proj: narrow(&m.up_proj, 0, f)?,
                    down_proj: narrow(&m.down_proj, 1, f)?,
                }),
                Ffn::Moe(m) => Ffn::Moe(m.clone()),
            };
            Ok(DecoderLayer {
                input_layernorm: l.input_layernorm.clone(),
                self_attn: Attention {
                    q_proj: narrow(&a.q_proj, 0, q)?,
                    k_proj: narrow(&a.k_proj, 0, kv)?,
                    v_proj: narrow(&a.v_proj, 0, kv)?,
                    o_proj: narrow(&a.o_proj, 1, q)?,
                    q_norm: a.q_norm.clone(),
                    k_norm: a.k_norm.clone(),
                },
                post_attention_layernorm: l.post_attention_layernorm.clone(),
                mlp,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Qwen3Params {
        embed_tokens: narrow(&full.embed_tokens, 0, vocab)?,
        layers,
        norm: full.norm.clone(),
        lm_head: full
            .lm_head
            .as_ref()
            .map(|h| narrow(h, 0, vocab))
            .transpose()?,
    })
}

/// Reassembles full (HF-layout) parameters — or gradients, once their TP reductions are done — from the shards of
/// one TP group, `shards[i]` being TP rank `i`'s. Replicated tensors are taken from rank 0, replicated kv heads from
/// the first rank of each replica group.
pub fn unshard(
    cfg: &ModelConfig,
    dims: &ParallelDims,
    shards: &[Qwen3Params],
) -> Result<Qwen3Params> {
    check_supported(dims)?;
    let p = dims.tp();
    if shards.len() != p {
        return Err(TpError::Shard {
            name: "<all>".into(),
            detail: format!("{} shards for tp = {p}", shards.len()),
        });
    }
    let kv_replicas = if cfg.num_key_value_heads >= p {
        1
    } else {
        p / cfg.num_key_value_heads
    };
    let cat = |get: &dyn Fn(&Qwen3Params) -> &Tensor, dim: usize, step: usize| -> Result<Tensor> {
        let parts: Vec<&Tensor> = shards.iter().step_by(step).map(get).collect();
        Ok(Tensor::cat(&parts, dim)?)
    };
    let first = &shards[0];
    let layers = (0..first.layers.len())
        .map(|li| {
            let l0 = &first.layers[li];
            let attn = |s: &Qwen3Params| -> Attention { s.layers[li].self_attn.clone() };
            let mlp = match &l0.mlp {
                Ffn::Dense(_) => {
                    let dense = |s: &Qwen3Params, which: usize| -> Result<Tensor> {
                        match &s.layers[li].mlp {
                            Ffn::Dense(m) => {
                                Ok([&m.gate_proj, &m.up_proj, &m.down_proj][which].clone())
                            }
                            Ffn::Moe(_) => Err(TpError::Shard {
                                name: format!("model.layers.{li}.mlp"),
                                detail: "dense on rank 0, MoE on another rank".into(),
                            }),
                        }
                    };
                    let gather = |which: usize, dim: usize| -> Result<Tensor> {
                        let parts = shards
                            .iter()
                            .map(|s| dense(s, which))
                            .collect::<Result<Vec<_>>>()?;
                        Ok(Tensor::cat(&parts.iter().collect::<Vec<_>>(), dim)?)
                    };
                    Ffn::Dense(Mlp {
                        gate_proj: gather(0, 0)?,
                        up_proj: gather(1, 0)?,
                        down_proj: gather(2, 1)?,
                    })
                }
                Ffn::Moe(m) => Ffn::Moe(m.clone()),
            };
            Ok(DecoderLayer {
                input_layernorm: l0.input_layernorm.clone(),
                self_attn: Attention {
                    q_proj: cat(&|s| &s.layers[li].self_attn.q_proj, 0, 1)?,
                    k_proj: cat(&|s| &s.layers[li].self_attn.k_proj, 0, kv_replicas)?,
                    v_proj: cat(&|s| &s.layers[li].self_attn.v_proj, 0, kv_replicas)?,
                    o_proj: cat(&|s| &s.layers[li].self_attn.o_proj, 1, 1)?,
                    ..attn(first)
                },
                post_attention_layernorm: l0.post_attention_layernorm.clone(),
                mlp,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let lm_head = match &first.lm_head {
        Some(_) => {
            let parts = shards
                .iter()
                .map(|s| {
                    s.lm_head.as_ref().ok_or_else(|| TpError::Shard {
                        name: "lm_head.weight".into(),
                        detail: "present on rank 0 only".into(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&parts, 0)?)
        }
        None => None,
    };
    Ok(Qwen3Params {
        embed_tokens: cat(&|s| &s.embed_tokens, 0, 1)?,
        layers,
        norm: first.norm.clone(),
        lm_head,
    })
}
