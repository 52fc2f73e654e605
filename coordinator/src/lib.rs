//! `qcoord`, the qcluster coordinator, as a library: the daemon's `main.rs` and the in-process test
//! cluster both call [`start`].
//!
//! Map:
//! - [`domain`]: jobs, attempts, ranks, nodes (what is persisted).
//! - [`store`]: the durable state trait, with redb, etcd and in-memory backends.
//! - [`ha`]: several coordinators on one etcd: leader election, followers redirect to the leader.
//! - [`scheduler`]: pure gang placement and queue order.
//! - [`cluster`]: the state machine (submit, place, rank reports, node loss, cancel, restarts).
//! - [`rendezvous`]: per-attempt rooms where ranks meet and share NCCL ids.
//! - [`logs`]: rank logs as append-only files.
//! - [`service`]: the gRPC edge (Coordinator, WorkerControl, Rendezvous) plus health and reflection.
//! - [`metrics`]: Prometheus text for `GET /metrics` on `--metrics-listen`.

pub mod auth;
pub mod cluster;
pub mod domain;
#[cfg(feature = "etcd")]
pub mod ha;
pub mod logs;
pub mod metrics;
pub mod rendezvous;
pub mod scheduler;
pub mod service;
pub mod store;

use cluster::{Cluster, ClusterTimings};
use qcluster_proto::v1::coordinator_server::CoordinatorServer;
use qcluster_proto::v1::rendezvous_server::RendezvousServer;
use qcluster_proto::v1::worker_control_server::WorkerControlServer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// How to run a coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    /// Holds `state.redb` and the rank logs.
    pub state_dir: PathBuf,
    /// Keep job state in memory only (benchmarks); logs still go to `state_dir`.
    pub in_memory: bool,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// Between SIGTERM and SIGKILL when ranks are stopped.
    pub stop_grace: Duration,
    /// Serve Prometheus metrics over HTTP (`GET /metrics`) here; off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// TLS and bearer tokens ([`auth`]); none by default.
    pub security: auth::ServerSecurity,
}

impl CoordinatorConfig {
    pub fn new(listen: SocketAddr, state_dir: PathBuf) -> Self {
        CoordinatorConfig {
            listen,
            state_dir,
            in_memory: false,
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(10),
            metrics_listen: None,
            security: auth::ServerSecurity::default(),
        }
    }
}

/// A running coordinator.
pub struct CoordinatorHandle {
    /// The address it actually listens on (useful with port 0).
    pub addr: SocketAddr,
    pub cluster: Arc<Cluster>,
    /// Where `GET /metrics` is served, when enabled.
    pub metrics_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// Liveness checker and metrics server: they hold the cluster (and so the state file) until ended.
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl CoordinatorHandle {
    /// `http://ADDR`, what clients connect to.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and waits for the server to end (like a process exit: nothing is flushed that
    /// was not already durable).
    pub async fn stop(mut self) {
        self.cluster.close_streams();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task).await.is_err() {
            self.task.abort();
        }
        for task in self.background.drain(..) {
            task.abort();
            let _ = task.await;
        }
    }

    /// Waits until the server stops by itself (an error) — the daemon's main loop.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        (&mut self.task).await??;
        Ok(())
    }
}

/// Opens the state, binds the listener and serves in the background. (Several coordinators on etcd with
/// leader election: [`ha::start`].)
pub async fn start(config: CoordinatorConfig) -> anyhow::Result<CoordinatorHandle> {
    let store: Arc<dyn store::StateStore> = if config.in_memory {
        Arc::new(store::MemoryStore::default())
    } else {
        Arc::new(store::RedbStore::open(&config.state_dir)?)
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    serve(config, store, listener).await
}

/// The gRPC server builder with the listener's TLS settings (shared by the leader and the HA follower).
pub(crate) fn server_builder(security: &auth::ServerSecurity) -> anyhow::Result<tonic::transport::Server> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &security.tls {
        let mut t = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&tls.cert, &tls.key));
        if let Some(ca) = &tls.client_ca {
            t = t.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder.tls_config(t).map_err(|e| anyhow::anyhow!("TLS configuration: {e}"))?;
    }
    Ok(builder)
}

/// Loads the cluster from `store` and serves it on `listener` in the background.
pub(crate) async fn serve(
    config: CoordinatorConfig,
    store: Arc<dyn store::StateStore>,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<CoordinatorHandle> {
    let timings = ClusterTimings {
        heartbeat_interval: config.heartbeat_interval,
        heartbeat_timeout: config.heartbeat_timeout,
        stop_grace: config.stop_grace,
    };
    let cluster = Arc::new(Cluster::open(store, timings)?);
    let api = service::Api { cluster: cluster.clone(), logs: logs::LogStore::new(&config.state_dir) };
    let addr = listener.local_addr()?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<service::Api>>().await;
    health.set_serving::<WorkerControlServer<service::Api>>().await;
    health.set_serving::<RendezvousServer<service::Api>>().await;
    // Both reflection versions: grpcurl speaks v1, several language clients still only v1alpha.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(qcluster_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(qcluster_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let liveness_cluster = cluster.clone();
    let check_every = (config.heartbeat_timeout / 4).max(Duration::from_millis(50));
    let liveness = tokio::spawn(async move {
        loop {
            tokio::time::sleep(check_every).await;
            if let Err(e) = liveness_cluster.check_liveness().await {
                tracing::error!("liveness check: {e}");
            }
        }
    });

    let metrics = match config.metrics_listen {
        Some(addr) => {
            let c = cluster.clone();
            Some(
                qcluster_cli::serve_metrics(addr, move || c.metrics_text())
                    .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?,
            )
        }
        None => None,
    };
    let metrics_addr = metrics.as_ref().map(|(addr, _)| *addr);

    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let sec = &config.security;
    let server = server_builder(sec)?
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(CoordinatorServer::with_interceptor(api.clone(), sec.users()))
        .add_service(WorkerControlServer::with_interceptor(api.clone(), sec.workers()))
        .add_service(RendezvousServer::with_interceptor(api, sec.workers()));
    let task = tokio::spawn(async move {
        server
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_rx.await;
            })
            .await
    });
    let mut background = vec![liveness];
    background.extend(metrics.map(|(_, task)| task));
    tracing::info!("qcoord listening on {addr}, state in {}", config.state_dir.display());
    Ok(CoordinatorHandle { addr, cluster, metrics_addr, shutdown: Some(shutdown_tx), task, background })
}

