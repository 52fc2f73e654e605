//! `qworker`: the node daemon, and (`qworker rank`) the rank process it launches.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "qworker", version, about = "qcluster node daemon: runs the ranks the coordinator places here")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Coordinator URL, or several separated by commas (coordinators in HA: the worker follows the leader).
    #[arg(long, default_value = "http://127.0.0.1:7070", env = "QWORKER_COORDINATOR")]
    coordinator: String,
    /// Name of this node (default: the host name).
    #[arg(long, env = "QWORKER_NODE_NAME")]
    node_name: Option<String>,
    /// Where rank run directories, specs and pid files live.
    #[arg(long, default_value = "/var/lib/qworker", env = "QWORKER_WORK_DIR")]
    work_dir: PathBuf,
    /// GPUs to offer: `auto` (what the CUDA driver reports) or a number.
    #[arg(long, default_value = "auto", env = "QWORKER_GPUS")]
    gpus: String,
    /// CPU rank slots to offer (default: the number of cores).
    #[arg(long, env = "QWORKER_CPU_SLOTS")]
    cpu_slots: Option<u32>,
    /// Address other nodes reach this node's ranks at.
    #[arg(long, default_value = "127.0.0.1", env = "QWORKER_ADDRESS")]
    address: String,
    #[command(flatten)]
    security: qcluster_cli::ClientSecurityArgs,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9101).
    #[arg(long, env = "QWORKER_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Log lines as `text` or `json`.
    #[arg(long, default_value = "text", env = "QWORKER_LOG_FORMAT")]
    log_format: qcluster_cli::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Run one rank (started by the worker, with QCLUSTER_* in the environment).
    #[command(hide = true)]
    Rank,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Rank) = args.command {
        return qworker::rank::rank_main();
    }
    qcluster_cli::init_logging(args.log_format);
    let node_name = args.node_name.unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into())
    });
    let mut config = qworker::WorkerConfig::new(args.coordinator, node_name, args.work_dir);
    config.gpus = parse_gpus(&args.gpus)?;
    if let Some(n) = args.cpu_slots {
        config.cpu_slots = n;
    }
    config.address = args.address;
    config.security = args.security.load()?;
    config.metrics_listen = args.metrics_listen;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let handle = qworker::start(config)?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate() => {}
        }
        handle.shutdown(std::time::Duration::from_secs(10)).await;
        anyhow::Ok(())
    })
}

async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

fn parse_gpus(s: &str) -> anyhow::Result<qworker::GpuSetting> {
    if s == "auto" {
        return Ok(qworker::GpuSetting::Auto);
    }
    s.parse().map(qworker::GpuSetting::Count).map_err(|_| anyhow::anyhow!("--gpus must be `auto` or a number, not {s:?}"))
}
