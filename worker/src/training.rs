//! Training jobs inside qcluster: the job spec's training keys mapped onto the engine's
//! [`TrainConfig`] and its `parallel:` block onto [`ParallelDims`] (shared by `qctl train --local` and the rank
//! process), and the rank-side runner that reports progress and committed checkpoints to whoever launched it.
//!
//! Where a rank trains ([`placement`]): on its GPU when the job asks for GPUs (`resources.gpus_per_node > 0`,
//! one rank per GPU, bf16 unless `torch_dtype` says otherwise), else on the CPU in f32.
//!
//! A job of one rank runs [`run_training`] in the rank process. A job of several ranks connects its ranks —
//! one NCCL communicator over all of them on GPUs (the unique id through the [`RankLink`] KV), the CPU TCP
//! communicator otherwise (addresses exchanged through the rendezvous, as comm-check does) — and runs
//! [`run_distributed_training`]: every rank trains its share, and only global rank 0 writes the output
//! directory and reports progress, checkpoints and results (the coordinator keeps whatever a rank of the current
//! attempt reports, so one reporter keeps the job's progress consistent).

use crate::rank::{RankEnv, RankLink};
use anyhow::bail;
use qcluster_proto::v1 as pb;
use qjobspec::{JobSpec, LrDecayStyle, ModelSource as SpecModel, Resume as SpecResume, TorchDtype, TrainingSettings};
use qkernels::{DType, Device};
use qparallel::comm::NcclGroup;
use qparallel::data::{SftOptions, Truncation};
use qparallel::lora::{LoraConfig, TargetModules};
use qparallel::optim::{AdamWConfig, DecayStyle, Warmup};
use qparallel::dims::{ParallelConfig, ParallelDims};
use qparallel::model::ModelConfig;
use qparallel::train::{
    ModelSource, Resume, RunInfo, StepMetrics, TrainConfig, TrainObserver, run_distributed_training, run_training,
};
use std::collections::HashMap;
use std::ops::ControlFlow;
use qparallel::comm::CpuCommunicator;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    c.distributed_optimizer = t.use_distributed_optimizer;
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

impl<'a> Reporter<'a> {
    fn new(link: &'a mut RankLink, cfg: &TrainConfig) -> Self {
        Reporter { link, logging_steps: cfg.logging_steps.max(1), last_report: None, start: Instant::now(), start_step: 0 }
    }
}

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

/// The job's parallel layout over its `world_size` ranks (`dp` derived). Megatron's
/// `num_layers_per_virtual_pipeline_stage` becomes `vpp = layers / (pp · n)`, with the layer count from the model's
/// `config.json`.
pub fn parallel_dims(spec: &JobSpec, cfg: &TrainConfig) -> anyhow::Result<ParallelDims> {
    let p = &spec.parallel;
    let vpp = match p.num_layers_per_virtual_pipeline_stage {
        None => p.vpp as usize,
        Some(n) => {
            let config = match &cfg.model {
                ModelSource::Pretrained(dir) => dir.join("config.json"),
                ModelSource::Random { config } => config.clone(),
            };
            let layers = ModelConfig::from_file(&config)
                .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?
                .num_hidden_layers;
            let per_rank = p.pp as usize * n as usize;
            anyhow::ensure!(
                per_rank > 0 && layers % per_rank == 0,
                "key `parallel.num_layers_per_virtual_pipeline_stage`: {layers} layers do not split into pp {} × \
                 chunks of {n} layers",
                p.pp
            );
            layers / per_rank
        }
    };
    let config = ParallelConfig {
        tp: p.tp as usize,
        pp: p.pp as usize,
        vpp,
        cp: p.cp as usize,
        ep: p.ep as usize,
        etp: Some(p.etp as usize),
        sp: p.sp,
    };
    ParallelDims::new(spec.world_size() as usize, config).map_err(|e| anyhow::anyhow!("key `parallel`: {e}"))
}

/// The device and compute precision of a training rank: its GPU (`gpu`, from [`crate::rank::rank_gpu`]) or the
/// CPU. `torch_dtype: auto` is bf16 for full training on a GPU and f32 otherwise (LoRA trains through f32
/// effective weights; the CPU engine is f32 only); an explicit `bfloat16` where it cannot run is an error naming
/// the key.
pub fn placement(t: &TrainingSettings, gpu: Option<usize>) -> anyhow::Result<(Device, DType)> {
    let device = gpu.map_or(Device::Cpu, Device::Cuda);
    let dtype = match (t.torch_dtype, gpu, t.lora.is_some()) {
        (TorchDtype::Float32, _, _) | (TorchDtype::Auto, None, _) | (TorchDtype::Auto, Some(_), true) => DType::F32,
        (TorchDtype::Auto | TorchDtype::Bfloat16, Some(_), false) => DType::BF16,
        (TorchDtype::Bfloat16, None, _) => bail!(
            "key `torch_dtype`: bfloat16 needs GPUs (resources.gpus_per_node > 0); the CPU engine computes in float32"
        ),
        (TorchDtype::Bfloat16, Some(_), true) => bail!(
            "key `torch_dtype`: LoRA trains in float32 on GPUs for now; use torch_dtype: auto or float32"
        ),
    };
    Ok((device, dtype))
}

/// How long a rank waits for any message of its peers (rank 0 loads and writes checkpoints while the others wait).
const PEER_TIMEOUT: Duration = Duration::from_secs(600);

/// The CPU world communicator of this rank: a TCP listener on the node address, every rank's address through
/// the rendezvous (`link`), then connections to every peer. Collective over the job's ranks.
pub fn cpu_world(env: &RankEnv, link: &mut RankLink, timeout: Duration) -> anyhow::Result<CpuCommunicator> {
    let listener = TcpListener::bind((env.node_address.as_str(), 0))
        .or_else(|_| TcpListener::bind(("0.0.0.0", 0)))
        .map_err(|e| anyhow::anyhow!("cannot open a listener for peers: {e}"))?;
    let address = format!("{}:{}", env.node_address, listener.local_addr()?.port());
    let addresses = link.join(address, Duration::from_secs(300))?;
    Ok(CpuCommunicator::connect_tcp(env.rank as usize, listener, &addresses, timeout)?)
}

/// Runs a training job in this rank process: alone ([`run_training`]) or as one rank of several
/// ([`run_distributed_training`] over the CPU TCP communicator); see the module docs. On rank 0 returns the
/// newest checkpoint of the run (written now, or the one a finished run resumed from), which
/// `serve_after_training` serves.
pub fn run_rank_training(env: &RankEnv, spec: &JobSpec, link: &mut RankLink) -> anyhow::Result<Option<PathBuf>> {
    let mut cfg = train_config(spec)?;
    // A restarted attempt resumes from the checkpoint the coordinator names, unless the spec pins one.
    if let (Some(from), Resume::Auto) = (&env.resume_from, &cfg.resume) {
        cfg.resume = Resume::Path(from.clone());
    }
    anyhow::ensure!(
        env.world_size == spec.world_size(),
        "this rank was started as one of {} ranks, the job spec asks for {}",
        env.world_size,
        spec.world_size()
    );
    let world_size = env.world_size as usize;
    let gpu = crate::rank::job_rank_gpu(spec, env.local_rank)?;
    let training = spec.training().expect("train_config checked the kind");
    (cfg.device, cfg.compute_dtype) = placement(&training, gpu)?;
    let summary = if world_size == 1 {
        eprintln!("rank 0: training on {} in {:?}", cfg.device, cfg.compute_dtype);
        let mut reporter = Reporter::new(link, &cfg);
        run_training(&cfg, &mut reporter)?
    } else {
        let dims = parallel_dims(spec, &cfg)?;
        let engine =
            qparallel::train::EngineKind::for_dims(&dims).map(|k| format!("{k:?}")).unwrap_or_else(|e| e.to_string());
        let mut reporter = Reporter::new(link, &cfg);
        match gpu {
            Some(ordinal) => {
                let world = NcclGroup::init(
                    ordinal,
                    env.rank as usize,
                    (0..world_size).collect(),
                    "train-world",
                    &mut *reporter.link,
                    PEER_TIMEOUT,
                )?;
                eprintln!(
                    "rank {}: {dims:?} on CUDA device {ordinal} over NCCL ({engine}, {:?})",
                    env.rank, cfg.compute_dtype
                );
                run_distributed_training(&world, dims, &cfg, &mut reporter)?
            }
            None => {
                let world = cpu_world(env, &mut *reporter.link, PEER_TIMEOUT)?;
                eprintln!("rank {}: {dims:?} on the CPU communicator ({engine})", env.rank);
                run_distributed_training(&world, dims, &cfg, &mut reporter)?
            }
        }
    };
    if env.rank != 0 {
        return Ok(None);
    }
    let mut results = HashMap::new();
    if let Some((step, loss)) = summary.losses.last() {
        results.insert("final_step".to_string(), step.to_string());
        results.insert("final_loss".to_string(), format!("{loss:.6}"));
    }
    if let Some(dir) = summary.checkpoints.last() {
        results.insert("last_checkpoint".to_string(), dir.display().to_string());
    }
    results.insert("output_dir".to_string(), cfg.output_dir.display().to_string());
    if world_size > 1 {
        results.insert("ranks".to_string(), world_size.to_string());
    }
    link.report(None, results)?;
    Ok(summary.checkpoints.last().cloned().or(summary.resumed_from))
}
