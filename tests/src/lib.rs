//! The in-process cluster harness: one coordinator and N workers in the test process, ports on
//! 127.0.0.1, state and work dirs in temp dirs, real rank processes. Fault injection: kill a worker
//! like a power loss ([`TestCluster::kill_worker`]), stop and restart the coordinator on the same state
//! dir and port ([`TestCluster::restart_coordinator`]).

use qcluster_proto::v1 as pb;
use qcluster_proto::v1::coordinator_client::CoordinatorClient;
use qcoord::{CoordinatorConfig, CoordinatorHandle};
use qworker::{GpuSetting, WorkerConfig, WorkerHandle};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Timings short enough for tests.
pub fn test_coordinator_config(listen: SocketAddr, state_dir: std::path::PathBuf) -> CoordinatorConfig {
    let mut c = CoordinatorConfig::new(listen, state_dir);
    c.heartbeat_interval = Duration::from_millis(200);
    c.heartbeat_timeout = Duration::from_millis(1500);
    c.stop_grace = Duration::from_secs(2);
    c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    c
}

/// `GET path` over plain HTTP/1.1: the response body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

pub struct TestCluster {
    pub coordinator: Option<CoordinatorHandle>,
    pub workers: BTreeMap<String, WorkerHandle>,
    addr: SocketAddr,
    state_dir: tempfile::TempDir,
    work_root: tempfile::TempDir,
}

impl TestCluster {
    /// A coordinator and `workers` CPU-only workers named n1, n2, … with `cpu_slots` slots each.
    pub async fn start(workers: usize, cpu_slots: u32) -> anyhow::Result<TestCluster> {
        let state_dir = tempfile::tempdir()?;
        let work_root = tempfile::tempdir()?;
        let coordinator =
            qcoord::start(test_coordinator_config("127.0.0.1:0".parse()?, state_dir.path().to_path_buf())).await?;
        let addr = coordinator.addr;
        let mut cluster = TestCluster { coordinator: Some(coordinator), workers: BTreeMap::new(), addr, state_dir, work_root };
        for i in 1..=workers {
            cluster.add_worker(&format!("n{i}"), cpu_slots)?;
        }
        cluster.wait_nodes_alive(workers).await?;
        Ok(cluster)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The program workers launch for each rank: this package's `qcluster-test-rank` binary, which
    /// cargo builds next to the test executables' `deps/` folder.
    pub fn rank_program() -> String {
        let exe = std::env::current_exe().expect("current exe");
        let target = exe.parent().and_then(|deps| deps.parent()).expect("test binary lives in target/<profile>/deps");
        target.join("qcluster-test-rank").display().to_string()
    }

    pub fn add_worker(&mut self, name: &str, cpu_slots: u32) -> anyhow::Result<()> {
        let mut config = WorkerConfig::new(self.url(), name, self.work_root.path().join(name));
        config.gpus = GpuSetting::Count(0);
        config.cpu_slots = cpu_slots;
        config.rank_command = vec![Self::rank_program()];
        config.metrics_listen = Some("127.0.0.1:0".parse()?);
        self.workers.insert(name.to_string(), qworker::start(config)?);
        Ok(())
    }

    /// Kills a worker like a power loss: its ranks die, nothing is reported.
    pub fn kill_worker(&mut self, name: &str) -> Vec<u32> {
        let w = self.workers.remove(name).expect("no such worker");
        let pids = w.rank_pids();
        w.kill();
        pids
    }

    /// Stops the coordinator (like a crash: only what was durable survives) and starts a new one on the
    /// same state dir and port.
    pub async fn restart_coordinator(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.coordinator.take() {
            c.stop().await;
        }
        let config = test_coordinator_config(self.addr, self.state_dir.path().to_path_buf());
        let mut last_err = None;
        for _ in 0..50 {
            match qcoord::start(config.clone()).await {
                Ok(c) => {
                    self.coordinator = Some(c);
                    return Ok(());
                }
                Err(e) => {
                    last_err = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Err(last_err.unwrap())
    }

    pub async fn client(&self) -> anyhow::Result<CoordinatorClient<Channel>> {
        Ok(CoordinatorClient::connect(self.url()).await?)
    }

    pub async fn submit(&self, yaml: &str) -> anyhow::Result<String> {
        let req = pb::SubmitJobRequest { spec_yaml: yaml.to_string(), source_name: "test.yaml".into() };
        Ok(self.client().await?.submit_job(req).await?.into_inner().job_id)
    }

    pub async fn job(&self, id: &str) -> anyhow::Result<pb::JobStatus> {
        Ok(self.client().await?.get_job(pb::GetJobRequest { job_id: id.into() }).await?.into_inner())
    }

    /// Polls until the job's state satisfies `done`, or fails after `timeout` with the last status.
    pub async fn wait_job(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&pb::JobStatus) -> bool,
    ) -> anyhow::Result<pb::JobStatus> {
        let start = Instant::now();
        loop {
            let status = self.job(id).await;
            if let Ok(s) = &status
                && done(s)
            {
                return Ok(s.clone());
            }
            if start.elapsed() > timeout {
                let logs = self.logs(id).await.unwrap_or_default();
                anyhow::bail!("job {id} did not reach the expected state in {timeout:?}: {status:?}\nrank logs:\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> anyhow::Result<pb::JobStatus> {
        self.wait_job(id, timeout, |s| s.state == state).await
    }

    pub async fn wait_nodes_alive(&self, n: usize) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Ok(mut c) = self.client().await
                && let Ok(r) = c.list_nodes(pb::ListNodesRequest {}).await
                && r.get_ref().nodes.iter().filter(|n| n.alive).count() >= n
            {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(20) {
                anyhow::bail!("{n} nodes did not come alive");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// All rank logs of a job, concatenated in (attempt, rank, stream) order.
    pub async fn logs(&self, id: &str) -> anyhow::Result<String> {
        let mut stream = self
            .client()
            .await?
            .stream_logs(pb::StreamLogsRequest { job_id: id.into(), follow: false, rank: None, attempt: None })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.message().await? {
            out.extend(chunk.data);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Pids of the ranks the coordinator recorded as running for a job (all attempts).
    pub fn recorded_pids(&self, id: &str) -> Vec<u32> {
        let job = self.coordinator.as_ref().unwrap().cluster.job(id).unwrap();
        job.attempts
            .iter()
            .flat_map(|a| a.ranks.iter())
            .filter_map(|r| match r.state {
                qcoord::domain::RankState::Running { pid } => Some(pid),
                _ => None,
            })
            .collect()
    }

    pub async fn shutdown(mut self) {
        for (_, w) in std::mem::take(&mut self.workers) {
            w.shutdown(Duration::from_secs(2)).await;
        }
        if let Some(c) = self.coordinator.take() {
            c.stop().await;
        }
    }
}

/// A comm-check job spec.
pub fn comm_check_yaml(name: &str, ranks: u32, nodes: u32, extra: &str) -> String {
    format!(
        "name: {name}\nkind: comm-check\nresources: {{nodes: {nodes}, gpus_per_node: 0, ranks: {ranks}}}\ncomm_check: {{bytes: 65536, iters: 3{extra}}}\n"
    )
}
