//! The rank-process entry point (`qworker rank`, also `qctl rank`): what runs inside each process the
//! worker launches. It reads its identity from the environment the worker set (`QCLUSTER_*`), meets its
//! peers through the coordinator's rendezvous, runs the job's body, and reports results.

use qcluster_proto::v1 as pb;
use qcluster_proto::v1::rendezvous_client::RendezvousClient;
use qjobspec::{JobKind, JobSpec};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;
use qcluster_proto::client::AuthChannel;

/// How a rank meets its peers: through the coordinator's Rendezvous service (ranks a worker
/// launched), or through a TCP store on node 0 (launches without a coordinator, see `launcher`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Meeting {
    Coordinator(String),
    TcpStore(String),
}

/// Who this rank is: written into a rank's environment by its launcher ([`RankEnv::to_vars`]: the
/// worker daemon or `qctl launch`) and read back inside the rank ([`RankEnv::from_env`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RankEnv {
    pub meeting: Meeting,
    pub job_id: String,
    pub attempt: u32,
    pub rank: u32,
    pub local_rank: u32,
    pub world_size: u32,
    pub node_address: String,
    pub spec_path: PathBuf,
    pub run_dir: PathBuf,
    pub resume_from: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RankEnvError {
    #[error("environment variable {0} is not set (rank processes are started by qworker or `qctl launch`)")]
    Missing(&'static str),
    #[error("neither QCLUSTER_COORDINATOR nor QCLUSTER_STORE is set: a rank needs one to meet its peers")]
    NoMeeting,
    #[error("environment variable {name}={value:?} is not a number")]
    NotNumber { name: &'static str, value: String },
}

impl RankEnv {
    /// The environment variables that carry this identity (the torchrun-style `RANK`, `LOCAL_RANK`,
    /// `WORLD_SIZE` included); [`RankEnv::from_lookup`] reads them back.
    pub fn to_vars(&self) -> Vec<(&'static str, String)> {
        let meeting = match &self.meeting {
            Meeting::Coordinator(url) => ("QCLUSTER_COORDINATOR", url.clone()),
            Meeting::TcpStore(addr) => ("QCLUSTER_STORE", addr.clone()),
        };
        let resume = self.resume_from.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        vec![
            meeting,
            ("QCLUSTER_JOB_ID", self.job_id.clone()),
            ("QCLUSTER_ATTEMPT", self.attempt.to_string()),
            ("QCLUSTER_RANK", self.rank.to_string()),
            ("QCLUSTER_LOCAL_RANK", self.local_rank.to_string()),
            ("QCLUSTER_WORLD_SIZE", self.world_size.to_string()),
            ("QCLUSTER_NODE_ADDRESS", self.node_address.clone()),
            ("QCLUSTER_SPEC", self.spec_path.display().to_string()),
            ("QCLUSTER_RUN_DIR", self.run_dir.display().to_string()),
            ("QCLUSTER_RESUME_FROM", resume),
            ("RANK", self.rank.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
        ]
    }

    pub fn from_env() -> Result<RankEnv, RankEnvError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<RankEnv, RankEnvError> {
        let var = |name: &'static str| get(name).ok_or(RankEnvError::Missing(name));
        let num = |name: &'static str| -> Result<u32, RankEnvError> {
            let value = var(name)?;
            value.parse().map_err(|_| RankEnvError::NotNumber { name, value })
        };
        let resume = get("QCLUSTER_RESUME_FROM").filter(|s| !s.is_empty()).map(PathBuf::from);
        let meeting = match (get("QCLUSTER_COORDINATOR"), get("QCLUSTER_STORE")) {
            (Some(url), _) if !url.is_empty() => Meeting::Coordinator(url),
            (_, Some(store)) if !store.is_empty() => Meeting::TcpStore(store),
            _ => return Err(RankEnvError::NoMeeting),
        };
        Ok(RankEnv {
            meeting,
            job_id: var("QCLUSTER_JOB_ID")?,
            attempt: num("QCLUSTER_ATTEMPT")?,
            rank: num("QCLUSTER_RANK")?,
            local_rank: num("QCLUSTER_LOCAL_RANK")?,
            world_size: num("QCLUSTER_WORLD_SIZE")?,
            node_address: get("QCLUSTER_NODE_ADDRESS").unwrap_or_else(|| "127.0.0.1".into()),
            spec_path: PathBuf::from(var("QCLUSTER_SPEC")?),
            run_dir: PathBuf::from(var("QCLUSTER_RUN_DIR")?),
            resume_from: resume,
        })
    }
}

/// A rank's line to the coordinator (blocking wrappers over the async client). `url` may list several
/// coordinators (`http://a,http://b`, HA): a call answered by a follower, or not answered, moves to the leader it
/// names or to the next URL ([`qcluster_proto::leader::Endpoints`]), so a rank survives a failover.
pub struct RankClient {
    env: RankEnv,
    runtime: tokio::runtime::Runtime,
    client: RendezvousClient<AuthChannel>,
    endpoints: qcluster_proto::leader::Endpoints,
    security: qcluster_proto::client::ClientSecurity,
}

impl RankClient {
    pub fn connect(env: RankEnv, url: &str) -> anyhow::Result<RankClient> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let endpoints = qcluster_proto::leader::Endpoints::parse(url)
            .map_err(|e| anyhow::anyhow!("coordinator URL {url:?}: {e}"))?;
        let security = qcluster_proto::client::ClientSecurity::from_env()?;
        let client = Self::client_for(&runtime, &security, endpoints.current())?;
        Ok(RankClient { env, runtime, client, endpoints, security })
    }

    fn client_for(
        runtime: &tokio::runtime::Runtime,
        security: &qcluster_proto::client::ClientSecurity,
        url: &str,
    ) -> anyhow::Result<RendezvousClient<AuthChannel>> {
        // The channel's background task is spawned on this runtime (it runs inside `block_on`).
        let _guard = runtime.enter();
        Ok(RendezvousClient::new(security.connect_lazy(url)?))
    }

    /// Retries a call through coordinator restarts until `deadline` passes.
    fn retrying<T>(
        &mut self,
        what: &str,
        deadline: Duration,
        mut call: impl FnMut(RendezvousClient<AuthChannel>) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, tonic::Status>> + Send>>,
    ) -> anyhow::Result<T> {
        let start = std::time::Instant::now();
        loop {
            match self.runtime.block_on(call(self.client.clone())) {
                Ok(v) => return Ok(v),
                Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) && start.elapsed() < deadline => {
                    // A follower names the leader; an unreachable coordinator sends us to the next URL.
                    let hinted = self.endpoints.failed(Some(&s));
                    if self.endpoints.urls().len() > 1 || hinted {
                        self.client = Self::client_for(&self.runtime, &self.security, self.endpoints.current())?;
                    }
                    if !hinted {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                }
                Err(s) => anyhow::bail!("{what}: {}", s.message()),
            }
        }
    }

    /// Announces `address` and returns every rank's address (index = rank).
    pub fn join(&mut self, address: String, timeout: Duration) -> anyhow::Result<Vec<String>> {
        let req = pb::JoinRequest {
            job_id: self.env.job_id.clone(),
            attempt: self.env.attempt,
            rank: self.env.rank,
            world_size: self.env.world_size,
            address,
            timeout_ms: timeout.as_millis() as u64,
        };
        self.retrying("rendezvous", timeout, move |mut c| {
            let req = req.clone();
            Box::pin(async move { c.join(req).await.map(|r| r.into_inner().addresses) })
        })
    }

    /// Stores `value` under `key` in the attempt's rendezvous key-value store (NCCL unique ids).
    pub fn put(&mut self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        let req = pb::KvPut {
            job_id: self.env.job_id.clone(),
            attempt: self.env.attempt,
            key: key.to_string(),
            value: value.to_vec(),
        };
        self.retrying("rendezvous put", Duration::from_secs(60), move |mut c| {
            let req = req.clone();
            Box::pin(async move { c.put(req).await.map(|_| ()) })
        })
    }

    /// Waits up to `timeout` for `key` in the attempt's rendezvous key-value store.
    pub fn get(&mut self, key: &str, timeout: Duration) -> anyhow::Result<Vec<u8>> {
        let req = pb::KvGet {
            job_id: self.env.job_id.clone(),
            attempt: self.env.attempt,
            key: key.to_string(),
            timeout_ms: timeout.as_millis() as u64,
        };
        self.retrying("rendezvous get", timeout, move |mut c| {
            let req = req.clone();
            Box::pin(async move { c.get(req).await.map(|r| r.into_inner().value) })
        })
    }

    /// Reports progress/results (retried through a coordinator restart for up to a minute).
    pub fn report(&mut self, progress: Option<pb::Progress>, results: HashMap<String, String>) -> anyhow::Result<()> {
        self.report_with_checkpoint(progress, results, None)
    }

    /// [`RankClient::report`] plus, optionally, a committed checkpoint `(step, dir)`.
    pub fn report_with_checkpoint(
        &mut self,
        progress: Option<pb::Progress>,
        results: HashMap<String, String>,
        checkpoint: Option<(u64, &std::path::Path)>,
    ) -> anyhow::Result<()> {
        let req = pb::ProgressReport {
            job_id: self.env.job_id.clone(),
            attempt: self.env.attempt,
            rank: self.env.rank,
            progress,
            results,
            checkpoint_committed: checkpoint.map(|(_, d)| d.display().to_string()).unwrap_or_default(),
            checkpoint_step: checkpoint.map(|(s, _)| s).unwrap_or(0),
        };
        self.retrying("progress report", Duration::from_secs(60), move |mut c| {
            let req = req.clone();
            Box::pin(async move { c.report_progress(req).await.map(|_| ()) })
        })
    }
}

/// A rank's line to its peers and to whoever collects results.
pub enum RankLink {
    Coordinator(RankClient),
    /// Results go to stdout as one `qcluster-results {json}` line (no coordinator to report to).
    Store { client: crate::tcp_store::StoreClient, prefix: String, rank: u32, world: u32 },
}

impl RankLink {
    pub fn connect(env: &RankEnv) -> anyhow::Result<RankLink> {
        Ok(match &env.meeting {
            Meeting::Coordinator(url) => RankLink::Coordinator(RankClient::connect(env.clone(), url)?),
            Meeting::TcpStore(addr) => RankLink::Store {
                client: crate::tcp_store::StoreClient::connect(addr, Duration::from_secs(300))?,
                prefix: format!("{}/{}", env.job_id, env.attempt),
                rank: env.rank,
                world: env.world_size,
            },
        })
    }

    pub fn join(&mut self, address: String, timeout: Duration) -> anyhow::Result<Vec<String>> {
        match self {
            RankLink::Coordinator(c) => c.join(address, timeout),
            RankLink::Store { client, prefix, rank, world } => Ok(client.join(prefix, *rank, *world, &address, timeout)?),
        }
    }

    /// Stores `value` under `key` for the ranks of this attempt (coordinator KV, or the TCP store under the
    /// attempt's prefix).
    pub fn kv_put(&mut self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        match self {
            RankLink::Coordinator(c) => c.put(key, value),
            RankLink::Store { client, prefix, .. } => Ok(client.set(&format!("{prefix}/kv/{key}"), value)?),
        }
    }

    /// Waits up to `timeout` for `key` (see [`RankLink::kv_put`]).
    pub fn kv_get(&mut self, key: &str, timeout: Duration) -> anyhow::Result<Vec<u8>> {
        match self {
            RankLink::Coordinator(c) => c.get(key, timeout),
            RankLink::Store { client, prefix, .. } => Ok(client.get(&format!("{prefix}/kv/{key}"), timeout)?),
        }
    }

    /// Reports a committed checkpoint (the coordinator resumes restarted attempts from the newest).
    pub fn report_checkpoint(&mut self, step: u64, dir: &std::path::Path) -> anyhow::Result<()> {
        match self {
            RankLink::Coordinator(c) => c.report_with_checkpoint(None, HashMap::new(), Some((step, dir))),
            RankLink::Store { .. } => Ok(()),
        }
    }

    pub fn report(&mut self, progress: Option<pb::Progress>, results: HashMap<String, String>) -> anyhow::Result<()> {
        match self {
            RankLink::Coordinator(c) => c.report(progress, results),
            // Progress has nowhere to go without a coordinator (the rank's log has it); results are printed.
            RankLink::Store { .. } if results.is_empty() => Ok(()),
            RankLink::Store { .. } => {
                let results: std::collections::BTreeMap<_, _> = results.into_iter().collect();
                println!("qcluster-results {}", serde_json::to_string(&results)?);
                Ok(())
            }
        }
    }
}

/// NCCL unique ids travel through the rank's rendezvous (`nccl/<group>` keys).
impl qparallel::comm::NcclIdStore for RankLink {
    fn put(&mut self, key: &str, value: &[u8]) -> Result<(), String> {
        self.kv_put(key, value).map_err(|e| format!("{e:#}"))
    }

    fn get(&mut self, key: &str, timeout: Duration) -> Result<Vec<u8>, String> {
        self.kv_get(key, timeout).map_err(|e| format!("{e:#}"))
    }
}

/// Runs this rank; the process exits 0 on success.
pub fn rank_main() -> anyhow::Result<()> {
    let env = RankEnv::from_env()?;
    let spec_text = std::fs::read_to_string(&env.spec_path)
        .map_err(|e| anyhow::anyhow!("cannot read job spec {}: {e}", env.spec_path.display()))?;
    let spec = JobSpec::parse(&spec_text, &env.spec_path.display().to_string())?;
    eprintln!(
        "rank {}/{} of job {} attempt {} ({})",
        env.rank, env.world_size, env.job_id, env.attempt, spec.kind
    );
    match spec.kind {
        JobKind::CommCheck => run_comm_check(env, &spec),
        JobKind::Pretrain | JobKind::Sft => {
            let mut link = RankLink::connect(&env)?;
            let last_checkpoint = crate::training::run_rank_training(&env, &spec, &mut link)?;
            match (spec.serve_after_training, last_checkpoint) {
                (Some(true), Some(dir)) if env.rank == 0 => {
                    let settings = spec.serve.clone().unwrap_or_default();
                    crate::serving::serve_until_stopped(&env, &spec, &settings, &dir, &mut link)
                }
                (Some(true), None) if env.rank == 0 => {
                    anyhow::bail!("serve_after_training: the run wrote no checkpoint to serve")
                }
                _ => Ok(()),
            }
        }
        JobKind::Serve => {
            let mut link = RankLink::connect(&env)?;
            crate::serving::run_serve_rank(&env, &spec, &mut link)
        }
        other => anyhow::bail!("job kind `{other}` cannot run in a rank process of this build"),
    }
}

/// The CUDA ordinal this rank's collectives run on, or `None` for the CPU communicator.
///
/// GPUs are used when the job asks for them (`resources.gpus_per_node > 0`), the process sees a CUDA device,
/// and `COMM_BACKEND` (a job `env:` key) is not `cpu`. A worker gives each GPU rank exactly one device in
/// `CUDA_VISIBLE_DEVICES` (ordinal 0) and an empty value to CPU ranks; under `qctl launch` (or a `CUDA_VISIBLE_DEVICES` listing
/// several devices) the rank uses ordinal `LOCAL_RANK`.
pub fn rank_gpu(
    gpus_per_node: u32,
    local_rank: u32,
    get: impl Fn(&str) -> Option<String>,
    device_count: impl FnOnce() -> usize,
) -> anyhow::Result<Option<usize>> {
    if gpus_per_node == 0 || get("COMM_BACKEND").is_some_and(|v| v.trim().eq_ignore_ascii_case("cpu")) {
        return Ok(None);
    }
    let visible = get("CUDA_VISIBLE_DEVICES");
    if visible.as_deref().is_some_and(|v| v.trim().is_empty()) {
        return Ok(None);
    }
    let count = device_count();
    if count == 0 {
        eprintln!("the job asks for GPUs but this process sees no CUDA device: using the CPU communicator");
        return Ok(None);
    }
    let ordinal = match visible {
        Some(v) if !v.contains(',') => 0,
        _ => local_rank as usize,
    };
    anyhow::ensure!(
        ordinal < count,
        "local rank {local_rank} needs CUDA device {ordinal}, but only {count} are visible"
    );
    Ok(Some(ordinal))
}

/// [`rank_gpu`] for the rank `local_rank` of a job on this node, reading this process's environment and the
/// CUDA driver's device count.
pub fn job_rank_gpu(spec: &JobSpec, local_rank: u32) -> anyhow::Result<Option<usize>> {
    rank_gpu(
        spec.resources.gpus_per_node,
        local_rank,
        |k| std::env::var(k).ok(),
        qparallel::comm::nccl::cuda_device_count,
    )
}

fn run_comm_check(env: RankEnv, spec: &JobSpec) -> anyhow::Result<()> {
    let gpu = job_rank_gpu(spec, env.local_rank)?;
    if let Some(ordinal) = gpu {
        return run_comm_check_nccl(env, spec, ordinal);
    }
    let rank = env.rank as usize;
    let mut client = RankLink::connect(&env)?;
    let comm = crate::training::cpu_world(&env, &mut client, Duration::from_secs(120))?;
    let report = qparallel::comm_check::run_comm_check(&comm, spec.comm_check.bytes as usize, spec.comm_check.iters as usize)?;
    println!("{report}");
    if rank == 0 {
        let mut results = HashMap::new();
        for r in &report.results {
            let name = r.collective.name();
            results.insert(format!("{name}.busbw_gbps"), format!("{:.3}", r.busbw_gbps));
            results.insert(format!("{name}.algbw_gbps"), format!("{:.3}", r.algbw_gbps));
            results.insert(format!("{name}.verified"), r.passed.to_string());
        }
        results.insert("comm_check.bytes".into(), spec.comm_check.bytes.to_string());
        results.insert("comm_check.ranks".into(), report.ranks.to_string());
        client.report(None, results)?;
    }
    if spec.comm_check.hold_s > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(spec.comm_check.hold_s));
    }
    comm.barrier()?;
    anyhow::ensure!(report.passed(), "comm-check verification failed: {report}");
    Ok(())
}

/// The GPU comm-check: one NCCL communicator over all ranks (unique id through the rendezvous KV), device
/// buffers, `COMM_CHECK_DTYPE` (a job `env:` key) = `f32` (default) or `bf16`.
fn run_comm_check_nccl(env: RankEnv, spec: &JobSpec, ordinal: usize) -> anyhow::Result<()> {
    use qparallel::comm_check_gpu::{parse_dtype, run_comm_check_nccl};
    let dtype_name = std::env::var("COMM_CHECK_DTYPE").unwrap_or_else(|_| "f32".into());
    let dtype = parse_dtype(&dtype_name)
        .ok_or_else(|| anyhow::anyhow!("COMM_CHECK_DTYPE={dtype_name:?}: use f32 or bf16"))?;
    let rank = env.rank as usize;
    let world = env.world_size as usize;
    let mut link = RankLink::connect(&env)?;
    eprintln!("rank {rank}: NCCL on CUDA device {ordinal}");
    let comm = qparallel::comm::NcclCommunicator::init(
        ordinal,
        rank,
        (0..world).collect(),
        "world",
        &mut link,
        Duration::from_secs(300),
    )?;
    let opts = qparallel::comm_check::CommCheckOptions {
        bytes: spec.comm_check.bytes as usize,
        iters: spec.comm_check.iters as usize,
        warmup: qparallel::comm_check::DEFAULT_WARMUP,
    };
    let gpu_report = run_comm_check_nccl(&comm, opts, dtype)?;
    println!("{gpu_report}");
    let report = &gpu_report.report;
    if rank == 0 {
        let mut results = HashMap::new();
        for r in &report.results {
            let name = r.collective.name();
            results.insert(format!("{name}.busbw_gbps"), format!("{:.3}", r.busbw_gbps));
            results.insert(format!("{name}.algbw_gbps"), format!("{:.3}", r.algbw_gbps));
            results.insert(format!("{name}.verified"), r.passed.to_string());
        }
        results.insert("comm_check.bytes".into(), spec.comm_check.bytes.to_string());
        results.insert("comm_check.ranks".into(), report.ranks.to_string());
        results.insert("comm_check.backend".into(), "nccl".into());
        results.insert("comm_check.dtype".into(), dtype_name.trim().to_ascii_lowercase());
        link.report(None, results)?;
    }
    if spec.comm_check.hold_s > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(spec.comm_check.hold_s));
    }
    comm.barrier_dev()?;
    anyhow::ensure!(report.passed(), "comm-check verification failed: {gpu_report}");
    Ok(())
}

#[cfg(test)]
mod gpu_choice_tests {
    use super::rank_gpu;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn cpu_jobs_and_cpu_slots_stay_on_the_cpu() {
        assert_eq!(rank_gpu(0, 0, env(&[]), || 8).unwrap(), None);
        assert_eq!(rank_gpu(2, 0, env(&[("CUDA_VISIBLE_DEVICES", "")]), || 8).unwrap(), None);
        assert_eq!(rank_gpu(2, 0, env(&[("COMM_BACKEND", "cpu")]), || 8).unwrap(), None);
        assert_eq!(rank_gpu(2, 1, env(&[]), || 0).unwrap(), None);
    }

    #[test]
    fn worker_slot_uses_ordinal_zero_and_launch_uses_local_rank() {
        assert_eq!(rank_gpu(8, 5, env(&[("CUDA_VISIBLE_DEVICES", "5")]), || 1).unwrap(), Some(0));
        assert_eq!(rank_gpu(2, 1, env(&[]), || 2).unwrap(), Some(1));
        assert_eq!(rank_gpu(2, 1, env(&[("CUDA_VISIBLE_DEVICES", "0,1")]), || 2).unwrap(), Some(1));
        assert!(rank_gpu(4, 3, env(&[]), || 2).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_environment_reads_back_as_the_same_identity() {
        for meeting in [Meeting::Coordinator("http://c:7070".into()), Meeting::TcpStore("10.0.0.1:29500".into())] {
            for resume_from in [None, Some(PathBuf::from("/ckpt/checkpoint-4"))] {
                let env = RankEnv {
                    meeting: meeting.clone(),
                    job_id: "j-000001".into(),
                    attempt: 2,
                    rank: 5,
                    local_rank: 1,
                    world_size: 8,
                    node_address: "10.0.0.2".into(),
                    spec_path: "/w/job.yaml".into(),
                    run_dir: "/w/rank-5".into(),
                    resume_from,
                };
                let vars: HashMap<&str, String> = env.to_vars().into_iter().collect();
                assert_eq!(RankEnv::from_lookup(|k| vars.get(k).cloned()).unwrap(), env);
            }
        }
    }
}
