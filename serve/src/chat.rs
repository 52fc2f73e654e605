//! In-process chat generation, shared by the HTTP server ([`crate::http`]) and `qctl infer`.
//!
//! [`ChatEngine`] is a model loaded into a running [`Engine`] together with its [`TextCodec`] (tokenizer + chat
//! template) and its `generation_config.json` sampling defaults. A chat turn goes:
//!
//! ```text
//! [ChatMessage] ──template_value──► template values ──ChatEngine::render──► ChatPrompt {text, ids}
//!     ──ChatEngine::submit──► Generation ──recv / blocking_recv (stream)──► Event::Delta …, Event::Finished
//!                                        └─collect / wait (whole answer)──► Completion
//! ```
//!
//! The model can come from an HF dir ([`ChatEngine::load`]) or from parts built elsewhere
//! ([`ChatEngine::from_parts`], e.g. base weights with LoRA adapters merged in memory). Dropping a
//! [`Generation`] before its end aborts the sequence at the engine's next step (its KV blocks are freed).

use std::path::Path;
use std::sync::Arc;

use minijinja::Value;
use qkernels::Device;
use serde::Deserialize;
use serde_json::Value as Json;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::{
    Engine, EngineConfig, EngineCore, EngineError, Event, FinishReason, InferenceModel,
    SamplingParams,
};
use crate::metrics::Metrics;
use crate::text::{TextCodec, TextError};

/// Why a chat turn could not be prepared or run.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// Loading the model, or the engine refused the request (too long, bad settings, …).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Tokenizer or chat template (including [`TextError::NoChatTemplate`]).
    #[error(transparent)]
    Text(#[from] TextError),
    /// A message the chat template cannot take (unknown role, non-text content part).
    #[error("{0}")]
    InvalidMessage(String),
    /// The generation ended with [`FinishReason::Abort`] (an engine failure).
    #[error("generation aborted: {0}")]
    Aborted(String),
    /// The engine thread went away before the generation finished.
    #[error("the engine stopped before the generation finished")]
    Stopped,
}

/// Sampling defaults from the model's `generation_config.json` (`temperature`, `top_p`, `top_k`,
/// `repetition_penalty`), used for settings a request leaves out, as vLLM does.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f32>,
}

impl GenerationDefaults {
    /// Reads `dir/generation_config.json`; a missing file or field gives `None`.
    pub fn from_dir(dir: &Path) -> Self {
        let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) else {
            return Self::default();
        };
        let Ok(v) = serde_json::from_str::<Json>(&text) else {
            return Self::default();
        };
        let f = |k: &str| v.get(k).and_then(Json::as_f64).map(|x| x as f32);
        GenerationDefaults {
            temperature: f("temperature"),
            top_p: f("top_p"),
            top_k: v.get("top_k").and_then(Json::as_i64),
            repetition_penalty: f("repetition_penalty"),
        }
    }
}

/// Message content: a string or a list of OpenAI content parts (only `text` parts are supported).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One OpenAI content part.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// One chat message as OpenAI clients and ms-swift datasets write it (unknown keys are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
    pub name: Option<String>,
    pub tool_calls: Option<Value>,
    pub tool_call_id: Option<String>,
    pub reasoning_content: Option<String>,
}

impl ChatMessage {
    /// A plain text message.
    pub fn text(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: Some(Content::Text(content.into())),
            name: None,
            tool_calls: None,
            tool_call_id: None,
            reasoning_content: None,
        }
    }

    /// The message as the chat template sees it: `developer` becomes `system`, text parts are joined, keys in
    /// OpenAI order. Unknown roles and non-text parts are [`ChatError::InvalidMessage`].
    pub fn template_value(&self) -> Result<Value, ChatError> {
        if !["system", "user", "assistant", "tool", "developer"].contains(&self.role.as_str()) {
            return Err(ChatError::InvalidMessage(format!(
                "unknown message role `{}`",
                self.role
            )));
        }
        let content = match &self.content {
            None => None,
            Some(Content::Text(t)) => Some(t.clone()),
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => s.push_str(t),
                        (k, _) => {
                            return Err(ChatError::InvalidMessage(format!(
                                "content part type `{k}` is not supported"
                            )));
                        }
                    }
                }
                Some(s)
            }
        };
        let role = if self.role == "developer" {
            "system"
        } else {
            self.role.as_str()
        };
        let mut entries: Vec<(&str, Value)> = vec![
            ("role", role.into()),
            (
                "content",
                content.map(Value::from).unwrap_or(Value::from(())),
            ),
        ];
        if let Some(n) = &self.name {
            entries.push(("name", n.clone().into()));
        }
        if let Some(t) = &self.tool_calls {
            entries.push(("tool_calls", t.clone()));
        }
        if let Some(t) = &self.tool_call_id {
            entries.push(("tool_call_id", t.clone().into()));
        }
        if let Some(r) = &self.reasoning_content {
            entries.push(("reasoning_content", r.clone().into()));
        }
        Ok(Value::from_iter(entries))
    }
}

/// How a conversation is rendered (besides its messages).
#[derive(Debug, Clone)]
pub struct TemplateOptions {
    /// Tool schemas (`tools` in the template context).
    pub tools: Option<Value>,
    /// Open an assistant turn at the end (true for generation).
    pub add_generation_prompt: bool,
    /// Extra context entries (`chat_template_kwargs`, e.g. `enable_thinking`).
    pub kwargs: Vec<(String, Value)>,
}

impl Default for TemplateOptions {
    fn default() -> Self {
        TemplateOptions {
            tools: None,
            add_generation_prompt: true,
            kwargs: Vec::new(),
        }
    }
}

impl TemplateOptions {
    /// Sets Qwen3's `enable_thinking` template switch.
    pub fn enable_thinking(mut self, on: bool) -> Self {
        self.kwargs.retain(|(k, _)| k != "enable_thinking");
        self.kwargs
            .push(("enable_thinking".into(), Value::from(on)));
        self
    }
}

/// A rendered conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatPrompt {
    /// The chat template's output.
    pub text: String,
    /// Its token ids.
    pub ids: Vec<u32>,
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The answer (special tokens skipped, stop strings cut).
    pub text: String,
    /// Generated token ids, the final EOS included.
    pub tokens: Vec<u32>,
    /// `Stop` (EOS / stop rule) or `Length`.
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// One running generation: its engine events, in order.
#[derive(Debug)]
pub struct Generation {
    rx: UnboundedReceiver<Event>,
}

impl Generation {
    /// Wraps the receiver [`Engine::submit`] returned.
    pub fn new(rx: UnboundedReceiver<Event>) -> Self {
        Generation { rx }
    }

    /// The next event; `None` once the engine has dropped the sequence (after `Finished`, or if it stopped).
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// [`recv`](Self::recv) for synchronous callers. Must not be called from inside an async runtime.
    pub fn blocking_recv(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }

    /// Waits for the whole answer.
    pub async fn collect(mut self) -> Result<Completion, ChatError> {
        let mut acc = Accumulator::default();
        loop {
            if let Some(done) = acc.push(self.rx.recv().await) {
                return done;
            }
        }
    }

    /// Runs to the end on this thread, handing every text delta to `on_text` as it arrives (streaming). Must
    /// not be called from inside an async runtime.
    pub fn wait_with(mut self, mut on_text: impl FnMut(&str)) -> Result<Completion, ChatError> {
        let mut acc = Accumulator::default();
        loop {
            let ev = self.rx.blocking_recv();
            if let Some(Event::Delta { text, .. }) = &ev
                && !text.is_empty()
            {
                on_text(text);
            }
            if let Some(done) = acc.push(ev) {
                return done;
            }
        }
    }

    /// [`wait_with`](Self::wait_with) without a callback.
    pub fn wait(self) -> Result<Completion, ChatError> {
        self.wait_with(|_| {})
    }
}

/// Folds events into a [`Completion`].
#[derive(Default)]
struct Accumulator {
    text: String,
    tokens: Vec<u32>,
}

impl Accumulator {
    /// `Some` once the generation is over.
    fn push(&mut self, ev: Option<Event>) -> Option<Result<Completion, ChatError>> {
        match ev {
            Some(Event::Delta { tokens, text }) => {
                self.tokens.extend(tokens);
                self.text.push_str(&text);
                None
            }
            Some(Event::Finished {
                reason: FinishReason::Abort,
                error,
                ..
            }) => Some(Err(ChatError::Aborted(
                error.unwrap_or_else(|| "no reason given".into()),
            ))),
            Some(Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
                ..
            }) => Some(Ok(Completion {
                text: std::mem::take(&mut self.text),
                tokens: std::mem::take(&mut self.tokens),
                finish_reason: reason,
                prompt_tokens,
                completion_tokens,
            })),
            None => Some(Err(ChatError::Stopped)),
        }
    }
}

/// A model running in an engine thread, with its tokenizer, chat template and sampling defaults. Cloning
/// shares the engine.
#[derive(Clone)]
pub struct ChatEngine {
    engine: Engine,
    codec: Arc<TextCodec>,
    defaults: GenerationDefaults,
}

impl std::fmt::Debug for ChatEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatEngine")
            .field("limits", &self.engine.limits())
            .field("codec", &self.codec)
            .field("defaults", &self.defaults)
            .finish()
    }
}

impl ChatEngine {
    /// Loads an HF model dir (`config.json`, safetensors, `tokenizer.json`, optional `tokenizer_config.json` /
    /// `generation_config.json`) and starts its engine thread on `device` (the CPU in f32, or a GPU in bf16; see
    /// [`crate::engine::model`]). Blocks while the weights load; with
    /// `config.quantization` set they are quantized layer by layer as they load ([`InferenceModel::load`]).
    pub fn load(dir: &Path, device: Device, config: EngineConfig) -> Result<Self, ChatError> {
        ChatEngine::load_with_adapters(dir, device, config, &[], "")
    }

    /// [`ChatEngine::load`] serving the PEFT adapter directories `adapters` (`(name, dir)`) beside the base model,
    /// which is served as `base_name` (see [`crate::engine::lora`]).
    pub fn load_with_adapters(
        dir: &Path,
        device: Device,
        config: EngineConfig,
        adapters: &[(String, std::path::PathBuf)],
        base_name: &str,
    ) -> Result<Self, ChatError> {
        let mut model = InferenceModel::load(dir, device, config.quantization)?;
        if !adapters.is_empty() {
            model = model.with_adapters(adapters, base_name)?;
        }
        let codec = TextCodec::from_dir(dir)?;
        ChatEngine::from_parts(model, codec, GenerationDefaults::from_dir(dir), config)
    }

    /// Starts an engine on a model and codec built elsewhere.
    pub fn from_parts(
        model: InferenceModel,
        codec: TextCodec,
        defaults: GenerationDefaults,
        config: EngineConfig,
    ) -> Result<Self, ChatError> {
        let codec = Arc::new(codec);
        let metrics = Arc::new(Metrics::default());
        let core = EngineCore::new(
            model,
            config,
            codec.eos_ids().to_vec(),
            Some(codec.clone()),
            metrics.clone(),
        )?;
        Ok(ChatEngine {
            engine: Engine::start(core, metrics),
            codec,
            defaults,
        })
    }

    /// The engine handle (limits, metrics, raw token submission, shutdown).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Tokenizer and chat template.
    pub fn codec(&self) -> &Arc<TextCodec> {
        &self.codec
    }

    /// The model's `generation_config.json` sampling defaults.
    pub fn defaults(&self) -> &GenerationDefaults {
        &self.defaults
    }

    /// Renders `messages` through the chat template and tokenizes the result.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        options: &TemplateOptions,
    ) -> Result<ChatPrompt, ChatError> {
        let values = messages
            .iter()
            .map(ChatMessage::template_value)
            .collect::<Result<Vec<_>, _>>()?;
        let tools = options
            .tools
            .as_ref()
            .filter(|t| !t.is_none() && !t.is_undefined());
        let text = self.codec.apply_chat_template(
            &values,
            tools,
            options.add_generation_prompt,
            &options.kwargs,
        )?;
        let ids = self.codec.encode(&text)?;
        Ok(ChatPrompt { text, ids })
    }

    /// Queues a generation of `prompt` ids (checked against the engine's limits first).
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<Generation, ChatError> {
        self.submit_with(prompt, params, None)
    }

    /// [`ChatEngine::submit`] with LoRA adapter `adapter` (`None`: the base model).
    pub fn submit_with(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        adapter: Option<crate::engine::lora::AdapterId>,
    ) -> Result<Generation, ChatError> {
        Ok(Generation::new(self.engine.submit_with(prompt, params, adapter)?))
    }

    /// Stops the engine thread (aborting what is in flight) and waits for it.
    pub fn shutdown(&self) {
        self.engine.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_become_template_values() {
        let m: ChatMessage = serde_json::from_str(
            r#"{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                "loss": false}"#,
        )
        .unwrap();
        let v = m.template_value().unwrap();
        assert_eq!(v.get_attr("role").unwrap().as_str(), Some("system"));
        assert_eq!(v.get_attr("content").unwrap().as_str(), Some("ab"));
        let bad = ChatMessage::text("robot", "x")
            .template_value()
            .unwrap_err();
        assert_eq!(bad.to_string(), "unknown message role `robot`");
        let m: ChatMessage =
            serde_json::from_str(r#"{"role": "user", "content": [{"type": "image_url"}]}"#)
                .unwrap();
        assert!(
            matches!(m.template_value(), Err(ChatError::InvalidMessage(e)) if e.contains("image_url"))
        );
    }

    #[test]
    fn accumulator_collects_deltas_and_reports_aborts() {
        let mut acc = Accumulator::default();
        let delta = |t: &[u32], s: &str| {
            Some(Event::Delta {
                tokens: t.to_vec(),
                text: s.into(),
            })
        };
        assert!(acc.push(delta(&[1, 2], "he")).is_none());
        assert!(acc.push(delta(&[3], "llo")).is_none());
        let done = acc
            .push(Some(Event::Finished {
                reason: FinishReason::Length,
                prompt_tokens: 4,
                completion_tokens: 3,
                error: None,
            }))
            .unwrap()
            .unwrap();
        assert_eq!(done.text, "hello");
        assert_eq!(done.tokens, vec![1, 2, 3]);
        assert_eq!(done.finish_reason, FinishReason::Length);
        let abort = Accumulator::default().push(Some(Event::Finished {
            reason: FinishReason::Abort,
            prompt_tokens: 0,
            completion_tokens: 0,
            error: Some("boom".into()),
        }));
        assert!(matches!(abort, Some(Err(ChatError::Aborted(m))) if m == "boom"));
        assert!(matches!(
            Accumulator::default().push(None),
            Some(Err(ChatError::Stopped))
        ));
    }

    #[test]
    fn streamed_deltas_add_up_to_the_collected_answer() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/models/qwen3-tiny-chat");
        let chat = ChatEngine::load(&dir, Device::Cpu, EngineConfig::default()).unwrap();
        let hello = [ChatMessage::text("user", "Hello")];
        let p = chat.render(&hello, &TemplateOptions::default()).unwrap();
        assert!(p.text.ends_with("<|im_start|>assistant\n"), "{}", p.text);
        assert_eq!(p.ids, chat.codec().encode(&p.text).unwrap());
        let off = chat
            .render(&hello, &TemplateOptions::default().enable_thinking(false))
            .unwrap();
        assert_eq!(off.text, format!("{}<think>\n\n</think>\n\n", p.text));

        let mut streamed = String::new();
        let a = chat
            .submit(p.ids.clone(), SamplingParams::greedy(12))
            .unwrap()
            .wait_with(|t| streamed.push_str(t))
            .unwrap();
        assert_eq!(a.text, streamed);
        assert_eq!(a.tokens.len(), a.completion_tokens);
        assert_eq!(a.prompt_tokens, p.ids.len());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let b = rt
            .block_on(
                chat.submit(p.ids, SamplingParams::greedy(12))
                    .unwrap()
                    .collect(),
            )
            .unwrap();
        assert_eq!(a, b);
        chat.shutdown();
        assert!(matches!(
            chat.submit(vec![1], SamplingParams::greedy(1)),
            Err(ChatError::Engine(EngineError::Stopped))
        ));
    }
}
