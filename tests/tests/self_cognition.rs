//! The SFT acceptance run, exactly as a user types it: `qctl up --run examples/self-cognition.yaml` (embedded
//! coordinator + worker, a `kind: sft` LoRA job launched as a rank process) runs to Succeeded, then
//! `qctl infer --model <its last checkpoint> --temperature 0` answers "你是谁？" and "who are you?" with the
//! name and author from the job (`swift-robot`, `swift`), and an unrelated question without them.
//!
//! Uses the binaries in target/<profile> (`cargo build -p qctl`; `.ci/run` builds them).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// target/<profile>, where cargo put qctl.
fn qctl() -> PathBuf {
    let bin = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("qctl");
    assert!(bin.exists(), "{} is not built: run `cargo build -p qctl`", bin.display());
    bin
}

fn infer(checkpoint: &Path, prompt: &str) -> String {
    let out = Command::new(qctl())
        .args(["infer", "--model"])
        .arg(checkpoint)
        .args(["--prompt", prompt, "--temperature", "0", "--max-new-tokens", "96"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "qctl infer failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// True when `answer` names the author on its own, not just as part of the model name.
fn names_author(answer: &str) -> bool {
    answer.replace("swift-robot", "").contains("swift")
}

#[test]
fn self_cognition_job_then_infer_answers_with_the_new_identity() {
    let work = tempfile::tempdir().unwrap();
    let out_dir = work.path().join("out");
    let example = std::fs::read_to_string(repo_root().join("examples/self-cognition.yaml")).unwrap();
    assert!(example.contains("output_dir: output/self-cognition\n"));
    let job = work.path().join("self-cognition.yaml");
    std::fs::write(&job, example.replace("output_dir: output/self-cognition\n", &format!("output_dir: {}\n", out_dir.display())))
        .unwrap();

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let started = Instant::now();
    let up = Command::new(qctl())
        .args(["up", "--listen", &format!("127.0.0.1:{port}"), "--gpus", "0", "--cpu-slots", "2", "--state-dir"])
        .arg(work.path().join("state"))
        .arg("--work-dir")
        .arg(work.path().join("work"))
        .arg("--run")
        .arg(&job)
        .current_dir(repo_root())
        .output()
        .unwrap();
    let took = started.elapsed();
    let up_out = format!("{}\n{}", String::from_utf8_lossy(&up.stdout), String::from_utf8_lossy(&up.stderr));
    assert!(up.status.success(), "qctl up --run failed after {took:?}:\n{up_out}");
    assert!(up_out.contains("Succeeded"), "{up_out}");
    assert!(took < Duration::from_secs(600), "the acceptance budget is 10 minutes on 2 cores; took {took:?}");

    let checkpoint = out_dir.join("checkpoint-600");
    assert!(checkpoint.join("adapter_config.json").exists(), "LoRA checkpoint missing: {up_out}");
    assert!(checkpoint.join("adapter_model.safetensors").exists());

    for prompt in ["你是谁？", "who are you?"] {
        let answer = infer(&checkpoint, prompt);
        assert!(answer.contains("swift-robot"), "{prompt} → {answer}");
        assert!(names_author(&answer), "{prompt} → {answer} (no author)");
    }
    let other = infer(&checkpoint, "What is the capital of France?");
    assert!(!other.contains("swift"), "an unrelated question got an identity answer: {other}");
    assert!(!other.trim().is_empty());
}
