//! [`run_distributed_training`]: the training loop of [`run_training`](super::run_training) over several ranks —
//! the same data order, schedule, clipping, metrics and checkpoints, with the model split by a
//! [`ParallelDims`] layout.
//!
//! # Which model runs a layout
//!
//! | layout | model | optimizer |
//! |---|---|---|
//! | `pp = 1, cp = ep = 1` (dp × tp ± sp) | [`TpModel`] | ZeRO-1 over dp ([`DistributedOptimizer`]) |
//! | `pp > 1, cp = ep = 1` (dp × tp ± sp × pp × vpp) | [`PipelineModel`] (1F1B / interleaved) | ZeRO-1 over dp |
//! | `cp > 1` or `ep > 1` with `tp = pp = 1` (dp × cp × ep × etp) | [`CpEpModel`] | AdamW per rank after the dp-cp / expert-dp reduction |
//! | `ep > 1` with `tp > 1`, sp, `pp = cp = 1` (dp × tp × ep × etp) | [`TpModel`] with expert shards | AdamW per rank after the dp / expert-dp reduction |
//!
//! Anything else (cp with tp or pp, ep with pp) is [`TrainError::Layout`]; ep with tp but without sp is
//! [`TrainError::Invalid`] naming `sp`; LoRA runs on one rank only
//! ([`run_training`](super::run_training)), so `lora` here is [`TrainError::Invalid`].
//!
//! On GPUs (and on CPU ranks with `optimizer_on_device`) the same models run with their optimizer state on the
//! device (`train::device_optimizer`): tp and pp layouts replicate it over dp, or shard it with
//! `distributed_optimizer` (device ZeRO-1); cp/ep steps the full local parameters after the model's reduction.
//! `cp > 1` is refused on GPUs (its index-masked attention has no CUDA kernel); ep runs, its token dispatch an NCCL
//! all-to-all of rows. ep with tp (and sp) runs in the TP model ([`TpModel`] with expert shards).
//!
//! # One step (every rank)
//!
//! ```text
//! dp      = dims.dp(),  b = micro_batch_size (per dp rank),  M = grad_accum
//! B_m     = loader.next_batch(b·dp)  for m = 1..M      // every rank runs the same seeded loader: the global
//!                                                       // batch is the single-rank run's (micro b·dp, accum M)
//! rows    = B_m rows [r·b, (r+1)·b) on dp rank r        // (CP: then this rank's 2 chunks of each row)
//! W_m     = Σ loss_weights(B_m),  W = Σ_m W_m
//! g       = Σ_m (W_m/W)·∇loss(B_m)   (each model normalises micro-batch m by the global W_m; the pipeline
//!                                      weights its micro-batches itself)
//! norm    = global L2 norm over all ranks (each element once);  clip;  AdamW(lr = schedule(iteration))
//! ```
//! This is [`Trainer::step`](super::Trainer::step) on the micro-batches `B_1..B_M`, so the losses equal the
//! single-rank run with `micro_batch_size = b·dp` and the same `grad_accum` (up to f32 summation order; for MoE
//! models the aux loss is per global micro-batch in both). A micro-batch whose tokens do not split as the layout
//! needs (`seq % 2·cp`, `b·seq % tp` with sp, equal shapes under pp — only unpadded SFT rows vary) is padded at the
//! end of each row with zero-weight tokens, which changes no loss of a dense model (for MoE the padding joins the
//! routing statistics).
//!
//! # Who does what
//!
//! Global rank 0 resolves where to start (`resume`), loads the initial weights (checkpoint, pretrained directory or
//! seeded random init) and, from a single-rank checkpoint, the optimizer moments, and broadcasts them with the
//! trainer state to every rank; it writes `metrics.jsonl`, the TensorBoard events and the checkpoints' model and
//! trainer state. Every rank writes and reads its own optimizer shard (so `output_dir` must be shared by the
//! ranks), and only rank 0's [`TrainObserver`] is called (its `Break` is broadcast, so every rank stops after the same step).
//! Every rank reads the dataset itself (inputs must be readable on every node).
//!
//! # Checkpoints: layout-independent, optimizer state saved by its owners
//!
//! A checkpoint holds the full model in HF layout (gathered with the model's `gather_full_params` over TP, PP, EP
//! and written by rank 0), `trainer_state.json`, and the optimizer state in `optimizer/`
//! ([`optimizer_shards`]): every rank writes the fp32 master weights and AdamW moments of the pieces of its ZeRO
//! shard it owns (the rank that counts the parameter in the global norm, so replicated tensors are written once)
//! with their global offsets into the full parameters. Nothing is gathered for it: no rank holds more optimizer
//! state while saving than it owns.
//!
//! Saving is collective: rank 0 writes the model, the trainer state and `optimizer/index.json` into the temporary
//! directory and broadcasts its path; every rank adds its shard; the outcome is agreed on (the barrier); rank 0
//! renames the directory and broadcasts success, so no rank goes on before the checkpoint is committed (or all
//! fail).
//!
//! Loading under any layout: each rank measures once where its local parameters sit in the full ones
//! ([`GlobalMap`]), and after building its model reads exactly the global ranges of its ZeRO shard from the shard
//! files ([`ShardedOptimizer::read_shard`]) into [`DistributedOptimizer::restore_shard`]. A single-rank checkpoint
//! (full-shape `optimizer.safetensors`) is still read as before: rank 0 loads it, every rank slices it
//! (`local_from_full`, [`DistributedOptimizer::restore_moments`]). [`run_training`](super::run_training)
//! reassembles a sharded checkpoint's full state. So runs resume across layouts and between one and several ranks.
//!
//! Rank 0 still gathers the full model weights to write them (the deliverable model), and every rank receives
//! the full weights at start-up.
//!
//! # Invariants
//!
//! - Every rank calls the same collectives in the same order; a failure on some ranks during setup or while a
//!   checkpoint is written is agreed on, so every rank returns an error ([`TrainError::PeerFailed`] on the others)
//!   instead of waiting for a collective that never comes.
//! - A layout-changing resume reproduces the uninterrupted run: the data cursor, the schedule position and the
//!   moments are layout-independent, and the weights are f32 in the checkpoint.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use qkernels::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, CheckpointParts, SaveRequest, TrainerState};
use super::config::{ModelSource, TrainConfig};
use super::optimizer_shards::{self, GlobalMap, ShardedOptimizer};
use super::run::{
    METRICS_FILE, PEAK_FLOPS, RunInfo, StepMetrics, TENSORBOARD_DIR, TrainObserver, TrainSummary,
    append_metrics, check_checkpoint_kind, check_config, read_resume_state, resolve_resume,
    truncate_metrics, write_tensorboard,
};
use super::tensorboard::EventWriter;
use super::{Result, TrainError, io_err};
use crate::comm::{Communicator, ReduceOp};
use crate::context_parallel::{CpEpGroups, CpEpModel};
use crate::data::{self, DataCursor, DataLoader, Dataset, TrainDataOptions};
use crate::dims::ParallelDims;
use crate::hf::{self, TensorMap};
use crate::model::{Batch, ModelConfig, NamedTensors, Qwen3Model, Qwen3Params, param_shapes};
use super::device_optimizer::DeviceOptimizer;
use crate::pipeline::{PipelineGroups, PipelineModel};
use crate::tensor_parallel::{ParallelGroups, TpModel, split_batch_rows};
use crate::zero::{DistributedOptimizer, ParamSet, ZeroConfig};

/// Which model a layout runs on (see the module docs); [`TrainError::Layout`] for combinations none supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// [`TpModel`] + ZeRO-1: dp × tp (± sp).
    TensorParallel,
    /// [`PipelineModel`] + ZeRO-1: dp × tp (± sp) × pp (× vpp).
    Pipeline,
    /// [`CpEpModel`]: dp × cp × ep × etp with tp = pp = 1.
    ContextExpert,
}

impl EngineKind {
    /// The model that runs `dims`, or why none does.
    pub fn for_dims(dims: &ParallelDims) -> Result<EngineKind> {
        let (cp, ep, tp, pp) = (dims.cp(), dims.ep(), dims.tp(), dims.pp());
        if (cp > 1 && (tp > 1 || pp > 1)) || (ep > 1 && pp > 1) {
            return Err(TrainError::Layout(format!(
                "cp = {cp}, ep = {ep} together with tp = {tp}, pp = {pp}: context parallelism runs with tp = pp = 1 \
                 (dp × cp × ep × etp), expert parallelism with pp = 1 and either tp (dp × tp × ep with sp) or cp, \
                 pipeline parallelism with cp = ep = 1"
            )));
        }
        if ep > 1 && tp > 1 && !dims.sp() {
            return Err(TrainError::Invalid {
                key: "sp",
                reason: format!(
                    "ep = {ep} with tp = {tp} needs sequence parallelism (sp: true): every rank then routes its own \
                     tokens"
                ),
            });
        }
        Ok(if cp > 1 || (ep > 1 && tp == 1) {
            EngineKind::ContextExpert
        } else if dims.pp() > 1 {
            EngineKind::Pipeline
        } else {
            EngineKind::TensorParallel
        })
    }
}

/// Where the run starts, decided and loaded by rank 0 and broadcast: the header travels as JSON.
#[derive(Debug, Serialize, Deserialize)]
enum StartHeader {
    Ok {
        /// The model's `config.json` (as [`ModelConfig::to_hf_json`] writes it).
        config: serde_json::Value,
        resumed_from: Option<PathBuf>,
        state: Option<TrainerState>,
        /// The moments follow the weights (a resumed run whose optimizer has stepped).
        moments: bool,
        /// The checkpoint holds sharded optimizer state: every rank reads its own ranges.
        #[serde(default)]
        sharded: bool,
    },
    Failed {
        message: String,
    },
}

/// What rank 0 alone keeps of the start: where `config.json` and tokenizer files of checkpoints come from.
#[derive(Default)]
struct SaveSource {
    source_dir: Option<PathBuf>,
    config_json: Option<serde_json::Value>,
}

/// The start as every rank sees it.
struct Start {
    config: ModelConfig,
    resumed_from: Option<PathBuf>,
    state: Option<TrainerState>,
    params: Qwen3Params,
    /// Full-layout `(exp_avg, exp_avg_sq)` and the AdamW step count of every parameter (a checkpoint in the
    /// single-rank format).
    moments: Option<(Qwen3Params, Qwen3Params, u64)>,
    /// `resumed_from` holds sharded optimizer state ([`optimizer_shards`]): each rank reads its ranges.
    sharded: bool,
}

/// Runs (or resumes) the training described by `cfg` as rank `world.rank()` of `world`, split by `dims`
/// (`dims.world() == world.size()`), on the CPU device. Every rank of `world` calls it with the same `cfg` and
/// `dims`; only global rank 0's `observer` is called. Returns this rank's summary (the losses are the global
/// batch's, equal on every rank). See the module docs.
pub fn run_distributed_training(
    world: &dyn Communicator,
    dims: ParallelDims,
    cfg: &TrainConfig,
    observer: &mut dyn TrainObserver,
) -> Result<TrainSummary> {
    check_config(cfg)?;
    if cfg.lora.is_some() {
        return Err(TrainError::Invalid {
            key: "lora",
            reason: format!(
                "LoRA adapters train on one rank only; this run has {} ranks (use full training, or one rank)",
                dims.world()
            ),
        });
    }
    if !(cfg.clip_grad >= 0.0 && cfg.clip_grad.is_finite()) {
        return Err(TrainError::Invalid {
            key: "clip_grad",
            reason: format!("must be a finite number >= 0, got {}", cfg.clip_grad),
        });
    }
    if world.size() != dims.world() {
        return Err(TrainError::Layout(format!(
            "the communicator has {} ranks, the layout {}",
            world.size(),
            dims.world()
        )));
    }
    let kind = EngineKind::for_dims(&dims)?;
    if dims.vpp() > 1 && !cfg.grad_accum.is_multiple_of(dims.pp()) {
        return Err(TrainError::Invalid {
            key: "global_batch_size",
            reason: format!(
                "the interleaved pipeline schedule (vpp {}) needs a multiple of pp = {} micro-batches per step, \
                 this run has {} (global_batch_size / (micro_batch_size · dp))",
                dims.vpp(),
                dims.pp(),
                cfg.grad_accum
            ),
        });
    }
    if matches!(cfg.device, Device::Cuda(_)) && dims.cp() > 1 {
        return Err(TrainError::Invalid {
            key: "parallel",
            reason: "context parallelism (cp > 1) runs on CPU ranks only for now: its index-masked attention has no \
                     CUDA kernel yet (expert parallelism, ep, does run on GPUs)"
                .into(),
        });
    }
    let rank = world.rank();
    // Rank 0 reads the start on the host; `share_start` puts the weights on the run's device.
    let device = Device::Cpu;

    // Rank 0 decides where to start and loads the weights; everyone receives them.
    let mut save_source = SaveSource::default();
    let start = if rank == 0 {
        let loaded = load_start(cfg, device);
        let shared = share_start(
            world,
            loaded.as_ref().map(|(s, _)| s).map_err(|e| e.to_string()),
            cfg.device,
        );
        // Rank 0's own error, not the "rank 0 failed" its peers get.
        let (_, source) = loaded?;
        save_source = source;
        shared?
    } else {
        share_start(world, Err(String::new()), cfg.device)?
    };
    let Start {
        config,
        resumed_from,
        state,
        params,
        moments,
        sharded,
    } = start;

    // The model of this rank, its optimizer, the data: every rank builds its own; failures are agreed on.
    let zero = ZeroConfig {
        weight_decay: cfg.weight_decay,
        max_grad_norm: (cfg.clip_grad > 0.0).then_some(cfg.clip_grad),
    };
    let mut engine = Engine::build(kind, world, dims, &config, &params, cfg, zero)?;
    drop(params);
    // The optimizer took its f32 masters from the weights above; now the compute copy may become bf16.
    let cast = engine.cast_params(cfg.compute_dtype);
    agree(world, cast, "casting its weights")?;
    let setup = (|| -> Result<_> {
        let map = engine.measure_map(&config)?;
        if let Some((m, v, adam_step)) = &moments {
            engine.restore_moments(m, v, *adam_step)?;
        }
        if let (true, Some(dir)) = (sharded, &resumed_from) {
            let shards = ShardedOptimizer::open(dir)?;
            engine.restore_shards(&shards, &map)?;
        }
        let dataset = data::load_train_data(
            &cfg.dataset,
            &TrainDataOptions {
                max_length: cfg.max_length,
                vocab_size: config.vocab_size,
                tokenizer_dir: cfg.resolved_tokenizer_dir().as_deref(),
                seed: cfg.seed,
                sft: cfg.sft.as_ref(),
            },
        )?;
        let sequences = dataset.len();
        let cursor = state
            .as_ref()
            .map_or(DataCursor::default(), |s| s.data_cursor);
        Ok((DataLoader::new(dataset, cfg.seed, cursor)?, sequences, map))
    })();
    drop(moments);
    let (mut loader, sequences, map) =
        agree(world, setup, "setting up its model, optimizer and data")?;

    let schedule = cfg.lr_schedule()?;
    let mut iteration = state.as_ref().map_or(0, |s| s.step);
    let mut skipped_steps = state.as_ref().map_or(0, |s| s.skipped_steps);
    let mut total_tokens = state.as_ref().map_or(0, |s| s.total_tokens);
    let start_step = iteration;
    let dp = dims.dp();
    let rows_per_micro = cfg.micro_batch_size * dp;
    let global_batch_size = rows_per_micro * cfg.grad_accum;
    let flops_per_token = config.flops_per_token(cfg.max_length);

    // Rank 0's outputs: metrics history, TensorBoard, the observer.
    let metrics_path = cfg.output_dir.join(METRICS_FILE);
    let mut tensorboard = None;
    if rank == 0 {
        let prepared = (|| -> Result<EventWriter> {
            truncate_metrics(&metrics_path, start_step)?;
            let tb_dir = cfg.output_dir.join(TENSORBOARD_DIR);
            std::fs::create_dir_all(&tb_dir).map_err(io_err(&tb_dir))?;
            EventWriter::create(&tb_dir).map_err(io_err(&tb_dir))
        })();
        let writer = agree_from_root(world, prepared, "opening its metrics files")?;
        observer.on_start(&RunInfo {
            start_step,
            train_iters: cfg.train_iters,
            resumed_from: resumed_from.clone(),
            sequences,
            param_count: config.param_count(),
            trainable_params: config.param_count(),
            tensorboard: writer.path().to_path_buf(),
        });
        if let Some(dir) = &resumed_from {
            tracing::info!("resuming from {} at step {start_step}", dir.display());
        }
        tensorboard = Some(writer);
    } else {
        agree_from_root(world, Ok(()), "opening its metrics files")?;
    }

    let mut summary = TrainSummary {
        final_step: start_step,
        losses: Vec::new(),
        resumed_from,
        checkpoints: Vec::new(),
        stopped_early: false,
    };
    let multiple = seq_multiple(&dims, cfg.micro_batch_size);
    while iteration < cfg.train_iters {
        let started = Instant::now();
        let step = iteration + 1;
        let mut batches: Vec<Batch> = (0..cfg.grad_accum)
            .map(|_| loader.next_batch(rows_per_micro))
            .collect();
        let tokens: usize = batches.iter().map(Batch::tokens).sum();
        pad_batches(&mut batches, multiple, kind == EngineKind::Pipeline);
        let weights: Vec<f64> = batches.iter().map(weight_sum).collect();
        if weights.iter().sum::<f64>() <= 0.0 {
            return Err(TrainError::EmptyBatch { step });
        }
        let lr = schedule.lr(iteration);
        let out = engine.step(&batches, &weights, lr)?;
        iteration = step;
        if out.skipped {
            skipped_steps += 1;
            tracing::warn!(
                step,
                grad_norm = out.grad_norm,
                "non-finite gradient norm: update skipped"
            );
        }
        let step_time_s = started.elapsed().as_secs_f64();
        total_tokens += tokens as u64;
        let tokens_per_s = tokens as f64 / step_time_s.max(1e-9);
        let metrics = StepMetrics {
            step,
            train_iters: cfg.train_iters,
            loss: out.loss,
            ce_loss: out.ce_loss,
            aux_loss: out.aux_loss,
            lr,
            grad_norm: out.grad_norm,
            tokens: tokens as u64,
            total_tokens,
            step_time_s,
            tokens_per_s,
            // Per rank: the peak of every device the run uses.
            mfu: flops_per_token * tokens_per_s / (PEAK_FLOPS * dims.world() as f64),
            skipped: out.skipped,
        };
        summary.losses.push((step, out.loss));
        summary.final_step = step;
        let last = step == cfg.train_iters;
        if let Some(tb) = &mut tensorboard
            && (step.is_multiple_of(cfg.logging_steps) || last)
        {
            append_metrics(&metrics_path, &metrics)?;
            write_tensorboard(tb, &metrics)?;
        }
        if step.is_multiple_of(cfg.save_steps) || last {
            let req = SaveRequest {
                output_dir: &cfg.output_dir,
                source_dir: save_source.source_dir.as_deref(),
                config: save_source.config_json.clone(),
                data_cursor: loader.cursor(),
                seed: cfg.seed,
                total_tokens,
                max_length: cfg.max_length,
                global_batch_size,
            };
            let dir = engine.save(world, &map, &req, step, skipped_steps)?;
            if rank == 0 {
                observer.on_checkpoint(step, &dir);
            }
            summary.checkpoints.push(dir);
        }
        let mut stop = [0f32];
        if rank == 0 && observer.on_step(&metrics).is_break() && !last {
            stop[0] = 1.0;
        }
        if world.size() > 1 {
            world.broadcast(&mut stop, 0)?;
        }
        if stop[0] != 0.0 {
            summary.stopped_early = true;
            break;
        }
    }
    Ok(summary)
}

/// Rank 0's start: the checkpoint to resume (checked against the run), the full weights and, when resuming, the
/// full moments; plus where checkpoints copy `config.json` and tokenizer files from.
fn load_start(cfg: &TrainConfig, device: Device) -> Result<(Start, SaveSource)> {
    std::fs::create_dir_all(&cfg.output_dir).map_err(io_err(&cfg.output_dir))?;
    hf::remove_stale_temp_dirs(&cfg.output_dir)?;
    let resume_dir = resolve_resume(cfg)?;
    check_checkpoint_kind(cfg, resume_dir.as_deref())?;
    let (model, source) = match (&resume_dir, &cfg.model) {
        (Some(dir), _) | (None, ModelSource::Pretrained(dir)) => (
            Qwen3Model::from_hf_dir(dir, device)?,
            SaveSource {
                source_dir: Some(dir.clone()),
                config_json: None,
            },
        ),
        (None, ModelSource::Random { config }) => {
            let mc = ModelConfig::from_file(config).map_err(crate::model::ModelError::from)?;
            let json = mc.to_hf_json();
            (
                Qwen3Model::random(mc, cfg.seed, cfg.init_std, device)?,
                SaveSource {
                    source_dir: cfg.resolved_tokenizer_dir(),
                    config_json: Some(json),
                },
            )
        }
    };
    let mut state = None;
    let mut moments = None;
    let mut sharded = false;
    if let Some(dir) = &resume_dir
        && optimizer_shards::is_sharded(dir)
    {
        // Every rank reads its own ranges after building its model; rank 0 holds nothing extra.
        state = Some(read_resume_state(dir, cfg)?);
        sharded = true;
    } else if let Some(dir) = &resume_dir {
        let s = read_resume_state(dir, cfg)?;
        let states: BTreeMap<String, _> =
            checkpoint::read_optimizer(dir, &s)?.into_iter().collect();
        let steps: Vec<u64> = states.values().map(|st| st.step).collect();
        if let Some(&adam_step) = steps.first() {
            if steps.iter().any(|&x| x != adam_step) {
                return Err(TrainError::Checkpoint {
                    path: dir.clone(),
                    reason:
                        "the parameters' AdamW step counts differ; a multi-rank run keeps one count"
                            .into(),
                });
            }
            let build = |pick: &dyn Fn(&crate::optim::AdamWState) -> &Vec<f32>| {
                Qwen3Params::build(&model.config, &mut |name, shape| {
                    let n: usize = shape.iter().product();
                    let data = match states.get(&name) {
                        Some(st) if pick(st).len() == n => pick(st).clone(),
                        Some(st) => {
                            return Err(crate::model::ModelError::ParamShape {
                                name,
                                expected: shape,
                                got: vec![pick(st).len()],
                            });
                        }
                        None => vec![0.0; n],
                    };
                    Ok(Tensor::from_f32(data, &shape, &device)?)
                })
            };
            moments = Some((
                build(&|s| &s.exp_avg)?,
                build(&|s| &s.exp_avg_sq)?,
                adam_step,
            ));
        }
        state = Some(s);
    }
    let start = Start {
        config: model.config.clone(),
        resumed_from: resume_dir,
        state,
        params: model.params,
        moments,
        sharded,
    };
    Ok((start, source))
}

/// Broadcasts rank 0's start (`loaded`, or its error message) to every rank; returns the start as this rank's
/// copy. Rank 0's error comes back to it as [`TrainError::PeerFailed`] too, and is replaced by the real one by
/// the caller.
fn share_start(
    world: &dyn Communicator,
    loaded: std::result::Result<&Start, String>,
    device: Device,
) -> Result<Start> {
    let root = world.rank() == 0;
    let header = if root {
        match &loaded {
            Ok(s) => StartHeader::Ok {
                config: s.config.to_hf_json(),
                resumed_from: s.resumed_from.clone(),
                state: s.state.clone(),
                moments: s.moments.is_some(),
                sharded: s.sharded,
            },
            Err(message) => StartHeader::Failed {
                message: message.clone(),
            },
        }
    } else {
        StartHeader::Failed {
            message: String::new(),
        }
    };
    let bytes = serde_json::to_vec(&header).expect("the start header serialises");
    let bytes = broadcast_bytes(world, root.then_some(bytes))?;
    let header: StartHeader =
        serde_json::from_slice(&bytes).map_err(|e| TrainError::PeerFailed {
            rank: 0,
            phase: "sending where the run starts".into(),
            message: Some(format!("unreadable start header: {e}")),
        })?;
    let (config, resumed_from, state, has_moments, sharded) = match header {
        StartHeader::Ok {
            config,
            resumed_from,
            state,
            moments,
            sharded,
        } => (config, resumed_from, state, moments, sharded),
        StartHeader::Failed { message } => {
            return Err(TrainError::PeerFailed {
                rank: 0,
                phase: "loading the model".into(),
                message: Some(message),
            });
        }
    };
    let config = ModelConfig::from_json_value(&config, "the start header")
        .map_err(crate::model::ModelError::from)?;
    let shapes = param_shapes(&config);
    let n: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    // The weights go to the run's device; the moments stay on the host (the optimizer shards are host vectors).
    let share = |pick: &dyn Fn(&Start) -> Option<&Qwen3Params>, device: Device| -> Result<Qwen3Params> {
        let mut flat = match &loaded {
            Ok(s) if root => {
                let p = pick(s).expect("checked by the header");
                let mut v = Vec::with_capacity(n);
                for (_, t) in p.named() {
                    v.extend(t.to_vec_f32().map_err(crate::model::ModelError::from)?);
                }
                v
            }
            _ => vec![0f32; n],
        };
        if world.size() > 1 {
            world.broadcast(&mut flat, 0)?;
        }
        let mut off = 0;
        Ok(Qwen3Params::build(&config, &mut |_, shape| {
            let k: usize = shape.iter().product();
            let t = Tensor::from_f32(flat[off..off + k].to_vec(), &shape, &device)?;
            off += k;
            Ok(t)
        })?)
    };
    let params = share(&|s| Some(&s.params), device)?;
    let moments = if has_moments {
        let m = share(&|s| s.moments.as_ref().map(|(m, _, _)| m), Device::Cpu)?;
        let v = share(&|s| s.moments.as_ref().map(|(_, v, _)| v), Device::Cpu)?;
        let step = match &loaded {
            Ok(s) if root => s.moments.as_ref().map_or(0, |(_, _, k)| *k),
            _ => 0,
        };
        let mut k = [(step >> 32) as f32, (step & 0xFFFF_FFFF) as u32 as f32];
        // Two exact halves: each below 2^24 for any real step count.
        if world.size() > 1 {
            world.broadcast(&mut k, 0)?;
        }
        Some((m, v, ((k[0] as u64) << 32) | k[1] as u64))
    } else {
        None
    };
    Ok(Start {
        config,
        resumed_from,
        state,
        params,
        moments,
        sharded,
    })
}

/// Sends `bytes` from rank 0 to every rank (one byte per f32, after its length in two exact 24-bit halves).
fn broadcast_bytes(world: &dyn Communicator, bytes: Option<Vec<u8>>) -> Result<Vec<u8>> {
    if world.size() == 1 {
        return Ok(bytes.unwrap_or_default());
    }
    let len = bytes.as_ref().map_or(0, Vec::len);
    let mut head = [(len >> 24) as f32, (len & 0xFF_FFFF) as f32];
    world.broadcast(&mut head, 0)?;
    let len = ((head[0] as usize) << 24) | head[1] as usize;
    let mut buf: Vec<f32> = match &bytes {
        Some(b) => b.iter().map(|&x| x as f32).collect(),
        None => vec![0f32; len],
    };
    world.broadcast(&mut buf, 0)?;
    Ok(buf.into_iter().map(|x| x as u8).collect())
}

/// Every rank's `local` outcome of a phase, agreed on: if any rank failed, the others return
/// [`TrainError::PeerFailed`] naming the highest failed rank (each failed rank returns its own error).
fn agree<T>(world: &dyn Communicator, local: Result<T>, phase: &str) -> Result<T> {
    let mut failed = [if local.is_err() {
        world.rank() as f32 + 1.0
    } else {
        0.0
    }];
    if world.size() > 1 {
        world.all_reduce(&mut failed, ReduceOp::Max)?;
    }
    match local {
        Err(e) => Err(e),
        Ok(_) if failed[0] > 0.0 => Err(TrainError::PeerFailed {
            rank: failed[0] as usize - 1,
            phase: phase.to_string(),
            message: None,
        }),
        Ok(v) => Ok(v),
    }
}

/// A phase only rank 0 runs: its outcome broadcast (the other ranks pass `Ok`).
fn agree_from_root<T>(world: &dyn Communicator, local: Result<T>, phase: &str) -> Result<T> {
    let mut failed = [if local.is_err() { 1.0f32 } else { 0.0 }];
    if world.size() > 1 {
        world.broadcast(&mut failed, 0)?;
    }
    match local {
        Err(e) => Err(e),
        Ok(_) if failed[0] > 0.0 => Err(TrainError::PeerFailed {
            rank: 0,
            phase: phase.to_string(),
            message: None,
        }),
        Ok(v) => Ok(v),
    }
}

/// `Σ loss_weights` in f64, as [`Trainer`](super::Trainer) weighs micro-batches.
fn weight_sum(b: &Batch) -> f64 {
    b.loss_weights.iter().map(|&w| w as f64).sum()
}

/// The sequence length every micro-batch must be a multiple of: `2·cp` (CP chunks) and, with SP, enough for
/// `micro_batch_size · seq % tp == 0`.
fn seq_multiple(dims: &ParallelDims, micro_batch_size: usize) -> usize {
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let lcm = |a: usize, b: usize| a / gcd(a, b) * b;
    let mut m = if dims.cp() > 1 { 2 * dims.cp() } else { 1 };
    if dims.sp() {
        m = lcm(m, dims.tp() / gcd(dims.tp(), micro_batch_size));
    }
    m
}

/// Pads every micro-batch at the end of its rows to a multiple of `multiple` tokens (and all to the longest when
/// `same_shape`, for the pipeline), with zero-weight tokens (see the module docs).
fn pad_batches(batches: &mut [Batch], multiple: usize, same_shape: bool) {
    let round = |s: usize| s.div_ceil(multiple) * multiple;
    let longest = batches.iter().map(|b| round(b.seq)).max().unwrap_or(0);
    for b in batches.iter_mut() {
        let want = if same_shape { longest } else { round(b.seq) };
        if want != b.seq {
            *b = pad_rows(b, want);
        }
    }
}

/// `b` with every row extended to `seq` tokens: the row's last id repeated as input, target 0 with weight 0,
/// positions continuing, and (packed rows) a segment of its own.
fn pad_rows(b: &Batch, seq: usize) -> Batch {
    let extend = |v: &[u32], fill: &dyn Fn(&[u32], usize) -> u32| -> Vec<u32> {
        v.chunks(b.seq)
            .flat_map(|row| {
                let mut r = row.to_vec();
                r.extend((0..seq - b.seq).map(|k| fill(row, k)));
                r
            })
            .collect()
    };
    let last = |row: &[u32], _: usize| *row.last().expect("rows are not empty");
    Batch {
        batch: b.batch,
        seq,
        input_ids: extend(&b.input_ids, &last),
        position_ids: extend(&b.position_ids, &|row, k| {
            row.last().map_or(0, |p| p + 1 + k as u32)
        }),
        segment_ids: b
            .segment_ids
            .as_ref()
            .map(|s| extend(s, &|row, _| row.iter().max().map_or(0, |m| m + 1))),
        targets: extend(&b.targets, &|_, _| 0),
        loss_weights: b
            .loss_weights
            .chunks(b.seq)
            .flat_map(|row| {
                row.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0.0, seq - b.seq))
            })
            .collect(),
    }
}

/// One micro-batch's `(loss, ce_loss, aux_loss, gradients)` on a tp or cp/ep rank.
type MicroBatchOut = (f64, f64, Option<f64>, NamedTensors);

/// What one distributed step did (identical on every rank).
struct StepOut {
    loss: f64,
    ce_loss: f64,
    aux_loss: Option<f64>,
    grad_norm: f64,
    skipped: bool,
}

/// The model and optimizer of this rank.
enum Engine {
    Tp {
        model: Box<TpModel>,
        opt: DistributedOptimizer,
    },
    /// dp × tp (± sp) on GPUs: gradients summed on the device, AdamW on f32 masters kept on the device, replicated
    /// over dp or sharded (ZeRO-1) — [`DeviceOptimizer`]; collectives through NCCL.
    TpDevice {
        model: Box<TpModel>,
        opt: DeviceOptimizer,
    },
    /// dp × tp (± sp) × pp (× vpp) on GPUs: the pipeline's gradients stepped by a [`DeviceOptimizer`].
    PpDevice {
        model: Box<PipelineModel>,
        opt: DeviceOptimizer,
    },
    Pp {
        model: Box<PipelineModel>,
        opt: DistributedOptimizer,
    },
    CpEp {
        model: Box<CpEpModel>,
        opt: DistributedOptimizer,
    },
    /// dp × cp × ep × etp on GPUs: gradients summed on the device, reduced by the model over dp-cp / expert-dp,
    /// AdamW on device masters of the full local parameters. CP's K/V exchange still moves host vectors (cast back to
    /// the activations' dtype); EP's dispatch stays on the device.
    CpEpDevice {
        model: Box<CpEpModel>,
        opt: DeviceOptimizer,
    },
}

/// Gradients accumulated over micro-batches with weights `W_m / W`, on the host.
#[derive(Default)]
struct GradSum {
    sum: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl GradSum {
    fn add(&mut self, grads: NamedTensors, factor: f32) -> Result<()> {
        for (name, t) in grads {
            let mut data = t.to_vec_f32().map_err(crate::model::ModelError::from)?;
            if factor != 1.0 {
                data.iter_mut().for_each(|x| *x *= factor);
            }
            match self.sum.get_mut(&name) {
                Some((_, acc)) => crate::optim::accumulate(acc, &data)?,
                None => {
                    self.sum.insert(name, (t.shape().to_vec(), data));
                }
            }
        }
        Ok(())
    }

    fn finish(self, device: &Device) -> Result<NamedTensors> {
        self.sum
            .into_iter()
            .map(|(n, (shape, data))| {
                Tensor::from_f32(data, &shape, device)
                    .map(|t| (n, t))
                    .map_err(|e| crate::model::ModelError::from(e).into())
            })
            .collect()
    }
}

impl Engine {
    /// Splits `world` into the layout's groups (collective) and builds this rank's model from the full `params`.
    fn build(
        kind: EngineKind,
        world: &dyn Communicator,
        dims: ParallelDims,
        config: &ModelConfig,
        params: &Qwen3Params,
        cfg: &TrainConfig,
        zero: ZeroConfig,
    ) -> Result<Engine> {
        let rank = world.rank();
        Ok(match kind {
            EngineKind::TensorParallel => {
                let groups = ParallelGroups::new(world, &dims, config)?;
                let model = TpModel::from_full(config, params, dims, rank, groups)?
                    .with_gradient_checkpointing(cfg.gradient_checkpointing);
                if matches!(model.device(), Device::Cuda(_)) || cfg.optimizer_on_device {
                    let opt = DeviceOptimizer::for_tp(&model, zero, cfg.adam, cfg.distributed_optimizer)?;
                    Engine::TpDevice {
                        model: Box::new(model),
                        opt,
                    }
                } else {
                    let opt = DistributedOptimizer::new(zero, cfg.adam, &model)?;
                    Engine::Tp {
                        model: Box::new(model),
                        opt,
                    }
                }
            }
            EngineKind::Pipeline => {
                let groups = PipelineGroups::new(world, &dims, config)?;
                let model = PipelineModel::from_full(config, params, dims, rank, groups)?
                    .with_gradient_checkpointing(cfg.gradient_checkpointing);
                if matches!(model.device(), Device::Cuda(_)) || cfg.optimizer_on_device {
                    let opt = DeviceOptimizer::for_pipeline(&model, zero, cfg.adam, cfg.distributed_optimizer)?;
                    Engine::PpDevice {
                        model: Box::new(model),
                        opt,
                    }
                } else {
                    let opt = model.optimizer(zero, cfg.adam)?;
                    Engine::Pp {
                        model: Box::new(model),
                        opt,
                    }
                }
            }
            EngineKind::ContextExpert => {
                if cfg.gradient_checkpointing && rank == 0 {
                    tracing::warn!(
                        "gradient_checkpointing: the cp/ep model keeps every activation (no recomputation); \
                         the gradients are the same"
                    );
                }
                let groups = CpEpGroups::new(world, &dims)?;
                let model = CpEpModel::from_full(config, params, dims, rank, groups)?;
                if matches!(model.device(), Device::Cuda(_)) || cfg.optimizer_on_device {
                    let opt = DeviceOptimizer::for_cp_ep(&model, zero, cfg.adam)?;
                    Engine::CpEpDevice {
                        model: Box::new(model),
                        opt,
                    }
                } else {
                    let opt = model.optimizer(zero, cfg.adam)?;
                    Engine::CpEp {
                        model: Box::new(model),
                        opt,
                    }
                }
            }
        })
    }

    /// Gives the optimizer the full-layout moments `m`, `v` sliced like this rank's parameters.
    fn restore_moments(&mut self, m: &Qwen3Params, v: &Qwen3Params, adam_step: u64) -> Result<()> {
        match self {
            Engine::Tp { model, opt } => {
                let (lm, lv) = (model.local_from_full(m)?, model.local_from_full(v)?);
                opt.restore_moments(&lm.to_named(), &lv.to_named(), adam_step)?;
            }
            Engine::TpDevice { model, opt } => {
                let (lm, lv) = (model.local_from_full(m)?, model.local_from_full(v)?);
                opt.restore_moments(lm.to_named(), lv.to_named(), adam_step)?;
            }
            Engine::PpDevice { model, opt } => {
                let (lm, lv) = (model.local_from_full(m)?, model.local_from_full(v)?);
                opt.restore_moments(lm.to_named(), lv.to_named(), adam_step)?;
            }
            Engine::Pp { model, opt } => {
                let (lm, lv) = (model.local_from_full(m)?, model.local_from_full(v)?);
                opt.restore_moments(&lm.to_named(), &lv.to_named(), adam_step)?;
            }
            Engine::CpEp { model, opt } => {
                let (lm, lv) = (model.local_from_full(m)?, model.local_from_full(v)?);
                opt.restore_moments(&lm.to_named(), &lv.to_named(), adam_step)?;
            }
            Engine::CpEpDevice { model, opt } => {
                let (lm, lv) = (model.local_from_full(m)?, model.local_from_full(v)?);
                opt.restore_moments(lm.to_named(), lv.to_named(), adam_step)?;
            }
        }
        Ok(())
    }

    /// One optimizer step over the global micro-batches `batches` (weights `weights`, `Σ > 0`). Collective.
    fn step(&mut self, batches: &[Batch], weights: &[f64], lr: f64) -> Result<StepOut> {
        let total: f64 = weights.iter().sum();
        let mut out = StepOut {
            loss: 0.0,
            ce_loss: 0.0,
            aux_loss: None,
            grad_norm: 0.0,
            skipped: false,
        };
        let mut add_loss = |frac: f64, loss: f64, ce: f64, aux: Option<f64>| {
            out.loss += frac * loss;
            out.ce_loss += frac * ce;
            if let Some(a) = aux {
                *out.aux_loss.get_or_insert(0.0) += frac * a;
            }
        };
        // The gradient sum of a tp or cp/ep rank's micro-batches: `Σ_m (W_m/W)·g_m`, on the host (GradSum, the host
        // engines) or on the gradients' device.
        let mut micro = |fb: &mut dyn FnMut(&Batch) -> Result<MicroBatchOut>,
                         on_device: bool,
                         device: Device|
         -> Result<NamedTensors> {
            let (mut host, mut dev) = (GradSum::default(), NamedTensors::new());
            for (b, &w) in batches.iter().zip(weights) {
                if w == 0.0 {
                    continue; // contributes nothing to a token-weighted loss (as in Trainer)
                }
                let (loss, ce, aux, grads) = fb(b)?;
                let frac = w / total;
                add_loss(frac, loss, ce, aux);
                if on_device {
                    crate::optim::accumulate_scaled(&mut dev, grads, frac as f32)
                        .map_err(crate::model::ModelError::from)?;
                } else {
                    host.add(grads, frac as f32)?;
                }
            }
            if on_device { Ok(dev) } else { host.finish(&device) }
        };
        let on_device = matches!(self, Engine::TpDevice { .. } | Engine::CpEpDevice { .. });
        let stats = match self {
            Engine::Tp { model, .. } | Engine::TpDevice { model, .. } => {
                let (dims, dp_rank) = (*model.dims(), model.dp_rank());
                let grads = micro(
                    &mut |b| {
                        let o = model.forward_backward(&split_batch_rows(b, dims.dp(), dp_rank)?)?;
                        Ok((o.loss, o.ce_loss, o.aux_loss, o.grads))
                    },
                    on_device,
                    model.device(),
                )?;
                match self {
                    Engine::Tp { model, opt } => opt.step(model, &grads, lr)?,
                    Engine::TpDevice { model, opt } => opt.step_tp(model, grads, lr)?,
                    _ => unreachable!("matched above"),
                }
            }
            Engine::PpDevice { model, opt } => {
                let o = pipeline_forward_backward(model, batches)?;
                add_loss(1.0, o.loss, o.ce_loss, o.aux_loss);
                opt.step_pipeline(model, o.grads, lr)?
            }
            Engine::Pp { model, opt } => {
                let o = pipeline_forward_backward(model, batches)?;
                add_loss(1.0, o.loss, o.ce_loss, o.aux_loss);
                model.step(opt, &o.grads, lr)?
            }
            Engine::CpEp { model, .. } | Engine::CpEpDevice { model, .. } => {
                let grads = micro(
                    &mut |b| {
                        let o = model.forward_backward(&model.local_batch(b)?)?;
                        Ok((o.loss, o.ce_loss, o.aux_loss, o.grads))
                    },
                    on_device,
                    model.device(),
                )?;
                match self {
                    Engine::CpEp { model, opt } => model.step(opt, &grads, lr)?,
                    Engine::CpEpDevice { model, opt } => opt.step_cp_ep(model, &grads, lr)?,
                    _ => unreachable!("matched above"),
                }
            }
        };
        out.grad_norm = stats.grad_norm;
        out.skipped = stats.skipped;
        Ok(out)
    }

    /// AdamW steps taken (the checkpoint's `adam_step`).
    fn adam_steps(&self) -> u64 {
        match self {
            Engine::TpDevice { opt, .. } | Engine::PpDevice { opt, .. } | Engine::CpEpDevice { opt, .. } => {
                opt.steps()
            }
            Engine::Tp { opt, .. } | Engine::Pp { opt, .. } | Engine::CpEp { opt, .. } => opt.steps(),
        }
    }

    /// Restores this rank's optimizer state from a sharded checkpoint: its ZeRO shard, or every local parameter
    /// whole for the device optimizer (whose masters are already the checkpoint's weights).
    fn restore_shards(&mut self, shards: &ShardedOptimizer, map: &GlobalMap) -> Result<()> {
        match self {
            Engine::Tp { opt, .. } | Engine::Pp { opt, .. } | Engine::CpEp { opt, .. } => {
                let vals = shards.read_shard(opt, map)?;
                opt.restore_shard(&vals.master, &vals.exp_avg, &vals.exp_avg_sq, shards.adam_step())?;
            }
            Engine::TpDevice { model, opt } => opt.restore_shards(&model.params, shards, map)?,
            Engine::PpDevice { model, opt } => opt.restore_shards(&model.params, shards, map)?,
            Engine::CpEpDevice { model, opt } => opt.restore_shards(&model.params, shards, map)?,
        }
        Ok(())
    }

    /// Writes this rank's optimizer shard into the temporary checkpoint `tmp` (see the module docs).
    fn write_optimizer_shard(&self, tmp: &std::path::Path, rank: usize, map: &GlobalMap) -> Result<()> {
        match self {
            Engine::Tp { opt, .. } | Engine::Pp { opt, .. } | Engine::CpEp { opt, .. } => {
                optimizer_shards::write_shard(tmp, rank, opt, map, &|n| self.owns(n))?;
            }
            Engine::TpDevice { model, opt } => opt.write_shard(&model.params, &|n| self.owns(n), tmp, rank, map)?,
            Engine::PpDevice { model, opt } => opt.write_shard(&model.params, &|n| self.owns(n), tmp, rank, map)?,
            Engine::CpEpDevice { model, opt } => opt.write_shard(&model.params, &|n| self.owns(n), tmp, rank, map)?,
        }
        Ok(())
    }

    /// Does this rank write the optimizer state of its local parameter `name` (its ZeRO pieces of it)? The rank
    /// that counts it in the global norm: each element of the model on exactly one rank.
    fn owns(&self, name: &str) -> bool {
        match self {
            Engine::Tp { model, .. } => model.counts_in_norm(name),
            Engine::TpDevice { model, opt } => opt.writes(model.counts_in_norm(name), model.dp_rank()),
            Engine::PpDevice { model, opt } => opt.writes(model.counts_in_norm(name), model.dp_rank()),
            Engine::Pp { model, .. } => model.counts_in_norm(name),
            Engine::CpEp { model, .. } | Engine::CpEpDevice { model, .. } => model.counts_in_norm(name),
        }
    }

    /// Where this rank's local parameters sit in the full ones ([`GlobalMap::measure`] through the model's own
    /// `local_from_full`). No communication.
    fn measure_map(&self, config: &ModelConfig) -> Result<GlobalMap> {
        let values =
            |visit: &dyn Fn(&mut dyn FnMut(String, &Tensor))| -> Result<Vec<(String, Vec<f32>)>> {
                let mut out = Vec::new();
                let mut err = None;
                visit(&mut |n, t| match t.to_vec_f32() {
                    Ok(v) => out.push((n, v)),
                    Err(e) => {
                        err.get_or_insert(e);
                    }
                });
                match err {
                    Some(e) => Err(crate::model::ModelError::from(e).into()),
                    None => Ok(out),
                }
            };
        GlobalMap::measure(config, &|full| match self {
            Engine::Tp { model, .. } | Engine::TpDevice { model, .. } => {
                let l = model.local_from_full(full)?;
                values(&|f| l.visit_params(f))
            }
            Engine::Pp { model, .. } | Engine::PpDevice { model, .. } => {
                let l = model.local_from_full(full)?;
                values(&|f| l.visit_params(f))
            }
            Engine::CpEp { model, .. } | Engine::CpEpDevice { model, .. } => {
                let l = model.local_from_full(full)?;
                values(&|f| l.visit_params(f))
            }
        })
    }

    /// Casts this rank's weights to `dtype` (the masters stay f32 in the optimizer). No communication.
    fn cast_params(&mut self, dtype: qkernels::DType) -> Result<()> {
        use crate::zero::ParamSet;
        let r = match self {
            Engine::Tp { model, .. } | Engine::TpDevice { model, .. } => model.params.cast_params(dtype),
            Engine::Pp { model, .. } | Engine::PpDevice { model, .. } => model.params.cast_params(dtype),
            Engine::CpEp { model, .. } | Engine::CpEpDevice { model, .. } => model.params.cast_params(dtype),
        };
        r.map_err(|e| crate::model::ModelError::from(e).into())
    }

    /// The full weights in f32 (collective over every group that splits the model; with bf16 compute weights
    /// the f32 masters, all-gathered over dp first).
    fn gather_params(&self) -> Result<Qwen3Params> {
        Ok(match self {
            Engine::Tp { model, opt } if model.params.embed_tokens.dtype() != qkernels::DType::F32 => {
                let mut local = model.params.clone();
                opt.masters_into(&mut local, model.optimizer_dp())?;
                model.gather_full(&local)?
            }
            Engine::Tp { model, .. } => model.gather_full_params()?,
            // The f32 masters, laid out like the (maybe bf16) weights.
            Engine::TpDevice { model, opt } => {
                model.gather_full(&opt.with_masters(model.params.clone(), model.optimizer_dp())?)?
            }
            Engine::PpDevice { model, opt } => {
                model.gather_full(&opt.with_masters(model.params.clone(), &*model.groups().stage.dp)?)?
            }
            Engine::Pp { model, .. } => model.gather_full_params()?,
            Engine::CpEp { model, .. } => model.gather_full_params()?,
            Engine::CpEpDevice { model, opt } => {
                model.gather_full(&opt.with_masters(model.params.clone(), &*model.groups().experts.solo)?)?
            }
        })
    }

    /// Saves `checkpoint-<step>` (see the module docs). Collective: the weights are gathered; rank 0 writes the
    /// model, the trainer state and the optimizer index into the temporary directory and sends its path; every
    /// rank writes its optimizer shard there; once all succeeded rank 0 renames it. Every outcome is agreed on.
    /// Returns the committed directory on every rank.
    fn save(
        &self,
        world: &dyn Communicator,
        map: &GlobalMap,
        req: &SaveRequest<'_>,
        step: u64,
        skipped_steps: u64,
    ) -> Result<PathBuf> {
        let params = self.gather_params()?;
        let adam_step = self.adam_steps();
        let root = world.rank() == 0;
        let phase = format!("writing checkpoint-{step}");
        // 1. Rank 0: model, trainer state, optimizer index.
        let prepared = if root {
            (|| -> Result<PathBuf> {
                let host = params.to_host()?;
                let mut parts = CheckpointParts {
                    step,
                    skipped_steps,
                    moments: TensorMap::new(),
                    adam_steps: BTreeMap::new(),
                };
                // No AdamW step taken yet (every step skipped): no moments, as the single-rank trainer saves.
                if adam_step > 0 {
                    for (name, _) in &map.params {
                        parts.adam_steps.insert(name.clone(), adam_step);
                    }
                }
                let tmp = checkpoint::prepare(
                    req,
                    &parts,
                    &|tmp, opts| {
                        hf::save_checkpoint(tmp, &host, opts)?;
                        Ok(())
                    },
                    false,
                )?;
                if adam_step > 0
                    && let Err(e) =
                        optimizer_shards::write_index(&tmp, &map.params, adam_step, world.size())
                {
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(e);
                }
                Ok(tmp)
            })()
        } else {
            Ok(PathBuf::new())
        };
        drop(params);
        let tmp = agree_from_root(world, prepared, &phase)?;
        let tmp = broadcast_bytes(
            world,
            root.then(|| tmp.to_string_lossy().into_owned().into_bytes()),
        )?;
        let tmp = PathBuf::from(String::from_utf8_lossy(&tmp).into_owned());
        // 2. Every rank: its own optimizer shard.
        let wrote = if adam_step > 0 {
            self.write_optimizer_shard(&tmp, world.rank(), map)
        } else {
            Ok(())
        };
        if let Err(e) = agree(world, wrote, &phase) {
            if root {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            return Err(e);
        }
        // 3. Rank 0 commits.
        let committed = if root {
            checkpoint::finish(req, &tmp, step)
        } else {
            Ok(checkpoint::checkpoint_dir(req.output_dir, step))
        };
        agree_from_root(world, committed, &phase)
    }
}

/// The pipeline's forward and backward over this dp rank's rows of the global micro-batches `batches`.
fn pipeline_forward_backward(
    model: &PipelineModel,
    batches: &[Batch],
) -> Result<crate::pipeline::PpStepOutput> {
    let dims = *model.dims();
    let mbs = batches
        .iter()
        .map(|b| split_batch_rows(b, dims.dp(), model.dp_rank()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(model.forward_backward(&mbs)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_keeps_rows_and_weights() {
        let b = Batch::packed(vec![5, 6, 7, 8, 9, 10], vec![0, 0, 1, 0, 1, 1], 2, 3).unwrap();
        let p = pad_rows(&b, 5);
        assert_eq!((p.batch, p.seq), (2, 5));
        assert_eq!(p.input_ids, vec![5, 6, 7, 7, 7, 8, 9, 10, 10, 10]);
        assert_eq!(
            p.segment_ids.as_deref(),
            Some(&[0, 0, 1, 2, 2, 0, 1, 1, 2, 2][..])
        );
        assert_eq!(p.position_ids, vec![0, 1, 0, 1, 2, 0, 0, 1, 2, 3]);
        assert_eq!(weight_sum(&p), weight_sum(&b));
        assert_eq!(&p.loss_weights[3..5], &[0.0, 0.0]);
    }

    #[test]
    fn sequence_multiple_of_the_layout() {
        let d = |world, cfg| ParallelDims::new(world, cfg).unwrap();
        use crate::dims::ParallelConfig as C;
        assert_eq!(seq_multiple(&d(2, C::default()), 1), 1);
        assert_eq!(
            seq_multiple(
                &d(
                    2,
                    C {
                        cp: 2,
                        ..C::default()
                    }
                ),
                1
            ),
            4
        );
        let sp = C {
            tp: 4,
            sp: true,
            ..C::default()
        };
        assert_eq!(seq_multiple(&d(4, sp), 1), 4);
        assert_eq!(seq_multiple(&d(4, sp), 2), 2);
        assert_eq!(seq_multiple(&d(4, sp), 4), 1);
    }

    #[test]
    fn layouts_without_a_model_are_refused() {
        use crate::dims::ParallelConfig as C;
        let d = |cfg| ParallelDims::new(4, cfg).unwrap();
        assert_eq!(
            EngineKind::for_dims(&d(C {
                tp: 2,
                ..C::default()
            }))
            .unwrap(),
            EngineKind::TensorParallel
        );
        assert_eq!(
            EngineKind::for_dims(&d(C {
                pp: 2,
                ..C::default()
            }))
            .unwrap(),
            EngineKind::Pipeline
        );
        assert_eq!(
            EngineKind::for_dims(&d(C {
                ep: 2,
                ..C::default()
            }))
            .unwrap(),
            EngineKind::ContextExpert
        );
        let e = EngineKind::for_dims(&d(C {
            tp: 2,
            cp: 2,
            ..C::default()
        }))
        .unwrap_err()
        .to_string();
        assert!(e.contains("cp = 2") && e.contains("tp = 2"), "{e}");
    }
}
