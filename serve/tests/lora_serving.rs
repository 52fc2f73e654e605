//! LoRA adapters served beside the base model by name (`qctl serve --adapters NAME=DIR`): a sequence that asks
//! for an adapter computes exactly what the merged model (`qctl export --merge-lora`) computes, in the same batch
//! as base-model sequences; the HTTP server routes by the request's `model` and lists the adapters.

mod common;

use std::path::{Path, PathBuf};

use qkernels::Device;
use qparallel::lora::{self, LoraAdapters, LoraConfig};
use qparallel::model::ModelConfig;
use qserve::engine::{BlockTable, Chunk, InferenceModel, KvCacheConfig, LogitRows};
use qserve::{ServeConfig, serve};
use serde_json::{Value, json};

use common::{model_dir, send};

/// A PEFT adapter checkpoint for the model of `config_path` whose `B` factors are non-zero (fresh adapters
/// change nothing), saved against the tiny chat model as base.
fn adapter(dir: &Path, config_path: &Path, seed: u64, rank: usize) -> PathBuf {
    let config = ModelConfig::from_file(config_path).unwrap();
    let lc = LoraConfig::new(rank, 2.0 * rank as f64);
    let mut a = LoraAdapters::init(&config, &lc, seed).unwrap();
    for (i, pair) in a.pairs.values_mut().enumerate() {
        for (j, x) in pair.b.data.iter_mut().enumerate() {
            *x = ((((i * 31 + j * 17) as u64 + seed) % 13) as f32 - 6.0) * 0.04;
        }
    }
    let out = dir.join(format!("adapter-{seed}"));
    lora::save_adapters(&out, &lc, &a, &model_dir()).unwrap();
    out
}

fn merged(dir: &Path, adapter: &Path) -> PathBuf {
    let out = dir.join(format!("merged-{}", adapter.file_name().unwrap().to_string_lossy()));
    lora::merge_to_dir(&model_dir(), adapter, &out).unwrap();
    out
}

fn cache_config() -> KvCacheConfig {
    KvCacheConfig {
        block_size: 4,
        num_blocks: 64,
    }
}

/// `tokens` as one prefill chunk of a fresh sequence; all logits rows.
fn logits_alone(model: &InferenceModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(cache_config()).unwrap();
    let mut table = BlockTable::default();
    cache.reserve(&mut table, tokens.len()).unwrap();
    let chunk = Chunk { tokens, start: 0, table: &table, adapter: None };
    model.forward(&mut cache, &[chunk], LogitRows::All).unwrap()
}

fn max_rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let scale = b.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs() / scale)
        .fold(0.0, f32::max)
}

#[test]
fn an_adapter_sequence_equals_the_merged_model_in_a_mixed_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = model_dir().join("config.json");
    let (a1, a2) = (adapter(tmp.path(), &cfg, 1, 4), adapter(tmp.path(), &cfg, 2, 8));
    let served = InferenceModel::from_hf_dir(model_dir(), Device::Cpu)
        .unwrap()
        .with_adapters(&[("one".into(), a1.clone()), ("two".into(), a2.clone())], "tiny")
        .unwrap();
    let base = InferenceModel::from_hf_dir(model_dir(), Device::Cpu).unwrap();
    let m1 = InferenceModel::from_hf_dir(merged(tmp.path(), &a1), Device::Cpu).unwrap();
    let m2 = InferenceModel::from_hf_dir(merged(tmp.path(), &a2), Device::Cpu).unwrap();

    // Three sequences in one forward: adapter one, the base model, adapter two.
    let prompts: [Vec<u32>; 3] = [
        (0..9).map(|i| (i * 37 + 5) % 200).collect(),
        (0..6).map(|i| (i * 53 + 11) % 200).collect(),
        (0..7).map(|i| (i * 29 + 3) % 200).collect(),
    ];
    let mut cache = served.new_cache(cache_config()).unwrap();
    let mut tables = vec![BlockTable::default(); 3];
    for (t, p) in tables.iter_mut().zip(&prompts) {
        cache.reserve(t, p.len()).unwrap();
    }
    let chunks: Vec<Chunk<'_>> = prompts
        .iter()
        .zip(&tables)
        .zip([Some(0), None, Some(1)])
        .map(|((p, t), adapter)| Chunk { tokens: p, start: 0, table: t, adapter })
        .collect();
    let all = served.forward(&mut cache, &chunks, LogitRows::All).unwrap();
    let (got1, rest) = all.split_at(9);
    let (got0, got2) = rest.split_at(6);
    for (what, got, want) in [
        ("adapter one vs merged one", got1, logits_alone(&m1, &prompts[0])),
        ("base rows vs the base model", got0, logits_alone(&base, &prompts[1])),
        ("adapter two vs merged two", got2, logits_alone(&m2, &prompts[2])),
    ] {
        let d = max_rel_diff(got, &want);
        println!("{what}: max relative logit difference {d:.2e}");
        assert!(d < 1e-5, "{what}: {d}");
    }
    // The adapters matter: adapter one's logits are not the base model's.
    let d = max_rel_diff(got1, &logits_alone(&base, &prompts[0]));
    assert!(d > 1e-2, "adapter one changes nothing ({d})");
}

#[test]
fn adapters_for_another_model_or_for_moe_experts_are_refused_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let configs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/models");
    let base = || InferenceModel::from_hf_dir(model_dir(), Device::Cpu).unwrap();
    let wrong = adapter(tmp.path(), &configs.join("qwen3-50m.json"), 3, 4);
    let e = base().with_adapters(&[("big".into(), wrong)], "tiny").unwrap_err().to_string();
    assert!(e.contains("adapter `big`") && e.contains("in the base model"), "{e}");
    let moe = adapter(tmp.path(), &configs.join("qwen3-moe-tiny.json"), 4, 4);
    let e = base().with_adapters(&[("moe".into(), moe)], "tiny").unwrap_err().to_string();
    assert!(e.contains("adapter `moe`") && e.contains("--merge-lora"), "{e}");
    let good = adapter(tmp.path(), &model_dir().join("config.json"), 5, 4);
    let e = base().with_adapters(&[("tiny".into(), good.clone())], "tiny").unwrap_err().to_string();
    assert!(e.contains("base model's name"), "{e}");
    let e = base()
        .with_adapters(&[("x".into(), good.clone()), ("x".into(), good)], "tiny")
        .unwrap_err()
        .to_string();
    assert!(e.contains("given twice"), "{e}");
}

async fn completion(addr: std::net::SocketAddr, model: &str, prompt: &str) -> (u16, Value) {
    let req = json!({"model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": true});
    let (s, body) = send(addr, "POST", "/v1/completions", Some(&req.to_string()), &[]).await;
    (s, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn server(model: PathBuf, adapters: Vec<(String, PathBuf)>) -> qserve::ServerHandle {
    let mut cfg = ServeConfig::new(model);
    cfg.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.served_model_name = Some("tiny".into());
    cfg.adapters = adapters;
    serve(cfg).await.expect("server starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_server_routes_requests_to_adapters_by_model_name() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = model_dir().join("config.json");
    let a1 = adapter(tmp.path(), &cfg, 11, 4);
    let m1 = merged(tmp.path(), &a1);
    let s = server(model_dir(), vec![("sql".into(), a1)]).await;
    let addr = s.local_addr();

    let (status, body) = send(addr, "GET", "/v1/models", None, &[]).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["tiny", "sql"]);
    assert_eq!(v["data"][1]["parent"], "tiny");

    // Base and adapter requests at the same time.
    let prompts = ["the fox", "a quiet city", "tokens and models", "rain"];
    let handles: Vec<_> = prompts
        .iter()
        .flat_map(|p| ["tiny", "sql"].map(|m| (m, *p)))
        .map(|(m, p)| tokio::spawn(async move { (m, p, completion(addr, m, p).await) }))
        .collect();
    let mut answers = Vec::new();
    for h in handles {
        let (m, p, (status, v)) = h.await.unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["model"], m);
        answers.push((m, p, v["choices"][0]["text"].as_str().unwrap().to_string()));
    }
    let (status, v) = completion(addr, "nope", "x").await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("`tiny`") && msg.contains("`sql`"), "{msg}");
    s.shutdown().await.unwrap();

    // The references: the base model alone and the merged model alone.
    let base = server(model_dir(), vec![]).await;
    let merged = server(m1, vec![]).await;
    let mut differs = false;
    for (m, p, text) in &answers {
        let reference = if *m == "sql" { merged.local_addr() } else { base.local_addr() };
        let (_, want) = completion(reference, "tiny", p).await;
        let want = want["choices"][0]["text"].as_str().unwrap().to_string();
        assert_eq!(text, &want, "{m} on {p:?}");
        if *m == "sql" {
            let (_, plain) = completion(base.local_addr(), "tiny", p).await;
            differs |= plain["choices"][0]["text"] != json!(text);
        }
    }
    assert!(differs, "the adapter changed no answer");
    base.shutdown().await.unwrap();
    merged.shutdown().await.unwrap();
}
