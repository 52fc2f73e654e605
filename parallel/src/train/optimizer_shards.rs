//! Sharded optimizer state of multi-rank checkpoints (DESIGN §3): every rank writes the fp32 master weights and
//! AdamW moments it owns, addressed by global offsets into the full HF parameters; any layout reads back the
//! ranges it needs.
//!
//! # Layout
//!
//! ```text
//! checkpoint-<step>/optimizer/
//!   index.json                 OptimizerIndex: format_version, adam_step, every HF parameter (name, numel) in HF
//!                              order, the shard metadata files (written by global rank 0)
//!   shard-<rank>.json          ShardMeta: the ranges of global rank <rank> (one small file per rank)
//!   shard-<rank>.safetensors   F32 1-D `master.<key>`, `exp_avg.<key>`, `exp_avg_sq.<key>` per piece it owns
//! ```
//!
//! A [`ShardRange`] `{param, start, len, tensor, offset}` says: elements `[start, start+len)` of the full HF
//! parameter `param`, flattened row-major, are elements `[offset, offset+len)` of the three tensors
//! `master.<tensor>`, `exp_avg.<tensor>`, `exp_avg_sq.<tensor>` of that shard's safetensors file.
//!
//! # Who owns what
//!
//! A rank owns the pieces of its ZeRO-1 shard (the dp range of its flat local layout) whose parameter it counts in
//! the global gradient norm (`counts_in_norm`: TP-replicated tensors on tp rank 0, replicated kv heads on the
//! first replica, a tied embedding on the first pipeline stage, cp/ep replicas on their group's rank 0). The
//! global norm already relies on that rule counting each element of the model exactly once, so the shards
//! partition every parameter.
//!
//! Which global elements a rank's local parameters hold is not re-derived from the slicing rules: a
//! [`GlobalMap`] is measured once at start-up by slicing an "index model" (every element holds its own global
//! offset + 1, in two exact 24-bit f32 halves; 0 marks padding) with the model's own `local_from_full`, so it is
//! right for every TP/SP/PP/EP slicing by construction.
//!
//! # Invariants
//!
//! - [`ShardedOptimizer::open`] refuses (typed [`TrainError::Checkpoint`]) a checkpoint whose ranges do not cover
//!   every element of every parameter of the index exactly once.
//! - No rank ever materialises the full optimizer state to save; to load, a rank reads only the ranges of its own
//!   shard (one shard file at a time). Only the single-process trainer ([`read_full_states`]) reassembles full
//!   per-parameter states, which it holds anyway.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::checkpoint::write_f32_safetensors;
use super::{Result, TrainError, io_err};
use crate::hf::{self, HostTensor, TensorMap};
use crate::model::{ModelConfig, Qwen3Params};
use crate::optim::AdamWState;
use crate::zero::{DistributedOptimizer, ShardPiece};

/// The optimizer directory inside a checkpoint.
pub const OPTIMIZER_DIR: &str = "optimizer";
/// The index inside [`OPTIMIZER_DIR`].
pub const INDEX_FILE: &str = "index.json";
/// Version of [`OptimizerIndex`] / [`ShardMeta`].
pub const SHARDS_FORMAT_VERSION: u32 = 1;

/// `optimizer/index.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerIndex {
    pub format_version: u32,
    /// AdamW steps every piece has taken.
    pub adam_step: u64,
    /// Every HF parameter `(name, element count)`, in HF order.
    pub params: Vec<(String, u64)>,
    /// The [`ShardMeta`] files, relative to the optimizer directory.
    pub shards: Vec<String>,
}

/// `optimizer/shard-<rank>.json`: what one rank wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardMeta {
    pub format_version: u32,
    /// Global rank that wrote it.
    pub rank: usize,
    /// Its safetensors file, relative to the optimizer directory.
    pub file: String,
    pub ranges: Vec<ShardRange>,
}

/// Elements `[start, start+len)` of the full parameter `param` (row-major) are `[offset, offset+len)` of the
/// shard file's `master.<tensor>`, `exp_avg.<tensor>`, `exp_avg_sq.<tensor>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRange {
    pub param: String,
    pub start: u64,
    pub len: u64,
    pub tensor: String,
    pub offset: u64,
}

/// `shard-<rank>.json` / `shard-<rank>.safetensors`.
fn shard_names(rank: usize) -> (String, String) {
    (
        format!("shard-{rank}.json"),
        format!("shard-{rank}.safetensors"),
    )
}

/// Does `checkpoint_dir` hold sharded optimizer state?
pub fn is_sharded(checkpoint_dir: &Path) -> bool {
    checkpoint_dir
        .join(OPTIMIZER_DIR)
        .join(INDEX_FILE)
        .is_file()
}

/// A run of consecutive local elements that hold consecutive global elements of one parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalRun {
    /// First element in the local parameter (row-major).
    pub local: usize,
    /// Index into [`GlobalMap::params`].
    pub param: usize,
    /// First element in the full parameter (row-major).
    pub offset: usize,
    pub len: usize,
}

/// Where a rank's local parameters sit in the full HF parameters (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct GlobalMap {
    /// Every HF parameter `(name, element count)`, in HF order.
    pub params: Vec<(String, usize)>,
    /// Local parameter name → its runs, ascending by `local`.
    pub runs: HashMap<String, Vec<GlobalRun>>,
}

impl GlobalMap {
    /// Measures the map: `local_of(index model)` must slice full-layout tensors exactly like this rank's
    /// parameters and return `(local name, values)` of every local parameter.
    pub fn measure(
        config: &ModelConfig,
        local_of: &dyn Fn(&Qwen3Params) -> Result<Vec<(String, Vec<f32>)>>,
    ) -> Result<GlobalMap> {
        let device = qkernels::Device::Cpu;
        let mut params = Vec::new();
        let mut starts = Vec::new();
        let mut total = 0usize;
        let mut index_model = |half: u32| -> Result<Qwen3Params> {
            let mut off = 0usize;
            let first = params.is_empty();
            let p = Qwen3Params::build(config, &mut |name, shape| {
                let n: usize = shape.iter().product();
                if first {
                    params.push((name, n));
                    starts.push(off);
                }
                let data = (off..off + n)
                    .map(|i| {
                        let v = i as u64 + 1;
                        (if half == 0 { v >> 24 } else { v & 0xFF_FFFF }) as f32
                    })
                    .collect();
                off += n;
                Ok(qkernels::Tensor::from_f32(data, &shape, &device)?)
            })?;
            total = off;
            Ok(p)
        };
        let hi = local_of(&index_model(0)?)?;
        let lo = local_of(&index_model(1)?)?;
        if (total as u64) >= 1 << 48 {
            return Err(TrainError::Invalid {
                key: "model",
                reason: format!("{total} parameters: too many to address in a checkpoint index"),
            });
        }
        let mut runs: HashMap<String, Vec<GlobalRun>> = HashMap::new();
        for ((name, h), (name2, l)) in hi.into_iter().zip(lo) {
            debug_assert_eq!(name, name2);
            let mut out: Vec<GlobalRun> = Vec::new();
            for (i, (&h, &l)) in h.iter().zip(&l).enumerate() {
                let v = ((h as u64) << 24) | l as u64;
                if v == 0 {
                    continue; // padding: no global element
                }
                let g = (v - 1) as usize;
                let p = starts.partition_point(|&s| s <= g) - 1;
                let off = g - starts[p];
                match out.last_mut() {
                    Some(r) if r.param == p && r.local + r.len == i && r.offset + r.len == off => {
                        r.len += 1
                    }
                    _ => out.push(GlobalRun {
                        local: i,
                        param: p,
                        offset: off,
                        len: 1,
                    }),
                }
            }
            runs.insert(name, out);
        }
        Ok(GlobalMap { params, runs })
    }

    /// The runs of local parameter `name` restricted to its local elements `local`.
    fn runs_in(&self, name: &str, local: Range<usize>) -> Result<Vec<GlobalRun>> {
        let runs = self.runs.get(name).ok_or_else(|| TrainError::Invalid {
            key: "checkpoint",
            reason: format!("no global map for local parameter `{name}`"),
        })?;
        Ok(runs
            .iter()
            .filter_map(|r| {
                let lo = r.local.max(local.start);
                let hi = (r.local + r.len).min(local.end);
                (lo < hi).then(|| GlobalRun {
                    local: lo,
                    param: r.param,
                    offset: r.offset + (lo - r.local),
                    len: hi - lo,
                })
            })
            .collect())
    }
}

/// Writes `optimizer/index.json` into the (temporary) checkpoint directory `dir` for `world` shards. Rank 0.
pub fn write_index(
    dir: &Path,
    params: &[(String, usize)],
    adam_step: u64,
    world: usize,
) -> Result<()> {
    let odir = dir.join(OPTIMIZER_DIR);
    std::fs::create_dir_all(&odir).map_err(io_err(&odir))?;
    let index = OptimizerIndex {
        format_version: SHARDS_FORMAT_VERSION,
        adam_step,
        params: params.iter().map(|(n, k)| (n.clone(), *k as u64)).collect(),
        shards: (0..world).map(|r| shard_names(r).0).collect(),
    };
    write_json(&odir.join(INDEX_FILE), &index)
}

/// One piece of optimizer state a rank owns: elements `param` (row-major) of its local parameter `name`, with the
/// f32 master values and AdamW moments of exactly those elements.
pub struct PieceState<'a> {
    pub name: &'a str,
    pub param: std::ops::Range<usize>,
    pub master: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

/// Writes this rank's shard (`shard-<rank>.{json,safetensors}`) into `dir/optimizer/` (created by
/// [`write_index`] before): the pieces of `opt`'s ZeRO shard whose parameter `owns`, with their global ranges from
/// `map`. Returns how many f32 values per kind (master / exp_avg / exp_avg_sq) it wrote.
pub fn write_shard(
    dir: &Path,
    rank: usize,
    opt: &DistributedOptimizer,
    map: &GlobalMap,
    owns: &dyn Fn(&str) -> bool,
) -> Result<usize> {
    let states: HashMap<&str, &AdamWState> = opt.shard_states().collect();
    let master = opt.master_shard();
    let pieces = opt
        .shard_pieces()
        .into_iter()
        .filter(|p| owns(p.name))
        .map(|piece| {
            let n = piece.param.len();
            let (m, v) = match states.get(piece.name) {
                Some(st) => (st.exp_avg.clone(), st.exp_avg_sq.clone()),
                None => (vec![0.0; n], vec![0.0; n]),
            };
            PieceState {
                name: piece.name,
                param: piece.param,
                master: master[piece.shard].to_vec(),
                exp_avg: m,
                exp_avg_sq: v,
            }
        })
        .collect();
    write_pieces(dir, rank, map, pieces)
}

/// Writes `pieces` as this rank's shard (`shard-<rank>.{json,safetensors}`) into `dir/optimizer/`, each with its
/// global ranges from `map`: the one writer behind [`write_shard`] (ZeRO shards) and the device optimizer's
/// whole-parameter pieces. Returns how many f32 values per kind it wrote.
pub fn write_pieces(dir: &Path, rank: usize, map: &GlobalMap, pieces: Vec<PieceState<'_>>) -> Result<usize> {
    let odir = dir.join(OPTIMIZER_DIR);
    let (meta_name, file) = shard_names(rank);
    let mut tensors = TensorMap::new();
    let mut ranges = Vec::new();
    let mut written = 0;
    for piece in pieces {
        let n = piece.param.len();
        let key = piece.name.to_string();
        for r in map.runs_in(piece.name, piece.param.clone())? {
            ranges.push(ShardRange {
                param: map.params[r.param].0.clone(),
                start: r.offset as u64,
                len: r.len as u64,
                tensor: key.clone(),
                offset: (r.local - piece.param.start) as u64,
            });
        }
        let one_d = |data: Vec<f32>| HostTensor {
            shape: vec![n],
            data,
        };
        tensors.insert(format!("master.{key}"), one_d(piece.master));
        tensors.insert(format!("exp_avg.{key}"), one_d(piece.exp_avg));
        tensors.insert(format!("exp_avg_sq.{key}"), one_d(piece.exp_avg_sq));
        written += n;
    }
    write_f32_safetensors(&odir.join(&file), &tensors)?;
    let meta = ShardMeta {
        format_version: SHARDS_FORMAT_VERSION,
        rank,
        file,
        ranges,
    };
    write_json(&odir.join(meta_name), &meta)?;
    Ok(written)
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("index serialises") + "\n";
    std::fs::write(path, text).map_err(io_err(path))?;
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("unreadable: {e}"),
    })
}

/// One range as the reader keeps it.
#[derive(Debug, Clone)]
struct Located {
    start: usize,
    len: usize,
    shard: usize,
    tensor: String,
    offset: usize,
}

/// The f32 master weights and AdamW moments of some elements, in the caller's order.
#[derive(Debug, Clone, PartialEq)]
pub struct StateValues {
    pub master: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

/// An opened sharded optimizer state: the index and every shard's ranges (small), checked to partition every
/// parameter; values are read on demand.
#[derive(Debug, Clone)]
pub struct ShardedOptimizer {
    dir: PathBuf,
    index: OptimizerIndex,
    /// Parameter name → index in `index.params`.
    param_ids: HashMap<String, usize>,
    /// Safetensors file of each shard.
    files: Vec<PathBuf>,
    /// Per parameter (index order): its ranges ascending by `start`, covering `[0, numel)` once.
    located: Vec<Vec<Located>>,
}

impl ShardedOptimizer {
    /// Reads `checkpoint_dir/optimizer/index.json` and every shard's metadata, and checks that the ranges cover
    /// every element of every parameter exactly once.
    pub fn open(checkpoint_dir: &Path) -> Result<ShardedOptimizer> {
        let dir = checkpoint_dir.join(OPTIMIZER_DIR);
        let index_path = dir.join(INDEX_FILE);
        let index: OptimizerIndex = read_json(&index_path)?;
        let bad = |path: &Path, reason: String| TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        if index.format_version != SHARDS_FORMAT_VERSION {
            return Err(bad(
                &index_path,
                format!(
                    "format_version {} (this build reads {SHARDS_FORMAT_VERSION})",
                    index.format_version
                ),
            ));
        }
        let param_ids: HashMap<String, usize> = index
            .params
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        let mut located: Vec<Vec<Located>> = vec![Vec::new(); index.params.len()];
        let mut files = Vec::new();
        for (s, meta_name) in index.shards.iter().enumerate() {
            let meta_path = dir.join(meta_name);
            let meta: ShardMeta = read_json(&meta_path)?;
            files.push(dir.join(&meta.file));
            for r in meta.ranges {
                let p = *param_ids.get(&r.param).ok_or_else(|| {
                    bad(
                        &meta_path,
                        format!("parameter `{}` is not in the index", r.param),
                    )
                })?;
                located[p].push(Located {
                    start: r.start as usize,
                    len: r.len as usize,
                    shard: s,
                    tensor: r.tensor,
                    offset: r.offset as usize,
                });
            }
        }
        for (p, ranges) in located.iter_mut().enumerate() {
            ranges.sort_by_key(|r| r.start);
            let (name, numel) = &index.params[p];
            let mut covered = 0usize;
            for r in ranges.iter() {
                if r.start != covered {
                    return Err(bad(
                        &index_path,
                        if r.start < covered {
                            format!(
                                "parameter `{name}`: elements from {} are in two shards",
                                r.start
                            )
                        } else {
                            format!(
                                "parameter `{name}`: elements [{covered}, {}) are in no shard",
                                r.start
                            )
                        },
                    ));
                }
                covered += r.len;
            }
            if covered as u64 != *numel {
                return Err(bad(
                    &index_path,
                    format!("parameter `{name}`: shards cover {covered} of {numel} elements"),
                ));
            }
        }
        Ok(ShardedOptimizer {
            dir,
            index,
            param_ids,
            files,
            located,
        })
    }

    pub fn index(&self) -> &OptimizerIndex {
        &self.index
    }

    /// AdamW steps of every piece.
    pub fn adam_step(&self) -> u64 {
        self.index.adam_step
    }

    /// Reads the values of `wants` — `(parameter, element range of the full parameter, destination offset)` —
    /// into buffers of `len` elements (untouched elements stay 0). Loads each shard file that holds any wanted
    /// element once, one at a time.
    pub fn read(&self, len: usize, wants: &[(&str, Range<usize>, usize)]) -> Result<StateValues> {
        // (shard, tensor, src offset, dst offset, len)
        let mut copies: Vec<(usize, &str, usize, usize, usize)> = Vec::new();
        for (name, range, dst) in wants {
            let p = *self
                .param_ids
                .get(*name)
                .ok_or_else(|| TrainError::Checkpoint {
                    path: self.dir.join(INDEX_FILE),
                    reason: format!("no optimizer state for parameter `{name}`"),
                })?;
            let numel = self.index.params[p].1 as usize;
            if range.end > numel || dst + range.len() > len {
                return Err(TrainError::Checkpoint {
                    path: self.dir.join(INDEX_FILE),
                    reason: format!(
                        "range {range:?} of `{name}` ({numel} elements) does not fit the request"
                    ),
                });
            }
            let ranges = &self.located[p];
            let mut k = ranges.partition_point(|r| r.start + r.len <= range.start);
            while k < ranges.len() && ranges[k].start < range.end {
                let r = &ranges[k];
                let lo = r.start.max(range.start);
                let hi = (r.start + r.len).min(range.end);
                copies.push((
                    r.shard,
                    r.tensor.as_str(),
                    r.offset + (lo - r.start),
                    dst + (lo - range.start),
                    hi - lo,
                ));
                k += 1;
            }
        }
        copies.sort_by_key(|c| c.0);
        let mut out = StateValues {
            master: vec![0.0; len],
            exp_avg: vec![0.0; len],
            exp_avg_sq: vec![0.0; len],
        };
        let mut i = 0;
        while i < copies.len() {
            let shard = copies[i].0;
            let path = &self.files[shard];
            let tensors = hf::load_file(path)?;
            while i < copies.len() && copies[i].0 == shard {
                let (_, tensor, src, dst, n) = copies[i];
                for (kind, buf) in [
                    ("master", &mut out.master),
                    ("exp_avg", &mut out.exp_avg),
                    ("exp_avg_sq", &mut out.exp_avg_sq),
                ] {
                    let key = format!("{kind}.{tensor}");
                    let t = tensors
                        .get(&key)
                        .filter(|t| t.data.len() >= src + n)
                        .ok_or_else(|| TrainError::Checkpoint {
                            path: path.clone(),
                            reason: format!("no tensor `{key}` with elements [{src}, {})", src + n),
                        })?;
                    buf[dst..dst + n].copy_from_slice(&t.data[src..src + n]);
                }
                i += 1;
            }
        }
        Ok(out)
    }

    /// Reads the whole state of the local parameters `params` (`(name, numel)`, in this order) through `map`,
    /// concatenated in that order (the device optimizer, which holds every local parameter whole).
    pub fn read_params(&self, params: &[(String, usize)], map: &GlobalMap) -> Result<StateValues> {
        let mut wants = Vec::new();
        let mut at = 0;
        for (name, n) in params {
            for r in map.runs_in(name, 0..*n)? {
                wants.push((map.params[r.param].0.as_str(), r.offset..r.offset + r.len, at + r.local));
            }
            at += n;
        }
        self.read(at, &wants)
    }

    /// Reads the state of `opt`'s ZeRO shard (every piece, owned or replicated) through `map`, in the layout of
    /// [`DistributedOptimizer::master_shard`].
    pub fn read_shard(&self, opt: &DistributedOptimizer, map: &GlobalMap) -> Result<StateValues> {
        self.read_pieces(opt.shard_range().0.len(), &opt.shard_pieces(), map)
    }

    /// Reads the state of a ZeRO shard of `shard_len` values made of `pieces` (host or device optimizer)
    /// through `map`, laid out like the shard.
    pub fn read_pieces(&self, shard_len: usize, pieces: &[ShardPiece<'_>], map: &GlobalMap) -> Result<StateValues> {
        let mut wants = Vec::new();
        for piece in pieces {
            for r in map.runs_in(piece.name, piece.param.clone())? {
                wants.push((
                    map.params[r.param].0.as_str(),
                    r.offset..r.offset + r.len,
                    piece.shard.start + (r.local - piece.param.start),
                ));
            }
        }
        self.read(shard_len, &wants)
    }
}

/// The full per-parameter AdamW states of a sharded checkpoint (the single-process trainer resuming a
/// multi-rank run), each with `steps[name]` steps.
pub fn read_full_states(
    checkpoint_dir: &Path,
    steps: &BTreeMap<String, u64>,
) -> Result<Vec<(String, AdamWState)>> {
    let opt = ShardedOptimizer::open(checkpoint_dir)?;
    // One read of everything (each shard file loaded once), split per parameter afterwards.
    let mut wants = Vec::with_capacity(steps.len());
    let mut total = 0;
    for name in steps.keys() {
        let p = *opt
            .param_ids
            .get(name)
            .ok_or_else(|| TrainError::Checkpoint {
                path: opt.dir.join(INDEX_FILE),
                reason: format!("no optimizer state for parameter `{name}`"),
            })?;
        let n = opt.index.params[p].1 as usize;
        wants.push((name.as_str(), 0..n, total));
        total += n;
    }
    let v = opt.read(total, &wants)?;
    Ok(wants
        .iter()
        .zip(steps.values())
        .map(|((name, r, dst), &step)| {
            (
                name.to_string(),
                AdamWState {
                    step,
                    exp_avg: v.exp_avg[*dst..dst + r.len()].to_vec(),
                    exp_avg_sq: v.exp_avg_sq[*dst..dst + r.len()].to_vec(),
                },
            )
        })
        .collect())
}
