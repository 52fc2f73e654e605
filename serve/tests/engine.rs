//! Engine parity and scheduling tests on the golden fixture models (tests/fixtures/*) and serve/tests/data.
//!
//! - prompt logits of the paged-cache forward equal `Qwen3Model::logits` (the training model, itself checked
//!   against transformers) within 1e-4, dense and MoE;
//! - incremental decode and chunked prefill equal the full recompute;
//! - a batched forward of several sequences equals running them one by one;
//! - greedy generation under continuous batching (different prompt lengths, small token budget, preemption)
//!   equals one-at-a-time generation token for token, and every KV block is returned.

use std::path::PathBuf;
use std::sync::Arc;

use qkernels::Device;
use qparallel::model::{Batch, Qwen3Model};
use qserve::engine::{
    BlockTable, Chunk, EngineConfig, EngineCore, Event, FinishReason, InferenceModel,
    KvCacheConfig, LogitRows, Request, SamplingParams,
};
use qserve::metrics::Metrics;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

const FIXTURES: [&str; 4] = [
    "dense_tied",
    "dense_untied",
    "moe_norm_topk",
    "moe_no_norm_topk",
];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// Deterministic pseudo-random ids in `0..vocab`.
fn ids(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn reference_logits(model: &Qwen3Model, prompt: &[u32]) -> Vec<Vec<f32>> {
    let v = model.config.vocab_size;
    let batch = Batch::causal_lm(prompt.to_vec(), 1, prompt.len()).unwrap();
    let l = model.logits(&batch).unwrap().to_vec_f32().unwrap();
    l.chunks(v).map(<[f32]>::to_vec).collect()
}

fn small_cache() -> KvCacheConfig {
    KvCacheConfig {
        block_size: 4,
        num_blocks: 64,
    }
}

#[test]
fn prompt_logits_match_the_training_model() {
    for name in FIXTURES {
        let model = Qwen3Model::from_hf_dir(fixture(name), Device::Cpu).unwrap();
        let prompt = ids(13, 1, model.config.vocab_size);
        let want = reference_logits(&model, &prompt);
        let eng = InferenceModel::from_model(model).unwrap();
        let mut cache = eng.new_cache(small_cache()).unwrap();
        let mut table = BlockTable::default();
        cache.reserve(&mut table, prompt.len()).unwrap();
        let got = eng
            .forward(
                &mut cache,
                &[Chunk {
                    tokens: &prompt,
                    start: 0,
                    table: &table,
                    adapter: None,
                }],
                LogitRows::All,
            )
            .unwrap();
        assert_eq!(got.len(), prompt.len());
        for (t, (g, w)) in got.iter().zip(&want).enumerate() {
            let d = max_diff(g, w);
            assert!(d <= 1e-4, "{name}: position {t}: max |Δlogit| = {d}");
        }
    }
}

#[test]
fn incremental_decode_and_chunked_prefill_equal_full_recompute() {
    for name in FIXTURES {
        let model = Qwen3Model::from_hf_dir(fixture(name), Device::Cpu).unwrap();
        let prompt = ids(17, 2, model.config.vocab_size);
        let want = reference_logits(&model, &prompt);
        let eng = InferenceModel::from_model(model).unwrap();
        let mut cache = eng.new_cache(small_cache()).unwrap();
        let mut table = BlockTable::default();
        cache.reserve(&mut table, prompt.len()).unwrap();
        // Prefill in chunks of 3, 2, then one token at a time (decode).
        let mut pos = 0;
        let mut got: Vec<Vec<f32>> = Vec::new();
        for n in [3, 2].into_iter().chain(std::iter::repeat(1)) {
            if pos == prompt.len() {
                break;
            }
            let chunk = Chunk {
                tokens: &prompt[pos..pos + n],
                start: pos,
                table: &table,
                adapter: None,
            };
            got.extend(eng.forward(&mut cache, &[chunk], LogitRows::All).unwrap());
            pos += n;
        }
        for (t, (g, w)) in got.iter().zip(&want).enumerate() {
            let d = max_diff(g, w);
            assert!(d <= 1e-4, "{name}: position {t}: max |Δlogit| = {d}");
        }
    }
}

#[test]
fn one_batched_forward_equals_separate_forwards() {
    let model = Qwen3Model::from_hf_dir(fixture("moe_norm_topk"), Device::Cpu).unwrap();
    let v = model.config.vocab_size;
    let eng = InferenceModel::from_model(model).unwrap();
    let prompts: Vec<Vec<u32>> = [5usize, 1, 9, 3]
        .iter()
        .enumerate()
        .map(|(i, &n)| ids(n, 10 + i as u64, v))
        .collect();
    // Separately.
    let mut alone = Vec::new();
    for p in &prompts {
        let mut cache = eng.new_cache(small_cache()).unwrap();
        let mut t = BlockTable::default();
        cache.reserve(&mut t, p.len()).unwrap();
        let c = Chunk {
            tokens: p,
            start: 0,
            table: &t,
            adapter: None,
        };
        alone.extend(eng.forward(&mut cache, &[c], LogitRows::Last).unwrap());
    }
    // Together, in one cache.
    let mut cache = eng.new_cache(small_cache()).unwrap();
    let mut tables = vec![BlockTable::default(); prompts.len()];
    for (t, p) in tables.iter_mut().zip(&prompts) {
        cache.reserve(t, p.len()).unwrap();
    }
    let chunks: Vec<Chunk<'_>> = prompts
        .iter()
        .zip(&tables)
        .map(|(p, t)| Chunk {
            tokens: p,
            start: 0,
            table: t,
            adapter: None,
        })
        .collect();
    let together = eng.forward(&mut cache, &chunks, LogitRows::Last).unwrap();
    assert_eq!(together.len(), prompts.len());
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        let d = max_diff(a, b);
        assert!(d <= 1e-5, "sequence {i}: max |Δlogit| = {d}");
    }
}

struct Run {
    tokens: Vec<u32>,
    reason: FinishReason,
}

fn drain(rx: &mut UnboundedReceiver<Event>) -> Run {
    let mut tokens = Vec::new();
    loop {
        match rx
            .try_recv()
            .expect("sequence finished with a Finished event")
        {
            Event::Delta { tokens: t, .. } => tokens.extend(t),
            Event::Finished {
                reason,
                completion_tokens,
                ..
            } => {
                assert_eq!(completion_tokens, tokens.len());
                return Run { tokens, reason };
            }
        }
    }
}

fn core(dir: &str, config: EngineConfig, metrics: Arc<Metrics>) -> EngineCore {
    let model = InferenceModel::from_hf_dir(fixture(dir), Device::Cpu).unwrap();
    EngineCore::new(model, config, vec![], None, metrics).unwrap()
}

fn run_all(core: &mut EngineCore) {
    let mut steps = 0;
    while core.has_work() {
        core.step().unwrap();
        steps += 1;
        assert!(steps < 10_000, "engine does not make progress");
    }
}

fn greedy_batching_equals_sequential(dir: &str, config: EngineConfig) -> Arc<Metrics> {
    let lens = [7usize, 1, 19, 4, 12, 2, 9];
    let max_new = [6usize, 9, 4, 11, 5, 8, 7];
    let vocab = InferenceModel::from_hf_dir(fixture(dir), Device::Cpu)
        .unwrap()
        .config()
        .vocab_size;
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| ids(n, 100 + i as u64, vocab))
        .collect();

    // One at a time, default settings.
    let mut sequential = Vec::new();
    for (p, &m) in prompts.iter().zip(&max_new) {
        let mut c = core(dir, EngineConfig::default(), Arc::new(Metrics::default()));
        let (tx, mut rx) = unbounded_channel();
        c.add(Request {
            prompt: p.clone(),
            params: SamplingParams::greedy(m),
            events: tx,
            adapter: None,
        })
        .unwrap();
        run_all(&mut c);
        sequential.push(drain(&mut rx));
    }

    // All together under `config`, with requests arriving while others run.
    let metrics = Arc::new(Metrics::default());
    let mut c = core(dir, config, metrics.clone());
    let mut rxs = Vec::new();
    for (i, (p, &m)) in prompts.iter().zip(&max_new).enumerate() {
        let (tx, rx) = unbounded_channel();
        c.add(Request {
            prompt: p.clone(),
            params: SamplingParams::greedy(m),
            events: tx,
            adapter: None,
        })
        .unwrap();
        rxs.push(rx);
        if i % 2 == 1 {
            c.step().unwrap(); // continuous batching: later requests join a running batch
        }
    }
    run_all(&mut c);
    assert_eq!(c.blocks_in_use(), 0, "every KV block is returned");
    for (i, (rx, want)) in rxs.iter_mut().zip(&sequential).enumerate() {
        let got = drain(rx);
        assert_eq!(got.tokens, want.tokens, "{dir}: request {i}");
        assert_eq!(got.tokens.len(), max_new[i]);
        assert_eq!(got.reason, FinishReason::Length);
        assert_eq!(want.reason, FinishReason::Length);
    }
    metrics
}

#[test]
fn greedy_outputs_under_batching_equal_one_at_a_time() {
    let config = EngineConfig {
        kv: small_cache(),
        max_batch_tokens: 8, // forces chunked prefill mixed with decodes
        max_running: 16,
        ..Default::default()
    };
    for dir in ["dense_tied", "moe_no_norm_topk"] {
        let m = greedy_batching_equals_sequential(dir, config);
        use std::sync::atomic::Ordering;
        assert_eq!(m.sequences_finished_total.load(Ordering::Relaxed), 7);
        assert_eq!(m.kv_blocks_in_use.load(Ordering::Relaxed), 0);
    }
}

#[test]
fn greedy_outputs_survive_preemption() {
    // 9 blocks of 4 tokens: the longest request needs 6 blocks alone, so running several at once runs out
    // of blocks and forces recompute preemption.
    let config = EngineConfig {
        kv: KvCacheConfig {
            block_size: 4,
            num_blocks: 9,
        },
        max_batch_tokens: 64,
        max_running: 16,
        ..Default::default()
    };
    let m = greedy_batching_equals_sequential("dense_untied", config);
    use std::sync::atomic::Ordering;
    assert!(
        m.preemptions_total.load(Ordering::Relaxed) > 0,
        "the test should exercise preemption"
    );
}

#[test]
fn a_dropped_receiver_frees_its_blocks() {
    let metrics = Arc::new(Metrics::default());
    let mut c = core(
        "dense_tied",
        EngineConfig {
            kv: small_cache(),
            ..Default::default()
        },
        metrics.clone(),
    );
    let (tx, rx) = unbounded_channel();
    c.add(Request {
        prompt: ids(10, 5, 256),
        params: SamplingParams::greedy(100),
        events: tx,
        adapter: None,
    })
    .unwrap();
    c.step().unwrap();
    c.step().unwrap();
    assert!(c.blocks_in_use() >= 3);
    drop(rx);
    c.step().unwrap();
    assert_eq!(c.blocks_in_use(), 0);
    assert!(!c.has_work());
    use std::sync::atomic::Ordering;
    assert_eq!(metrics.sequences_aborted_total.load(Ordering::Relaxed), 1);
}

#[test]
fn requests_that_can_never_fit_are_rejected() {
    let mut c = core(
        "dense_tied",
        EngineConfig {
            kv: small_cache(), // 256 positions
            ..Default::default()
        },
        Arc::new(Metrics::default()),
    );
    assert_eq!(c.limits().max_model_len, 256);
    let (tx, _rx) = unbounded_channel();
    let err = c
        .add(Request {
            prompt: ids(250, 1, 256),
            params: SamplingParams::greedy(10),
            events: tx.clone(),
            adapter: None,
        })
        .unwrap_err();
    assert!(err.to_string().contains("maximum context length"), "{err}");
    let err = c
        .add(Request {
            prompt: vec![300],
            params: SamplingParams::greedy(1),
            events: tx,
            adapter: None,
        })
        .unwrap_err();
    assert!(err.to_string().contains("out of the vocabulary"), "{err}");
}
