//! Pretraining sequences from JSONL and the seeded, resumable loader over them (see the module docs of
//! [`crate::data`]).

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::tokenizer::TextTokenizer;
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
        let mut tokenizer: Option<TextTokenizer> = None;
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
                            tokenizer = Some(TextTokenizer::from_dir(dir)?);
                        }
                        let tok = tokenizer.as_ref().expect("loaded above");
                        let ids = tok.encode(text).map_err(|m| line_err(path, n, m))?;
                        check_ids(&ids, opts.vocab_size, path, n)?;
                        stream.extend_from_slice(&ids);
                        if tok.eos_id() as usize >= opts.vocab_size {
                            return Err(DataError::Tokenizer {
                                path: path.clone(),
                                message: format!(
                                    "EOS id {} >= vocab_size {}",
                                    tok.eos_id(),
                                    opts.vocab_size
                                ),
                            });
                        }
                        stream.push(tok.eos_id());
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

/// Where a [`DataLoader`] stands: the next sequence is `epoch_order(seed, epoch, len)[position]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    pub epoch: u64,
    pub position: u64,
}

/// splitmix64: a tiny, well-mixed generator whose output is fixed forever.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The order of the `len` sequences in `epoch`: a Fisher–Yates shuffle seeded by `(seed, epoch)`.
pub fn epoch_order(seed: u64, epoch: u64, len: usize) -> Vec<u32> {
    let mut state = seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
    splitmix64(&mut state);
    let mut order: Vec<u32> = (0..len as u32).collect();
    for i in (1..len).rev() {
        // Multiply-shift maps 64 random bits onto 0..=i with negligible bias for corpus-sized i.
        let j = ((splitmix64(&mut state) as u128 * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    order
}

/// Hands out sequences in the seeded order of each epoch, wrapping into the next epoch.
#[derive(Debug, Clone)]
pub struct DataLoader {
    dataset: PretrainDataset,
    seed: u64,
    cursor: DataCursor,
    /// `epoch_order(seed, cursor.epoch, len)`.
    order: Vec<u32>,
}

impl DataLoader {
    /// A loader positioned at `cursor` (use `DataCursor::default()` to start).
    pub fn new(dataset: PretrainDataset, seed: u64, cursor: DataCursor) -> Result<Self> {
        if cursor.position >= dataset.len() as u64 {
            return Err(DataError::Invalid {
                key: "data cursor",
                reason: format!(
                    "position {} is past the {} sequences of the dataset (was it changed since the checkpoint?)",
                    cursor.position,
                    dataset.len()
                ),
            });
        }
        let order = epoch_order(seed, cursor.epoch, dataset.len());
        Ok(DataLoader {
            dataset,
            seed,
            cursor,
            order,
        })
    }

    /// The cursor of the next sequence.
    pub fn cursor(&self) -> DataCursor {
        self.cursor
    }

    pub fn dataset(&self) -> &PretrainDataset {
        &self.dataset
    }

    /// The next sequence; advances the cursor (into the next epoch after the last one).
    pub fn next_sequence(&mut self) -> &[u32] {
        let idx = self.order[self.cursor.position as usize] as usize;
        self.cursor.position += 1;
        if self.cursor.position == self.dataset.len() as u64 {
            self.cursor = DataCursor {
                epoch: self.cursor.epoch + 1,
                position: 0,
            };
            self.order = epoch_order(self.seed, self.cursor.epoch, self.dataset.len());
        }
        self.dataset.sequence(idx)
    }

    /// The next `rows` sequences as a causal-LM [`Batch`] (`rows × max_length`).
    pub fn next_batch(&mut self, rows: usize) -> Batch {
        let seq = self.dataset.max_length();
        let mut ids = Vec::with_capacity(rows * seq);
        for _ in 0..rows {
            let s = self.next_sequence();
            ids.extend_from_slice(s);
        }
        Batch::causal_lm(ids, rows, seq).expect("rows × max_length ids by construction")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_a_seeded_permutation() {
        let a = epoch_order(7, 0, 50);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<u32>>());
        assert_eq!(a, epoch_order(7, 0, 50));
        assert_ne!(a, epoch_order(7, 1, 50));
        assert_ne!(a, epoch_order(8, 0, 50));
        assert_ne!(a, (0..50).collect::<Vec<u32>>());
    }

    #[test]
    fn cursor_resumes_the_same_stream_across_epochs() {
        let ds = PretrainDataset::from_stream((0..23).collect(), 4).unwrap();
        assert_eq!((ds.len(), ds.stream_tokens()), (5, 23));
        assert_eq!(ds.sequence(1), &[4, 5, 6, 7]);
        let mut full = DataLoader::new(ds.clone(), 3, DataCursor::default()).unwrap();
        let all: Vec<Vec<u32>> = (0..12).map(|_| full.next_sequence().to_vec()).collect();
        // Every epoch visits each sequence once.
        let mut first: Vec<u32> = all[..5].iter().map(|s| s[0] / 4).collect();
        first.sort();
        assert_eq!(first, vec![0, 1, 2, 3, 4]);
        let mut part = DataLoader::new(ds.clone(), 3, DataCursor::default()).unwrap();
        for _ in 0..7 {
            part.next_sequence();
        }
        assert_eq!(
            part.cursor(),
            DataCursor {
                epoch: 1,
                position: 2
            }
        );
        let mut resumed = DataLoader::new(ds.clone(), 3, part.cursor()).unwrap();
        let rest: Vec<Vec<u32>> = (7..12).map(|_| resumed.next_sequence().to_vec()).collect();
        assert_eq!(rest, all[7..].to_vec());
        assert!(
            DataLoader::new(
                ds,
                3,
                DataCursor {
                    epoch: 0,
                    position: 5
                }
            )
            .is_err()
        );
        assert!(matches!(
            PretrainDataset::from_stream(vec![1, 2, 3], 4),
            Err(DataError::TooSmall {
                tokens: 3,
                max_length: 4
            })
        ));
    }
}
