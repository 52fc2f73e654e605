//! `serve --model MODEL [--concurrency 1,16,64] [--prompt-len 128] [--new-tokens 128] [--max-batch-tokens N]
//! [--kv-fraction F]`: the serving engine on one GPU, next to `../shared/bench/torch_generate.py`.
//!
//! Builds a random-init official Qwen3 shape straight into bf16 on `cuda:0` (uniform weights with std 0.02, norm
//! weights 1, as `train-step`), wraps it as a `qserve` `InferenceModel` and starts the engine exactly as the HTTP
//! server does (`EngineCore` on its own thread behind `Engine::submit`: continuous batching, chunked prefill
//! under `--max-batch-tokens`, paged KV cache), minus HTTP and the tokenizer. For each concurrency `C` it first
//! runs a warm-up round (C requests × 4 tokens: NVRTC modules, cuBLASLt heuristics for that batch's shapes,
//! allocator fill), then submits C requests of `--prompt-len` random token ids at once, each greedy with
//! `ignore_eos` and `max_tokens = --new-tokens` (so exactly that many outputs), and timestamps every token as
//! its event arrives (one receiving thread per request).
//!
//! Prints one JSON line per C with torch_generate.py's keys (`batch` = C):
//! - `ttft_ms`: mean over requests of submit → first output token;
//! - `tpot_ms`: mean over requests of (last token − first token) / (new_tokens − 1);
//! - `output_tokens_per_s`: `C / tpot` (torch_generate.py's definition: steady decode throughput);
//! - `hbm_floor_ms`: weight bytes / 4.8e12 B/s, the time one decode step needs just to read the weights once
//!   (H200 HBM3e peak), the lower bound of `tpot_ms` at C = 1;
//! - extra keys: `e2e_output_tokens_per_s` (all output tokens / wall time from first submit to last token),
//!   `wall_s`, `ttft_max_ms`, `kv_blocks`.

use std::sync::Arc;
use std::time::Instant;

use qserve::engine::{
    Engine, EngineConfig, EngineCore, Event, FinishReason, InferenceModel, SamplingParams,
};
use qserve::metrics::Metrics;

use super::{R, Rng, cuda_dev, gpu, official_config};

/// H200 HBM3e bandwidth used for the floor (torch_generate.py uses the same).
const HBM_BYTES_PER_S: f64 = 4.8e12;

struct Args {
    model: String,
    concurrency: Vec<usize>,
    prompt_len: usize,
    new_tokens: usize,
    max_batch_tokens: usize,
    kv_fraction: f64,
}

fn parse(args: &[String]) -> R<Args> {
    let mut a = Args {
        model: "qwen3-8b".into(),
        concurrency: vec![1, 16, 64],
        prompt_len: 128,
        new_tokens: 128,
        max_batch_tokens: 8192,
        kv_fraction: 0.85,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--model" => a.model = val()?,
            "--concurrency" => {
                a.concurrency = val()?
                    .split(',')
                    .map(|c| c.trim().parse::<usize>())
                    .collect::<Result<_, _>>()?
            }
            "--prompt-len" => a.prompt_len = val()?.parse()?,
            "--new-tokens" => a.new_tokens = val()?.parse()?,
            "--max-batch-tokens" => a.max_batch_tokens = val()?.parse()?,
            "--kv-fraction" => a.kv_fraction = val()?.parse()?,
            other => return Err(format!("serve: unknown flag {other}").into()),
        }
    }
    if a.concurrency.is_empty() || a.concurrency.contains(&0) {
        return Err("--concurrency: positive integers, comma separated".into());
    }
    if a.prompt_len == 0 || a.new_tokens < 2 {
        return Err("--prompt-len must be ≥ 1 and --new-tokens ≥ 2".into());
    }
    Ok(a)
}

/// Per-request token arrival times.
struct Trace {
    submitted: Instant,
    tokens: Vec<Instant>,
    finish: Option<FinishReason>,
    error: Option<String>,
}

/// Submits `c` random prompts at once and waits for all of them; returns one trace per request.
fn round(
    engine: &Engine,
    rng: &mut Rng,
    vocab: u32,
    c: usize,
    plen: usize,
    new: usize,
) -> R<Vec<Trace>> {
    let mut params = SamplingParams::greedy(new);
    params.ignore_eos = true;
    let prompts: Vec<Vec<u32>> = (0..c)
        .map(|_| (0..plen).map(|_| rng.below(vocab)).collect())
        .collect();
    let mut handles = Vec::with_capacity(c);
    for p in prompts {
        let submitted = Instant::now();
        let mut rx = engine.submit(p, params.clone())?;
        handles.push(std::thread::spawn(move || {
            let mut t = Trace {
                submitted,
                tokens: Vec::with_capacity(new),
                finish: None,
                error: None,
            };
            while let Some(ev) = rx.blocking_recv() {
                match ev {
                    Event::Delta { tokens, .. } => {
                        let now = Instant::now();
                        t.tokens.extend(std::iter::repeat_n(now, tokens.len()));
                    }
                    Event::Finished { reason, error, .. } => {
                        t.finish = Some(reason);
                        t.error = error;
                        break;
                    }
                }
            }
            t
        }));
    }
    let traces: Vec<Trace> = handles
        .into_iter()
        .map(|h| h.join().map_err(|_| "receiver thread panicked"))
        .collect::<Result<_, _>>()?;
    for t in &traces {
        if let Some(e) = &t.error {
            return Err(format!("request aborted: {e}").into());
        }
        if t.tokens.len() != new {
            return Err(format!(
                "a request produced {} tokens, expected {new} (finish {:?})",
                t.tokens.len(),
                t.finish
            )
            .into());
        }
    }
    Ok(traces)
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { f64::NAN } else { s / n as f64 }
}

pub fn serve(args: &[String]) -> R<bool> {
    let a = parse(args)?;
    let cfg = official_config(&a.model)?;
    let dev = cuda_dev()?;

    let t0 = Instant::now();
    let params = crate::random_gpu_params(&cfg, dev.as_ref())?;
    let model = InferenceModel::from_params(cfg.clone(), params, gpu())?;
    let weight_bytes = model.weight_stats().bytes;
    let dtype = model.dtype();
    let init_s = t0.elapsed().as_secs_f64();

    let max_c = *a.concurrency.iter().max().expect("checked non-empty");
    let config = EngineConfig {
        max_batch_tokens: a.max_batch_tokens,
        max_running: max_c,
        max_model_len: a.prompt_len + a.new_tokens,
        gpu_kv_fraction: a.kv_fraction,
        ..EngineConfig::default()
    };
    let metrics = Arc::new(Metrics::default());
    let core = EngineCore::new(model, config, Vec::new(), None, metrics.clone())?;
    let limits = core.limits();
    let engine = Engine::start(core, metrics.clone());
    let kv_total = metrics
        .kv_blocks_total
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{}: {:.2} GiB of {dtype} weights, built in {init_s:.1} s; KV pool {kv_total} blocks; max_model_len {}",
        a.model,
        weight_bytes as f64 / (1u64 << 30) as f64,
        limits.max_model_len
    );

    let mut rng = Rng(42);
    let vocab = cfg.vocab_size as u32;
    let floor_ms = weight_bytes as f64 / HBM_BYTES_PER_S * 1e3;
    for &c in &a.concurrency {
        let tw = Instant::now();
        round(&engine, &mut rng, vocab, c, a.prompt_len, 4)?;
        let warm_s = tw.elapsed().as_secs_f64();

        let start = Instant::now();
        let traces = round(&engine, &mut rng, vocab, c, a.prompt_len, a.new_tokens)?;
        let end = traces
            .iter()
            .filter_map(|t| t.tokens.last().copied())
            .max()
            .unwrap_or(start);
        let wall = end.duration_since(start).as_secs_f64();
        let ttfts: Vec<f64> = traces
            .iter()
            .map(|t| t.tokens[0].duration_since(t.submitted).as_secs_f64() * 1e3)
            .collect();
        let ttft = mean(ttfts.iter().copied());
        let ttft_max = ttfts.iter().copied().fold(0.0, f64::max);
        let tpot = mean(traces.iter().map(|t| {
            let n = t.tokens.len();
            t.tokens[n - 1].duration_since(t.tokens[0]).as_secs_f64() * 1e3 / (n - 1) as f64
        }));
        let total_tokens = (c * a.new_tokens) as f64;
        let line = serde_json::json!({
            "system": "qserve-engine",
            "model": a.model,
            "batch": c,
            "prompt_len": a.prompt_len,
            "new_tokens": a.new_tokens,
            "ttft_ms": (ttft * 100.0).round() / 100.0,
            "tpot_ms": (tpot * 1000.0).round() / 1000.0,
            "output_tokens_per_s": (c as f64 / (tpot / 1e3)).round(),
            "hbm_floor_ms": (floor_ms * 1000.0).round() / 1000.0,
            "e2e_output_tokens_per_s": (total_tokens / wall).round(),
            "ttft_max_ms": (ttft_max * 100.0).round() / 100.0,
            "wall_s": (wall * 1000.0).round() / 1000.0,
            "warmup_s": (warm_s * 100.0).round() / 100.0,
            "kv_blocks": kv_total,
        });
        println!("{line}");
    }
    engine.shutdown();
    Ok(true)
}
