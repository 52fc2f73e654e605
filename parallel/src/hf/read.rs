//! Reading safetensors files and HF checkpoint directories.
//!
//! A safetensors file is `u64 little-endian header length N`, `N bytes of JSON header`
//! (`{"<name>": {"dtype": "BF16", "shape": [..], "data_offsets": [start, end]}, "__metadata__": {..}}`), then the
//! data; offsets are relative to the end of the header. We parse and validate the header (dtype known, byte length
//! = numel × element size, range inside the file) and then read only the byte ranges of the tensors asked for.
//! (The `safetensors` crate's reader needs the whole file in memory, which a rank loading its part of a 5 GB shard
//! should not pay for; the crate is used for writing and for its `Dtype`.)

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{DiskDtype, HfError, HostTensor, INDEX_FILE, SINGLE_FILE, TensorMap, io_err};

/// Headers above this size are rejected (the safetensors format's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// What the header says about one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMeta {
    /// The file holding it.
    pub file: PathBuf,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
}

struct Entry {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

fn bad_file(path: &Path, reason: impl Into<String>) -> HfError {
    HfError::BadFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn bad_tensor(path: &Path, tensor: &str, reason: impl Into<String>) -> HfError {
    HfError::BadTensor {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        reason: reason.into(),
    }
}

/// Reads and validates the header of `path`; returns the open file and its tensors.
fn read_header(path: &Path) -> Result<(File, BTreeMap<String, Entry>), HfError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let file_len = f.metadata().map_err(io_err(path))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad_file(path, format!("{file_len} bytes, too short for a header")))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_BYTES || 8 + n > file_len {
        return Err(bad_file(
            path,
            format!("header length {n} does not fit the file ({file_len} bytes)"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io_err(path))?;
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad_file(path, format!("header is not a JSON object: {e}")))?;
    let data_start = 8 + n;
    let mut out = BTreeMap::new();
    for (name, v) in raw {
        if name == "__metadata__" {
            continue;
        }
        let e: RawEntry = serde_json::from_value(v)
            .map_err(|e| bad_tensor(path, &name, format!("bad header entry: {e}")))?;
        let (start, end) = e.data_offsets;
        let numel: u64 = e.shape.iter().map(|&d| d as u64).product();
        let want_bytes = (numel * e.dtype.bitsize() as u64).div_ceil(8);
        if end < start || end - start != want_bytes {
            return Err(bad_tensor(
                path,
                &name,
                format!(
                    "data_offsets [{start}, {end}) hold {} bytes, shape {:?} × {:?} needs {want_bytes}",
                    end.saturating_sub(start),
                    e.shape,
                    e.dtype
                ),
            ));
        }
        if data_start + end > file_len {
            return Err(bad_tensor(
                path,
                &name,
                format!(
                    "data ends at byte {} past the end of the file ({file_len})",
                    data_start + end
                ),
            ));
        }
        out.insert(
            name,
            Entry {
                dtype: e.dtype,
                shape: e.shape,
                start: data_start + start,
                end: data_start + end,
            },
        );
    }
    Ok((f, out))
}

fn read_bytes(f: &mut File, path: &Path, e: &Entry) -> Result<Vec<u8>, HfError> {
    let mut buf = vec![0u8; (e.end - e.start) as usize];
    f.seek(SeekFrom::Start(e.start)).map_err(io_err(path))?;
    f.read_exact(&mut buf).map_err(io_err(path))?;
    Ok(buf)
}

fn to_f32(dtype: DiskDtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DiskDtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DiskDtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DiskDtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}

/// Reads the tensors of one file for which `keep(name)` is true, in file order.
fn read_tensors(
    path: &Path,
    only: Option<&[String]>,
    keep: &mut dyn FnMut(&str) -> bool,
    out: &mut TensorMap,
) -> Result<(), HfError> {
    let (mut f, header) = read_header(path)?;
    let mut wanted: Vec<(&String, &Entry)> = match only {
        Some(names) => names
            .iter()
            .map(|n| {
                header
                    .get_key_value(n)
                    .ok_or_else(|| HfError::MissingTensor {
                        path: path.to_path_buf(),
                        tensor: n.clone(),
                    })
            })
            .collect::<Result<_, _>>()?,
        None => header.iter().collect(),
    };
    wanted.retain(|(n, _)| keep(n));
    wanted.sort_by_key(|(_, e)| e.start); // sequential reads
    for (name, e) in wanted {
        let dtype = DiskDtype::from_safetensors(e.dtype).ok_or_else(|| {
            bad_tensor(
                path,
                name,
                format!(
                    "dtype {:?} is not a float type we load (F32, BF16, F16)",
                    e.dtype
                ),
            )
        })?;
        let bytes = read_bytes(&mut f, path, e)?;
        let t = HostTensor {
            shape: e.shape.clone(),
            data: to_f32(dtype, &bytes),
        };
        if out.insert(name.clone(), t).is_some() {
            return Err(bad_tensor(
                path,
                name,
                "tensor appears in more than one file",
            ));
        }
    }
    Ok(())
}

/// Loads every tensor of one safetensors file as f32 (F32/BF16/F16 on disk).
pub fn load_file(path: impl AsRef<Path>) -> Result<TensorMap, HfError> {
    load_file_filtered(path, |_| true)
}

/// Loads the tensors of one safetensors file whose name passes `keep`.
pub fn load_file_filtered(
    path: impl AsRef<Path>,
    mut keep: impl FnMut(&str) -> bool,
) -> Result<TensorMap, HfError> {
    let mut out = TensorMap::new();
    read_tensors(path.as_ref(), None, &mut keep, &mut out)?;
    Ok(out)
}

/// Reads an integer tensor (I64, I32, U8 on disk) as i64, e.g. `input_ids` of a golden file.
pub fn read_i64_tensor(
    path: impl AsRef<Path>,
    name: &str,
) -> Result<(Vec<usize>, Vec<i64>), HfError> {
    let path = path.as_ref();
    let (mut f, header) = read_header(path)?;
    let e = header.get(name).ok_or_else(|| HfError::MissingTensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
    })?;
    let bytes = read_bytes(&mut f, path, e)?;
    let data = match e.dtype {
        safetensors::Dtype::I64 => bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("chunk of 8")))
            .collect(),
        safetensors::Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("chunk of 4")) as i64)
            .collect(),
        safetensors::Dtype::U8 => bytes.iter().map(|&b| b as i64).collect(),
        other => {
            return Err(bad_tensor(
                path,
                name,
                format!("dtype {other:?} is not an integer type (I64, I32, U8)"),
            ));
        }
    };
    Ok((e.shape.clone(), data))
}

/// Each weight file of a checkpoint with the tensor names the index assigns to it (`None`: all of them).
type FilePlan = Vec<(PathBuf, Option<Vec<String>>)>;

/// The files of a checkpoint dir: `[(file, Some(names from the index))]` or `[(model.safetensors, None)]`.
fn checkpoint_files(dir: &Path) -> Result<FilePlan, HfError> {
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![(single, None)]);
    }
    let index = dir.join(INDEX_FILE);
    if !index.is_file() {
        return Err(HfError::NoCheckpoint {
            dir: dir.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
    let bad = |reason: String| HfError::BadIndex {
        path: index.clone(),
        reason,
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[{name:?}] is not a file name")))?;
        if file.is_empty()
            || file.contains('/')
            || file.contains('\\')
            || file == ".."
            || file == "."
        {
            return Err(bad(format!(
                "weight_map[{name:?}] = {file:?} is not a plain file name in the checkpoint dir"
            )));
        }
        by_file
            .entry(file.to_string())
            .or_default()
            .push(name.clone());
    }
    if by_file.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    Ok(by_file
        .into_iter()
        .map(|(file, names)| (dir.join(file), Some(names)))
        .collect())
}

/// Loads every tensor of a checkpoint dir (single file or sharded) as f32.
pub fn load_checkpoint(dir: impl AsRef<Path>) -> Result<TensorMap, HfError> {
    load_checkpoint_filtered(dir, |_| true)
}

/// Loads the tensors of a checkpoint dir whose name passes `keep`; shards without such tensors are not opened
/// beyond their header.
pub fn load_checkpoint_filtered(
    dir: impl AsRef<Path>,
    mut keep: impl FnMut(&str) -> bool,
) -> Result<TensorMap, HfError> {
    let mut out = TensorMap::new();
    for (file, names) in checkpoint_files(dir.as_ref())? {
        read_tensors(&file, names.as_deref(), &mut keep, &mut out)?;
    }
    Ok(out)
}

/// Names, dtypes, shapes and files of all tensors of a checkpoint dir, from the headers only (no data read).
pub fn checkpoint_tensors(dir: impl AsRef<Path>) -> Result<BTreeMap<String, TensorMeta>, HfError> {
    let mut out = BTreeMap::new();
    for (file, names) in checkpoint_files(dir.as_ref())? {
        let (_, header) = read_header(&file)?;
        let names: Vec<String> = match names {
            Some(n) => n,
            None => header.keys().cloned().collect(),
        };
        for n in names {
            let e = header.get(&n).ok_or_else(|| HfError::MissingTensor {
                path: file.clone(),
                tensor: n.clone(),
            })?;
            let meta = TensorMeta {
                file: file.clone(),
                dtype: e.dtype,
                shape: e.shape.clone(),
            };
            if out.insert(n.clone(), meta).is_some() {
                return Err(bad_tensor(
                    &file,
                    &n,
                    "tensor appears in more than one file",
                ));
            }
        }
    }
    Ok(out)
}
