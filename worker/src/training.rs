//! Training jobs inside qcluster: the job spec's training keys mapped onto the engine's
//! [`TrainConfig`] (shared by `qctl train --local` and the rank process), and the rank-side runner that
//! reports progress and committed checkpoints to whoever launched it.

use crate::rank::{RankEnv, RankLink};
use anyhow::bail;
use qcluster_proto::v1 as pb;
use qjobspec::{JobSpec, LrDecayStyle, ModelSource as SpecModel, Resume as SpecResume};
use qparallel::data::{SftOptions, Truncation};
use qparallel::lora::{LoraConfig, TargetModules};
use qparallel::optim::{AdamWConfig, DecayStyle, Warmup};
use qparallel::train::{ModelSource, Resume, RunInfo, StepMetrics, TrainConfig, TrainObserver, run_training};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Maps a validated job spec onto the engine's [`TrainConfig`].
pub fn train_config(spec: &JobSpec) -> anyhow::Result<TrainConfig> {
    let Some(t) = spec.training() else {
        bail!(
            "kind `{}` does not train; `qctl train` runs kind: pretrain or sft",
            spec.kind
        );
    };
    let (model, tokenizer_dir) = match &t.model {
        SpecModel::Pretrained { dir } => (ModelSource::Pretrained(dir.into()), None),
        SpecModel::Random { config, dir } => (
            ModelSource::Random {
                config: config.into(),
            },
            dir.as_ref().map(PathBuf::from),
        ),
    };
    let mut c = TrainConfig::new(
        model,
        t.dataset.iter().map(PathBuf::from).collect(),
        PathBuf::from(&t.output_dir),
        t.train_iters,
    );
    c.tokenizer_dir = tokenizer_dir;
    c.max_length = t.max_length as usize;
    c.micro_batch_size = t.micro_batch_size as usize;
    c.grad_accum = t.grad_accum as usize;
    c.lr = t.learning_rate;
    c.min_lr = t.min_lr;
    c.warmup = match (t.lr_warmup_iters, t.warmup_ratio) {
        (Some(n), _) => Warmup::Iters(n),
        (None, Some(r)) => Warmup::Ratio(r),
        (None, None) => Warmup::Iters(0),
    };
    c.lr_decay_iters = Some(t.lr_decay_iters);
    c.lr_decay_style = match t.lr_decay_style {
        LrDecayStyle::Constant => DecayStyle::Constant,
        LrDecayStyle::Linear => DecayStyle::Linear,
        LrDecayStyle::Cosine => DecayStyle::Cosine,
    };
    c.weight_decay = t.weight_decay;
    c.adam = AdamWConfig {
        beta1: t.adam_beta1,
        beta2: t.adam_beta2,
        eps: t.adam_eps,
    };
    c.clip_grad = t.clip_grad;
    c.save_steps = t.save_steps;
    c.logging_steps = t.logging_steps;
    c.seed = t.seed;
    c.gradient_checkpointing = t.gradient_checkpointing;
    c.resume = match &t.resume {
        SpecResume::Auto => Resume::Auto,
        SpecResume::None => Resume::None,
        SpecResume::Path(p) => Resume::Path(p.into()),
    };
    c.sft = t.sft.as_ref().map(sft_options).transpose()?;
    c.lora = t.lora.as_ref().map(lora_config).transpose()?;
    Ok(c)
}


/// The SFT data settings of a job (`kind: sft`); the spec has validated every value.
fn sft_options(s: &qjobspec::SftSettings) -> anyhow::Result<SftOptions> {
    let pair = |b: &Option<qjobspec::Bilingual>| b.as_ref().map(|b| (b.zh.clone(), b.en.clone()));
    Ok(SftOptions {
        loss_scale: s
            .loss_scale
            .parse()
            .map_err(|e| anyhow::anyhow!("key `loss_scale`: {e}"))?,
        packing: s.packing,
        strict: s.strict,
        truncation: match s.truncation {
            qjobspec::Truncation::Delete => Truncation::Delete,
            qjobspec::Truncation::Left => Truncation::Left,
            qjobspec::Truncation::Right => Truncation::Right,
        },
        shuffle: s.shuffle,
        model_name: pair(&s.model_name),
        model_author: pair(&s.model_author),
    })
}

/// The adapter settings of a job (`train_type: lora`).
fn lora_config(l: &qjobspec::LoraSettings) -> anyhow::Result<LoraConfig> {
    let target_modules: TargetModules = l
        .target_modules
        .join(",")
        .parse()
        .map_err(|e| anyhow::anyhow!("key `target_modules`: {e}"))?;
    Ok(LoraConfig {
        rank: l.rank as usize,
        alpha: l.alpha,
        dropout: l.dropout,
        target_modules,
    })
}

/// Reports a rank's training progress (at most every `REPORT_EVERY`, and every logged step) and every
/// committed checkpoint through its [`RankLink`].
struct Reporter<'a> {
    link: &'a mut RankLink,
    logging_steps: u64,
    last_report: Option<Instant>,
    start: Instant,
    start_step: u64,
}

const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

impl TrainObserver for Reporter<'_> {
    fn on_start(&mut self, info: &RunInfo) {
        self.start_step = info.start_step;
        self.start = Instant::now();
        eprintln!("{}", info.describe());
    }

    fn on_step(&mut self, m: &StepMetrics) -> ControlFlow<()> {
        let logged = m.step.is_multiple_of(self.logging_steps) || m.step == m.train_iters;
        if logged {
            eprintln!(
                "step {}/{} loss {:.4} lr {:.3e} grad_norm {:.3} {:.0} tok/s",
                m.step, m.train_iters, m.loss, m.lr, m.grad_norm, m.tokens_per_s
            );
        }
        let due = self.last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY);
        if logged || due {
            let done = (m.step - self.start_step).max(1) as f64;
            let eta = self.start.elapsed().as_secs_f64() / done * (m.train_iters - m.step) as f64;
            let progress = pb::Progress {
                step: m.step,
                total_steps: m.train_iters,
                loss: m.loss,
                tokens_per_s: m.tokens_per_s,
                eta_s: eta,
                updated_unix: 0.0,
            };
            if let Err(e) = self.link.report(Some(progress), HashMap::new()) {
                eprintln!("warning: progress report failed: {e:#}");
            }
            self.last_report = Some(Instant::now());
        }
        ControlFlow::Continue(())
    }

    fn on_checkpoint(&mut self, step: u64, dir: &Path) {
        eprintln!("step {step}: saved {}", dir.display());
        if let Err(e) = self.link.report_checkpoint(step, dir) {
            eprintln!("warning: checkpoint report failed: {e:#}");
        }
    }
}

/// Runs a training job in this rank process (world size 1 today).
pub fn run_rank_training(env: &RankEnv, spec: &JobSpec, link: &mut RankLink) -> anyhow::Result<()> {
    if env.world_size != 1 {
        bail!(
            "{} ranks asked for: training across ranks (tp/pp/dp) needs the parallel engine, which this build \
             does not run from a job yet; use resources: {{ranks: 1}}",
            env.world_size
        );
    }
    let mut cfg = train_config(spec)?;
    // A restarted attempt resumes from the checkpoint the coordinator names, unless the spec pins one.
    if let (Some(from), Resume::Auto) = (&env.resume_from, &cfg.resume) {
        cfg.resume = Resume::Path(from.clone());
    }
    let mut reporter =
        Reporter { link, logging_steps: cfg.logging_steps.max(1), last_report: None, start: Instant::now(), start_step: 0 };
    let summary = run_training(&cfg, &mut reporter)?;
    let mut results = HashMap::new();
    if let Some((step, loss)) = summary.losses.last() {
        results.insert("final_step".to_string(), step.to_string());
        results.insert("final_loss".to_string(), format!("{loss:.6}"));
    }
    if let Some(dir) = summary.checkpoints.last() {
        results.insert("last_checkpoint".to_string(), dir.display().to_string());
    }
    results.insert("output_dir".to_string(), cfg.output_dir.display().to_string());
    reporter.link.report(None, results)?;
    Ok(())
}
