//! Supervised fine-tuning data: chat datasets → samples of tokens with loss weights → micro-batches.
//!
//! # Pipeline ([`SftDataset::load`])
//!
//! 1. Each dataset entry ([`DatasetRef`]: `path`, `path#N`, `self-cognition[#N]`) is read into rows
//!    ([`formats`]: `.jsonl`, `.json`, `.csv`; [`conversation`]: ms-swift's `messages` and
//!    `query`/`response` shapes). A bad row is an error naming `file:line` when `strict`, else it is skipped
//!    and counted for its file ([`SourceReport`]).
//! 2. `#N` picks rows as ms-swift does ([`sample_indices`]); the entries are concatenated in order and, when
//!    `shuffle`, shuffled with the seed.
//! 3. Each row is rendered with the model's chat template and tokenized; loss weights follow `loss_scale`
//!    ([`render`] documents how the assistant turns are found and its limits). A row the template cannot
//!    render is handled like a bad row (only rows taken by `#N` are rendered, so a render failure in a row
//!    that was not sampled goes unnoticed; parse errors are found in every row).
//! 4. Samples longer than `max_length` are dropped (`truncation: delete`, counted) or cut (`left` keeps the
//!    last `max_length` tokens, `right` the first); a sample with no trained token left is dropped (counted).
//! 5. With `packing`, samples are packed into rows of exactly `max_length` ([`pack::first_fit_decreasing`]);
//!    the loader's units are then rows, otherwise samples.
//!
//! # Invariants
//!
//! - `SftSample::loss_weights[t]` weighs predicting `input_ids[t+1]` at `t` (the [`Batch`] convention); the
//!   last entry is 0; every kept sample has `2 ≤ len ≤ max_length` and at least one positive weight, and all
//!   its ids are `< vocab_size`.
//! - Loading is deterministic in (files, options, `max_length`, seed): a resumed run rebuilds the same units,
//!   so a [`crate::data::DataCursor`] stays valid.
//! - Nothing is lost silently: every row read is kept, skipped (with its line and reason in the report), or
//!   dropped by truncation / for having no trained token (counted in the report).

pub mod conversation;
pub mod formats;
pub mod pack;
pub mod render;
pub mod source;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use qtext::TextCodec;

pub use conversation::Conversation;
pub use render::{LossScale, LossScaleBase, RenderedSample, render_sample};
pub use source::{DatasetRef, DatasetSource, SELF_COGNITION_NAMES, sample_indices, self_cognition};

use super::loader::{Dataset, epoch_order, splitmix64};
use super::{DataError, Result};
use crate::model::Batch;

/// Why one row cannot be used (the caller adds file and line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RowError(pub String);

/// What happens to a sample longer than `max_length` tokens (ms-swift's `truncation_strategy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Truncation {
    /// Drop it (counted in the report).
    #[default]
    Delete,
    /// Keep the last `max_length` tokens.
    Left,
    /// Keep the first `max_length` tokens.
    Right,
}

impl FromStr for Truncation {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "delete" => Ok(Truncation::Delete),
            "left" => Ok(Truncation::Left),
            "right" => Ok(Truncation::Right),
            other => Err(DataError::Invalid {
                key: "truncation_strategy",
                reason: format!("unknown value {other:?}; use delete, left or right"),
            }),
        }
    }
}

/// The SFT settings of a run (`TrainConfig::sft`); names and meanings follow ms-swift.
#[derive(Debug, Clone, PartialEq)]
pub struct SftOptions {
    pub loss_scale: LossScale,
    /// Pack samples into rows of `max_length` with per-sample attention.
    pub packing: bool,
    /// A bad row is an error (`true`) or skipped and reported (`false`).
    pub strict: bool,
    pub truncation: Truncation,
    /// Shuffle the mixed rows, pick `#N` rows at random, and visit units in a seeded order per epoch; `false`
    /// keeps file order everywhere.
    pub shuffle: bool,
    /// `{{NAME}}` of the self-cognition set: (zh form, en form).
    pub model_name: Option<(String, String)>,
    /// `{{AUTHOR}}` of the self-cognition set: (zh form, en form).
    pub model_author: Option<(String, String)>,
}

impl Default for SftOptions {
    /// ms-swift's defaults: `loss_scale: default`, no packing, lenient, `truncation: delete`, shuffled.
    fn default() -> Self {
        SftOptions {
            loss_scale: LossScale::default(),
            packing: false,
            strict: false,
            truncation: Truncation::Delete,
            shuffle: true,
            model_name: None,
            model_author: None,
        }
    }
}

/// One training sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SftSample {
    /// `[len]`
    pub input_ids: Vec<u32>,
    /// `[len]`: `loss_weights[t]` weighs predicting `input_ids[t+1]` at `t`; the last entry is 0.
    pub loss_weights: Vec<f32>,
}

impl SftSample {
    /// Tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// True when some prediction has a positive weight.
    pub fn has_loss(&self) -> bool {
        self.loss_weights.iter().any(|&w| w > 0.0)
    }

    /// Cuts the sample to `max_length` tokens from the `left` (keeping the end) or the right.
    pub fn truncate(&mut self, max_length: usize, left: bool) {
        let n = self.len();
        if n <= max_length {
            return;
        }
        if left {
            self.input_ids.drain(..n - max_length);
            self.loss_weights.drain(..n - max_length);
        } else {
            self.input_ids.truncate(max_length);
            self.loss_weights.truncate(max_length);
            if let Some(w) = self.loss_weights.last_mut() {
                *w = 0.0;
            }
        }
    }
}

/// What [`SftDataset::load`] needs besides the entries and the tokenizer.
#[derive(Debug, Clone, Copy)]
pub struct SftLoadOptions<'a> {
    pub sft: &'a SftOptions,
    /// Longest sample, and the length of packed rows.
    pub max_length: usize,
    /// Every id must be below this (the model's `vocab_size`).
    pub vocab_size: usize,
    /// Seed of `#N` sampling, the mix shuffle and the loader order.
    pub seed: u64,
}

/// Rows read from one dataset entry.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceReport {
    /// The entry as given (`path#N`, `self-cognition`).
    pub entry: String,
    /// Rows in the file (valid or not).
    pub rows: usize,
    /// Rows skipped as unusable (lenient mode); each distinct row once.
    pub skipped: usize,
    /// The first few skipped rows: `(line, reason)`.
    pub skipped_examples: Vec<(usize, String)>,
    /// Rows taken after `#N` (repeats counted).
    pub sampled: usize,
}

/// How many skipped rows a [`SourceReport`] keeps as examples.
pub const SKIP_EXAMPLES: usize = 5;

impl fmt::Display for SourceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} rows, {} taken, {} skipped",
            self.entry, self.rows, self.sampled, self.skipped
        )?;
        if !self.skipped_examples.is_empty() {
            let ex: Vec<String> = self
                .skipped_examples
                .iter()
                .map(|(l, m)| format!("line {l}: {m}"))
                .collect();
            write!(
                f,
                " ({}{})",
                ex.join("; "),
                if self.skipped > ex.len() { "; …" } else { "" }
            )?;
        }
        Ok(())
    }
}

/// What loading SFT data did, for the run log.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SftReport {
    pub sources: Vec<SourceReport>,
    /// Samples kept.
    pub samples: usize,
    /// Tokens in the kept samples.
    pub tokens: usize,
    /// Samples dropped as longer than `max_length` (`truncation: delete`).
    pub dropped_too_long: usize,
    /// Samples cut to `max_length` (`left` / `right`).
    pub truncated: usize,
    /// Samples dropped because no trained token was left (e.g. cut away by truncation).
    pub dropped_no_loss: usize,
    /// Packed rows (`packing`), else `None`.
    pub packed_rows: Option<usize>,
}

impl SftReport {
    /// Rows skipped over all sources.
    pub fn skipped(&self) -> usize {
        self.sources.iter().map(|s| s.skipped).sum()
    }
}

impl fmt::Display for SftReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} samples, {} tokens from {} datasets; {} dropped as too long, {} truncated, {} dropped \
             without a trained token, {} rows skipped",
            self.samples,
            self.tokens,
            self.sources.len(),
            self.dropped_too_long,
            self.truncated,
            self.dropped_no_loss,
            self.skipped()
        )?;
        if let Some(r) = self.packed_rows {
            write!(f, "; packed into {r} rows")?;
        }
        let per: Vec<String> = self.sources.iter().map(|s| s.to_string()).collect();
        write!(f, " [{}]", per.join(" | "))
    }
}

/// SFT samples, optionally packed, ready for the [`crate::data::DataLoader`].
#[derive(Debug, Clone, PartialEq)]
pub struct SftDataset {
    samples: Vec<SftSample>,
    /// With packing: the sample indices of each row.
    rows: Option<Vec<Vec<u32>>>,
    max_length: usize,
    pad_id: u32,
    shuffle: bool,
}

/// A seed stream derived from the run seed for one purpose.
fn derive_seed(seed: u64, purpose: u64, index: u64) -> u64 {
    let mut s = seed
        ^ purpose.wrapping_mul(0xA076_1D64_78BD_642F)
        ^ index.wrapping_mul(0xE703_7ED1_A0B4_28DB);
    splitmix64(&mut s)
}
const SEED_SAMPLE: u64 = 1;
const SEED_MIX: u64 = 2;

impl SftDataset {
    /// Loads, samples, mixes, renders and (optionally) packs `entries` (see the module docs).
    pub fn load(
        entries: &[PathBuf],
        codec: &TextCodec,
        opts: &SftLoadOptions<'_>,
    ) -> Result<(Self, SftReport)> {
        let sft = opts.sft;
        if opts.max_length < 2 {
            return Err(DataError::Invalid {
                key: "max_length",
                reason: format!("must be at least 2, got {}", opts.max_length),
            });
        }
        if entries.is_empty() {
            return Err(DataError::Invalid {
                key: "dataset",
                reason: "no datasets given".into(),
            });
        }
        render::probe_template(codec)?;
        let pad_id = codec
            .pad_id()
            .filter(|&p| (p as usize) < opts.vocab_size)
            .unwrap_or(0);

        // 1–2: rows of every entry, sampled, then mixed.
        let mut report = SftReport::default();
        let mut names: Vec<PathBuf> = Vec::new();
        let mut rows: Vec<Vec<Row>> = Vec::new();
        let mut mix: Vec<(u32, u32)> = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let dref = DatasetRef::parse(entry)?;
            let name = dref.name();
            let file_rows: Vec<Row> = match &dref.source {
                DatasetSource::File(p) => formats::read_rows(p)?,
                DatasetSource::SelfCognition => {
                    let (Some(n), Some(a)) = (&sft.model_name, &sft.model_author) else {
                        return Err(DataError::Invalid {
                            key: "model_name",
                            reason: "the self-cognition dataset needs model_name and model_author"
                                .into(),
                        });
                    };
                    source::self_cognition_rows(n, a)
                        .into_iter()
                        .map(|(_, r)| r)
                        .collect()
                }
            };
            let mut src = SourceReport {
                entry: dref.to_string(),
                rows: file_rows.len(),
                skipped: 0,
                skipped_examples: Vec::new(),
                sampled: 0,
            };
            let mut usable: Vec<u32> = Vec::with_capacity(file_rows.len());
            for (j, row) in file_rows.iter().enumerate() {
                match &row.conv {
                    Ok(_) => usable.push(j as u32),
                    Err(m) => {
                        if sft.strict {
                            return Err(line_error(&name, row.line, m));
                        }
                        skip(&mut src, row.line, m);
                    }
                }
            }
            let picked = sample_indices(
                usable.len(),
                dref.count,
                sft.shuffle,
                derive_seed(opts.seed, SEED_SAMPLE, i as u64),
            );
            src.sampled = picked.len();
            mix.extend(picked.into_iter().map(|k| (i as u32, usable[k as usize])));
            report.sources.push(src);
            names.push(name);
            rows.push(file_rows);
        }
        if sft.shuffle {
            let order = epoch_order(derive_seed(opts.seed, SEED_MIX, 0), 0, mix.len());
            mix = order.into_iter().map(|k| mix[k as usize]).collect();
        }

        // 3–4: render (each distinct row once), truncate.
        let mut rendered: HashMap<(u32, u32), Option<SftSample>> = HashMap::new();
        let mut samples = Vec::with_capacity(mix.len());
        for (src, row) in mix {
            let cached = match rendered.get(&(src, row)) {
                Some(c) => c.clone(),
                None => {
                    let r = &rows[src as usize][row as usize];
                    let conv = r.conv.as_ref().expect("only usable rows are mixed");
                    let result = match render_sample(codec, conv, sft.loss_scale) {
                        Ok(s) => Some(s.sample),
                        Err(RowError(m)) => {
                            if sft.strict {
                                return Err(line_error(&names[src as usize], r.line, &m));
                            }
                            skip(&mut report.sources[src as usize], r.line, &m);
                            None
                        }
                    };
                    if let Some(s) = &result
                        && let Some(&bad) = s
                            .input_ids
                            .iter()
                            .find(|&&id| id as usize >= opts.vocab_size)
                    {
                        return Err(DataError::Tokenizer {
                            path: codec.dir().join("tokenizer.json"),
                            message: format!(
                                "token id {bad} (in {}:{}) is not below the model's vocab_size {}",
                                names[src as usize].display(),
                                r.line,
                                opts.vocab_size
                            ),
                        });
                    }
                    rendered.insert((src, row), result.clone());
                    result
                }
            };
            let Some(mut sample) = cached else { continue };
            if sample.len() > opts.max_length {
                match sft.truncation {
                    Truncation::Delete => {
                        report.dropped_too_long += 1;
                        continue;
                    }
                    Truncation::Left | Truncation::Right => {
                        sample.truncate(opts.max_length, sft.truncation == Truncation::Left);
                        report.truncated += 1;
                    }
                }
            }
            if sample.len() < 2 || !sample.has_loss() {
                report.dropped_no_loss += 1;
                continue;
            }
            samples.push(sample);
        }
        report.samples = samples.len();
        report.tokens = samples.iter().map(SftSample::len).sum();
        if samples.is_empty() {
            return Err(DataError::Invalid {
                key: "dataset",
                reason: format!("no SFT sample is left to train on: {report}"),
            });
        }
        let ds =
            SftDataset::from_samples(samples, opts.max_length, pad_id, sft.packing, sft.shuffle)?;
        report.packed_rows = ds.rows.as_ref().map(Vec::len);
        Ok((ds, report))
    }

    /// A dataset of ready samples (each `2 ≤ len ≤ max_length`); `packing` packs them
    /// ([`pack::first_fit_decreasing`]).
    pub fn from_samples(
        samples: Vec<SftSample>,
        max_length: usize,
        pad_id: u32,
        packing: bool,
        shuffle: bool,
    ) -> Result<Self> {
        if samples.is_empty() {
            return Err(DataError::Invalid {
                key: "dataset",
                reason: "no samples".into(),
            });
        }
        if let Some((i, s)) = samples
            .iter()
            .enumerate()
            .find(|(_, s)| s.len() > max_length || s.loss_weights.len() != s.len())
        {
            return Err(DataError::Invalid {
                key: "dataset",
                reason: format!(
                    "sample {i} has {} ids and {} weights, max_length is {max_length}",
                    s.len(),
                    s.loss_weights.len()
                ),
            });
        }
        let rows = packing.then(|| {
            let lengths: Vec<usize> = samples.iter().map(SftSample::len).collect();
            pack::first_fit_decreasing(&lengths, max_length)
        });
        Ok(SftDataset {
            samples,
            rows,
            max_length,
            pad_id,
            shuffle,
        })
    }

    /// The samples, in mixed order.
    pub fn samples(&self) -> &[SftSample] {
        &self.samples
    }

    /// With packing, the sample indices of each row.
    pub fn packed_rows(&self) -> Option<&[Vec<u32>]> {
        self.rows.as_deref()
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id written into padding.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
}

impl Dataset for SftDataset {
    /// Packed rows with packing, else samples.
    fn len(&self) -> usize {
        self.rows.as_ref().map_or(self.samples.len(), Vec::len)
    }

    fn batch(&self, units: &[u32]) -> Batch {
        match &self.rows {
            Some(rows) => {
                let packed: Vec<Vec<&SftSample>> = units
                    .iter()
                    .map(|&u| {
                        rows[u as usize]
                            .iter()
                            .map(|&i| &self.samples[i as usize])
                            .collect()
                    })
                    .collect();
                pack::packed_batch(&packed, self.max_length, self.pad_id)
            }
            None => {
                let picked: Vec<&SftSample> =
                    units.iter().map(|&u| &self.samples[u as usize]).collect();
                pack::padded_batch(&picked, self.pad_id)
            }
        }
    }

    fn shuffled(&self) -> bool {
        self.shuffle
    }
}

use formats::Row;

fn line_error(path: &Path, line: usize, message: &str) -> DataError {
    DataError::Line {
        path: path.to_path_buf(),
        line,
        message: message.to_string(),
    }
}

fn skip(src: &mut SourceReport, line: usize, message: &str) {
    src.skipped += 1;
    if src.skipped_examples.len() < SKIP_EXAMPLES {
        src.skipped_examples.push((line, message.to_string()));
    }
}
