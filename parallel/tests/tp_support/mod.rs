//! Shared helpers of the tensor/sequence/data-parallel parity tests: the full model from a fixture directory, a
//! deterministic batch, an in-process world of thread ranks, norm-relative errors and the assertions built on them
//! (parameters close, runs bit-identical), and the host clip + AdamW step of the single-rank reference runs.

#![allow(dead_code)]

use std::path::PathBuf;

use qkernels::Device;
use qparallel::comm::CpuCommunicator;
use qparallel::dims::{ParallelConfig, ParallelDims};
use qparallel::model::{Batch, NamedTensors, Qwen3Model};
use qparallel::optim::{AdamW, ParamSlot, clip_grad_norm, decays};
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

/// Gradients by name as host vectors, in name order.
pub fn host_grads(grads: &NamedTensors) -> Vec<(String, Vec<f32>)> {
    grads
        .iter()
        .map(|(n, t)| (n.clone(), t.to_vec_f32().unwrap()))
        .collect()
}

/// Clips `grads` in place to the global norm `max_norm`; the norm before clipping.
pub fn clip(grads: &mut [(String, Vec<f32>)], max_norm: f64) -> f64 {
    let mut views: Vec<&mut [f32]> = grads.iter_mut().map(|(_, g)| g.as_mut_slice()).collect();
    clip_grad_norm(&mut views, max_norm)
}

/// One single-rank host AdamW step of `model` with gradients by name (weight decay `wd` on the shapes that decay).
pub fn adamw_step(
    model: &mut Qwen3Model,
    opt: &mut AdamW,
    lr: f64,
    wd: f64,
    grads: &[(String, Vec<f32>)],
) {
    let mut params: Vec<(String, Vec<usize>, Vec<f32>)> = model
        .params
        .named()
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec(), t.to_vec_f32().unwrap()))
        .collect();
    let mut slots: Vec<ParamSlot<'_>> = params
        .iter_mut()
        .map(|(n, shape, p)| ParamSlot {
            name: n.as_str(),
            param: p.as_mut_slice(),
            grad: grads.iter().find(|(gn, _)| gn == n).unwrap().1.as_slice(),
            weight_decay: if decays(shape) { wd } else { 0.0 },
        })
        .collect();
    opt.step(lr, &mut slots).unwrap();
    drop(slots);
    let mut k = 0;
    model.params.visit_mut(&mut |_, t| {
        let (_, shape, data) = &params[k];
        *t = qkernels::Tensor::from_f32(data.clone(), shape, &t.device()).unwrap();
        k += 1;
    });
}

/// Asserts that every parameter of `got` is within `tol` ([`rel_err`]) of the one of its name in `want`, printing
/// the worst (`what` names the run in the messages).
pub fn assert_params_close(what: &str, got: &NamedTensors, want: &NamedTensors, tol: f64) {
    let mut worst = (0.0f64, String::new());
    for (n, p) in got {
        let e = rel_err(&p.to_vec_f32().unwrap(), &want[n].to_vec_f32().unwrap());
        if e > worst.0 {
            worst = (e, n.clone());
        }
    }
    println!(
        "{what}: final parameters, worst rel err {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(
        worst.0 < tol,
        "{what}: parameter {} rel err {:.2e}",
        worst.1,
        worst.0
    );
}

/// Asserts that two runs' `(loss, gradients)` are bit-identical (on `rank`, named in the message).
pub fn assert_bit_identical(rank: usize, a: (f64, &NamedTensors), b: (f64, &NamedTensors)) {
    assert_eq!(a.0.to_bits(), b.0.to_bits(), "rank {rank}: loss");
    for (name, g) in a.1 {
        assert_eq!(
            g.to_vec_f32().unwrap(),
            b.1[name].to_vec_f32().unwrap(),
            "rank {rank}: {name}"
        );
    }
}
