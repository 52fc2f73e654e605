//! `qserve`: the built-in inference worker (DESIGN.md §5).
//!
//! - [`engine`]: Qwen3 / Qwen3-MoE inference on `qkernels` ops with a paged KV cache, continuous batching with
//!   chunked prefill under a token budget, and sampling;
//! - [`text`]: `qtext::TextCodec` re-exported (`tokenizer.json` through the `tokenizers` crate and the model's
//!   Jinja `chat_template` through minijinja, rendered as transformers renders it), shared with training;
//! - [`chat`]: in-process chat turns ([`chat::ChatEngine`]: messages → chat template → engine → answer), shared by
//!   the HTTP server and `qctl infer`;
//! - [`http`]: the OpenAI-compatible axum server ([`http::serve`]);
//! - [`reasoning`]: the opt-in Qwen3 `<think>` parser (`reasoning_content`);
//! - [`eval`]: token-level perplexity through the engine's forward (the quality cost of quantization);
//! - [`metrics`]: counters, gauges and latency histograms behind `/metrics`.

pub mod chat;
pub mod engine;
pub mod eval;
pub mod http;
pub mod metrics;
pub mod reasoning;
pub mod text;

pub use http::{ServeConfig, ServeError, ServerHandle, serve};
