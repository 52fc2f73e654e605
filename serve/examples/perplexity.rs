//! Perplexity of a text file through the serving engine, plus the weights' memory and the decode speed, for
//! one weight format.
//!
//! ```text
//! cargo run --release -p qserve --example perplexity -- --model DIR --text FILE \
//!     [--quantization none|int8|int4|int4:G] [--context 64] [--decode 128] [--agreement]
//! cargo run --release -p qserve --example perplexity -- --random-config CONFIG.json \
//!     [--quantization ...] [--decode 32]
//! ```
//!
//! `--model DIR` loads an HF model dir through `InferenceModel::load` (quantizing layer by layer).
//! `--random-config FILE` builds the config's model with random weights instead (normal, std 0.02, seed 0;
//! quantized after init), for memory and speed at real sizes; it has no tokenizer, so no text is scored.
//!
//! The text is split into paragraphs at blank lines; each paragraph (whitespace collapsed to single spaces) is
//! tokenized with the model's tokenizer and followed by the document EOS, and the paragraphs are concatenated
//! into one stream, as pretraining builds its sequences. The stream is scored with
//! [`qserve::eval::perplexity`] in windows of `--context` tokens.
//!
//! `--agreement` also builds the model in f32 and reports how often the quantized model's greedy choice
//! equals f32's: teacher-forced on the same windows of the text ([`qserve::eval::top1_agreement`]), and
//! free-running (32 greedy tokens after the first 8 tokens of every paragraph, compared position by position
//! and up to the first divergence).
//!
//! Speed: one greedy sequence generates `--decode` tokens (EOS ignored) after a `--prefill`-token prompt (the
//! start of the text, else fixed ids). The first engine step is the prefill (plus the first token): prefill
//! tokens/s = `prefill / its time`; every later step is one decode token: decode tokens/s =
//! `(decode − 1) / (time of the steps after the first)`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use qkernels::Device;
use qparallel::model::{ModelConfig, Qwen3Model};
use qserve::engine::{
    EngineConfig, EngineCore, Event, InferenceModel, KvCacheConfig, Quantization, Request,
    SamplingParams,
};
use qserve::eval::{perplexity, top1_agreement};
use qserve::metrics::Metrics;
use qserve::text::TextCodec;

type Error = Box<dyn std::error::Error>;

enum Source {
    Dir(PathBuf),
    Random(PathBuf),
}

struct Args {
    source: Source,
    text: Option<PathBuf>,
    quantization: Quantization,
    context: usize,
    decode: usize,
    prefill: usize,
    agreement: bool,
}

const USAGE: &str = "usage: perplexity (--model DIR --text FILE | --random-config CONFIG.json) \
                     [--quantization none|int8|int4|int4:G] [--context N (64)] [--prefill N (64)] [--decode N (128)] [--agreement]";

fn parse() -> Result<Args, String> {
    let mut model = None;
    let mut random = None;
    let mut text = None;
    let mut quantization = Quantization::None;
    let mut context = 64;
    let mut decode = 128;
    let mut prefill = 64;
    let mut agreement = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--random-config" => random = Some(PathBuf::from(value()?)),
            "--text" => text = Some(PathBuf::from(value()?)),
            "--quantization" => quantization = value()?.parse().map_err(|e| format!("{e}"))?,
            "--context" => context = value()?.parse().map_err(|e| format!("--context: {e}"))?,
            "--decode" => decode = value()?.parse().map_err(|e| format!("--decode: {e}"))?,
            "--prefill" => prefill = value()?.parse().map_err(|e| format!("--prefill: {e}"))?,
            "--agreement" => agreement = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    let source = match (model, random) {
        (Some(d), None) => Source::Dir(d),
        (None, Some(c)) if text.is_none() => Source::Random(c),
        (None, Some(_)) => {
            return Err(format!(
                "--random-config has no tokenizer: no --text\n{USAGE}"
            ));
        }
        _ => return Err(format!("give one of --model and --random-config\n{USAGE}")),
    };
    Ok(Args {
        source,
        text,
        quantization,
        context,
        decode,
        prefill,
        agreement,
    })
}

impl Source {
    fn build(&self, q: Quantization) -> Result<InferenceModel, Error> {
        Ok(match self {
            Source::Dir(d) => InferenceModel::load(d, Device::Cpu, q)?,
            Source::Random(c) => {
                let config = ModelConfig::from_file(c)?;
                InferenceModel::from_model(Qwen3Model::random(config, 0, 0.02, Device::Cpu)?)?
                    .quantize(q)?
            }
        })
    }

    fn describe(&self) -> String {
        match self {
            Source::Dir(d) => d.display().to_string(),
            Source::Random(c) => format!("{} (random weights)", c.display()),
        }
    }
}

/// The text as one token stream (paragraph + EOS each) and the first 8 tokens of every paragraph.
fn read_text(
    model: &std::path::Path,
    text: &std::path::Path,
) -> Result<(Vec<u32>, Vec<Vec<u32>>), Error> {
    let codec = TextCodec::from_dir(model)?;
    let eos = codec.require_eos_id()?;
    let text = std::fs::read_to_string(text)?;
    let mut tokens = Vec::new();
    let mut starts = Vec::new();
    for p in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
        let ids = codec.encode(&p.split_whitespace().collect::<Vec<_>>().join(" "))?;
        starts.push(ids.iter().copied().take(8).collect());
        tokens.extend(ids);
        tokens.push(eos);
    }
    Ok((tokens, starts))
}

fn run(a: Args) -> Result<(), Error> {
    let t0 = Instant::now();
    let model = a.source.build(a.quantization)?;
    let load_s = t0.elapsed().as_secs_f64();
    let w = model.weight_stats();
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    println!("model: {}", a.source.describe());
    println!(
        "quantization: {}  weights: {} bytes = {:.2} MiB (f32: {} bytes = {:.2} MiB, {:.1}%; {} of {} parameters \
         quantized)  load: {load_s:.2} s",
        w.quantization,
        w.bytes,
        mib(w.bytes),
        w.f32_bytes,
        mib(w.f32_bytes),
        100.0 * w.bytes as f64 / w.f32_bytes as f64,
        w.quantized_params,
        w.params,
    );

    let vocab = model.config().vocab_size as u64;
    let mut prompt: Vec<u32> = (0..a.prefill as u64)
        .map(|i| (i * 7919 % vocab) as u32)
        .collect();
    if let (Source::Dir(dir), Some(text)) = (&a.source, &a.text) {
        let (tokens, starts) = read_text(dir, text)?;
        let t0 = Instant::now();
        let p = perplexity(&model, &tokens, a.context)?;
        println!(
            "text: {}: {} paragraphs, {} tokens, context {}",
            text.display(),
            starts.len(),
            tokens.len(),
            a.context
        );
        println!(
            "perplexity: {:.4}  (mean NLL {:.4} nats over {} predicted tokens; top-1 {:.1}%; {:.2} s)",
            p.perplexity(),
            p.mean_nll(),
            p.predicted,
            100.0 * p.top1_accuracy(),
            t0.elapsed().as_secs_f64()
        );
        if a.agreement && a.quantization != Quantization::None {
            agreement(&a, &model, &tokens, &starts)?;
        }
        prompt = tokens.iter().copied().cycle().take(a.prefill).collect();
    }

    if a.decode >= 2 && !prompt.is_empty() {
        let config = EngineConfig {
            kv: KvCacheConfig {
                block_size: 16,
                num_blocks: (prompt.len() + a.decode).div_ceil(16),
            },
            max_running: 1,
            max_batch_tokens: prompt.len(),
            ..EngineConfig::default()
        };
        let mut core = EngineCore::new(model, config, vec![], None, Arc::new(Metrics::default()))?;
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let mut params = SamplingParams::greedy(a.decode);
        params.ignore_eos = true;
        core.add(Request {
            prompt: prompt.clone(),
            params,
            events: tx,
            adapter: None,
        })?;
        let t0 = Instant::now();
        core.step()?; // prefill + first token
        let prefill_s = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let mut steps = 0;
        while core.has_work() {
            core.step()?;
            steps += 1;
        }
        let s = t0.elapsed().as_secs_f64();
        println!(
            "prefill: {} tokens in {prefill_s:.3} s = {:.1} tokens/s; decode: {steps} tokens in {s:.3} s = {:.1} \
             tokens/s (one greedy sequence)",
            prompt.len(),
            prompt.len() as f64 / prefill_s,
            steps as f64 / s,
        );
    }
    Ok(())
}

/// Teacher-forced and free-running greedy agreement of `model` with the f32 model (see module docs).
fn agreement(
    a: &Args,
    model: &InferenceModel,
    tokens: &[u32],
    starts: &[Vec<u32>],
) -> Result<(), Error> {
    let reference = a.source.build(Quantization::None)?;
    let (same, n) = top1_agreement(&reference, model, tokens, a.context)?;
    let new = 32;
    let want = generate(reference, starts, new)?;
    let got = generate(model.clone(), starts, new)?;
    let total = starts.len() * new;
    let positionwise: usize = want
        .iter()
        .zip(&got)
        .map(|(x, y)| x.iter().zip(y).filter(|(a, b)| a == b).count())
        .sum();
    let prefix: usize = want
        .iter()
        .zip(&got)
        .map(|(x, y)| x.iter().zip(y).take_while(|(a, b)| a == b).count())
        .sum();
    let pct = |k: usize, n: usize| 100.0 * k as f64 / n.max(1) as f64;
    println!(
        "agreement with f32: teacher-forced top-1 {same}/{n} ({:.1}%); free-running greedy ({} prompts × \
         {new} tokens) {positionwise}/{total} position-wise ({:.1}%), {prefix}/{total} before the first \
         divergence ({:.1}%)",
        pct(same, n),
        starts.len(),
        pct(positionwise, total),
        pct(prefix, total)
    );
    Ok(())
}

/// Greedy continuations of `n` tokens (EOS ignored) of every prompt, batched in one engine.
fn generate(model: InferenceModel, prompts: &[Vec<u32>], n: usize) -> Result<Vec<Vec<u32>>, Error> {
    let mut core = EngineCore::new(
        model,
        EngineConfig::default(),
        vec![],
        None,
        Arc::new(Metrics::default()),
    )?;
    let mut rxs = Vec::new();
    for p in prompts {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut params = SamplingParams::greedy(n);
        params.ignore_eos = true;
        core.add(Request {
            prompt: p.clone(),
            params,
            events: tx,
            adapter: None,
        })?;
        rxs.push(rx);
    }
    while core.has_work() {
        core.step()?;
    }
    Ok(rxs
        .iter_mut()
        .map(|rx| {
            let mut out = Vec::new();
            while let Ok(e) = rx.try_recv() {
                if let Event::Delta { tokens, .. } = e {
                    out.extend(tokens);
                }
            }
            out
        })
        .collect())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
