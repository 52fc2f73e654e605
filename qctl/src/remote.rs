//! Commands that talk to a coordinator over gRPC: submit, status, list, logs, cancel, nodes.
//! Every command prints a human table by default and JSON with `-o json`.

use anyhow::Context;
use qcluster_proto::v1 as pb;
use qcluster_proto::v1::coordinator_client::CoordinatorClient;
use serde_json::json;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use qcluster_proto::client::{AuthChannel, ClientSecurity};
use qcluster_proto::leader::{Endpoints, is_follower_answer};

/// A coordinator client (TLS and token as configured).
pub type Client = CoordinatorClient<AuthChannel>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// A client of the coordinator at `urls`, with TLS and the bearer token as `security` says.
///
/// `urls` may list several coordinators (`http://a:7070,http://b:7070`: HA on etcd). Each is asked a cheap
/// call (list nodes) until one answers as the leader; a follower's answer names the leader, which is tried
/// next ([`qcluster_proto::leader`]). While only followers answer (an election is under way) it keeps trying
/// for up to [`ELECTION_WAIT`].
pub async fn connect(urls: &str, security: &ClientSecurity) -> anyhow::Result<Client> {
    let mut endpoints = Endpoints::parse(urls).context("--coordinator")?;
    let deadline = std::time::Instant::now() + ELECTION_WAIT;
    let (mut tried, mut saw_follower) = (0usize, false);
    loop {
        let url = endpoints.current().to_string();
        let failure = match connect_one(&url, security).await {
            Ok(mut client) => match client.list_nodes(pb::ListNodesRequest {}).await {
                Ok(_) => return Ok(client),
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    saw_follower |= is_follower_answer(&s);
                    let e = anyhow::anyhow!("{url}: {}", s.message());
                    endpoints.failed(Some(&s));
                    e
                }
                // Any other refusal (a bad token…) is the command's to report.
                Err(_) => return Ok(client),
            },
            Err(e) => {
                endpoints.failed(None);
                e
            }
        };
        tried += 1;
        if tried % endpoints.urls().len() == 0 {
            if !saw_follower || std::time::Instant::now() >= deadline {
                return Err(failure.context(if saw_follower {
                    format!("no leader among the coordinators {urls} after {ELECTION_WAIT:?}")
                } else {
                    format!("cannot reach the coordinator at {urls} (is qcoord or `qctl up` running? set --coordinator or QCTL_COORDINATOR)")
                }));
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    }
}

/// How long [`connect`] waits for a leader while only followers answer.
pub const ELECTION_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

async fn connect_one(url: &str, security: &ClientSecurity) -> anyhow::Result<Client> {
    let channel = security.connect(url).await?;
    Ok(CoordinatorClient::new(channel))
}

/// [`connect`], retried until `timeout` passes.
pub async fn connect_retrying(url: &str, security: &ClientSecurity, timeout: std::time::Duration) -> anyhow::Result<Client> {
    let start = std::time::Instant::now();
    loop {
        match connect(url, security).await {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() >= timeout => return Err(e),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
}

/// A gRPC error as the user should read it.
pub fn status_error(what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", s.message())
}

pub async fn submit(client: &mut Client, path: &Path, out: Output) -> anyhow::Result<String> {
    let yaml = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    // Validate locally first so errors name the file and line; then send the spec with its relative
    // paths made absolute (the ranks do not run in this directory).
    let mut spec = qjobspec::JobSpec::parse(&yaml, &path.display().to_string())?;
    spec.check_runnable(&path.display().to_string())?;
    spec.resolve_relative_paths(&std::env::current_dir()?);
    let req = pb::SubmitJobRequest { spec_yaml: spec.to_yaml(), source_name: path.display().to_string() };
    let id = client.submit_job(req).await.map_err(|s| status_error("submit refused", s))?.into_inner().job_id;
    match out {
        Output::Text => println!("{id}"),
        Output::Json => println!("{}", json!({ "job_id": id })),
    }
    Ok(id)
}

pub fn job_json(j: &pb::JobStatus) -> serde_json::Value {
    let p = j.progress.clone().unwrap_or_default();
    json!({
        "job_id": j.job_id, "name": j.name, "kind": j.kind, "state": j.state, "priority": j.priority,
        "attempt": j.attempt, "max_restarts": j.max_restarts, "world_size": j.world_size,
        "submitted_unix": j.submitted_unix, "started_unix": j.started_unix, "finished_unix": j.finished_unix,
        "message": j.message, "resume_from": j.resume_from,
        "placement": j.placement.iter().map(|p| json!({"node": p.node, "ranks": p.ranks})).collect::<Vec<_>>(),
        "progress": {"step": p.step, "total_steps": p.total_steps, "loss": p.loss, "tokens_per_s": p.tokens_per_s, "eta_s": p.eta_s},
        "results": j.results,
        "events": j.events.iter().map(|e| json!({"unix": e.unix, "text": e.text})).collect::<Vec<_>>(),
    })
}

fn ranks_text(ranks: &[u32]) -> String {
    match (ranks.first(), ranks.last()) {
        (Some(a), Some(b)) if ranks.len() > 2 && (*b - *a) as usize == ranks.len() - 1 => format!("{a}-{b}"),
        _ => ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(","),
    }
}

fn clock(unix: f64) -> String {
    if unix <= 0.0 {
        return "-".into();
    }
    let secs = unix as u64 % 86_400;
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

pub fn print_status(j: &pb::JobStatus) {
    println!("job        {} ({}, {})", j.job_id, j.name, j.kind);
    println!("state      {}  — {}", j.state, j.message);
    println!("attempt    {} (max_restarts {}), world size {}, priority {}", j.attempt, j.max_restarts, j.world_size, j.priority);
    if !j.placement.is_empty() {
        let place: Vec<String> = j.placement.iter().map(|p| format!("{} → ranks {}", p.node, ranks_text(&p.ranks))).collect();
        println!("placement  {}", place.join("; "));
    }
    if !j.resume_from.is_empty() {
        println!("resumes    {}", j.resume_from);
    }
    if let Some(p) = &j.progress
        && p.total_steps > 0
    {
        println!(
            "progress   step {}/{}  loss {:.4}  {:.0} tokens/s  ETA {:.0}s",
            p.step, p.total_steps, p.loss, p.tokens_per_s, p.eta_s
        );
    }
    if !j.results.is_empty() {
        println!("results");
        let mut keys: Vec<_> = j.results.keys().collect();
        keys.sort();
        for k in keys {
            println!("  {k} = {}", j.results[k]);
        }
    }
    println!("events");
    for e in &j.events {
        println!("  {}  {}", clock(e.unix), e.text);
    }
}

pub async fn status(client: &mut Client, id: &str, out: Output) -> anyhow::Result<pb::JobStatus> {
    let j = client.get_job(pb::GetJobRequest { job_id: id.into() }).await.map_err(|s| status_error("status", s))?.into_inner();
    match out {
        Output::Text => print_status(&j),
        Output::Json => println!("{}", serde_json::to_string_pretty(&job_json(&j))?),
    }
    Ok(j)
}

pub async fn list(client: &mut Client, states: Vec<String>, out: Output) -> anyhow::Result<()> {
    let jobs = client.list_jobs(pb::ListJobsRequest { states }).await.map_err(|s| status_error("list", s))?.into_inner().jobs;
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(&jobs.iter().map(job_json).collect::<Vec<_>>())?),
        Output::Text => {
            println!("{:<32} {:<12} {:<13} {:>7} {:>5}  MESSAGE", "JOB", "KIND", "STATE", "ATTEMPT", "RANKS");
            for j in &jobs {
                println!("{:<32} {:<12} {:<13} {:>7} {:>5}  {}", j.job_id, j.kind, j.state, j.attempt, j.world_size, j.message);
            }
        }
    }
    Ok(())
}

pub async fn cancel(client: &mut Client, id: &str, out: Output) -> anyhow::Result<()> {
    let state = client.cancel_job(pb::CancelJobRequest { job_id: id.into() }).await.map_err(|s| status_error("cancel", s))?.into_inner().state;
    match out {
        Output::Text => println!("{id}: {state}"),
        Output::Json => println!("{}", json!({"job_id": id, "state": state})),
    }
    Ok(())
}

pub async fn nodes(client: &mut Client, out: Output) -> anyhow::Result<()> {
    let nodes = client.list_nodes(pb::ListNodesRequest {}).await.map_err(|s| status_error("nodes", s))?.into_inner().nodes;
    match out {
        Output::Json => {
            let v: Vec<_> = nodes
                .iter()
                .map(|n| {
                    json!({"name": n.name, "alive": n.alive, "address": n.address, "gpus": n.gpus, "gpus_used": n.gpus_used,
                           "gpu_names": n.gpu_names, "cpu_slots": n.cpu_slots, "cpu_slots_used": n.cpu_slots_used,
                           "last_heartbeat_unix": n.last_heartbeat_unix, "running": n.running})
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Text => {
            println!("{:<20} {:<6} {:>9} {:>9}  RUNNING", "NODE", "ALIVE", "GPUS", "CPU");
            for n in &nodes {
                println!(
                    "{:<20} {:<6} {:>9} {:>9}  {}",
                    n.name,
                    if n.alive { "yes" } else { "no" },
                    format!("{}/{}", n.gpus_used, n.gpus),
                    format!("{}/{}", n.cpu_slots_used, n.cpu_slots),
                    n.running.join("; ")
                );
            }
        }
    }
    Ok(())
}

/// Waits until at least `n` nodes are alive.
pub async fn wait_alive(client: &mut Client, n: usize, timeout: std::time::Duration) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    loop {
        let nodes = client.list_nodes(pb::ListNodesRequest {}).await.map_err(|s| status_error("nodes", s))?.into_inner().nodes;
        let alive = nodes.iter().filter(|n| n.alive).count();
        if alive >= n {
            return Ok(());
        }
        anyhow::ensure!(start.elapsed() < timeout, "only {alive} of {n} nodes alive after {timeout:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Streams a job's logs. Without `--rank`, lines are prefixed with `[rN]` (and the attempt when the
/// job had several); partial lines wait for their end so ranks never interleave within a line.
pub async fn logs(
    client: &mut Client,
    id: &str,
    follow: bool,
    rank: Option<u32>,
    out: Output,
) -> anyhow::Result<()> {
    let req = pb::StreamLogsRequest { job_id: id.into(), follow, rank, attempt: None };
    let mut stream = client.stream_logs(req).await.map_err(|s| status_error("logs", s))?.into_inner();
    let mut partial: HashMap<(u32, u32, String), Vec<u8>> = HashMap::new();
    let stdout = std::io::stdout();
    while let Some(chunk) = stream.message().await.map_err(|s| status_error("logs", s))? {
        if out == Output::Json {
            let line = json!({"attempt": chunk.attempt, "rank": chunk.rank, "stream": chunk.stream,
                              "data": String::from_utf8_lossy(&chunk.data)});
            println!("{line}");
            continue;
        }
        let buf = partial.entry((chunk.attempt, chunk.rank, chunk.stream.clone())).or_default();
        buf.extend_from_slice(&chunk.data);
        let mut lock = stdout.lock();
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            if rank.is_none() {
                write!(lock, "[a{} r{}] ", chunk.attempt, chunk.rank)?;
            }
            lock.write_all(&line)?;
        }
        lock.flush()?;
    }
    for ((attempt, r, _), rest) in partial {
        if !rest.is_empty() {
            if rank.is_none() {
                print!("[a{attempt} r{r}] ");
            }
            println!("{}", String::from_utf8_lossy(&rest));
        }
    }
    Ok(())
}
