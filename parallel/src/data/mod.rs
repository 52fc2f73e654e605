//! Training data: plain-text pretraining JSONL turned into fixed-length token sequences, in a seeded order
//! with a resumable cursor.
//!
//! # Pipeline
//!
//! ```text
//! JSONL lines ── {"text": "…"}  → tokenizer.json (no special tokens) + EOS ─┐
//!            └── {"input_ids": [..]} (taken as is, no EOS added) ──────────┴─► one token stream (file order,
//!                                                                            line order) ── cut every
//!                                                                            max_length tokens ── sequences
//! ```
//!
//! # Invariants
//!
//! - Every sequence has exactly `max_length` tokens, all `< vocab_size`; the tail of the stream shorter than
//!   `max_length` is dropped (a corpus with fewer than `max_length` tokens is an error).
//! - The order of sequences in epoch `e` is a permutation of `0..len` that depends only on `(seed, e)`
//!   ([`epoch_order`], a Fisher–Yates shuffle driven by splitmix64 — our own generator, so the order never
//!   changes with a dependency upgrade).
//! - A [`DataCursor`] `{epoch, position}` names the next sequence to hand out; a loader rebuilt from the same
//!   dataset, seed and cursor yields exactly the sequences the original one would have yielded next. That is
//!   what a checkpoint saves to resume bit-exactly.
//! - Every bad line is reported with its file and 1-based line number ([`DataError::Line`]); blank lines are
//!   skipped.

mod pretrain;
mod tokenizer;

pub use pretrain::{DataCursor, DataLoader, LoadOptions, PretrainDataset, epoch_order};
pub use tokenizer::TextTokenizer;

use std::path::PathBuf;

/// Errors of the data pipeline; each names the file (and line) at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSONL line that cannot be used.
    #[error("{}:{line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// The tokenizer files are missing or unusable.
    #[error("{}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    /// The corpus does not fill one sequence.
    #[error("the dataset has {tokens} tokens, fewer than one sequence of max_length {max_length}")]
    TooSmall { tokens: usize, max_length: usize },
    /// A setting the pipeline cannot work with.
    #[error("invalid data setting `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Result alias of the data pipeline.
pub type Result<T> = std::result::Result<T, DataError>;
