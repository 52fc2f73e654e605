//! OpenAI-compatible HTTP server (axum).
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (both non-streaming and SSE streaming),
//! `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text). With an API key configured, the `/v1/*`
//! routes require `Authorization: Bearer KEY`; `/health` and `/metrics` stay open.
//!
//! `/v1/models` reports, besides OpenAI's fields, `max_model_len`, the weights' `quantization` (`none`, `int8`,
//! `int4`, `int4:G`) and their `weight_bytes` next to `f32_weight_bytes`; `/metrics` has the same as
//! `qserve_model_weight_bytes`, `qserve_model_weight_f32_bytes` and `qserve_model_quantization_info`.
//!
//! Errors always come back as JSON `{"error": {"message", "type", "param", "code"}}` with a 4xx status for bad
//! requests (400 malformed / out of range / too long, 401 bad key, 404 unknown model or route) and 500 for engine
//! failures; a connection is never dropped without an answer.
//!
//! Streaming follows OpenAI's chunk format: `data: {json}\n\n` events (`chat.completion.chunk`: a first chunk
//! with `delta.role`, then `delta.content` pieces, then an empty delta with `finish_reason`; with
//! `stream_options.include_usage` a last chunk with `choices: []` and `usage`), closed by `data: [DONE]`. The
//! body stream owns the engine's event receiver, so a client that disconnects drops it and the engine frees the
//! sequence's KV blocks at its next step.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use qkernels::Device;
use serde::Deserialize;
use serde_json::{Value as Json, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use crate::chat::GenerationDefaults;
use crate::chat::{ChatEngine, ChatError, ChatMessage, Generation, TemplateOptions};
use crate::engine::{Engine, EngineConfig, EngineError, Event, FinishReason, SamplingParams};
use crate::metrics::Metrics;
use crate::reasoning::{ReasoningSplitter, Split};
use crate::text::TextError;

/// What [`serve`] needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// HF model dir: `config.json`, safetensors, `tokenizer.json`, `tokenizer_config.json`.
    pub model_dir: PathBuf,
    /// Address to bind; port 0 picks a free one (see [`ServerHandle::local_addr`]).
    pub listen: SocketAddr,
    /// Where the engine runs: `Device::Cpu` (f32) or `Device::Cuda(i)` (bf16 weights, activations and KV cache).
    pub device: Device,
    /// Require `Authorization: Bearer <key>` on `/v1/*`.
    pub api_key: Option<String>,
    /// Model id reported by `/v1/models` and accepted in requests; default: the model dir's name.
    pub served_model_name: Option<String>,
    /// LoRA adapters served beside the base model, `(name, PEFT adapter dir)`: a request whose `model` is `name`
    /// generates with that adapter (see [`crate::engine::lora`]); `/v1/models` lists them.
    pub adapters: Vec<(String, PathBuf)>,
    /// Cache and scheduler settings.
    pub engine: EngineConfig,
    /// Split chat answers into `reasoning_content` and `content` at Qwen3's `</think>` (vLLM's
    /// `--reasoning-parser qwen3`; see [`crate::reasoning`]).
    pub reasoning_parser: bool,
}

impl ServeConfig {
    /// Defaults: `127.0.0.1:8000`, CPU, no API key, default engine settings.
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        ServeConfig {
            model_dir: model_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            device: Device::Cpu,
            api_key: None,
            served_model_name: None,
            adapters: Vec::new(),
            engine: EngineConfig::default(),
            reasoning_parser: false,
        }
    }
}

/// Why the server could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Text(#[from] TextError),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server task failed: {0}")]
    Join(String),
}

/// A running server. Dropping it leaves the server running until the runtime ends; call
/// [`ServerHandle::shutdown`] for a clean stop.
pub struct ServerHandle {
    addr: SocketAddr,
    model: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    engine: Engine,
}

impl ServerHandle {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The served model id.
    pub fn model_name(&self) -> &str {
        &self.model
    }

    /// Quantization mode and bytes of the served model's weights.
    pub fn weight_stats(&self) -> crate::engine::WeightStats {
        self.engine.weight_stats()
    }

    /// Stops accepting, lets open responses finish, stops the engine.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let engine = self.engine.clone();
        let r = self.wait().await;
        tokio::task::spawn_blocking(move || engine.shutdown())
            .await
            .map_err(|e| ServeError::Join(e.to_string()))?;
        r
    }

    /// Waits until the server stops (after [`shutdown`](Self::shutdown) or an I/O failure).
    pub async fn wait(self) -> Result<(), ServeError> {
        self.task
            .await
            .map_err(|e| ServeError::Join(e.to_string()))??;
        Ok(())
    }
}

struct AppState {
    reasoning_parser: bool,
    chat: ChatEngine,
    model: String,
    api_key: Option<String>,
    metrics: Arc<Metrics>,
}

type Shared = Arc<AppState>;

/// Loads the model and tokenizer, starts the engine thread and the HTTP server; returns once it listens.
pub async fn serve(config: ServeConfig) -> Result<ServerHandle, ServeError> {
    let dir = config.model_dir.clone();
    let (device, engine_config) = (config.device, config.engine);
    let name = config.served_model_name.clone().unwrap_or_else(|| {
        config
            .model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let (adapters, base) = (config.adapters.clone(), name.clone());
    let chat = tokio::task::spawn_blocking(move || {
        ChatEngine::load_with_adapters(&dir, device, engine_config, &adapters, &base)
    })
    .await
    .map_err(|e| ServeError::Join(e.to_string()))??;
    let engine = chat.engine().clone();
    let state = Arc::new(AppState {
        reasoning_parser: config.reasoning_parser,
        chat,
        model: name.clone(),
        api_key: config.api_key.clone(),
        metrics: engine.metrics().clone(),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let app = router(state);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    let w = engine.weight_stats();
    tracing::info!(
        %addr,
        model = %name,
        quantization = %w.quantization,
        weight_bytes = w.bytes,
        f32_weight_bytes = w.f32_bytes,
        "serving: weights take {:.1} MiB ({:.1} MiB in f32, {:.1}% of the parameters quantized)",
        w.bytes as f64 / (1 << 20) as f64,
        w.f32_bytes as f64 / (1 << 20) as f64,
        100.0 * w.quantized_params as f64 / w.params.max(1) as f64,
    );
    Ok(ServerHandle {
        addr,
        model: name,
        stop: Some(stop),
        task,
        engine,
    })
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------------------
// Errors

/// An OpenAI-style error response.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    fn body(&self) -> Json {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body().to_string();
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidRequest(m) if m.contains("maximum context length") => {
                ApiError::bad_request(m, Some("messages")).with_code("context_length_exceeded")
            }
            EngineError::InvalidRequest(m) => ApiError::bad_request(m, None),
            other => ApiError::internal(other.to_string()),
        }
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such route".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_found"),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: "method not allowed on this route".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("method_not_allowed"),
    }
}

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// Reads the body, answering 413 in JSON when it exceeds [`MAX_BODY_BYTES`].
async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "request body too large or unreadable (limit {MAX_BODY_BYTES} bytes): {e}"
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        })
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "invalid or missing API key".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        })
    }
}

/// Counts the request, and the error if any, then renders.
fn finish(state: &AppState, r: Result<Response, ApiError>) -> Response {
    state.metrics.requests_total.fetch_add(1, Ordering::Relaxed);
    match r {
        Ok(resp) => resp,
        Err(e) => {
            state
                .metrics
                .request_errors_total
                .fetch_add(1, Ordering::Relaxed);
            e.into_response()
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Requests

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Deserialize)]
struct SamplingFields {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    n: Option<u32>,
    stop: Option<Stop>,
    seed: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    stop_token_ids: Option<Vec<u32>>,
    ignore_eos: Option<bool>,
    logprobs: Option<Json>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<ChatMessage>,
    tools: Option<minijinja::Value>,
    chat_template_kwargs: Option<serde_json::Map<String, Json>>,
    add_generation_prompt: Option<bool>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: Prompt,
    echo: Option<bool>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}"), None))
}

/// The name a response reports: the adapter's, or the base model's.
fn served_name(st: &AppState, adapter: Option<crate::engine::lora::AdapterId>) -> String {
    adapter
        .and_then(|id| st.chat.engine().adapters().get(id).cloned())
        .unwrap_or_else(|| st.model.clone())
}

/// The adapter a request's `model` names: `None` for the base model (or no `model`), the adapter's id for a
/// served LoRA adapter; anything else is OpenAI's 404 `model_not_found`.
fn check_model(
    state: &AppState,
    model: &Option<String>,
) -> Result<Option<crate::engine::lora::AdapterId>, ApiError> {
    let adapters = state.chat.engine().adapters();
    match model {
        None => Ok(None),
        Some(m) if m == &state.model => Ok(None),
        Some(m) => match adapters.iter().position(|a| a == m) {
            Some(id) => Ok(Some(id)),
            None => {
                let served: Vec<String> = std::iter::once(&state.model)
                    .chain(adapters)
                    .map(|n| format!("`{n}`"))
                    .collect();
                Err(ApiError {
                    status: StatusCode::NOT_FOUND,
                    message: format!(
                        "the model `{m}` does not exist; this server serves {}",
                        served.join(", ")
                    ),
                    kind: "invalid_request_error",
                    param: Some("model"),
                    code: Some("model_not_found"),
                })
            }
        },
    }
}

impl SamplingFields {
    fn to_params(
        &self,
        prompt_len: usize,
        max_model_len: usize,
        defaults: &GenerationDefaults,
    ) -> Result<SamplingParams, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request("only n = 1 is supported", Some("n")));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|l| !(l.is_null() || l == &Json::Bool(false)))
        {
            return Err(ApiError::bad_request(
                "logprobs are not supported",
                Some("logprobs"),
            ));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            Some(0) => {
                return Err(ApiError::bad_request(
                    "max_tokens must be at least 1",
                    Some("max_tokens"),
                ));
            }
            Some(m) => m as usize,
            None => max_model_len.saturating_sub(prompt_len).max(1),
        };
        let top_k = match self.top_k.or(defaults.top_k) {
            None => 0,
            Some(k) if k <= 0 => 0, // -1 / 0: off (vLLM)
            Some(k) => k as usize,
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        let p = SamplingParams {
            temperature: self.temperature.or(defaults.temperature).unwrap_or(1.0),
            top_p: self.top_p.or(defaults.top_p).unwrap_or(1.0),
            top_k,
            repetition_penalty: self
                .repetition_penalty
                .or(defaults.repetition_penalty)
                .unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            seed: self.seed,
            max_tokens,
            stop,
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
        };
        p.validate().map_err(|m| {
            let param = m.split_whitespace().next().and_then(|f| {
                [
                    "temperature",
                    "top_p",
                    "repetition_penalty",
                    "presence_penalty",
                    "frequency_penalty",
                    "max_tokens",
                ]
                .into_iter()
                .find(|&k| k == f)
            });
            ApiError::bad_request(m, param)
        })?;
        Ok(p)
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

// ---------------------------------------------------------------------------------------------------------
// Handlers

/// 200 while the engine thread runs, 503 once it has stopped.
async fn health(State(st): State<Shared>) -> Response {
    if st.chat.engine().is_running() {
        (
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"status":"ok"}"#,
        )
            .into_response()
    } else {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the inference engine has stopped".into(),
            kind: "server_error",
            param: None,
            code: Some("engine_stopped"),
        }
        .into_response()
    }
}

async fn metrics(State(st): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
}

async fn models(State(st): State<Shared>, headers: HeaderMap) -> Response {
    let weights = st.chat.engine().weight_stats();
    let r = authorize(&st, &headers).map(|()| {
        let created = now_secs();
        let mut data = vec![json!({
            "id": st.model,
            "object": "model",
            "created": created,
            "owned_by": "qcluster",
            "max_model_len": st.chat.engine().limits().max_model_len,
            "quantization": weights.quantization.to_string(),
            "weight_bytes": weights.bytes,
            "f32_weight_bytes": weights.f32_bytes,
        })];
        // LoRA adapters as vLLM lists them: their own id, `parent` = the base model.
        data.extend(st.chat.engine().adapters().iter().map(|a| {
            json!({
                "id": a,
                "object": "model",
                "created": created,
                "owned_by": "qcluster",
                "parent": st.model,
                "max_model_len": st.chat.engine().limits().max_model_len,
            })
        }));
        axum::Json(json!({ "object": "list", "data": data }))
        .into_response()
    });
    finish(&st, r)
}

/// Which OpenAI object family a generation answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Completion,
}

/// One accepted generation, ready to be answered.
struct Job {
    api: Api,
    id: String,
    created: u64,
    model: String,
    generation: Generation,
    include_usage: bool,
    /// Text to put before the generated text (`echo`).
    prefix: String,
    /// Chat only, with the reasoning parser on.
    reasoning: Option<ReasoningSplitter>,
}

async fn chat_completions(State(st): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let (job, stream) = chat_job(&st, &headers, &read_body(body).await?).await?;
        respond(job, stream).await
    };
    finish(&st, r.await)
}

async fn chat_job(
    st: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Job, bool), ApiError> {
    authorize(st, headers)?;
    let req: ChatRequest = parse(body)?;
    let adapter = check_model(st, &req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let options = TemplateOptions {
        tools: req.tools.clone(),
        add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
        kwargs: req
            .chat_template_kwargs
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), minijinja::Value::from_serialize(v)))
            .collect(),
    };
    let prompt = st
        .chat
        .render(&req.messages, &options)
        .map_err(|e| match e {
            ChatError::Text(TextError::NoChatTemplate) => {
                ApiError::bad_request("this model has no chat template; use /v1/completions", None)
            }
            ChatError::Text(TextError::Encode(m)) => ApiError::internal(m),
            e => ApiError::bad_request(e.to_string(), Some("messages")),
        })?
        .ids;
    let params = req.sampling.to_params(
        prompt.len(),
        st.chat.engine().limits().max_model_len,
        st.chat.defaults(),
    )?;
    let generation = st
        .chat
        .engine()
        .submit_with(prompt, params, adapter)
        .map(Generation::new)?;
    Ok((
        Job {
            api: Api::Chat,
            id: new_id("chatcmpl"),
            created: now_secs(),
            model: served_name(st, adapter),
            generation,
            include_usage: req.sampling.include_usage(),
            prefix: String::new(),
            reasoning: st.reasoning_parser.then(ReasoningSplitter::default),
        },
        req.sampling.stream.unwrap_or(false),
    ))
}

async fn completions(State(st): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let (job, stream) = completion_job(&st, &headers, &read_body(body).await?).await?;
        respond(job, stream).await
    };
    finish(&st, r.await)
}

async fn completion_job(
    st: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Job, bool), ApiError> {
    authorize(st, headers)?;
    let req: CompletionRequest = parse(body)?;
    let adapter = check_model(st, &req.model)?;
    let (prompt, prompt_text) = match &req.prompt {
        Prompt::Text(t) => (
            st.chat
                .codec()
                .encode(t)
                .map_err(|e| ApiError::internal(e.to_string()))?,
            t.clone(),
        ),
        Prompt::Texts(v) if v.len() == 1 => (
            st.chat
                .codec()
                .encode(&v[0])
                .map_err(|e| ApiError::internal(e.to_string()))?,
            v[0].clone(),
        ),
        Prompt::Texts(_) => {
            return Err(ApiError::bad_request(
                "only one prompt per request is supported",
                Some("prompt"),
            ));
        }
        Prompt::Ids(ids) => (
            ids.clone(),
            st.chat.codec().decode(ids, false).unwrap_or_default(),
        ),
    };
    if prompt.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty", Some("prompt")));
    }
    let params = req.sampling.to_params(
        prompt.len(),
        st.chat.engine().limits().max_model_len,
        st.chat.defaults(),
    )?;
    let generation = st
        .chat
        .engine()
        .submit_with(prompt, params, adapter)
        .map(Generation::new)
        .map_err(|e| {
            let mut e = ApiError::from(e);
            if e.param == Some("messages") {
                e.param = Some("prompt");
            }
            e
        })?;
    Ok((
        Job {
            api: Api::Completion,
            id: new_id("cmpl"),
            created: now_secs(),
            model: served_name(st, adapter),
            generation,
            include_usage: req.sampling.include_usage(),
            prefix: if req.echo.unwrap_or(false) {
                prompt_text
            } else {
                String::new()
            },
            reasoning: None,
        },
        req.sampling.stream.unwrap_or(false),
    ))
}

fn usage(prompt: usize, completion: usize) -> Json {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

async fn respond(job: Job, stream: bool) -> Result<Response, ApiError> {
    if stream {
        Ok(sse(job))
    } else {
        collect(job).await
    }
}

/// Non-streaming answer: waits for the end of the generation.
async fn collect(job: Job) -> Result<Response, ApiError> {
    let done = job.generation.collect().await.map_err(|e| match e {
        ChatError::Aborted(m) => ApiError::internal(m),
        e => ApiError::internal(e.to_string()),
    })?;
    let text = format!("{}{}", job.prefix, done.text);
    let reason = done.finish_reason;
    let message = match &job.reasoning {
        Some(_) => {
            let sp = ReasoningSplitter::split(&text);
            let r = (!sp.reasoning.is_empty()).then_some(sp.reasoning);
            json!({"role": "assistant", "content": sp.content, "reasoning_content": r})
        }
        None => json!({"role": "assistant", "content": text}),
    };
    let choice = match job.api {
        Api::Chat => json!({
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": reason.as_str(),
        }),
        Api::Completion => json!({
            "index": 0,
            "text": text,
            "logprobs": null,
            "finish_reason": reason.as_str(),
        }),
    };
    let object = match job.api {
        Api::Chat => "chat.completion",
        Api::Completion => "text_completion",
    };
    Ok(axum::Json(json!({
        "id": job.id,
        "object": object,
        "created": job.created,
        "model": job.model,
        "choices": [choice],
        "usage": usage(done.prompt_tokens, done.completion_tokens),
    }))
    .into_response())
}

/// State of one SSE stream.
struct SseState {
    job: Job,
    out: VecDeque<Bytes>,
    done: bool,
}

impl SseState {
    fn event(&mut self, v: Json) {
        self.out.push_back(Bytes::from(format!("data: {v}\n\n")));
    }

    fn chunk(&mut self, delta_or_text: Json, finish: Option<&str>) {
        let j = &self.job;
        let (object, choice) = match j.api {
            Api::Chat => (
                "chat.completion.chunk",
                json!({"index": 0, "delta": delta_or_text, "logprobs": null, "finish_reason": finish}),
            ),
            Api::Completion => (
                "text_completion",
                json!({"index": 0, "text": delta_or_text, "logprobs": null, "finish_reason": finish}),
            ),
        };
        let v = json!({
            "id": j.id, "object": object, "created": j.created, "model": j.model, "choices": [choice],
        });
        self.event(v);
    }

    fn text(&mut self, t: String) {
        match self.job.api {
            Api::Chat => match self.job.reasoning.as_mut() {
                Some(sp) => {
                    let out = sp.push(&t);
                    self.split(out);
                }
                None => self.chunk(json!({"content": t}), None),
            },
            Api::Completion => self.chunk(json!(t), None),
        }
    }

    fn split(&mut self, out: Split) {
        if !out.reasoning.is_empty() {
            self.chunk(json!({"reasoning_content": out.reasoning}), None);
        }
        if !out.content.is_empty() {
            self.chunk(json!({"content": out.content}), None);
        }
    }

    fn on_event(&mut self, ev: Option<Event>) {
        match ev {
            Some(Event::Delta { text, .. }) => {
                if !text.is_empty() {
                    self.text(text);
                }
            }
            Some(Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
                error,
            }) => {
                if reason == FinishReason::Abort {
                    let e =
                        ApiError::internal(error.unwrap_or_else(|| "generation aborted".into()));
                    self.event(e.body());
                } else {
                    if let Some(out) = self.job.reasoning.as_mut().map(ReasoningSplitter::finish) {
                        self.split(out);
                    }
                    let empty = match self.job.api {
                        Api::Chat => json!({}),
                        Api::Completion => json!(""),
                    };
                    self.chunk(empty, Some(reason.as_str()));
                    if self.job.include_usage {
                        let j = &self.job;
                        let object = match j.api {
                            Api::Chat => "chat.completion.chunk",
                            Api::Completion => "text_completion",
                        };
                        let v = json!({
                            "id": j.id, "object": object, "created": j.created, "model": j.model,
                            "choices": [], "usage": usage(prompt_tokens, completion_tokens),
                        });
                        self.event(v);
                    }
                }
                self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                self.done = true;
            }
            None => {
                self.event(ApiError::internal("the engine stopped").body());
                self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                self.done = true;
            }
        }
    }
}

fn sse(job: Job) -> Response {
    let mut st = SseState {
        job,
        out: VecDeque::new(),
        done: false,
    };
    match st.job.api {
        Api::Chat => st.chunk(json!({"role": "assistant", "content": ""}), None),
        Api::Completion => {
            if !st.job.prefix.is_empty() {
                let p = st.job.prefix.clone();
                st.text(p);
            }
        }
    }
    let stream = futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(b) = st.out.pop_front() {
                return Some((Ok::<Bytes, Infallible>(b), st));
            }
            if st.done {
                return None;
            }
            let ev = st.job.generation.recv().await;
            st.on_event(ev);
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| ApiError::internal(e.to_string()).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> SamplingFields {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn generation_config_fills_what_the_request_leaves_out() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [1]}"#,
        )
        .unwrap();
        let d = GenerationDefaults::from_dir(dir.path());
        assert_eq!(d.temperature, Some(0.6));
        assert_eq!(d.top_k, Some(20));
        assert_eq!(d.repetition_penalty, None);
        let p = fields(r#"{"max_tokens": 3}"#)
            .to_params(5, 100, &d)
            .unwrap();
        assert_eq!((p.temperature, p.top_p, p.top_k), (0.6, 0.95, 20));
        assert_eq!(p.max_tokens, 3);
        let p = fields(r#"{"temperature": 0, "top_k": -1}"#)
            .to_params(5, 100, &d)
            .unwrap();
        assert_eq!((p.temperature, p.top_k, p.max_tokens), (0.0, 0, 95));
        let none = GenerationDefaults::from_dir(&dir.path().join("missing"));
        assert_eq!(none, GenerationDefaults::default());
        let p = fields("{}").to_params(5, 100, &none).unwrap();
        assert_eq!((p.temperature, p.top_p, p.top_k), (1.0, 1.0, 0));
    }

    #[test]
    fn stop_accepts_a_string_or_a_list() {
        let d = GenerationDefaults::default();
        let p = fields(r#"{"stop": "END"}"#).to_params(1, 10, &d).unwrap();
        assert_eq!(p.stop, vec!["END".to_string()]);
        let p = fields(r#"{"stop": ["a", "b"]}"#)
            .to_params(1, 10, &d)
            .unwrap();
        assert_eq!(p.stop.len(), 2);
    }
}
