//! Pretraining sequences from JSONL (see the module docs of [`crate::data`]).

use std::io::BufRead;
use std::path::{Path, PathBuf};

use qtext::TextCodec;
use serde_json::Value;

use super::loader::Dataset;
use super::{DataError, Result};
use crate::model::Batch;

/// How [`PretrainDataset::load`] reads its files.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Tokens per sequence (≥ 2).
    pub max_length: usize,
    /// Every id must be below this (the model's `vocab_size`).
    pub vocab_size: usize,
    /// Directory with `tokenizer.json` (and `tokenizer_config.json`); needed only when a line has `text`.
    pub tokenizer_dir: Option<PathBuf>,
}

/// All sequences of a corpus, `len × max_length` tokens, in corpus order.
#[derive(Debug, Clone, PartialEq)]
pub struct PretrainDataset {
    max_length: usize,
    /// `[len · max_length]`, row-major.
    tokens: Vec<u32>,
    /// Total tokens read, including the dropped tail.
    stream_tokens: usize,
}

fn line_err(path: &Path, line: usize, message: impl Into<String>) -> DataError {
    DataError::Line {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

impl PretrainDataset {
    /// Reads every file in order (see the module docs for the line formats).
    pub fn load(paths: &[PathBuf], opts: &LoadOptions) -> Result<Self> {
        if opts.max_length < 2 {
            return Err(DataError::Invalid {
                key: "max_length",
                reason: format!("must be at least 2, got {}", opts.max_length),
            });
        }
        if paths.is_empty() {
            return Err(DataError::Invalid {
                key: "dataset",
                reason: "no files given".into(),
            });
        }
        let mut tokenizer: Option<(TextCodec, u32)> = None;
        let mut stream = Vec::new();
        for path in paths {
            let file = std::fs::File::open(path).map_err(|source| DataError::Io {
                path: path.clone(),
                source,
            })?;
            for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
                let n = i + 1;
                let line = line.map_err(|e| line_err(path, n, format!("cannot read: {e}")))?;
                if line.trim().is_empty() {
                    continue;
                }
                let value: Value = serde_json::from_str(&line)
                    .map_err(|e| line_err(path, n, format!("not valid JSON: {e}")))?;
                let obj = value
                    .as_object()
                    .ok_or_else(|| line_err(path, n, "expected a JSON object"))?;
                match (obj.get("text"), obj.get("input_ids")) {
                    (Some(Value::String(text)), None) => {
                        if tokenizer.is_none() {
                            let dir = opts.tokenizer_dir.as_ref().ok_or_else(|| {
                                line_err(path, n, "a `text` line needs the model's tokenizer, and no tokenizer directory is known")
                            })?;
                            let codec = TextCodec::from_dir(dir)?;
                            let eos = codec.require_eos_id()?;
                            tokenizer = Some((codec, eos));
                        }
                        let (tok, eos) = tokenizer.as_ref().expect("loaded above");
                        let ids = tok
                            .encode(text)
                            .map_err(|e| line_err(path, n, format!("cannot tokenize: {e}")))?;
                        check_ids(&ids, opts.vocab_size, path, n)?;
                        stream.extend_from_slice(&ids);
                        if *eos as usize >= opts.vocab_size {
                            return Err(DataError::Tokenizer {
                                path: path.clone(),
                                message: format!("EOS id {eos} >= vocab_size {}", opts.vocab_size),
                            });
                        }
                        stream.push(*eos);
                    }
                    (None, Some(Value::Array(items))) => {
                        let mut ids = Vec::with_capacity(items.len());
                        for (j, v) in items.iter().enumerate() {
                            let id =
                                v.as_u64()
                                    .filter(|&x| x <= u32::MAX as u64)
                                    .ok_or_else(|| {
                                        line_err(
                                            path,
                                            n,
                                            format!("input_ids[{j}] = {v} is not a token id"),
                                        )
                                    })?;
                            ids.push(id as u32);
                        }
                        check_ids(&ids, opts.vocab_size, path, n)?;
                        stream.extend_from_slice(&ids);
                    }
                    (Some(_), Some(_)) => {
                        return Err(line_err(path, n, "has both `text` and `input_ids`"));
                    }
                    (Some(_), None) => return Err(line_err(path, n, "`text` must be a string")),
                    (None, Some(_)) => {
                        return Err(line_err(path, n, "`input_ids` must be a list of token ids"));
                    }
                    (None, None) => {
                        return Err(line_err(
                            path,
                            n,
                            "expected a `text` or an `input_ids` key (pretraining data)",
                        ));
                    }
                }
            }
        }
        Self::from_stream(stream, opts.max_length)
    }

    /// Cuts one token stream into sequences of `max_length` (the tail is dropped).
    pub fn from_stream(mut stream: Vec<u32>, max_length: usize) -> Result<Self> {
        let n = stream.len() / max_length.max(1);
        if max_length < 2 || n == 0 {
            return Err(DataError::TooSmall {
                tokens: stream.len(),
                max_length,
            });
        }
        let stream_tokens = stream.len();
        stream.truncate(n * max_length);
        Ok(PretrainDataset {
            max_length,
            tokens: stream,
            stream_tokens,
        })
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.tokens.len() / self.max_length
    }

    /// Never true for a constructed dataset (it has at least one sequence).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Tokens per sequence.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Tokens in the stream before cutting (≥ `len · max_length`).
    pub fn stream_tokens(&self) -> usize {
        self.stream_tokens
    }

    /// Sequence `i` (`i < len`), `max_length` tokens.
    pub fn sequence(&self, i: usize) -> &[u32] {
        &self.tokens[i * self.max_length..(i + 1) * self.max_length]
    }
}

fn check_ids(ids: &[u32], vocab: usize, path: &Path, line: usize) -> Result<()> {
    if let Some((j, id)) = ids
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= vocab)
    {
        return Err(line_err(
            path,
            line,
            format!("token id {id} (position {j}) is not below the model's vocab_size {vocab}"),
        ));
    }
    Ok(())
}

impl Dataset for PretrainDataset {
    fn len(&self) -> usize {
        PretrainDataset::len(self)
    }

    /// `units.len() × max_length` plain causal-LM rows.
    fn batch(&self, units: &[u32]) -> Batch {
        let seq = self.max_length;
        let mut ids = Vec::with_capacity(units.len() * seq);
        for &u in units {
            ids.extend_from_slice(self.sequence(u as usize));
        }
        Batch::causal_lm(ids, units.len(), seq).expect("rows × max_length ids by construction")
    }
}
