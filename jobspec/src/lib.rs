//! The YAML job spec that `qctl submit job.yaml` sends and every daemon reads.
//!
//! Parsing follows ripgrep's flags discipline: parse and validate first (unknown keys rejected, every
//! error names the source file, the key and the line where the YAML parser gives one), resolve derived
//! values second ([`JobSpec::world_size`], [`JobSpec::ranks_per_node`], [`JobSpec::data_parallel`]).
//!
//! Keys follow ms-swift / Megatron-SWIFT names where those exist; the Megatron long names of the
//! parallel block (`tensor_model_parallel_size` …) are accepted as aliases.
//!
//! Training kinds (`pretrain` and `sft` run today) read flat training keys at the top level: `model` (an HF directory)
//! or `init: random` + `model_config`, `dataset` (one path or a list), `output_dir`, `max_length`
//! (`seq_length`), `micro_batch_size` (`per_device_train_batch_size`), `global_batch_size`, `learning_rate`
//! (`lr`), `min_lr`, `lr_warmup_iters` (`warmup_steps`) or `warmup_ratio` (`lr_warmup_fraction`),
//! `lr_decay_style` (`constant` | `linear` | `cosine`), `lr_decay_iters`, `weight_decay`, `adam_beta1`,
//! `adam_beta2`, `adam_eps` (`adam_epsilon`), `clip_grad` (`max_grad_norm`), `train_iters` (`max_steps`),
//! `save_steps`, `logging_steps`, `seed`, `gradient_checkpointing`, `use_distributed_optimizer` (shard the GPU
//! optimizer's state over dp, ZeRO-1; CPU ranks always shard), `resume` (`auto` | `none` | a path).
//! [`JobSpec::training`] returns them resolved, with defaults and the derived gradient-accumulation count
//! `global_batch_size / (micro_batch_size × dp)`. Other kinds refuse training keys. The fine-tuning keys
//! (`train_type`, `lora_*`, `target_modules`, and for `kind: sft` `loss_scale`, `packing`, `strict`,
//! `truncation_strategy`, `dataset_shuffle`, `model_name`, `model_author`) are described in [`sft`].
//!
//! Invariants of a [`JobSpec`] returned by [`JobSpec::parse`]:
//! - `resources.nodes ≥ 1`, and the world size is a positive multiple of `nodes`;
//! - with GPUs, one rank per GPU: world size = `nodes × gpus_per_node`;
//! - `tp × pp × cp` divides the world size, and `tp` divides the ranks of one node, so a tensor-parallel
//!   group never spans nodes (ranks are laid out node-major, tp innermost).

use serde::{Deserialize, Serialize};
use std::fmt;

pub mod serve;
pub mod sft;

pub use serve::ServeSpec;
pub use sft::{Bilingual, LoraSettings, SftSettings, TrainType, Truncation};

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// Collectives benchmark and verification across the job's ranks (like nccl-tests).
    CommCheck,
    Pretrain,
    Sft,
    Dpo,
    Grpo,
    Infer,
    Serve,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::CommCheck => "comm-check",
            JobKind::Pretrain => "pretrain",
            JobKind::Sft => "sft",
            JobKind::Dpo => "dpo",
            JobKind::Grpo => "grpo",
            JobKind::Infer => "infer",
            JobKind::Serve => "serve",
        }
    }

    /// Kinds this build can run on the cluster.
    pub fn is_runnable(self) -> bool {
        matches!(self, JobKind::CommCheck | JobKind::Pretrain | JobKind::Sft | JobKind::Serve)
    }

    /// Kinds that train a model and so read the training keys ([`JobSpec::training`]).
    pub fn is_training(self) -> bool {
        matches!(self, JobKind::Pretrain | JobKind::Sft | JobKind::Dpo | JobKind::Grpo)
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a job asks of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default = "one")]
    pub nodes: u32,
    /// 0 means CPU ranks (one CPU slot each).
    #[serde(default)]
    pub gpus_per_node: u32,
    /// Total ranks; defaults to `nodes × gpus_per_node`. Required for CPU jobs.
    #[serde(default)]
    pub ranks: Option<u32>,
}

impl Default for Resources {
    fn default() -> Self {
        Resources { nodes: 1, gpus_per_node: 0, ranks: None }
    }
}

/// The `parallel:` block. `dp` is derived, never given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelSpec {
    #[serde(default = "one", alias = "tensor_model_parallel_size")]
    pub tp: u32,
    #[serde(default = "one", alias = "pipeline_model_parallel_size")]
    pub pp: u32,
    /// Virtual pipeline stages per pipeline rank.
    #[serde(default = "one")]
    pub vpp: u32,
    /// Megatron's way of giving the virtual pipeline size; resolved into `vpp` by the engine.
    #[serde(default)]
    pub num_layers_per_virtual_pipeline_stage: Option<u32>,
    #[serde(default = "one", alias = "expert_model_parallel_size")]
    pub ep: u32,
    #[serde(default = "one", alias = "expert_tensor_parallel_size")]
    pub etp: u32,
    #[serde(default = "one", alias = "context_parallel_size")]
    pub cp: u32,
    #[serde(default, alias = "sequence_parallel")]
    pub sp: bool,
}

impl Default for ParallelSpec {
    fn default() -> Self {
        ParallelSpec {
            tp: 1,
            pp: 1,
            vpp: 1,
            num_layers_per_virtual_pipeline_stage: None,
            ep: 1,
            etp: 1,
            cp: 1,
            sp: false,
        }
    }
}

/// The `comm_check:` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommCheckSpec {
    /// Message size per collective in bytes.
    #[serde(default = "default_comm_bytes")]
    pub bytes: u64,
    #[serde(default = "default_comm_iters")]
    pub iters: u32,
    /// Seconds every rank stays up after the collectives before exiting (lets an operator watch a
    /// placed gang; the fault-injection tests kill nodes during it).
    #[serde(default)]
    pub hold_s: f64,
}

impl Default for CommCheckSpec {
    fn default() -> Self {
        CommCheckSpec { bytes: default_comm_bytes(), iters: default_comm_iters(), hold_s: 0.0 }
    }
}

/// A job as written in YAML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    pub kind: JobKind,
    /// Higher runs first; equal priorities run in submit order.
    #[serde(default)]
    pub priority: i32,
    /// How many times a failed attempt is retried (from the last committed checkpoint).
    #[serde(default)]
    pub max_restarts: u32,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub parallel: ParallelSpec,
    #[serde(default)]
    pub comm_check: CommCheckSpec,
    /// The inference worker of `kind: serve`, or of a training job with `serve_after_training` (see [`serve`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve: Option<ServeSpec>,
    /// Training jobs: once training has finished, rank 0 serves the final checkpoint until the job is cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve_after_training: Option<bool>,
    /// Environment variables for the rank processes (names must be valid identifiers).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,

    // ---- Training keys (flat, ms-swift / Megatron-SWIFT names). Only training kinds may set them; see
    // ---- [`JobSpec::training`] for the defaults and the resolved values.
    /// HF model directory (`config.json` + safetensors + tokenizer files) to start from.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "model_id_or_path", alias = "load")]
    pub model: Option<String>,
    /// `pretrained` (load `model`, the default) or `random` (initialise from `model_config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<ModelInit>,
    /// HF `config.json` for `init: random` (defaults to `<model>/config.json` when `model` is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_config: Option<String>,
    /// JSONL file(s): `{"text": …}` or `{"input_ids": […]}` per line (pretrain).
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "one_or_many")]
    pub dataset: Vec<String>,
    /// Where checkpoints and `metrics.jsonl` go (default `output/<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "save")]
    pub output_dir: Option<String>,
    /// Tokens per training sequence.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "seq_length")]
    pub max_length: Option<u32>,
    /// Sequences per micro-batch per data-parallel rank.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "per_device_train_batch_size")]
    pub micro_batch_size: Option<u32>,
    /// Sequences per optimizer step over all data-parallel ranks; a multiple of `micro_batch_size × dp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_batch_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "lr")]
    pub learning_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "warmup_steps")]
    pub lr_warmup_iters: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "lr_warmup_fraction")]
    pub warmup_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "lr_scheduler_type")]
    pub lr_decay_style: Option<LrDecayStyle>,
    /// Iterations over which the learning rate decays (default `train_iters`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_decay_iters: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adam_beta1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adam_beta2: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "adam_epsilon")]
    pub adam_eps: Option<f64>,
    /// Global gradient-norm clipping threshold; 0 turns clipping off.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "max_grad_norm")]
    pub clip_grad: Option<f64>,
    /// Optimizer steps to train for.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "max_steps")]
    pub train_iters: Option<u64>,
    /// Save a checkpoint every this many steps (and always after the last one).
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "save_interval")]
    pub save_steps: Option<u64>,
    /// Write a metrics line every this many steps.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "log_interval")]
    pub logging_steps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Recompute each layer's activations in backward instead of keeping them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing: Option<bool>,
    /// Shard the GPU optimizer's f32 masters and moments over data parallelism (ZeRO-1, Megatron's
    /// `--use-distributed-optimizer`) instead of replicating them on every dp rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_distributed_optimizer: Option<bool>,
    /// Compute precision: `auto` (bf16 on GPUs, f32 on CPUs), `bfloat16` or `float32`.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "dtype")]
    pub torch_dtype: Option<TorchDtype>,
    /// `auto` (newest complete checkpoint in `output_dir`, else start fresh), `none`, or a checkpoint path.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "resume_from_checkpoint")]
    pub resume: Option<Resume>,

    // ---- Fine-tuning keys (see [`sft`]): SFT data (kind: sft) and adapters (every training kind).
    /// `full` (default) or `lora`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_type: Option<TrainType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_rank: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f64>,
    /// `all-linear` (default) or module names (`q_proj`, `v_proj`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "one_or_many")]
    pub target_modules: Vec<String>,
    /// Which tokens of an SFT sample carry loss: `default` | `last_round` | `all`, optionally
    /// `+ignore_empty_think`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<String>,
    /// Pack short SFT samples into `max_length` rows (attention stays within each sample).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packing: Option<bool>,
    /// A bad dataset row is an error (true) or is skipped, counted and reported (false, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
    /// `delete` (default) | `left` | `right` for samples longer than `max_length`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncation_strategy: Option<Truncation>,
    /// Seeded shuffle of the mixed SFT datasets (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_shuffle: Option<bool>,
    /// The name `self-cognition` fills in: one value, or `[中文名, English name]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "one_or_many")]
    pub model_name: Vec<String>,
    /// The author `self-cognition` fills in: one value, or `[中文, English]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "one_or_many")]
    pub model_author: Vec<String>,
}

/// How a training job gets its initial weights (`init:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelInit {
    /// Load the weights of `model` (an HF directory).
    Pretrained,
    /// Random weights for the architecture in `model_config`, from `seed`.
    Random,
}

/// Learning-rate decay after warmup (`lr_decay_style:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrDecayStyle {
    Constant,
    Linear,
    Cosine,
}

/// `torch_dtype:` — the compute precision of training (weights and activations on the device; master weights,
/// gradients and optimizer states are always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TorchDtype {
    /// bf16 on GPUs, f32 on CPUs (the CPU engine computes in f32 only).
    #[default]
    Auto,
    #[serde(alias = "bf16")]
    Bfloat16,
    #[serde(alias = "fp32", alias = "f32")]
    Float32,
}

/// `resume:` — where a training run starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest complete checkpoint in `output_dir`, or from scratch when there is none.
    Auto,
    /// Always from scratch (refused when `output_dir` already holds checkpoints).
    None,
    /// This checkpoint directory.
    Path(String),
}

impl Serialize for Resume {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Resume::Auto => s.serialize_str("auto"),
            Resume::None => s.serialize_str("none"),
            Resume::Path(p) => s.serialize_str(p),
        }
    }
}

impl<'de> Deserialize<'de> for Resume {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Text(String),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::Flag(true) => Resume::Auto,
            Raw::Flag(false) => Resume::None,
            Raw::Text(t) => match t.as_str() {
                "auto" | "true" => Resume::Auto,
                "none" | "false" | "" => Resume::None,
                _ => Resume::Path(t),
            },
        })
    }
}

/// `dataset: a.jsonl` or `dataset: [a.jsonl, b.jsonl]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::One(s) => vec![s],
        Raw::Many(v) => v,
    })
}

/// Where the initial weights of a training run come from (resolved from `model`, `init`, `model_config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// An HF directory with `config.json`, safetensors and (for text data) `tokenizer.json`.
    Pretrained { dir: String },
    /// Random init of the architecture in `config` (an HF `config.json`). `dir` is `model` when given, used for
    /// the tokenizer files; otherwise the directory of `config`.
    Random { config: String, dir: Option<String> },
}

/// The training keys of a job with every default filled in and every derived value computed
/// ([`JobSpec::training`]). Invariants: `global_batch_size = micro_batch_size × dp × grad_accum`,
/// all counts ≥ 1, `min_lr ≤ learning_rate`, at most one of `lr_warmup_iters` / `warmup_ratio`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingSettings {
    pub model: ModelSource,
    pub dataset: Vec<String>,
    pub output_dir: String,
    pub max_length: u32,
    pub micro_batch_size: u32,
    pub global_batch_size: u32,
    /// Micro-batches per optimizer step on each data-parallel rank.
    pub grad_accum: u32,
    pub learning_rate: f64,
    pub min_lr: f64,
    pub lr_warmup_iters: Option<u64>,
    pub warmup_ratio: Option<f64>,
    pub lr_decay_style: LrDecayStyle,
    pub lr_decay_iters: u64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// 0 = no clipping.
    pub clip_grad: f64,
    pub train_iters: u64,
    pub save_steps: u64,
    pub logging_steps: u64,
    pub seed: u64,
    pub gradient_checkpointing: bool,
    /// ZeRO-1 for the GPU optimizer (default false: replicated over dp).
    pub use_distributed_optimizer: bool,
    pub torch_dtype: TorchDtype,
    pub resume: Resume,
    /// SFT data settings (`kind: sft`), `None` for pretraining.
    pub sft: Option<SftSettings>,
    /// Adapter settings (`train_type: lora`), `None` for full training.
    pub lora: Option<LoraSettings>,
}

/// Defaults of the training keys (ms-swift's Megatron defaults where they exist).
pub mod training_defaults {
    pub const MAX_LENGTH: u32 = 2048;
    pub const MICRO_BATCH_SIZE: u32 = 1;
    pub const LEARNING_RATE: f64 = 1e-5;
    pub const WEIGHT_DECAY: f64 = 0.1;
    pub const ADAM_BETA1: f64 = 0.9;
    pub const ADAM_BETA2: f64 = 0.95;
    pub const ADAM_EPS: f64 = 1e-8;
    pub const CLIP_GRAD: f64 = 1.0;
    pub const LOGGING_STEPS: u64 = 5;
    pub const SEED: u64 = 42;
}

/// Why a job spec was refused. Every variant names the source (a file name or "<request>").
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobSpecError {
    #[error("{source_name}{}: {message}", location(*line, *column))]
    Parse { source_name: String, line: Option<usize>, column: Option<usize>, message: String },
    #[error("{source_name}: key `{key}`: {message}")]
    Invalid { source_name: String, key: String, message: String },
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

impl JobSpec {
    /// Refuses valid specs that this build cannot run yet, naming the key, so a cluster job fails at
    /// submit time instead of in its rank processes. Training runs on any number of ranks with the layouts the
    /// engine has a model for (`qparallel::train::EngineKind`): dp × tp (± sp) × pp (× vpp), dp × tp × ep (× etp)
    /// with sp when tp > 1 and pp = cp = 1, or dp × cp × ep × etp with tp = pp = 1; LoRA adapters train on one rank
    /// only.
    pub fn check_runnable(&self, source_name: &str) -> Result<(), JobSpecError> {
        let refuse = |key: &str, message: String| {
            Err(JobSpecError::Invalid { source_name: source_name.to_string(), key: key.into(), message })
        };
        if !self.kind.is_training() || self.world_size() == 1 {
            return Ok(());
        }
        if self.train_type == Some(TrainType::Lora) {
            return refuse(
                "train_type",
                format!(
                    "`lora` trains on one rank only, the spec asks for {} ranks (`resources: {{ranks: 1}}`, or \
                     `train_type: full`)",
                    self.world_size()
                ),
            );
        }
        let p = &self.parallel;
        if (p.cp > 1 && (p.tp > 1 || p.pp > 1)) || (p.ep > 1 && p.pp > 1) {
            return refuse(
                "parallel",
                format!(
                    "cp {} / ep {} together with tp {} / pp {}: training runs context parallelism with tp = pp = 1, \
                     expert parallelism with pp = 1 and either tp or cp",
                    p.cp, p.ep, p.tp, p.pp
                ),
            );
        }
        if p.ep > 1 && p.tp > 1 && !p.sp {
            return refuse(
                "sp",
                format!(
                    "ep {} with tp {} needs sequence parallelism (`sp: true`): every rank then routes its own tokens",
                    p.ep, p.tp
                ),
            );
        }
        Ok(())
    }

    /// Makes the relative file paths of the training keys (`model`, `model_config`, `dataset`,
    /// `output_dir`, a `resume` path) absolute against `base`: `qctl submit` resolves them against the
    /// directory it runs in, as `qctl train --local` does, because the ranks run elsewhere.
    pub fn resolve_relative_paths(&mut self, base: &std::path::Path) {
        let resolve = |p: &mut String| {
            if !p.is_empty() && std::path::Path::new(p.as_str()).is_relative() {
                *p = base.join(p.as_str()).display().to_string();
            }
        };
        self.model.iter_mut().for_each(resolve);
        self.model_config.iter_mut().for_each(resolve);
        self.dataset.iter_mut().filter(|d| !sft::is_builtin_dataset(d)).for_each(resolve);
        self.output_dir.iter_mut().for_each(resolve);
        if let Some(Resume::Path(p)) = &mut self.resume {
            resolve(p);
        }
        if let Some(sv) = &mut self.serve {
            sv.model.iter_mut().for_each(resolve);
            sv.adapters.iter_mut().for_each(resolve);
            sv.api_key_file.iter_mut().for_each(resolve);
        }
    }

    /// Parses and validates YAML text. `source_name` (a file path, or "<request>") appears in errors.
    pub fn parse(yaml: &str, source_name: &str) -> Result<JobSpec, JobSpecError> {
        JobSpec::parse_with(yaml, source_name, |_| {})
    }

    /// [`JobSpec::parse`] with `edit` applied between reading and validating (command-line overrides, e.g.
    /// `qctl train --device` replacing `resources`), so the edited spec is checked as a whole.
    pub fn parse_with(
        yaml: &str,
        source_name: &str,
        edit: impl FnOnce(&mut JobSpec),
    ) -> Result<JobSpec, JobSpecError> {
        let mut spec: JobSpec = serde_norway::from_str(yaml).map_err(|e| {
            let loc = e.location();
            JobSpecError::Parse {
                source_name: source_name.to_string(),
                line: loc.as_ref().map(|l| l.line()),
                column: loc.as_ref().map(|l| l.column()),
                message: e.to_string(),
            }
        })?;
        edit(&mut spec);
        spec.validate(source_name)?;
        Ok(spec)
    }

    /// The YAML text of this spec (normalised; parses back to an equal spec).
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("a JobSpec always serialises")
    }

    /// Total number of rank processes.
    pub fn world_size(&self) -> u32 {
        let r = &self.resources;
        r.ranks.unwrap_or(r.nodes * r.gpus_per_node)
    }

    /// Ranks placed on each node (the world size split evenly, node-major).
    pub fn ranks_per_node(&self) -> u32 {
        self.world_size() / self.resources.nodes
    }

    /// Data-parallel size derived from the world size and the model-parallel factors.
    pub fn data_parallel(&self) -> u32 {
        let p = &self.parallel;
        self.world_size() / (p.tp * p.pp * p.cp)
    }

    /// The training keys with defaults filled in, for training kinds (`None` for other kinds). A spec returned
    /// by [`JobSpec::parse`] has passed the same checks, so this only fails for hand-built specs.
    pub fn training(&self) -> Option<TrainingSettings> {
        self.kind.is_training().then(|| self.resolve_training("<spec>").ok()).flatten()
    }

    /// Names of the training keys that are set (for refusing them on kinds that do not train).
    fn training_keys_set(&self) -> Vec<&'static str> {
        let set = [
            ("model", self.model.is_some()),
            ("init", self.init.is_some()),
            ("model_config", self.model_config.is_some()),
            ("dataset", !self.dataset.is_empty()),
            ("output_dir", self.output_dir.is_some()),
            ("max_length", self.max_length.is_some()),
            ("micro_batch_size", self.micro_batch_size.is_some()),
            ("global_batch_size", self.global_batch_size.is_some()),
            ("learning_rate", self.learning_rate.is_some()),
            ("min_lr", self.min_lr.is_some()),
            ("lr_warmup_iters", self.lr_warmup_iters.is_some()),
            ("warmup_ratio", self.warmup_ratio.is_some()),
            ("lr_decay_style", self.lr_decay_style.is_some()),
            ("lr_decay_iters", self.lr_decay_iters.is_some()),
            ("weight_decay", self.weight_decay.is_some()),
            ("adam_beta1", self.adam_beta1.is_some()),
            ("adam_beta2", self.adam_beta2.is_some()),
            ("adam_eps", self.adam_eps.is_some()),
            ("clip_grad", self.clip_grad.is_some()),
            ("train_iters", self.train_iters.is_some()),
            ("save_steps", self.save_steps.is_some()),
            ("logging_steps", self.logging_steps.is_some()),
            ("seed", self.seed.is_some()),
            ("gradient_checkpointing", self.gradient_checkpointing.is_some()),
            ("use_distributed_optimizer", self.use_distributed_optimizer.is_some()),
            ("torch_dtype", self.torch_dtype.is_some()),
            ("resume", self.resume.is_some()),
            ("train_type", self.train_type.is_some()),
            ("lora_rank", self.lora_rank.is_some()),
            ("lora_alpha", self.lora_alpha.is_some()),
            ("lora_dropout", self.lora_dropout.is_some()),
            ("target_modules", !self.target_modules.is_empty()),
            ("loss_scale", self.loss_scale.is_some()),
            ("packing", self.packing.is_some()),
            ("strict", self.strict.is_some()),
            ("truncation_strategy", self.truncation_strategy.is_some()),
            ("dataset_shuffle", self.dataset_shuffle.is_some()),
            ("model_name", !self.model_name.is_empty()),
            ("model_author", !self.model_author.is_empty()),
        ];
        set.iter().filter(|(_, on)| *on).map(|(k, _)| *k).collect()
    }

    fn validate_training(&self, source_name: &str) -> Result<(), JobSpecError> {
        if self.kind.is_training() {
            return self.resolve_training(source_name).map(|_| ());
        }
        if let Some(key) = self.training_keys_set().first() {
            return Err(JobSpecError::Invalid {
                source_name: source_name.to_string(),
                key: key.to_string(),
                message: format!("is a training key; kind `{}` does not train", self.kind),
            });
        }
        Ok(())
    }

    /// Checks the training keys and fills in defaults (see [`TrainingSettings`]).
    fn resolve_training(&self, source_name: &str) -> Result<TrainingSettings, JobSpecError> {
        use training_defaults as d;
        let invalid = |key: &str, message: String| JobSpecError::Invalid {
            source_name: source_name.to_string(),
            key: key.to_string(),
            message,
        };
        let model = match (self.init.unwrap_or(ModelInit::Pretrained), &self.model, &self.model_config) {
            (ModelInit::Pretrained, Some(dir), None) if !dir.is_empty() => ModelSource::Pretrained { dir: dir.clone() },
            (ModelInit::Pretrained, _, Some(_)) => {
                return Err(invalid("model_config", "is only read with `init: random`".into()));
            }
            (ModelInit::Pretrained, _, None) => {
                return Err(invalid(
                    "model",
                    "missing: give an HF model directory, or `init: random` with `model_config`".into(),
                ));
            }
            (ModelInit::Random, dir, Some(config)) if !config.is_empty() => {
                ModelSource::Random { config: config.clone(), dir: dir.clone() }
            }
            (ModelInit::Random, Some(dir), None) if !dir.is_empty() => ModelSource::Random {
                config: format!("{}/config.json", dir.trim_end_matches('/')),
                dir: Some(dir.clone()),
            },
            (ModelInit::Random, _, _) => {
                return Err(invalid("model_config", "missing: `init: random` needs an HF config.json path".into()));
            }
        };
        if self.dataset.is_empty() || self.dataset.iter().any(|p| p.is_empty()) {
            return Err(invalid(
                "dataset",
                "missing: give one or more dataset files (JSONL; for sft also JSON, CSV, `path#N`, `self-cognition`)".into(),
            ));
        }
        let positive_u32 = |key: &str, v: Option<u32>, default: u32| match v {
            Some(0) => Err(invalid(key, "must be at least 1".into())),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let max_length = positive_u32("max_length", self.max_length, d::MAX_LENGTH)?;
        if max_length < 2 {
            return Err(invalid("max_length", "must be at least 2 (a sequence predicts its next tokens)".into()));
        }
        let micro = positive_u32("micro_batch_size", self.micro_batch_size, d::MICRO_BATCH_SIZE)?;
        let dp = self.data_parallel().max(1);
        let global = positive_u32("global_batch_size", self.global_batch_size, micro * dp)?;
        if !global.is_multiple_of(micro * dp) {
            return Err(invalid(
                "global_batch_size",
                format!(
                    "{global} is not a multiple of micro_batch_size ({micro}) × data-parallel size ({dp}) = {}",
                    micro * dp
                ),
            ));
        }
        let train_iters = match self.train_iters {
            None => return Err(invalid("train_iters", "missing: how many optimizer steps to train".into())),
            Some(0) => return Err(invalid("train_iters", "must be at least 1".into())),
            Some(n) => n,
        };
        let finite_nonneg = |key: &str, v: Option<f64>, default: f64| match v {
            Some(x) if !(x.is_finite() && x >= 0.0) => {
                Err(invalid(key, format!("must be a finite number >= 0, got {x}")))
            }
            Some(x) => Ok(x),
            None => Ok(default),
        };
        let learning_rate = finite_nonneg("learning_rate", self.learning_rate, d::LEARNING_RATE)?;
        let min_lr = finite_nonneg("min_lr", self.min_lr, 0.0)?;
        if min_lr > learning_rate {
            return Err(invalid("min_lr", format!("{min_lr} exceeds learning_rate {learning_rate}")));
        }
        let weight_decay = finite_nonneg("weight_decay", self.weight_decay, d::WEIGHT_DECAY)?;
        let adam_eps = finite_nonneg("adam_eps", self.adam_eps, d::ADAM_EPS)?;
        let clip_grad = finite_nonneg("clip_grad", self.clip_grad, d::CLIP_GRAD)?;
        let beta = |key: &str, v: Option<f64>, default: f64| match v {
            Some(b) if !(0.0..1.0).contains(&b) => Err(invalid(key, format!("must be in [0, 1), got {b}"))),
            Some(b) => Ok(b),
            None => Ok(default),
        };
        let adam_beta1 = beta("adam_beta1", self.adam_beta1, d::ADAM_BETA1)?;
        let adam_beta2 = beta("adam_beta2", self.adam_beta2, d::ADAM_BETA2)?;
        let lr_decay_iters = match self.lr_decay_iters {
            Some(0) => return Err(invalid("lr_decay_iters", "must be at least 1".into())),
            Some(n) => n,
            None => train_iters,
        };
        if self.lr_warmup_iters.is_some() && self.warmup_ratio.is_some() {
            return Err(invalid("warmup_ratio", "give either lr_warmup_iters or warmup_ratio, not both".into()));
        }
        if let Some(w) = self.lr_warmup_iters
            && w > lr_decay_iters
        {
            return Err(invalid("lr_warmup_iters", format!("{w} exceeds lr_decay_iters {lr_decay_iters}")));
        }
        if let Some(r) = self.warmup_ratio
            && !(0.0..=1.0).contains(&r)
        {
            return Err(invalid("warmup_ratio", format!("must be in [0, 1], got {r}")));
        }
        let save_steps = match self.save_steps {
            Some(0) => return Err(invalid("save_steps", "must be at least 1".into())),
            Some(n) => n,
            None => train_iters,
        };
        let logging_steps = match self.logging_steps {
            Some(0) => return Err(invalid("logging_steps", "must be at least 1".into())),
            Some(n) => n,
            None => d::LOGGING_STEPS,
        };
        if let Some(Resume::Path(p)) = &self.resume
            && p.trim().is_empty()
        {
            return Err(invalid("resume", "must be auto, none or a checkpoint directory".into()));
        }
        if let Some(o) = &self.output_dir
            && o.is_empty()
        {
            return Err(invalid("output_dir", "must not be empty".into()));
        }
        let (sft, lora) = sft::resolve(self).map_err(|(key, message)| invalid(&key, message))?;
        Ok(TrainingSettings {
            model,
            dataset: self.dataset.clone(),
            output_dir: self.output_dir.clone().unwrap_or_else(|| format!("output/{}", self.name)),
            max_length,
            micro_batch_size: micro,
            global_batch_size: global,
            grad_accum: global / (micro * dp),
            learning_rate,
            min_lr,
            lr_warmup_iters: self.lr_warmup_iters,
            warmup_ratio: self.warmup_ratio,
            lr_decay_style: self.lr_decay_style.unwrap_or(LrDecayStyle::Cosine),
            lr_decay_iters,
            weight_decay,
            adam_beta1,
            adam_beta2,
            adam_eps,
            clip_grad,
            train_iters,
            save_steps,
            logging_steps,
            seed: self.seed.unwrap_or(d::SEED),
            gradient_checkpointing: self.gradient_checkpointing.unwrap_or(false),
            use_distributed_optimizer: self.use_distributed_optimizer.unwrap_or(false),
            torch_dtype: self.torch_dtype.unwrap_or_default(),
            resume: self.resume.clone().unwrap_or(Resume::Auto),
            sft,
            lora,
        })
    }

    fn validate(&self, source_name: &str) -> Result<(), JobSpecError> {
        let invalid = |key: &str, message: String| JobSpecError::Invalid {
            source_name: source_name.to_string(),
            key: key.to_string(),
            message,
        };
        if self.name.is_empty()
            || self.name.len() > 128
            || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(
                "name",
                format!("{:?} must be 1-128 characters of letters, digits, '-', '_' or '.'", self.name),
            ));
        }
        if !self.kind.is_runnable() {
            return Err(invalid(
                "kind",
                format!("kind `{}` is not supported by this build yet (supported: comm-check, pretrain, sft, serve)", self.kind),
            ));
        }
        if self.max_restarts > 100 {
            return Err(invalid("max_restarts", format!("{} is more than 100", self.max_restarts)));
        }
        let r = &self.resources;
        if r.nodes == 0 {
            return Err(invalid("resources.nodes", "must be at least 1".into()));
        }
        match (r.gpus_per_node, r.ranks) {
            (0, None) => {
                return Err(invalid(
                    "resources.ranks",
                    "a CPU job (gpus_per_node: 0) must say how many ranks it runs".into(),
                ));
            }
            (0, Some(0)) => return Err(invalid("resources.ranks", "must be at least 1".into())),
            (0, Some(ranks)) if ranks % r.nodes != 0 => {
                return Err(invalid(
                    "resources.ranks",
                    format!("{ranks} ranks cannot be spread evenly over {} nodes", r.nodes),
                ));
            }
            (gpus, Some(ranks)) if gpus > 0 && ranks != r.nodes * gpus => {
                return Err(invalid(
                    "resources.ranks",
                    format!(
                        "{ranks} ranks with nodes {} × gpus_per_node {gpus} = {} GPUs: a GPU job runs one rank per GPU",
                        r.nodes,
                        r.nodes * gpus
                    ),
                ));
            }
            _ => {}
        }
        if r.ranks.unwrap_or(0) > 65536 || r.gpus_per_node > 64 || r.nodes > 4096 {
            return Err(invalid("resources", "asks for more than 4096 nodes, 64 GPUs per node or 65536 ranks".into()));
        }
        let p = &self.parallel;
        for (key, v) in [("tp", p.tp), ("pp", p.pp), ("vpp", p.vpp), ("ep", p.ep), ("etp", p.etp), ("cp", p.cp)] {
            if v == 0 {
                return Err(invalid(&format!("parallel.{key}"), "must be at least 1".into()));
            }
        }
        let world = self.world_size();
        let model_parallel = p.tp * p.pp * p.cp;
        if world % model_parallel != 0 {
            return Err(invalid(
                "parallel",
                format!(
                    "world size {world} is not divisible by tp({}) × pp({}) × cp({}) = {model_parallel}",
                    p.tp, p.pp, p.cp
                ),
            ));
        }
        if self.ranks_per_node() % p.tp != 0 {
            return Err(invalid(
                "parallel.tp",
                format!(
                    "tp {} does not divide the {} ranks of one node: a tensor-parallel group must stay inside a node",
                    p.tp,
                    self.ranks_per_node()
                ),
            ));
        }
        if p.vpp > 1 && p.pp == 1 {
            return Err(invalid("parallel.vpp", "virtual pipeline stages need pp > 1".into()));
        }
        if p.sp && p.tp == 1 {
            return Err(invalid("parallel.sp", "sequence parallelism needs tp > 1".into()));
        }
        if !(0.0..=86_400.0).contains(&self.comm_check.hold_s) {
            return Err(invalid(
                "comm_check.hold_s",
                format!("{} is not between 0 and 86400 seconds", self.comm_check.hold_s),
            ));
        }
        if self.comm_check.iters == 0 || self.comm_check.bytes < 4 || self.comm_check.bytes > (1 << 34) {
            return Err(invalid(
                "comm_check",
                format!(
                    "bytes must be 4..=16 GiB and iters ≥ 1 (got bytes {}, iters {})",
                    self.comm_check.bytes, self.comm_check.iters
                ),
            ));
        }
        for name in self.env.keys() {
            let ok = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok || name.starts_with("QCLUSTER_") || name == "LD_PRELOAD" {
                return Err(invalid(
                    &format!("env.{name}"),
                    "must be an identifier that is not reserved (QCLUSTER_*, LD_PRELOAD)".into(),
                ));
            }
        }
        serve::validate(self).map_err(|(key, message)| invalid(&key, message))?;
        self.validate_training(source_name)
    }
}

fn one() -> u32 {
    1
}
fn default_comm_bytes() -> u64 {
    1 << 20
}
fn default_comm_iters() -> u32 {
    20
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "name: demo\nkind: comm-check\npriority: 3\nmax_restarts: 2\n\
resources: {nodes: 2, gpus_per_node: 0, ranks: 4}\nparallel: {tp: 2}\ncomm_check: {bytes: 4096, iters: 3}\n";

    #[test]
    fn parses_and_derives() {
        let s = JobSpec::parse(GOOD, "job.yaml").unwrap();
        assert_eq!(s.kind, JobKind::CommCheck);
        assert_eq!(s.world_size(), 4);
        assert_eq!(s.ranks_per_node(), 2);
        assert_eq!(s.data_parallel(), 2);
        assert_eq!(s.priority, 3);
        assert_eq!(JobSpec::parse(&s.to_yaml(), "x").unwrap(), s);
    }

    #[test]
    fn relative_training_paths_resolve_against_a_base() {
        let y = "name: pt\nkind: pretrain\nresources: {ranks: 1}\ninit: random\nmodel_config: c/m.json\n\
dataset: [d.jsonl, /abs/e.jsonl]\noutput_dir: out\nresume: ckpt/checkpoint-4\ntrain_iters: 3\n";
        let mut s = JobSpec::parse(y, "j.yaml").unwrap();
        s.resolve_relative_paths(std::path::Path::new("/work"));
        assert_eq!(s.model_config.as_deref(), Some("/work/c/m.json"));
        assert_eq!(s.dataset, vec!["/work/d.jsonl", "/abs/e.jsonl"]);
        assert_eq!(s.output_dir.as_deref(), Some("/work/out"));
        assert_eq!(s.resume, Some(Resume::Path("/work/ckpt/checkpoint-4".into())));
        assert_eq!(JobSpec::parse(&s.to_yaml(), "x").unwrap(), s, "still a valid spec");
    }

    #[test]
    fn multi_rank_training_runs_except_layouts_without_a_model() {
        let y = "name: pt\nkind: pretrain\nresources: {ranks: 4}\nmodel: m\ndataset: d.jsonl\ntrain_iters: 3\n";
        for parallel in [
            "",
            "parallel: {tp: 2}\n",
            "parallel: {tp: 2, pp: 2, sp: true}\n",
            "parallel: {cp: 2, ep: 2}\n",
            "parallel: {tp: 2, ep: 2, sp: true}\n",
        ] {
            let s = JobSpec::parse(&format!("{y}{parallel}"), "j.yaml").unwrap();
            assert_eq!(s.check_runnable("j.yaml"), Ok(()), "{parallel}");
        }
        let mixed = JobSpec::parse(&format!("{y}parallel: {{tp: 2, cp: 2}}\n"), "j.yaml").unwrap();
        let e = mixed.check_runnable("j.yaml").unwrap_err().to_string();
        assert!(e.contains("j.yaml: key `parallel`") && e.contains("tp = pp = 1"), "{e}");
        let ep_pp = JobSpec::parse(&format!("{y}parallel: {{pp: 2, ep: 2}}\n"), "j.yaml").unwrap();
        let e = ep_pp.check_runnable("j.yaml").unwrap_err().to_string();
        assert!(e.contains("key `parallel`") && e.contains("pp = 1"), "{e}");
        let ep_tp = JobSpec::parse(&format!("{y}parallel: {{tp: 2, ep: 2}}\n"), "j.yaml").unwrap();
        let e = ep_tp.check_runnable("j.yaml").unwrap_err().to_string();
        assert!(e.contains("j.yaml: key `sp`") && e.contains("sequence parallelism"), "{e}");
        let lora = JobSpec::parse(&format!("{y}train_type: lora\n"), "j.yaml").unwrap();
        let e = lora.check_runnable("j.yaml").unwrap_err().to_string();
        assert!(e.contains("j.yaml: key `train_type`") && e.contains("4 ranks"), "{e}");
        let one = JobSpec::parse(&format!("{}train_type: lora\n", y.replace("ranks: 4", "ranks: 1")), "j.yaml").unwrap();
        assert_eq!(one.check_runnable("j.yaml"), Ok(()));
        let cc = JobSpec::parse("name: c\nkind: comm-check\nresources: {ranks: 4}\nparallel: {tp: 2, cp: 2}\n", "c.yaml").unwrap();
        assert_eq!(cc.check_runnable("c.yaml"), Ok(()));
    }

    #[test]
    fn megatron_long_names_are_aliases() {
        let y = "name: a\nkind: comm-check\nresources: {ranks: 4}\nparallel: {tensor_model_parallel_size: 2, sequence_parallel: true}\n";
        let s = JobSpec::parse(y, "j.yaml").unwrap();
        assert_eq!(s.parallel.tp, 2);
        assert!(s.parallel.sp);
    }

    #[test]
    fn unknown_key_names_key_file_and_line() {
        let y = "name: a\nkind: comm-check\nresources: {ranks: 2}\nlearning_rat: 3\n";
        let e = JobSpec::parse(y, "job.yaml").unwrap_err().to_string();
        assert!(e.starts_with("job.yaml:4:"), "{e}");
        assert!(e.contains("learning_rat"), "{e}");
    }

    #[test]
    fn nested_unknown_key_is_rejected() {
        let y = "name: a\nkind: comm-check\nresources: {ranks: 2, gpu: 1}\n";
        let e = JobSpec::parse(y, "job.yaml").unwrap_err().to_string();
        assert!(e.contains("gpu") && e.contains("job.yaml:3"), "{e}");
    }

    #[test]
    fn bad_yaml_gives_line() {
        let e = JobSpec::parse("name: a\nkind: [comm-check\n", "bad.yaml").unwrap_err();
        match e {
            JobSpecError::Parse { line: Some(_), ref source_name, .. } => assert_eq!(source_name, "bad.yaml"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn impossible_resources_name_the_key() {
        let cases = [
            ("resources: {nodes: 0, ranks: 1}", "resources.nodes"),
            ("resources: {gpus_per_node: 0}", "resources.ranks"),
            ("resources: {nodes: 2, ranks: 3}", "resources.ranks"),
            ("resources: {nodes: 1, gpus_per_node: 8, ranks: 4}", "resources.ranks"),
            ("resources: {ranks: 6}\nparallel: {tp: 4}", "parallel"),
            ("resources: {nodes: 2, ranks: 4}\nparallel: {tp: 4}", "parallel.tp"),
            ("resources: {ranks: 2}\nparallel: {sp: true}", "parallel.sp"),
            ("resources: {ranks: 2}\nparallel: {vpp: 2}", "parallel.vpp"),
        ];
        for (yaml, key) in cases {
            let y = format!("name: a\nkind: comm-check\n{yaml}\n");
            let e = JobSpec::parse(&y, "j.yaml").unwrap_err();
            match &e {
                JobSpecError::Invalid { key: k, .. } => assert_eq!(k, key, "{yaml}: {e}"),
                other => panic!("{yaml}: {other:?}"),
            }
        }
    }

    #[test]
    fn unsupported_kind_and_reserved_env_are_refused() {
        let e = JobSpec::parse("name: a\nkind: dpo\nresources: {ranks: 1}\n", "j").unwrap_err().to_string();
        assert!(e.contains("`kind`") && e.contains("dpo"), "{e}");
        let e = JobSpec::parse("name: a\nkind: comm-check\nresources: {ranks: 1}\nenv: {QCLUSTER_RANK: '3'}\n", "j")
            .unwrap_err()
            .to_string();
        assert!(e.contains("env.QCLUSTER_RANK"), "{e}");
        let e = JobSpec::parse("name: a\nkind: train\n", "j").unwrap_err().to_string();
        assert!(e.contains("j:2"), "{e}");
    }

    const PRETRAIN: &str =
        "name: pt\nkind: pretrain\nresources: {ranks: 1}\nmodel: /m/qwen3\ndataset: /d/a.jsonl\ntrain_iters: 10\n";

    #[test]
    fn pretrain_defaults_resolve() {
        let s = JobSpec::parse(PRETRAIN, "pt.yaml").unwrap();
        assert!(s.kind.is_runnable());
        let t = s.training().unwrap();
        assert_eq!(t.model, ModelSource::Pretrained { dir: "/m/qwen3".into() });
        assert_eq!(t.dataset, vec!["/d/a.jsonl".to_string()]);
        assert_eq!(t.output_dir, "output/pt");
        assert_eq!((t.max_length, t.micro_batch_size, t.global_batch_size, t.grad_accum), (2048, 1, 1, 1));
        assert_eq!((t.learning_rate, t.min_lr, t.weight_decay, t.clip_grad), (1e-5, 0.0, 0.1, 1.0));
        assert_eq!((t.adam_beta1, t.adam_beta2, t.adam_eps), (0.9, 0.95, 1e-8));
        assert_eq!((t.train_iters, t.lr_decay_iters, t.save_steps, t.logging_steps), (10, 10, 10, 5));
        assert_eq!((t.lr_decay_style, t.seed, t.gradient_checkpointing), (LrDecayStyle::Cosine, 42, false));
        assert_eq!(t.resume, Resume::Auto);
        assert_eq!(JobSpec::parse(&s.to_yaml(), "x").unwrap(), s);
    }

    #[test]
    fn training_keys_and_aliases() {
        let y = "name: pt\nkind: pretrain\nresources: {ranks: 2}\ninit: random\nmodel_config: cfg/tiny.json\n\
dataset: [a.jsonl, b.jsonl]\noutput_dir: out\nseq_length: 64\nper_device_train_batch_size: 2\nglobal_batch_size: 12\n\
lr: 3.0e-4\nmin_lr: 3.0e-5\nwarmup_ratio: 0.1\nlr_decay_style: linear\nweight_decay: 0.01\nadam_beta1: 0.8\n\
adam_beta2: 0.99\nadam_epsilon: 1.0e-6\nmax_grad_norm: 0.5\nmax_steps: 100\nsave_steps: 25\nlogging_steps: 1\n\
seed: 7\ngradient_checkpointing: true\nuse_distributed_optimizer: true\nresume: out/checkpoint-25\n";
        let s = JobSpec::parse(y, "pt.yaml").unwrap();
        let t = s.training().unwrap();
        assert_eq!(t.model, ModelSource::Random { config: "cfg/tiny.json".into(), dir: None });
        assert_eq!(t.dataset.len(), 2);
        assert_eq!((t.max_length, t.micro_batch_size, t.global_batch_size), (64, 2, 12));
        assert_eq!(t.grad_accum, 3, "12 / (2 micro × 2 dp)");
        assert_eq!((t.learning_rate, t.min_lr, t.warmup_ratio, t.lr_warmup_iters), (3e-4, 3e-5, Some(0.1), None));
        assert_eq!(
            (t.lr_decay_style, t.weight_decay, t.adam_beta1, t.adam_beta2),
            (LrDecayStyle::Linear, 0.01, 0.8, 0.99)
        );
        assert_eq!((t.adam_eps, t.clip_grad, t.train_iters, t.save_steps, t.logging_steps), (1e-6, 0.5, 100, 25, 1));
        assert_eq!((t.seed, t.gradient_checkpointing, t.use_distributed_optimizer), (7, true, true));
        assert_eq!(t.resume, Resume::Path("out/checkpoint-25".into()));
        assert_eq!(JobSpec::parse(&s.to_yaml(), "x").unwrap(), s);
        let s = JobSpec::parse(&format!("{PRETRAIN}resume: none\ninit: random\n"), "p").unwrap();
        let t = s.training().unwrap();
        assert_eq!(t.resume, Resume::None);
        assert_eq!(
            t.model,
            ModelSource::Random { config: "/m/qwen3/config.json".into(), dir: Some("/m/qwen3".into()) }
        );
    }

    #[test]
    fn bad_training_keys_name_the_key() {
        let base = "name: pt\nkind: pretrain\nresources: {ranks: 2}\n";
        let ok = "model: m\ndataset: d.jsonl\ntrain_iters: 5\n";
        let cases = [
            ("dataset: d.jsonl\ntrain_iters: 5\n", "model"),
            ("model: m\ntrain_iters: 5\n", "dataset"),
            ("model: m\ndataset: d.jsonl\n", "train_iters"),
            ("init: random\ndataset: d.jsonl\ntrain_iters: 5\n", "model_config"),
            ("model_config: c.json\nmodel: m\ndataset: d.jsonl\ntrain_iters: 5\n", "model_config"),
            (&format!("{ok}micro_batch_size: 2\nglobal_batch_size: 6\n"), "global_batch_size"),
            (&format!("{ok}learning_rate: -1\n"), "learning_rate"),
            (&format!("{ok}lr: 1.0e-4\nmin_lr: 1.0e-3\n"), "min_lr"),
            (&format!("{ok}adam_beta2: 1.0\n"), "adam_beta2"),
            (&format!("{ok}lr_warmup_iters: 2\nwarmup_ratio: 0.1\n"), "warmup_ratio"),
            (&format!("{ok}lr_warmup_iters: 6\n"), "lr_warmup_iters"),
            (&format!("{ok}max_length: 0\n"), "max_length"),
            (&format!("{ok}save_steps: 0\n"), "save_steps"),
        ];
        for (yaml, key) in cases {
            let y = format!("{base}{yaml}");
            match JobSpec::parse(&y, "pt.yaml").unwrap_err() {
                JobSpecError::Invalid { key: k, source_name, .. } => {
                    assert_eq!((k.as_str(), source_name.as_str()), (key, "pt.yaml"), "{yaml}")
                }
                other => panic!("{yaml}: {other:?}"),
            }
        }
        let e = JobSpec::parse(&format!("{base}{ok}lr_decay_style: wsd\n"), "pt.yaml").unwrap_err().to_string();
        assert!(e.starts_with("pt.yaml:7:") && e.contains("wsd"), "{e}");
        let e = JobSpec::parse("name: a\nkind: comm-check\nresources: {ranks: 1}\nlr: 0.1\n", "j").unwrap_err();
        assert!(matches!(&e, JobSpecError::Invalid { key, .. } if key == "learning_rate"), "{e}");
    }

    #[test]
    fn sft_and_lora_keys() {
        let y = "name: sc\nkind: sft\nresources: {ranks: 1}\nmodel: m\ndataset: [self-cognition#100, chat.jsonl#20]\n\
train_iters: 5\ntrain_type: lora\nlora_rank: 16\nlora_alpha: 32\ntarget_modules: [q_proj, v_proj]\n\
loss_scale: last_round+ignore_empty_think\npacking: true\nstrict: true\ntruncation_strategy: left\n\
dataset_shuffle: false\nmodel_name: [小黄, Xiao Huang]\nmodel_author: swift\n";
        let mut s = JobSpec::parse(y, "sc.yaml").unwrap();
        let t = s.training().unwrap();
        let sft = t.sft.unwrap();
        assert_eq!(sft.loss_scale, "last_round+ignore_empty_think");
        assert_eq!((sft.packing, sft.strict, sft.truncation, sft.shuffle), (true, true, Truncation::Left, false));
        assert_eq!(sft.model_name, Some(Bilingual { zh: "小黄".into(), en: "Xiao Huang".into() }));
        assert_eq!(sft.model_author, Some(Bilingual { zh: "swift".into(), en: "swift".into() }));
        let lora = t.lora.unwrap();
        assert_eq!((lora.rank, lora.alpha, lora.dropout), (16, 32.0, 0.0));
        assert_eq!(lora.target_modules, vec!["q_proj", "v_proj"]);
        assert_eq!(JobSpec::parse(&s.to_yaml(), "x").unwrap(), s);
        s.resolve_relative_paths(std::path::Path::new("/w"));
        assert_eq!(s.dataset, vec!["self-cognition#100", "/w/chat.jsonl#20"], "built-ins stay names");

        let defaults = JobSpec::parse("name: a\nkind: sft\nresources: {ranks: 1}\nmodel: m\ndataset: d.jsonl\ntrain_iters: 1\ntrain_type: lora\n", "d").unwrap();
        let t = defaults.training().unwrap();
        let sft = t.sft.unwrap();
        assert_eq!((sft.loss_scale.as_str(), sft.packing, sft.strict, sft.truncation), ("default", false, false, Truncation::Delete));
        assert_eq!(t.lora.unwrap().target_modules, vec!["all-linear"]);
    }

    #[test]
    fn bad_sft_and_lora_keys_name_the_key() {
        let sft = "name: a\nkind: sft\nresources: {ranks: 1}\nmodel: m\ndataset: d.jsonl\ntrain_iters: 1\n";
        let pre = "name: a\nkind: pretrain\nresources: {ranks: 1}\nmodel: m\ndataset: d.jsonl\ntrain_iters: 1\n";
        let cases = [
            (format!("{sft}loss_scale: last\n"), "loss_scale"),
            (format!("{sft}model_name: [a, b, c]\n"), "model_name"),
            (format!("{sft}lora_rank: 8\n"), "lora_rank"),
            (format!("{sft}train_type: lora\nlora_rank: 0\n"), "lora_rank"),
            (format!("{sft}train_type: lora\nlora_dropout: 1.5\n"), "lora_dropout"),
            (format!("{sft}train_type: lora\nlora_dropout: 0.05\n"), "lora_dropout"),
            (format!("{sft}train_type: lora\ntarget_modules: [all-linear, q_proj]\n"), "target_modules"),
            (format!("{pre}packing: true\n"), "packing"),
            (format!("{pre}model_author: me\n"), "model_author"),
        ];
        for (yaml, key) in cases {
            match JobSpec::parse(&yaml, "j.yaml").unwrap_err() {
                JobSpecError::Invalid { key: k, .. } => assert_eq!(k, key, "{yaml}"),
                other => panic!("{yaml}: {other:?}"),
            }
        }
        let e = JobSpec::parse(&format!("{sft}train_type: qlora\n"), "j.yaml").unwrap_err().to_string();
        assert!(e.starts_with("j.yaml:7:") && e.contains("qlora"), "{e}");
    }

    #[test]
    fn serve_jobs_and_serve_after_training() {
        let y = "name: sv\nkind: serve\nresources: {ranks: 1}\nserve: {model: m, port: 0, served_model_name: tiny}\n";
        let mut s = JobSpec::parse(y, "sv.yaml").unwrap();
        s.resolve_relative_paths(std::path::Path::new("/w"));
        let sv = s.serve.clone().unwrap();
        assert_eq!((sv.model.as_deref(), sv.port, sv.served_model_name.as_deref()), (Some("/w/m"), 0, Some("tiny")));
        assert_eq!(JobSpec::parse(&s.to_yaml(), "x").unwrap(), s);
        let t = "name: a\nkind: pretrain\nresources: {ranks: 1}\nmodel: m\ndataset: d.jsonl\ntrain_iters: 1\n";
        JobSpec::parse(&format!("{t}serve_after_training: true\nserve: {{port: 0}}\n"), "t").unwrap();
        let cases = [
            ("name: sv\nkind: serve\nresources: {ranks: 1}\n".to_string(), "serve"),
            ("name: sv\nkind: serve\nresources: {ranks: 1}\nserve: {port: 1}\n".to_string(), "serve.model"),
            ("name: sv\nkind: serve\nresources: {ranks: 2}\nserve: {model: m}\n".to_string(), "resources"),
            (format!("{t}serve: {{port: 0}}\n"), "serve"),
            (format!("{t}serve_after_training: true\nserve: {{model: m}}\n"), "serve.model"),
            ("name: c\nkind: comm-check\nresources: {ranks: 1}\nserve_after_training: true\n".to_string(), "serve_after_training"),
        ];
        for (yaml, key) in cases {
            match JobSpec::parse(&yaml, "j.yaml").unwrap_err() {
                JobSpecError::Invalid { key: k, .. } => assert_eq!(k, key, "{yaml}"),
                other => panic!("{yaml}: {other:?}"),
            }
        }
        let e = JobSpec::parse("name: sv\nkind: serve\nresources: {ranks: 1}\nserve: {model: m, prot: 1}\n", "j.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("prot"), "{e}");
    }
}
