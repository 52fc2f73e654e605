//! Every model config under configs/models/ parses and has the published size; the tiny configs match the golden
//! fixtures' configs.

use std::path::{Path, PathBuf};

use qparallel::model::config::{ModelConfig, ModelType};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn load(name: &str) -> ModelConfig {
    let path = repo().join("configs/models").join(name);
    ModelConfig::from_file(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// Non-embedding parameters as the Qwen3 model cards count them (embedding and lm_head excluded).
fn non_embedding(c: &ModelConfig) -> u64 {
    let emb = (c.vocab_size * c.hidden_size) as u64;
    c.param_count() - emb - if c.tie_word_embeddings { 0 } else { emb }
}

fn assert_near(what: &str, got: u64, want: f64, rel: f64) {
    let err = (got as f64 - want).abs() / want;
    assert!(
        err <= rel,
        "{what}: {got} vs published {want:e} (rel. error {err:.4})"
    );
}

#[test]
fn every_config_file_parses() {
    let mut names: Vec<String> = std::fs::read_dir(repo().join("configs/models"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    for n in &names {
        let c = load(n);
        assert!(c.vocab_size > 0 && c.param_count() > 0, "{n}");
        assert_eq!(c.is_moe(), n.contains("moe") || n.contains("-a"), "{n}");
    }
    for want in [
        "qwen3-0.6b.json",
        "qwen3-1.7b.json",
        "qwen3-4b.json",
        "qwen3-8b.json",
        "qwen3-14b.json",
        "qwen3-32b.json",
        "qwen3-30b-a3b.json",
        "qwen3-235b-a22b.json",
        "qwen3-tiny.json",
        "qwen3-moe-tiny.json",
        "qwen3-50m.json",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "configs/models/{want} missing"
        );
    }
}

#[test]
fn dense_sizes_match_published() {
    // (file, total incl. embeddings, non-embedding) from the Qwen3 model cards.
    for (file, total, non_emb) in [
        ("qwen3-0.6b.json", 0.6e9, 0.44e9),
        ("qwen3-1.7b.json", 1.7e9, 1.4e9),
        ("qwen3-4b.json", 4.0e9, 3.6e9),
        ("qwen3-8b.json", 8.2e9, 6.95e9),
        ("qwen3-14b.json", 14.8e9, 13.2e9),
        ("qwen3-32b.json", 32.8e9, 31.2e9),
    ] {
        let c = load(file);
        assert_eq!(c.model_type, ModelType::Qwen3);
        assert_near(file, c.param_count(), total, 0.02);
        assert_near(file, non_embedding(&c), non_emb, 0.02);
        assert_eq!(c.active_param_count(), c.param_count());
    }
    // Exact: the sum of the tensor sizes of the Hub checkpoint.
    assert_eq!(load("qwen3-0.6b.json").param_count(), 596_049_920);
    assert_eq!(load("qwen3-8b.json").param_count(), 8_190_735_360);
}

#[test]
fn moe_sizes_match_published() {
    let c = load("qwen3-30b-a3b.json");
    assert_eq!(c.model_type, ModelType::Qwen3Moe);
    assert_eq!(c.num_moe_layers(), 48);
    assert_near("30B-A3B total", c.param_count(), 30.5e9, 0.01);
    assert_near("30B-A3B active", c.active_param_count(), 3.3e9, 0.02);
    assert_near("30B-A3B non-embedding", non_embedding(&c), 29.9e9, 0.01);
    let c = load("qwen3-235b-a22b.json");
    assert_near("235B-A22B total", c.param_count(), 235e9, 0.01);
    assert_near("235B-A22B active", c.active_param_count(), 22e9, 0.02);
    let m = c.moe.as_ref().unwrap();
    assert_eq!(
        (m.num_experts, m.num_experts_per_tok, m.norm_topk_prob),
        (128, 8, true)
    );
}

#[test]
fn flops_reproduce_design_mfu_table() {
    // DESIGN §7: Qwen3-0.6B eager 46.4k tokens/s = 23% MFU, 8B 6.8k tokens/s = 34% (seq 4096, 989 TFLOP/s).
    let mfu = |file: &str, tps: f64| load(file).flops_per_token(4096) * tps / 989e12;
    assert!(
        (mfu("qwen3-0.6b.json", 46.4e3) - 0.23).abs() < 0.01,
        "{}",
        mfu("qwen3-0.6b.json", 46.4e3)
    );
    assert!(
        (mfu("qwen3-8b.json", 6.8e3) - 0.34).abs() < 0.01,
        "{}",
        mfu("qwen3-8b.json", 6.8e3)
    );
}

#[test]
fn tiny_configs_match_fixtures() {
    let fixtures = repo().join("tests/fixtures");
    let same = |a: &ModelConfig, b: &ModelConfig| {
        assert_eq!(
            (
                a.model_type,
                a.vocab_size,
                a.hidden_size,
                a.intermediate_size,
                a.num_hidden_layers,
                a.num_attention_heads,
                a.num_key_value_heads,
                a.head_dim,
                a.tie_word_embeddings
            ),
            (
                b.model_type,
                b.vocab_size,
                b.hidden_size,
                b.intermediate_size,
                b.num_hidden_layers,
                b.num_attention_heads,
                b.num_key_value_heads,
                b.head_dim,
                b.tie_word_embeddings
            )
        );
        assert_eq!(
            (a.rms_norm_eps, a.rope_theta, &a.moe),
            (b.rms_norm_eps, b.rope_theta, &b.moe)
        );
    };
    // The fixtures' config.json files are transformers v5 output (rope_parameters, num_local_experts, dtype).
    let dense = ModelConfig::from_file(fixtures.join("dense_tied/config.json")).unwrap();
    same(&load("qwen3-tiny.json"), &dense);
    let moe = ModelConfig::from_file(fixtures.join("moe_norm_topk/config.json")).unwrap();
    same(&load("qwen3-moe-tiny.json"), &moe);
    assert_eq!(moe.torch_dtype.as_deref(), Some("float32"));
    let c = load("qwen3-50m.json");
    assert_near("50m", c.param_count(), 50e6, 0.05);
}
