//! Training checkpoints: an HF model directory plus the optimizer and trainer state, committed atomically.
//!
//! # Layout
//!
//! ```text
//! <output_dir>/checkpoint-<step>/
//!   config.json, model.safetensors (or shards + index)   HF layout, F32: transformers / vLLM / qctl load it
//!   tokenizer.json, tokenizer_config.json, …              copied from the source model directory
//!   optimizer.safetensors                                 F32 `exp_avg.<name>`, `exp_avg_sq.<name>` per parameter
//!   trainer_state.json                                    TrainerState: step, data cursor, seed, AdamW steps, …
//! ```
//!
//! A LoRA run ([`Trainer::new_lora`]) saves the adapters in PEFT's format instead of the model (the base stays where
//! it is, unchanged):
//!
//! ```text
//! <output_dir>/checkpoint-<step>/
//!   adapter_config.json                peft_type LORA, r, lora_alpha, target_modules, base_model_name_or_path =
//!                                      the absolute base model directory, …  (see crate::lora)
//!   adapter_model.safetensors          F32 base_model.model.<module>.lora_A.weight [r, in], ….lora_B.weight [out, r]
//!   tokenizer.json, tokenizer_config.json, …   copied from the base model directory
//!   optimizer.safetensors              as above, for the adapter factors (`exp_avg.<PEFT key>`, …)
//!   trainer_state.json                 as above
//! ```
//!
//! A multi-rank run ([`super::distributed`]) writes the same model files and `trainer_state.json` (global rank 0,
//! the weights gathered), but instead of `optimizer.safetensors` an `optimizer/` directory in which every rank
//! stores only the optimizer state it owns (fp32 master weights and moments) under global offsets into the full
//! parameters ([`super::optimizer_shards`]). Neither format says anything about the layout that wrote it: any
//! layout (or one process) resumes from either; [`read_optimizer`] reads both.
//!
//! # Commit protocol
//!
//! Everything is written into the hidden sibling `.checkpoint-<step>.tmp-<pid>-trainer` (the model part through
//! [`hf::save_checkpoint`], itself atomic), every file is fsynced, then that directory is renamed to
//! `checkpoint-<step>` and the parent fsynced. So a directory named `checkpoint-<step>` is always complete;
//! a crash leaves only a hidden temp dir that [`hf::remove_stale_temp_dirs`] deletes at the next start.
//! [`find_latest_checkpoint`] additionally requires `trainer_state.json` to parse.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Result, TrainError, Trainer, io_err, optimizer_shards};
use crate::data::DataCursor;
use crate::hf::{self, DiskDtype, HostTensor, SaveOptions, TensorMap};
use crate::lora;
use crate::optim::AdamWState;

/// Name prefix of committed checkpoints: `checkpoint-<step>`.
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";
/// The optimizer moments inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The [`TrainerState`] inside a checkpoint.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";

/// Version of the [`TrainerState`] format.
pub const TRAINER_STATE_VERSION: u32 = 1;

/// `trainer_state.json`: everything besides weights and moments that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format_version: u32,
    /// Optimizer steps taken.
    pub step: u64,
    /// Steps skipped for a non-finite gradient norm.
    pub skipped_steps: u64,
    /// AdamW step count per parameter (equal to `step - skipped_steps` for all of them today).
    pub adam_steps: BTreeMap<String, u64>,
    /// The next sequence the data loader hands out.
    pub data_cursor: DataCursor,
    /// The seed of the data order (and of random init); a resumed run must use the same one.
    pub seed: u64,
    /// Tokens (`batch · seq`) trained on so far.
    pub total_tokens: u64,
    pub max_length: usize,
    pub global_batch_size: usize,
}

/// f32 safetensors, one `View` per tensor.
struct F32View<'a>(&'a HostTensor);

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.0.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.0.data.len() * 4
    }
}

/// Writes `tensors` as one F32 safetensors file and fsyncs it (not atomic by itself).
pub fn write_f32_safetensors(path: &Path, tensors: &TensorMap) -> Result<()> {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(
        tensors.iter().map(|(k, v)| (k.as_str(), F32View(v))),
        Some(meta),
        path,
    )
    .map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("cannot write: {e}"),
    })?;
    fsync(path)
}

fn fsync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))
}

/// The committed checkpoint directory of `step`.
pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("{CHECKPOINT_PREFIX}{step}"))
}

/// What [`save`] needs besides the trainer.
pub struct SaveRequest<'a> {
    pub output_dir: &'a Path,
    /// Copy `config.json` (when `config` is `None`) and tokenizer files from here. LoRA: the base model directory
    /// (required): `adapter_config.json` names it, its tokenizer files are copied.
    pub source_dir: Option<&'a Path>,
    /// `config.json` content; `None`: the source dir's.
    pub config: Option<serde_json::Value>,
    pub data_cursor: DataCursor,
    pub seed: u64,
    pub total_tokens: u64,
    pub max_length: usize,
    pub global_batch_size: usize,
}

/// Saves `trainer` as `checkpoint-<iteration>` under `req.output_dir` (see the module docs); returns its path.
pub fn save(trainer: &Trainer, req: &SaveRequest<'_>) -> Result<PathBuf> {
    if !trainer.host_state_current() {
        return Err(TrainError::Invalid {
            key: "checkpoint",
            reason: "the optimizer state on the device was not copied to the host (Trainer::sync_host_state)"
                .into(),
        });
    }
    let mut moments = TensorMap::new();
    let mut adam_steps = BTreeMap::new();
    for (name, st) in trainer.optimizer().states() {
        let shape = trainer.master()[name].shape.clone();
        moments.insert(
            format!("exp_avg.{name}"),
            HostTensor::new(shape.clone(), st.exp_avg.clone()).expect("state length checked"),
        );
        moments.insert(
            format!("exp_avg_sq.{name}"),
            HostTensor::new(shape, st.exp_avg_sq.clone()).expect("state length checked"),
        );
        adam_steps.insert(name.clone(), st.step);
    }
    let parts = CheckpointParts {
        step: trainer.iteration(),
        skipped_steps: trainer.skipped_steps(),
        moments,
        adam_steps,
    };
    commit(req, &parts, &|tmp: &Path, opts: &SaveOptions| {
        match (trainer.lora_config(), trainer.adapters()) {
            (Some(config), Some(adapters)) => {
                let base = req.source_dir.ok_or_else(|| TrainError::Invalid {
                    key: "lora",
                    reason:
                        "a LoRA checkpoint needs the base model directory (SaveRequest::source_dir)"
                            .into(),
                })?;
                std::fs::create_dir(tmp).map_err(io_err(tmp))?;
                lora::write_adapter_files(tmp, config, &adapters, base)?;
            }
            _ => {
                hf::save_checkpoint(tmp, trainer.master(), opts)?;
            }
        }
        Ok(())
    })
}

/// Everything of a full-training checkpoint besides the model files: what [`commit`] writes next to them.
pub(crate) struct CheckpointParts {
    /// Optimizer steps taken (the directory is `checkpoint-<step>`).
    pub step: u64,
    pub skipped_steps: u64,
    /// `exp_avg.<name>` / `exp_avg_sq.<name>` with the parameter's full (HF) shape.
    pub moments: TensorMap,
    /// AdamW steps per parameter name.
    pub adam_steps: BTreeMap<String, u64>,
}

/// Writes a checkpoint directory: `write_model(tmp, opts)` puts the model files into the (not yet existing)
/// temporary directory `tmp` (creating it), then the optimizer moments and the trainer state are added, every file
/// is fsynced and `tmp` is renamed to `checkpoint-<step>` (see the module docs). Returns the committed path.
pub(crate) fn commit(
    req: &SaveRequest<'_>,
    parts: &CheckpointParts,
    write_model: &dyn Fn(&Path, &SaveOptions) -> Result<()>,
) -> Result<PathBuf> {
    let tmp = prepare(req, parts, write_model, true)?;
    finish(req, &tmp, parts.step)
}

/// The first half of [`commit`]: the temporary directory with the model files, `optimizer.safetensors` (when
/// `moments_file`) and `trainer_state.json`, all fsynced. Returns its path; on an error it is removed. A multi-rank
/// save adds the ranks' optimizer shards to it before [`finish`].
pub(crate) fn prepare(
    req: &SaveRequest<'_>,
    parts: &CheckpointParts,
    write_model: &dyn Fn(&Path, &SaveOptions) -> Result<()>,
    moments_file: bool,
) -> Result<PathBuf> {
    let step = parts.step;
    let final_dir = checkpoint_dir(req.output_dir, step);
    if final_dir.exists() {
        return Err(TrainError::Checkpoint {
            path: final_dir,
            reason: "already exists; a committed checkpoint is never overwritten".into(),
        });
    }
    let tmp = req.output_dir.join(format!(
        ".{CHECKPOINT_PREFIX}{step}.tmp-{}-trainer",
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    let mut opts = SaveOptions::new(DiskDtype::F32);
    if let Some(src) = req.source_dir {
        opts = opts.source_dir(src);
    }
    if let Some(c) = &req.config {
        opts = opts.config(c.clone());
    }
    let result = (|| {
        write_model(&tmp, &opts)?;
        if moments_file {
            write_f32_safetensors(&tmp.join(OPTIMIZER_FILE), &parts.moments)?;
        }
        let state = TrainerState {
            format_version: TRAINER_STATE_VERSION,
            step,
            skipped_steps: parts.skipped_steps,
            adam_steps: parts.adam_steps.clone(),
            data_cursor: req.data_cursor,
            seed: req.seed,
            total_tokens: req.total_tokens,
            max_length: req.max_length,
            global_batch_size: req.global_batch_size,
        };
        let path = tmp.join(TRAINER_STATE_FILE);
        let text = serde_json::to_string_pretty(&state).expect("state serialises") + "\n";
        std::fs::write(&path, text).map_err(io_err(&path))?;
        fsync(&path)
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// The second half of [`commit`]: fsyncs `tmp` (and its `optimizer/` directory, if any) and renames it to
/// `checkpoint-<step>`, then fsyncs the parent. On an error `tmp` is removed. Returns the committed path.
pub(crate) fn finish(req: &SaveRequest<'_>, tmp: &Path, step: u64) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(req.output_dir, step);
    let result = (|| {
        let shards = tmp.join(optimizer_shards::OPTIMIZER_DIR);
        if shards.is_dir() {
            fsync(&shards)?;
        }
        fsync(tmp)?;
        std::fs::rename(tmp, &final_dir).map_err(io_err(&final_dir))?;
        fsync(req.output_dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(tmp);
    }
    result.map(|_| final_dir)
}

/// Reads and checks `dir/trainer_state.json`.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(TRAINER_STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: path.clone(),
        reason: format!("not a trainer state: {e}"),
    })?;
    if state.format_version != TRAINER_STATE_VERSION {
        return Err(TrainError::Checkpoint {
            path,
            reason: format!(
                "format_version {} (this build reads {TRAINER_STATE_VERSION})",
                state.format_version
            ),
        });
    }
    Ok(state)
}

/// Reads the optimizer state of `dir` into full per-parameter AdamW states, with the step counts of `state`:
/// `optimizer.safetensors`, or a multi-rank run's `optimizer/` shards reassembled
/// ([`optimizer_shards::read_full_states`]).
pub fn read_optimizer(dir: &Path, state: &TrainerState) -> Result<Vec<(String, AdamWState)>> {
    if optimizer_shards::is_sharded(dir) {
        return optimizer_shards::read_full_states(dir, &state.adam_steps);
    }
    let path = dir.join(OPTIMIZER_FILE);
    let mut tensors = hf::load_file(&path)?;
    let mut out = Vec::with_capacity(state.adam_steps.len());
    for (name, &step) in &state.adam_steps {
        let mut take = |key: String| {
            tensors
                .remove(&key)
                .map(|t| t.data)
                .ok_or_else(|| TrainError::Checkpoint {
                    path: path.clone(),
                    reason: format!("no tensor `{key}`"),
                })
        };
        let exp_avg = take(format!("exp_avg.{name}"))?;
        let exp_avg_sq = take(format!("exp_avg_sq.{name}"))?;
        out.push((
            name.clone(),
            AdamWState {
                step,
                exp_avg,
                exp_avg_sq,
            },
        ));
    }
    if let Some(extra) = tensors.keys().next() {
        return Err(TrainError::Checkpoint {
            path,
            reason: format!("tensor `{extra}` has no entry in {TRAINER_STATE_FILE}'s adam_steps"),
        });
    }
    Ok(out)
}

/// Committed checkpoints `(step, dir)` in `output_dir`, ascending by step (directories named
/// `checkpoint-<step>` that hold a `trainer_state.json`).
pub fn list_checkpoints(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(output_dir)(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(output_dir))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix(CHECKPOINT_PREFIX))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        if dir.join(TRAINER_STATE_FILE).is_file() {
            found.push((step, dir));
        }
    }
    found.sort();
    Ok(found)
}

/// The newest committed checkpoint in `output_dir` whose trainer state parses, if any.
pub fn find_latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    for (_, dir) in list_checkpoints(output_dir)?.into_iter().rev() {
        match read_state(&dir) {
            Ok(_) => return Ok(Some(dir)),
            Err(e) => tracing::warn!("skipping checkpoint {}: {e}", dir.display()),
        }
    }
    Ok(None)
}
