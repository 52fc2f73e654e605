//! Qwen3 / Qwen3-MoE model configuration, read from a Hugging Face `config.json`.
//!
//! # What is accepted
//!
//! Parsing follows ripgrep's rule: parse and validate first, derive second. [`ModelConfig::from_file`] and
//! [`ModelConfig::from_json_str`] read the HF keys (names exactly as HF spells them) and reject, with a
//! [`ConfigError`] naming the file and the key:
//!
//! - a missing required key: `model_type`, `vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`,
//!   `num_attention_heads`, `num_key_value_heads`, `rms_norm_eps`, `rope_theta`; for `qwen3_moe` also
//!   `num_experts`, `num_experts_per_tok`, `moe_intermediate_size`;
//! - a value of the wrong JSON type, a zero size, `num_attention_heads % num_key_value_heads != 0`,
//!   `num_experts_per_tok > num_experts`, `decoder_sparse_step == 0`, a `mlp_only_layers` entry `>= layers`;
//! - features the engine does not implement: any `rope_scaling` / `rope_parameters.rope_type` other than
//!   `"default"`, `hidden_act != "silu"`, `attention_bias: true`, `use_sliding_window: true`, a `layer_types` entry
//!   other than `"full_attention"`, a `model_type` other than `qwen3` / `qwen3_moe`.
//!
//! Unknown keys (HF configs carry many: `bos_token_id`, `initializer_range`, `transformers_version`, …) are kept
//! verbatim in [`ModelConfig::extra`] and written back by [`ModelConfig::to_hf_json`].
//!
//! # transformers v4 and v5 spellings
//!
//! Both are accepted: `rope_theta` at top level (v4) or inside `rope_parameters` (v5; if both are present they must
//! agree); `torch_dtype` (v4) or `dtype` (v5); `num_experts` (v4) or `num_local_experts` (v5, Qwen3-MoE).
//!
//! # Defaults (as HF's `Qwen3Config` / `Qwen3MoeConfig`)
//!
//! `head_dim = hidden_size / num_attention_heads`, `tie_word_embeddings = false`,
//! `max_position_embeddings = 32768`, `norm_topk_prob = false`, `router_aux_loss_coef = 0.001`,
//! `decoder_sparse_step = 1`, `mlp_only_layers = []`.
//!
//! # Invariants of a constructed [`ModelConfig`]
//!
//! Every size is `> 0`; `num_attention_heads % num_key_value_heads == 0`; for MoE `1 <= top_k <= num_experts`,
//! `decoder_sparse_step >= 1` and every `mlp_only_layers` entry is a valid layer index. Code that builds a
//! `ModelConfig` by hand should call [`ModelConfig::validate`].

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

/// Error reading or validating a model config. `origin` is the file path (or `<string>` for in-memory JSON).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: cannot read model config: {source}")]
    Io {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: model config is not valid JSON: {source}")]
    Json {
        origin: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{origin}: model config is not a JSON object")]
    NotAnObject { origin: String },
    #[error("{origin}: missing required key `{key}`")]
    MissingKey { origin: String, key: &'static str },
    #[error("{origin}: key `{key}`: {reason}")]
    Invalid {
        origin: String,
        key: &'static str,
        reason: String,
    },
    #[error("{origin}: key `{key}`: unsupported: {reason}")]
    Unsupported {
        origin: String,
        key: &'static str,
        reason: String,
    },
}

/// The model family, from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    /// `"qwen3"`: dense SwiGLU MLP on every layer.
    Qwen3,
    /// `"qwen3_moe"`: sparse MoE blocks on the layers selected by [`ModelConfig::layer_is_moe`].
    Qwen3Moe,
}

impl ModelType {
    /// The HF `model_type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Qwen3 => "qwen3",
            ModelType::Qwen3Moe => "qwen3_moe",
        }
    }
}

/// Mixture-of-experts part of a Qwen3-MoE config (HF key names).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Number of routed experts per MoE layer (`num_experts`, v5: `num_local_experts`).
    pub num_experts: usize,
    /// Top-k: experts each token is routed to.
    pub num_experts_per_tok: usize,
    /// Inner size of each expert's SwiGLU MLP.
    pub moe_intermediate_size: usize,
    /// Renormalise the top-k routing probabilities to sum to 1.
    pub norm_topk_prob: bool,
    /// Coefficient of the load-balancing aux loss in the training loss.
    pub router_aux_loss_coef: f64,
    /// Layer `i` is MoE when `(i + 1) % decoder_sparse_step == 0` (and not in `mlp_only_layers`).
    pub decoder_sparse_step: usize,
    /// Layers forced to a dense MLP of `intermediate_size`.
    pub mlp_only_layers: Vec<usize>,
}

/// A validated Qwen3 / Qwen3-MoE config. Field names are HF's.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: ModelType,
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Dense MLP inner size (for MoE models: the size of the `mlp_only_layers` dense MLPs).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// `torch_dtype` (v4) / `dtype` (v5) as written, e.g. `"bfloat16"`; `None` when absent.
    pub torch_dtype: Option<String>,
    /// `Some` exactly when `model_type == Qwen3Moe`.
    pub moe: Option<MoeConfig>,
    /// Every key this struct does not model, verbatim (written back by [`ModelConfig::to_hf_json`]).
    pub extra: BTreeMap<String, Value>,
}

/// Keys consumed by the parser (everything else goes to `extra`).
const KNOWN_KEYS: &[&str] = &[
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "tie_word_embeddings",
    "max_position_embeddings",
    "torch_dtype",
    "dtype",
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "router_aux_loss_coef",
    "decoder_sparse_step",
    "mlp_only_layers",
];

struct Reader<'a> {
    origin: &'a str,
    map: &'a Map<String, Value>,
}

impl<'a> Reader<'a> {
    fn invalid(&self, key: &'static str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            key,
            reason: reason.into(),
        }
    }

    fn unsupported(&self, key: &'static str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Unsupported {
            origin: self.origin.to_string(),
            key,
            reason: reason.into(),
        }
    }

    fn missing(&self, key: &'static str) -> ConfigError {
        ConfigError::MissingKey {
            origin: self.origin.to_string(),
            key,
        }
    }

    /// The value of `key`, treating JSON `null` as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, key: &'static str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.invalid(key, format!("expected a non-negative integer, got {v}"))
            }),
        }
    }

    fn positive(&self, key: &'static str) -> Result<usize, ConfigError> {
        let n = self.opt_usize(key)?.ok_or_else(|| self.missing(key))?;
        if n == 0 {
            return Err(self.invalid(key, "must be > 0, got 0"));
        }
        Ok(n)
    }

    fn opt_f64(&self, key: &'static str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.invalid(key, format!("expected a number, got {v}"))),
        }
    }

    fn opt_bool(&self, key: &'static str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.invalid(key, format!("expected true or false, got {v}"))),
        }
    }

    fn opt_str(&self, key: &'static str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.invalid(key, format!("expected a string, got {v}"))),
        }
    }
}

/// Checks a `rope_scaling` / `rope_parameters` object's type; returns its `rope_theta` if it has one.
fn check_rope_object(
    r: &Reader<'_>,
    key: &'static str,
    v: &Value,
) -> Result<Option<f64>, ConfigError> {
    let obj = v
        .as_object()
        .ok_or_else(|| r.invalid(key, format!("expected an object or null, got {v}")))?;
    let ty = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    if ty != "default" {
        return Err(r.unsupported(
            key,
            format!("rope type {ty:?} (only plain RoPE, \"default\", is implemented)"),
        ));
    }
    match obj.get("rope_theta") {
        None | Some(Value::Null) => Ok(None),
        Some(t) => t
            .as_f64()
            .map(Some)
            .ok_or_else(|| r.invalid(key, format!("rope_theta: expected a number, got {t}"))),
    }
}

impl ModelConfig {
    /// Reads and validates `path` (an HF `config.json`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            origin: origin.clone(),
            source,
        })?;
        Self::parse(&text, &origin)
    }

    /// Parses and validates JSON text; errors name the origin `<string>`.
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, "<string>")
    }

    /// Parses and validates JSON text; errors name `origin` (a file path, a job name…).
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            origin: origin.to_string(),
            source,
        })?;
        Self::from_json_value(&value, origin)
    }

    /// Validates an already-parsed JSON value.
    pub fn from_json_value(value: &Value, origin: &str) -> Result<Self, ConfigError> {
        let map = value.as_object().ok_or_else(|| ConfigError::NotAnObject {
            origin: origin.to_string(),
        })?;
        let r = Reader { origin, map };

        let model_type = match r.opt_str("model_type")? {
            None => return Err(r.missing("model_type")),
            Some("qwen3") => ModelType::Qwen3,
            Some("qwen3_moe") => ModelType::Qwen3Moe,
            Some(other) => {
                return Err(r.unsupported(
                    "model_type",
                    format!("{other:?} (expected \"qwen3\" or \"qwen3_moe\")"),
                ));
            }
        };
        let architectures = match r.get("architectures") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|s| s.as_str().map(str::to_string)).collect())
                .ok_or_else(|| {
                    r.invalid(
                        "architectures",
                        format!("expected a list of strings, got {v}"),
                    )
                })?,
        };

        let vocab_size = r.positive("vocab_size")?;
        let hidden_size = r.positive("hidden_size")?;
        let intermediate_size = r.positive("intermediate_size")?;
        let num_hidden_layers = r.positive("num_hidden_layers")?;
        let num_attention_heads = r.positive("num_attention_heads")?;
        let num_key_value_heads = r.positive("num_key_value_heads")?;
        let head_dim = match r.opt_usize("head_dim")? {
            Some(0) => return Err(r.invalid("head_dim", "must be > 0, got 0")),
            Some(d) => d,
            None => {
                if !hidden_size.is_multiple_of(num_attention_heads) {
                    return Err(r.invalid(
                        "head_dim",
                        format!(
                            "absent, and hidden_size {hidden_size} is not divisible by num_attention_heads \
                             {num_attention_heads} to derive it"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        let rms_norm_eps = r
            .opt_f64("rms_norm_eps")?
            .ok_or_else(|| r.missing("rms_norm_eps"))?;

        // RoPE: v4 `rope_theta` (+ optional `rope_scaling`), v5 `rope_parameters`.
        if let Some(v) = r.get("rope_scaling") {
            check_rope_object(&r, "rope_scaling", v)?;
        }
        let theta_v5 = match r.get("rope_parameters") {
            Some(v) => check_rope_object(&r, "rope_parameters", v)?,
            None => None,
        };
        let theta_v4 = r.opt_f64("rope_theta")?;
        let rope_theta = match (theta_v4, theta_v5) {
            (Some(a), Some(b)) if a != b => {
                return Err(r.invalid(
                    "rope_theta",
                    format!("{a} disagrees with rope_parameters.rope_theta {b}"),
                ));
            }
            (Some(a), _) => a,
            (None, Some(b)) => b,
            (None, None) => return Err(r.missing("rope_theta")),
        };

        let tie_word_embeddings = r.opt_bool("tie_word_embeddings")?.unwrap_or(false);
        let max_position_embeddings = r.opt_usize("max_position_embeddings")?.unwrap_or(32768);
        let torch_dtype = match r.opt_str("torch_dtype")? {
            Some(s) => Some(s.to_string()),
            None => r.opt_str("dtype")?.map(str::to_string),
        };

        // Features we do not implement: fail loudly rather than compute a different model.
        if let Some(act) = r.opt_str("hidden_act")?
            && act != "silu"
        {
            return Err(r.unsupported("hidden_act", format!("{act:?} (only \"silu\")")));
        }
        if r.opt_bool("attention_bias")? == Some(true) {
            return Err(r.unsupported(
                "attention_bias",
                "true (q/k/v/o projections have no bias in Qwen3)",
            ));
        }
        if r.opt_bool("use_sliding_window")? == Some(true) {
            return Err(r.unsupported("use_sliding_window", "true (only full causal attention)"));
        }
        if let Some(v) = r.get("layer_types") {
            let arr = v
                .as_array()
                .ok_or_else(|| r.invalid("layer_types", format!("expected a list, got {v}")))?;
            if let Some(bad) = arr.iter().find(|t| t.as_str() != Some("full_attention")) {
                return Err(
                    r.unsupported("layer_types", format!("{bad} (only \"full_attention\")"))
                );
            }
        }

        let moe = match model_type {
            ModelType::Qwen3 => None,
            ModelType::Qwen3Moe => {
                let num_experts = match r.opt_usize("num_experts")? {
                    Some(n) => n,
                    None => r
                        .opt_usize("num_local_experts")?
                        .ok_or_else(|| r.missing("num_experts"))?,
                };
                let mlp_only_layers = match r.get("mlp_only_layers") {
                    None => Vec::new(),
                    Some(v) => v
                        .as_array()
                        .and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect())
                        .ok_or_else(|| {
                            r.invalid(
                                "mlp_only_layers",
                                format!("expected a list of layer indices, got {v}"),
                            )
                        })?,
                };
                Some(MoeConfig {
                    num_experts,
                    num_experts_per_tok: r.positive("num_experts_per_tok")?,
                    moe_intermediate_size: r.positive("moe_intermediate_size")?,
                    norm_topk_prob: r.opt_bool("norm_topk_prob")?.unwrap_or(false),
                    router_aux_loss_coef: r.opt_f64("router_aux_loss_coef")?.unwrap_or(0.001),
                    decoder_sparse_step: r.opt_usize("decoder_sparse_step")?.unwrap_or(1),
                    mlp_only_layers,
                })
            }
        };

        let extra = map
            .iter()
            .filter(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();

        let cfg = ModelConfig {
            model_type,
            architectures,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            tie_word_embeddings,
            max_position_embeddings,
            torch_dtype,
            moe,
            extra,
        };
        cfg.validate_with_origin(origin)?;
        Ok(cfg)
    }

    /// Checks the invariants listed in the module docs (for configs built by hand).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_with_origin("<ModelConfig>")
    }

    fn validate_with_origin(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            origin: origin.to_string(),
            key,
            reason,
        };
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be > 0, got 0".into()));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "num_attention_heads {} is not divisible by num_key_value_heads {}",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(invalid(
                "rms_norm_eps",
                format!("must be a positive number, got {}", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return Err(invalid(
                "rope_theta",
                format!("must be a positive number, got {}", self.rope_theta),
            ));
        }
        match (self.model_type, &self.moe) {
            (ModelType::Qwen3, Some(_)) => {
                return Err(invalid(
                    "model_type",
                    "\"qwen3\" (dense) with MoE settings".into(),
                ));
            }
            (ModelType::Qwen3Moe, None) => {
                return Err(invalid(
                    "model_type",
                    "\"qwen3_moe\" without MoE settings".into(),
                ));
            }
            _ => {}
        }
        if let Some(m) = &self.moe {
            if m.num_experts == 0 {
                return Err(invalid("num_experts", "must be > 0, got 0".into()));
            }
            if m.num_experts_per_tok == 0 || m.num_experts_per_tok > m.num_experts {
                return Err(invalid(
                    "num_experts_per_tok",
                    format!(
                        "must be in 1..={} (num_experts), got {}",
                        m.num_experts, m.num_experts_per_tok
                    ),
                ));
            }
            if m.moe_intermediate_size == 0 {
                return Err(invalid(
                    "moe_intermediate_size",
                    "must be > 0, got 0".into(),
                ));
            }
            if m.decoder_sparse_step == 0 {
                return Err(invalid("decoder_sparse_step", "must be >= 1, got 0".into()));
            }
            if let Some(&l) = m
                .mlp_only_layers
                .iter()
                .find(|&&l| l >= self.num_hidden_layers)
            {
                return Err(invalid(
                    "mlp_only_layers",
                    format!(
                        "layer {l} is out of range (num_hidden_layers {})",
                        self.num_hidden_layers
                    ),
                ));
            }
            if !(m.router_aux_loss_coef >= 0.0 && m.router_aux_loss_coef.is_finite()) {
                return Err(invalid(
                    "router_aux_loss_coef",
                    format!(
                        "must be a non-negative number, got {}",
                        m.router_aux_loss_coef
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether this is a Qwen3-MoE config.
    pub fn is_moe(&self) -> bool {
        self.moe.is_some()
    }

    /// Whether decoder layer `layer` (0-based) has a sparse MoE block, by HF's rule:
    /// `layer ∉ mlp_only_layers && num_experts > 0 && (layer + 1) % decoder_sparse_step == 0`.
    /// Always false for dense models.
    pub fn layer_is_moe(&self, layer: usize) -> bool {
        match &self.moe {
            None => false,
            Some(m) => {
                !m.mlp_only_layers.contains(&layer)
                    && m.num_experts > 0
                    && (layer + 1).is_multiple_of(m.decoder_sparse_step)
            }
        }
    }

    /// Number of MoE layers.
    pub fn num_moe_layers(&self) -> usize {
        (0..self.num_hidden_layers)
            .filter(|&l| self.layer_is_moe(l))
            .count()
    }

    /// `num_attention_heads · head_dim`: width of the q projection output (not necessarily `hidden_size`).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// `num_key_value_heads · head_dim`: width of each of the k and v projection outputs.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Query heads per kv head (GQA group size).
    pub fn gqa_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    fn attn_params_per_layer(&self) -> u64 {
        let (h, dq, dkv, d) = (
            self.hidden_size as u64,
            self.q_dim() as u64,
            self.kv_dim() as u64,
            self.head_dim as u64,
        );
        // q, k, v, o projections + q_norm, k_norm (per-head, size head_dim) + input/post-attention RMSNorms.
        h * dq + 2 * h * dkv + dq * h + 2 * d + 2 * h
    }

    /// MLP parameters of `layer`: `(total, active per token)`.
    fn mlp_params(&self, layer: usize) -> (u64, u64) {
        let h = self.hidden_size as u64;
        match &self.moe {
            Some(m) if self.layer_is_moe(layer) => {
                let e = m.num_experts as u64;
                let k = m.num_experts_per_tok as u64;
                let expert = 3 * h * m.moe_intermediate_size as u64;
                (h * e + e * expert, h * e + k * expert)
            }
            _ => {
                let p = 3 * h * self.intermediate_size as u64;
                (p, p)
            }
        }
    }

    fn count(&self, active: bool) -> u64 {
        let (h, v) = (self.hidden_size as u64, self.vocab_size as u64);
        let embed = v * h;
        let lm_head = if self.tie_word_embeddings { 0 } else { v * h };
        let layers: u64 = (0..self.num_hidden_layers)
            .map(|l| {
                let (tot, act) = self.mlp_params(l);
                self.attn_params_per_layer() + if active { act } else { tot }
            })
            .sum();
        embed + layers + h + lm_head
    }

    /// Total number of parameters (embeddings included; a tied lm_head counted once). Matches the sum of the
    /// element counts of the HF checkpoint's tensors.
    pub fn param_count(&self) -> u64 {
        self.count(false)
    }

    /// Parameters touched per token: as [`param_count`](Self::param_count) but counting only `top_k` experts per
    /// MoE layer (router included). Equals `param_count` for dense models.
    pub fn active_param_count(&self) -> u64 {
        self.count(true)
    }

    /// Training FLOPs per token (forward + backward) at sequence length `seq_len`, Megatron's causal counting
    /// (DESIGN §7): `6·[Σ_layers (h·(dq+2·dkv) + dq·h + mlp_l) + h·V] + 6·L·s·dq`, with `mlp_l = 3·h·f` on dense
    /// layers and `top_k·3·h·f_moe` on MoE layers. Norms and the router are not counted.
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        let h = self.hidden_size as f64;
        let dq = self.q_dim() as f64;
        let dkv = self.kv_dim() as f64;
        let l = self.num_hidden_layers as f64;
        let s = seq_len as f64;
        let mut matmul = 0.0;
        for layer in 0..self.num_hidden_layers {
            let mlp = match &self.moe {
                Some(m) if self.layer_is_moe(layer) => {
                    m.num_experts_per_tok as f64 * 3.0 * h * m.moe_intermediate_size as f64
                }
                _ => 3.0 * h * self.intermediate_size as f64,
            };
            matmul += h * (dq + 2.0 * dkv) + dq * h + mlp;
        }
        matmul += h * self.vocab_size as f64;
        6.0 * matmul + 6.0 * l * s * dq
    }

    /// The config as an HF `config.json` object (v4 spelling: `rope_theta`, `torch_dtype`, `num_experts`), with
    /// the unknown keys from [`extra`](Self::extra) kept. Parsing the result gives back an equal `ModelConfig`.
    pub fn to_hf_json(&self) -> Value {
        let mut m: Map<String, Value> = self
            .extra
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("model_type", self.model_type.as_str().into());
        put("architectures", self.architectures.clone().into());
        put("vocab_size", self.vocab_size.into());
        put("hidden_size", self.hidden_size.into());
        put("intermediate_size", self.intermediate_size.into());
        put("num_hidden_layers", self.num_hidden_layers.into());
        put("num_attention_heads", self.num_attention_heads.into());
        put("num_key_value_heads", self.num_key_value_heads.into());
        put("head_dim", self.head_dim.into());
        put("rms_norm_eps", self.rms_norm_eps.into());
        put("rope_theta", self.rope_theta.into());
        put("tie_word_embeddings", self.tie_word_embeddings.into());
        put(
            "max_position_embeddings",
            self.max_position_embeddings.into(),
        );
        if let Some(d) = &self.torch_dtype {
            put("torch_dtype", d.clone().into());
        }
        if let Some(moe) = &self.moe {
            put("num_experts", moe.num_experts.into());
            put("num_experts_per_tok", moe.num_experts_per_tok.into());
            put("moe_intermediate_size", moe.moe_intermediate_size.into());
            put("norm_topk_prob", moe.norm_topk_prob.into());
            put("router_aux_loss_coef", moe.router_aux_loss_coef.into());
            put("decoder_sparse_step", moe.decoder_sparse_step.into());
            put("mlp_only_layers", moe.mlp_only_layers.clone().into());
        }
        Value::Object(m)
    }
}

impl<'de> serde::Deserialize<'de> for ModelConfig {
    /// Deserialises from an HF config object (e.g. embedded in a job file), with the same validation as
    /// [`ModelConfig::from_json_str`].
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        ModelConfig::from_json_value(&v, "<model config>").map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for ModelConfig {
    /// Serialises as [`ModelConfig::to_hf_json`].
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_hf_json().serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"{
        "model_type": "qwen3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true, "bos_token_id": 1
    }"#;

    fn with(key: &str, value: Value) -> String {
        let mut v: Value = serde_json::from_str(TINY).unwrap();
        v.as_object_mut().unwrap().insert(key.into(), value);
        v.to_string()
    }

    fn without(key: &str) -> String {
        let mut v: Value = serde_json::from_str(TINY).unwrap();
        v.as_object_mut().unwrap().remove(key);
        v.to_string()
    }

    #[test]
    fn parses_and_keeps_extra() {
        let c = ModelConfig::from_json_str(TINY).unwrap();
        assert_eq!((c.q_dim(), c.kv_dim(), c.gqa_group()), (64, 32, 2));
        assert_eq!(c.extra.get("bos_token_id"), Some(&Value::from(1)));
        // embed 256·64 + 2·(64·64 + 2·64·32 + 64·64 + 2·16 + 2·64 + 3·64·128) + 64, tied.
        assert_eq!(
            c.param_count(),
            16384 + 2 * (4096 + 4096 + 4096 + 32 + 128 + 24576) + 64
        );
        let back = ModelConfig::from_json_value(&c.to_hf_json(), "x").unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn head_dim_defaults_to_hidden_over_heads() {
        let c = ModelConfig::from_json_str(&without("head_dim")).unwrap();
        assert_eq!(c.head_dim, 16);
    }

    #[test]
    fn missing_key_is_named() {
        let e = ModelConfig::from_json_str(&without("num_key_value_heads")).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::MissingKey {
                    key: "num_key_value_heads",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("<string>"));
        let e = ModelConfig::from_json_str(&without("rope_theta")).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::MissingKey {
                    key: "rope_theta",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn invalid_values_are_rejected() {
        let e = ModelConfig::from_json_str(&with("num_key_value_heads", 3.into())).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "num_key_value_heads",
                    ..
                }
            ),
            "{e}"
        );
        let e = ModelConfig::from_json_str(&with("hidden_size", 0.into())).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "hidden_size",
                    ..
                }
            ),
            "{e}"
        );
        let e = ModelConfig::from_json_str(&with("hidden_size", "64".into())).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "hidden_size",
                    ..
                }
            ),
            "{e}"
        );
        let e = ModelConfig::from_json_str(&with(
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
        ))
        .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Unsupported {
                    key: "rope_scaling",
                    ..
                }
            ),
            "{e}"
        );
        let e = ModelConfig::from_json_str(&with("model_type", "llama".into())).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Unsupported {
                    key: "model_type",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn v5_rope_parameters() {
        let mut v: Value = serde_json::from_str(&without("rope_theta")).unwrap();
        v["rope_parameters"] = serde_json::json!({"rope_theta": 5000.0, "rope_type": "default"});
        let c = ModelConfig::from_json_value(&v, "v5").unwrap();
        assert_eq!(c.rope_theta, 5000.0);
        v["rope_theta"] = 10.0.into();
        assert!(ModelConfig::from_json_value(&v, "v5").is_err());
    }

    fn moe(extra: Value) -> Result<ModelConfig, ConfigError> {
        let mut v: Value = serde_json::from_str(TINY).unwrap();
        v["model_type"] = "qwen3_moe".into();
        v["num_experts"] = 8.into();
        v["num_experts_per_tok"] = 2.into();
        v["moe_intermediate_size"] = 32.into();
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        ModelConfig::from_json_value(&v, "moe.json")
    }

    #[test]
    fn moe_layer_rule_and_counts() {
        let c = moe(serde_json::json!({"num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}))
            .unwrap();
        let pattern: Vec<bool> = (0..6).map(|l| c.layer_is_moe(l)).collect();
        assert_eq!(pattern, [false, true, false, false, false, true]);
        let c = moe(serde_json::json!({})).unwrap();
        assert!((0..2).all(|l| c.layer_is_moe(l)));
        let attn = 4096 + 4096 + 4096 + 32 + 128;
        let router = 64 * 8;
        let expert = 3 * 64 * 32;
        assert_eq!(
            c.param_count(),
            16384 + 2 * (attn + router + 8 * expert) + 64
        );
        assert_eq!(
            c.active_param_count(),
            16384 + 2 * (attn + router + 2 * expert) + 64
        );
        let e = moe(serde_json::json!({"num_experts_per_tok": 9})).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "num_experts_per_tok",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().starts_with("moe.json"));
        let e = moe(serde_json::json!({"decoder_sparse_step": 0})).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "decoder_sparse_step",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn flops_formula() {
        let c = ModelConfig::from_json_str(TINY).unwrap();
        let (h, dq, dkv, f, v, l, s) = (64.0, 64.0, 32.0, 128.0, 256.0, 2.0, 16.0);
        let want =
            6.0 * (l * (h * (dq + 2.0 * dkv) + dq * h + 3.0 * h * f) + h * v) + 6.0 * l * s * dq;
        assert_eq!(c.flops_per_token(16), want);
        let m = moe(serde_json::json!({})).unwrap();
        let want = 6.0 * (l * (h * (dq + 2.0 * dkv) + dq * h + 2.0 * 3.0 * h * 32.0) + h * v)
            + 6.0 * l * s * dq;
        assert_eq!(m.flops_per_token(16), want);
    }
}
