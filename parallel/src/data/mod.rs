//! Training data: plain-text pretraining JSONL turned into fixed-length token sequences ([`pretrain`]), chat
//! datasets for supervised fine-tuning ([`sft`]), and the seeded, resumable loader over either ([`loader`]).
//!
//! # Pretraining pipeline
//!
//! ```text
//! JSONL lines ── {"text": "…"}  → tokenizer.json (no special tokens) + EOS ─┐
//!            └── {"input_ids": [..]} (taken as is, no EOS added) ──────────┴─► one token stream (file order,
//!                                                                            line order) ── cut every
//!                                                                            max_length tokens ── sequences
//! ```
//!
//! # SFT pipeline (see [`sft`])
//!
//! ```text
//! datasets (JSONL / JSON / CSV / self-cognition, `#N`) ── rows → conversations ── sample, mix, shuffle ──
//!   chat template → text ── tokens + loss weights (loss_scale) ── truncation ── samples [─ packing ─ rows]
//! ```
//!
//! # Invariants
//!
//! - A pretraining sequence has exactly `max_length` tokens, all `< vocab_size`; the tail of the stream shorter
//!   than `max_length` is dropped (a corpus with fewer than `max_length` tokens is an error).
//! - The loader hands out *units* of a [`Dataset`]: pretraining sequences, SFT samples, or packed SFT rows.
//!   The order of units in epoch `e` is a permutation of `0..len` that depends only on `(seed, e)`
//!   ([`epoch_order`], a Fisher–Yates shuffle driven by splitmix64 — our own generator, so the order never
//!   changes with a dependency upgrade), or `0..len` for an unshuffled SFT dataset.
//! - A [`DataCursor`] `{epoch, position}` names the next unit to hand out; a loader rebuilt from the same
//!   dataset, seed and cursor yields exactly the batches the original one would have yielded next. That is
//!   what a checkpoint saves to resume bit-exactly. Loading a dataset is deterministic in its inputs and the
//!   seed, so a resumed run rebuilds the same units.
//! - Every bad line is reported with its file and 1-based line number ([`DataError::Line`]); blank lines are
//!   skipped. In lenient SFT mode bad rows are skipped but counted per file ([`SftReport`]).
//! - Tokenizer files are read through [`qtext::TextCodec`] (one loader and one EOS resolution for training
//!   and serving).

mod loader;
mod pretrain;
pub mod sft;

pub use loader::{DataCursor, DataLoader, Dataset, TrainDataset, epoch_order};
pub use pretrain::{LoadOptions, PretrainDataset};
pub use qtext::TextCodec;
pub use sft::{
    Conversation, LossScale, LossScaleBase, SftDataset, SftLoadOptions, SftOptions, SftReport,
    SftSample, SourceReport, Truncation,
};

use std::path::{Path, PathBuf};

/// Errors of the data pipeline; each names the file (and line) at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line (JSONL), element (JSON array, by the line it starts on) or row (CSV) that cannot be used.
    #[error("{}:{line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// The tokenizer files are missing or unusable for this data.
    #[error("{}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    /// Loading the tokenizer or rendering text failed.
    #[error(transparent)]
    Text(#[from] qtext::TextError),
    /// The corpus does not fill one sequence.
    #[error("the dataset has {tokens} tokens, fewer than one sequence of max_length {max_length}")]
    TooSmall { tokens: usize, max_length: usize },
    /// A setting the pipeline cannot work with.
    #[error("invalid data setting `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Result alias of the data pipeline.
pub type Result<T> = std::result::Result<T, DataError>;

/// What [`load_train_data`] needs besides the dataset list.
#[derive(Debug, Clone)]
pub struct TrainDataOptions<'a> {
    /// Tokens per sequence / longest sample.
    pub max_length: usize,
    /// Every id must be below this (the model's `vocab_size`).
    pub vocab_size: usize,
    /// Directory with `tokenizer.json` (and `tokenizer_config.json` with the chat template for SFT).
    pub tokenizer_dir: Option<&'a Path>,
    /// Seed of sampling and shuffling (SFT); the loader's epoch order uses it too.
    pub seed: u64,
    /// `None`: pretraining data; `Some`: SFT data with these options.
    pub sft: Option<&'a SftOptions>,
}

/// Loads the training data of a run: pretraining sequences when `opts.sft` is `None`, SFT samples otherwise,
/// logging (`tracing::info`) what was loaded, truncated, dropped and skipped.
pub fn load_train_data(datasets: &[PathBuf], opts: &TrainDataOptions<'_>) -> Result<TrainDataset> {
    match opts.sft {
        None => {
            let ds = PretrainDataset::load(
                datasets,
                &LoadOptions {
                    max_length: opts.max_length,
                    vocab_size: opts.vocab_size,
                    tokenizer_dir: opts.tokenizer_dir.map(Path::to_path_buf),
                },
            )?;
            tracing::info!(
                sequences = ds.len(),
                stream_tokens = ds.stream_tokens(),
                max_length = ds.max_length(),
                "pretraining data loaded"
            );
            Ok(TrainDataset::Pretrain(ds))
        }
        Some(sft) => {
            let dir = opts.tokenizer_dir.ok_or_else(|| DataError::Invalid {
                key: "tokenizer",
                reason:
                    "SFT data is rendered with the model's chat template and tokenizer, and no \
                         tokenizer directory is known"
                        .into(),
            })?;
            let codec = TextCodec::from_dir(dir)?;
            let (ds, report) = SftDataset::load(
                datasets,
                &codec,
                &SftLoadOptions {
                    sft,
                    max_length: opts.max_length,
                    vocab_size: opts.vocab_size,
                    seed: opts.seed,
                },
            )?;
            for f in report.sources.iter().filter(|f| f.skipped > 0) {
                tracing::warn!("{f}");
            }
            tracing::info!("SFT data loaded: {report}");
            Ok(TrainDataset::Sft(ds))
        }
    }
}
