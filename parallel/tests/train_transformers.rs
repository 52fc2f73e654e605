//! Training checkpoints are HF checkpoints: transformers' `from_pretrained` loads `checkpoint-N/` (from a
//! pretrained fixture and from random init) with no missing or unexpected keys and computes the same logits as
//! our model loaded from the same directory. Skipped (with a message) when `python3 -c 'import torch,
//! transformers'` fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use qkernels::Device;
use qparallel::hf;
use qparallel::model::{Batch, Qwen3Model};
use qparallel::train::{ModelSource, NoProgress, TrainConfig, run_training};

const SCRIPT: &str = r#"
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
ck, out, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
m, info = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32, attn_implementation="eager",
                                               output_loading_info=True)
bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
if bad:
    raise SystemExit(f"{ck}: loading problems {bad}")
with torch.no_grad():
    logits = m.eval()(input_ids=torch.tensor(ids), use_cache=False).logits
save_file({"logits": logits.contiguous()}, out)
print("ok", ck)
"#;

fn have_transformers() -> bool {
    Command::new("python3")
        .args(["-c", "import torch, transformers"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn corpus(dir: &Path) -> PathBuf {
    let mut text = String::new();
    for i in 0..16u32 {
        let ids: Vec<String> = (0..24)
            .map(|j| ((i * 7 + j * 3) % 200 + 5).to_string())
            .collect();
        text.push_str(&format!("{{\"input_ids\": [{}]}}\n", ids.join(",")));
    }
    let p = dir.join("c.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

fn check(ck: &Path, tmp: &Path) {
    let rows: Vec<Vec<u32>> = vec![
        (0..12).map(|j| (j * 11 + 3) % 256).collect(),
        (0..12).map(|j| (j * 5 + 100) % 256).collect(),
    ];
    let out = tmp.join("hf_logits.safetensors");
    let run = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(ck)
        .arg(&out)
        .arg(serde_json::to_string(&rows).unwrap())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let theirs = &hf::load_file(&out).unwrap()["logits"];
    let model = Qwen3Model::from_hf_dir(ck, Device::Cpu).unwrap();
    let batch = Batch::causal_lm(rows.concat(), 2, 12).unwrap();
    let ours = model.logits(&batch).unwrap().to_vec_f32().unwrap();
    assert_eq!(theirs.shape, vec![2, 12, 256]);
    let diff: f64 = ours
        .iter()
        .zip(&theirs.data)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = theirs
        .data
        .iter()
        .map(|b| (*b as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    println!(
        "{}: logits relative error {:.2e}",
        ck.display(),
        diff / norm
    );
    assert!(diff / norm < 5e-6, "{}: {:.2e}", ck.display(), diff / norm);
}

#[test]
fn transformers_loads_training_checkpoints() {
    if !have_transformers() {
        eprintln!("SKIPPED: python3 with torch and transformers is not available");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    for (name, model) in [
        (
            "pretrained",
            ModelSource::Pretrained(repo().join("tests/fixtures/dense_untied")),
        ),
        (
            "random",
            ModelSource::Random {
                config: repo().join("configs/models/qwen3-tiny.json"),
            },
        ),
    ] {
        let out = tmp.path().join(name);
        let mut cfg = TrainConfig::new(model, vec![data.clone()], out.clone(), 3);
        cfg.max_length = 16;
        cfg.micro_batch_size = 2;
        cfg.lr = 1e-2;
        run_training(&cfg, &mut NoProgress).unwrap();
        let ck = out.join("checkpoint-3");
        if name == "pretrained" {
            assert!(ck.join("generation_config.json").is_file());
        }
        check(&ck, tmp.path());
    }
}
