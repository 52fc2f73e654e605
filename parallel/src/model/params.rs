//! Parameter containers of Qwen3 / Qwen3-MoE, their HF names and shapes.
//!
//! Every container is generic over what it holds at each parameter slot: `T = Tensor` for parameters and for
//! gradients (a gradient has its parameter's shape and name), `T = Vec<usize>` for the shape spec that
//! [`param_shapes`] derives from a config. One builder ([`Qwen3Params::build`]) walks the config in HF order and
//! asks a closure for each `(name, shape)`, so loading, random initialisation and the spec can never disagree
//! on a name. [`fill_from_named`] fills any container's slots from tensors keyed by name (gradients into a
//! rank's parameter container), checking shapes.
//!
//! HF names (with `{i}` the layer, `{e}` the expert):
//! - `model.embed_tokens.weight [vocab, hidden]`, `model.norm.weight [hidden]`, `lm_head.weight [vocab, hidden]`
//!   (absent when `tie_word_embeddings`);
//! - `model.layers.{i}.input_layernorm.weight [hidden]`, `…post_attention_layernorm.weight [hidden]`;
//! - `…self_attn.q_proj.weight [heads·head_dim, hidden]`, `k_proj`/`v_proj [kv_heads·head_dim, hidden]`,
//!   `o_proj [hidden, heads·head_dim]`, `q_norm`/`k_norm [head_dim]`;
//! - dense layers: `…mlp.gate_proj`/`up_proj [ffn, hidden]`, `…mlp.down_proj [hidden, ffn]`;
//! - MoE layers: router `…mlp.gate.weight [experts, hidden]`, `…mlp.experts.{e}.{gate,up,down}_proj.weight`
//!   with `ffn = moe_intermediate_size`.

use std::collections::BTreeMap;

use qkernels::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::config::ModelConfig;
use super::error::{ModelError, Result};
use crate::hf::{HostTensor, TensorMap};

/// Tensors keyed by HF name.
pub type NamedTensors = BTreeMap<String, Tensor>;

/// A parameter slot that [`fill_from_named`] could not fill: no tensor of its name, or one of another shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedMismatch {
    /// The HF name of the slot.
    pub name: String,
    /// What was wrong (`no gradient`, or both shapes).
    pub detail: String,
}

/// Overwrites every slot that `visit_mut` walks with the tensor of its name in `named` (e.g. gradients by name
/// into a clone of a rank's parameter container, whatever its kind), checking each shape against the slot's.
/// Every slot is visited; the first mismatch is returned.
pub fn fill_from_named(
    named: &NamedTensors,
    visit_mut: impl FnOnce(&mut dyn FnMut(String, &mut Tensor)),
) -> std::result::Result<(), NamedMismatch> {
    let mut err = None;
    visit_mut(&mut |name, t| match named.get(&name) {
        Some(g) if g.shape() == t.shape() => *t = g.clone(),
        other => {
            err.get_or_insert(NamedMismatch {
                detail: match other {
                    Some(g) => format!("gradient shape {:?}, parameter {:?}", g.shape(), t.shape()),
                    None => "no gradient".into(),
                },
                name,
            });
        }
    });
    err.map_or(Ok(()), Err)
}

/// Self-attention weights of one layer (`self_attn.*`).
#[derive(Debug, Clone)]
pub struct Attention<T = Tensor> {
    /// `[heads·head_dim, hidden]`
    pub q_proj: T,
    /// `[kv_heads·head_dim, hidden]`
    pub k_proj: T,
    /// `[kv_heads·head_dim, hidden]`
    pub v_proj: T,
    /// `[hidden, heads·head_dim]`
    pub o_proj: T,
    /// `[head_dim]`: RMSNorm applied per q head before RoPE.
    pub q_norm: T,
    /// `[head_dim]`: RMSNorm applied per kv head before RoPE.
    pub k_norm: T,
}

/// A SwiGLU MLP: the dense `mlp.*` of a layer, or one expert (`mlp.experts.{e}.*`).
#[derive(Debug, Clone)]
pub struct Mlp<T = Tensor> {
    /// `[ffn, hidden]`
    pub gate_proj: T,
    /// `[ffn, hidden]`
    pub up_proj: T,
    /// `[hidden, ffn]`
    pub down_proj: T,
}

/// A sparse MoE block: router plus experts.
#[derive(Debug, Clone)]
pub struct SparseMoe<T = Tensor> {
    /// Router, HF `mlp.gate.weight`: `[experts, hidden]`.
    pub gate: T,
    /// `num_experts` experts, each an [`Mlp`] of `moe_intermediate_size`.
    pub experts: Vec<Mlp<T>>,
}

/// The feed-forward part of a layer.
#[derive(Debug, Clone)]
pub enum Ffn<T = Tensor> {
    Dense(Mlp<T>),
    Moe(SparseMoe<T>),
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer<T = Tensor> {
    /// `[hidden]`
    pub input_layernorm: T,
    pub self_attn: Attention<T>,
    /// `[hidden]`
    pub post_attention_layernorm: T,
    pub mlp: Ffn<T>,
}

/// The whole model's parameters (or gradients).
#[derive(Debug, Clone)]
pub struct Qwen3Params<T = Tensor> {
    /// `[vocab, hidden]`
    pub embed_tokens: T,
    pub layers: Vec<DecoderLayer<T>>,
    /// `[hidden]`
    pub norm: T,
    /// `[vocab, hidden]`; `None` when the head is tied to `embed_tokens`.
    pub lm_head: Option<T>,
}

/// The closure a builder calls for every parameter: `(HF name, shape) → slot value`.
pub type SlotFn<'a, T> = dyn FnMut(String, Vec<usize>) -> Result<T> + 'a;

impl<T> Attention<T> {
    fn build(cfg: &ModelConfig, p: &str, f: &mut SlotFn<'_, T>) -> Result<Self> {
        let (h, q, kv, d) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        Ok(Attention {
            q_proj: f(format!("{p}.q_proj.weight"), vec![q, h])?,
            k_proj: f(format!("{p}.k_proj.weight"), vec![kv, h])?,
            v_proj: f(format!("{p}.v_proj.weight"), vec![kv, h])?,
            o_proj: f(format!("{p}.o_proj.weight"), vec![h, q])?,
            q_norm: f(format!("{p}.q_norm.weight"), vec![d])?,
            k_norm: f(format!("{p}.k_norm.weight"), vec![d])?,
        })
    }

    fn visit<'a>(&'a self, p: &str, f: &mut dyn FnMut(String, &'a T)) {
        f(format!("{p}.q_proj.weight"), &self.q_proj);
        f(format!("{p}.k_proj.weight"), &self.k_proj);
        f(format!("{p}.v_proj.weight"), &self.v_proj);
        f(format!("{p}.o_proj.weight"), &self.o_proj);
        f(format!("{p}.q_norm.weight"), &self.q_norm);
        f(format!("{p}.k_norm.weight"), &self.k_norm);
    }

    fn visit_mut(&mut self, p: &str, f: &mut dyn FnMut(String, &mut T)) {
        f(format!("{p}.q_proj.weight"), &mut self.q_proj);
        f(format!("{p}.k_proj.weight"), &mut self.k_proj);
        f(format!("{p}.v_proj.weight"), &mut self.v_proj);
        f(format!("{p}.o_proj.weight"), &mut self.o_proj);
        f(format!("{p}.q_norm.weight"), &mut self.q_norm);
        f(format!("{p}.k_norm.weight"), &mut self.k_norm);
    }
}

impl<T> Mlp<T> {
    fn build(hidden: usize, ffn: usize, p: &str, f: &mut SlotFn<'_, T>) -> Result<Self> {
        Ok(Mlp {
            gate_proj: f(format!("{p}.gate_proj.weight"), vec![ffn, hidden])?,
            up_proj: f(format!("{p}.up_proj.weight"), vec![ffn, hidden])?,
            down_proj: f(format!("{p}.down_proj.weight"), vec![hidden, ffn])?,
        })
    }

    fn visit<'a>(&'a self, p: &str, f: &mut dyn FnMut(String, &'a T)) {
        f(format!("{p}.gate_proj.weight"), &self.gate_proj);
        f(format!("{p}.up_proj.weight"), &self.up_proj);
        f(format!("{p}.down_proj.weight"), &self.down_proj);
    }

    fn visit_mut(&mut self, p: &str, f: &mut dyn FnMut(String, &mut T)) {
        f(format!("{p}.gate_proj.weight"), &mut self.gate_proj);
        f(format!("{p}.up_proj.weight"), &mut self.up_proj);
        f(format!("{p}.down_proj.weight"), &mut self.down_proj);
    }
}

impl<T> DecoderLayer<T> {
    fn build(cfg: &ModelConfig, i: usize, f: &mut SlotFn<'_, T>) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let h = cfg.hidden_size;
        let input_layernorm = f(format!("{p}.input_layernorm.weight"), vec![h])?;
        let self_attn = Attention::build(cfg, &format!("{p}.self_attn"), f)?;
        let post_attention_layernorm = f(format!("{p}.post_attention_layernorm.weight"), vec![h])?;
        let mlp = match &cfg.moe {
            Some(m) if cfg.layer_is_moe(i) => {
                let gate = f(format!("{p}.mlp.gate.weight"), vec![m.num_experts, h])?;
                let experts = (0..m.num_experts)
                    .map(|e| {
                        Mlp::build(
                            h,
                            m.moe_intermediate_size,
                            &format!("{p}.mlp.experts.{e}"),
                            f,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ffn::Moe(SparseMoe { gate, experts })
            }
            _ => Ffn::Dense(Mlp::build(
                h,
                cfg.intermediate_size,
                &format!("{p}.mlp"),
                f,
            )?),
        };
        Ok(DecoderLayer {
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            mlp,
        })
    }

    /// Calls `f(name, slot)` for every parameter of layer `i`.
    pub fn visit<'a>(&'a self, i: usize, f: &mut dyn FnMut(String, &'a T)) {
        let p = format!("model.layers.{i}");
        f(format!("{p}.input_layernorm.weight"), &self.input_layernorm);
        self.self_attn.visit(&format!("{p}.self_attn"), f);
        f(
            format!("{p}.post_attention_layernorm.weight"),
            &self.post_attention_layernorm,
        );
        match &self.mlp {
            Ffn::Dense(m) => m.visit(&format!("{p}.mlp"), f),
            Ffn::Moe(m) => {
                f(format!("{p}.mlp.gate.weight"), &m.gate);
                for (e, x) in m.experts.iter().enumerate() {
                    x.visit(&format!("{p}.mlp.experts.{e}"), f);
                }
            }
        }
    }

    /// Calls `f(name, slot)` for every parameter of layer `i`, mutably.
    pub fn visit_mut(&mut self, i: usize, f: &mut dyn FnMut(String, &mut T)) {
        let p = format!("model.layers.{i}");
        f(
            format!("{p}.input_layernorm.weight"),
            &mut self.input_layernorm,
        );
        self.self_attn.visit_mut(&format!("{p}.self_attn"), f);
        f(
            format!("{p}.post_attention_layernorm.weight"),
            &mut self.post_attention_layernorm,
        );
        match &mut self.mlp {
            Ffn::Dense(m) => m.visit_mut(&format!("{p}.mlp"), f),
            Ffn::Moe(m) => {
                f(format!("{p}.mlp.gate.weight"), &mut m.gate);
                for (e, x) in m.experts.iter_mut().enumerate() {
                    x.visit_mut(&format!("{p}.mlp.experts.{e}"), f);
                }
            }
        }
    }
}

impl<T> Qwen3Params<T> {
    /// Walks the config in HF order, asking `f` for every `(name, shape)`.
    pub fn build(cfg: &ModelConfig, f: &mut SlotFn<'_, T>) -> Result<Self> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = f("model.embed_tokens.weight".into(), vec![v, h])?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::build(cfg, i, f))
            .collect::<Result<Vec<_>>>()?;
        let norm = f("model.norm.weight".into(), vec![h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(f("lm_head.weight".into(), vec![v, h])?)
        };
        Ok(Qwen3Params {
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// Calls `f(name, slot)` for every parameter, in HF order.
    pub fn visit<'a>(&'a self, f: &mut dyn FnMut(String, &'a T)) {
        f("model.embed_tokens.weight".into(), &self.embed_tokens);
        for (i, l) in self.layers.iter().enumerate() {
            l.visit(i, f);
        }
        f("model.norm.weight".into(), &self.norm);
        if let Some(h) = &self.lm_head {
            f("lm_head.weight".into(), h);
        }
    }

    /// Calls `f(name, slot)` for every parameter, mutably (optimizer updates).
    pub fn visit_mut(&mut self, f: &mut dyn FnMut(String, &mut T)) {
        f("model.embed_tokens.weight".into(), &mut self.embed_tokens);
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.visit_mut(i, f);
        }
        f("model.norm.weight".into(), &mut self.norm);
        if let Some(h) = &mut self.lm_head {
            f("lm_head.weight".into(), h);
        }
    }

    /// `(name, slot)` pairs in HF order.
    pub fn named(&self) -> Vec<(String, &T)> {
        let mut out = Vec::new();
        self.visit(&mut |n, t| out.push((n, t)));
        out
    }
}

impl Qwen3Params<Tensor> {
    /// Parameters keyed by HF name (cheap: tensors are reference counted).
    pub fn to_named(&self) -> NamedTensors {
        self.named()
            .into_iter()
            .map(|(n, t)| (n, t.clone()))
            .collect()
    }

    /// Loads from host tensors keyed by HF name (what [`crate::hf::load_checkpoint`] returns). Every name the
    /// config implies must be present with its shape; a name the config does not imply is an error, except
    /// `lm_head.weight` with tied embeddings when it equals the embedding (some exporters write both).
    pub fn from_host(cfg: &ModelConfig, mut tensors: TensorMap, device: &Device) -> Result<Self> {
        let params = Qwen3Params::build(cfg, &mut |name, shape| {
            let host = tensors
                .remove(&name)
                .ok_or_else(|| ModelError::MissingParam { name: name.clone() })?;
            if host.shape != shape {
                return Err(ModelError::ParamShape {
                    name,
                    expected: shape,
                    got: host.shape,
                });
            }
            Ok(Tensor::from_f32(host.data, &host.shape, device)?)
        })?;
        if cfg.tie_word_embeddings
            && let Some(head) = tensors.remove("lm_head.weight")
            && head.data != params.embed_tokens.to_vec_f32()?
        {
            return Err(ModelError::TiedHeadMismatch);
        }
        if !tensors.is_empty() {
            return Err(ModelError::UnexpectedParams {
                names: tensors.into_keys().collect(),
            });
        }
        Ok(params)
    }

    /// Copies every parameter to host memory, keyed by HF name (what [`crate::hf::save_checkpoint`] takes).
    pub fn to_host(&self) -> Result<TensorMap> {
        let mut out = BTreeMap::new();
        for (name, t) in self.named() {
            out.insert(
                name,
                HostTensor {
                    shape: t.shape().to_vec(),
                    data: t.to_vec_f32()?,
                },
            );
        }
        Ok(out)
    }

    /// Random parameters for tests: matrices uniform with standard deviation `std`, norm weights
    /// `1 + 0.1·u`, `u` uniform in `[-1, 1)`. Deterministic in `seed`.
    pub fn random(cfg: &ModelConfig, seed: u64, std: f32, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let a = std * 3f32.sqrt(); // uniform[-a, a) has standard deviation std
        Qwen3Params::build(cfg, &mut |_, shape| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if shape.len() == 1 {
                (0..n)
                    .map(|_| 1.0 + 0.1 * (rng.random::<f32>() * 2.0 - 1.0))
                    .collect()
            } else {
                (0..n)
                    .map(|_| a * (rng.random::<f32>() * 2.0 - 1.0))
                    .collect()
            };
            Ok(Tensor::from_f32(data, &shape, device)?)
        })
    }
}

/// `(HF name, shape)` of every parameter the config implies, in HF order.
pub fn param_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let spec = Qwen3Params::<Vec<usize>>::build(cfg, &mut |_, shape| Ok(shape))
        .expect("shape builder cannot fail");
    spec.named()
        .into_iter()
        .map(|(n, s)| (n, s.clone()))
        .collect()
}
