//! End-to-end control-plane tests on the in-process cluster with real rank processes.

use qcluster_proto::v1 as pb;
use qcluster_tests::{TestCluster, comm_check_yaml};
use qworker::launch::process_alive;
use std::collections::BTreeSet;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comm_check_succeeds_with_verified_collectives_and_logs() {
    let c = TestCluster::start(2, 2).await.unwrap();
    let id = c.submit(&comm_check_yaml("cc", 4, 2, "")).await.unwrap();
    let s = c.wait_job(&id, T, |s| s.state == "Succeeded" || s.state == "Failed").await.unwrap();
    assert_eq!(s.state, "Succeeded", "{s:#?}\nlogs:\n{}", c.logs(&id).await.unwrap());
    assert_eq!(s.attempt, 1);
    let nodes: BTreeSet<_> = s.placement.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(nodes, BTreeSet::from(["n1", "n2"]));
    for coll in ["all_reduce", "all_gather", "reduce_scatter"] {
        assert_eq!(s.results[&format!("{coll}.verified")], "true", "{coll}");
        let busbw: f64 = s.results[&format!("{coll}.busbw_gbps")].parse().unwrap();
        assert!(busbw > 0.0 && busbw.is_finite(), "{coll} busbw {busbw}");
    }
    assert_eq!(s.results["comm_check.ranks"], "4");
    let metrics_addr = c.coordinator.as_ref().unwrap().metrics_addr.unwrap();
    let metrics = tokio::task::spawn_blocking(move || qcluster_tests::http_get(metrics_addr, "/metrics")).await.unwrap().unwrap();
    for line in [
        "qcluster_jobs{state=\"Succeeded\"} 1",
        "qcluster_queue_depth 0",
        "qcluster_nodes_alive 2",
        "qcluster_cpu_slots 4",
        "qcluster_cpu_slots_used 0",
        "qcluster_jobs_submitted_total 1",
        "qcluster_attempts_started_total 1",
        "qcluster_scheduling_latency_seconds_count 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line:?} in\n{metrics}");
    }
    // Each worker ran two of the ranks; its own /metrics says so.
    for (name, w) in &c.workers {
        let addr = w.metrics_addr.unwrap();
        let m = tokio::task::spawn_blocking(move || qcluster_tests::http_get(addr, "/metrics")).await.unwrap().unwrap();
        for line in [
            format!("qworker_info{{node=\"{name}\"}} 1"),
            "qworker_cpu_slots 2".into(),
            "qworker_cpu_slots_in_use 0".into(),
            "qworker_coordinator_connected 1".into(),
            "qworker_rank_starts_total 2".into(),
            "qworker_rank_exits_total{result=\"ok\"} 2".into(),
            "qworker_rank_exits_total{result=\"failed\"} 0".into(),
        ] {
            assert!(m.lines().any(|l| l == line), "{name}: missing {line:?} in\n{m}");
        }
    }
    let logs = c.logs(&id).await.unwrap();
    assert!(logs.contains("rank 3/4 of job"), "{logs}");
    assert!(logs.contains("all_reduce"), "{logs}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_that_does_not_fit_waits_and_starts_when_capacity_frees() {
    let c = TestCluster::start(1, 4).await.unwrap();
    let first = c.submit(&comm_check_yaml("first", 4, 1, ", hold_s: 1.5")).await.unwrap();
    c.wait_state(&first, "Running", T).await.unwrap();
    let second = c.submit(&comm_check_yaml("second", 3, 1, "")).await.unwrap();
    let waiting = c.job(&second).await.unwrap();
    assert_eq!(waiting.state, "Pending");
    assert!(waiting.message.contains("waiting for resources"), "{}", waiting.message);
    let f = c.wait_state(&first, "Succeeded", T).await.unwrap();
    let s = c.wait_state(&second, "Succeeded", T).await.unwrap();
    assert!(s.started_unix >= f.finished_unix, "second started before the first freed its slots");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_runs_first_then_submit_order() {
    let c = TestCluster::start(1, 2).await.unwrap();
    let blocker = c.submit(&comm_check_yaml("blocker", 2, 1, ", hold_s: 1.0")).await.unwrap();
    c.wait_state(&blocker, "Running", T).await.unwrap();
    let low1 = c.submit(&comm_check_yaml("low1", 2, 1, "")).await.unwrap();
    let low2 = c.submit(&comm_check_yaml("low2", 2, 1, "")).await.unwrap();
    let high = c.submit(&format!("priority: 5\n{}", comm_check_yaml("high", 2, 1, ""))).await.unwrap();
    let mut started = Vec::new();
    for id in [&low1, &low2, &high] {
        let s = c.wait_state(id, "Succeeded", T).await.unwrap();
        started.push((s.started_unix, s.name));
    }
    started.sort_by(|a, b| a.0.total_cmp(&b.0));
    let order: Vec<_> = started.into_iter().map(|(_, n)| n).collect();
    assert_eq!(order, vec!["high", "low1", "low2"]);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_fails_the_attempt_and_the_job_reruns_elsewhere() {
    let mut c = TestCluster::start(3, 1).await.unwrap();
    let yaml = format!("max_restarts: 2\n{}", comm_check_yaml("survivor", 2, 2, ", hold_s: 2.0"));
    let id = c.submit(&yaml).await.unwrap();
    let running = c.wait_state(&id, "Running", T).await.unwrap();
    // A rank reports a committed checkpoint; the next attempt must be told to resume from it.
    let mut rendezvous = pb::rendezvous_client::RendezvousClient::connect(c.url()).await.unwrap();
    rendezvous
        .report_progress(pb::ProgressReport {
            job_id: id.clone(),
            attempt: 1,
            rank: 0,
            progress: Some(pb::Progress { step: 10, total_steps: 100, loss: 2.5, ..Default::default() }),
            results: Default::default(),
            checkpoint_committed: "/shared/ckpt/survivor/checkpoint-10".into(),
            checkpoint_step: 10,
        })
        .await
        .unwrap();
    let victim = running.placement[0].node.clone();
    let pids = c.kill_worker(&victim);
    assert!(!pids.is_empty());
    let s = c.wait_job(&id, T, |s| s.state == "Succeeded" || s.state == "Failed").await.unwrap();
    assert_eq!(s.state, "Succeeded", "{s:#?}");
    assert_eq!(s.attempt, 2);
    assert!(s.placement.iter().all(|p| p.node != victim), "attempt 2 placed on the dead node");
    assert!(s.events.iter().any(|e| e.text.contains(&format!("node {victim} lost"))), "{:#?}", s.events);
    assert_eq!(s.resume_from, "/shared/ckpt/survivor/checkpoint-10");
    assert!(s.events.iter().any(|e| e.text.contains("resuming from /shared/ckpt/survivor/checkpoint-10")));
    let p = s.progress.unwrap();
    assert_eq!((p.step, p.total_steps), (10, 100), "progress reported by rank 0 of attempt 1 is kept");
    for pid in pids {
        assert!(!process_alive(pid), "rank {pid} of the killed worker survived");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_keeps_every_job_and_running_jobs_continue() {
    let mut c = TestCluster::start(2, 2).await.unwrap();
    let done = c.submit(&comm_check_yaml("done-before", 2, 1, "")).await.unwrap();
    c.wait_state(&done, "Succeeded", T).await.unwrap();
    let before = c.job(&done).await.unwrap();
    let running = c.submit(&comm_check_yaml("spans-restart", 2, 2, ", hold_s: 3.0")).await.unwrap();
    c.wait_state(&running, "Running", T).await.unwrap();
    let queued = c.submit(&comm_check_yaml("queued", 8, 2, "")).await.unwrap();

    c.restart_coordinator().await.unwrap();

    let after = c.job(&done).await.unwrap();
    assert_eq!(after.state, "Succeeded");
    assert_eq!(after.events, before.events, "history survives the restart");
    assert_eq!(after.results, before.results);
    assert_eq!(c.job(&queued).await.unwrap().state, "Pending");
    let s = c.wait_job(&running, T, |s| s.state == "Succeeded" || s.state == "Failed").await.unwrap();
    assert_eq!(s.state, "Succeeded", "{s:#?}");
    assert_eq!(s.attempt, 1, "the running job continued instead of restarting: {:#?}", s.events);
    let all = c.client().await.unwrap().list_jobs(pb::ListJobsRequest { states: vec![] }).await.unwrap().into_inner();
    assert_eq!(all.jobs.len(), 3);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_leaves_no_rank_process() {
    let c = TestCluster::start(1, 4).await.unwrap();
    let id = c.submit(&comm_check_yaml("to-cancel", 4, 1, ", hold_s: 120")).await.unwrap();
    c.wait_state(&id, "Running", T).await.unwrap();
    let pids = c.recorded_pids(&id);
    assert_eq!(pids.len(), 4);
    assert!(pids.iter().all(|p| process_alive(*p)));
    let r = c.client().await.unwrap().cancel_job(pb::CancelJobRequest { job_id: id.clone() }).await.unwrap();
    assert_eq!(r.into_inner().state, "Cancelled");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| process_alive(*p)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let alive: Vec<_> = pids.iter().filter(|p| process_alive(**p)).collect();
    assert!(alive.is_empty(), "rank processes still alive after cancel: {alive:?}");
    assert_eq!(c.job(&id).await.unwrap().state, "Cancelled");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors() {
    let c = TestCluster::start(1, 1).await.unwrap();
    let mut client = c.client().await.unwrap();
    let submit = |yaml: &str| pb::SubmitJobRequest { spec_yaml: yaml.into(), source_name: "job.yaml".into() };

    let e = client.submit_job(submit("name: x\nkind: [comm-check\n")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("job.yaml:"), "{}", e.message());

    let e = client.submit_job(submit("name: x\nkind: comm-check\nresources: {ranks: 1}\nlearning_rat: 1\n")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("learning_rat") && e.message().contains("job.yaml:4"), "{}", e.message());

    let e = client.submit_job(submit("name: x\nkind: comm-check\nresources: {nodes: 2, ranks: 3}\n")).await.unwrap_err();
    assert!(e.message().contains("resources.ranks"), "{}", e.message());

    // Valid but larger than the cluster: accepted, waits with a reason, blocks nobody.
    let huge = c.submit(&comm_check_yaml("huge", 64, 1, "")).await.unwrap();
    let small = c.submit(&comm_check_yaml("small", 1, 1, "")).await.unwrap();
    c.wait_state(&small, "Succeeded", T).await.unwrap();
    let h = c.job(&huge).await.unwrap();
    assert_eq!(h.state, "Pending");
    assert!(h.message.starts_with("unschedulable"), "{}", h.message);

    // Valid YAML this build cannot run is refused at submit, naming the key: a layout no model trains with.
    let e = client
        .submit_job(submit(
            "name: x\nkind: pretrain\nresources: {ranks: 4}\nparallel: {tp: 2, cp: 2}\nmodel: m\ndataset: d.jsonl\ntrain_iters: 3\n",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("key `parallel`"), "{}", e.message());

    let e = client.get_job(pb::GetJobRequest { job_id: "nope-1".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("nope-1"));
    let e = client.cancel_job(pb::CancelJobRequest { job_id: "nope-2".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_submissions_all_finish_once() {
    let c = TestCluster::start(2, 4).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let url = c.url();
        tasks.push(tokio::spawn(async move {
            let mut client = pb::coordinator_client::CoordinatorClient::connect(url).await.unwrap();
            let ranks = 1 + (i % 2);
            let yaml = comm_check_yaml(&format!("burst{i}"), ranks, 1, "").replace("iters: 3", "iters: 1");
            let req = pb::SubmitJobRequest { spec_yaml: yaml, source_name: format!("burst{i}.yaml") };
            client.submit_job(req).await.unwrap().into_inner().job_id
        }));
    }
    let mut ids = BTreeSet::new();
    for t in tasks {
        assert!(ids.insert(t.await.unwrap()), "duplicate job id");
    }
    assert_eq!(ids.len(), 200);
    for id in &ids {
        let s = c.wait_job(id, Duration::from_secs(240), |s| s.state == "Succeeded" || s.state == "Failed").await.unwrap();
        assert_eq!(s.state, "Succeeded", "{s:#?}");
        assert_eq!(s.attempt, 1);
    }
    let all = c.client().await.unwrap().list_jobs(pb::ListJobsRequest { states: vec![] }).await.unwrap().into_inner();
    let listed: BTreeSet<_> = all.jobs.iter().map(|j| j.job_id.clone()).collect();
    assert_eq!(listed, ids, "every job listed exactly once");
    c.shutdown().await;
}

/// A corpus of token-id lines for the tiny config (vocab 256): a few repeated patterns to learn.
fn write_token_corpus(path: &std::path::Path) {
    let mut lines = String::new();
    for i in 0..64u32 {
        let ids: Vec<u32> = (0..40).map(|j| (i * 7 + j * (1 + i % 3)) % 200 + 10).collect();
        lines.push_str(&format!("{{\"input_ids\": {ids:?}}}\n"));
    }
    std::fs::write(path, lines).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretrain_job_trains_reports_progress_and_checkpoints() {
    let c = TestCluster::start(1, 2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tokens.jsonl");
    write_token_corpus(&data);
    let out = dir.path().join("out");
    let model_config = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/models/qwen3-tiny.json");
    let yaml = format!(
        "name: tiny-pt\nkind: pretrain\nresources: {{ranks: 1}}\ninit: random\nmodel_config: {model_config}\n\
dataset: {}\noutput_dir: {}\nmax_length: 32\nmicro_batch_size: 2\nglobal_batch_size: 4\nlearning_rate: 3e-3\n\
train_iters: 12\nsave_steps: 6\nlogging_steps: 3\n",
        data.display(),
        out.display()
    );
    let id = c.submit(&yaml).await.unwrap();
    let s = c.wait_job(&id, T, |s| s.state == "Succeeded" || s.state == "Failed").await.unwrap();
    assert_eq!(s.state, "Succeeded", "{s:#?}\n{}", c.logs(&id).await.unwrap());
    let p = s.progress.unwrap();
    assert_eq!((p.step, p.total_steps), (12, 12));
    assert!(p.loss.is_finite() && p.loss > 0.0);
    assert_eq!(s.results["final_step"], "12");
    let last = out.join("checkpoint-12");
    assert_eq!(s.results["last_checkpoint"], last.display().to_string());
    assert!(last.join("model.safetensors").exists() && last.join("config.json").exists());
    assert!(s.events.iter().any(|e| e.text.contains("checkpoint step 6 committed")), "{:#?}", s.events);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4, "steps 3, 6, 9, 12: {metrics}");
    // The same curves as TensorBoard events (one file for this one-attempt run).
    let events: Vec<_> = std::fs::read_dir(out.join("runs")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let scalars = qparallel::train::tensorboard::read_scalars(&events[0]).unwrap();
    let loss_steps: Vec<u64> = scalars.iter().filter(|(_, tag, _)| tag == "train/loss").map(|(s, _, _)| *s).collect();
    assert_eq!(loss_steps, vec![3, 6, 9, 12]);
    let first_metric: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    let first_loss = scalars.iter().find(|(s, tag, _)| *s == 3 && tag == "train/loss").unwrap().2;
    assert!((first_loss as f64 - first_metric["loss"].as_f64().unwrap()).abs() < 1e-5);
    let logs = c.logs(&id).await.unwrap();
    assert!(logs.contains("step 12/12 loss"), "{logs}");
    c.shutdown().await;
}

/// A 4-rank CPU training job over two workers (tp 2 inside each node, dp 2 across them): rank 0 reports progress,
/// checkpoints and results, and the losses are the single-rank run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_rank_pretrain_job_across_two_workers_trains_like_one_rank() {
    let c = TestCluster::start(2, 2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tokens.jsonl");
    write_token_corpus(&data);
    let model_config = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/models/qwen3-tiny.json");
    let yaml = |name: &str, resources: &str, micro: u32| {
        format!(
            "name: {name}\nkind: pretrain\n{resources}init: random\nmodel_config: {model_config}\n\
dataset: {}\noutput_dir: {}\nmax_length: 32\nmicro_batch_size: {micro}\nglobal_batch_size: 4\nlearning_rate: 3e-3\n\
train_iters: 6\nsave_steps: 3\nlogging_steps: 1\n",
            data.display(),
            dir.path().join(name).display()
        )
    };
    // The single-rank reference, in this process.
    let one = qjobspec::JobSpec::parse(&yaml("one", "resources: {ranks: 1}\n", 4), "one.yaml").unwrap();
    let cfg = qworker::training::train_config(&one).unwrap();
    let want = tokio::task::spawn_blocking(move || qparallel::train::run_training(&cfg, &mut qparallel::train::NoProgress))
        .await
        .unwrap()
        .unwrap();

    let id = c.submit(&yaml("four", "resources: {nodes: 2, ranks: 4}\nparallel: {tp: 2}\n", 2)).await.unwrap();
    let s = c.wait_job(&id, T, |s| s.state == "Succeeded" || s.state == "Failed").await.unwrap();
    assert_eq!(s.state, "Succeeded", "{s:#?}\n{}", c.logs(&id).await.unwrap());
    let nodes: BTreeSet<_> = s.placement.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(nodes, BTreeSet::from(["n1", "n2"]));
    let p = s.progress.unwrap();
    assert_eq!((p.step, p.total_steps), (6, 6));
    assert_eq!(s.results["final_step"], "6");
    assert_eq!(s.results["ranks"], "4");
    let out = dir.path().join("four");
    assert_eq!(s.results["last_checkpoint"], out.join("checkpoint-6").display().to_string());
    assert!(s.events.iter().any(|e| e.text.contains("checkpoint step 3 committed")), "{:#?}", s.events);
    for f in ["model.safetensors", "config.json", "optimizer/index.json", "trainer_state.json"] {
        assert!(out.join("checkpoint-6").join(f).is_file(), "{f}");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let got: Vec<(u64, f64)> = metrics
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect();
    assert_eq!(got.len(), 6, "{metrics}");
    for ((s1, l1), (s2, l2)) in got.iter().zip(&want.losses) {
        assert_eq!(s1, s2);
        assert!((l1 - l2).abs() / l2 < 1e-5, "step {s1}: 4 ranks {l1} vs one rank {l2}");
    }
    let final_loss: f64 = s.results["final_loss"].parse().unwrap();
    assert!((final_loss - want.losses[5].1).abs() < 1e-5);
    c.shutdown().await;

    // The same job without a coordinator, as Alibaba DLC starts it: 4 `qctl launch` processes on loopback, one
    // per "node", told only WORLD_SIZE (nodes), RANK (node index), MASTER_ADDR and MASTER_PORT; the TCP store
    // on node 0 is the rendezvous. Same losses as the coordinator path.
    let dlc_spec = dir.path().join("dlc.yaml");
    std::fs::write(&dlc_spec, yaml("dlc", "resources: {nodes: 2, ranks: 4}\nparallel: {tp: 2}\n", 2)).unwrap();
    let qctl = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("qctl");
    assert!(qctl.exists(), "{} is not built: run `cargo build -p qctl`", qctl.display());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let launches: Vec<_> = (0..4)
        .map(|node| {
            std::process::Command::new(&qctl)
                .args(["launch"])
                .arg(&dlc_spec)
                .args(["--run-dir"])
                .arg(dir.path().join(format!("dlc-run-{node}")))
                .env("WORLD_SIZE", "4")
                .env("RANK", node.to_string())
                .env("NPROC_PER_NODE", "1")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (node, child) in launches.into_iter().enumerate() {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
        assert!(out.status.success(), "node {node}: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    let dlc = std::fs::read_to_string(dir.path().join("dlc").join("metrics.jsonl")).unwrap();
    let dlc_losses: Vec<f64> = dlc.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap()).collect();
    assert_eq!(dlc_losses.len(), 6, "{dlc}");
    for ((step, l_cluster), l_dlc) in got.iter().zip(&dlc_losses) {
        assert!((l_cluster - l_dlc).abs() / l_cluster < 1e-6, "step {step}: coordinator path {l_cluster} vs DLC launch {l_dlc}");
    }
}
