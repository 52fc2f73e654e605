//! `deploy/slurm/qcluster.sbatch` through a real single-node Slurm (Debian's slurmctld, slurmd, munge;
//! `.ci/run` starts one with `deploy/slurm/local-cluster.sh`): a 4-rank comm-check and a tiny training
//! job run to completion through `sbatch --wait`, with coordinator and workers started by `srun`.
//! Without a reachable Slurm controller this test says it skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

fn slurm_up() -> bool {
    Command::new("sinfo").args(["-h", "-o", "%T"]).output().map(|o| o.status.success() && !o.stdout.is_empty()).unwrap_or(false)
}

/// target/<profile>, where cargo put qcoord, qworker and qctl.
fn bin_dir() -> PathBuf {
    std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf()
}

fn sbatch(job: &Path, work: &Path) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/slurm/qcluster.sbatch");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out_file = work.join("slurm.out");
    let status = Command::new("sbatch")
        .args(["--wait", "-N", "1", "--time", "10"])
        .arg(format!("--output={}", out_file.display()))
        .arg(script)
        .arg(job)
        .current_dir(work)
        .env("QCLUSTER_BIN_DIR", bin_dir())
        .env("QCLUSTER_PORT", port.to_string())
        .env("QCLUSTER_CPU_SLOTS", "4")
        .env("QCLUSTER_RUN_DIR", work.join("run"))
        .status()
        .unwrap();
    (status.success(), std::fs::read_to_string(out_file).unwrap_or_default())
}

#[test]
fn sbatch_runs_comm_check_and_tiny_training_to_completion() {
    if !slurm_up() {
        println!("SKIPPED: no Slurm controller answers `sinfo` (start one with deploy/slurm/local-cluster.sh)");
        return;
    }
    for bin in ["qcoord", "qworker", "qctl"] {
        assert!(bin_dir().join(bin).exists(), "{bin} is not built in {}: run `cargo build -p qcoord -p qworker -p qctl`", bin_dir().display());
    }
    let work = tempfile::tempdir().unwrap();

    let cc = work.path().join("cc.yaml");
    std::fs::write(&cc, "name: slurm-cc\nkind: comm-check\nresources: {ranks: 4}\ncomm_check: {bytes: 65536, iters: 3}\n").unwrap();
    let (ok, out) = sbatch(&cc, work.path());
    assert!(ok, "{out}");
    assert!(out.contains("state      Succeeded") && out.contains("all_reduce.verified = true"), "{out}");

    let data = work.path().join("tokens.jsonl");
    let lines: String = (0..32u32)
        .map(|i| format!("{{\"input_ids\": {:?}}}\n", (0..40).map(|j| (i * 5 + j * 3) % 200 + 10).collect::<Vec<u32>>()))
        .collect();
    std::fs::write(&data, lines).unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/models/qwen3-tiny.json");
    let train = work.path().join("train.yaml");
    std::fs::write(
        &train,
        format!(
            "name: slurm-train\nkind: pretrain\nresources: {{ranks: 1}}\ninit: random\nmodel_config: {}\ndataset: {}\n\
output_dir: {}\nmax_length: 32\nmicro_batch_size: 2\ntrain_iters: 6\nsave_steps: 3\nlogging_steps: 3\n",
            config.canonicalize().unwrap().display(),
            data.display(),
            work.path().join("out").display()
        ),
    )
    .unwrap();
    let (ok, out) = sbatch(&train, work.path());
    assert!(ok, "{out}");
    assert!(out.contains("state      Succeeded") && out.contains("final_step = 6"), "{out}");
    assert!(work.path().join("out/checkpoint-6/model.safetensors").exists());
}
