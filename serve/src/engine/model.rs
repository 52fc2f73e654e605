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
//! Everything is a `qkernels` op on the model's device: per layer, the new K/V rows go into the cache with
//! `kv_cache_write` (flat slots of all rows, uploaded once per call) and attention is `paged_attention` over
//! the batch's block tables (`[chunks, max blocks]`, zero-padded), each row's chunk index and position, all
//! small u32 tensors uploaded once per call. Only the ids and the logits rows cross the host boundary.
//!
//! Devices and dtypes: on the CPU everything is f32 (the reference). On CUDA the model computes in bf16
//! ([`InferenceModel::dtype`]): weights are converted to bf16 on the device one tensor at a time as they load
//! (the f32 copy of a tensor is dropped before the next is uploaded), activations and the KV cache are bf16,
//! attention and norms accumulate in f32, and the logits come back as f32 host vectors.
//!
//! Weights: every parameter is a [`Weight`]. With [`Quantization::None`] all are dense tensors (f32, or bf16
//! on CUDA); quantization is CPU only; with int8/int4
//! the seven projections of each layer (and an untied `lm_head`, as int8) are held quantized and multiplied
//! by the quantized kernels of [`super::quant`], never expanded back to f32. [`InferenceModel::load`] reads a
//! checkpoint one decoder layer at a time and quantizes each layer before reading the next, so loading never
//! holds more than the quantized model plus one layer (or the embedding) in f32.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use qkernels::ops::{self, RopeTable};
use qkernels::{DType, Device, Tensor};
use qparallel::hf::{self, TensorMap};
use qparallel::model::{
    DecoderLayer, Ffn, ModelConfig, ModelError, Qwen3Model, Qwen3Params, param_shapes,
};

use super::error::EngineError;
use super::kv::{BlockTable, KvCache, KvCacheConfig};
use super::lora::{AdapterId, AdapterSet, RowRun, row_runs};
use super::quant::{Format, QuantError, Quantization, Weight, WeightStats, grouped_linear};

/// The next tokens of one sequence (see module docs).
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    /// Tokens to run, `n ≥ 1`.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; positions `0..start` must already be cached.
    pub start: usize,
    /// The sequence's blocks; must cover `0..start + n`.
    pub table: &'a BlockTable,
    /// The LoRA adapter this sequence runs with ([`InferenceModel::with_adapters`]); `None`: the base model.
    pub adapter: Option<AdapterId>,
}

/// The per-call u32 tensors of the paged cache (see the module docs), shared by every layer.
struct PagedRows {
    /// `[T]` flat cache slot of each row.
    slots: Tensor,
    /// `[chunks, max blocks]` block tables, zero-padded.
    tables: Tensor,
    /// `[T]` chunk index of each row.
    row_seq: Tensor,
    /// `[T]` position of each row.
    row_pos: Tensor,
    /// Runs of rows by adapter (empty when no adapter is served).
    runs: Vec<RowRun>,
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
    params: Qwen3Params<Weight>,
    device: Device,
    dtype: DType,
    quantization: Quantization,
    /// LoRA adapters served beside the base weights (see [`super::lora`]).
    adapters: AdapterSet,
}

/// The dtype the engine computes in on `device`: f32 on the CPU (the reference backend), bf16 on CUDA.
pub fn compute_dtype(device: Device) -> DType {
    match device {
        Device::Cpu => DType::F32,
        Device::Cuda(_) => DType::BF16,
    }
}

/// A dense weight in `dtype` (a no-op when it already is, or when it is quantized).
fn cast_weight(w: Weight, dtype: DType) -> Result<Weight, EngineError> {
    Ok(match w {
        Weight::F32(t) if t.dtype() != dtype => Weight::F32(t.to_dtype(dtype)?),
        w => w,
    })
}

/// `Some(i)` for a parameter of decoder layer `i`.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

impl InferenceModel {
    /// Loads an HF model dir (`config.json` + safetensors) in f32.
    pub fn from_hf_dir(dir: impl AsRef<Path>, device: Device) -> Result<Self, EngineError> {
        InferenceModel::load(dir, device, Quantization::None)
    }

    /// Loads an HF model dir with its linear weights stored as `quantization` says (see the module docs).
    ///
    /// The checkpoint is checked against the config from the safetensors headers before any data is read
    /// (the checks of `Qwen3Params::from_host`: every implied name present with its shape, no unexplained
    /// names, a tied `lm_head.weight` equal to the embedding); then the embedding, each decoder layer and the
    /// final norm/head are read and converted one group at a time.
    pub fn load(
        dir: impl AsRef<Path>,
        device: Device,
        quantization: Quantization,
    ) -> Result<Self, EngineError> {
        let dir = dir.as_ref();
        let config = ModelConfig::from_file(dir.join("config.json")).map_err(ModelError::from)?;
        config.validate().map_err(ModelError::from)?;
        if quantization != Quantization::None && device != Device::Cpu {
            return Err(QuantError::UnsupportedDevice(device).into());
        }
        let on_disk = hf::checkpoint_tensors(dir).map_err(ModelError::from)?;
        let spec = param_shapes(&config);
        for (name, shape) in &spec {
            let meta = on_disk
                .get(name)
                .ok_or_else(|| ModelError::MissingParam { name: name.clone() })?;
            if &meta.shape != shape {
                return Err(ModelError::ParamShape {
                    name: name.clone(),
                    expected: shape.clone(),
                    got: meta.shape.clone(),
                }
                .into());
            }
        }
        const HEAD: &str = "lm_head.weight";
        let implied: BTreeSet<&str> = spec.iter().map(|(n, _)| n.as_str()).collect();
        let tied_head_on_disk = config.tie_word_embeddings && on_disk.contains_key(HEAD);
        let unexpected: Vec<String> = on_disk
            .keys()
            .filter(|n| !(implied.contains(n.as_str()) || tied_head_on_disk && *n == HEAD))
            .cloned()
            .collect();
        if !unexpected.is_empty() {
            return Err(ModelError::UnexpectedParams { names: unexpected }.into());
        }

        let mut weights: BTreeMap<String, Weight> = BTreeMap::new();
        for group in spec.chunk_by(|a, b| layer_of(&a.0) == layer_of(&b.0)) {
            let names: BTreeSet<&str> = group.iter().map(|(n, _)| n.as_str()).collect();
            let mut host = hf::load_checkpoint_filtered(dir, |n| names.contains(n))
                .map_err(ModelError::from)?;
            for (name, shape) in group {
                let t = host
                    .remove(name)
                    .ok_or_else(|| ModelError::MissingParam { name: name.clone() })?;
                let w = Weight::new(name, t.data, shape, quantization.format_for(name), &device)?;
                weights.insert(name.clone(), cast_weight(w, compute_dtype(device))?);
            }
        }
        if tied_head_on_disk {
            let head = hf::load_checkpoint_filtered(dir, |n| n == HEAD)
                .map_err(ModelError::from)?
                .remove(HEAD)
                .ok_or_else(|| ModelError::MissingParam { name: HEAD.into() })?;
            let embed = weights.get("model.embed_tokens.weight").ok_or_else(|| {
                ModelError::MissingParam {
                    name: "model.embed_tokens.weight".into(),
                }
            })?;
            // Compared in the dtype the embedding is held in (bf16 on CUDA), through the same conversion.
            let head = Tensor::from_f32(head.data, &head.shape, &device)?
                .to_dtype(compute_dtype(device))?
                .to_vec_f32()?;
            if head != embed.dense()?.to_vec_f32()? {
                return Err(ModelError::TiedHeadMismatch.into());
            }
        }
        let params = Qwen3Params::build(&config, &mut |name, _| {
            weights
                .remove(&name)
                .ok_or(ModelError::MissingParam { name })
        })?;
        Ok(InferenceModel {
            config,
            params,
            device,
            dtype: compute_dtype(device),
            quantization,
            adapters: AdapterSet::default(),
        })
    }

    /// Builds the model from HF-named host tensors already in memory (e.g. base weights with LoRA adapters
    /// merged in), checked against `config` as [`InferenceModel::from_hf_dir`] checks a checkpoint.
    pub fn from_tensors(
        config: ModelConfig,
        tensors: TensorMap,
        device: Device,
    ) -> Result<Self, EngineError> {
        // Checked and built on the host, then moved to `device` one tensor at a time.
        let m = Qwen3Model::from_host(config, tensors, Device::Cpu)?;
        let config = m.config.clone();
        InferenceModel::from_params(config, m.params, device)
    }

    /// Wraps an already-built training model (shares its config and parameters on the CPU; on CUDA each
    /// parameter is converted to bf16, see the module docs).
    pub fn from_model(model: Qwen3Model) -> Result<Self, EngineError> {
        let device = model.device();
        let config = model.config.clone();
        let params = model.params;
        InferenceModel::from_params(config, params, device)
    }

    /// Builds the model on `device` from parameters on any device (e.g. random weights for a benchmark, built
    /// on the GPU). One tensor at a time, each is moved to `device` and converted to its compute dtype
    /// ([`compute_dtype`]); the original is dropped as soon as its copy exists (when nothing else holds it), so
    /// the full model is never on the device in f32.
    pub fn from_params(
        config: ModelConfig,
        params: Qwen3Params<Tensor>,
        device: Device,
    ) -> Result<Self, EngineError> {
        let dtype = compute_dtype(device);
        let mut named = params.to_named();
        drop(params); // `named` now holds the only references: each original goes when it is converted
        let params = Qwen3Params::build(&config, &mut |name, _| {
            let t = named
                .remove(&name)
                .ok_or_else(|| ModelError::MissingParam { name: name.clone() })?;
            let t = t.to_device(&device)?;
            let t = if t.dtype() == dtype {
                t
            } else {
                t.to_dtype(dtype)?
            };
            Ok(Weight::F32(t))
        })?;
        Ok(InferenceModel {
            config,
            params,
            device,
            dtype,
            quantization: Quantization::None,
            adapters: AdapterSet::default(),
        })
    }

    /// Quantizes the f32 linear weights as `quantization` says (see the module docs), dropping each f32
    /// tensor as soon as its quantized form exists. `None`, or the mode the model already has, leaves it as it
    /// is; a model quantized in another mode is an error.
    pub fn quantize(mut self, quantization: Quantization) -> Result<Self, EngineError> {
        if quantization == Quantization::None || quantization == self.quantization {
            return Ok(self);
        }
        if self.quantization != Quantization::None {
            return Err(QuantError::AlreadyQuantized {
                have: self.quantization,
                want: quantization,
            }
            .into());
        }
        if self.device != Device::Cpu {
            return Err(QuantError::UnsupportedDevice(self.device).into());
        }
        let device = self.device;
        let mut failed = None;
        self.params.visit_mut(&mut |name, w| {
            let format = quantization.format_for(&name);
            if failed.is_some() || format == Format::F32 {
                return;
            }
            let converted = w.dense().map_err(EngineError::from).and_then(|t| {
                let shape = t.shape().to_vec();
                Weight::new(&name, t.to_vec_f32()?, &shape, format, &device)
            });
            match converted {
                Ok(q) => *w = q,
                Err(e) => failed = Some(e),
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        self.quantization = quantization;
        Ok(self)
    }

    /// Serves the PEFT adapter directories `specs` (`(name, dir)`) beside the base weights, chosen per sequence by
    /// [`Chunk::adapter`] (see [`super::lora`]): each is checked against this model's parameter shapes and uploaded
    /// to its device in its dtype. `base_name` is the base model's served name (an adapter cannot take it).
    pub fn with_adapters(mut self, specs: &[(String, std::path::PathBuf)], base_name: &str) -> Result<Self, EngineError> {
        let mut shapes = BTreeMap::new();
        self.params.visit(&mut |name, w| {
            shapes.insert(name, w.shape().to_vec());
        });
        self.adapters =
            AdapterSet::load(specs, base_name, &|n| shapes.get(n).cloned(), &self.device, self.dtype)?;
        Ok(self)
    }

    /// The adapters served beside the base weights.
    pub fn adapters(&self) -> &AdapterSet {
        &self.adapters
    }

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Where the model lives.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The dtype of activations, dense weights and the KV cache ([`compute_dtype`] of the device).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The mode the linear weights are stored in.
    pub fn quantization(&self) -> Quantization {
        self.quantization
    }

    /// Every parameter as held (HF names through `Qwen3Params::visit`).
    pub fn weights(&self) -> &Qwen3Params<Weight> {
        &self.params
    }

    /// Parameter count and bytes held, against the same parameters in f32.
    pub fn weight_stats(&self) -> WeightStats {
        let mut s = WeightStats {
            quantization: self.quantization,
            ..WeightStats::default()
        };
        self.params.visit(&mut |_, w| {
            s.params += w.numel();
            s.bytes += w.bytes();
            if w.format() != Format::F32 {
                s.quantized_params += w.numel();
            }
        });
        s.f32_bytes = 4 * s.params;
        s
    }

    /// A KV cache shaped for this model, on its device in its dtype.
    pub fn new_cache(&self, config: KvCacheConfig) -> Result<KvCache, EngineError> {
        KvCache::new(
            config,
            self.config.num_hidden_layers,
            self.config.num_key_value_heads,
            self.config.head_dim,
            self.dtype,
            self.device,
        )
    }

    /// Bytes of one KV block of `block_size` positions over all layers.
    pub fn kv_bytes_per_block(&self, block_size: usize) -> usize {
        KvCache::bytes_per_block(
            block_size,
            self.config.num_hidden_layers,
            self.config.num_key_value_heads,
            self.config.head_dim,
            self.dtype,
        )
    }

    /// `[vocab, hidden]` LM head (the embedding when tied).
    fn head(&self) -> &Weight {
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
        let Some(logits) = self.logits(cache, chunks, rows)? else {
            return Ok(Vec::new());
        };
        Ok(logits
            .to_vec_f32()?
            .chunks(self.config.vocab_size)
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// Runs `chunks` like [`InferenceModel::forward`] with [`LogitRows::Last`] and returns the argmax of each
    /// chunk's last logits row (greedy decoding, ties to the lowest id), computed on the model's device so that
    /// only the ids come back to the host.
    pub fn forward_greedy(
        &self,
        cache: &mut KvCache,
        chunks: &[Chunk<'_>],
    ) -> Result<Vec<u32>, EngineError> {
        match self.logits(cache, chunks, LogitRows::Last)? {
            None => Ok(Vec::new()),
            Some(logits) => Ok(ops::argmax_rows(&logits)?.to_vec_u32()?),
        }
    }

    /// The forward pass; the logits rows asked for as a `[rows, vocab]` tensor on the device (`None` for no
    /// chunks).
    fn logits(
        &self,
        cache: &mut KvCache,
        chunks: &[Chunk<'_>],
        rows: LogitRows,
    ) -> Result<Option<Tensor>, EngineError> {
        let cfg = &self.config;
        if cache.device() != self.device || cache.dtype() != self.dtype {
            return Err(EngineError::InvalidConfig(format!(
                "KV cache in {} on {}, model in {} on {}",
                cache.dtype(),
                cache.device(),
                self.dtype,
                self.device
            )));
        }
        let mut ids = Vec::new();
        let mut pos = Vec::new();
        let mut slots = Vec::new();
        let mut row_seq = Vec::new();
        let max_blocks = chunks
            .iter()
            .map(|c| c.table.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut tables = vec![0u32; chunks.len() * max_blocks];
        for (ci, c) in chunks.iter().enumerate() {
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
            if let Some(id) = c.adapter
                && id >= self.adapters.len()
            {
                return Err(EngineError::InvalidRequest(format!("no adapter with id {id}")));
            }
            if let Some(&bad) = c.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(EngineError::InvalidRequest(format!(
                    "token id {bad} is out of the vocabulary ({})",
                    cfg.vocab_size
                )));
            }
            ids.extend_from_slice(c.tokens);
            pos.extend((c.start..c.start + c.tokens.len()).map(|p| p as u32));
            slots.extend((c.start..c.start + c.tokens.len()).map(|p| cache.slot(c.table, p)));
            row_seq.extend(std::iter::repeat_n(ci as u32, c.tokens.len()));
            tables[ci * max_blocks..ci * max_blocks + c.table.len()]
                .copy_from_slice(c.table.blocks());
        }
        if ids.is_empty() {
            return Ok(None);
        }
        let t = ids.len();
        let dev = &self.device;
        let ids_t = Tensor::from_u32(ids, &[t], dev)?;
        let pos_t = Tensor::from_u32(pos, &[t], dev)?;
        let rope = RopeTable::new(&pos_t, cfg.head_dim, cfg.rope_theta)?;
        let paged = PagedRows {
            slots: Tensor::from_u32(slots, &[t], dev)?,
            tables: Tensor::from_u32(tables, &[chunks.len(), max_blocks], dev)?,
            row_seq: Tensor::from_u32(row_seq, &[t], dev)?,
            row_pos: pos_t,
            runs: if self.adapters.is_empty() {
                Vec::new()
            } else {
                row_runs(chunks.iter().map(|c| (c.tokens.len(), c.adapter)))
            },
        };

        let mut x = ops::embedding_fwd(&ids_t, self.params.embed_tokens.dense()?)?;
        for (li, layer) in self.params.layers.iter().enumerate() {
            x = self.layer(li, layer, &x, &rope, cache, &paged)?;
        }
        let hn = ops::rmsnorm_fwd(&x, self.params.norm.dense()?, cfg.rms_norm_eps)?.y;
        let hn = match rows {
            LogitRows::All => hn,
            LogitRows::Last => {
                // One row gather (the embedding lookup's kernel) of each chunk's last row.
                let mut end = 0;
                let mut last = Vec::with_capacity(chunks.len());
                for c in chunks {
                    end += c.tokens.len();
                    last.push(end as u32 - 1);
                }
                let last = Tensor::from_u32(last, &[chunks.len()], dev)?;
                ops::embedding_fwd(&last, &hn)?
            }
        };
        Ok(Some(self.head().linear(&hn)?))
    }

    fn layer(
        &self,
        li: usize,
        layer: &DecoderLayer<Weight>,
        x: &Tensor,
        rope: &RopeTable,
        cache: &mut KvCache,
        paged: &PagedRows,
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
        let xn = ops::rmsnorm_fwd(x, layer.input_layernorm.dense()?, eps)?.y;
        let proj = |module: &str, w: &Weight, x: &Tensor| self.proj(li, module, w, x, &paged.runs);
        let q = proj("self_attn.q_proj", &a.q_proj, &xn)?.reshape(&[t, hq, d])?;
        let q = ops::rope_fwd(&ops::rmsnorm_fwd(&q, a.q_norm.dense()?, eps)?.y, rope)?;
        let k = proj("self_attn.k_proj", &a.k_proj, &xn)?.reshape(&[t, hkv, d])?;
        let k = ops::rope_fwd(&ops::rmsnorm_fwd(&k, a.k_norm.dense()?, eps)?.y, rope)?;
        let v = proj("self_attn.v_proj", &a.v_proj, &xn)?.reshape(&[t, hkv, d])?;
        // Write first: a prefill row attends to the rows of its own chunk.
        cache.write(li, &k, &v, &paged.slots)?;
        let (kc, vc) = cache.pools(li);
        let o = ops::paged_attention(&q, kc, vc, &paged.tables, &paged.row_seq, &paged.row_pos)?
            .reshape(&[t, hq * d])?;
        let h = x.add(&proj("self_attn.o_proj", &a.o_proj, &o)?)?;
        let hn = ops::rmsnorm_fwd(&h, layer.post_attention_layernorm.dense()?, eps)?.y;
        let f = self.ffn(li, &layer.mlp, &hn, &paged.runs)?;
        Ok(h.add(&f)?)
    }

    /// `x·Wᵀ` of the projection `module` of layer `li`, plus the LoRA contributions of the adapters its rows use.
    fn proj(
        &self,
        li: usize,
        module: &str,
        w: &Weight,
        x: &Tensor,
        runs: &[RowRun],
    ) -> Result<Tensor, EngineError> {
        let y = w.linear(x)?;
        if runs.iter().all(|r| r.adapter.is_none()) {
            return Ok(y);
        }
        self.adapters.apply(&format!("model.layers.{li}.{module}.weight"), x, y, runs)
    }

    fn ffn(&self, li: usize, ffn: &Ffn<Weight>, xn: &Tensor, runs: &[RowRun]) -> Result<Tensor, EngineError> {
        match ffn {
            Ffn::Dense(m) => {
                let g = self.proj(li, "mlp.gate_proj", &m.gate_proj, xn, runs)?;
                let u = self.proj(li, "mlp.up_proj", &m.up_proj, xn, runs)?;
                self.proj(li, "mlp.down_proj", &m.down_proj, &ops::swiglu_fwd(&g, &u)?, runs)
            }
            Ffn::Moe(moe) => {
                let mc = self.config.moe.as_ref().ok_or_else(|| {
                    EngineError::InvalidConfig("MoE layer in a config without MoE settings".into())
                })?;
                let logits = ops::linear_fwd(xn, moe.gate.dense()?)?;
                let routing = ops::router_fwd(&logits, mc.num_experts_per_tok, mc.norm_topk_prob)?;
                let plan = ops::moe_plan(&routing.topk_idx, mc.num_experts)?;
                let xp = ops::moe_permute(xn, &plan)?;
                let offs = &plan.expert_offsets;
                let wg: Vec<&Weight> = moe.experts.iter().map(|e| &e.gate_proj).collect();
                let wu: Vec<&Weight> = moe.experts.iter().map(|e| &e.up_proj).collect();
                let wd: Vec<&Weight> = moe.experts.iter().map(|e| &e.down_proj).collect();
                let g = grouped_linear(&xp, &wg, offs)?;
                let u = grouped_linear(&xp, &wu, offs)?;
                let yp = grouped_linear(&ops::swiglu_fwd(&g, &u)?, &wd, offs)?;
                Ok(ops::moe_unpermute(&yp, &routing.topk_weight, &plan)?)
            }
        }
    }
}
