//! The inference engine: Qwen3 forward over a paged KV cache ([`model`], [`kv`]), weight-only int8/int4
//! quantization of the linear layers ([`quant`]), continuous batching ([`scheduler`]), sampling
//! ([`sampling`]), and [`Engine`], which runs an [`EngineCore`] on its own OS thread.
//!
//! Threading: the HTTP handlers (tokio tasks) call [`Engine::submit`], which checks the request against the
//! engine's limits, sends it over a channel and returns the receiver of its [`Event`]s. The engine thread
//! blocks while idle, otherwise drains new requests and runs one [`EngineCore::step`] after another. Dropping
//! the receiver (a client that disconnects) aborts the sequence at the next step and frees its KV blocks.

pub mod error;
pub mod kv;
pub mod lora;
pub mod model;
pub mod quant;
pub mod sampling;
pub mod scheduler;

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

pub use error::EngineError;
pub use kv::{BlockAllocator, BlockTable, KvCache, KvCacheConfig};
pub use model::{Chunk, InferenceModel, LogitRows};
pub use quant::{Quantization, WeightStats};
pub use sampling::{Sampler, SamplingParams};
pub use scheduler::{
    Detokenizer, EngineConfig, EngineCore, EngineLimits, Event, FinishReason, Request, StepStats,
};

use crate::metrics::Metrics;

enum Command {
    Add(Request),
    Shutdown,
}

/// Handle to the engine thread. Cloning shares the thread; it stops when [`Engine::shutdown`] is called or
/// every handle is dropped.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Command>,
    limits: EngineLimits,
    /// Names of the served LoRA adapters, by [`lora::AdapterId`].
    adapters: Arc<Vec<String>>,
    weights: WeightStats,
    metrics: Arc<Metrics>,
    thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl Engine {
    /// Starts the engine thread.
    pub fn start(core: EngineCore, metrics: Arc<Metrics>) -> Engine {
        let (tx, rx) = mpsc::channel();
        let limits = core.limits();
        let weights = core.weight_stats();
        let adapters = Arc::new(core.model().adapters().list().map(|(n, _)| n.to_string()).collect());
        let thread = std::thread::Builder::new()
            .name("qserve-engine".into())
            .spawn(move || run(core, rx))
            .expect("spawn engine thread");
        Engine {
            tx,
            limits,
            adapters,
            weights,
            metrics,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        }
    }

    /// The limits requests are checked against.
    pub fn limits(&self) -> EngineLimits {
        self.limits
    }

    /// Quantization mode and bytes of the model's weights.
    pub fn weight_stats(&self) -> WeightStats {
        self.weights
    }

    /// Shared metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The names of the served LoRA adapters (index = [`lora::AdapterId`]).
    pub fn adapters(&self) -> &[String] {
        &self.adapters
    }

    /// Queues a generation on the base model; the receiver gets its [`Event`]s.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<UnboundedReceiver<Event>, EngineError> {
        self.submit_with(prompt, params, None)
    }

    /// Queues a generation with LoRA adapter `adapter` (`None`: the base model).
    pub fn submit_with(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        adapter: Option<lora::AdapterId>,
    ) -> Result<UnboundedReceiver<Event>, EngineError> {
        self.limits.check(&prompt, &params)?;
        if adapter.is_some_and(|id| id >= self.adapters.len()) {
            return Err(EngineError::InvalidRequest(format!("no LoRA adapter with id {adapter:?}")));
        }
        let (events, rx) = unbounded_channel();
        self.tx
            .send(Command::Add(Request {
                prompt,
                params,
                events,
                adapter,
            }))
            .map_err(|_| EngineError::Stopped)?;
        Ok(rx)
    }

    /// False once the engine thread has exited (shutdown, or a panic).
    pub fn is_running(&self) -> bool {
        self.thread
            .lock()
            .ok()
            .is_some_and(|g| g.as_ref().is_some_and(|h| !h.is_finished()))
    }

    /// Stops the thread after aborting what is in flight, and waits for it.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
        let handle = self.thread.lock().ok().and_then(|mut g| g.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

fn run(mut core: EngineCore, rx: mpsc::Receiver<Command>) {
    loop {
        // Block while idle; otherwise take whatever arrived and keep stepping.
        let first = if core.has_work() {
            rx.try_recv().ok()
        } else {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        };
        let mut cmds: Vec<Command> = first.into_iter().collect();
        cmds.extend(rx.try_iter());
        for c in cmds {
            match c {
                Command::Add(req) => {
                    let events = req.events.clone();
                    if let Err(e) = core.add(req) {
                        let _ = events.send(Event::Finished {
                            reason: FinishReason::Abort,
                            prompt_tokens: 0,
                            completion_tokens: 0,
                            error: Some(e.to_string()),
                        });
                    }
                }
                Command::Shutdown => {
                    core.abort_all("the server is shutting down");
                    return;
                }
            }
        }
        if core.has_work()
            && let Err(e) = core.step()
        {
            tracing::error!(error = %e, "engine step failed; aborting all sequences");
            core.abort_all(&e.to_string());
        }
    }
}
