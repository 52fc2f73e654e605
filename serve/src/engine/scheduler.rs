//! The engine core: request queue, continuous-batching scheduler and per-sequence generation state.
//!
//! A sequence's tokens are `all = prompt ++ output`; the first `computed` of them have K/V in the cache. Each
//! [`EngineCore::step`]:
//! 1. drops sequences whose client went away (their event receiver is closed) and frees their blocks;
//! 2. admits waiting requests, oldest first, while the running set has room and the cache has blocks for the
//!    request's whole current length (reserved at admission);
//! 3. schedules under the token budget `max_batch_tokens`: first one token for every decoding sequence
//!    (`all.len() − computed == 1`), then prefill chunks (`min(pending, budget left)`) in arrival order, so long
//!    prompts are split over steps and never stall running decodes;
//! 4. runs one batched forward over all chunks; every chunk that reaches the end of its known tokens yields the
//!    logits of a new token, which is sampled, detokenized, checked against EOS / stop strings / limits and sent;
//! 5. frees the blocks of finished sequences.
//!
//! When a decode needs a block and none is free, the most recently admitted other sequence is preempted: its
//! blocks are freed, `computed` drops to 0 and it goes back to the head of the queue with its output kept (it is
//! recomputed on readmission, vLLM's recompute preemption). A sequence's result never depends on what else is
//! batched with it (see [`super::model`]), so greedy outputs under batching equal one-at-a-time outputs.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::error::EngineError;
use super::kv::{BlockTable, KvCache, KvCacheConfig};
use super::model::{Chunk, InferenceModel, LogitRows};
use super::quant::{Quantization, WeightStats};
use super::sampling::{Sampler, SamplingParams};
use crate::metrics::Metrics;

/// Turns generated ids into text (for stop strings and streaming deltas).
pub trait Detokenizer: Send + Sync {
    /// Text of `ids`, special tokens skipped.
    fn decode(&self, ids: &[u32]) -> String;
}

/// What one forward gives a sequence: its last logits row, or the token the device already picked.
enum Picked {
    Logits(Vec<f32>),
    Token(u32),
}

/// Scheduler and cache settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineConfig {
    /// Paged KV cache sizes.
    pub kv: KvCacheConfig,
    /// Token budget of one step (decode tokens + prefill chunk tokens).
    pub max_batch_tokens: usize,
    /// Most sequences in the running batch.
    pub max_running: usize,
    /// Longest `prompt + output`; 0 means `max_position_embeddings` (capped by the cache size).
    pub max_model_len: usize,
    /// Memory budget of the KV pools on the CPU when `kv.num_blocks` is 0: the pool gets as many blocks as fit,
    /// but no more than `max_running` sequences of `max_model_len` (or `max_position_embeddings`) need.
    pub kv_cache_bytes: usize,
    /// On CUDA, when `kv.num_blocks` is 0: the KV pools get this fraction of the device memory that is free once
    /// the weights are loaded (the rest is left for activations, cuBLASLt workspaces and other processes), again
    /// capped at what `max_running` full-length sequences need. Ignored on the CPU; set `kv.num_blocks` to fix
    /// the pool size instead.
    pub gpu_kv_fraction: f64,
    /// Weight-only quantization of the linear layers ([`super::quant`]): an f32 model handed to
    /// [`EngineCore::new`] is quantized there; `None` runs the model as it is (f32, or already quantized by
    /// [`InferenceModel::load`]).
    pub quantization: Quantization,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            kv: KvCacheConfig::default(),
            max_batch_tokens: 512,
            max_running: 64,
            max_model_len: 0,
            kv_cache_bytes: 1 << 30,
            gpu_kv_fraction: 0.85,
            quantization: Quantization::None,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the model length.
    Length,
    /// The engine failed or preempted it for good.
    Abort,
}

impl FinishReason {
    /// OpenAI's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// What a request's receiver gets, in order: any number of `Delta`s, then one `Finished`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New tokens and the text they completed (text may lag tokens by a few bytes while a stop string or a
    /// UTF-8 sequence is undecided).
    Delta { tokens: Vec<u32>, text: String },
    /// The end.
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Set when `reason` is `Abort`.
        error: Option<String>,
    },
}

/// A generation request.
#[derive(Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub events: UnboundedSender<Event>,
    /// The LoRA adapter to generate with (`None`: the base model); see [`super::lora`].
    pub adapter: Option<super::lora::AdapterId>,
}

/// Limits a request is checked against before it is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    pub vocab_size: usize,
    pub max_model_len: usize,
}

impl EngineLimits {
    /// Rejects a request that can never be served.
    pub fn check(&self, prompt: &[u32], params: &SamplingParams) -> Result<(), EngineError> {
        params.validate().map_err(EngineError::InvalidRequest)?;
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {t} is out of the vocabulary ({})",
                self.vocab_size
            )));
        }
        if prompt.len() + params.max_tokens > self.max_model_len {
            return Err(EngineError::InvalidRequest(format!(
                "this model's maximum context length is {} tokens; the request has {} prompt tokens and \
                 max_tokens {}",
                self.max_model_len,
                prompt.len(),
                params.max_tokens
            )));
        }
        Ok(())
    }
}

struct Seq {
    /// The LoRA adapter this sequence runs with.
    adapter: Option<super::lora::AdapterId>,
    all: Vec<u32>,
    prompt_len: usize,
    computed: usize,
    table: BlockTable,
    sampler: Sampler,
    events: UnboundedSender<Event>,
    arrival: Instant,
    first_token: Option<Instant>,
    /// Visible output text (stop-truncated once finished).
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    /// Tokens generated but not yet sent in a `Delta`.
    unsent_tokens: Vec<u32>,
    finished: Option<FinishReason>,
}

impl Seq {
    fn output(&self) -> &[u32] {
        &self.all[self.prompt_len..]
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepStats {
    pub decode_tokens: usize,
    pub prefill_tokens: usize,
    pub finished: usize,
}

/// Single-threaded engine state (see module docs); [`super::Engine`] runs it on its own thread.
pub struct EngineCore {
    model: InferenceModel,
    cache: KvCache,
    config: EngineConfig,
    limits: EngineLimits,
    eos: Vec<u32>,
    detok: Option<Arc<dyn Detokenizer>>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    metrics: Arc<Metrics>,
}

impl EngineCore {
    /// An idle engine. `eos` ends generation unless a request sets `ignore_eos`. The model is quantized first
    /// when `config.quantization` asks for it (see [`InferenceModel::quantize`]); the weights' mode and bytes
    /// go to `metrics`.
    pub fn new(
        model: InferenceModel,
        mut config: EngineConfig,
        eos: Vec<u32>,
        detok: Option<Arc<dyn Detokenizer>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EngineError> {
        if config.max_batch_tokens == 0 || config.max_running == 0 {
            return Err(EngineError::InvalidConfig(
                "max_batch_tokens and max_running must be positive".into(),
            ));
        }
        if config.kv.block_size == 0 {
            return Err(EngineError::InvalidConfig(
                "kv.block_size must be positive".into(),
            ));
        }
        if config.kv.num_blocks == 0 {
            let c = model.config();
            let bytes_per_block = model.kv_bytes_per_block(config.kv.block_size);
            let budget = match qkernels::cuda::memory_info(&model.device())? {
                None => config.kv_cache_bytes,
                Some((free, _total)) => {
                    if !(config.gpu_kv_fraction > 0.0 && config.gpu_kv_fraction < 1.0) {
                        return Err(EngineError::InvalidConfig(format!(
                            "gpu_kv_fraction must be in (0, 1), got {}",
                            config.gpu_kv_fraction
                        )));
                    }
                    (free as f64 * config.gpu_kv_fraction) as usize
                }
            };
            let fit = budget / bytes_per_block.max(1);
            let longest = match config.max_model_len {
                0 => c.max_position_embeddings,
                n => n.min(c.max_position_embeddings),
            };
            let want = longest.div_ceil(config.kv.block_size) * config.max_running;
            config.kv.num_blocks = fit.min(want).max(1);
        }
        let model = model.quantize(config.quantization)?;
        config.quantization = model.quantization();
        metrics.set_weights(&model.weight_stats());
        let cache = model.new_cache(config.kv)?;
        let capacity = config.kv.block_size * config.kv.num_blocks;
        let mut max_len = model.config().max_position_embeddings.min(capacity);
        if config.max_model_len > 0 {
            max_len = max_len.min(config.max_model_len);
        }
        config.max_model_len = max_len;
        metrics
            .kv_blocks_total
            .store(cache.num_blocks() as u64, Ordering::Relaxed);
        let limits = EngineLimits {
            vocab_size: model.config().vocab_size,
            max_model_len: max_len,
        };
        Ok(EngineCore {
            model,
            cache,
            config,
            limits,
            eos,
            detok,
            waiting: VecDeque::new(),
            running: Vec::new(),
            metrics,
        })
    }

    /// The limits requests are checked against.
    pub fn limits(&self) -> EngineLimits {
        self.limits
    }

    /// Quantization mode and bytes of the model's weights.
    pub fn weight_stats(&self) -> WeightStats {
        self.model.weight_stats()
    }

    /// The effective settings (`max_model_len` resolved).
    pub fn config(&self) -> EngineConfig {
        self.config
    }

    /// The model (its config, weights and served adapters).
    pub fn model(&self) -> &InferenceModel {
        &self.model
    }

    /// Queues a request.
    pub fn add(&mut self, req: Request) -> Result<(), EngineError> {
        self.limits.check(&req.prompt, &req.params)?;
        if let Some(id) = req.adapter
            && id >= self.model.adapters().len()
        {
            return Err(EngineError::InvalidRequest(format!("no LoRA adapter with id {id}")));
        }
        self.metrics
            .prompt_tokens_total
            .fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
        self.waiting.push_back(Seq {
            adapter: req.adapter,
            prompt_len: req.prompt.len(),
            all: req.prompt,
            computed: 0,
            table: BlockTable::default(),
            sampler: Sampler::new(req.params),
            events: req.events,
            arrival: Instant::now(),
            first_token: None,
            text: String::new(),
            sent: 0,
            unsent_tokens: Vec::new(),
            finished: None,
        });
        self.publish();
        Ok(())
    }

    /// True while any request is queued or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// KV blocks owned by sequences.
    pub fn blocks_in_use(&self) -> usize {
        self.cache.blocks_in_use()
    }

    /// Ends every sequence with `Abort` (after an engine failure) and frees all blocks.
    pub fn abort_all(&mut self, why: &str) {
        let seqs: Vec<Seq> = self
            .running
            .drain(..)
            .chain(self.waiting.drain(..))
            .collect();
        for mut s in seqs {
            self.cache.release(&mut s.table);
            let _ = s.events.send(Event::Finished {
                reason: FinishReason::Abort,
                prompt_tokens: s.prompt_len,
                completion_tokens: s.all.len() - s.prompt_len,
                error: Some(why.to_string()),
            });
        }
        self.publish();
    }

    fn publish(&self) {
        let m = &self.metrics;
        m.queue_depth
            .store(self.waiting.len() as u64, Ordering::Relaxed);
        m.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        m.kv_blocks_in_use
            .store(self.cache.blocks_in_use() as u64, Ordering::Relaxed);
    }

    /// One scheduling + forward + sampling round (see module docs).
    pub fn step(&mut self) -> Result<StepStats, EngineError> {
        self.drop_disconnected();
        self.admit();
        let plan = self.schedule();
        let mut stats = StepStats::default();
        if !plan.is_empty() {
            let chunks: Vec<Chunk<'_>> = plan
                .iter()
                .map(|&(i, n)| {
                    let s = &self.running[i];
                    Chunk {
                        tokens: &s.all[s.computed..s.computed + n],
                        start: s.computed,
                        table: &s.table,
                        adapter: s.adapter,
                    }
                })
                .collect();
            // When every row that samples now is plain greedy, the argmax runs on the device and only the ids
            // come back (the logits of a large batch are `rows × vocab`).
            let greedy = plan.iter().all(|&(i, n)| {
                let s = &self.running[i];
                s.computed + n < s.all.len() || s.sampler.is_plain_greedy()
            });
            let picked: Vec<Picked> = if greedy {
                self.model
                    .forward_greedy(&mut self.cache, &chunks)?
                    .into_iter()
                    .map(Picked::Token)
                    .collect()
            } else {
                self.model
                    .forward(&mut self.cache, &chunks, LogitRows::Last)?
                    .into_iter()
                    .map(Picked::Logits)
                    .collect()
            };
            for (&(i, n), pick) in plan.iter().zip(picked) {
                let s = &mut self.running[i];
                if s.all.len() - s.computed == 1 {
                    stats.decode_tokens += 1;
                } else {
                    stats.prefill_tokens += n;
                }
                s.computed += n;
                if s.computed == s.all.len() {
                    match pick {
                        Picked::Logits(mut row) => self.on_logits(i, &mut row),
                        Picked::Token(token) => {
                            self.running[i].sampler.record(token);
                            self.on_token(i, token);
                        }
                    }
                }
            }
        }
        stats.finished = self.retire();
        self.metrics
            .engine_steps_total
            .fetch_add(1, Ordering::Relaxed);
        self.publish();
        Ok(stats)
    }

    fn drop_disconnected(&mut self) {
        let mut aborted = 0;
        for s in self.running.iter_mut().chain(self.waiting.iter_mut()) {
            if s.events.is_closed() {
                self.cache.release(&mut s.table);
                aborted += 1;
            }
        }
        if aborted > 0 {
            self.running.retain(|s| !s.events.is_closed());
            self.waiting.retain(|s| !s.events.is_closed());
            self.metrics
                .sequences_aborted_total
                .fetch_add(aborted, Ordering::Relaxed);
        }
    }

    fn admit(&mut self) {
        while self.running.len() < self.config.max_running {
            let Some(s) = self.waiting.front_mut() else {
                break;
            };
            let need = self.cache.blocks_for(s.all.len()) - s.table.len();
            if need > self.cache.free_blocks() {
                break;
            }
            let len = s.all.len();
            if self.cache.reserve(&mut s.table, len).is_err() {
                break;
            }
            let s = self.waiting.pop_front().expect("front exists");
            self.running.push(s);
        }
    }

    /// `(running index, tokens)` to run this step.
    fn schedule(&mut self) -> Vec<(usize, usize)> {
        let mut budget = self.config.max_batch_tokens;
        let mut plan: Vec<(usize, usize)> = Vec::new();
        // Decodes first, then prefills; each group in admission order.
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| {
            let s = &self.running[i];
            (s.all.len() - s.computed != 1, i)
        });
        let mut preempted: Vec<usize> = Vec::new();
        for i in order {
            if budget == 0 {
                break;
            }
            if preempted.contains(&i) {
                continue;
            }
            let s = &self.running[i];
            let n = (s.all.len() - s.computed).min(budget);
            if n == 0 {
                continue;
            }
            let need = s.computed + n;
            loop {
                let s = &mut self.running[i];
                if self.cache.reserve(&mut s.table, need).is_ok() {
                    plan.push((i, n));
                    budget -= n;
                    break;
                }
                // Preempt the latest other running sequence that is not yet preempted.
                let victim = (0..self.running.len()).rev().find(|&j| {
                    j != i && !preempted.contains(&j) && !self.running[j].table.is_empty()
                });
                let Some(j) = victim else {
                    // Nothing left to free: this one waits (its blocks go back too).
                    preempted.push(i);
                    break;
                };
                if let Some(pos) = plan.iter().position(|&(k, _)| k == j) {
                    budget += plan.remove(pos).1;
                }
                preempted.push(j);
                let v = &mut self.running[j];
                self.cache.release(&mut v.table);
                v.computed = 0;
            }
        }
        if !preempted.is_empty() {
            for &i in &preempted {
                let s = &mut self.running[i];
                self.cache.release(&mut s.table);
                s.computed = 0;
            }
            self.metrics
                .preemptions_total
                .fetch_add(preempted.len() as u64, Ordering::Relaxed);
            // Move them back to the queue head (oldest first) and remap the plan's indices.
            preempted.sort_unstable();
            let mut moved = Vec::new();
            for &i in preempted.iter().rev() {
                moved.push(self.running.remove(i));
            }
            for s in moved {
                self.waiting.push_front(s);
            }
            for (i, _) in plan.iter_mut() {
                *i -= preempted.iter().filter(|&&p| p < *i).count();
            }
        }
        plan
    }

    /// Samples the next token of running sequence `i` from its last logits and applies the stop rules.
    fn on_logits(&mut self, i: usize, logits: &mut [f32]) {
        let s = &mut self.running[i];
        let token = s
            .sampler
            .sample(logits, &s.all[..s.prompt_len], &s.all[s.prompt_len..]);
        self.on_token(i, token);
    }

    /// Appends the sampled `token` to running sequence `i` and applies the stop rules.
    fn on_token(&mut self, i: usize, token: u32) {
        let max_len = self.limits.max_model_len;
        let s = &mut self.running[i];
        s.all.push(token);
        if s.first_token.is_none() {
            let now = Instant::now();
            s.first_token = Some(now);
            self.metrics
                .ttft
                .observe(now.duration_since(s.arrival).as_secs_f64());
        }
        self.metrics
            .generation_tokens_total
            .fetch_add(1, Ordering::Relaxed);
        let params = s.sampler.params();
        let is_eos = (!params.ignore_eos && self.eos.contains(&token))
            || params.stop_token_ids.contains(&token);
        let n_out = s.all.len() - s.prompt_len;
        if is_eos {
            s.finished = Some(FinishReason::Stop);
            // The EOS token is counted but its text is not shown.
            s.unsent_tokens.push(token);
            flush(s, None);
            return;
        }
        s.unsent_tokens.push(token);
        let Some(detok) = &self.detok else {
            if n_out >= params.max_tokens || s.all.len() >= max_len {
                s.finished = Some(FinishReason::Length);
            }
            flush(s, None);
            return;
        };
        let full = detok.decode(s.output());
        let stop = params
            .stop
            .iter()
            .filter(|st| !st.is_empty())
            .filter_map(|st| full.find(st.as_str()))
            .min();
        if let Some(at) = stop {
            s.text = full[..at].to_string();
            s.finished = Some(FinishReason::Stop);
            flush(s, None);
            return;
        }
        s.text = full;
        if n_out >= params.max_tokens || s.all.len() >= max_len {
            s.finished = Some(FinishReason::Length);
            flush(s, None);
            return;
        }
        let upto = s.text.len() - holdback(&s.text, &s.sampler.params().stop);
        flush(s, Some(upto));
    }

    /// Removes finished sequences, frees their blocks and reports them (gauges are published before the
    /// `Finished` events go out, so a client that saw its answer also sees its blocks freed in `/metrics`).
    fn retire(&mut self) -> usize {
        let mut done = Vec::new();
        let mut k = 0;
        while k < self.running.len() {
            match self.running[k].finished {
                Some(reason) => {
                    let mut s = self.running.remove(k);
                    self.cache.release(&mut s.table);
                    done.push((s, reason));
                }
                None => k += 1,
            }
        }
        if done.is_empty() {
            return 0;
        }
        self.publish();
        let now = Instant::now();
        for (s, reason) in &done {
            let n_out = s.all.len() - s.prompt_len;
            if let (Some(first), true) = (s.first_token, n_out > 1) {
                self.metrics
                    .tpot
                    .observe(now.duration_since(first).as_secs_f64() / (n_out - 1) as f64);
            }
            self.metrics
                .e2e
                .observe(now.duration_since(s.arrival).as_secs_f64());
            self.metrics
                .sequences_finished_total
                .fetch_add(1, Ordering::Relaxed);
            let _ = s.events.send(Event::Finished {
                reason: *reason,
                prompt_tokens: s.prompt_len,
                completion_tokens: n_out,
                error: None,
            });
        }
        done.len()
    }
}

/// Sends the unsent tokens and the text up to byte `upto` (all of it when `None`).
fn flush(s: &mut Seq, upto: Option<usize>) {
    let upto = upto.unwrap_or(s.text.len()).max(s.sent);
    // Byte-level decoding only ever extends the text past what was sent (incomplete UTF-8 is held back);
    // should a tokenizer rewrite earlier text anyway, send nothing rather than panic the engine thread.
    let text = s.text.get(s.sent..upto).unwrap_or_default().to_string();
    s.sent = upto;
    let tokens = std::mem::take(&mut s.unsent_tokens);
    if tokens.is_empty() && text.is_empty() {
        return;
    }
    let _ = s.events.send(Event::Delta { tokens, text });
}

/// Bytes at the end of `text` that must be held back: an incomplete UTF-8 sequence (decoded as U+FFFD) or a
/// suffix that could still grow into a stop string.
pub fn holdback(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    if text.ends_with('\u{FFFD}') {
        let trimmed = text.trim_end_matches('\u{FFFD}');
        hold = text.len() - trimmed.len();
    }
    for st in stops {
        for k in (1..st.len()).rev() {
            if st.is_char_boundary(k) && text.ends_with(&st[..k]) {
                hold = hold.max(k);
                break;
            }
        }
    }
    // Keep the cut on a char boundary.
    let mut cut = text.len().saturating_sub(hold);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.len() - cut
}

#[cfg(test)]
mod tests {
    use super::holdback;

    #[test]
    fn holds_back_stop_prefixes_and_broken_utf8() {
        let stops = vec!["END".to_string()];
        assert_eq!(holdback("abc EN", &stops), 2);
        assert_eq!(holdback("abc E", &stops), 1);
        assert_eq!(holdback("abc", &stops), 0);
        assert_eq!(holdback("ab\u{FFFD}", &[]), 3);
    }
}
