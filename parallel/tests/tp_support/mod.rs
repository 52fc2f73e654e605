//! Shared helpers of the tensor/sequence/data-parallel parity tests: the full model from a fixture directory, a
//! deterministic batch, an in-process world of thread ranks, and norm-relative errors.

#![allow(dead_code)]

use std::path::PathBuf;

use qkernels::Device;
use qparallel::comm::CpuCommunicator;
use qparallel::dims::{ParallelConfig, ParallelDims};
use qparallel::model::{Batch, Qwen3Model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A parallel layout of the parity matrix.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub dp: usize,
    pub tp: usize,
    pub sp: bool,
}

impl Layout {
    pub const fn new(dp: usize, tp: usize, sp: bool) -> Self {
        Layout { dp, tp, sp }
    }

    pub fn world(&self) -> usize {
        self.dp * self.tp
    }

    pub fn dims(&self) -> ParallelDims {
        ParallelDims::new(
            self.world(),
            ParallelConfig {
                tp: self.tp,
                sp: self.sp,
                ..Default::default()
            },
        )
        .unwrap()
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dp={} tp={}{}",
            self.dp,
            self.tp,
            if self.sp { "+sp" } else { "" }
        )
    }
}

/// The full model of a golden fixture (`tests/fixtures/<name>`: HF config + safetensors).
pub fn fixture_model(name: &str) -> Qwen3Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    Qwen3Model::from_hf_dir(&dir, Device::Cpu).unwrap()
}

/// Two rows of 16 tokens: row 0 packs two samples (9 + 7 tokens), row 1 holds one; loss weights in [0.5, 1.5)
/// so that the global normalisation matters. Deterministic in `seed`.
pub fn batch(vocab: usize, seed: u64) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed);
    let (rows, seq) = (2, 16);
    let ids: Vec<u32> = (0..rows * seq)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    let seg: Vec<u32> = (0..seq)
        .map(|t| u32::from(t >= 9))
        .chain(std::iter::repeat_n(5, seq))
        .collect();
    let scale: Vec<f32> = (0..rows * seq).map(|_| 0.5 + rng.random::<f32>()).collect();
    Batch::packed(ids, seg, rows, seq)
        .unwrap()
        .scale_loss_weights(&scale)
        .unwrap()
}

/// Runs `f(rank, world_communicator)` on `n` thread ranks and returns the results by rank.
pub fn run_ranks<R: Send>(n: usize, f: impl Fn(usize, CpuCommunicator) -> R + Sync) -> Vec<R> {
    let comms = CpuCommunicator::thread_group(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, c)| {
                let f = &f;
                s.spawn(move || f(rank, c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// `‖a − b‖ / ‖b‖` (absolute `‖a‖` when `b` is all zeros).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    if n == 0.0 { d } else { d / n }
}

/// `|a − b| / |b|`.
pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}
