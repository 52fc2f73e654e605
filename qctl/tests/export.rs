//! `qctl export --merge-lora` as a user runs it (the real binary), on the adapter PEFT wrote in
//! `tests/fixtures/lora/adapter` (base `tests/fixtures/dense_tied`, named relative to the repository root).

use std::path::PathBuf;
use std::process::Command;

use qparallel::hf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn qctl() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qctl"));
    c.current_dir(repo());
    c
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("qctl runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn export_merge_lora_writes_the_peft_merged_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    // --model omitted: the adapter_config.json names the base (relative to the current directory).
    let (ok, text) = run(qctl().args([
        "export",
        "--adapters",
        "tests/fixtures/lora/adapter",
        "--merge-lora",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(ok, "{text}");
    assert!(text.contains("merged 14 LoRA adapters"), "{text}");
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // The merged weights are PEFT's merge_and_unload (golden), the other weights the base's.
    let merged = hf::load_checkpoint(&out).unwrap();
    let base = hf::load_checkpoint(repo().join("tests/fixtures/dense_tied")).unwrap();
    let golden =
        hf::load_file_filtered(repo().join("tests/fixtures/lora/golden.safetensors"), |n| {
            n.starts_with("merged.")
        })
        .unwrap();
    assert_eq!(golden.len(), 14);
    for (name, t) in &merged {
        match golden.get(&format!("merged.{name}")) {
            Some(g) => {
                let worst = t
                    .data
                    .iter()
                    .zip(&g.data)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-6, "{name}: {worst}");
            }
            None => assert_eq!(t, &base[name], "{name}"),
        }
    }

    // Explicit base and dtype.
    let out16 = tmp.path().join("merged-bf16");
    let (ok, text) = run(qctl().args([
        "export",
        "--model",
        "tests/fixtures/dense_tied",
        "--adapters",
        "tests/fixtures/lora/adapter",
        "--merge-lora",
        "--dtype",
        "bf16",
        "--out",
        out16.to_str().unwrap(),
    ]));
    assert!(ok, "{text}");
    let metas = hf::checkpoint_tensors(&out16).unwrap();
    assert!(metas.values().all(|m| format!("{:?}", m.dtype) == "BF16"));

    // Refusals: no --merge-lora, an existing output, not an adapter dir.
    let (ok, text) = run(qctl().args([
        "export",
        "--adapters",
        "tests/fixtures/lora/adapter",
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]));
    assert!(
        !ok && text.contains("--merge-lora") && text.contains("PEFT adapter directory"),
        "{text}"
    );
    let (ok, text) = run(qctl().args([
        "export",
        "--adapters",
        "tests/fixtures/lora/adapter",
        "--merge-lora",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(!ok && text.contains("already exists"), "{text}");
    let (ok, text) = run(qctl().args([
        "export",
        "--adapters",
        "tests/fixtures/dense_tied",
        "--merge-lora",
        "--out",
        tmp.path().join("y").to_str().unwrap(),
    ]));
    assert!(
        !ok && text.contains("not a PEFT adapter directory"),
        "{text}"
    );
}
