//! Hugging Face checkpoints on disk: `model.safetensors` or sharded `model-0000N-of-0000M.safetensors` with
//! `model.safetensors.index.json`, plus `config.json` and the tokenizer files.
//!
//! # Layout (what transformers and vLLM read)
//!
//! ```text
//! <dir>/config.json                      model config (see model::config::ModelConfig)
//! <dir>/model.safetensors                all tensors, when they fit in one shard
//! <dir>/model-00001-of-00003.safetensors … shards, otherwise, with
//! <dir>/model.safetensors.index.json     {"metadata": {"total_size": <bytes of tensor data>},
//!                                         "weight_map": {"<tensor name>": "<shard file>", …}}
//! <dir>/tokenizer.json, tokenizer_config.json, generation_config.json, …   (copied, see HF_SIDE_FILES)
//! ```
//!
//! # Invariants
//!
//! - In memory every tensor is a [`HostTensor`]: row-major f32, `data.len() == shape.iter().product()`
//!   (a scalar has `shape == []` and one element). On disk tensors may be F32, BF16 or F16; loading converts to
//!   f32 exactly (bf16/f16 → f32 is lossless), saving converts f32 → bf16/f16 with round-to-nearest-even (as torch).
//!   So load → save (same dtype) → load gives bit-identical tensors.
//! - Tensor names are the HF names (`model.layers.0.self_attn.q_proj.weight`, per-expert
//!   `model.layers.0.mlp.experts.7.up_proj.weight`); a [`TensorMap`] is sorted by name.
//! - [`save_checkpoint`] never leaves a half-written directory under the final name: it writes into a hidden
//!   sibling `.<name>.tmp-<pid>-<n>`, fsyncs every file and the directory, then renames it to `<name>` and fsyncs
//!   the parent. A crash leaves at most a hidden temp dir, which [`remove_stale_temp_dirs`] deletes.
//!
//! Loading reads only the safetensors header and then the byte ranges of the requested tensors, so a rank that
//! needs a few tensors ([`load_checkpoint_filtered`]) does not read whole shards.

mod read;
mod write;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use read::{
    TensorMeta, checkpoint_tensors, load_checkpoint, load_checkpoint_filtered, load_file,
    load_file_filtered, read_i64_tensor,
};
pub use write::{
    DEFAULT_MAX_SHARD_BYTES, HF_SIDE_FILES, SaveOptions, SaveReport, remove_stale_temp_dirs,
    save_checkpoint,
};

/// File name of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A dense row-major f32 tensor in host memory. Invariant: `data.len() == shape.iter().product()`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Builds a tensor, checking that `data` has `shape.iter().product()` elements.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, ShapeError> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(ShapeError {
                shape,
                len: data.len(),
            });
        }
        Ok(HostTensor { shape, data })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let numel = shape.iter().product();
        HostTensor {
            shape,
            data: vec![0.0; numel],
        }
    }

    /// Number of elements (`shape.iter().product()`).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// `HostTensor::new` with a data length that does not match the shape.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("shape {shape:?} needs {} elements, got {len}", shape.iter().product::<usize>())]
pub struct ShapeError {
    pub shape: Vec<usize>,
    pub len: usize,
}

/// Name → tensor, sorted by name.
pub type TensorMap = BTreeMap<String, HostTensor>;

/// Element type of tensors on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskDtype {
    F32,
    BF16,
    F16,
}

impl DiskDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DiskDtype::F32 => 4,
            DiskDtype::BF16 | DiskDtype::F16 => 2,
        }
    }

    /// The torch dtype name written into `config.json` (`torch_dtype` / `dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DiskDtype::F32 => "float32",
            DiskDtype::BF16 => "bfloat16",
            DiskDtype::F16 => "float16",
        }
    }

    fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DiskDtype::F32 => safetensors::Dtype::F32,
            DiskDtype::BF16 => safetensors::Dtype::BF16,
            DiskDtype::F16 => safetensors::Dtype::F16,
        }
    }

    fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::F32 => Some(DiskDtype::F32),
            safetensors::Dtype::BF16 => Some(DiskDtype::BF16),
            safetensors::Dtype::F16 => Some(DiskDtype::F16),
            _ => None,
        }
    }
}

/// Errors reading or writing checkpoints. Every variant names the file (and the tensor, where there is one).
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    #[error("{}: tensor `{tensor}`: {reason}", path.display())]
    BadTensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error("{}: no tensor `{tensor}`", path.display())]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{}: invalid shard index: {reason}", path.display())]
    BadIndex { path: PathBuf, reason: String },
    #[error("{}: not an HF checkpoint (neither {SINGLE_FILE} nor {INDEX_FILE})", dir.display())]
    NoCheckpoint { dir: PathBuf },
    #[error("{}: already exists; a committed checkpoint is never overwritten", path.display())]
    TargetExists { path: PathBuf },
    #[error("{}: cannot write tensors: {source}", path.display())]
    Serialize {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{}: config.json is not valid JSON: {source}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: save stopped before commit (fault injection)", path.display())]
    Interrupted { path: PathBuf },
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> HfError {
    let path = path.into();
    move |source| HfError::Io { path, source }
}
