//! Quality measurements through the serving engine's own forward: token-level perplexity of a token stream.
//!
//! Teacher forcing over windows of `context` tokens that overlap by one: window `k` is
//! `tokens[k·(L−1) .. k·(L−1) + L]` with `L = context`, run as one prefill chunk through
//! [`InferenceModel::forward`] (so the quantized kernels are what is measured), and its logits row `i`
//! predicts token `i + 1` of the window. Every token but the first is predicted exactly once, each with
//! between 1 and `L − 1` tokens of context (the context restarts at every window, as in HF's strided
//! perplexity with stride `L − 1`).
//!
//! `NLL = −(1/N) Σ_t log softmax(logits_{t−1})[tokens_t]` over the `N = len − 1` predicted tokens (log-softmax
//! in f64), `perplexity = exp(NLL)`. Also reported: how often the arg-max of a row is the next token, and
//! ([`top1_agreement`]) how often two models' arg-maxes agree on the same windows, i.e. the greedy choice of a
//! quantized model after the same history as the f32 one.

use crate::engine::{BlockTable, Chunk, EngineError, InferenceModel, KvCacheConfig, LogitRows};

/// Result of [`perplexity`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    /// Tokens predicted (`len − 1`).
    pub predicted: usize,
    /// `Σ −log p(token | context)` in nats.
    pub nll_sum: f64,
    /// Predictions whose arg-max was the actual next token.
    pub top1_hits: usize,
}

impl Perplexity {
    /// Mean negative log-likelihood per predicted token (nats).
    pub fn mean_nll(&self) -> f64 {
        self.nll_sum / self.predicted.max(1) as f64
    }

    /// `exp(mean NLL)`.
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }

    /// Fraction of predictions whose arg-max was right.
    pub fn top1_accuracy(&self) -> f64 {
        self.top1_hits as f64 / self.predicted.max(1) as f64
    }
}

/// Perplexity of `tokens` under `model`, teacher-forced in windows of `context` tokens (see module docs).
pub fn perplexity(
    model: &InferenceModel,
    tokens: &[u32],
    context: usize,
) -> Result<Perplexity, EngineError> {
    let mut out = Perplexity {
        predicted: 0,
        nll_sum: 0.0,
        top1_hits: 0,
    };
    teacher_forced(model, tokens, context, |row, next| {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + row.iter().map(|&l| (l as f64 - m).exp()).sum::<f64>().ln();
        out.nll_sum += lse - row[next as usize] as f64;
        out.top1_hits += usize::from(argmax(row) == next);
        out.predicted += 1;
    })?;
    Ok(out)
}

/// How often `model`'s arg-max equals `reference`'s on the same teacher-forced windows of `tokens` (the
/// greedy choice each would make after the same history): `(agreeing positions, positions)`.
pub fn top1_agreement(
    reference: &InferenceModel,
    model: &InferenceModel,
    tokens: &[u32],
    context: usize,
) -> Result<(usize, usize), EngineError> {
    let mut want = Vec::new();
    teacher_forced(reference, tokens, context, |row, _| want.push(argmax(row)))?;
    let mut i = 0;
    let mut same = 0;
    teacher_forced(model, tokens, context, |row, _| {
        same += usize::from(want.get(i) == Some(&argmax(row)));
        i += 1;
    })?;
    Ok((same, want.len()))
}

/// Index of the largest logit (the first of equal ones).
fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &l)| if l > b.1 { (i, l) } else { b },
        )
        .0 as u32
}

/// Runs the windows of the module docs and calls `f(logits row, next token)` for every predicted token in
/// order.
fn teacher_forced(
    model: &InferenceModel,
    tokens: &[u32],
    context: usize,
    mut f: impl FnMut(&[f32], u32),
) -> Result<(), EngineError> {
    if context < 2 {
        return Err(EngineError::InvalidRequest(format!(
            "perplexity needs a context of at least 2 tokens, got {context}"
        )));
    }
    if tokens.len() < 2 {
        return Err(EngineError::InvalidRequest(format!(
            "perplexity needs at least 2 tokens, got {}",
            tokens.len()
        )));
    }
    let max = model.config().max_position_embeddings;
    if context > max {
        return Err(EngineError::InvalidRequest(format!(
            "context {context} is longer than the model's max_position_embeddings ({max})"
        )));
    }
    let kv = KvCacheConfig {
        block_size: 16,
        num_blocks: context.div_ceil(16),
    };
    let mut cache = model.new_cache(kv)?;
    let mut start = 0;
    while start + 1 < tokens.len() {
        let window = &tokens[start..(start + context).min(tokens.len())];
        let mut table = BlockTable::default();
        cache.reserve(&mut table, window.len())?;
        let rows = model.forward(
            &mut cache,
            &[Chunk {
                tokens: window,
                start: 0,
                table: &table,
                adapter: None,
            }],
            LogitRows::All,
        );
        cache.release(&mut table);
        for (row, &next) in rows?.iter().zip(&window[1..]) {
            f(row, next);
        }
        start += context - 1;
    }
    Ok(())
}
