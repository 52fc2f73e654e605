//! `qctl train --local --nproc N`: the job as N rank processes on this machine (the real binary, real processes,
//! the CPU TCP communicator) gives the losses of the one-process run.

use std::path::{Path, PathBuf};
use std::process::Command;

fn qctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qctl"))
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("qctl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A tiny pretraining job with relative `dataset` and `output_dir` (the ranks run elsewhere: qctl must resolve
/// them against its own directory), 4 sequences per step.
fn write_job(dir: &Path, name: &str, resources: &str) -> PathBuf {
    let corpus = dir.join("corpus.jsonl");
    if !corpus.exists() {
        let mut text = String::new();
        for i in 0..24u32 {
            let ids: Vec<String> = (0..40)
                .map(|j| (10 + (i * 3 + j * (1 + i % 3)) % 60).to_string())
                .collect();
            text.push_str(&format!("{{\"input_ids\": [{}]}}\n", ids.join(",")));
        }
        std::fs::write(&corpus, text).unwrap();
    }
    let job = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &job,
        format!(
            "name: {name}\nkind: pretrain\n{resources}init: random\nmodel_config: {}\ndataset: corpus.jsonl\n\
output_dir: out-{name}\nmax_length: 16\nglobal_batch_size: 4\nlr: 3.0e-3\ntrain_iters: 4\nsave_steps: 2\n\
logging_steps: 1\nseed: 5\n",
            repo().join("configs/models/qwen3-tiny.json").display(),
        ),
    )
    .unwrap();
    job
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn four_rank_processes_train_like_one() {
    let tmp = tempfile::tempdir().unwrap();
    let one = write_job(
        tmp.path(),
        "one",
        "resources: {ranks: 1}\nmicro_batch_size: 4\n",
    );
    let (ok, stdout, stderr) =
        run(qctl()
            .current_dir(tmp.path())
            .args(["train", one.to_str().unwrap(), "--local"]));
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");

    // pp 2 × dp 2: each dp rank takes 2 of the 4 sequences of a step.
    let four = write_job(
        tmp.path(),
        "four",
        "resources: {ranks: 4}\nparallel: {pp: 2}\nmicro_batch_size: 2\n",
    );
    let (ok, stdout, stderr) = run(qctl().current_dir(tmp.path()).args([
        "train",
        four.to_str().unwrap(),
        "--local",
        "--nproc",
        "4",
    ]));
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stderr.contains("step 4/4 loss"),
        "rank 0 logs its steps: {stderr}"
    );
    let results = stdout
        .lines()
        .filter(|l| l.starts_with("qcluster-results "))
        .collect::<Vec<_>>();
    assert_eq!(results.len(), 1, "rank 0 alone reports results: {stdout}");
    assert!(
        results[0].contains("\"final_step\":\"4\"") && results[0].contains("\"ranks\":\"4\""),
        "{}",
        results[0]
    );

    let (want, got) = (
        losses(&tmp.path().join("out-one")),
        losses(&tmp.path().join("out-four")),
    );
    assert_eq!(want.len(), 4);
    assert_eq!(got.len(), 4, "one metrics line per step, written once");
    for ((s1, l1), (s2, l2)) in got.iter().zip(&want) {
        assert_eq!(s1, s2);
        let rel = (l1 - l2).abs() / l2;
        assert!(
            rel < 1e-5,
            "step {s1}: 4 ranks {l1} vs 1 rank {l2} (rel {rel:.1e})"
        );
    }
    for d in ["checkpoint-2", "checkpoint-4"] {
        let ck = tmp.path().join("out-four").join(d);
        for f in [
            "model.safetensors",
            "config.json",
            "optimizer/index.json",
            "trainer_state.json",
        ] {
            assert!(ck.join(f).is_file(), "{d}/{f}");
        }
    }

    // The world size must match --nproc.
    let (ok, _, stderr) = run(qctl().current_dir(tmp.path()).args([
        "train",
        four.to_str().unwrap(),
        "--local",
        "--nproc",
        "2",
    ]));
    assert!(
        !ok && stderr.contains("key `resources`") && stderr.contains("--nproc"),
        "{stderr}"
    );
}
