//! `qctl infer`: chat with a model in this process, like ms-swift's `swift infer` (no server, no HTTP).
//!
//! Three modes over one [`ChatEngine`] (the serving engine: paged KV cache, continuous batching, sampling):
//! - `--prompt TEXT`: one chat turn (`--system` first when given), the answer on stdout (token by token with
//!   `--stream`; one JSON object with `-o json`);
//! - no `--prompt`: a multi-turn chat over stdin lines (a terminal or a pipe). History is kept and rendered
//!   through the chat template every turn; `clear` resets it, `exit` / `quit` / end of input ends;
//! - `--val-dataset FILE --result-path OUT.jsonl`: batch inference over a messages JSONL. Every line is checked
//!   and rendered before any generation starts (errors name `FILE:LINE`); then all rows run through the
//!   engine with at most `--max-batch-size` in flight, and OUT gets one line per row in input order.
//!
//! Model resolution: `--model DIR` is an HF model dir, or a LoRA adapter checkpoint whose
//! `adapter_config.json` names its base (`base_model_name_or_path`); `--adapters DIR` names the adapters
//! explicitly. Adapters are merged into the base weights at load time. Tokenizer and chat template come from
//! the adapter dir when it has a `tokenizer.json` (ms-swift saves them with each checkpoint), else the base.
//!
//! Weights: `--quantization int8|int4|int4:G` stores the linear layers quantized (`qserve::engine::quant`):
//! quantized layer by layer while loading, or after the LoRA merge when there are adapters.
//!
//! Sampling: `--temperature` defaults to 0 (greedy); `--top-p`, `--top-k` and `--repetition-penalty` default to
//! the model's `generation_config.json`, else off. `--max-new-tokens` is capped by what is left of the model's
//! context after the prompt. With `--seed`, every row of a batch uses that seed, so a batch row samples exactly
//! what the same conversation samples alone.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use qkernels::Device;
use qparallel::lora;
use qparallel::model::ModelConfig;
use qserve::chat::{
    ChatEngine, ChatMessage, ChatPrompt, Completion, GenerationDefaults, TemplateOptions,
};
use qserve::engine::{EngineConfig, InferenceModel, SamplingParams};
use qserve::text::TextCodec;
use serde_json::{Value as Json, json};

use crate::remote::Output;

/// `qctl infer --model DIR [--prompt TEXT | --val-dataset FILE --result-path OUT]`
#[derive(Args, Debug)]
pub struct InferArgs {
    /// HF model directory, or a LoRA adapter checkpoint (adapter_config.json naming its base model).
    #[arg(long)]
    pub model: PathBuf,
    /// LoRA adapter checkpoint to merge into the --model weights at load time.
    #[arg(long)]
    pub adapters: Option<PathBuf>,
    /// One user turn; without it (and without --val-dataset) chat interactively over stdin.
    #[arg(long, conflicts_with = "val_dataset")]
    pub prompt: Option<String>,
    /// System message put first in every conversation (batch rows that have their own keep theirs).
    #[arg(long)]
    pub system: Option<String>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus mass in (0, 1] (default: generation_config.json, else 1).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep the K most likely tokens; 0 keeps all (default: generation_config.json, else 0).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// HF repetition penalty, 1 = off (default: generation_config.json, else 1).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// RNG seed for temperature > 0.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Most tokens to generate per answer.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Print the answer token by token as it is generated (text output; `-o json` prints one object at the end).
    #[arg(long, conflicts_with = "val_dataset")]
    pub stream: bool,
    /// Qwen3's `enable_thinking` chat-template switch (true/false; default: the template's own default).
    #[arg(long, value_name = "BOOL")]
    pub enable_thinking: Option<bool>,
    /// `cpu` (f32), `cuda` or `cuda:N` (bf16 weights, activations and KV cache; quantization is CPU only).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print every rendered prompt (the chat template's output) on stderr before generating.
    #[arg(long)]
    pub show_prompt: bool,
    /// Batch mode: a JSONL file of `{"messages": [...]}` rows; a trailing assistant turn becomes `labels`.
    #[arg(long, requires = "result_path")]
    pub val_dataset: Option<PathBuf>,
    /// Batch mode: where to write the results (JSONL, one line per input row, in input order).
    #[arg(long, requires = "val_dataset")]
    pub result_path: Option<PathBuf>,
    /// Batch mode: most rows generating at once (the engine's running batch).
    #[arg(long, default_value_t = 32)]
    pub max_batch_size: usize,
    /// Weight-only quantization of the linear layers: `none` (f32), `int8` (one scale per output channel),
    /// `int4` (asymmetric, a scale and offset per 128 inputs; `int4:G` for groups of G). Embedding and norms
    /// stay f32, an untied lm_head is int8; weights are quantized layer by layer as they load
    /// (after merging, with --adapters).
    #[arg(long, default_value = "none")]
    pub quantization: qserve::engine::Quantization,
}

/// Runs `qctl infer`.
pub fn infer(args: InferArgs, output: Output) -> anyhow::Result<()> {
    let device = crate::local::parse_device(&args.device)?;
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if args.max_batch_size == 0 {
        bail!("--max-batch-size must be at least 1");
    }
    let source = ModelSource::resolve(&args.model, args.adapters.as_deref())?;
    let mut engine = EngineConfig {
        quantization: args.quantization,
        ..EngineConfig::default()
    };
    if args.val_dataset.is_some() {
        engine.max_running = args.max_batch_size;
    }
    let chat = source.load(device, engine)?;
    let session = Session::new(&args, chat, output)?;
    let result = match (&args.val_dataset, &args.result_path, &args.prompt) {
        (Some(data), Some(out), _) => session.batch(data, out),
        (_, _, Some(prompt)) => session.single(prompt),
        _ => session.interactive(),
    };
    session.chat.shutdown();
    result
}

/// Where the weights, the adapters and the tokenizer come from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ModelSource {
    /// HF model dir with `config.json` and the base weights.
    base: PathBuf,
    /// LoRA adapter checkpoint to merge, if any.
    adapters: Option<PathBuf>,
    /// Dir with `tokenizer.json` and the chat template.
    text: PathBuf,
}

impl ModelSource {
    fn resolve(model: &Path, adapters: Option<&Path>) -> anyhow::Result<Self> {
        if !model.is_dir() {
            bail!("--model {}: no such directory", model.display());
        }
        let (base, adapters) = if lora::is_adapter_dir(model) {
            if let Some(a) = adapters {
                bail!(
                    "--model {} is a LoRA adapter checkpoint and --adapters {} names more adapters; give the \
                     base model as --model",
                    model.display(),
                    a.display()
                );
            }
            let base = lora::base_model_dir(model).with_context(|| {
                format!("--model {}: a LoRA adapter checkpoint", model.display())
            })?;
            (base, Some(model.to_path_buf()))
        } else {
            if let Some(a) = adapters
                && !lora::is_adapter_dir(a)
            {
                bail!(
                    "--adapters {}: no {} (not a LoRA adapter checkpoint)",
                    a.display(),
                    lora::ADAPTER_CONFIG_FILE
                );
            }
            (model.to_path_buf(), adapters.map(Path::to_path_buf))
        };
        if !base.join("config.json").is_file() {
            bail!(
                "--model {}: no config.json (expected an HF model directory, or a LoRA adapter checkpoint with \
                 {})",
                base.display(),
                lora::ADAPTER_CONFIG_FILE
            );
        }
        let text = match &adapters {
            Some(a) if a.join("tokenizer.json").is_file() => a.clone(),
            _ => base.clone(),
        };
        Ok(ModelSource {
            base,
            adapters,
            text,
        })
    }

    /// Tokenizer and template first (cheap, and a model without a chat template fails before the weights
    /// load), then the weights, merged with the adapters when there are any.
    fn load(&self, device: Device, engine: EngineConfig) -> anyhow::Result<ChatEngine> {
        if !self.text.join("tokenizer.json").is_file() {
            bail!(
                "{}: no tokenizer.json; `qctl infer` needs the model's tokenizer",
                self.text.display()
            );
        }
        let codec = TextCodec::from_dir(&self.text)?;
        if !codec.has_chat_template() {
            bail!(
                "{}: the model has no chat template (no `chat_template` in tokenizer_config.json and no \
                 chat_template.jinja); `qctl infer` needs a chat model",
                self.text.display()
            );
        }
        let model = match &self.adapters {
            None => InferenceModel::load(&self.base, device, engine.quantization)
                .with_context(|| format!("loading the model in {}", self.base.display()))?,
            Some(adapters) => {
                let config = ModelConfig::from_file(self.base.join("config.json"))?;
                let tensors = lora::merged_weights(&self.base, adapters).with_context(|| {
                    format!(
                        "--adapters {}: merging into {}",
                        adapters.display(),
                        self.base.display()
                    )
                })?;
                InferenceModel::from_tensors(config, tensors, device).with_context(|| {
                    format!(
                        "building the model from {} with the adapters of {} merged",
                        self.base.display(),
                        adapters.display()
                    )
                })?
            }
        };
        let defaults = GenerationDefaults::from_dir(&self.base);
        Ok(ChatEngine::from_parts(model, codec, defaults, engine)?)
    }
}

/// A loaded model plus the settings every turn uses.
struct Session {
    chat: ChatEngine,
    template: TemplateOptions,
    sampling: SamplingParams,
    system: Option<String>,
    stream: bool,
    show_prompt: bool,
    output: Output,
    /// Batch rows in flight at once (the engine's running batch is as large).
    max_batch_size: usize,
}

impl Session {
    fn new(args: &InferArgs, chat: ChatEngine, output: Output) -> anyhow::Result<Self> {
        let d = *chat.defaults();
        let sampling = SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p.or(d.top_p).unwrap_or(1.0),
            top_k: args
                .top_k
                .or(d.top_k.map(|k| k.max(0) as usize))
                .unwrap_or(0),
            repetition_penalty: args
                .repetition_penalty
                .or(d.repetition_penalty)
                .unwrap_or(1.0),
            seed: args.seed,
            max_tokens: args.max_new_tokens,
            ..SamplingParams::default()
        };
        if let Err(m) = sampling.validate() {
            // The message starts with the field name; name the flag instead.
            let (field, rest) = m.split_once(' ').unwrap_or((&m, ""));
            let flag = match field {
                "max_tokens" => "max-new-tokens".to_string(),
                f => f.replace('_', "-"),
            };
            bail!("--{flag} {rest}");
        }
        let mut template = TemplateOptions::default();
        if let Some(on) = args.enable_thinking {
            template = template.enable_thinking(on);
        }
        Ok(Session {
            chat,
            template,
            sampling,
            system: args.system.clone(),
            stream: args.stream,
            show_prompt: args.show_prompt,
            output,
            max_batch_size: args.max_batch_size,
        })
    }

    /// `--system` (if any) followed by `turns`.
    fn conversation(&self, turns: &[ChatMessage]) -> Vec<ChatMessage> {
        self.system
            .iter()
            .map(|s| ChatMessage::text("system", s.clone()))
            .chain(turns.iter().cloned())
            .collect()
    }

    /// The sampling settings for a prompt of `prompt_len` tokens: `max_tokens` capped by the context left.
    fn params_for(&self, prompt_len: usize) -> anyhow::Result<SamplingParams> {
        let max_len = self.chat.engine().limits().max_model_len;
        if prompt_len >= max_len {
            bail!("the prompt has {prompt_len} tokens; the model's context is {max_len} tokens");
        }
        let mut p = self.sampling.clone();
        p.max_tokens = p.max_tokens.min(max_len - prompt_len);
        Ok(p)
    }

    fn render(&self, messages: &[ChatMessage]) -> anyhow::Result<ChatPrompt> {
        let prompt = self.chat.render(messages, &self.template)?;
        if self.show_prompt {
            eprintln!("[prompt: {} tokens]\n{}", prompt.ids.len(), prompt.text);
        }
        Ok(prompt)
    }

    /// One generation for `messages`, printed on stdout (streamed when asked).
    fn turn(&self, messages: &[ChatMessage]) -> anyhow::Result<Completion> {
        let prompt = self.render(messages)?;
        let params = self.params_for(prompt.ids.len())?;
        let generation = self.chat.submit(prompt.ids, params)?;
        let mut out = std::io::stdout().lock();
        let streaming = self.stream && self.output == Output::Text;
        let mut write_err: Option<std::io::Error> = None;
        let done = generation.wait_with(|t| {
            if streaming && write_err.is_none() {
                write_err = out.write_all(t.as_bytes()).and_then(|()| out.flush()).err();
            }
        })?;
        if let Some(e) = write_err {
            return Err(e).context("writing to stdout");
        }
        match self.output {
            Output::Text => {
                if !streaming {
                    out.write_all(done.text.as_bytes())?;
                }
                writeln!(out)?;
            }
            Output::Json => {
                let v = json!({
                    "content": done.text,
                    "finish_reason": done.finish_reason.as_str(),
                    "prompt_tokens": done.prompt_tokens,
                    "completion_tokens": done.completion_tokens,
                });
                writeln!(out, "{v}")?;
            }
        }
        out.flush()?;
        Ok(done)
    }

    fn single(&self, prompt: &str) -> anyhow::Result<()> {
        self.turn(&self.conversation(&[ChatMessage::text("user", prompt)]))?;
        Ok(())
    }

    /// Multi-turn chat over stdin lines. On a terminal a failed turn is reported and the chat goes on; with
    /// piped input it ends the run with the error.
    fn interactive(&self) -> anyhow::Result<()> {
        let stdin = std::io::stdin();
        let tty = stdin.is_terminal();
        if tty {
            eprintln!(
                "qctl infer: chat with the model; `clear` resets the history, `exit` or `quit` (or Ctrl-D) ends."
            );
        }
        let mut history: Vec<ChatMessage> = Vec::new();
        let mut input = stdin.lock();
        loop {
            if tty {
                print!("<<< ");
                std::io::stdout().flush()?;
            }
            let mut line = String::new();
            if input.read_line(&mut line).context("reading stdin")? == 0 {
                if tty {
                    println!();
                }
                return Ok(());
            }
            let query = line.trim_end_matches(['\n', '\r']);
            match query.trim() {
                "" => continue,
                "exit" | "quit" => return Ok(()),
                "clear" => {
                    history.clear();
                    eprintln!("(history cleared)");
                    continue;
                }
                _ => {}
            }
            if tty {
                print!(">>> ");
            }
            let user = ChatMessage::text("user", query);
            let mut turns = history.clone();
            turns.push(user.clone());
            match self.turn(&self.conversation(&turns)) {
                Ok(done) => {
                    history.push(user);
                    history.push(ChatMessage::text("assistant", done.text));
                }
                Err(e) if tty => eprintln!("error: {e:#}"),
                Err(e) => return Err(e),
            }
        }
    }

    /// Batch inference (see module docs).
    fn batch(&self, data: &Path, result_path: &Path) -> anyhow::Result<()> {
        let rows = self.read_rows(data)?;
        let file = File::create(result_path)
            .with_context(|| format!("--result-path {}: cannot create", result_path.display()))?;
        let mut out = BufWriter::new(file);
        let bar = indicatif::ProgressBar::new(rows.len() as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} rows [{elapsed_precise}<{eta_precise}] {msg}",
        ) {
            bar.set_style(style);
        }
        let started = Instant::now();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let max_in_flight = self.max_batch_size;
        let generated = runtime.block_on(async {
            let mut running = tokio::task::JoinSet::new();
            let mut done: BTreeMap<usize, Completion> = BTreeMap::new();
            let (mut next, mut written, mut tokens) = (0usize, 0usize, 0usize);
            loop {
                while running.len() < max_in_flight && next < rows.len() {
                    let row = &rows[next];
                    let generation = self
                        .chat
                        .submit(row.prompt.clone(), row.params.clone())
                        .with_context(|| format!("{}:{}", data.display(), row.line))?;
                    let i = next;
                    running.spawn(async move { (i, generation.collect().await) });
                    next += 1;
                }
                let Some(joined) = running.join_next().await else {
                    break;
                };
                let (i, result) = joined.context("a generation task failed")?;
                let completion = result.with_context(|| {
                    format!("{}:{}: generation failed", data.display(), rows[i].line)
                })?;
                tokens += completion.completion_tokens;
                done.insert(i, completion);
                bar.inc(1);
                bar.set_message(format!(
                    "{:.1} tokens/s",
                    tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)
                ));
                while let Some(c) = done.remove(&written) {
                    let line = rows[written].result(&c.text);
                    writeln!(out, "{line}")
                        .with_context(|| format!("writing {}", result_path.display()))?;
                    written += 1;
                }
            }
            out.flush()
                .with_context(|| format!("writing {}", result_path.display()))?;
            anyhow::Ok(tokens)
        })?;
        bar.finish_and_clear();
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "{} rows → {} ({generated} tokens generated in {secs:.1}s, {:.1} tokens/s)",
            rows.len(),
            result_path.display(),
            generated as f64 / secs.max(1e-9)
        );
        Ok(())
    }

    /// Parses, checks and renders every row of `path`; the first bad line fails the run as `FILE:LINE: why`.
    fn read_rows(&self, path: &Path) -> anyhow::Result<Vec<Row>> {
        let file = File::open(path)
            .with_context(|| format!("--val-dataset {}: cannot open", path.display()))?;
        let mut rows = Vec::new();
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line_no = i + 1;
            let at = || format!("{}:{line_no}", path.display());
            let text = line.with_context(|| format!("{}: reading", at()))?;
            if text.trim().is_empty() {
                continue;
            }
            // One line, `FILE:LINE: messages[0]: why`, rather than a cause chain.
            let row = self
                .parse_row(&text, line_no)
                .map_err(|e| anyhow::anyhow!("{}: {e:#}", at()))?;
            rows.push(row);
        }
        if rows.is_empty() {
            bail!("--val-dataset {}: no rows", path.display());
        }
        Ok(rows)
    }

    fn parse_row(&self, text: &str, line: usize) -> anyhow::Result<Row> {
        let v: Json = serde_json::from_str(text).context("not valid JSON")?;
        let Json::Object(mut object) = v else {
            bail!("expected a JSON object with `messages`");
        };
        let Some(Json::Array(mut raw)) = object.remove("messages") else {
            bail!("`messages` must be a list of {{\"role\", \"content\"}} objects");
        };
        let mut labels = None;
        if raw
            .last()
            .and_then(|m| m.get("role"))
            .and_then(Json::as_str)
            == Some("assistant")
        {
            let last = raw.pop().unwrap_or(Json::Null);
            labels = Some(last.get("content").cloned().unwrap_or(Json::Null));
        }
        if raw.is_empty() {
            bail!("no messages before the assistant turn to generate");
        }
        if let Some(system) = &self.system
            && raw
                .first()
                .and_then(|m| m.get("role"))
                .and_then(Json::as_str)
                != Some("system")
        {
            raw.insert(0, json!({"role": "system", "content": system}));
        }
        let messages = raw
            .iter()
            .enumerate()
            .map(|(k, m)| {
                let msg: ChatMessage =
                    serde_json::from_value(m.clone()).with_context(|| format!("messages[{k}]"))?;
                msg.template_value()
                    .with_context(|| format!("messages[{k}]"))?;
                Ok(msg)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let prompt = self.chat.render(&messages, &self.template)?;
        if self.show_prompt {
            eprintln!(
                "[line {line} prompt: {} tokens]\n{}",
                prompt.ids.len(),
                prompt.text
            );
        }
        let params = self.params_for(prompt.ids.len())?;
        Ok(Row {
            line,
            object,
            messages: raw,
            labels,
            prompt: prompt.ids,
            params,
        })
    }
}

/// One batch input row, checked and rendered.
struct Row {
    /// 1-based line in the input file.
    line: usize,
    /// The row's other keys (kept in the result).
    object: serde_json::Map<String, Json>,
    /// The conversation up to the turn to generate, as given (with `--system` prepended when it had none).
    messages: Vec<Json>,
    /// The dropped trailing assistant content.
    labels: Option<Json>,
    prompt: Vec<u32>,
    params: SamplingParams,
}

impl Row {
    /// The output line: the row with the generated assistant turn appended to `messages`, plus `labels`.
    fn result(&self, answer: &str) -> Json {
        let mut o = self.object.clone();
        let mut messages = self.messages.clone();
        messages.push(json!({"role": "assistant", "content": answer}));
        o.insert("messages".into(), Json::Array(messages));
        if let Some(l) = &self.labels {
            o.insert("labels".into(), l.clone());
        }
        Json::Object(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An adapter dir whose adapter_config.json (the PEFT fixture's) names `base`.
    fn adapter_dir(dir: &Path, base: &str) {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/lora/adapter");
        let mut cfg: Json = serde_json::from_str(
            &std::fs::read_to_string(fixture.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        cfg["base_model_name_or_path"] = json!(base);
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    }

    #[test]
    fn adapter_checkpoints_resolve_to_their_base() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        let ckpt = tmp.path().join("ckpt");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("config.json"), "{}").unwrap();
        adapter_dir(&ckpt, base.to_str().unwrap());
        let s = ModelSource::resolve(&ckpt, None).unwrap();
        assert_eq!(s.base, base);
        assert_eq!(s.adapters.as_deref(), Some(ckpt.as_path()));
        assert_eq!(s.text, base);
        // ms-swift checkpoints carry the tokenizer: it wins over the base's.
        std::fs::write(ckpt.join("tokenizer.json"), "{}").unwrap();
        assert_eq!(ModelSource::resolve(&ckpt, None).unwrap().text, ckpt);

        // Relative to the adapter dir.
        adapter_dir(&ckpt, "../base");
        assert_eq!(
            ModelSource::resolve(&ckpt, None).unwrap().base,
            ckpt.join("../base")
        );

        // A hub id is not a directory.
        adapter_dir(&ckpt, "Qwen/Qwen3-8B");
        let e = format!("{:#}", ModelSource::resolve(&ckpt, None).unwrap_err());
        assert!(
            e.contains("`Qwen/Qwen3-8B`") && e.contains("--model"),
            "{e}"
        );

        // Adapters twice, explicit adapters that are not adapters, a plain dir without config.json.
        let e = ModelSource::resolve(&ckpt, Some(&ckpt))
            .unwrap_err()
            .to_string();
        assert!(e.contains("names more adapters"), "{e}");
        let e = ModelSource::resolve(&base, Some(&base))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--adapters") && e.contains("no adapter_config.json"),
            "{e}"
        );
        let e = ModelSource::resolve(tmp.path(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no config.json"), "{e}");
        let explicit = ModelSource::resolve(&base, Some(&ckpt)).unwrap();
        assert_eq!(explicit.base, base);
        assert_eq!(explicit.adapters.as_deref(), Some(ckpt.as_path()));
    }
}
