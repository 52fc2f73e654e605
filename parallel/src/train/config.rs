//! [`TrainConfig`]: every setting of a training run as explicit values (no YAML here; `qctl` and the rank
//! process map the job spec onto it).

use std::path::PathBuf;

use qkernels::{DType, Device};

use crate::optim::{AdamWConfig, DecayStyle, Warmup};

/// Where the initial weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// An HF directory: `config.json`, safetensors, tokenizer files.
    Pretrained(PathBuf),
    /// Random weights (`Qwen3Params::random` with std [`TrainConfig::init_std`], seeded by
    /// [`TrainConfig::seed`]) for the architecture in this `config.json`.
    Random { config: PathBuf },
}

/// Where a run starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// The newest complete `checkpoint-N` in the output directory, or from scratch when there is none.
    Auto,
    /// From scratch; refused when the output directory already holds checkpoints.
    None,
    /// From this checkpoint directory.
    Path(PathBuf),
}

/// A training run (see [`super::run_training`]). Counts are in optimizer steps and sequences.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub model: ModelSource,
    /// Directory with `tokenizer.json` for `text` lines; `None`: the model directory (pretrained) or the
    /// directory of the config file (random init).
    pub tokenizer_dir: Option<PathBuf>,
    /// JSONL files (see [`crate::data`]); with [`TrainConfig::sft`], SFT dataset entries.
    pub dataset: Vec<PathBuf>,
    /// Checkpoints (`checkpoint-<step>/`) and `metrics.jsonl` go here.
    pub output_dir: PathBuf,
    /// Tokens per sequence.
    pub max_length: usize,
    /// Sequences per micro-batch (on each data-parallel rank of a multi-rank run).
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step: global batch = `micro_batch_size · grad_accum` on one process,
    /// `micro_batch_size · dp · grad_accum` over `dp` data-parallel ranks ([`super::distributed`]).
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: Warmup,
    /// `None`: `train_iters`.
    pub lr_decay_iters: Option<u64>,
    pub lr_decay_style: DecayStyle,
    pub weight_decay: f64,
    pub adam: AdamWConfig,
    /// Global grad-norm clipping threshold; 0 = no clipping.
    pub clip_grad: f64,
    /// Optimizer steps of the whole run (a resumed run continues up to it).
    pub train_iters: u64,
    /// A checkpoint every this many steps, and after the last step.
    pub save_steps: u64,
    /// A `metrics.jsonl` line every this many steps, and for the last step.
    pub logging_steps: u64,
    /// Data order and random init.
    pub seed: u64,
    /// Standard deviation of random init.
    pub init_std: f32,
    pub gradient_checkpointing: bool,
    pub resume: Resume,
    /// LoRA adapters instead of full training (`None`: every parameter is trained). Needs a
    /// [`ModelSource::Pretrained`] base, which stays frozen; checkpoints then hold PEFT adapters (see
    /// [`super::checkpoint`]), and the adapters' `A` is initialised from [`TrainConfig::seed`].
    pub lora: Option<crate::lora::LoraConfig>,
    /// Supervised fine-tuning data (`None`: pretraining data, see [`crate::data`]): `dataset` entries are then
    /// chat datasets (`path`, `path#N`, `self-cognition`) rendered with the model's chat template, see
    /// [`crate::data::sft`].
    pub sft: Option<crate::data::SftOptions>,
    /// Where the model runs (one device per rank). On a GPU the optimizer keeps its f32 masters and moments on
    /// the device too ([`crate::optim::DeviceAdamW`], one process) or in host ZeRO-1 shards (several ranks).
    pub device: Device,
    /// Weights and activations of the model: `F32`, or `BF16` on a GPU (masters, gradient sums and optimizer
    /// states stay f32). The CPU engine is f32 only.
    pub compute_dtype: DType,
    /// Keep the optimizer as device tensors ([`crate::optim::DeviceAdamW`]; several ranks: replicated over dp
    /// instead of ZeRO-1 host shards) even on the CPU backend — what GPU runs always do. Same maths and the same
    /// checkpoint format; for tests and comparisons.
    pub optimizer_on_device: bool,
    /// Shard the device optimizer's masters and moments over dp (ZeRO-1, Megatron's
    /// `--use-distributed-optimizer`: [`crate::zero::DeviceDistributedOptimizer`]) instead of replicating them
    /// ([`crate::optim::DeviceAdamW`]). Host optimizers (CPU ranks) are always sharded.
    pub distributed_optimizer: bool,
}

impl TrainConfig {
    /// A config with ms-swift's Megatron defaults for everything but the model, data and output directory:
    /// max_length 2048, micro-batch 1, no accumulation, lr 1e-5 cosine to 0 without warmup, weight decay 0.1,
    /// β = (0.9, 0.95), ε = 1e-8, clip 1.0, save at the end, log every 5 steps, seed 42, resume auto.
    pub fn new(
        model: ModelSource,
        dataset: Vec<PathBuf>,
        output_dir: PathBuf,
        train_iters: u64,
    ) -> Self {
        TrainConfig {
            model,
            tokenizer_dir: None,
            dataset,
            output_dir,
            max_length: 2048,
            micro_batch_size: 1,
            grad_accum: 1,
            lr: 1e-5,
            min_lr: 0.0,
            warmup: Warmup::Iters(0),
            lr_decay_iters: None,
            lr_decay_style: DecayStyle::Cosine,
            weight_decay: 0.1,
            adam: AdamWConfig::default(),
            clip_grad: 1.0,
            train_iters,
            save_steps: train_iters.max(1),
            logging_steps: 5,
            seed: 42,
            init_std: 0.02,
            gradient_checkpointing: false,
            resume: Resume::Auto,
            lora: None,
            sft: None,
            device: Device::Cpu,
            compute_dtype: DType::F32,
            optimizer_on_device: false,
            distributed_optimizer: false,
        }
    }

    /// The directory tokenizer files are read from (see [`TrainConfig::tokenizer_dir`]).
    pub fn resolved_tokenizer_dir(&self) -> Option<PathBuf> {
        if let Some(d) = &self.tokenizer_dir {
            return Some(d.clone());
        }
        match &self.model {
            ModelSource::Pretrained(dir) => Some(dir.clone()),
            ModelSource::Random { config } => config.parent().map(|p| p.to_path_buf()),
        }
    }

    /// The learning-rate schedule of the run (decay over `lr_decay_iters`, default `train_iters`).
    pub fn lr_schedule(&self) -> Result<crate::optim::LrSchedule, crate::optim::OptimError> {
        crate::optim::LrSchedule::new(
            self.lr,
            self.min_lr,
            self.warmup,
            self.lr_decay_iters.unwrap_or(self.train_iters),
            self.lr_decay_style,
        )
    }

    /// Sequences per optimizer step of a one-process run.
    pub fn global_batch_size(&self) -> usize {
        self.micro_batch_size * self.grad_accum
    }
}
