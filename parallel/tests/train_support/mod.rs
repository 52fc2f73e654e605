//! Shared helpers of the training-loop tests (`train_loop`, `distributed_train`, `lora`): a learnable synthetic
//! corpus, an observer that stops a run after a step, and the metrics file read back.

#![allow(dead_code)]

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use qparallel::train::{METRICS_FILE, StepMetrics, TrainObserver};

/// A learnable corpus at `dir/corpus.jsonl`: `docs` documents that count up from a random start by a step of 1, 2
/// or 3 (mod 64, offset 10), `20 + (0..len_spread)` tokens each, as `{"input_ids": …}` lines. Deterministic in
/// `seed`.
pub fn write_corpus(dir: &Path, docs: usize, seed: u64, len_spread: u32) -> PathBuf {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let mut text = String::new();
    for _ in 0..docs {
        let (start, step, len) = (next() % 64, 1 + next() % 3, 20 + next() % len_spread);
        let ids: Vec<String> = (0..len)
            .map(|i| (10 + (start + i * step) % 64).to_string())
            .collect();
        text.push_str(&format!("{{\"input_ids\": [{}]}}\n", ids.join(", ")));
    }
    let path = dir.join("corpus.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

/// Stops the run after a given step (in a distributed run on rank 0; the decision reaches every rank).
pub struct StopAfter(pub u64);

impl TrainObserver for StopAfter {
    fn on_step(&mut self, m: &StepMetrics) -> ControlFlow<()> {
        if m.step == self.0 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// The step metrics a run wrote to its output directory, in order.
pub fn read_metrics(out: &Path) -> Vec<StepMetrics> {
    std::fs::read_to_string(out.join(METRICS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
