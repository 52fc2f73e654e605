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
    // The README's quick start, from the repository root, with its output redirected to a temp dir.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let yaml = std::fs::read_to_string(root.join("configs/jobs/quickstart.yaml")).unwrap();
    assert!(yaml.contains("output_dir: output/quickstart"));
    let job = dir.path().join("quickstart.yaml");
    std::fs::write(&job, yaml.replace("output_dir: output/quickstart", &format!("output_dir: {}", out.display()))).unwrap();
    let (ok, stdout, stderr) = run(qctl().current_dir(root).args([
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
        job.to_str().unwrap(),
    ]));
    assert!(ok, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("state      Succeeded"), "{stdout}");
    assert!(stdout.contains("final_step = 40"), "{stdout}");
    assert!(stdout.contains("[a1 r0] step 40/40 loss"), "rank logs are streamed with prefixes: {stdout}");
    assert!(out.join("checkpoint-40/model.safetensors").exists());
    assert!(out.join("checkpoint-40/tokenizer.json").exists(), "tokenizer copied, so the checkpoint can be served");
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

/// One HTTP/1.1 request over a plain socket: (status code, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let code = resp.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

#[test]
fn serve_answers_openai_requests() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/models/qwen3-tiny-chat");
    let port = free_port();
    let mut child = qctl()
        .args(["serve", "--model", model, "--listen", &format!("127.0.0.1:{port}"), "--served-model-name", "tiny"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while http(port, "GET", "/health", "").map(|(c, _)| c) != Some(200) {
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "server did not come up");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (code, body) = http(port, "GET", "/v1/models", "").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("\"tiny\""), "{body}");
    let req = r#"{"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}"#;
    let (code, body) = http(port, "POST", "/v1/chat/completions", req).unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 4, true, "{body}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let (code, body) = http(port, "POST", "/v1/chat/completions", r#"{"model": "tiny", "messages": "nope"}"#).unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    child.kill().unwrap();
    child.wait().unwrap();
}
