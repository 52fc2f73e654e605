//! Server and engine metrics, rendered in the Prometheus text format (version 0.0.4).
//!
//! Counters only grow; gauges are set by the engine after every step; histograms use fixed buckets in seconds
//! (cumulative `_bucket{le=…}` lines, `_sum`, `_count`, as Prometheus expects).

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::WeightStats;

/// Latency buckets in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A fixed-bucket histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    inner: Mutex<HistState>,
}

#[derive(Debug, Default)]
struct HistState {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    /// Records one observation in seconds.
    pub fn observe(&self, secs: f64) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                s.counts[i] += 1;
            }
        }
        s.sum += secs;
        s.count += 1;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).count
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", s.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", s.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", s.sum, s.count);
    }
}

/// Everything `/metrics` shows.
#[derive(Debug, Default)]
pub struct Metrics {
    /// HTTP requests that reached a handler, successful or not.
    pub requests_total: AtomicU64,
    /// Requests answered with an error status.
    pub request_errors_total: AtomicU64,
    /// Sequences that finished (any reason).
    pub sequences_finished_total: AtomicU64,
    /// Sequences ended because their client went away.
    pub sequences_aborted_total: AtomicU64,
    /// Sequences preempted (KV blocks freed, recomputed later).
    pub preemptions_total: AtomicU64,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens_total: AtomicU64,
    /// Generated tokens.
    pub generation_tokens_total: AtomicU64,
    /// Engine steps run.
    pub engine_steps_total: AtomicU64,
    /// Requests waiting for admission.
    pub queue_depth: AtomicU64,
    /// Sequences in the running batch.
    pub running: AtomicU64,
    /// KV blocks owned by sequences.
    pub kv_blocks_in_use: AtomicU64,
    /// KV pool size.
    pub kv_blocks_total: AtomicU64,
    /// Bytes the model's weights take as held (quantized or not).
    pub weight_bytes: AtomicU64,
    /// Bytes the same weights take in f32.
    pub weight_f32_bytes: AtomicU64,
    /// The weights' quantization mode (`none`, `int8`, `int4`, `int4:G`), once a model is loaded.
    pub quantization: Mutex<String>,
    /// Arrival → first generated token.
    pub ttft: Histogram,
    /// Mean time per output token after the first, one observation per finished sequence.
    pub tpot: Histogram,
    /// Arrival → finish.
    pub e2e: Histogram,
}

impl Metrics {
    /// Records what the model's weights take.
    pub fn set_weights(&self, w: &WeightStats) {
        self.weight_bytes.store(w.bytes as u64, Ordering::Relaxed);
        self.weight_f32_bytes
            .store(w.f32_bytes as u64, Ordering::Relaxed);
        *self.quantization.lock().unwrap_or_else(|e| e.into_inner()) = w.quantization.to_string();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counters = [
            (
                "qserve_requests_total",
                "HTTP requests handled.",
                &self.requests_total,
            ),
            (
                "qserve_request_errors_total",
                "HTTP requests answered with an error.",
                &self.request_errors_total,
            ),
            (
                "qserve_sequences_finished_total",
                "Sequences finished.",
                &self.sequences_finished_total,
            ),
            (
                "qserve_sequences_aborted_total",
                "Sequences aborted by a client disconnect.",
                &self.sequences_aborted_total,
            ),
            (
                "qserve_preemptions_total",
                "Sequences preempted for lack of KV blocks.",
                &self.preemptions_total,
            ),
            (
                "qserve_prompt_tokens_total",
                "Prompt tokens admitted.",
                &self.prompt_tokens_total,
            ),
            (
                "qserve_generation_tokens_total",
                "Tokens generated.",
                &self.generation_tokens_total,
            ),
            (
                "qserve_engine_steps_total",
                "Engine steps.",
                &self.engine_steps_total,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                g(v)
            );
        }
        let gauges = [
            (
                "qserve_queue_depth",
                "Requests waiting for admission.",
                &self.queue_depth,
            ),
            (
                "qserve_running_sequences",
                "Sequences in the running batch.",
                &self.running,
            ),
            (
                "qserve_kv_blocks_in_use",
                "KV cache blocks owned by sequences.",
                &self.kv_blocks_in_use,
            ),
            (
                "qserve_kv_blocks_total",
                "KV cache blocks in the pool.",
                &self.kv_blocks_total,
            ),
            (
                "qserve_model_weight_bytes",
                "Bytes of the model weights as held (quantized or f32).",
                &self.weight_bytes,
            ),
            (
                "qserve_model_weight_f32_bytes",
                "Bytes the model weights would take in f32.",
                &self.weight_f32_bytes,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                g(v)
            );
        }
        let quant = self
            .quantization
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !quant.is_empty() {
            let _ = writeln!(
                out,
                "# HELP qserve_model_quantization_info Weight quantization of the served model.\n\
                 # TYPE qserve_model_quantization_info gauge\n\
                 qserve_model_quantization_info{{quantization=\"{quant}\"}} 1"
            );
        }
        self.ttft.render(
            &mut out,
            "qserve_time_to_first_token_seconds",
            "Time to first token.",
        );
        self.tpot.render(
            &mut out,
            "qserve_time_per_output_token_seconds",
            "Mean time per output token after the first.",
        );
        self.e2e.render(
            &mut out,
            "qserve_e2e_request_latency_seconds",
            "Arrival to finish.",
        );
        out
    }
}

/// Reads one unlabelled sample (`name value`) out of a Prometheus text page.
pub fn scrape(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
