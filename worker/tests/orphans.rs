//! A worker process killed with SIGKILL takes its rank processes with it (PR_SET_PDEATHSIG), and a
//! worker started again on the same work dir comes back clean.

use qcluster_proto::v1 as pb;
use qworker::launch::process_alive;
use std::time::{Duration, Instant};

async fn wait_for<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spawn_worker(url: &str, work: &std::path::Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_qworker"))
        .args(["--coordinator", url, "--node-name", "w1", "--gpus", "0", "--cpu-slots", "2"])
        .arg("--work-dir")
        .arg(work)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_worker_process_kills_its_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator =
        qcoord::start(qcoord::CoordinatorConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().join("state"))).await.unwrap();
    let url = coordinator.url();
    let work = dir.path().join("work");
    let mut worker = spawn_worker(&url, &work);

    let mut client = pb::coordinator_client::CoordinatorClient::connect(url.clone()).await.unwrap();
    let yaml = "name: long\nkind: comm-check\nresources: {ranks: 2}\ncomm_check: {bytes: 1024, iters: 1, hold_s: 300}\n";
    let id = client
        .submit_job(pb::SubmitJobRequest { spec_yaml: yaml.into(), source_name: "long.yaml".into() })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let pids: Vec<u32> = wait_for("ranks running", async || {
        let job = coordinator.cluster.job(&id).ok()?;
        let pids: Vec<u32> = job.attempts.last()?.ranks.iter().filter_map(|r| match r.state {
            qcoord::domain::RankState::Running { pid } => Some(pid),
            _ => None,
        }).collect();
        (pids.len() == 2).then_some(pids)
    })
    .await;
    assert!(pids.iter().all(|p| process_alive(*p)));

    worker.kill().unwrap(); // SIGKILL: no cleanup code runs in the worker
    worker.wait().unwrap();
    wait_for("ranks to die with their worker", async || pids.iter().all(|p| !process_alive(*p)).then_some(())).await;

    // A new worker on the same work dir registers again (well before the 10 s heartbeat timeout) without
    // the ranks; the coordinator reconciles and fails the attempt whose ranks vanished.
    let mut again = spawn_worker(&url, &work);
    let job = wait_for("the attempt to fail", async || {
        let job = client.get_job(pb::GetJobRequest { job_id: id.clone() }).await.ok()?.into_inner();
        (job.state == "Failed").then_some(job)
    })
    .await;
    assert!(job.message.contains("vanished from w1 (worker restarted)"), "{}", job.message);
    again.kill().unwrap();
    again.wait().unwrap();
    coordinator.stop().await;
}
