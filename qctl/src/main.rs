//! `qctl`: what people type. Cluster commands talk to a coordinator over gRPC (see `remote`); `up`
//! runs a coordinator and this machine's worker in one process; `train --local` and `logits` run the
//! engine here (see `local`); `infer` chats with a model through the serving engine in this process (see
//! `infer`).

mod export;
mod infer;
mod local;
mod remote;

use clap::{Parser, Subcommand};
use remote::Output;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "qctl", version, about = "qcluster command line")]
struct Cli {
    /// Coordinator URL, or several separated by commas (HA coordinators: qctl finds the leader).
    #[arg(long, global = true, env = "QCTL_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    coordinator: String,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "text")]
    output: Output,
    #[command(flatten)]
    security: qcluster_cli::ClientSecurityArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a job spec; prints the job id. With --follow: streams its logs, prints its final status
    /// and exits 0 only if it succeeded.
    Submit {
        job: PathBuf,
        #[arg(long)]
        follow: bool,
    },
    /// Show one job: state, attempt, placement, progress, results, events.
    Status { job_id: String },
    /// List jobs (optionally only some states, e.g. --state Running).
    List {
        #[arg(long = "state")]
        states: Vec<String>,
    },
    /// Print a job's rank logs; -f follows until the job ends.
    Logs {
        job_id: String,
        #[arg(short, long)]
        follow: bool,
        #[arg(long)]
        rank: Option<u32>,
    },
    /// Cancel a job (its ranks get SIGTERM, then SIGKILL after the grace period).
    Cancel { job_id: String },
    /// List the nodes and what runs on them.
    Nodes {
        /// First wait until at least this many nodes are alive (gives up after --timeout seconds).
        #[arg(long)]
        wait_alive: Option<usize>,
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// Run a coordinator and this machine's worker in one process (the embedded default).
    Up(UpArgs),
    /// Train in this process (`--local`).
    Train(local::TrainArgs),
    /// Chat with a model in this process (swift infer): one --prompt, an interactive chat over stdin, or
    /// batch inference over a messages JSONL (--val-dataset FILE --result-path OUT.jsonl).
    Infer(infer::InferArgs),
    /// Run a model on token ids: prints the mean next-token loss, writes the logits.
    Logits(local::LogitsArgs),
    /// Merge LoRA adapters into their base model: `export --adapters DIR --merge-lora --out DIR [--model DIR]`
    /// writes a full HF model directory (W + alpha/r·B·A for every adapted layer).
    Export(export::ExportArgs),
    /// Start this node's ranks without a coordinator (torchrun / Slurm / Alibaba DLC style): reads
    /// NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT (or DLC's WORLD_SIZE/RANK as node
    /// count/index); the ranks meet through a TCP store on node 0.
    Launch {
        job: PathBuf,
        /// Where rank run directories go.
        #[arg(long, default_value = "qcluster-run")]
        run_dir: PathBuf,
    },
    /// Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /// /v1/models, /health, /metrics).
    Serve(ServeArgs),
    /// Run one rank (started by a worker).
    #[command(hide = true)]
    Rank,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// HF model directory (config.json, safetensors, tokenizer.json, tokenizer_config.json).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: std::net::SocketAddr,
    /// `cpu` (f32), `cuda` or `cuda:N` (bf16 weights, activations and KV cache; the KV pool takes 85% of the
    /// GPU memory left free by the weights).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Require `Authorization: Bearer KEY` on /v1/*.
    #[arg(long, env = "QCLUSTER_API_KEY")]
    api_key: Option<String>,
    /// Model id clients use (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// LoRA adapters served beside the base model, `NAME=DIR` (a PEFT adapter directory, e.g. a LoRA run's
    /// checkpoint); requests with `"model": NAME` generate with it. Repeat, or separate with spaces.
    #[arg(long, num_args = 1.., value_parser = parse_adapter)]
    adapters: Vec<(String, PathBuf)>,
    /// Return Qwen3's think block as `reasoning_content` (like vLLM's --reasoning-parser qwen3).
    #[arg(long)]
    reasoning_parser: bool,
    /// Weight-only quantization of the linear layers: `none` (f32), `int8` (one scale per output channel),
    /// `int4` (asymmetric, a scale and offset per 128 inputs; `int4:G` for groups of G). Embedding and norms
    /// stay f32, an untied lm_head is int8; weights are quantized layer by layer as they load.
    #[arg(long, default_value = "none")]
    quantization: qserve::engine::Quantization,
}

#[derive(clap::Args)]
struct UpArgs {
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: std::net::SocketAddr,
    /// Coordinator state (default: ~/.qcluster/state).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Worker work dir (default: ~/.qcluster/work).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    #[arg(long, default_value = "local")]
    node_name: String,
    /// CPU rank slots (default: the number of cores, at least 4).
    #[arg(long)]
    cpu_slots: Option<u32>,
    /// GPUs to offer: `auto` or a number.
    #[arg(long, default_value = "auto")]
    gpus: String,
    /// Submit this job, stream its logs, print its status and exit with its result.
    #[arg(long)]
    run: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Rank => return qworker::rank::rank_main(),
        Command::Train(args) => return local::train(args),
        Command::Infer(args) => return infer::infer(args, cli.output),
        Command::Logits(args) => return local::logits(args),
        Command::Export(args) => return export::export(args),
        Command::Launch { job, run_dir } => return launch(&job, run_dir),
        _ => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let out = cli.output;
        let security = cli.security.load()?;
        match cli.command {
            Command::Up(args) => return up(args, out).await,
            Command::Serve(args) => return serve(args).await,
            _ => {}
        }
        // `nodes --wait-alive` may be started before the coordinator (launch scripts): keep trying.
        let mut client = match &cli.command {
            Command::Nodes { wait_alive: Some(_), timeout } => {
                remote::connect_retrying(&cli.coordinator, &security, Duration::from_secs_f64(*timeout)).await?
            }
            _ => remote::connect(&cli.coordinator, &security).await?,
        };
        match cli.command {
            Command::Submit { job, follow: false } => remote::submit(&mut client, &job, out).await.map(|_| ()),
            Command::Submit { job, follow: true } => follow_job(&mut client, &job, out).await,
            Command::Status { job_id } => remote::status(&mut client, &job_id, out).await.map(|_| ()),
            Command::List { states } => remote::list(&mut client, states, out).await,
            Command::Logs { job_id, follow, rank } => remote::logs(&mut client, &job_id, follow, rank, out).await,
            Command::Cancel { job_id } => remote::cancel(&mut client, &job_id, out).await,
            Command::Nodes { wait_alive, timeout } => {
                if let Some(n) = wait_alive {
                    remote::wait_alive(&mut client, n, Duration::from_secs_f64(timeout)).await?;
                }
                remote::nodes(&mut client, out).await
            }
            Command::Up(_)
            | Command::Serve(_)
            | Command::Train(_)
            | Command::Infer(_)
            | Command::Logits(_)
            | Command::Export(_)
            | Command::Launch { .. }
            | Command::Rank => {
                unreachable!("handled before the runtime starts")
            }
        }
    })
}

/// `NAME=DIR` of `qctl serve --adapters`.
fn parse_adapter(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => Ok((name.to_string(), PathBuf::from(dir))),
        _ => Err(format!("`{s}`: use NAME=DIR (a PEFT adapter directory)")),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let device = local::parse_device(&args.device)?;
    let mut config = qserve::ServeConfig::new(&args.model);
    config.listen = args.listen;
    config.device = device;
    config.api_key = args.api_key;
    config.served_model_name = args.served_model_name;
    config.adapters = args.adapters;
    config.reasoning_parser = args.reasoning_parser;
    config.engine.quantization = args.quantization;
    let handle = qserve::serve(config).await?;
    eprintln!("serving {} on http://{} (OpenAI API under /v1)", handle.model_name(), handle.local_addr());
    let w = handle.weight_stats();
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    eprintln!(
        "weights: {:.2} MiB as {} ({:.2} MiB in f32; {} of {} parameters quantized)",
        mib(w.bytes),
        w.quantization,
        mib(w.f32_bytes),
        w.quantized_params,
        w.params
    );
    tokio::signal::ctrl_c().await?;
    handle.shutdown().await?;
    Ok(())
}

fn launch(job: &std::path::Path, run_dir: PathBuf) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(job).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", job.display()))?;
    let spec = qjobspec::JobSpec::parse(&text, &job.display().to_string())?;
    let env = qworker::launcher::LaunchEnv::from_lookup(|k| std::env::var(k).ok(), spec.ranks_per_node())?;
    let exe = std::env::current_exe()?.display().to_string();
    let code = qworker::launcher::launch(job, &env, vec![exe, "rank".into()], run_dir)?;
    std::process::exit(code)
}

fn home_dir(sub: &str) -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")).join(".qcluster").join(sub)
}

async fn up(args: UpArgs, out: Output) -> anyhow::Result<()> {
    let state_dir = args.state_dir.unwrap_or_else(|| home_dir("state"));
    let work_dir = args.work_dir.unwrap_or_else(|| home_dir("work"));
    let coordinator = qcoord::start(qcoord::CoordinatorConfig::new(args.listen, state_dir.clone())).await?;
    let url = coordinator.url();
    let mut config = qworker::WorkerConfig::new(url.clone(), args.node_name, work_dir);
    config.gpus = if args.gpus == "auto" {
        qworker::GpuSetting::Auto
    } else {
        qworker::GpuSetting::Count(args.gpus.parse().map_err(|_| anyhow::anyhow!("--gpus must be `auto` or a number"))?)
    };
    config.cpu_slots = args
        .cpu_slots
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1).max(4));
    let worker = qworker::start(config)?;
    eprintln!("qcluster up: coordinator {url} (state {}), worker on this machine", state_dir.display());
    let result = match args.run {
        Some(job) => run_one(&url, &job, out).await,
        None => {
            tokio::signal::ctrl_c().await?;
            Ok(())
        }
    };
    worker.shutdown(Duration::from_secs(10)).await;
    coordinator.stop().await;
    result
}

/// Waits for the local worker, then runs one job to its end.
async fn run_one(url: &str, job: &std::path::Path, out: Output) -> anyhow::Result<()> {
    let mut client = remote::connect(url, &Default::default()).await?;
    remote::wait_alive(&mut client, 1, Duration::from_secs(30)).await?;
    follow_job(&mut client, job, out).await
}

/// Submits a job, follows its logs to the end, prints its status, and fails unless it succeeded.
async fn follow_job(
    client: &mut remote::Client,
    job: &std::path::Path,
    out: Output,
) -> anyhow::Result<()> {
    let id = remote::submit(client, job, Output::Text).await?;
    remote::logs(client, &id, true, None, Output::Text).await?;
    let status = remote::status(client, &id, out).await?;
    anyhow::ensure!(status.state == "Succeeded", "job {id} ended {}: {}", status.state, status.message);
    Ok(())
}
