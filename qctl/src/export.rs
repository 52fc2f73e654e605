//! `qctl export --adapters DIR --merge-lora --out DIR [--model DIR]`: merges PEFT LoRA adapters (a LoRA run's
//! `checkpoint-N/`, or any PEFT adapter directory) into their base model and writes a full HF model directory
//! (config.json, safetensors, tokenizer and generation config of the base), committed atomically.
//!
//! The merged weight of every adapted linear layer is `W + (lora_alpha / r)·B·A` (see `qparallel::lora`).
//! `--model` defaults to the adapter_config.json's `base_model_name_or_path`. Without `--merge-lora` nothing is
//! converted: an adapter directory already is the PEFT format, so the command says so and does nothing.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use qparallel::hf::DiskDtype;
use qparallel::lora;

/// Element type of the merged safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportDtype {
    /// The base checkpoint's own dtype (bf16/f16 when all its tensors are, f32 otherwise).
    Auto,
    F32,
    Bf16,
    F16,
}

/// `qctl export`
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Base HF model directory (default: `base_model_name_or_path` of the adapters' adapter_config.json).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors), e.g. checkpoint-N of a LoRA run.
    #[arg(long)]
    pub adapters: PathBuf,
    /// Merge the adapters into the base weights and write a full model (the only export there is).
    #[arg(long)]
    pub merge_lora: bool,
    /// Output directory (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// dtype of the written weights.
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: ExportDtype,
}

pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    if !lora::is_adapter_dir(&args.adapters) {
        bail!(
            "{} is not a PEFT adapter directory (no {})",
            args.adapters.display(),
            lora::ADAPTER_CONFIG_FILE
        );
    }
    if !args.merge_lora {
        bail!(
            "nothing to export without --merge-lora: {} already is a PEFT adapter directory ({} + {}) that PEFT, \
             vLLM (--lora-modules) and `qctl infer` load as it is — copy it as it is, or pass --merge-lora to write \
             a full model with the adapters merged into the base weights",
            args.adapters.display(),
            lora::ADAPTER_CONFIG_FILE,
            lora::ADAPTER_WEIGHTS_FILE
        );
    }
    let base = match args.model {
        Some(m) => m,
        None => lora::base_model_dir(&args.adapters).context("--model not given")?,
    };
    let (config, adapters) = lora::read_adapters(&args.adapters)?;
    let report = match args.dtype {
        ExportDtype::Auto => lora::merge_to_dir(&base, &args.adapters, &args.out)?,
        ExportDtype::F32 => {
            lora::merge_to_dir_as(&base, &args.adapters, &args.out, DiskDtype::F32)?
        }
        ExportDtype::Bf16 => {
            lora::merge_to_dir_as(&base, &args.adapters, &args.out, DiskDtype::BF16)?
        }
        ExportDtype::F16 => {
            lora::merge_to_dir_as(&base, &args.adapters, &args.out, DiskDtype::F16)?
        }
    };
    eprintln!(
        "merged {} LoRA adapters (r={}, alpha={}, scaling {}) into {} → {} ({}; {})",
        adapters.pairs.len(),
        config.rank,
        config.alpha,
        config.scaling(),
        base.display(),
        report.dir.display(),
        report.weight_files.join(", "),
        report.other_files.join(", ")
    );
    Ok(())
}
