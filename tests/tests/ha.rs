//! High availability end to end: two `qcoord` processes on one etcd, an in-process worker given both URLs,
//! a running 2-rank comm-check job; the leader is killed with SIGKILL (its lease is not released) → the
//! other coordinator takes over once the lease expires, loads the state from etcd, the worker registers
//! with it, the job keeps running and finishes `Succeeded` on its first attempt, and `qctl status` through
//! the new leader shows the whole event history.
//!
//! Needs etcd (`QCLUSTER_TEST_ETCD`, default 127.0.0.1:2379; `.ci/run` starts one) and the `qcoord` and
//! `qctl` binaries (`cargo build -p qcoord -p qctl`); says it skipped without them.

use qcluster_proto::leader::leader_hint;
use qcluster_proto::v1 as pb;
use qcluster_proto::v1::coordinator_client::CoordinatorClient;
use qcluster_tests::{TestCluster, comm_check_yaml};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Lease TTL of the coordinators (seconds): a killed leader blocks the takeover this long.
const TTL_S: u64 = 2;

/// target/<profile>, where cargo put qcoord and qctl.
fn bin_dir() -> PathBuf {
    std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf()
}

/// The etcd endpoint, or `None` (after saying why) when nothing answers there.
fn etcd_endpoint() -> Option<String> {
    let endpoint = std::env::var("QCLUSTER_TEST_ETCD").unwrap_or_else(|_| "127.0.0.1:2379".into());
    let hostport = endpoint.split("://").last().unwrap_or_default().trim_end_matches('/').to_string();
    let healthy = std::net::ToSocketAddrs::to_socket_addrs(&hostport)
        .ok()
        .and_then(|mut a| a.next())
        .and_then(|addr| qcluster_tests::http_get(addr, "/health").ok())
        .is_some_and(|body| body.contains("true"));
    if !healthy {
        println!("SKIPPED: no healthy etcd at {endpoint} (set QCLUSTER_TEST_ETCD, or start `etcd`; .ci/run does)");
        return None;
    }
    Some(endpoint)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `qcoord` process, killed (SIGKILL) when dropped.
struct Coordinator {
    url: String,
    child: Child,
    _state: tempfile::TempDir,
}

impl Coordinator {
    fn start(etcd: &str, prefix: &str) -> Coordinator {
        let state = tempfile::tempdir().unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(state.path().join("qcoord.log")).unwrap();
        let child = Command::new(bin_dir().join("qcoord"))
            .args(["--listen", &listen, "--etcd-endpoints", etcd, "--etcd-prefix", prefix])
            .args(["--etcd-lease-ttl", &TTL_S.to_string(), "--heartbeat-timeout", "8", "--stop-grace", "2"])
            .arg("--state-dir")
            .arg(state.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Coordinator { url: format!("http://{listen}"), child, _state: state }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._state.path().join("qcoord.log")).unwrap_or_default()
    }

    /// `Ok` when it serves as leader, `Err(Some(url))` when it redirects to `url`, `Err(None)` otherwise.
    async fn probe(&self) -> Result<(), Option<String>> {
        let mut client = CoordinatorClient::connect(self.url.clone()).await.map_err(|_| None)?;
        match client.list_nodes(pb::ListNodesRequest {}).await {
            Ok(_) => Ok(()),
            Err(s) => Err(leader_hint(&s)),
        }
    }

    async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.probe().await.is_ok() {
                return Ok(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("{} did not become leader within {timeout:?}; its log:\n{}", self.url, self.log())
    }

    async fn job(&self, id: &str) -> anyhow::Result<pb::JobStatus> {
        let mut client = CoordinatorClient::connect(self.url.clone()).await?;
        Ok(client.get_job(pb::GetJobRequest { job_id: id.into() }).await?.into_inner())
    }

    async fn wait_job(&self, id: &str, timeout: Duration, done: impl Fn(&pb::JobStatus) -> bool) -> anyhow::Result<pb::JobStatus> {
        let start = Instant::now();
        loop {
            let status = self.job(id).await;
            if let Ok(s) = &status
                && done(s)
            {
                return Ok(s.clone());
            }
            anyhow::ensure!(start.elapsed() < timeout, "job {id} on {}: {status:?}\nlog:\n{}", self.url, self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL: no lease revocation, no flush
        let _ = self.child.wait();
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn qctl(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin_dir().join("qctl")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_is_replaced_and_the_running_job_finishes_with_its_history() {
    let Some(etcd) = etcd_endpoint() else { return };
    for bin in ["qcoord", "qctl"] {
        if !bin_dir().join(bin).exists() {
            println!("SKIPPED: {bin} is not built in {} (run `cargo build -p qcoord -p qctl`)", bin_dir().display());
            return;
        }
    }
    let prefix = format!("/qcluster-test/ha-e2e-{}", std::process::id());

    let mut a = Coordinator::start(&etcd, &prefix);
    a.wait_leader(Duration::from_secs(20)).await.unwrap();
    let b = Coordinator::start(&etcd, &prefix);
    let start = Instant::now();
    loop {
        match b.probe().await {
            Err(Some(hint)) if hint == a.url => break,
            other => assert!(start.elapsed() < Duration::from_secs(20), "b should follow a: {other:?}\n{}", b.log()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let both = format!("{},{}", a.url, b.url);

    // A worker that knows both coordinators (the follower first: it must follow the hint).
    let work = tempfile::tempdir().unwrap();
    let mut config = qworker::WorkerConfig::new(format!("{},{}", b.url, a.url), "n1", work.path().join("n1"));
    config.gpus = qworker::GpuSetting::Count(0);
    config.cpu_slots = 2;
    config.rank_command = vec![TestCluster::rank_program()];
    let worker = qworker::start(config).unwrap();

    // Submitted through qctl pointed at the follower first.
    let job_file = work.path().join("held.yaml");
    std::fs::write(&job_file, comm_check_yaml("held", 2, 1, ", hold_s: 8")).unwrap();
    let (ok, out) = qctl(&["--coordinator", &format!("{},{}", b.url, a.url), "submit", job_file.to_str().unwrap()]);
    assert!(ok, "qctl submit: {out}");
    let id = out.trim().to_string();
    let running = a.wait_job(&id, Duration::from_secs(30), |j| j.state == "Running").await.unwrap();
    assert_eq!(running.attempt, 1);
    let before = running.events.len();

    // kill -9 the leader while the ranks hold.
    let killed = Instant::now();
    a.kill9();
    let took = b.wait_leader(Duration::from_secs(TTL_S + 15)).await.unwrap();
    let took = killed.elapsed().max(took);
    assert!(took < Duration::from_secs(TTL_S + 6), "failover took {took:?}");
    println!("failover: the follower led {took:?} after the leader was killed");

    // The worker finds the new leader and registers again; the job keeps its attempt and succeeds.
    let done = b.wait_job(&id, Duration::from_secs(60), |j| j.state != "Running").await.unwrap();
    assert_eq!(done.state, "Succeeded", "{done:#?}\nb's log:\n{}", b.log());
    assert_eq!(done.attempt, 1, "the running job was not restarted: {:#?}", done.events);
    assert_eq!(done.results.get("all_reduce.verified").map(String::as_str), Some("true"), "results reported to the old leader survive");
    let mut client = CoordinatorClient::connect(b.url.clone()).await.unwrap();
    let nodes = client.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
    assert!(nodes.iter().any(|n| n.name == "n1" && n.alive), "{nodes:?}");

    // `qctl status` through the list (the dead coordinator first) shows the full history.
    let (ok, status) = qctl(&["--coordinator", &both, "status", &id]);
    assert!(ok, "qctl status: {status}");
    assert!(status.contains("state      Succeeded"), "{status}");
    for event in ["submitted from", "attempt 1 scheduled on n1", "attempt 1: all 2 ranks running", "succeeded on attempt 1"] {
        assert!(status.contains(event), "missing event {event:?}:\n{status}");
    }
    let (ok, json) = qctl(&["--coordinator", &both, "-o", "json", "status", &id]);
    assert!(ok, "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let events = v["events"].as_array().unwrap();
    assert_eq!(events.len(), done.events.len());
    assert!(events.len() > before, "events after the failover were added to the history: {events:?}");

    worker.shutdown(Duration::from_secs(2)).await;
    drop(b);
    wipe(&etcd, &prefix).await;
}

/// Deletes the test's keys.
async fn wipe(endpoint: &str, prefix: &str) {
    let config = qcoord::store::EtcdConfig::new(endpoint, prefix).unwrap();
    if let Ok(mut client) = config.client().await {
        let _ = client.delete(format!("{prefix}/"), Some(etcd_client::DeleteOptions::new().with_prefix())).await;
    }
}
