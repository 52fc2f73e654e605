//! Dataset references (`path`, `path#N`, the built-in `self-cognition`), ms-swift's `#N` sampling, and the
//! built-in self-cognition rows.

use std::fmt;
use std::path::{Path, PathBuf};

use super::conversation::Conversation;
use super::formats::Row;
use crate::data::loader::epoch_order;
use crate::data::{DataError, Result};

/// Names of the built-in self-cognition dataset.
pub const SELF_COGNITION_NAMES: [&str; 2] = ["self-cognition", "swift/self-cognition"];

/// The built-in self-cognition rows: `{"query", "response", "tag": "zh"|"en"}` with `{{NAME}}` and
/// `{{AUTHOR}}` placeholders.
pub const SELF_COGNITION_JSONL: &str = include_str!("self_cognition.jsonl");

/// Where the rows of a dataset entry come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetSource {
    File(PathBuf),
    /// The built-in self-cognition set ([`SELF_COGNITION_JSONL`]).
    SelfCognition,
}

/// One entry of the dataset list: `path` or a built-in name, optionally with `#N` rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetRef {
    pub source: DatasetSource,
    /// `#N`: N rows sampled as ms-swift does ([`sample_indices`]); `None`: every row once.
    pub count: Option<usize>,
}

impl DatasetRef {
    /// Parses one entry. A trailing `#<digits>` is a row count, unless the whole entry names an existing file;
    /// `self-cognition` and `swift/self-cognition` are the built-in set.
    pub fn parse(entry: &Path) -> Result<Self> {
        let text = entry.to_string_lossy();
        if entry.is_file() {
            return Ok(DatasetRef {
                source: DatasetSource::File(entry.to_path_buf()),
                count: None,
            });
        }
        let (name, count) = match text.rsplit_once('#') {
            Some((name, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                let n: usize = n.parse().map_err(|_| DataError::Invalid {
                    key: "dataset",
                    reason: format!("{text:?}: the row count after '#' is too large"),
                })?;
                if n == 0 {
                    return Err(DataError::Invalid {
                        key: "dataset",
                        reason: format!("{text:?}: '#0' selects no rows"),
                    });
                }
                (name, Some(n))
            }
            _ => (text.as_ref(), None),
        };
        let source = if SELF_COGNITION_NAMES.contains(&name) {
            DatasetSource::SelfCognition
        } else {
            DatasetSource::File(PathBuf::from(name))
        };
        Ok(DatasetRef { source, count })
    }

    /// The name reports and errors use: the path, or `self-cognition`.
    pub fn name(&self) -> PathBuf {
        match &self.source {
            DatasetSource::File(p) => p.clone(),
            DatasetSource::SelfCognition => PathBuf::from(SELF_COGNITION_NAMES[0]),
        }
    }
}

impl fmt::Display for DatasetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name().display())?;
        if let Some(n) = self.count {
            write!(f, "#{n}")?;
        }
        Ok(())
    }
}

/// ms-swift's `#N` (its `sample_dataset`): the rows of a dataset of `len` rows to use, in order.
///
/// - `None`: `0..len`;
/// - `N ≤ len`: N distinct rows: the first N of a permutation seeded by `seed`, or the first N rows when not
///   `shuffle`;
/// - `N > len`: the whole set `N / len` times in order, then `N % len` more rows chosen as above.
pub fn sample_indices(len: usize, count: Option<usize>, shuffle: bool, seed: u64) -> Vec<u32> {
    let Some(n) = count else {
        return (0..len as u32).collect();
    };
    if len == 0 {
        return Vec::new();
    }
    let (repeats, rest) = (n / len, n % len);
    let mut out: Vec<u32> = Vec::with_capacity(n);
    for _ in 0..repeats {
        out.extend(0..len as u32);
    }
    if rest > 0 {
        if shuffle {
            out.extend_from_slice(&epoch_order(seed, 0, len)[..rest]);
        } else {
            out.extend(0..rest as u32);
        }
    }
    out
}

/// The built-in self-cognition conversations with `{{NAME}}` / `{{AUTHOR}}` filled: the zh form for rows
/// tagged `zh`, the en form for the others. Each is `(tag, conversation)`, in file order.
pub fn self_cognition(
    name: &(String, String),
    author: &(String, String),
) -> Vec<(String, Conversation)> {
    self_cognition_rows(name, author)
        .into_iter()
        .map(|(tag, row)| (tag, row.conv.expect("the built-in rows are valid")))
        .collect()
}

pub(crate) fn self_cognition_rows(
    name: &(String, String),
    author: &(String, String),
) -> Vec<(String, Row)> {
    SELF_COGNITION_JSONL
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).expect("built-in JSONL");
            let tag = v["tag"].as_str().unwrap_or("en").to_string();
            let (n, a) = if tag == "zh" {
                (&name.0, &author.0)
            } else {
                (&name.1, &author.1)
            };
            let fill = |key: &str| {
                v[key]
                    .as_str()
                    .expect("built-in rows have query and response")
                    .replace("{{NAME}}", n)
                    .replace("{{AUTHOR}}", a)
            };
            let conv = Conversation::from_query(None, &[], &fill("query"), &fill("response"));
            (
                tag,
                Row {
                    line: i + 1,
                    conv: Ok(conv),
                },
            )
        })
        .collect()
}
