//! `qctl logits` and `qctl train --local` as a user runs them (the real binary).

use std::path::{Path, PathBuf};
use std::process::Command;

use qparallel::hf;

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

#[test]
fn logits_reproduce_the_transformers_golden_values() {
    let fixture = repo().join("tests/fixtures/dense_untied");
    let golden_path = fixture.join("golden.safetensors");
    let (shape, ids) = hf::read_i64_tensor(&golden_path, "input_ids").unwrap();
    let rows: Vec<Vec<i64>> = ids.chunks(shape[1]).map(|c| c.to_vec()).collect();
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tmp.path().join("tokens.json");
    std::fs::write(&tokens, serde_json::to_string(&rows).unwrap()).unwrap();
    let out = tmp.path().join("logits.safetensors");
    let (ok, stdout, stderr) = run(qctl().args([
        "logits",
        "--model",
        fixture.to_str().unwrap(),
        "--tokens",
        tokens.to_str().unwrap(),
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");

    let golden =
        hf::load_file_filtered(&golden_path, |n| n == "logits" || n == "per_token_ce").unwrap();
    let ours = hf::load_file(&out).unwrap();
    let (l, g) = (&ours["logits"], &golden["logits"]);
    assert_eq!(l.shape, vec![2, 16, 256]);
    assert_eq!(l.shape, g.shape);
    let diff: f64 = l
        .data
        .iter()
        .zip(&g.data)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = g
        .data
        .iter()
        .map(|b| (*b as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        diff / norm < 5e-6,
        "logits relative error {:.2e}",
        diff / norm
    );

    // Mean next-token loss = mean of transformers' per-token CE over the 2 × 15 predicted positions.
    let want = golden["per_token_ce"]
        .data
        .iter()
        .map(|&x| x as f64)
        .sum::<f64>()
        / 30.0;
    let line = stdout
        .lines()
        .find(|l| l.starts_with("mean next-token loss:"))
        .expect(&stdout);
    let got: f64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    println!("{line} (transformers {want:.6})");
    assert!((got - want).abs() / want < 1e-5, "{got} vs {want}");
    assert!(line.contains("over 30 predictions"), "{line}");

    // Ragged rows and other devices are refused clearly.
    std::fs::write(&tokens, "[[1, 2, 3], [4, 5]]").unwrap();
    let (ok, _, stderr) = run(qctl().args([
        "logits",
        "--model",
        fixture.to_str().unwrap(),
        "--tokens",
        tokens.to_str().unwrap(),
    ]));
    assert!(!ok && stderr.contains("row 1 has 2 tokens"), "{stderr}");
    let (ok, _, stderr) = run(qctl().args([
        "logits",
        "--model",
        fixture.to_str().unwrap(),
        "--tokens",
        tokens.to_str().unwrap(),
        "--device",
        "tpu",
    ]));
    assert!(!ok && stderr.contains("--device tpu"), "{stderr}");
    std::fs::write(&tokens, "[[1, 2, 3], [4, 5, 6]]").unwrap();
    let base = ["logits", "--model", fixture.to_str().unwrap(), "--tokens", tokens.to_str().unwrap()];
    let (ok, _, stderr) = run(qctl().args(base).args(["--dtype", "bf16"]));
    assert!(!ok && stderr.contains("--dtype bf16 needs --device cuda"), "{stderr}");
    // `--device cuda` runs on a GPU, or says why there is none (this CI machine has no driver).
    let (ok, stdout, stderr) = run(qctl().args(base).args(["--device", "cuda:0"]));
    if ok {
        assert!(stdout.contains("mean next-token loss"), "{stdout}");
    } else {
        assert!(stderr.contains("cuda:0 is not available"), "{stderr}");
    }
}

fn write_job(dir: &Path, extra: &str) -> PathBuf {
    let corpus = dir.join("corpus.jsonl");
    if !corpus.exists() {
        let mut text = String::new();
        for i in 0..24u32 {
            let ids: Vec<String> = (0..20)
                .map(|j| (10 + (i + 2 * j) % 50).to_string())
                .collect();
            text.push_str(&format!("{{\"input_ids\": [{}]}}\n", ids.join(",")));
        }
        std::fs::write(&corpus, text).unwrap();
    }
    let job = dir.join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "name: tiny-pretrain\nkind: pretrain\nresources: {{ranks: 1}}\ninit: random\nmodel_config: {}\n\
dataset: {}\noutput_dir: {}\nmax_length: 16\nmicro_batch_size: 2\nglobal_batch_size: 4\nlr: 1.0e-3\n\
train_iters: 4\nsave_steps: 2\nlogging_steps: 1\n{extra}",
            repo().join("configs/models/qwen3-tiny.json").display(),
            corpus.display(),
            dir.join("out").display()
        ),
    )
    .unwrap();
    job
}

#[test]
fn train_local_runs_resumes_and_reports_errors_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let job = write_job(tmp.path(), "");
    let (ok, stdout, stderr) = run(qctl().args(["train", job.to_str().unwrap(), "--local"]));
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("trained steps 1..=4"), "{stdout}");
    assert!(stderr.contains("step 4/4 loss"), "{stderr}");
    let out = tmp.path().join("out");
    for d in ["checkpoint-2", "checkpoint-4"] {
        assert!(out.join(d).join("model.safetensors").is_file(), "{d}");
    }
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4);

    // Asking for more steps resumes from checkpoint-4.
    let job = write_job(tmp.path(), "").to_str().unwrap().to_string();
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("train_iters: 4", "train_iters: 6");
    std::fs::write(&job, text).unwrap();
    let (ok, stdout, stderr) = run(qctl().args(["train", &job, "--local"]));
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stderr.contains("resuming from") && stderr.contains("checkpoint-4"),
        "{stderr}"
    );
    assert!(stdout.contains("trained steps 5..=6"), "{stdout}");

    // A misspelt key: file, line and key.
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "name: a\nkind: pretrain\nresources: {ranks: 1}\nlearning_rat: 3\n",
    )
    .unwrap();
    let (ok, _, stderr) = run(qctl().args(["train", bad.to_str().unwrap(), "--local"]));
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains(&format!("{}:4:", bad.display())) && stderr.contains("learning_rat"),
        "{stderr}"
    );
    // A missing required key names it.
    std::fs::write(
        &bad,
        "name: a\nkind: pretrain\nresources: {ranks: 1}\ndataset: x.jsonl\ntrain_iters: 2\n",
    )
    .unwrap();
    let (ok, _, stderr) = run(qctl().args(["train", bad.to_str().unwrap(), "--local"]));
    assert!(!ok && stderr.contains("key `model`"), "{stderr}");
    // A bad dataset line: file and line.
    let corpus = tmp.path().join("broken.jsonl");
    std::fs::write(
        &corpus,
        "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 2,\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace(
            tmp.path().join("corpus.jsonl").to_str().unwrap(),
            corpus.to_str().unwrap(),
        )
        .replace(
            out.to_str().unwrap(),
            tmp.path().join("out2").to_str().unwrap(),
        );
    std::fs::write(&bad, text).unwrap();
    let (ok, _, stderr) = run(qctl().args(["train", bad.to_str().unwrap(), "--local"]));
    assert!(
        !ok && stderr.contains(&format!("{}:2:", corpus.display())),
        "{stderr}"
    );
}

#[test]
fn train_local_device_and_precision_choices_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    // bfloat16 on a CPU job names the key.
    let job = write_job(tmp.path(), "torch_dtype: bfloat16\n");
    let (ok, _, stderr) = run(qctl().args(["train", job.to_str().unwrap(), "--local"]));
    assert!(!ok && stderr.contains("torch_dtype") && stderr.contains("GPU"), "{stderr}");
    // An unknown precision is refused at parse time, with file and line.
    let job = write_job(tmp.path(), "torch_dtype: float16\n");
    let (ok, _, stderr) = run(qctl().args(["train", job.to_str().unwrap(), "--local"]));
    assert!(!ok && stderr.contains("torch_dtype") && stderr.contains("job.yaml:"), "{stderr}");
    // One GPU per process: cuda:N with several processes is refused before anything starts.
    let job = write_job(tmp.path(), "");
    let (ok, _, stderr) = run(qctl().args([
        "train", job.to_str().unwrap(), "--local", "--nproc", "2", "--device", "cuda:1",
    ]));
    assert!(!ok && stderr.contains("--device cuda"), "{stderr}");
    let (ok, _, stderr) = run(qctl().args(["train", job.to_str().unwrap(), "--local", "--device", "tpu"]));
    assert!(!ok && stderr.contains("--device tpu"), "{stderr}");
    // float32 is the CPU engine's precision: it trains.
    let job = write_job(tmp.path(), "torch_dtype: float32\n");
    let (ok, stdout, stderr) = run(qctl().args(["train", job.to_str().unwrap(), "--local", "--device", "cpu"]));
    assert!(ok && stdout.contains("trained steps 1..=4"), "stdout: {stdout}\nstderr: {stderr}");
}
