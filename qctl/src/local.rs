//! Local commands that run the training engine in this process (no coordinator):
//! `qctl train job.yaml --local` and `qctl logits`.
//!
//! `train` parses the job spec with the same validation as `qctl submit` (errors name the file, key and line),
//! maps its training keys onto [`qparallel::train::TrainConfig`] and runs [`qparallel::train::run_training`]
//! with a progress bar on a terminal (plain log lines otherwise). Relative paths in the spec are relative to the
//! current directory, as in ms-swift.
//!
//! `train --local --nproc N` (N > 1) runs the job as N rank processes on this machine, as `qctl launch` does on
//! one node (the same launcher: a TCP store on a free port, `qctl rank` children, their output relayed here), with
//! the spec's relative paths made absolute first (the ranks run in their own directories). The spec's world size
//! must be N. It exits with the job's result: 0 when every rank succeeded.

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
    /// Run on this machine instead of submitting to a coordinator.
    #[arg(long)]
    pub local: bool,
    /// Rank processes to start (must equal the spec's world size); 1 trains in this process.
    #[arg(long, default_value_t = 1)]
    pub nproc: u32,
    /// `cpu`, `cuda` or (one process) `cuda:N`: overrides the spec's `resources` (`cuda`: one rank per GPU,
    /// GPUs 0..nproc). Default: the spec's (`gpus_per_node > 0` → GPUs).
    #[arg(long)]
    pub device: Option<String>,
}

/// `qctl logits --model DIR --tokens FILE.json`
#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// A JSON list of lists of token ids.
    #[arg(long)]
    pub tokens: PathBuf,
    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights and activations on the device: `f32` or `bf16` (CUDA only; compute accumulates in f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
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
    // `--device` replaces the spec's resources before validation, so the layout is checked against them.
    let device = args.device.as_deref().map(parse_device).transpose()?;
    let resources = match device {
        None => None,
        Some(qkernels::Device::Cpu) => Some(qjobspec::Resources { nodes: 1, gpus_per_node: 0, ranks: Some(args.nproc) }),
        Some(qkernels::Device::Cuda(i)) => {
            if args.nproc > 1 && i != 0 {
                bail!("--device cuda:{i} picks one GPU for one process; with --nproc use --device cuda (GPUs 0..N)");
            }
            Some(qjobspec::Resources { nodes: 1, gpus_per_node: args.nproc, ranks: None })
        }
    };
    let ordinal = match device {
        Some(qkernels::Device::Cuda(i)) => Some(i),
        _ => None,
    };
    let spec = JobSpec::parse_with(&text, &args.job.display().to_string(), |s| {
        if let Some(r) = resources {
            s.resources = r;
        }
    })?;
    if !matches!(spec.kind, JobKind::Pretrain | JobKind::Sft) {
        bail!(
            "{}: key `kind`: `{}` cannot run with --local (supported: pretrain, sft)",
            args.job.display(),
            spec.kind
        );
    }
    if spec.world_size() != args.nproc {
        bail!(
            "{}: key `resources`: the spec asks for {} ranks, --nproc starts {}; they must be equal",
            args.job.display(),
            spec.world_size(),
            args.nproc
        );
    }
    if args.nproc > 1 {
        return train_ranks(&args, spec);
    }
    let mut cfg = qworker::training::train_config(&spec)?;
    let gpu = match ordinal {
        Some(i) => Some(i),
        None => qworker::rank::job_rank_gpu(&spec, 0)?,
    };
    let training = spec.training().expect("train_config checked the kind");
    (cfg.device, cfg.compute_dtype) = qworker::training::placement(&training, gpu)?;
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

/// `train --local --nproc N`: N rank processes through the launcher (see the module docs); exits with their result.
fn train_ranks(args: &TrainArgs, mut spec: JobSpec) -> anyhow::Result<()> {
    let source = args.job.display().to_string();
    spec.check_runnable(&source)?;
    spec.resolve_relative_paths(&std::env::current_dir()?);
    qworker::training::train_config(&spec)?; // the training keys map, before any process starts
    let run_dir =
        std::env::temp_dir().join(format!("qctl-train-{}-{}", spec.name, std::process::id()));
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let spec_path = run_dir.join("job.yaml");
    std::fs::write(&spec_path, spec.to_yaml())
        .with_context(|| format!("cannot write {}", spec_path.display()))?;
    let env = qworker::launcher::LaunchEnv {
        nnodes: 1,
        node_rank: 0,
        nproc_per_node: args.nproc,
        master_addr: "127.0.0.1".into(),
        master_port: 0,
    };
    let exe = std::env::current_exe()?.display().to_string();
    eprintln!(
        "{}: {} rank processes (run directory {})",
        spec.name,
        args.nproc,
        run_dir.display()
    );
    let code =
        qworker::launcher::launch(&spec_path, &env, vec![exe, "rank".into()], run_dir.clone())?;
    if code != 0 {
        bail!(
            "training {} failed: a rank exited with an error (its output is above; run files in {})",
            spec.name,
            run_dir.display()
        );
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(())
}

/// `cpu`, `cuda` or `cuda:N` (a GPU that cannot be opened is an error when first used, naming the reason).
pub(crate) fn parse_device(s: &str) -> anyhow::Result<qkernels::Device> {
    match s {
        "cpu" => Ok(qkernels::Device::Cpu),
        "cuda" => Ok(qkernels::Device::Cuda(0)),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(i) => Ok(qkernels::Device::Cuda(i)),
            None => bail!("--device {s}: use cpu, cuda or cuda:N"),
        },
    }
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
    let device = parse_device(&args.device)?;
    let mut model = Qwen3Model::from_hf_dir(&args.model, device)
        .with_context(|| format!("cannot load the model in {}", args.model.display()))?;
    match (args.dtype.as_str(), device) {
        ("f32", _) => {}
        ("bf16", qkernels::Device::Cuda(_)) => {
            let mut failed = None;
            model.params.visit_mut(&mut |_, t| match t.to_dtype(qkernels::DType::BF16) {
                Ok(b) => *t = b,
                Err(e) => failed = Some(e),
            });
            if let Some(e) = failed {
                return Err(e).context("casting the weights to bf16");
            }
        }
        ("bf16", _) => bail!("--dtype bf16 needs --device cuda (the CPU engine is the f32 reference)"),
        (other, _) => bail!("--dtype {other}: use f32 or bf16"),
    }
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
