//! Control-plane benchmarks (numbers go to bench/RESULTS.md; nothing here is a timed test).
//!
//! A real coordinator (redb state in a temp dir, gRPC on 127.0.0.1) and *fake* workers that speak the
//! real WorkerControl protocol but start no processes: on `StartRanks` they report every rank running
//! at once, on `StopAttempt` they report every rank exited. So the numbers are the coordinator's:
//! gRPC, durable state commits, gang placement and assignment fan-out.
//!
//! - `gang-latency`: 16 nodes × 8 GPUs; 100 jobs of 64 ranks (8 nodes × 8 GPUs), one at a time:
//!   time from `SubmitJob` sent to the coordinator having recorded all 64 ranks running. Median, p99.
//! - `submit-throughput`: 2,000 one-GPU jobs submitted by 64 concurrent clients; accepted
//!   submissions per second (each acceptance is durable before it is answered).

use clap::{Parser, Subcommand};
use qcluster_proto::v1 as pb;
use qcluster_proto::v1::coordinator_client::CoordinatorClient;
use qcluster_proto::v1::worker_control_client::WorkerControlClient;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(Subcommand)]
enum Which {
    GangLatency {
        #[arg(long, default_value_t = 100)]
        jobs: usize,
    },
    SubmitThroughput {
        #[arg(long, default_value_t = 2000)]
        jobs: usize,
        #[arg(long, default_value_t = 64)]
        clients: usize,
    },
}

/// Counts ranks reported running per job, across all fake workers.
#[derive(Default)]
struct RunningCounts {
    per_job: Mutex<HashMap<String, (u32, Instant)>>,
    changed: Notify,
}

async fn fake_worker(url: String, name: String, gpus: u32, counts: Arc<RunningCounts>) -> anyhow::Result<()> {
    let channel = Channel::from_shared(url)?.connect().await?;
    let mut client = WorkerControlClient::new(channel);
    let reg = client
        .register(pb::RegisterRequest {
            node_name: name.clone(),
            gpus,
            cpu_slots: 0,
            gpu_names: vec!["fake H200".into(); gpus as usize],
            address: "127.0.0.1".into(),
            running: vec![],
            finished: vec![],
        })
        .await?
        .into_inner();
    let session = reg.session_id.clone();
    {
        let mut hb = client.clone();
        let (node, session) = (name.clone(), session.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(reg.heartbeat_interval_ms)).await;
                let _ = hb.heartbeat(pb::HeartbeatRequest { node_name: node.clone(), session_id: session.clone() }).await;
            }
        });
    }
    let mut stream = client
        .assignments(pb::AssignmentsRequest { node_name: name.clone(), session_id: session.clone() })
        .await?
        .into_inner();
    let mut placed: HashMap<(String, u32), Vec<u32>> = HashMap::new();
    while let Some(a) = stream.message().await? {
        let report = |job: &str, attempt, rank, state: &str, code| pb::RankReport {
            node_name: name.clone(),
            session_id: session.clone(),
            rank: Some(pb::RankRef { job_id: job.into(), attempt, rank }),
            state: state.into(),
            pid: 1,
            exit_code: code,
            message: String::new(),
        };
        match a.what {
            Some(pb::assignment::What::Start(s)) => {
                let ranks: Vec<u32> = s.ranks.iter().map(|r| r.rank).collect();
                let reports = ranks.iter().map(|&r| {
                    let mut c = client.clone();
                    let rep = report(&s.job_id, s.attempt, r, "running", 0);
                    async move { c.report_rank(rep).await }
                });
                for r in futures::future::join_all(reports).await {
                    r?;
                }
                let mut per_job = counts.per_job.lock().unwrap();
                let entry = per_job.entry(s.job_id.clone()).or_insert((0, Instant::now()));
                entry.0 += ranks.len() as u32;
                entry.1 = Instant::now();
                drop(per_job);
                counts.changed.notify_waiters();
                placed.insert((s.job_id, s.attempt), ranks);
            }
            Some(pb::assignment::What::Stop(s)) => {
                if let Some(ranks) = placed.remove(&(s.job_id.clone(), s.attempt)) {
                    for r in ranks {
                        client.report_rank(report(&s.job_id, s.attempt, r, "exited", 143)).await?;
                    }
                }
            }
            None => {}
        }
    }
    Ok(())
}

struct Cluster {
    _state: tempfile::TempDir,
    coordinator: qcoord::CoordinatorHandle,
    counts: Arc<RunningCounts>,
}

async fn cluster(nodes: usize, gpus: u32) -> anyhow::Result<Cluster> {
    let state = tempfile::tempdir()?;
    let config = qcoord::CoordinatorConfig::new("127.0.0.1:0".parse()?, state.path().to_path_buf());
    let coordinator = qcoord::start(config).await?;
    let counts = Arc::new(RunningCounts::default());
    for i in 0..nodes {
        let (url, counts) = (coordinator.url(), counts.clone());
        tokio::spawn(async move {
            if let Err(e) = fake_worker(url, format!("fake{i:02}"), gpus, counts).await {
                eprintln!("fake worker {i}: {e}");
            }
        });
    }
    let mut client = CoordinatorClient::connect(coordinator.url()).await?;
    while client.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes.iter().filter(|n| n.alive).count() < nodes {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Cluster { _state: state, coordinator, counts })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn gang_latency(jobs: usize) -> anyhow::Result<()> {
    let c = cluster(16, 8).await?;
    let mut client = CoordinatorClient::connect(c.coordinator.url()).await?;
    let yaml = "name: gang\nkind: comm-check\nresources: {nodes: 8, gpus_per_node: 8}\nparallel: {tp: 8}\n";
    let mut latencies = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let t0 = Instant::now();
        let id = client
            .submit_job(pb::SubmitJobRequest { spec_yaml: yaml.into(), source_name: "bench".into() })
            .await?
            .into_inner()
            .job_id;
        loop {
            let notified = c.counts.changed.notified();
            if let Some((n, at)) = c.counts.per_job.lock().unwrap().get(&id)
                && *n == 64
            {
                latencies.push(at.duration_since(t0).as_secs_f64() * 1e3);
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
        let state = client.get_job(pb::GetJobRequest { job_id: id.clone() }).await?.into_inner().state;
        anyhow::ensure!(state == "Running", "job {id} is {state} after all ranks reported running");
        client.cancel_job(pb::CancelJobRequest { job_id: id }).await?;
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "gang-latency: {jobs} jobs of 64 ranks on 16 fake nodes x 8 GPUs: median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap()
    );
    Ok(())
}

async fn submit_throughput(jobs: usize, clients: usize) -> anyhow::Result<()> {
    let c = cluster(16, 8).await?;
    let url = c.coordinator.url();
    let yaml = "name: small\nkind: comm-check\nresources: {nodes: 1, gpus_per_node: 1}\n";
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (url, next) = (url.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = CoordinatorClient::connect(url).await?;
            let mut ids = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < jobs {
                let req = pb::SubmitJobRequest { spec_yaml: yaml.into(), source_name: "bench".into() };
                ids.push(client.submit_job(req).await?.into_inner().job_id);
            }
            anyhow::Ok(ids)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??.len();
    }
    let secs = t0.elapsed().as_secs_f64();
    anyhow::ensure!(total == jobs);
    println!(
        "submit-throughput: {jobs} jobs from {clients} clients accepted in {secs:.2} s = {:.0} submissions/s (durable redb state, 16 fake nodes scheduling them)",
        jobs as f64 / secs
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().which {
        Which::GangLatency { jobs } => gang_latency(jobs).await,
        Which::SubmitThroughput { jobs, clients } => submit_throughput(jobs, clients).await,
    }
}
