//! PEFT adapter directories: reading and writing `adapter_config.json` + `adapter_model.safetensors`, finding the
//! base model, and merging adapters into a full HF model directory.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::adapters::LoraAdapters;
use super::config::{ALL_LINEAR, LoraConfig, TargetModules};
use super::{LoraError, Result, io_err};
use crate::hf::{self, DiskDtype, HF_SIDE_FILES, SaveOptions, SaveReport, TensorMap};

/// The adapter settings file of a PEFT adapter directory.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// The adapter tensors of a PEFT adapter directory.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Files of [`HF_SIDE_FILES`] that are not tokenizer files and so are not copied into adapter directories.
const NOT_TOKENIZER: &[&str] = &["generation_config.json", "preprocessor_config.json"];

/// What `adapter_config.json` says.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    pub lora: LoraConfig,
    /// The base model as written (an absolute directory in what we write; PEFT writes what it was loaded from).
    pub base_model_name_or_path: Option<String>,
}

/// Whether `dir` is a PEFT adapter directory (holds `adapter_config.json`).
pub fn is_adapter_dir(dir: impl AsRef<Path>) -> bool {
    dir.as_ref().join(ADAPTER_CONFIG_FILE).is_file()
}

fn cfg_err(path: &Path, key: &str, reason: impl Into<String>) -> LoraError {
    LoraError::AdapterConfig {
        path: path.to_path_buf(),
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// Reads and checks `dir/adapter_config.json` (see the module docs of [`crate::lora`] for what is refused).
///
/// A `target_modules` given as a regular expression (a string other than `all-linear`) is replaced by the full
/// module names that `adapter_model.safetensors` holds adapters for (read from its header only).
pub fn read_adapter_config(dir: impl AsRef<Path>) -> Result<AdapterConfig> {
    let dir = dir.as_ref();
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| cfg_err(&path, "*", format!("not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| cfg_err(&path, "*", "not a JSON object"))?;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());

    match get("peft_type").and_then(Value::as_str) {
        Some(t) if t.eq_ignore_ascii_case("lora") => {}
        other => {
            return Err(cfg_err(
                &path,
                "peft_type",
                format!("{other:?}: only LORA adapters are supported"),
            ));
        }
    }
    let rank = get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| cfg_err(&path, "r", "missing or not a positive integer"))?
        as usize;
    let alpha = match get("lora_alpha") {
        None => 8.0, // PEFT's default
        Some(a) => a
            .as_f64()
            .ok_or_else(|| cfg_err(&path, "lora_alpha", "not a number"))?,
    };
    let dropout = match get("lora_dropout") {
        None => 0.0,
        Some(d) => d
            .as_f64()
            .ok_or_else(|| cfg_err(&path, "lora_dropout", "not a number"))?,
    };

    // Settings that change the maths or the tensor set: refuse rather than merge something else.
    let truthy = |k: &str| match get(k) {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    for (key, why) in [
        ("use_rslora", "rank-stabilised scaling alpha/√r"),
        ("use_dora", "DoRA magnitude vectors"),
        ("fan_in_fan_out", "transposed (Conv1D) weights"),
        ("rank_pattern", "per-module ranks"),
        ("alpha_pattern", "per-module alphas"),
        ("modules_to_save", "fully trained extra modules"),
        (
            "target_parameters",
            "adapters on raw parameters (fused experts)",
        ),
        ("trainable_token_indices", "trainable token embeddings"),
        ("lora_bias", "bias on lora_B"),
    ] {
        if truthy(key) {
            return Err(cfg_err(
                &path,
                key,
                format!("{why} are not supported (plain LoRA only)"),
            ));
        }
    }
    match get("bias").and_then(Value::as_str) {
        None | Some("none") => {}
        Some(b) => {
            return Err(cfg_err(
                &path,
                "bias",
                format!("`{b}`: only \"none\" is supported"),
            ));
        }
    }

    let target_modules = match get("target_modules") {
        Some(Value::String(s)) if s.eq_ignore_ascii_case(ALL_LINEAR) => TargetModules::AllLinear,
        Some(Value::String(_)) => {
            // A regular expression: name exactly the modules the weights file adapts.
            let file = dir.join(ADAPTER_WEIGHTS_FILE);
            let mut modules = BTreeSet::new();
            hf::load_file_filtered(&file, |name| {
                if let Some((w, _)) = super::parse_peft_key(name) {
                    modules.insert(w.trim_end_matches(".weight").to_string());
                }
                false
            })?;
            TargetModules::Names(modules.into_iter().collect())
        }
        Some(Value::Array(a)) => TargetModules::Names(
            a.iter()
                .map(|x| {
                    x.as_str().map(str::to_string).ok_or_else(|| {
                        cfg_err(&path, "target_modules", format!("{x} is not a string"))
                    })
                })
                .collect::<Result<_>>()?,
        ),
        other => {
            return Err(cfg_err(
                &path,
                "target_modules",
                format!("{other:?}: expected a list of module names or \"{ALL_LINEAR}\""),
            ));
        }
    };
    let lora = LoraConfig {
        rank,
        alpha,
        dropout,
        target_modules,
    };
    lora.validate().map_err(|e| match e {
        LoraError::Invalid { key, reason } => {
            cfg_err(&path, key.trim_start_matches("lora."), reason)
        }
        e => e,
    })?;
    Ok(AdapterConfig {
        lora,
        base_model_name_or_path: get("base_model_name_or_path")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string),
    })
}

/// Reads a PEFT adapter directory: its config and its tensors (F32/BF16/F16 on disk, f32 in memory).
pub fn read_adapters(dir: impl AsRef<Path>) -> Result<(LoraConfig, LoraAdapters)> {
    let dir = dir.as_ref();
    let config = read_adapter_config(dir)?.lora;
    let file = dir.join(ADAPTER_WEIGHTS_FILE);
    if !file.is_file() && dir.join("adapter_model.bin").is_file() {
        return Err(LoraError::AdapterTensor {
            path: dir.join("adapter_model.bin"),
            tensor: "*".into(),
            reason: "pickled adapters are not read; save with safe_serialization=True".into(),
        });
    }
    let tensors = hf::load_file(&file)?;
    let adapters = LoraAdapters::from_peft_tensors(config.rank, config.scaling(), tensors, &file)?;
    Ok((config, adapters))
}

/// The base model directory an adapter directory names (`base_model_name_or_path`): an absolute path as is; a
/// relative one against the current directory, then against the adapter directory. It must hold `config.json`.
/// Hub ids are not resolved (nothing is downloaded).
pub fn base_model_dir(adapters_dir: impl AsRef<Path>) -> Result<PathBuf> {
    let adapters_dir = adapters_dir.as_ref();
    let cfg = read_adapter_config(adapters_dir)?;
    let Some(name) = cfg.base_model_name_or_path else {
        return Err(LoraError::BaseModel {
            reason: format!(
                "{} names no base_model_name_or_path; give the base model directory explicitly",
                adapters_dir.join(ADAPTER_CONFIG_FILE).display()
            ),
        });
    };
    let p = PathBuf::from(&name);
    let candidates = if p.is_absolute() {
        vec![p]
    } else {
        vec![p.clone(), adapters_dir.join(&p)]
    };
    for c in candidates {
        if c.join("config.json").is_file() {
            return Ok(c);
        }
    }
    Err(LoraError::BaseModel {
        reason: format!(
            "base_model_name_or_path `{name}` in {} is not a local model directory with config.json (hub ids \
             are not downloaded); give the base model directory explicitly",
            adapters_dir.join(ADAPTER_CONFIG_FILE).display()
        ),
    })
}

/// The `adapter_config.json` we write: PEFT's fields for plain LoRA. `target_modules` is the list of module names
/// (the distinct last name components of the adapted weights for `all-linear`, as PEFT resolves it).
fn config_json(config: &LoraConfig, adapters: &LoraAdapters, base_model: &Path) -> Value {
    let targets: Vec<String> = match &config.target_modules {
        TargetModules::AllLinear => adapters
            .pairs
            .keys()
            .map(|w| {
                let module = w.strip_suffix(".weight").unwrap_or(w);
                module.rsplit('.').next().unwrap_or(module).to_string()
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        TargetModules::Names(n) => n.clone(),
    };
    let alpha = if config.alpha.fract() == 0.0 && config.alpha.abs() < 1e15 {
        json!(config.alpha as i64)
    } else {
        json!(config.alpha)
    };
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model.display().to_string(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": adapters.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": false,
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io_err(path))
}

fn fsync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))
}

/// Writes `adapter_config.json`, `adapter_model.safetensors` (F32) and the tokenizer files of `base_model` (the
/// [`HF_SIDE_FILES`] there, except generation/preprocessor configs) into the existing directory `dir`, each file
/// fsynced. Not atomic by itself: [`save_adapters`] and the training checkpoints write into a temp dir and rename.
/// `base_model` is written as an absolute path.
pub fn write_adapter_files(
    dir: &Path,
    config: &LoraConfig,
    adapters: &LoraAdapters,
    base_model: &Path,
) -> Result<()> {
    config.validate()?;
    if adapters.rank != config.rank {
        return Err(LoraError::Invalid {
            key: "lora.rank",
            reason: format!(
                "the config says {}, the adapters have rank {}",
                config.rank, adapters.rank
            ),
        });
    }
    let base_abs = std::fs::canonicalize(base_model).map_err(io_err(base_model))?;
    let cfg_path = dir.join(ADAPTER_CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config_json(config, adapters, &base_abs))
        .expect("JSON")
        + "\n";
    write_synced(&cfg_path, text.as_bytes())?;

    let tensors: TensorMap = adapters.to_peft_tensors();
    let file = dir.join(ADAPTER_WEIGHTS_FILE);
    let encoded: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| {
            let bytes = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (k.clone(), bytes, t.shape.clone())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = encoded
        .iter()
        .map(|(k, b, s)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .expect("length matches shape");
            (k.clone(), v)
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &file).map_err(|e| {
        LoraError::AdapterTensor {
            path: file.clone(),
            tensor: "*".into(),
            reason: format!("cannot write: {e}"),
        }
    })?;
    fsync(&file)?;

    for f in HF_SIDE_FILES.iter().filter(|f| !NOT_TOKENIZER.contains(f)) {
        let from = base_model.join(f);
        if from.is_file() {
            let to = dir.join(f);
            std::fs::copy(&from, &to).map_err(io_err(&from))?;
            fsync(&to)?;
        }
    }
    Ok(())
}

/// Saves adapters as the PEFT directory `dir` (see [`write_adapter_files`]), committed atomically: written into the
/// hidden sibling `.<name>.tmp-<pid>-lora`, fsynced, renamed. Refuses an existing `dir`.
pub fn save_adapters(
    dir: &Path,
    config: &LoraConfig,
    adapters: &LoraAdapters,
    base_model: &Path,
) -> Result<()> {
    if dir.exists() {
        return Err(LoraError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists"),
        });
    }
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| LoraError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no UTF-8 final name"),
        })?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let tmp = parent.join(format!(".{name}.tmp-{}-lora", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    let result = (|| {
        write_adapter_files(&tmp, config, adapters, base_model)?;
        fsync(&tmp)?;
        std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
        fsync(&parent)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// The base model's tensors with every adapted weight `W` replaced by `W + (alpha/r)·B·A` (computed in f32 by
/// [`super::effective_weight`], the same function training uses). `base_dir` is an HF model directory,
/// `adapters_dir` a PEFT adapter directory; every adapted weight must exist in the base with the matching shape.
pub fn merged_weights(base_dir: &Path, adapters_dir: &Path) -> Result<TensorMap> {
    let (_, adapters) = read_adapters(adapters_dir)?;
    let mut base = hf::load_checkpoint(base_dir)?;
    adapters.merge_into(&mut base)?;
    Ok(base)
}

/// [`merged_weights`] written as a full HF model directory `out_dir` (config.json and the tokenizer /
/// generation_config files of the base, safetensors in `dtype`), committed atomically by
/// [`hf::save_checkpoint`]. Refuses an existing `out_dir`.
pub fn merge_to_dir_as(
    base_dir: &Path,
    adapters_dir: &Path,
    out_dir: &Path,
    dtype: DiskDtype,
) -> Result<SaveReport> {
    if out_dir.exists() {
        return Err(hf::HfError::TargetExists {
            path: out_dir.to_path_buf(),
        }
        .into());
    }
    let merged = merged_weights(base_dir, adapters_dir)?;
    Ok(hf::save_checkpoint(
        out_dir,
        &merged,
        &SaveOptions::new(dtype).source_dir(base_dir),
    )?)
}

/// [`merge_to_dir_as`] in the base checkpoint's own dtype (BF16 or F16 when all its tensors are stored so,
/// F32 otherwise).
pub fn merge_to_dir(base_dir: &Path, adapters_dir: &Path, out_dir: &Path) -> Result<SaveReport> {
    let metas = hf::checkpoint_tensors(base_dir)?;
    let mut dtypes = metas.values().map(|m| m.dtype);
    let first = dtypes.next();
    let dtype = match first {
        Some(d) if dtypes.all(|x| x == d) => match d {
            safetensors::Dtype::BF16 => DiskDtype::BF16,
            safetensors::Dtype::F16 => DiskDtype::F16,
            _ => DiskDtype::F32,
        },
        _ => DiskDtype::F32,
    };
    merge_to_dir_as(base_dir, adapters_dir, out_dir, dtype)
}
