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
    /// Serve gRPC over TLS with this certificate (PEM; needs --tls-key).
    #[arg(long, env = "QCOORD_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "QCOORD_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long, env = "QCOORD_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Bearer tokens of users (qctl), one per line; re-read when the file changes.
    #[arg(long, env = "QCOORD_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Bearer tokens of workers (and their ranks), one per line; delete a line to revoke a worker.
    #[arg(long, env = "QCOORD_WORKER_TOKEN_FILE")]
    worker_token_file: Option<PathBuf>,
    /// Log lines as `text` or `json` (one JSON object per event).
    #[arg(long, default_value = "text", env = "QCOORD_LOG_FORMAT")]
    log_format: qcluster_cli::LogFormat,
    /// Keep the state in etcd (`http://host:2379[,…]`) and elect one leader among every coordinator
    /// started with the same endpoints and prefix; the others redirect clients to it (deploy/README.md).
    #[arg(long, env = "QCOORD_ETCD_ENDPOINTS")]
    etcd_endpoints: Option<String>,
    /// Key prefix of this cluster's state in etcd.
    #[arg(long, default_value = "/qcluster", env = "QCOORD_ETCD_PREFIX")]
    etcd_prefix: String,
    /// Seconds a dead leader keeps the leadership (its etcd lease): the failover time.
    #[arg(long, default_value_t = 3, env = "QCOORD_ETCD_LEASE_TTL")]
    etcd_lease_ttl: u64,
    /// The URL other coordinators send clients to while this one leads (default: http://<listen address>).
    #[arg(long, env = "QCOORD_ADVERTISE_URL")]
    advertise_url: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    qcluster_cli::init_logging(args.log_format);
    let mut config = qcoord::CoordinatorConfig::new(args.listen, args.state_dir);
    config.heartbeat_timeout = Duration::from_secs_f64(args.heartbeat_timeout);
    config.stop_grace = Duration::from_secs_f64(args.stop_grace);
    config.metrics_listen = args.metrics_listen;
    config.security = qcoord::auth::ServerSecurity::load(
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        args.tls_client_ca.as_deref(),
        args.token_file.as_deref(),
        args.worker_token_file.as_deref(),
    )?;
    #[cfg(not(feature = "etcd"))]
    if args.etcd_endpoints.is_some() {
        anyhow::bail!("--etcd-endpoints: this qcoord was built without the `etcd` feature");
    }
    #[cfg(feature = "etcd")]
    if let Some(endpoints) = &args.etcd_endpoints {
        let mut ha = qcoord::ha::HaConfig::new(qcoord::store::EtcdConfig::new(endpoints, &args.etcd_prefix)?);
        ha.lease_ttl = Duration::from_secs(args.etcd_lease_ttl);
        ha.advertise_url = args.advertise_url;
        let mut coordinator = qcoord::ha::start(config, ha).await?;
        // Losing the leadership ends the process (status 1): its supervisor restarts it as a follower.
        return tokio::select! {
            r = coordinator.wait() => r.map_err(Into::into),
            _ = shutdown_signal() => {
                coordinator.stop().await;
                Ok(())
            }
        };
    }
    let handle = qcoord::start(config).await?;
    tokio::select! {
        r = handle.wait() => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// ctrl-c or SIGTERM (systemd stop): an HA coordinator resigns then, so a follower takes over at once.
#[cfg(feature = "etcd")]
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
