//! SFT data against the model: packed rows give the same loss and gradients as the same samples unpacked
//! (right-padded), and an SFT run trains end to end through `run_training`.

use std::path::{Path, PathBuf};

use qkernels::Device;
use qparallel::data::{
    Dataset, LossScale, SftDataset, SftLoadOptions, SftOptions, SftSample, TextCodec,
};
use qparallel::model::{Batch, ModelConfig, Qwen3Model};
use qparallel::train::{ModelSource, NoProgress, TrainConfig, run_training};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/models/qwen3-tiny-chat")
}

fn model() -> Qwen3Model {
    let cfg = ModelConfig::from_file(model_dir().join("config.json")).unwrap();
    Qwen3Model::random(cfg, 11, 0.05, Device::Cpu).unwrap()
}

fn conversations(n: usize) -> String {
    let words = [
        "alpha", "beta", "gamma", "delta", "你好", "世界", "seven", "eight",
    ];
    (0..n)
        .map(|i| {
            let q: Vec<&str> = (0..1 + i % 4)
                .map(|j| words[(i + j) % words.len()])
                .collect();
            let a: Vec<&str> = (0..2 + (i * 5) % 11)
                .map(|j| words[(i * 3 + j) % words.len()])
                .collect();
            let mut messages = vec![
                serde_json::json!({"role": "user", "content": q.join(" ")}),
                serde_json::json!({"role": "assistant", "content": a.join(" ")}),
            ];
            if i % 3 == 0 {
                messages.push(serde_json::json!({"role": "user", "content": "and then?"}));
                messages
                    .push(serde_json::json!({"role": "assistant", "content": a[..2].join(" ")}));
            }
            serde_json::json!({ "messages": messages }).to_string() + "\n"
        })
        .collect()
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    d / n.max(1e-30)
}

/// Loss within 1e-5 relative and every gradient close between the two batches.
fn assert_same_loss_and_grads(model: &Qwen3Model, packed: &Batch, padded: &Batch) {
    let sum = |b: &Batch| b.loss_weights.iter().map(|&w| w as f64).sum::<f64>();
    assert_eq!(sum(packed), sum(padded));
    let (lp, _, _) = model.loss(packed).unwrap();
    let (lu, _, _) = model.loss(padded).unwrap();
    assert!(((lp - lu) / lu).abs() < 1e-5, "packed {lp} vs padded {lu}");
    let gp = model.forward_backward(packed).unwrap();
    let gu = model.forward_backward(padded).unwrap();
    assert!(((gp.loss - gu.loss) / gu.loss).abs() < 1e-5);
    assert_eq!(
        gp.grads.keys().collect::<Vec<_>>(),
        gu.grads.keys().collect::<Vec<_>>()
    );
    for (name, g) in &gp.grads {
        let (a, b) = (
            g.to_vec_f32().unwrap(),
            gu.grads[name].to_vec_f32().unwrap(),
        );
        let r = rel(&a, &b);
        assert!(r < 1e-4, "{name}: relative difference {r:.2e}");
    }
}

#[test]
fn packed_loss_and_gradients_equal_the_padded_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("chat.jsonl");
    std::fs::write(&data, conversations(14)).unwrap();
    let codec = TextCodec::from_dir(model_dir()).unwrap();
    let model = model();
    let load = |packing| {
        let sft = SftOptions {
            packing,
            loss_scale: "default+ignore_empty_think".parse::<LossScale>().unwrap(),
            ..SftOptions::default()
        };
        SftDataset::load(
            std::slice::from_ref(&data),
            &codec,
            &SftLoadOptions {
                sft: &sft,
                max_length: 256,
                vocab_size: model.config.vocab_size,
                seed: 3,
            },
        )
        .unwrap()
        .0
    };
    let (packed, plain) = (load(true), load(false));
    assert_eq!(packed.samples(), plain.samples());
    let rows = packed.packed_rows().unwrap().len();
    assert!(
        rows < plain.samples().len(),
        "{rows} rows for {} samples",
        plain.samples().len()
    );
    assert!(packed.packed_rows().unwrap().iter().any(|r| r.len() >= 3));
    let all_rows: Vec<u32> = (0..rows as u32).collect();
    let all_samples: Vec<u32> = (0..plain.samples().len() as u32).collect();
    let (pb, ub) = (packed.batch(&all_rows), plain.batch(&all_samples));
    assert_eq!((pb.seq, ub.batch), (256, plain.samples().len()));
    assert_same_loss_and_grads(&model, &pb, &ub);

    // Random-ish samples with fractional weights, packed tightly.
    let mut rng = StdRng::seed_from_u64(5);
    let samples: Vec<SftSample> = (0..9)
        .map(|_| {
            let len = rng.random_range(2..=24);
            let mut w: Vec<f32> = (0..len)
                .map(|_| {
                    if rng.random::<f32>() < 0.7 {
                        rng.random::<f32>()
                    } else {
                        0.0
                    }
                })
                .collect();
            w[len - 1] = 0.0;
            w[0] = 1.0;
            SftSample {
                input_ids: (0..len).map(|_| rng.random_range(0..384)).collect(),
                loss_weights: w,
            }
        })
        .collect();
    let packed = SftDataset::from_samples(samples.clone(), 32, 350, true, true).unwrap();
    let plain = SftDataset::from_samples(samples, 32, 350, false, true).unwrap();
    let rows: Vec<u32> = (0..Dataset::len(&packed) as u32).collect();
    let all: Vec<u32> = (0..9).collect();
    assert_same_loss_and_grads(&model, &packed.batch(&rows), &plain.batch(&all));
}

#[test]
fn sft_training_runs_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("chat.jsonl");
    std::fs::write(&data, conversations(12)).unwrap();
    for packing in [false, true] {
        let out = tmp.path().join(format!("out-{packing}"));
        let mut cfg = TrainConfig::new(
            ModelSource::Random {
                config: model_dir().join("config.json"),
            },
            vec![data.clone(), PathBuf::from("self-cognition#20")],
            out.clone(),
            6,
        );
        cfg.max_length = 160;
        cfg.micro_batch_size = 2;
        cfg.lr = 1e-2;
        cfg.lr_decay_iters = Some(6);
        cfg.sft = Some(SftOptions {
            packing,
            model_name: Some(("小Q".into(), "Q".into())),
            model_author: Some(("团队".into(), "Team".into())),
            ..SftOptions::default()
        });
        let summary = run_training(&cfg, &mut NoProgress).unwrap();
        assert_eq!(summary.losses.len(), 6);
        assert!(summary.losses.iter().all(|(_, l)| l.is_finite()));
        let (first, last) = (summary.losses[0].1, summary.losses[5].1);
        assert!(last < first, "packing {packing}: {first} → {last}");
        assert!(out.join("checkpoint-6/model.safetensors").is_file());

        // Resuming from a mid-run checkpoint rebuilds the same data and continues the same losses.
        let mut again = cfg.clone();
        again.output_dir = tmp.path().join(format!("again-{packing}"));
        again.save_steps = 3;
        let first_half = {
            let mut c = again.clone();
            c.train_iters = 3;
            run_training(&c, &mut NoProgress).unwrap()
        };
        assert_eq!(first_half.losses[..], summary.losses[..3]);
        let resumed = run_training(&again, &mut NoProgress).unwrap();
        assert!(resumed.resumed_from.is_some());
        assert_eq!(resumed.losses[..], summary.losses[3..]);
    }
}
