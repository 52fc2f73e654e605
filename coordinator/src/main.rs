//! `qcoord`: the coordinator daemon.

use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "qcoord", version, about = "qcluster coordinator: job queue, gang scheduler, rendezvous")]
struct Args {
    /// Address to serve gRPC on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:7070", env = "QCOORD_LISTEN")]
    listen: std::net::SocketAddr,
    /// Directory for the durable state (redb) and rank logs.
    #[arg(long, default_value = "/var/lib/qcluster", env = "QCOORD_STATE_DIR")]
    state_dir: PathBuf,
    /// A worker silent this long (seconds) is declared lost.
    #[arg(long, default_value_t = 10.0)]
    heartbeat_timeout: f64,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9090).
    #[arg(long, env = "QCOORD_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Seconds between SIGTERM and SIGKILL when ranks are stopped.
    #[arg(long, default_value_t = 10.0)]
    stop_grace: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let mut config = qcoord::CoordinatorConfig::new(args.listen, args.state_dir);
    config.heartbeat_timeout = Duration::from_secs_f64(args.heartbeat_timeout);
    config.stop_grace = Duration::from_secs_f64(args.stop_grace);
    config.metrics_listen = args.metrics_listen;
    let handle = qcoord::start(config).await?;
    tokio::select! {
        r = handle.wait() => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
