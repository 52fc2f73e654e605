//! The Qwen3 / Qwen3-MoE causal LM: embedding, decoder layers, final norm, LM head, loss; forward and backward.
//!
//! ```text
//! ids [T] ── embed ── x₀ [T, hidden] ── layer 0 … layer L-1 ── rmsnorm(model.norm) ── ·W_headᵀ ── logits [T, V]
//! loss = Σ w·CE(logits, targets) / Σ w  +  router_aux_loss_coef · aux   (aux only for MoE models)
//! ```
//! `W_head` is `lm_head.weight`, or `model.embed_tokens.weight` with tied embeddings, in which case the
//! embedding gradient is the sum of the lookup's scatter-add and the head's GEMM gradient.

use std::path::Path;

use qkernels::ops::{self, RouterStats};
use qkernels::{Device, Tensor};

use super::batch::Batch;
use super::config::ModelConfig;
use super::error::Result;
use super::layer::{LayerCtx, LayerSaved, rope_and_segments};
use super::moe::AuxLossGrad;
use super::params::{DecoderLayer, NamedTensors, Qwen3Params};
use crate::hf::{self, TensorMap};

/// A Qwen3 model on one device, with its config.
#[derive(Debug, Clone)]
pub struct Qwen3Model {
    pub config: ModelConfig,
    pub params: Qwen3Params,
    /// Recompute each layer's activations in backward instead of keeping them.
    pub gradient_checkpointing: bool,
    device: Device,
}

/// Result of [`Qwen3Model::forward_backward`].
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The trained loss: `ce_loss + router_aux_loss_coef · aux_loss`.
    pub loss: f64,
    /// Weighted cross-entropy.
    pub ce_loss: f64,
    /// Load-balancing loss before its coefficient (`None` for dense models).
    pub aux_loss: Option<f64>,
    /// `d loss / d parameter` for every parameter, by HF name (no `lm_head.weight` when tied).
    pub grads: NamedTensors,
}

/// Result of [`Qwen3Model::forward_trace`]: intermediate values for debugging and parity checks.
#[derive(Debug, Clone)]
pub struct ForwardTrace {
    /// `[T, hidden]` output of every decoder layer.
    pub layer_outputs: Vec<Tensor>,
    /// `[T, vocab]`
    pub logits: Tensor,
    /// Routing statistics merged over the MoE layers (`None` for dense models).
    pub router_stats: Option<RouterStats>,
}

/// Device tensors of a batch.
struct Inputs {
    ids: Tensor,
    rope: ops::RopeTable,
    segments: Option<Tensor>,
}

/// What the forward pass leaves for the backward pass.
struct Forward {
    layers: Vec<LayerSaved>,
    /// `[T, hidden]` input of the final norm.
    x_last: Tensor,
    /// `[T]`
    rstd_final: Tensor,
    /// `[T, hidden]` normalised final hidden state.
    hn: Tensor,
    /// `[T, vocab]`
    logits: Tensor,
    layer_outputs: Vec<Tensor>,
}

impl Qwen3Model {
    /// Wraps parameters built for `config` (see [`Qwen3Params::from_host`] / [`Qwen3Params::random`]).
    pub fn new(config: ModelConfig, params: Qwen3Params, device: Device) -> Self {
        Qwen3Model {
            config,
            params,
            gradient_checkpointing: false,
            device,
        }
    }

    /// Loads parameters from host tensors keyed by HF name and checks them against the config.
    pub fn from_host(config: ModelConfig, tensors: TensorMap, device: Device) -> Result<Self> {
        config.validate()?;
        let params = Qwen3Params::from_host(&config, tensors, &device)?;
        Ok(Qwen3Model::new(config, params, device))
    }

    /// Loads an HF model directory: `config.json` plus `model.safetensors` or a sharded checkpoint.
    pub fn from_hf_dir(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = ModelConfig::from_file(dir.join("config.json"))?;
        let tensors = hf::load_checkpoint(dir)?;
        Qwen3Model::from_host(config, tensors, device)
    }

    /// Random parameters (for tests): see [`Qwen3Params::random`].
    pub fn random(config: ModelConfig, seed: u64, std: f32, device: Device) -> Result<Self> {
        config.validate()?;
        let params = Qwen3Params::random(&config, seed, std, &device)?;
        Ok(Qwen3Model::new(config, params, device))
    }

    /// Turns per-layer activation recomputation on or off.
    pub fn with_gradient_checkpointing(mut self, on: bool) -> Self {
        self.gradient_checkpointing = on;
        self
    }

    /// The device the parameters live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// `[vocab, hidden]` weight of the LM head (the embedding when tied).
    fn head_weight(&self) -> &Tensor {
        self.params
            .lm_head
            .as_ref()
            .unwrap_or(&self.params.embed_tokens)
    }

    fn inputs(&self, batch: &Batch) -> Result<Inputs> {
        batch.validate(self.config.vocab_size)?;
        let ids = Tensor::from_u32(batch.input_ids.clone(), &[batch.tokens()], &self.device)?;
        let (rope, segments) = rope_and_segments(
            &self.config,
            &batch.position_ids,
            batch.segment_ids.as_deref(),
            batch.batch,
            batch.seq,
            &self.device,
        )?;
        Ok(Inputs {
            ids,
            rope,
            segments,
        })
    }

    fn ctx<'a>(&'a self, batch: &Batch, inputs: &'a Inputs) -> LayerCtx<'a> {
        LayerCtx {
            cfg: &self.config,
            batch: batch.batch,
            seq: batch.seq,
            rope: &inputs.rope,
            segment_ids: inputs.segments.as_ref(),
        }
    }

    fn forward(&self, batch: &Batch, inputs: &Inputs, keep_layer_outputs: bool) -> Result<Forward> {
        let ctx = self.ctx(batch, inputs);
        let mut x = ops::embedding_fwd(&inputs.ids, &self.params.embed_tokens)?; // [T, hidden]
        let mut layers = Vec::with_capacity(self.params.layers.len());
        let mut layer_outputs = Vec::new();
        for layer in &self.params.layers {
            let (y, saved) = layer.forward(&x, &ctx, self.gradient_checkpointing)?;
            layers.push(saved);
            if keep_layer_outputs {
                layer_outputs.push(y.clone());
            }
            x = y;
        }
        let nf = ops::rmsnorm_fwd(&x, &self.params.norm, self.config.rms_norm_eps)?;
        let logits = ops::linear_fwd(&nf.y, self.head_weight())?; // [T, vocab]
        Ok(Forward {
            layers,
            x_last: x,
            rstd_final: nf.rstd,
            hn: nf.y,
            logits,
            layer_outputs,
        })
    }

    /// Routing statistics merged over the MoE layers, `None` for dense models.
    fn merged_stats(&self, layers: &[LayerSaved]) -> Result<Option<RouterStats>> {
        let Some(moe) = &self.config.moe else {
            return Ok(None);
        };
        let mut total = RouterStats::new(moe.num_experts);
        for s in layers.iter().filter_map(|l| l.router_stats()) {
            total.merge(s)?;
        }
        Ok(Some(total))
    }

    /// Logits `[batch·seq, vocab]` (forward only).
    pub fn logits(&self, batch: &Batch) -> Result<Tensor> {
        let inputs = self.inputs(batch)?;
        Ok(self.forward(batch, &inputs, false)?.logits)
    }

    /// Logits plus every layer's output and the merged routing statistics.
    pub fn forward_trace(&self, batch: &Batch) -> Result<ForwardTrace> {
        let inputs = self.inputs(batch)?;
        let f = self.forward(batch, &inputs, true)?;
        let router_stats = self.merged_stats(&f.layers)?;
        Ok(ForwardTrace {
            layer_outputs: f.layer_outputs,
            logits: f.logits,
            router_stats,
        })
    }

    /// Forward and backward over `batch`: the loss and the gradient of every parameter.
    ///
    /// The CE term is normalised by `Σ loss_weights` of this batch, so a batch whose weights are all zero is an
    /// error (`KernelError::InvalidArgument`). MoE aux-loss statistics are global over this batch's MoE layers.
    pub fn forward_backward(&self, batch: &Batch) -> Result<StepOutput> {
        let inputs = self.inputs(batch)?;
        let ctx = self.ctx(batch, &inputs);
        let t = batch.tokens();
        let f = self.forward(batch, &inputs, false)?;

        // Loss.
        let targets = Tensor::from_u32(batch.targets.clone(), &[t], &self.device)?;
        let weights = Tensor::from_f32(batch.loss_weights.clone(), &[t], &self.device)?;
        let ce = ops::cross_entropy_fwd_bwd(&f.logits, &targets, &weights, None)?;
        let stats = self.merged_stats(&f.layers)?;
        let aux_loss = stats.as_ref().map(|s| s.aux_loss());
        let coef = self
            .config
            .moe
            .as_ref()
            .map(|m| m.router_aux_loss_coef)
            .unwrap_or(0.0);
        let loss = ce.loss + coef * aux_loss.unwrap_or(0.0);
        let aux = stats.as_ref().map(|s| AuxLossGrad { stats: s, coef });

        // Head and final norm.
        let g_head = ops::linear_bwd(&ce.dlogits, &f.hn, self.head_weight())?;
        let g_norm = ops::rmsnorm_bwd(&g_head.dx, &f.x_last, &self.params.norm, &f.rstd_final)?;

        // Layers, last to first.
        let mut dx = g_norm.dx;
        let mut layer_grads = Vec::with_capacity(self.params.layers.len());
        for (layer, saved) in self.params.layers.iter().zip(f.layers).rev() {
            let (d, g) = layer.backward(&dx, saved, &ctx, aux)?;
            layer_grads.push(g);
            dx = d;
        }
        layer_grads.reverse();

        // Embedding (plus the head's gradient when tied).
        let tied = self.params.lm_head.is_none();
        let grads = assemble_grads(
            self.config.vocab_size,
            tied,
            &inputs.ids,
            &dx,
            layer_grads,
            g_norm.dw,
            g_head.dw,
        )?;
        Ok(StepOutput {
            loss,
            ce_loss: ce.loss,
            aux_loss,
            grads: grads.to_named(),
        })
    }

    /// Forward-only loss: `(total, ce, aux)` as [`forward_backward`](Self::forward_backward) would report them.
    pub fn loss(&self, batch: &Batch) -> Result<(f64, f64, Option<f64>)> {
        let inputs = self.inputs(batch)?;
        let f = self.forward(batch, &inputs, false)?;
        let t = batch.tokens();
        let targets = Tensor::from_u32(batch.targets.clone(), &[t], &self.device)?;
        let weights = Tensor::from_f32(batch.loss_weights.clone(), &[t], &self.device)?;
        let ce = ops::cross_entropy_fwd_bwd(&f.logits, &targets, &weights, None)?.loss;
        let aux = self.merged_stats(&f.layers)?.map(|s| s.aux_loss());
        let coef = self
            .config
            .moe
            .as_ref()
            .map(|m| m.router_aux_loss_coef)
            .unwrap_or(0.0);
        Ok((ce + coef * aux.unwrap_or(0.0), ce, aux))
    }
}

/// The last step of a backward over the full parameter set (the single-device model and context/expert
/// parallelism share it): the embedding gradient from the first layer's input gradient `dx [T, hidden]` —
/// plus the LM head's gradient `head_dw [vocab, hidden]` when the embeddings are `tied` — assembled with the
/// layer and final-norm gradients.
pub(crate) fn assemble_grads(
    vocab_size: usize,
    tied: bool,
    ids: &Tensor,
    dx: &Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    head_dw: Tensor,
) -> Result<Qwen3Params> {
    let mut embed_tokens = ops::embedding_bwd(ids, dx, vocab_size)?;
    let lm_head = if tied {
        embed_tokens.add_assign(&head_dw)?;
        None
    } else {
        Some(head_dw)
    };
    Ok(Qwen3Params {
        embed_tokens,
        layers,
        norm,
        lm_head,
    })
}
