//! Qwen3 / Qwen3-MoE forward for inference: any mix of prefill chunks and decode tokens in one pass, with K/V
//! kept in the paged [`KvCache`].
//!
//! One call runs a list of [`Chunk`]s, each the next `n ≥ 1` tokens of one sequence starting at position
//! `start` (its first `start` positions are already cached). All tokens are concatenated into `T = Σ n` rows
//! so every GEMM runs once for the whole batch:
//!
//! ```text
//! ids [T] ── embed ── x [T, hidden]
//! per layer:  xn = rmsnorm(x)                q = rope(rmsnorm_head(xn·Wqᵀ)) [T, Hq, D]
//!             k = rope(rmsnorm_head(xn·Wkᵀ)) [T, Hkv, D]  v = xn·Wvᵀ [T, Hkv, D]   → written to the cache
//!             o_t = Σ_{p ≤ pos_t} softmax_p(q_t·k_p/√D) v_p   over the cache of t's own sequence (GQA)
//!             h = x + o·Woᵀ;   x = h + ffn(rmsnorm(h))     (SwiGLU MLP, or top-k routed experts)
//! logits = rmsnorm(x)·W_headᵀ   only for the rows asked for (the last row of each chunk, or all rows)
//! ```
//!
//! Invariant: after a call, positions `0..start+n` of every chunk's sequence are in the cache, so the next call
//! for that sequence starts at `start + n`. Attention reads only the sequence's own blocks: sequences in one
//! batch never see each other, and the result for a sequence does not depend on what else is batched with it.
//! The CPU backend computes attention on the host in f32; the projections, norms, RoPE and MLP/MoE are
//! `qkernels` ops.

use std::path::Path;

use qkernels::ops::{self, RopeTable};
use qkernels::{Device, Tensor};
use qparallel::hf::TensorMap;
use qparallel::model::{DecoderLayer, Ffn, ModelConfig, Qwen3Model, Qwen3Params};

use super::error::EngineError;
use super::kv::{BlockTable, KvCache, KvCacheConfig};

/// The next tokens of one sequence (see module docs).
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    /// Tokens to run, `n ≥ 1`.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; positions `0..start` must already be cached.
    pub start: usize,
    /// The sequence's blocks; must cover `0..start + n`.
    pub table: &'a BlockTable,
}

/// Which rows get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// The last token of each chunk (what sampling needs).
    Last,
    /// Every token (for tests and prompt scoring).
    All,
}

/// A Qwen3 model prepared for inference.
#[derive(Debug, Clone)]
pub struct InferenceModel {
    config: ModelConfig,
    params: Qwen3Params,
    device: Device,
}

impl InferenceModel {
    /// Loads an HF model dir (`config.json` + safetensors).
    pub fn from_hf_dir(dir: impl AsRef<Path>, device: Device) -> Result<Self, EngineError> {
        let m = Qwen3Model::from_hf_dir(dir, device)?;
        Ok(InferenceModel::from_model(m))
    }

    /// Builds the model from HF-named host tensors already in memory (e.g. base weights with LoRA adapters
    /// merged in), checked against `config` as [`InferenceModel::from_hf_dir`] checks a checkpoint.
    pub fn from_tensors(
        config: ModelConfig,
        tensors: TensorMap,
        device: Device,
    ) -> Result<Self, EngineError> {
        let m = Qwen3Model::from_host(config, tensors, device)?;
        Ok(InferenceModel::from_model(m))
    }

    /// Wraps an already-built training model (shares its config and parameters).
    pub fn from_model(model: Qwen3Model) -> Self {
        let device = model.device();
        InferenceModel {
            config: model.config,
            params: model.params,
            device,
        }
    }

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// A KV cache shaped for this model.
    pub fn new_cache(&self, config: KvCacheConfig) -> Result<KvCache, EngineError> {
        KvCache::new(
            config,
            self.config.num_hidden_layers,
            self.config.num_key_value_heads,
            self.config.head_dim,
        )
    }

    /// `[vocab, hidden]` LM head (the embedding when tied).
    fn head(&self) -> &Tensor {
        self.params
            .lm_head
            .as_ref()
            .unwrap_or(&self.params.embed_tokens)
    }

    /// Runs `chunks` (see module docs) and returns the logits rows asked for, each `[vocab]`, in chunk order.
    pub fn forward(
        &self,
        cache: &mut KvCache,
        chunks: &[Chunk<'_>],
        rows: LogitRows,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let cfg = &self.config;
        let mut ids = Vec::new();
        let mut pos = Vec::new();
        for c in chunks {
            if c.tokens.is_empty() {
                return Err(EngineError::InvalidRequest("empty chunk".into()));
            }
            if cache.blocks_for(c.start + c.tokens.len()) > c.table.len() {
                return Err(EngineError::InvalidRequest(format!(
                    "block table of {} blocks does not cover {} positions",
                    c.table.len(),
                    c.start + c.tokens.len()
                )));
            }
            if let Some(&bad) = c.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(EngineError::InvalidRequest(format!(
                    "token id {bad} is out of the vocabulary ({})",
                    cfg.vocab_size
                )));
            }
            ids.extend_from_slice(c.tokens);
            pos.extend((c.start..c.start + c.tokens.len()).map(|p| p as u32));
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let t = ids.len();
        let ids_t = Tensor::from_u32(ids, &[t], &self.device)?;
        let pos_t = Tensor::from_u32(pos, &[t], &self.device)?;
        let rope = RopeTable::new(&pos_t, cfg.head_dim, cfg.rope_theta)?;

        let mut x = ops::embedding_fwd(&ids_t, &self.params.embed_tokens)?;
        for (li, layer) in self.params.layers.iter().enumerate() {
            x = self.layer(li, layer, &x, &rope, cache, chunks)?;
        }
        let hn = ops::rmsnorm_fwd(&x, &self.params.norm, cfg.rms_norm_eps)?.y;
        let hn = match rows {
            LogitRows::All => hn,
            LogitRows::Last => {
                let mut end = 0;
                let mut picks = Vec::with_capacity(chunks.len());
                for c in chunks {
                    end += c.tokens.len();
                    picks.push(hn.narrow(0, end - 1, 1)?);
                }
                let refs: Vec<&Tensor> = picks.iter().collect();
                Tensor::cat(&refs, 0)?
            }
        };
        let logits = ops::linear_fwd(&hn, self.head())?;
        let v = cfg.vocab_size;
        Ok(logits
            .to_vec_f32()?
            .chunks(v)
            .map(<[f32]>::to_vec)
            .collect())
    }

    fn layer(
        &self,
        li: usize,
        layer: &DecoderLayer,
        x: &Tensor,
        rope: &RopeTable,
        cache: &mut KvCache,
        chunks: &[Chunk<'_>],
    ) -> Result<Tensor, EngineError> {
        let cfg = &self.config;
        let eps = cfg.rms_norm_eps;
        let t = x.shape()[0];
        let (hq, hkv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let a = &layer.self_attn;
        let xn = ops::rmsnorm_fwd(x, &layer.input_layernorm, eps)?.y;
        let q = ops::linear_fwd(&xn, &a.q_proj)?.reshape(&[t, hq, d])?;
        let q = ops::rope_fwd(&ops::rmsnorm_fwd(&q, &a.q_norm, eps)?.y, rope)?;
        let k = ops::linear_fwd(&xn, &a.k_proj)?.reshape(&[t, hkv, d])?;
        let k = ops::rope_fwd(&ops::rmsnorm_fwd(&k, &a.k_norm, eps)?.y, rope)?;
        let v = ops::linear_fwd(&xn, &a.v_proj)?;
        let (q, k, v) = (q.to_vec_f32()?, k.to_vec_f32()?, v.to_vec_f32()?);

        let row = hkv * d;
        let mut o = vec![0.0f32; t * hq * d];
        let mut r0 = 0;
        for c in chunks {
            for i in 0..c.tokens.len() {
                let r = r0 + i;
                cache.write(
                    li,
                    c.table,
                    c.start + i,
                    &k[r * row..(r + 1) * row],
                    &v[r * row..(r + 1) * row],
                );
            }
            for i in 0..c.tokens.len() {
                let r = r0 + i;
                attend(
                    cache,
                    li,
                    c.table,
                    c.start + i,
                    &q[r * hq * d..(r + 1) * hq * d],
                    (hq, hkv, d),
                    &mut o[r * hq * d..(r + 1) * hq * d],
                );
            }
            r0 += c.tokens.len();
        }
        let o = Tensor::from_f32(o, &[t, hq * d], &self.device)?;
        let h = x.add(&ops::linear_fwd(&o, &a.o_proj)?)?;
        let hn = ops::rmsnorm_fwd(&h, &layer.post_attention_layernorm, eps)?.y;
        let f = self.ffn(&layer.mlp, &hn)?;
        Ok(h.add(&f)?)
    }

    fn ffn(&self, ffn: &Ffn, xn: &Tensor) -> Result<Tensor, EngineError> {
        match ffn {
            Ffn::Dense(m) => {
                let g = ops::linear_fwd(xn, &m.gate_proj)?;
                let u = ops::linear_fwd(xn, &m.up_proj)?;
                Ok(ops::linear_fwd(&ops::swiglu_fwd(&g, &u)?, &m.down_proj)?)
            }
            Ffn::Moe(moe) => {
                let mc = self.config.moe.as_ref().ok_or_else(|| {
                    EngineError::InvalidConfig("MoE layer in a config without MoE settings".into())
                })?;
                let logits = ops::linear_fwd(xn, &moe.gate)?;
                let routing = ops::router_fwd(&logits, mc.num_experts_per_tok, mc.norm_topk_prob)?;
                let plan = ops::moe_plan(&routing.topk_idx, mc.num_experts)?;
                let xp = ops::moe_permute(xn, &plan)?;
                let offs = &plan.expert_offsets;
                let wg: Vec<&Tensor> = moe.experts.iter().map(|e| &e.gate_proj).collect();
                let wu: Vec<&Tensor> = moe.experts.iter().map(|e| &e.up_proj).collect();
                let wd: Vec<&Tensor> = moe.experts.iter().map(|e| &e.down_proj).collect();
                let g = ops::grouped_linear_fwd(&xp, &wg, offs)?;
                let u = ops::grouped_linear_fwd(&xp, &wu, offs)?;
                let yp = ops::grouped_linear_fwd(&ops::swiglu_fwd(&g, &u)?, &wd, offs)?;
                Ok(ops::moe_unpermute(&yp, &routing.topk_weight, &plan)?)
            }
        }
    }
}

/// Causal GQA attention of one query row at position `pos` over the cached positions `0..=pos` of one
/// sequence: `q`, `out` are `[Hq·D]`; q head `h` reads kv head `h / (Hq/Hkv)` (HF `repeat_kv` order).
fn attend(
    cache: &KvCache,
    layer: usize,
    table: &BlockTable,
    pos: usize,
    q: &[f32],
    (hq, hkv, d): (usize, usize, usize),
    out: &mut [f32],
) {
    let group = hq / hkv;
    let scale = 1.0 / (d as f32).sqrt();
    let n = pos + 1;
    let mut scores = vec![0.0f32; n];
    for h in 0..hq {
        let kvh = h / group;
        let qh = &q[h * d..(h + 1) * d];
        let mut max = f32::NEG_INFINITY;
        for (p, s) in scores.iter_mut().enumerate() {
            let k = &cache.key(layer, table, p)[kvh * d..(kvh + 1) * d];
            *s = qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
            max = max.max(*s);
        }
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let oh = &mut out[h * d..(h + 1) * d];
        oh.fill(0.0);
        for (p, s) in scores.iter().enumerate() {
            let v = &cache.value(layer, table, p)[kvh * d..(kvh + 1) * d];
            let w = s / sum;
            for (o, x) in oh.iter_mut().zip(v) {
                *o += w * x;
            }
        }
    }
}
