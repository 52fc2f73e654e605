//! Writing HF checkpoint directories, committed atomically.
//!
//! Steps of [`save_checkpoint`] (the order is the crash-safety argument):
//! 1. refuse if `<dir>` exists (a committed checkpoint is never modified);
//! 2. create the hidden sibling `.<name>.tmp-<pid>-<n>` and write into it: the weight files (one
//!    `model.safetensors`, or `model-0000N-of-0000M.safetensors` shards of at most `max_shard_bytes` of tensor
//!    data each plus `model.safetensors.index.json`), `config.json` (with its dtype key set to the saved dtype),
//!    and the [`HF_SIDE_FILES`] found in `source_dir`; fsync every file;
//! 3. fsync the temp dir, rename it to `<dir>`, fsync the parent.
//!
//! Until the rename, nothing exists under `<dir>`; after it, everything in it is on disk. On an error the temp dir
//! is removed; after a crash it stays behind, hidden, and [`remove_stale_temp_dirs`] deletes it.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{DiskDtype, HfError, HostTensor, INDEX_FILE, SINGLE_FILE, TensorMap, io_err};

/// Shard size limit (bytes of tensor data per file), as transformers' default `max_shard_size="5GB"`.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Files copied from `SaveOptions::source_dir` when they exist there (`config.json` is handled separately).
pub const HF_SIDE_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
];

/// How [`save_checkpoint`] writes.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Element type on disk (f32 values are rounded to nearest-even for BF16/F16).
    pub dtype: DiskDtype,
    /// Start a new shard when the next tensor would push the current one past this many bytes of tensor data
    /// (a single larger tensor gets a shard of its own). One shard is written as `model.safetensors`.
    pub max_shard_bytes: u64,
    /// Directory to copy `config.json` and the [`HF_SIDE_FILES`] from (typically the checkpoint loaded at start).
    pub source_dir: Option<PathBuf>,
    /// `config.json` content; takes precedence over `source_dir/config.json`. Either way its `torch_dtype` (or
    /// `dtype`, whichever it has; `torch_dtype` if neither) is set to `dtype`. No config, no `config.json`.
    pub config: Option<serde_json::Value>,
    /// Fault injection for tests: write and fsync everything, then return [`HfError::Interrupted`] without the
    /// commit rename and without removing the temp dir, as a crash at the last moment would.
    #[doc(hidden)]
    pub fail_before_commit: bool,
}

impl SaveOptions {
    /// `dtype`, [`DEFAULT_MAX_SHARD_BYTES`], no source dir, no config.
    pub fn new(dtype: DiskDtype) -> Self {
        SaveOptions {
            dtype,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            source_dir: None,
            config: None,
            fail_before_commit: false,
        }
    }

    pub fn max_shard_bytes(mut self, bytes: u64) -> Self {
        self.max_shard_bytes = bytes;
        self
    }

    pub fn source_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.source_dir = Some(dir.into());
        self
    }

    pub fn config(mut self, config: serde_json::Value) -> Self {
        self.config = Some(config);
        self
    }
}

/// What [`save_checkpoint`] committed.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveReport {
    /// The committed directory.
    pub dir: PathBuf,
    /// Weight file names, in shard order.
    pub weight_files: Vec<String>,
    /// Bytes of tensor data (the index's `metadata.total_size`).
    pub total_size: u64,
    /// Other files written (config.json and copied side files).
    pub other_files: Vec<String>,
}

/// Tensor bytes in the on-disk dtype, for `safetensors::serialize_to_file`.
struct Encoded {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &Encoded {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn encode(t: &HostTensor, dtype: DiskDtype) -> Encoded {
    let mut bytes = Vec::with_capacity(t.data.len() * dtype.size());
    match dtype {
        DiskDtype::F32 => t
            .data
            .iter()
            .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes())),
        DiskDtype::BF16 => t.data.iter().for_each(|&x| {
            bytes.extend_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes())
        }),
        DiskDtype::F16 => t.data.iter().for_each(|&x| {
            bytes.extend_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes())
        }),
    }
    Encoded {
        dtype: dtype.to_safetensors(),
        shape: t.shape.clone(),
        bytes,
    }
}

fn fsync(path: &Path) -> Result<(), HfError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), HfError> {
    use std::io::Write;
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io_err(path))
}

/// Groups tensor names into shards of at most `max` bytes each (greedy, in name order).
fn plan_shards(tensors: &TensorMap, dtype: DiskDtype, max: u64) -> Vec<Vec<&str>> {
    let mut shards: Vec<Vec<&str>> = vec![Vec::new()];
    let mut current = 0u64;
    for (name, t) in tensors {
        let bytes = (t.data.len() * dtype.size()) as u64;
        if !shards.last().expect("non-empty").is_empty() && current + bytes > max {
            shards.push(Vec::new());
            current = 0;
        }
        shards.last_mut().expect("non-empty").push(name);
        current += bytes;
    }
    shards
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

const TEMP_MARK: &str = ".tmp-";

fn temp_sibling(parent: &Path, name: &str) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    parent.join(format!(".{name}{TEMP_MARK}{}-{n}", std::process::id()))
}

/// Writes `tensors` as an HF checkpoint directory `dir`, committed atomically (see the module docs).
/// Fails with [`HfError::TargetExists`] if `dir` exists.
pub fn save_checkpoint(
    dir: impl AsRef<Path>,
    tensors: &TensorMap,
    opts: &SaveOptions,
) -> Result<SaveReport, HfError> {
    let dir = dir.as_ref();
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| HfError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "checkpoint path has no UTF-8 final name",
            ),
        })?
        .to_string();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    for (tname, t) in tensors {
        if t.numel() != t.data.len() {
            return Err(HfError::BadTensor {
                path: dir.to_path_buf(),
                tensor: tname.clone(),
                reason: format!(
                    "shape {:?} needs {} elements, data has {}",
                    t.shape,
                    t.numel(),
                    t.data.len()
                ),
            });
        }
    }
    if dir.exists() {
        return Err(HfError::TargetExists {
            path: dir.to_path_buf(),
        });
    }
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let tmp = temp_sibling(&parent, &name);
    std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;

    match write_contents(&tmp, tensors, opts) {
        Ok((weight_files, total_size, other_files)) => {
            fsync(&tmp)?;
            if opts.fail_before_commit {
                return Err(HfError::Interrupted {
                    path: dir.to_path_buf(),
                });
            }
            if dir.exists() {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(HfError::TargetExists {
                    path: dir.to_path_buf(),
                });
            }
            if let Err(e) = std::fs::rename(&tmp, dir) {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(HfError::Io {
                    path: dir.to_path_buf(),
                    source: e,
                });
            }
            fsync(&parent)?;
            Ok(SaveReport {
                dir: dir.to_path_buf(),
                weight_files,
                total_size,
                other_files,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

type Written = (Vec<String>, u64, Vec<String>);

fn write_contents(tmp: &Path, tensors: &TensorMap, opts: &SaveOptions) -> Result<Written, HfError> {
    let shards = plan_shards(tensors, opts.dtype, opts.max_shard_bytes.max(1));
    let n = shards.len();
    let mut weight_files = Vec::with_capacity(n);
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0u64;
    for (i, names) in shards.iter().enumerate() {
        let file = if n == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let path = tmp.join(&file);
        let encoded: Vec<(String, Encoded)> = names
            .iter()
            .map(|&name| (name.to_string(), encode(&tensors[name], opts.dtype)))
            .collect();
        total_size += encoded
            .iter()
            .map(|(_, e)| e.bytes.len() as u64)
            .sum::<u64>();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(
            encoded.iter().map(|(k, v)| (k.as_str(), v)),
            Some(meta),
            &path,
        )
        .map_err(|source| HfError::Serialize {
            path: path.clone(),
            source,
        })?;
        fsync(&path)?;
        for &name in names {
            weight_map.insert(name.to_string(), serde_json::Value::from(file.clone()));
        }
        weight_files.push(file);
    }
    if n > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": total_size},
            "weight_map": weight_map,
        });
        let path = tmp.join(INDEX_FILE);
        write_synced(
            &path,
            format!("{}\n", serde_json::to_string_pretty(&index).expect("JSON")).as_bytes(),
        )?;
    }

    let mut other = Vec::new();
    let config = match (&opts.config, &opts.source_dir) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(src)) if src.join("config.json").is_file() => {
            let p = src.join("config.json");
            let text = std::fs::read_to_string(&p).map_err(io_err(&p))?;
            Some(
                serde_json::from_str(&text)
                    .map_err(|source| HfError::Config { path: p, source })?,
            )
        }
        _ => None,
    };
    if let Some(mut config) = config {
        if let Some(obj) = config.as_object_mut() {
            let key = if obj.contains_key("dtype") && !obj.contains_key("torch_dtype") {
                "dtype"
            } else {
                "torch_dtype"
            };
            obj.insert(key.to_string(), opts.dtype.torch_name().into());
        }
        let path = tmp.join("config.json");
        write_synced(
            &path,
            format!("{}\n", serde_json::to_string_pretty(&config).expect("JSON")).as_bytes(),
        )?;
        other.push("config.json".to_string());
    }
    if let Some(src) = &opts.source_dir {
        for f in HF_SIDE_FILES {
            let from = src.join(f);
            if from.is_file() {
                let to = tmp.join(f);
                std::fs::copy(&from, &to).map_err(io_err(&from))?;
                fsync(&to)?;
                other.push(f.to_string());
            }
        }
    }
    Ok((weight_files, total_size, other))
}

/// Deletes the hidden temp dirs (`.<name>.tmp-*`) that interrupted saves left in `parent`; returns them.
/// Call it only when no save into `parent` is running (e.g. when a job starts), or it removes a save in progress.
pub fn remove_stale_temp_dirs(parent: impl AsRef<Path>) -> Result<Vec<PathBuf>, HfError> {
    let parent = parent.as_ref();
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => {
            return Err(HfError::Io {
                path: parent.to_path_buf(),
                source: e,
            });
        }
    };
    for entry in entries {
        let entry = entry.map_err(io_err(parent))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') && name.contains(TEMP_MARK) && entry.path().is_dir() {
            std::fs::remove_dir_all(entry.path()).map_err(io_err(entry.path()))?;
            removed.push(entry.path());
        }
    }
    removed.sort();
    Ok(removed)
}
