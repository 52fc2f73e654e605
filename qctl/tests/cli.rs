//! `qctl` as a user runs it: the real binary against an in-process coordinator, and `qctl up --run`.

use std::process::Command;

fn qctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qctl"))
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("qctl runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn up_runs_the_quickstart_job_to_success() {
    let dir = tempfile::tempdir().unwrap();
    let job = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/jobs/quickstart.yaml");
    let (ok, stdout, stderr) = run(qctl().args([
        "up",
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
        "--work-dir",
        dir.path().join("work").to_str().unwrap(),
        "--cpu-slots",
        "4",
        "--gpus",
        "0",
        "--run",
        job,
    ]));
    assert!(ok, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("state      Succeeded"), "{stdout}");
    assert!(stdout.contains("all_reduce.verified = true"), "{stdout}");
    assert!(stdout.contains("[a1 r3] "), "rank logs are streamed with prefixes: {stdout}");
}

#[test]
fn cluster_commands_print_text_json_and_clear_errors() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let coordinator = rt
        .block_on(qcoord::start(qcoord::CoordinatorConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf())))
        .unwrap();
    let url = coordinator.url();
    let with = |args: &[&str]| {
        let mut c = qctl();
        c.arg("--coordinator").arg(&url).args(args);
        run(&mut c)
    };

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: x\nkind: comm-check\nresources: {ranks: 1}\nlearning_rat: 1\n").unwrap();
    let (ok, _, stderr) = with(&["submit", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("bad.yaml:4") && stderr.contains("learning_rat"), "{stderr}");

    let good = dir.path().join("good.yaml");
    std::fs::write(&good, "name: waits\nkind: comm-check\nresources: {ranks: 2}\n").unwrap();
    let (ok, stdout, stderr) = with(&["submit", good.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let id = stdout.trim().to_string();
    assert!(id.starts_with("waits-"), "{id}");

    let (ok, stdout, _) = with(&["-o", "json", "status", &id]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["state"], "Pending");
    assert_eq!(v["world_size"], 2);

    let (ok, stdout, _) = with(&["list"]);
    assert!(ok && stdout.contains(&id) && stdout.contains("Pending"), "{stdout}");

    let (ok, stdout, _) = with(&["cancel", &id]);
    assert!(ok && stdout.contains("Cancelled"), "{stdout}");

    let (ok, _, stderr) = with(&["status", "no-such-job"]);
    assert!(!ok && stderr.contains("no job with id \"no-such-job\""), "{stderr}");

    let (ok, stdout, _) = with(&["-o", "json", "nodes"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&stdout).unwrap(), serde_json::json!([]));

    let (ok, _, stderr) = run(qctl().args(["--coordinator", &format!("http://127.0.0.1:{}", free_port()), "list"]));
    assert!(!ok && stderr.contains("cannot reach the coordinator"), "{stderr}");
    rt.block_on(coordinator.stop());
}

#[test]
fn launch_without_a_coordinator_over_two_fake_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("cc.yaml");
    std::fs::write(&job, "name: cc\nkind: comm-check\nresources: {nodes: 2, ranks: 4}\ncomm_check: {bytes: 4096, iters: 2}\n").unwrap();
    let port = free_port().to_string();
    let node = |rank: &str| {
        qctl()
            .arg("launch")
            .arg(&job)
            .arg("--run-dir")
            .arg(dir.path().join(format!("node{rank}")))
            .env("NNODES", "2")
            .env("NODE_RANK", rank)
            .env("NPROC_PER_NODE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (n0, n1) = (node("0"), node("1"));
    let (o0, o1) = (n0.wait_with_output().unwrap(), n1.wait_with_output().unwrap());
    let text0 = String::from_utf8_lossy(&o0.stdout);
    assert!(o0.status.success() && o1.status.success(), "{text0}\n{}", String::from_utf8_lossy(&o0.stderr));
    let results = text0.lines().find_map(|l| l.strip_prefix("qcluster-results ")).expect("rank 0 prints its results");
    let v: serde_json::Value = serde_json::from_str(results).unwrap();
    assert_eq!(v["comm_check.ranks"], "4");
    assert_eq!(v["all_reduce.verified"], "true");
}
