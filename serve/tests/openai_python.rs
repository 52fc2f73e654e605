//! Runs serve/python/test_openai_client.py (the official `openai` client) against a live server.
//! Prints SKIPPED and passes when `python3 -c 'import openai'` fails.

mod common;

use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_against_a_live_server() {
    let probe = Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        println!("SKIPPED: python3 with the `openai` package is not available");
        return;
    }
    let server = common::start(Some("test-key")).await;
    let addr = server.local_addr();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/test_openai_client.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .args(["--base-url", &format!("http://{addr}/v1")])
        .args(["--model", common::MODEL, "--api-key", "test-key"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    server.shutdown().await.unwrap();
}
