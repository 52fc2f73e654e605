//! Local commands that run the training engine in this process (no coordinator):
//! `qctl train job.yaml --local` and `qctl logits`.
//!
//! `train` parses the job spec with the same validation as `qctl submit` (errors name the file, key and line),
//! maps its training keys onto [`qparallel::train::TrainConfig`] and runs [`qparallel::train::run_training`]
//! with a progress bar on a terminal (plain log lines otherwise). Relative paths in the spec are relative to the
//! current directory, as in ms-swift.

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use qjobspec::{JobKind, JobSpec};
use qparallel::hf::{HostTensor, TensorMap};
use qparallel::model::{Batch, Qwen3Model};
use qparallel::train::{RunInfo, StepMetrics, TrainObserver, run_training, write_f32_safetensors};

/// `qctl train JOB.yaml --local`
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The job spec (kind: pretrain).
    pub job: PathBuf,
    /// Run in this process instead of submitting to a coordinator.
    #[arg(long)]
    pub local: bool,
}

/// `qctl logits --model DIR --tokens FILE.json`
#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// A JSON list of lists of token ids.
    #[arg(long)]
    pub tokens: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Where to write the logits (safetensors).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Progress on stderr: an indicatif bar on a terminal, one line per logged step otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    logging_steps: u64,
}

impl TrainObserver for Progress {
    fn on_start(&mut self, info: &RunInfo) {
        eprintln!("{}", info.describe());
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(info.train_iters);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            ) {
                bar.set_style(style);
            }
            bar.set_position(info.start_step);
            self.bar = Some(bar);
        }
    }

    fn on_step(&mut self, m: &StepMetrics) -> ControlFlow<()> {
        let line = format!(
            "step {}/{} loss {:.4} lr {:.3e} grad_norm {:.3} {:.0} tok/s mfu {:.2e}{}",
            m.step,
            m.train_iters,
            m.loss,
            m.lr,
            m.grad_norm,
            m.tokens_per_s,
            m.mfu,
            if m.skipped { " (skipped)" } else { "" }
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(m.step);
                bar.set_message(format!("loss {:.4} lr {:.2e}", m.loss, m.lr));
                if m.step.is_multiple_of(self.logging_steps) {
                    bar.println(line);
                }
            }
            None if m.step.is_multiple_of(self.logging_steps) || m.step == m.train_iters => {
                eprintln!("{line}")
            }
            None => {}
        }
        ControlFlow::Continue(())
    }

    fn on_checkpoint(&mut self, step: u64, dir: &Path) {
        let line = format!("step {step}: saved {}", dir.display());
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
}

pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    if !args.local {
        bail!(
            "`qctl train` runs in this process only with --local; submit to a cluster with `qctl submit {}`",
            args.job.display()
        );
    }
    let text = std::fs::read_to_string(&args.job)
        .with_context(|| format!("cannot read {}", args.job.display()))?;
    let spec = JobSpec::parse(&text, &args.job.display().to_string())?;
    if !matches!(spec.kind, JobKind::Pretrain | JobKind::Sft) {
        bail!(
            "{}: key `kind`: `{}` cannot run with --local (supported: pretrain, sft)",
            args.job.display(),
            spec.kind
        );
    }
    if spec.world_size() != 1 {
        bail!(
            "{}: key `resources`: --local runs one process, the spec asks for {} ranks",
            args.job.display(),
            spec.world_size()
        );
    }
    let cfg = qworker::training::train_config(&spec)?;
    let mut progress = Progress {
        bar: None,
        logging_steps: cfg.logging_steps,
    };
    let result = run_training(&cfg, &mut progress);
    if let Some(bar) = &progress.bar {
        bar.finish_and_clear();
    }
    let summary = result.with_context(|| format!("training {} failed", spec.name))?;
    match (summary.losses.first(), summary.losses.last()) {
        (Some((s0, l0)), Some((s1, l1))) => println!(
            "trained steps {s0}..={s1}: loss {l0:.4} → {l1:.4}; output in {}",
            cfg.output_dir.display()
        ),
        _ => println!(
            "nothing to do: {} already at step {}",
            cfg.output_dir.display(),
            summary.final_step
        ),
    }
    if let Some(dir) = summary.checkpoints.last() {
        println!("last checkpoint: {}", dir.display());
    }
    Ok(())
}

/// Reads a JSON list of equally long lists of token ids: `(flat ids, rows, columns)`.
fn read_tokens(path: &Path) -> anyhow::Result<(Vec<u32>, usize, usize)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let rows: Vec<Vec<u32>> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON list of lists of token ids",
            path.display()
        )
    })?;
    let Some(seq) = rows.first().map(Vec::len) else {
        bail!("{}: no rows of token ids", path.display());
    };
    if seq == 0 {
        bail!("{}: row 0 is empty", path.display());
    }
    if let Some((i, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != seq) {
        bail!(
            "{}: row {i} has {} tokens, row 0 has {seq}; all rows must have the same length",
            path.display(),
            r.len()
        );
    }
    let b = rows.len();
    Ok((rows.into_iter().flatten().collect(), b, seq))
}

pub fn logits(args: LogitsArgs) -> anyhow::Result<()> {
    let device = match args.device.as_str() {
        "cpu" => qkernels::Device::Cpu,
        other => bail!("--device {other}: only `cpu` is available in this build"),
    };
    let model = Qwen3Model::from_hf_dir(&args.model, device)
        .with_context(|| format!("cannot load the model in {}", args.model.display()))?;
    let (ids, b, s) = read_tokens(&args.tokens)?;
    let batch = Batch::causal_lm(ids, b, s)?;
    let logits = model
        .logits(&batch)
        .with_context(|| format!("{}", args.tokens.display()))?;
    let vocab = model.config.vocab_size;
    if s >= 2 {
        let (loss, _, _) = model.loss(&batch)?;
        println!(
            "mean next-token loss: {loss:.6} over {} predictions ({b} × {} positions)",
            b * (s - 1),
            s - 1
        );
    } else {
        println!("no next-token loss: rows have a single token");
    }
    match &args.out {
        Some(out) => {
            let data = logits.to_vec_f32()?;
            let mut map = TensorMap::new();
            map.insert(
                "logits".to_string(),
                HostTensor::new(vec![b, s, vocab], data)?,
            );
            write_f32_safetensors(out, &map)?;
            println!("logits [{b}, {s}, {vocab}] written to {}", out.display());
        }
        None => println!("logits [{b}, {s}, {vocab}] (pass --out FILE to save them)"),
    }
    Ok(())
}
