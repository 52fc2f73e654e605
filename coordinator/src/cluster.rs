//! The cluster state machine: jobs, attempts, nodes and the transitions between their states.
//!
//! Every public method takes the state lock, mutates, runs the scheduler when capacity may have
//! changed, queues assignments to workers, and queues the changed records to the store while still
//! holding the lock (so the store applies writes in mutation order). It then awaits durability outside
//! the lock, so an RPC answers only once its effect is on disk.
//!
//! Job lifecycle: `Pending → Scheduled → Running → Succeeded | Failed | Cancelled`. An attempt fails when
//! a rank exits non-zero, fails to start, or its node is lost; the job then goes back to `Pending`
//! (attempt + 1, resuming from the newest committed checkpoint) while fewer than `max_restarts` restarts
//! were used, else to `Failed`. Resources stay held until every rank of an attempt is reported gone.

use crate::domain::*;
use crate::rendezvous::Rendezvous;
use crate::scheduler::{self, GangRequest, NodeFree, QueuedJob};
use crate::store::{StateStore, WriteBatch};
use qcluster_proto::v1 as pb;
use qjobspec::JobSpec;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc};

/// Errors returned to API callers; the service maps them to gRPC status codes.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    InvalidSpec(String),
    #[error("no job with id {0:?}")]
    UnknownJob(String),
    #[error("unknown worker session for node {0:?}: register again")]
    UnknownSession(String),
    #[error("state store: {0}")]
    Store(String),
    #[error("the coordinator is shutting down")]
    ShuttingDown,
}

/// Timings the state machine needs.
#[derive(Debug, Clone)]
pub struct ClusterTimings {
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub stop_grace: Duration,
}

struct NodeRuntime {
    record: NodeRecord,
    session: Option<String>,
    last_seen: Instant,
    last_seen_unix: f64,
    tx: Option<mpsc::UnboundedSender<pb::Assignment>>,
    rx: Option<mpsc::UnboundedReceiver<pb::Assignment>>,
}

struct Inner {
    jobs: HashMap<String, JobRecord>,
    next_seq: u64,
    nodes: BTreeMap<String, NodeRuntime>,
    /// Jobs whose records changed in the current mutation.
    dirty_jobs: BTreeSet<String>,
    /// When each queued job became `Pending` in this process (for the scheduling-latency metric).
    pending_since: HashMap<String, Instant>,
    stats: crate::metrics::SchedulingStats,
    dirty_nodes: BTreeSet<String>,
}

pub struct Cluster {
    inner: Mutex<Inner>,
    /// Taken (and so released, with its file lock) by [`Cluster::close_streams`], so a stopped
    /// coordinator frees its state dir even while stray connection tasks still hold the cluster.
    store: Mutex<Option<Arc<dyn StateStore>>>,
    pub rendezvous: Rendezvous,
    timings: ClusterTimings,
    /// Notified after every mutation (log followers and waiters poll state on it).
    pub changed: Notify,
    closed: std::sync::atomic::AtomicBool,
}

impl Cluster {
    /// Rebuilds the cluster from the store. Nodes come back disconnected; those that do not register
    /// again within the heartbeat timeout are declared lost and their attempts fail over.
    pub fn open(store: Arc<dyn StateStore>, timings: ClusterTimings) -> Result<Cluster, ClusterError> {
        let snap = store.load().map_err(|e| ClusterError::Store(e.to_string()))?;
        let next_seq = snap.jobs.iter().map(|j| j.seq + 1).max().unwrap_or(1);
        let now = Instant::now();
        let nodes = snap
            .nodes
            .into_iter()
            .map(|record| {
                let rt = NodeRuntime {
                    record: record.clone(),
                    session: None,
                    last_seen: now,
                    last_seen_unix: now_unix(),
                    tx: None,
                    rx: None,
                };
                (record.name, rt)
            })
            .collect();
        let jobs = snap.jobs.into_iter().map(|j| (j.id.clone(), j)).collect();
        let inner = Inner {
            jobs,
            next_seq,
            nodes,
            dirty_jobs: BTreeSet::new(),
            dirty_nodes: BTreeSet::new(),
            pending_since: HashMap::new(),
            stats: Default::default(),
        };
        Ok(Cluster { inner: Mutex::new(inner), store: Mutex::new(Some(store)), rendezvous: Rendezvous::default(), timings, changed: Notify::new(), closed: Default::default() })
    }

    /// Runs `f` under the lock, schedules, queues the dirty records, then waits for durability.
    async fn mutate<T>(&self, f: impl FnOnce(&mut Inner, &Self) -> Result<T, ClusterError>) -> Result<T, ClusterError> {
        if self.is_closed() {
            return Err(ClusterError::ShuttingDown);
        }
        let (out, done) = {
            let mut inner = self.inner.lock().unwrap();
            let out = f(&mut inner, self);
            inner.schedule(self);
            let batch = inner.take_dirty();
            let store = self.store.lock().unwrap().clone();
            let done = match store {
                Some(store) => (!batch.is_empty()).then(|| store.write(batch)),
                None => return Err(ClusterError::ShuttingDown),
            };
            (out, done)
        };
        self.changed.notify_waiters();
        if let Some(done) = done {
            match done.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(ClusterError::Store(e)),
                Err(_) => return Err(ClusterError::Store("state writer stopped".into())),
            }
        }
        out
    }

    /// Ends every long-lived stream (worker assignment streams, rendezvous waits) so a server can shut
    /// down, and releases the state store (its file lock); used when the coordinator stops. Every later
    /// mutation answers `ShuttingDown`.
    pub fn close_streams(&self) {
        let mut inner = self.inner.lock().unwrap();
        for n in inner.nodes.values_mut() {
            n.tx = None;
            n.rx = None;
            n.session = None;
        }
        self.rendezvous.close_all();
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(inner);
        self.store.lock().unwrap().take();
    }

    /// Whether [`Cluster::close_streams`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    // ───────────── user API ─────────────

    pub async fn submit(&self, spec_yaml: &str, source_name: &str) -> Result<String, ClusterError> {
        let spec = JobSpec::parse(spec_yaml, source_name)
            .and_then(|s| s.check_runnable(source_name).map(|_| s))
            .map_err(|e| ClusterError::InvalidSpec(e.to_string()))?;
        self.mutate(|inner, _| {
            let seq = inner.next_seq;
            inner.next_seq += 1;
            let id = format!("{}-{seq:06}", spec.name.chars().take(40).collect::<String>());
            let mut job = JobRecord {
                id: id.clone(),
                seq,
                name: spec.name.clone(),
                kind: spec.kind.to_string(),
                priority: spec.priority,
                max_restarts: spec.max_restarts,
                spec_yaml: spec.to_yaml(),
                world_size: spec.world_size(),
                ranks_per_node: spec.ranks_per_node(),
                gpus_per_node: spec.resources.gpus_per_node,
                nodes: spec.resources.nodes,
                tp: spec.parallel.tp,
                state: JobState::Pending,
                message: "queued".into(),
                submitted_unix: now_unix(),
                started_unix: 0.0,
                finished_unix: 0.0,
                attempts: vec![],
                progress: Progress::default(),
                results: BTreeMap::new(),
                latest_checkpoint: None,
                events: vec![],
            };
            job.event(format!("submitted from {source_name}"));
            inner.jobs.insert(id.clone(), job);
            inner.pending_since.insert(id.clone(), Instant::now());
            inner.stats.submitted_total += 1;
            inner.dirty_jobs.insert(id.clone());
            Ok(id)
        })
        .await
    }

    pub fn job(&self, id: &str) -> Result<JobRecord, ClusterError> {
        self.inner.lock().unwrap().jobs.get(id).cloned().ok_or_else(|| ClusterError::UnknownJob(id.to_string()))
    }

    /// Jobs in submit order, optionally only those in the given states.
    pub fn jobs(&self, states: &[String]) -> Vec<JobRecord> {
        let inner = self.inner.lock().unwrap();
        let mut jobs: Vec<JobRecord> = inner
            .jobs
            .values()
            .filter(|j| states.is_empty() || states.iter().any(|s| s.eq_ignore_ascii_case(j.state.as_str())))
            .cloned()
            .collect();
        jobs.sort_by_key(|j| j.seq);
        jobs
    }

    pub async fn cancel(&self, id: &str) -> Result<JobState, ClusterError> {
        self.mutate(|inner, cluster| {
            let job = inner.jobs.get_mut(id).ok_or_else(|| ClusterError::UnknownJob(id.to_string()))?;
            if job.state.is_terminal() {
                return Ok(job.state);
            }
            job.state = JobState::Cancelled;
            job.finished_unix = now_unix();
            job.message = "cancelled by user".into();
            job.event("cancelled by user");
            inner.end_attempt(id, "job cancelled", cluster);
            inner.dirty_jobs.insert(id.to_string());
            Ok(JobState::Cancelled)
        })
        .await
    }

    /// The Prometheus text of the coordinator's metrics (see [`crate::metrics`]).
    pub fn metrics_text(&self) -> String {
        let inner = self.inner.lock().unwrap();
        let mut g = crate::metrics::Gauges::default();
        let states = [
            JobState::Pending,
            JobState::Scheduled,
            JobState::Running,
            JobState::Checkpointing,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ];
        g.jobs_by_state = states
            .iter()
            .map(|st| (st.as_str(), inner.jobs.values().filter(|j| j.state == *st).count() as u64))
            .collect();
        let usage = inner.usage();
        for n in inner.nodes.values() {
            g.nodes_total += 1;
            g.nodes_alive += n.session.is_some() as u64;
            g.gpus_total += n.record.gpus as u64;
            g.cpu_slots_total += n.record.cpu_slots as u64;
        }
        for (gpus, cpus, _) in usage.values() {
            g.gpus_used += gpus.len() as u64;
            g.cpu_slots_used += *cpus as u64;
        }
        crate::metrics::render(&g, &inner.stats)
    }

    pub fn nodes(&self) -> Vec<pb::NodeStatus> {
        let inner = self.inner.lock().unwrap();
        let usage = inner.usage();
        inner
            .nodes
            .values()
            .map(|n| {
                let (gpus_used, cpu_used, running) = usage.get(&n.record.name).cloned().unwrap_or_default();
                pb::NodeStatus {
                    name: n.record.name.clone(),
                    alive: n.session.is_some(),
                    gpus: n.record.gpus,
                    cpu_slots: n.record.cpu_slots,
                    gpus_used: gpus_used.len() as u32,
                    cpu_slots_used: cpu_used,
                    address: n.record.address.clone(),
                    gpu_names: n.record.gpu_names.clone(),
                    last_heartbeat_unix: n.last_seen_unix,
                    running: running.into_iter().map(|(k, ranks)| format!("{k}: ranks {ranks:?}")).collect(),
                }
            })
            .collect()
    }

    // ───────────── worker API ─────────────

    pub async fn register(&self, req: pb::RegisterRequest) -> Result<pb::RegisterResponse, ClusterError> {
        let interval = self.timings.heartbeat_interval;
        self.mutate(move |inner, cluster| {
            let session = format!("{}-{}", req.node_name, uuid::Uuid::new_v4());
            let record = NodeRecord {
                name: req.node_name.clone(),
                gpus: req.gpus,
                cpu_slots: req.cpu_slots,
                gpu_names: req.gpu_names.clone(),
                address: req.address.clone(),
            };
            let (tx, rx) = mpsc::unbounded_channel();
            inner.nodes.insert(
                req.node_name.clone(),
                NodeRuntime {
                    record,
                    session: Some(session.clone()),
                    last_seen: Instant::now(),
                    last_seen_unix: now_unix(),
                    tx: Some(tx),
                    rx: Some(rx),
                },
            );
            inner.dirty_nodes.insert(req.node_name.clone());
            for report in &req.finished {
                inner.apply_rank_report(report, cluster);
            }
            let stop = inner.reconcile_node(&req.node_name, &req.running, cluster);
            Ok(pb::RegisterResponse { session_id: session, heartbeat_interval_ms: interval.as_millis() as u64, stop })
        })
        .await
    }

    /// Records a heartbeat; `false` when the session is unknown (the worker must register again).
    pub fn heartbeat(&self, node: &str, session: &str) -> bool {
        if self.is_closed() {
            return false;
        }
        let mut inner = self.inner.lock().unwrap();
        match inner.nodes.get_mut(node) {
            Some(n) if n.session.as_deref() == Some(session) => {
                n.last_seen = Instant::now();
                n.last_seen_unix = now_unix();
                true
            }
            _ => false,
        }
    }

    /// Takes the assignment stream of a worker session (once per session).
    pub fn assignments(&self, node: &str, session: &str) -> Result<mpsc::UnboundedReceiver<pb::Assignment>, ClusterError> {
        let mut inner = self.inner.lock().unwrap();
        match inner.nodes.get_mut(node) {
            Some(n) if n.session.as_deref() == Some(session) => {
                n.rx.take().ok_or_else(|| ClusterError::UnknownSession(node.to_string()))
            }
            _ => Err(ClusterError::UnknownSession(node.to_string())),
        }
    }

    pub async fn rank_report(&self, report: pb::RankReport) -> Result<(), ClusterError> {
        {
            let inner = self.inner.lock().unwrap();
            let known = inner.nodes.get(&report.node_name).is_some_and(|n| n.session.as_deref() == Some(&report.session_id));
            if !known {
                return Err(ClusterError::UnknownSession(report.node_name.clone()));
            }
        }
        self.mutate(|inner, cluster| {
            inner.apply_rank_report(&report, cluster);
            Ok(())
        })
        .await
    }

    /// Declares nodes silent past the heartbeat timeout lost; returns their names.
    pub async fn check_liveness(&self) -> Result<Vec<String>, ClusterError> {
        let timeout = self.timings.heartbeat_timeout;
        self.mutate(|inner, cluster| {
            let now = Instant::now();
            let lost: Vec<String> = inner
                .nodes
                .iter()
                .filter(|(_, n)| now.duration_since(n.last_seen) > timeout)
                .filter(|(name, n)| n.session.is_some() || inner.has_live_ranks_on(name))
                .map(|(name, _)| name.clone())
                .collect();
            for name in &lost {
                tracing::warn!(node = %name, "no heartbeat for {timeout:?}: node lost");
                inner.lose_node(name, cluster);
            }
            Ok(lost)
        })
        .await
    }

    // ───────────── rank API ─────────────

    /// Validates that a rendezvous call names a live attempt and returns its world size.
    pub fn attempt_world(&self, job_id: &str, attempt: u32) -> Result<u32, ClusterError> {
        let inner = self.inner.lock().unwrap();
        let job = inner.jobs.get(job_id).ok_or_else(|| ClusterError::UnknownJob(job_id.to_string()))?;
        match job.attempts.get(attempt.wrapping_sub(1) as usize) {
            Some(a) if !a.ended => Ok(job.world_size),
            _ => Err(ClusterError::InvalidSpec(format!("attempt {attempt} of job {job_id} is not running"))),
        }
    }

    pub async fn progress(&self, report: pb::ProgressReport) -> Result<(), ClusterError> {
        self.mutate(|inner, _| {
            let job = inner.jobs.get_mut(&report.job_id).ok_or_else(|| ClusterError::UnknownJob(report.job_id.clone()))?;
            if report.attempt != job.attempt_number() {
                return Ok(());
            }
            if let Some(p) = &report.progress {
                job.progress = Progress {
                    step: p.step,
                    total_steps: p.total_steps,
                    loss: p.loss,
                    tokens_per_s: p.tokens_per_s,
                    eta_s: p.eta_s,
                    updated_unix: now_unix(),
                };
            }
            for (k, v) in &report.results {
                job.results.insert(k.clone(), v.clone());
            }
            if !report.checkpoint_committed.is_empty() {
                job.latest_checkpoint = Some(report.checkpoint_committed.clone());
                job.event(format!("checkpoint step {} committed: {}", report.checkpoint_step, report.checkpoint_committed));
            }
            inner.dirty_jobs.insert(report.job_id.clone());
            Ok(())
        })
        .await
    }
}

type Usage = HashMap<String, (BTreeSet<u32>, u32, BTreeMap<String, Vec<u32>>)>;

impl Inner {
    fn take_dirty(&mut self) -> WriteBatch {
        let jobs = std::mem::take(&mut self.dirty_jobs).into_iter().filter_map(|id| self.jobs.get(&id).cloned()).collect();
        let nodes =
            std::mem::take(&mut self.dirty_nodes).into_iter().filter_map(|n| self.nodes.get(&n).map(|n| n.record.clone())).collect();
        WriteBatch { jobs, nodes }
    }

    /// Per node: GPUs in use, CPU slots in use, and "job/attempt" → live ranks.
    fn usage(&self) -> Usage {
        let mut usage: Usage = HashMap::new();
        for job in self.jobs.values() {
            for attempt in &job.attempts {
                for r in attempt.live_ranks() {
                    let entry = usage.entry(r.node.clone()).or_default();
                    match r.gpu {
                        Some(g) => {
                            entry.0.insert(g);
                        }
                        None => entry.1 += 1,
                    }
                    entry.2.entry(format!("{}/{}", job.id, attempt.number)).or_default().push(r.rank);
                }
            }
        }
        usage
    }

    fn has_live_ranks_on(&self, node: &str) -> bool {
        self.jobs.values().any(|j| j.attempts.iter().any(|a| a.live_ranks().any(|r| r.node == node)))
    }

    fn send(&self, node: &str, what: pb::assignment::What) {
        if let Some(tx) = self.nodes.get(node).and_then(|n| n.tx.as_ref()) {
            let _ = tx.send(pb::Assignment { what: Some(what) });
        }
    }

    /// Places queued jobs on free capacity and sends their rank starts.
    fn schedule(&mut self, cluster: &Cluster) {
        let queue: Vec<QueuedJob> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Pending)
            .map(|j| QueuedJob {
                id: j.id.clone(),
                priority: j.priority,
                seq: j.seq,
                request: GangRequest { nodes: j.nodes, ranks_per_node: j.ranks_per_node, gpus_per_node: j.gpus_per_node },
            })
            .collect();
        if queue.is_empty() {
            return;
        }
        let usage = self.usage();
        let mut free: Vec<NodeFree> = self
            .nodes
            .values()
            .filter(|n| n.session.is_some())
            .map(|n| {
                let (gpus, cpus, _) = usage.get(&n.record.name).cloned().unwrap_or_default();
                NodeFree {
                    name: n.record.name.clone(),
                    free_gpus: (0..n.record.gpus).filter(|g| !gpus.contains(g)).collect(),
                    free_cpu_slots: n.record.cpu_slots.saturating_sub(cpus),
                    total_gpus: n.record.gpus,
                    total_cpu_slots: n.record.cpu_slots,
                }
            })
            .collect();
        let (placed, waiting) = scheduler::schedule(queue, &mut free);
        for (id, reason) in waiting {
            let job = self.jobs.get_mut(&id).expect("queued job exists");
            if job.message != reason {
                job.message = reason;
                self.dirty_jobs.insert(id);
            }
        }
        for (id, ranks) in placed {
            if let Some(since) = self.pending_since.remove(&id) {
                self.stats.observe_latency(since.elapsed());
            }
            self.stats.attempts_started_total += 1;
            let job = self.jobs.get_mut(&id).expect("placed job exists");
            let number = job.attempt_number() + 1;
            let attempt = Attempt {
                number,
                ranks: ranks
                    .iter()
                    .map(|r| RankRecord {
                        rank: r.rank,
                        node: r.node.clone(),
                        local_rank: r.local_rank,
                        gpu: r.gpu,
                        state: RankState::Assigned,
                    })
                    .collect(),
                started_unix: now_unix(),
                ended: false,
                resume_from: job.latest_checkpoint.clone(),
            };
            let placement = attempt.placement();
            job.attempts.push(attempt);
            job.state = JobState::Scheduled;
            job.message = format!("attempt {number} placed");
            let where_ = placement.iter().map(|(n, r)| format!("{n}{r:?}")).collect::<Vec<_>>().join(" ");
            job.event(format!("attempt {number} scheduled on {where_}"));
            let start = |node: &str| pb::StartRanks {
                job_id: job.id.clone(),
                attempt: number,
                world_size: job.world_size,
                spec_yaml: job.spec_yaml.clone(),
                resume_from: job.latest_checkpoint.clone().unwrap_or_default(),
                ranks: ranks
                    .iter()
                    .filter(|r| r.node == node)
                    .map(|r| pb::RankSlot { rank: r.rank, local_rank: r.local_rank, gpu: r.gpu.map_or(-1, |g| g as i32) })
                    .collect(),
            };
            let starts: Vec<(String, pb::StartRanks)> = placement.iter().map(|(node, _)| (node.clone(), start(node))).collect();
            self.dirty_jobs.insert(id);
            for (node, s) in starts {
                self.send(&node, pb::assignment::What::Start(s));
            }
        }
        let _ = cluster;
    }

    /// Ends the current attempt of a job: marks it ended, stops its live ranks, closes its rendezvous.
    fn end_attempt(&mut self, job_id: &str, reason: &str, cluster: &Cluster) {
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        let Some(attempt) = job.current_attempt_mut() else { return };
        if attempt.ended {
            return;
        }
        attempt.ended = true;
        let number = attempt.number;
        let nodes: BTreeSet<String> = attempt.live_ranks().map(|r| r.node.clone()).collect();
        for node in nodes {
            self.send(
                &node,
                pb::assignment::What::Stop(pb::StopAttempt {
                    job_id: job_id.to_string(),
                    attempt: number,
                    grace_ms: cluster.timings.stop_grace.as_millis() as u64,
                    reason: reason.to_string(),
                }),
            );
        }
        cluster.rendezvous.close(job_id, number);
    }

    /// The current attempt failed: stop it, then retry or fail the job.
    fn fail_attempt(&mut self, job_id: &str, reason: String, cluster: &Cluster) {
        self.end_attempt(job_id, &reason, cluster);
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        if job.state.is_terminal() {
            return;
        }
        let number = job.attempt_number();
        let restarts_used = number.saturating_sub(1);
        self.stats.attempts_failed_total += 1;
        if restarts_used < job.max_restarts {
            self.pending_since.insert(job_id.to_string(), Instant::now());
            job.state = JobState::Pending;
            job.message = format!("attempt {number} failed: {reason}; restarting");
            job.event(format!(
                "attempt {number} failed: {reason}; restart {} of {}{}",
                restarts_used + 1,
                job.max_restarts,
                job.latest_checkpoint.as_ref().map(|c| format!(", resuming from {c}")).unwrap_or_default()
            ));
        } else {
            job.state = JobState::Failed;
            job.finished_unix = now_unix();
            job.message = format!("attempt {number} failed: {reason}");
            job.event(format!("failed: {reason} (no restarts left of {})", job.max_restarts));
        }
        self.dirty_jobs.insert(job_id.to_string());
    }

    fn apply_rank_report(&mut self, report: &pb::RankReport, cluster: &Cluster) {
        let Some(rref) = &report.rank else { return };
        let Some(job) = self.jobs.get_mut(&rref.job_id) else { return };
        let current = job.attempt_number();
        let Some(attempt) = job.attempts.get_mut(rref.attempt.wrapping_sub(1) as usize) else { return };
        let Some(rank) = attempt.ranks.iter_mut().find(|r| r.rank == rref.rank && r.node == report.node_name) else {
            return;
        };
        let new_state = match report.state.as_str() {
            "running" => RankState::Running { pid: report.pid },
            "exited" => RankState::Exited { code: report.exit_code },
            _ => RankState::FailedToStart { message: report.message.clone() },
        };
        if !rank.state.is_live() {
            return; // a late duplicate
        }
        rank.state = new_state.clone();
        let is_current = rref.attempt == current && !attempt.ended;
        let all_running = attempt.ranks.iter().all(|r| matches!(r.state, RankState::Running { .. }));
        let all_succeeded = attempt.ranks.iter().all(|r| r.state == RankState::Exited { code: 0 });
        let job_id = rref.job_id.clone();
        self.dirty_jobs.insert(job_id.clone());
        if !is_current {
            return;
        }
        let node = &report.node_name;
        match new_state {
            RankState::Running { .. } if all_running && job.state == JobState::Scheduled => {
                job.state = JobState::Running;
                job.message = format!("attempt {current} running");
                if job.started_unix == 0.0 {
                    job.started_unix = now_unix();
                }
                job.event(format!("attempt {current}: all {} ranks running", job.world_size));
            }
            RankState::Exited { code: 0 } if all_succeeded => {
                job.state = JobState::Succeeded;
                job.finished_unix = now_unix();
                job.message = format!("attempt {current} succeeded");
                job.event(format!("succeeded on attempt {current}"));
                self.end_attempt(&job_id, "job succeeded", cluster);
            }
            RankState::Exited { code } if code != 0 => {
                let why = if code > 128 { format!(" (signal {})", code - 128) } else { String::new() };
                self.fail_attempt(&job_id, format!("rank {} on {node} exited with code {code}{why}", rref.rank), cluster);
            }
            RankState::FailedToStart { message } => {
                self.fail_attempt(&job_id, format!("rank {} on {node} failed to start: {message}", rref.rank), cluster);
            }
            _ => {}
        }
    }

    /// After a (re-)registration: ranks the worker still runs stay; ranks the coordinator expected there
    /// but the worker does not know are lost; ranks the coordinator no longer wants are returned to stop.
    fn reconcile_node(&mut self, node: &str, running: &[pb::RankRef], cluster: &Cluster) -> Vec<pb::RankRef> {
        let reported: BTreeSet<(String, u32, u32)> = running.iter().map(|r| (r.job_id.clone(), r.attempt, r.rank)).collect();
        let mut lost: Vec<(String, u32)> = Vec::new();
        let mut wanted: BTreeSet<(String, u32, u32)> = BTreeSet::new();
        for job in self.jobs.values_mut() {
            let current = job.attempts.len() as u32;
            for attempt in &mut job.attempts {
                for r in attempt.ranks.iter_mut().filter(|r| r.node == node && r.state.is_live()) {
                    let key = (job.id.clone(), attempt.number, r.rank);
                    if reported.contains(&key) {
                        if !attempt.ended {
                            wanted.insert(key);
                        }
                    } else if matches!(r.state, RankState::Running { .. }) {
                        r.state = RankState::Lost;
                        self.dirty_jobs.insert(job.id.clone());
                        if attempt.number == current && !attempt.ended {
                            lost.push((job.id.clone(), r.rank));
                        }
                    }
                }
            }
        }
        for (job_id, rank) in lost {
            self.fail_attempt(&job_id, format!("rank {rank} vanished from {node} (worker restarted)"), cluster);
        }
        running
            .iter()
            .filter(|r| !wanted.contains(&(r.job_id.clone(), r.attempt, r.rank)))
            .cloned()
            .collect()
    }

    fn lose_node(&mut self, node: &str, cluster: &Cluster) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.session = None;
            n.tx = None;
            n.rx = None;
        }
        let mut failed = Vec::new();
        for job in self.jobs.values_mut() {
            let current = job.attempts.len() as u32;
            for attempt in &mut job.attempts {
                let mut hit = false;
                for r in attempt.ranks.iter_mut().filter(|r| r.node == node && r.state.is_live()) {
                    r.state = RankState::Lost;
                    hit = true;
                }
                if hit {
                    self.dirty_jobs.insert(job.id.clone());
                    if attempt.number == current && !attempt.ended {
                        failed.push(job.id.clone());
                    }
                }
            }
        }
        for job_id in failed {
            self.fail_attempt(&job_id, format!("node {node} lost (no heartbeat)"), cluster);
        }
    }
}
