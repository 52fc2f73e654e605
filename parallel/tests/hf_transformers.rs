//! transformers' `from_pretrained` loads what `hf::save_checkpoint` writes, with identical weights and logits
//! (f32 sharded, f32 single file, bf16). Runs tests/fixtures/check_hf_load.py; skipped (with a message) when
//! `python3 -c 'import torch, transformers'` fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use qparallel::hf::{DiskDtype, SaveOptions, load_checkpoint, save_checkpoint};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn have_transformers() -> bool {
    Command::new("python3")
        .args(["-c", "import torch, transformers"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn transformers_loads_our_checkpoints() {
    if !have_transformers() {
        eprintln!("SKIPPED: python3 with torch and transformers is not available");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut triples = Vec::new();
    for (name, dtype, shard) in [
        ("dense_tied", DiskDtype::F32, Some(60_000)),
        ("dense_untied", DiskDtype::BF16, None),
        ("moe_norm_topk", DiskDtype::F32, Some(150_000)),
        ("moe_no_norm_topk", DiskDtype::BF16, Some(100_000)),
        ("moe_no_norm_topk", DiskDtype::F32, None),
    ] {
        let src = fixtures().join(name);
        let tensors = load_checkpoint(&src).unwrap();
        let tag = if dtype == DiskDtype::F32 {
            "f32"
        } else {
            "bf16"
        };
        let out = tmp.path().join(format!("{name}-{tag}-{}", shard.is_some()));
        let mut opts = SaveOptions::new(dtype).source_dir(&src);
        if let Some(limit) = shard {
            opts = opts.max_shard_bytes(limit);
        }
        let report = save_checkpoint(&out, &tensors, &opts).unwrap();
        assert_eq!(report.weight_files.len() > 1, shard.is_some(), "{name}");
        triples.push(format!("{},{},{tag}", src.display(), out.display()));
    }
    let out = Command::new("python3")
        .arg(fixtures().join("check_hf_load.py"))
        .args(&triples)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "check_hf_load.py failed:\n{stdout}\n{stderr}"
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        triples.len(),
        "{stdout}"
    );
}
