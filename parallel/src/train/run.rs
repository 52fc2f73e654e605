//! [`run_training`]: the training loop of one process — data, steps, metrics, checkpoints, resume.
//!
//! Per step `s = start+1 ..= train_iters`:
//! 1. take `grad_accum` micro-batches of `micro_batch_size` units (pretraining sequences, SFT samples or packed
//!    SFT rows, see [`crate::data`]) from the [`DataLoader`];
//! 2. [`Trainer::step`];
//! 3. if `s % logging_steps == 0` or `s == train_iters`: append a [`StepMetrics`] line to
//!    `<output_dir>/metrics.jsonl` and the same scalars to this process's TensorBoard event file in
//!    `<output_dir>/runs/`;
//! 4. if `s % save_steps == 0` or `s == train_iters`: save `checkpoint-<s>` (model, optimizer, data cursor);
//! 5. tell the [`TrainObserver`], which may stop the run.
//!
//! On resume, the lines of `metrics.jsonl` for steps after the checkpoint (written by the interrupted run) are
//! dropped, so the file describes one consistent history.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use qkernels::{DType, Device};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, SaveRequest};
use super::config::{ModelSource, Resume, TrainConfig};
use super::tensorboard::EventWriter;
use super::trainer::{OptimizerOptions, Trainer};
use super::{Result, TrainError, io_err};
use crate::data::{self, DataCursor, DataLoader, Dataset, TrainDataOptions};
use crate::hf;
use crate::lora::{self, LoraAdapters, LoraConfig};
use crate::model::{ModelConfig, Qwen3Model};

/// The metrics file in the output directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The TensorBoard event files' directory in the output directory (`tensorboard --logdir <output_dir>`).
pub const TENSORBOARD_DIR: &str = "runs";
/// Peak dense bf16 FLOP/s of an H100/H200, the MFU denominator (DESIGN §7).
pub const PEAK_FLOPS: f64 = 989e12;

/// One line of `metrics.jsonl`, and what [`TrainObserver::on_step`] sees after every step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub train_iters: u64,
    pub loss: f64,
    pub ce_loss: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aux_loss: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens (`batch · seq`) of this step.
    pub tokens: u64,
    /// Tokens trained on since the start of the run (including before a resume).
    pub total_tokens: u64,
    pub step_time_s: f64,
    pub tokens_per_s: f64,
    /// `flops_per_token(max_length) · tokens_per_s / 989e12`, divided by the number of ranks of a multi-rank run.
    pub mfu: f64,
    pub skipped: bool,
}

/// What [`TrainObserver::on_start`] sees.
#[derive(Debug, Clone, PartialEq)]
pub struct RunInfo {
    /// Steps already taken (0, or the resumed checkpoint's step).
    pub start_step: u64,
    pub train_iters: u64,
    pub resumed_from: Option<PathBuf>,
    pub sequences: usize,
    /// Parameters of the model.
    pub param_count: u64,
    /// Parameters the optimizer updates: `param_count`, or the adapter elements of a LoRA run.
    pub trainable_params: u64,
    /// The TensorBoard event file of this process's steps.
    pub tensorboard: PathBuf,
}

impl RunInfo {
    /// The line a run prints when it starts: what trains, on what, for how long, and where the curves go.
    pub fn describe(&self) -> String {
        let what = if self.trainable_params == self.param_count {
            format!("{} parameters", self.param_count)
        } else {
            format!(
                "{} of {} parameters (adapters)",
                self.trainable_params, self.param_count
            )
        };
        let start = match &self.resumed_from {
            Some(dir) => format!(
                "resuming from {} at step {}/{}",
                dir.display(),
                self.start_step,
                self.train_iters
            ),
            None => format!(
                "training {what} on {} sequences for {} steps",
                self.sequences, self.train_iters
            ),
        };
        format!(
            "{start}; TensorBoard events in {}",
            self.tensorboard.display()
        )
    }
}

/// Progress hooks (a progress bar, a rank's status reporter). Every method has a no-op default.
pub trait TrainObserver {
    fn on_start(&mut self, _info: &RunInfo) {}
    /// After every step; `Break` stops the run after this step (its checkpoint, if due, is already written).
    fn on_step(&mut self, _metrics: &StepMetrics) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
    fn on_checkpoint(&mut self, _step: u64, _dir: &Path) {}
}

/// An observer that does nothing.
pub struct NoProgress;

impl TrainObserver for NoProgress {}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Steps taken when the run ended.
    pub final_step: u64,
    /// The loss of every step run in this process, in order (`(step, loss)`).
    pub losses: Vec<(u64, f64)>,
    pub resumed_from: Option<PathBuf>,
    /// The checkpoints written by this process.
    pub checkpoints: Vec<PathBuf>,
    /// The observer stopped the run before `train_iters`.
    pub stopped_early: bool,
}

/// Runs (or resumes) the training described by `cfg` on `cfg.device`, reporting to `observer`.
pub fn run_training(cfg: &TrainConfig, observer: &mut dyn TrainObserver) -> Result<TrainSummary> {
    check_config(cfg)?;
    let device = cfg.device;
    std::fs::create_dir_all(&cfg.output_dir).map_err(io_err(&cfg.output_dir))?;
    hf::remove_stale_temp_dirs(&cfg.output_dir)?;

    // Where to start.
    let resume_dir = resolve_resume(cfg)?;

    // Model (and its config.json for checkpoints when it has no source directory of its own). LoRA: always the
    // frozen base; the checkpoint holds only adapters.
    check_checkpoint_kind(cfg, resume_dir.as_deref())?;
    let (model, source_dir, config_json) = match (&resume_dir, &cfg.model) {
        (_, ModelSource::Pretrained(base)) if cfg.lora.is_some() => (
            Qwen3Model::from_hf_dir(base, device)?,
            Some(base.clone()),
            None,
        ),
        (Some(dir), _) => (
            Qwen3Model::from_hf_dir(dir, device)?,
            Some(dir.clone()),
            None,
        ),
        (None, ModelSource::Pretrained(dir)) => (
            Qwen3Model::from_hf_dir(dir, device)?,
            Some(dir.clone()),
            None,
        ),
        (None, ModelSource::Random { config }) => {
            let mc = ModelConfig::from_file(config).map_err(crate::model::ModelError::from)?;
            let json = mc.to_hf_json();
            let model = Qwen3Model::random(mc, cfg.seed, cfg.init_std, device)?;
            (model, cfg.resolved_tokenizer_dir(), Some(json))
        }
    };
    let model = model.with_gradient_checkpointing(cfg.gradient_checkpointing);
    let flops_per_token = model.config.flops_per_token(cfg.max_length);
    let param_count = model.config.param_count();

    // Data: pretraining sequences, or SFT samples / packed rows when `cfg.sft` is set.
    let tokenizer_dir = cfg.resolved_tokenizer_dir();
    let dataset = data::load_train_data(
        &cfg.dataset,
        &TrainDataOptions {
            max_length: cfg.max_length,
            vocab_size: model.config.vocab_size,
            tokenizer_dir: tokenizer_dir.as_deref(),
            seed: cfg.seed,
            sft: cfg.sft.as_ref(),
        },
    )?;
    let sequences = dataset.len();

    // Trainer, restored from the checkpoint when resuming.
    let schedule = cfg.lr_schedule()?;
    let opts = OptimizerOptions {
        schedule,
        adam: cfg.adam,
        weight_decay: cfg.weight_decay,
        clip_grad: cfg.clip_grad,
    };
    let mut trainer = match (&cfg.lora, &source_dir) {
        (Some(lc), Some(base)) => {
            let adapters = match &resume_dir {
                Some(dir) => resumed_adapters(dir, lc, &model, base)?,
                None => LoraAdapters::init(&model.config, lc, cfg.seed)?,
            };
            Trainer::new_lora(model, opts, lc.clone(), adapters)?
        }
        _ if cfg.optimizer_on_device => Trainer::with_device_optimizer(model, opts)?,
        _ => Trainer::new(model, opts)?,
    };
    if cfg.compute_dtype != DType::F32 {
        trainer.cast_model(cfg.compute_dtype)?;
    }
    let (cursor, mut total_tokens) = match &resume_dir {
        Some(dir) => {
            let state = read_resume_state(dir, cfg)?;
            let states = checkpoint::read_optimizer(dir, &state)?;
            trainer.restore(state.step, state.skipped_steps, states)?;
            (state.data_cursor, state.total_tokens)
        }
        None => (DataCursor::default(), 0),
    };
    let start_step = trainer.iteration();
    let mut loader = DataLoader::new(dataset, cfg.seed, cursor)?;
    let metrics_path = cfg.output_dir.join(METRICS_FILE);
    truncate_metrics(&metrics_path, start_step)?;
    let tb_dir = cfg.output_dir.join(TENSORBOARD_DIR);
    std::fs::create_dir_all(&tb_dir).map_err(io_err(&tb_dir))?;
    let mut tensorboard = EventWriter::create(&tb_dir).map_err(io_err(&tb_dir))?;
    let trainable_params = trainer.trainable_params();

    observer.on_start(&RunInfo {
        start_step,
        train_iters: cfg.train_iters,
        resumed_from: resume_dir.clone(),
        sequences,
        param_count,
        trainable_params,
        tensorboard: tensorboard.path().to_path_buf(),
    });
    if let Some(dir) = &resume_dir {
        tracing::info!("resuming from {} at step {start_step}", dir.display());
    }

    let mut summary = TrainSummary {
        final_step: start_step,
        losses: Vec::new(),
        resumed_from: resume_dir,
        checkpoints: Vec::new(),
        stopped_early: false,
    };
    while trainer.iteration() < cfg.train_iters {
        let started = Instant::now();
        let batches: Vec<_> = (0..cfg.grad_accum)
            .map(|_| loader.next_batch(cfg.micro_batch_size))
            .collect();
        let stats = trainer.step(&batches)?;
        let step_time_s = started.elapsed().as_secs_f64();
        total_tokens += stats.tokens as u64;
        let tokens_per_s = stats.tokens as f64 / step_time_s.max(1e-9);
        let metrics = StepMetrics {
            step: stats.step,
            train_iters: cfg.train_iters,
            loss: stats.loss,
            ce_loss: stats.ce_loss,
            aux_loss: stats.aux_loss,
            lr: stats.lr,
            grad_norm: stats.grad_norm,
            tokens: stats.tokens as u64,
            total_tokens,
            step_time_s,
            tokens_per_s,
            mfu: flops_per_token * tokens_per_s / PEAK_FLOPS,
            skipped: stats.skipped,
        };
        summary.losses.push((stats.step, stats.loss));
        summary.final_step = stats.step;
        let last = stats.step == cfg.train_iters;
        if stats.step.is_multiple_of(cfg.logging_steps) || last {
            append_metrics(&metrics_path, &metrics)?;
            write_tensorboard(&mut tensorboard, &metrics)?;
        }
        if stats.step.is_multiple_of(cfg.save_steps) || last {
            trainer.sync_host_state()?;
            let dir = checkpoint::save(
                &trainer,
                &SaveRequest {
                    output_dir: &cfg.output_dir,
                    source_dir: source_dir.as_deref(),
                    config: config_json.clone(),
                    data_cursor: loader.cursor(),
                    seed: cfg.seed,
                    total_tokens,
                    max_length: cfg.max_length,
                    global_batch_size: cfg.global_batch_size(),
                },
            )?;
            trainer.release_host_state()?;
            observer.on_checkpoint(stats.step, &dir);
            summary.checkpoints.push(dir);
        }
        if observer.on_step(&metrics).is_break() && !last {
            summary.stopped_early = true;
            break;
        }
    }
    Ok(summary)
}

/// The checkpoint a run starts from: the newest complete one in the output directory (`auto`), the given one, or
/// none (`none`, refused when the output directory already holds checkpoints).
pub(crate) fn resolve_resume(cfg: &TrainConfig) -> Result<Option<PathBuf>> {
    Ok(match &cfg.resume {
        Resume::Auto => checkpoint::find_latest_checkpoint(&cfg.output_dir)?,
        Resume::Path(p) => Some(p.clone()),
        Resume::None => {
            if let Some((_, dir)) = checkpoint::list_checkpoints(&cfg.output_dir)?.last() {
                return Err(TrainError::Invalid {
                    key: "resume",
                    reason: format!(
                        "`none`, but {} already holds {}; use `resume: auto` or another output_dir",
                        cfg.output_dir.display(),
                        dir.display()
                    ),
                });
            }
            None
        }
    })
}

/// The trainer state of checkpoint `dir`, checked against the run: the same seed (data order) and `max_length`
/// (data cursor).
pub(crate) fn read_resume_state(dir: &Path, cfg: &TrainConfig) -> Result<checkpoint::TrainerState> {
    let state = checkpoint::read_state(dir)?;
    if state.seed != cfg.seed {
        return Err(TrainError::Checkpoint {
            path: dir.to_path_buf(),
            reason: format!(
                "saved with seed {}, this run has seed {}: the data order would differ",
                state.seed, cfg.seed
            ),
        });
    }
    if state.max_length != cfg.max_length {
        return Err(TrainError::Checkpoint {
            path: dir.to_path_buf(),
            reason: format!(
                "saved with max_length {}, this run has {}: the data cursor would not fit",
                state.max_length, cfg.max_length
            ),
        });
    }
    Ok(state)
}

/// LoRA needs a pretrained base; a checkpoint to resume must be of the run's kind (adapters or full model).
pub(crate) fn check_checkpoint_kind(cfg: &TrainConfig, resume_dir: Option<&Path>) -> Result<()> {
    if cfg.lora.is_some() && !matches!(cfg.model, ModelSource::Pretrained(_)) {
        return Err(TrainError::Invalid {
            key: "lora",
            reason:
                "LoRA trains adapters on a pretrained base model; the model source is random init"
                    .into(),
        });
    }
    let Some(dir) = resume_dir else {
        return Ok(());
    };
    match (cfg.lora.is_some(), lora::is_adapter_dir(dir)) {
        (true, false) => Err(TrainError::Checkpoint {
            path: dir.to_path_buf(),
            reason:
                "a full-model checkpoint, but this run trains LoRA adapters; use another output_dir"
                    .into(),
        }),
        (false, true) => Err(TrainError::Checkpoint {
            path: dir.to_path_buf(),
            reason:
                "a LoRA adapter checkpoint, but this run trains the full model (no `lora` setting)"
                    .into(),
        }),
        _ => Ok(()),
    }
}

/// The adapters of the LoRA checkpoint `dir`, checked against this run: same rank, alpha, dropout, the same adapted
/// weights as `lc` selects on `model`, and the same base model directory.
fn resumed_adapters(
    dir: &Path,
    lc: &LoraConfig,
    model: &Qwen3Model,
    base: &Path,
) -> Result<LoraAdapters> {
    let bad = |reason: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        reason,
    };
    let saved = lora::read_adapter_config(dir)?;
    let (_, adapters) = lora::read_adapters(dir)?;
    let s = &saved.lora;
    if (s.rank, s.alpha, s.dropout) != (lc.rank, lc.alpha, lc.dropout) {
        return Err(bad(format!(
            "saved with LoRA r={} alpha={} dropout={}, this run has r={} alpha={} dropout={}",
            s.rank, s.alpha, s.dropout, lc.rank, lc.alpha, lc.dropout
        )));
    }
    let want: Vec<String> = lora::target_weights(&model.config, &lc.target_modules)?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    if !adapters.pairs.keys().eq(want.iter()) {
        return Err(bad(format!(
            "its adapters cover other weights than target_modules `{}` selects",
            lc.target_modules
        )));
    }
    let canon = |p: &Path| std::fs::canonicalize(p).map_err(io_err(p));
    let base_abs = canon(base)?;
    match saved.base_model_name_or_path.as_deref().map(Path::new) {
        Some(p) if p.is_absolute() && canon(p).ok().as_deref() == Some(base_abs.as_path()) => {}
        other => {
            return Err(bad(format!(
                "adapters of base model {:?}, this run's base is {}",
                other,
                base_abs.display()
            )));
        }
    }
    Ok(adapters)
}

pub(crate) fn check_config(cfg: &TrainConfig) -> Result<()> {
    let positive = [
        ("max_length", cfg.max_length as u64),
        ("micro_batch_size", cfg.micro_batch_size as u64),
        ("grad_accum", cfg.grad_accum as u64),
        ("train_iters", cfg.train_iters),
        ("save_steps", cfg.save_steps),
        ("logging_steps", cfg.logging_steps),
    ];
    for (key, v) in positive {
        if v == 0 {
            return Err(TrainError::Invalid {
                key,
                reason: "must be at least 1".into(),
            });
        }
    }
    if cfg.max_length < 2 {
        return Err(TrainError::Invalid {
            key: "max_length",
            reason: "must be at least 2".into(),
        });
    }
    if cfg.dataset.is_empty() {
        return Err(TrainError::Invalid {
            key: "dataset",
            reason: "no files given".into(),
        });
    }
    match (cfg.compute_dtype, cfg.device) {
        (DType::F32, _) | (DType::BF16, Device::Cuda(_)) => {}
        (DType::BF16, Device::Cpu) => {
            return Err(TrainError::Invalid {
                key: "torch_dtype",
                reason: "bfloat16 needs a GPU; the CPU engine computes in float32".into(),
            });
        }
        (other, _) => {
            return Err(TrainError::Invalid {
                key: "torch_dtype",
                reason: format!("{other:?} is not a compute precision (use bfloat16 or float32)"),
            });
        }
    }
    Ok(())
}

/// The scalars of a logged step in TensorBoard (`train/loss`, `train/lr`, …).
pub(crate) fn write_tensorboard(w: &mut EventWriter, m: &StepMetrics) -> Result<()> {
    let mut values = vec![
        ("train/loss", m.loss),
        ("train/ce_loss", m.ce_loss),
        ("train/lr", m.lr),
        ("train/grad_norm", m.grad_norm),
        ("train/tokens_per_s", m.tokens_per_s),
        ("train/mfu", m.mfu),
        ("train/total_tokens", m.total_tokens as f64),
    ];
    if let Some(aux) = m.aux_loss {
        values.push(("train/aux_loss", aux));
    }
    let path = w.path().to_path_buf();
    w.scalars(m.step, &values).map_err(io_err(&path))
}

pub(crate) fn append_metrics(path: &Path, m: &StepMetrics) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    let line = serde_json::to_string(m).expect("metrics serialise") + "\n";
    f.write_all(line.as_bytes()).map_err(io_err(path))
}

/// Keeps the lines of `metrics.jsonl` for steps `≤ step` (all of them when the file does not exist).
pub(crate) fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step")?.as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if kept.len() != text.len() {
        std::fs::write(path, kept).map_err(io_err(path))?;
    }
    Ok(())
}
