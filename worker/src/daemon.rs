//! The worker daemon loop: register, heartbeat, take assignments, launch/stop ranks, report, ship logs.
//!
//! Connection loss is normal (a coordinator restart): the loop registers again with the ranks it still
//! supervises and the exits it could not report, and the coordinator reconciles. Ranks keep running
//! meanwhile.
//!
//! Several coordinators (`--coordinator http://a:7070,http://b:7070`, high availability on etcd): the daemon
//! calls one at a time. When a call fails it follows the leader hint of a follower's answer, else moves on
//! to the next URL ([`qcluster_proto::leader::Endpoints`]); registration, heartbeats, reports and log
//! shipping all use the current one, and the ranks it starts get the URL it is registered with.

use crate::launch::{self, LaunchSpec, LogMsg, LogSink, RankKey, RankProcess};
use qcluster_proto::v1 as pb;
use qcluster_proto::v1::worker_control_client::WorkerControlClient;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use qcluster_proto::client::AuthChannel;
use qcluster_proto::leader::Endpoints;

/// How many GPUs to offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuSetting {
    /// Whatever the CUDA driver reports (0 without one).
    Auto,
    Count(u32),
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `http://host:port` of the coordinator, or several separated by commas (HA: the daemon finds the leader).
    pub coordinator: String,
    pub node_name: String,
    pub work_dir: PathBuf,
    pub gpus: GpuSetting,
    pub cpu_slots: u32,
    /// Address other nodes' ranks reach this node at.
    pub address: String,
    /// Program + leading args that run one rank (default: this binary with `rank`).
    pub rank_command: Vec<String>,
    /// TLS and bearer token towards the coordinator; its ranks get the same (as `QCLUSTER_TOKEN` etc.).
    pub security: qcluster_proto::client::ClientSecurity,
    /// Serve Prometheus metrics (`GET /metrics`, see [`crate::metrics`]) here; off when `None`.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl WorkerConfig {
    pub fn new(coordinator: impl Into<String>, node_name: impl Into<String>, work_dir: PathBuf) -> WorkerConfig {
        let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "qworker".into());
        WorkerConfig {
            coordinator: coordinator.into(),
            node_name: node_name.into(),
            work_dir,
            gpus: GpuSetting::Auto,
            cpu_slots: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
            address: "127.0.0.1".into(),
            rank_command: vec![exe, "rank".into()],
            security: Default::default(),
            metrics_listen: None,
        }
    }
}

struct LiveRank {
    pid: u32,
    /// Holds a GPU (else a CPU slot).
    gpu: bool,
}

/// State shared by the daemon's tasks.
struct Shared {
    config: WorkerConfig,
    gpu_names: Vec<String>,
    ranks: Mutex<HashMap<RankKey, LiveRank>>,
    /// Exit reports not yet accepted by a coordinator.
    unreported: Mutex<Vec<pb::RankReport>>,
    session: Mutex<String>,
    /// As the coordinator last told us.
    heartbeat_interval: Mutex<Duration>,
    /// The coordinator URLs (`--coordinator a,b`) and the current one: the leader as far as we know.
    endpoints: Mutex<Endpoints>,
    /// One lazily connected client per URL tried.
    clients: Mutex<HashMap<String, WorkerControlClient<AuthChannel>>>,
    /// The URL of the live registration: its ranks reach the coordinator there.
    session_url: Mutex<String>,
    logs: LogSink,
    counters: crate::metrics::WorkerCounters,
    /// True while a registration is live.
    connected: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// The current coordinator URL and its client (see [`qcluster_proto::leader`]).
    fn client(&self) -> anyhow::Result<(String, WorkerControlClient<AuthChannel>)> {
        let url = self.endpoints.lock().unwrap().current().to_string();
        let mut clients = self.clients.lock().unwrap();
        if let Some(c) = clients.get(&url) {
            return Ok((url, c.clone()));
        }
        let channel = self.config.security.connect_lazy(&url).map_err(|e| anyhow::anyhow!("coordinator: {e}"))?;
        let client = WorkerControlClient::new(channel);
        clients.insert(url.clone(), client.clone());
        Ok((url, client))
    }

    /// The Prometheus text of this worker now.
    fn metrics_text(&self) -> String {
        let ranks = self.ranks.lock().unwrap();
        let gpu_ranks = ranks.values().filter(|r| r.gpu).count() as u64;
        let gauges = crate::metrics::WorkerGauges {
            gpus: self.gpu_names.len() as u64,
            cpu_slots: self.config.cpu_slots as u64,
            gpu_ranks,
            cpu_ranks: ranks.len() as u64 - gpu_ranks,
            connected: self.connected.load(std::sync::atomic::Ordering::Relaxed),
        };
        crate::metrics::render(&self.config.node_name, &self.counters, &gauges)
    }
}

/// A running worker daemon. It owns its own tokio runtime, so that killing it ends every task it
/// started (heartbeats, supervisors, log shipping) at once, as a process death would.
pub struct WorkerHandle {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Runtime,
    task: tokio::task::JoinHandle<()>,
    /// Where `GET /metrics` is served, when enabled.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl WorkerHandle {
    /// Pids of the rank processes this worker supervises now.
    pub fn rank_pids(&self) -> Vec<u32> {
        self.shared.ranks.lock().unwrap().values().map(|r| r.pid).collect()
    }

    /// Dies like a machine that lost power: rank processes killed, nothing reported.
    pub fn kill(self) {
        self.runtime.shutdown_background();
        for r in self.shared.ranks.lock().unwrap().values() {
            launch::signal_group(r.pid, nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Stops ranks (SIGTERM, then SIGKILL after `grace`) and ends the daemon.
    pub async fn shutdown(self, grace: Duration) {
        self.task.abort();
        let pids = self.rank_pids();
        let stops = self.runtime.spawn(async move {
            futures::future::join_all(pids.into_iter().map(|pid| launch::stop_group(pid, grace))).await;
        });
        let _ = stops.await;
        self.runtime.shutdown_background();
    }
}

/// Starts the daemon in the background. It connects lazily and keeps retrying.
pub fn start(config: WorkerConfig) -> anyhow::Result<WorkerHandle> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("qworker-{}", config.node_name))
        .enable_all()
        .build()?;
    let _guard = runtime.enter();
    std::fs::create_dir_all(&config.work_dir)
        .map_err(|e| anyhow::anyhow!("cannot create work dir {}: {e}", config.work_dir.display()))?;
    let leftovers = launch::kill_leftovers(&config.work_dir);
    if !leftovers.is_empty() {
        tracing::warn!("killed {} rank process(es) left by an earlier worker: {leftovers:?}", leftovers.len());
    }
    let gpu_names: Vec<String> = match config.gpus {
        GpuSetting::Auto => crate::gpus::detect().into_iter().map(|g| g.name).collect(),
        GpuSetting::Count(n) => {
            let found = crate::gpus::detect();
            (0..n as usize).map(|i| found.get(i).map(|g| g.name.clone()).unwrap_or_else(|| "unspecified GPU".into())).collect()
        }
    };
    let endpoints = Endpoints::parse(&config.coordinator).map_err(|e| anyhow::anyhow!("--coordinator: {e}"))?;
    let (log_tx, log_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        config,
        gpu_names,
        ranks: Mutex::new(HashMap::new()),
        unreported: Mutex::new(Vec::new()),
        session: Mutex::new(String::new()),
        heartbeat_interval: Mutex::new(Duration::from_millis(500)),
        endpoints: Mutex::new(endpoints),
        clients: Mutex::new(HashMap::new()),
        session_url: Mutex::new(String::new()),
        logs: log_tx,
        counters: Default::default(),
        connected: Default::default(),
    });
    let metrics_addr = match shared.config.metrics_listen {
        Some(addr) => {
            let s = shared.clone();
            let (bound, _task) = qcluster_cli::serve_metrics(addr, move || s.metrics_text())
                .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
            Some(bound)
        }
        None => None,
    };
    // Every URL's channel settles now, so a bad TLS setting fails the start, not the first call.
    for url in shared.endpoints.lock().unwrap().urls().to_vec() {
        shared.config.security.connect_lazy(&url).map_err(|e| anyhow::anyhow!("coordinator: {e}"))?;
    }
    runtime.spawn(ship_logs(shared.clone(), log_rx));
    let task = runtime.spawn(run(shared.clone()));
    Ok(WorkerHandle { shared, runtime, task, metrics_addr })
}

async fn run(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let ended = session(&shared).await;
        shared.connected.store(false, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = ended {
            // A follower named the leader: go there at once. Else try the next coordinator of the list.
            let status = e.downcast_ref::<tonic::Status>();
            let (hinted, next) = {
                let mut endpoints = shared.endpoints.lock().unwrap();
                (endpoints.failed(status), endpoints.current().to_string())
            };
            if hinted {
                tracing::info!("{e}; following the leader hint to {next}");
                backoff = Duration::from_millis(100);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            // Retry at least twice per heartbeat interval, so a restarted coordinator sees us again well
            // inside its heartbeat timeout.
            let cap = (*shared.heartbeat_interval.lock().unwrap() * 2).clamp(Duration::from_millis(100), Duration::from_secs(2));
            backoff = (backoff * 2).min(cap);
            tracing::warn!("coordinator session ended: {e}; reconnecting to {next} in {backoff:?}");
            tokio::time::sleep(backoff).await;
        } else {
            backoff = Duration::from_millis(100);
        }
    }
}

/// One registration: lasts until the coordinator forgets us or the connection breaks.
async fn session(shared: &Arc<Shared>) -> anyhow::Result<()> {
    let (url, mut client) = shared.client()?;
    let cfg = &shared.config;
    let running: Vec<pb::RankRef> = shared
        .ranks
        .lock()
        .unwrap()
        .keys()
        .map(|k| pb::RankRef { job_id: k.job_id.clone(), attempt: k.attempt, rank: k.rank })
        .collect();
    let finished = shared.unreported.lock().unwrap().clone();
    let reg = client
        .register(pb::RegisterRequest {
            node_name: cfg.node_name.clone(),
            gpus: shared.gpu_names.len() as u32,
            cpu_slots: cfg.cpu_slots,
            gpu_names: shared.gpu_names.clone(),
            address: cfg.address.clone(),
            running,
            finished: finished.clone(),
        })
        .await?
        .into_inner();
    shared.unreported.lock().unwrap().retain(|r| !finished.contains(r));
    *shared.session.lock().unwrap() = reg.session_id.clone();
    *shared.session_url.lock().unwrap() = url.clone();
    shared.counters.registrations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    shared.connected.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(node = %cfg.node_name, "registered with {url}");
    for r in reg.stop {
        stop_ranks(shared, |k| k.job_id == r.job_id && k.attempt == r.attempt && k.rank == r.rank, Duration::from_secs(10));
    }
    let mut stream = client
        .assignments(pb::AssignmentsRequest { node_name: cfg.node_name.clone(), session_id: reg.session_id.clone() })
        .await?
        .into_inner();
    let interval = Duration::from_millis(reg.heartbeat_interval_ms.max(50));
    *shared.heartbeat_interval.lock().unwrap() = interval;
    let (lost_tx, mut lost_rx) = oneshot::channel::<String>();
    let heartbeat = {
        let mut client = client.clone();
        let node = cfg.node_name.clone();
        let session = reg.session_id.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let req = pb::HeartbeatRequest { node_name: node.clone(), session_id: session.clone() };
                match tokio::time::timeout(interval * 5, client.heartbeat(req)).await {
                    Ok(Ok(r)) if r.get_ref().known => {}
                    Ok(Ok(_)) => {
                        let _ = lost_tx.send("the coordinator no longer knows this session".into());
                        return;
                    }
                    Ok(Err(e)) => {
                        let _ = lost_tx.send(format!("heartbeat failed: {}", e.message()));
                        return;
                    }
                    Err(_) => {
                        let _ = lost_tx.send("heartbeat timed out".into());
                        return;
                    }
                }
            }
        })
    };
    let result = loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(a)) => handle_assignment(shared, a),
                Ok(None) => break Err(anyhow::anyhow!("assignment stream closed")),
                Err(e) => break Err(anyhow::anyhow!("assignment stream: {}", e.message())),
            },
            why = &mut lost_rx => break Err(anyhow::anyhow!(why.unwrap_or_else(|_| "heartbeat stopped".into()))),
        }
    };
    heartbeat.abort();
    result
}

fn handle_assignment(shared: &Arc<Shared>, a: pb::Assignment) {
    match a.what {
        Some(pb::assignment::What::Start(s)) => {
            let attempt_dir = shared.config.work_dir.join("jobs").join(&s.job_id).join(format!("attempt-{}", s.attempt));
            let spec_path = attempt_dir.join("job.yaml");
            let prepared = write_atomically(&spec_path, s.spec_yaml.as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", spec_path.display()));
            for slot in &s.ranks {
                start_rank(shared, &s, slot, &attempt_dir, prepared.clone());
            }
        }
        Some(pb::assignment::What::Stop(s)) => {
            tracing::info!(job = %s.job_id, attempt = s.attempt, "stopping: {}", s.reason);
            let grace = Duration::from_millis(s.grace_ms);
            stop_ranks(shared, |k| k.job_id == s.job_id && k.attempt == s.attempt, grace);
        }
        None => {}
    }
}

fn stop_ranks(shared: &Arc<Shared>, which: impl Fn(&RankKey) -> bool, grace: Duration) {
    let pids: Vec<u32> = shared.ranks.lock().unwrap().iter().filter(|(k, _)| which(k)).map(|(_, r)| r.pid).collect();
    for pid in pids {
        tokio::spawn(launch::stop_group(pid, grace));
    }
}

/// The environment a rank process starts with: the job's `env:`, then its identity
/// ([`crate::rank::RankEnv::to_vars`]), its node and its GPU.
fn rank_env(shared: &Shared, s: &pb::StartRanks, slot: &pb::RankSlot, spec_path: &std::path::Path, run_dir: &std::path::Path) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    if let Ok(spec) = qjobspec::JobSpec::parse(&s.spec_yaml, "<assignment>") {
        env.extend(spec.env);
    }
    // The coordinator this worker is registered with (the leader) first, then the rest of the list, so the
    // rank can follow a failover (see `crate::rank::RankClient`).
    let leader = shared.session_url.lock().unwrap().clone();
    let mut urls = vec![leader.clone()];
    urls.extend(
        shared.config.coordinator.split(',').map(|u| u.trim().trim_end_matches('/').to_string()).filter(|u| !u.is_empty() && *u != leader),
    );
    let identity = crate::rank::RankEnv {
        meeting: crate::rank::Meeting::Coordinator(urls.join(",")),
        job_id: s.job_id.clone(),
        attempt: s.attempt,
        rank: slot.rank,
        local_rank: slot.local_rank,
        world_size: s.world_size,
        node_address: shared.config.address.clone(),
        spec_path: spec_path.to_path_buf(),
        run_dir: run_dir.to_path_buf(),
        resume_from: (!s.resume_from.is_empty()).then(|| s.resume_from.clone().into()),
    };
    env.extend(identity.to_vars().into_iter().map(|(k, v)| (k.to_string(), v)));
    env.insert("QCLUSTER_NODE".into(), shared.config.node_name.clone());
    env.extend(shared.config.security.env_vars());
    env.insert("CUDA_VISIBLE_DEVICES".into(), if slot.gpu >= 0 { slot.gpu.to_string() } else { String::new() });
    env
}

/// Writes a file under a temporary name and renames it into place, so readers never see it partial.
fn write_atomically(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

fn start_rank(
    shared: &Arc<Shared>,
    s: &pb::StartRanks,
    slot: &pb::RankSlot,
    attempt_dir: &std::path::Path,
    prepared: Result<(), String>,
) {
    let key = RankKey { job_id: s.job_id.clone(), attempt: s.attempt, rank: slot.rank };
    let run_dir = attempt_dir.join(format!("rank-{}", slot.rank));
    let spec_path = attempt_dir.join("job.yaml");
    let launch_spec = LaunchSpec {
        key: key.clone(),
        command: shared.config.rank_command.clone(),
        env: rank_env(shared, s, slot, &spec_path, &run_dir),
        cwd: run_dir,
    };
    let spawned = prepared.and_then(|_| launch::spawn_rank(&launch_spec, &shared.config.work_dir, shared.logs.clone()).map_err(|e| e.to_string()));
    let shared = shared.clone();
    match spawned {
        Err(message) => {
            shared.counters.rank_start_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(job = %key.job_id, rank = key.rank, "{message}");
            tokio::spawn(async move { report(&shared, &key, "failed_to_start", 0, 0, message).await });
        }
        Ok(process) => {
            let pid = process.pid;
            shared.ranks.lock().unwrap().insert(key.clone(), LiveRank { pid, gpu: slot.gpu >= 0 });
            shared.counters.rank_starts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(supervise(shared, key, process));
        }
    }
}

async fn supervise(shared: Arc<Shared>, key: RankKey, mut process: RankProcess) {
    let pid = process.pid;
    report(&shared, &key, "running", pid, 0, String::new()).await;
    let exit = process.wait().await;
    let (done_tx, done_rx) = oneshot::channel();
    if shared.logs.send(LogMsg::Flush(done_tx)).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(5), done_rx).await;
    }
    shared.ranks.lock().unwrap().remove(&key);
    let exits = if exit.code == 0 { &shared.counters.rank_exits_ok } else { &shared.counters.rank_exits_failed };
    exits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    report(&shared, &key, "exited", pid, exit.code, String::new()).await;
}

/// Reports a rank state change; an exit that cannot be delivered is kept for the next registration.
async fn report(shared: &Shared, key: &RankKey, state: &str, pid: u32, exit_code: i32, message: String) {
    let rep = pb::RankReport {
        node_name: shared.config.node_name.clone(),
        session_id: shared.session.lock().unwrap().clone(),
        rank: Some(pb::RankRef { job_id: key.job_id.clone(), attempt: key.attempt, rank: key.rank }),
        state: state.to_string(),
        pid,
        exit_code,
        message,
    };
    let sent = match shared.client() {
        Ok((_, mut client)) => client.report_rank(rep.clone()).await.map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    if let Err(e) = sent {
        if state != "running" {
            tracing::warn!(job = %key.job_id, rank = key.rank, "cannot report {state} yet: {}", e.message());
            shared.unreported.lock().unwrap().push(rep);
        }
    }
}

/// Batches rank output per (rank, stream) and ships it, at least every 200 ms.
async fn ship_logs(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<LogMsg>) {
    let mut pending: BTreeMap<(RankKey, &'static str), Vec<u8>> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(LogMsg::Data(key, stream, data)) => {
                    let buf = pending.entry((key, stream)).or_default();
                    buf.extend(data);
                    if buf.len() > 256 * 1024 {
                        flush_logs(&shared, &mut pending).await;
                    }
                }
                Some(LogMsg::Flush(done)) => {
                    flush_logs(&shared, &mut pending).await;
                    let _ = done.send(());
                }
                None => return,
            },
            _ = tick.tick() => flush_logs(&shared, &mut pending).await,
        }
    }
}

async fn flush_logs(shared: &Shared, pending: &mut BTreeMap<(RankKey, &'static str), Vec<u8>>) {
    for ((key, stream), data) in std::mem::take(pending) {
        let batch = pb::LogBatch { job_id: key.job_id.clone(), attempt: key.attempt, rank: key.rank, stream: stream.into(), data };
        let shipped = match shared.client() {
            Ok((_, mut client)) => tokio::time::timeout(Duration::from_secs(5), client.ship_logs(batch.clone())).await.ok(),
            Err(_) => None,
        };
        match shipped {
            Some(Ok(_)) => {}
            // Keep undelivered output (bounded) for the next try; a coordinator restart loses none.
            _ => {
                let buf = pending.entry((key, stream)).or_default();
                if buf.len() < 8 << 20 {
                    let mut data = batch.data;
                    data.extend(std::mem::take(buf));
                    *buf = data;
                }
            }
        }
    }
}
