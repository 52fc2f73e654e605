//! The training loop end to end on the CPU backend with the tiny Qwen3 config (`configs/models/qwen3-tiny.json`):
//! learning, checkpoint/resume equivalence, gradient accumulation, metrics and checkpoint layout.

mod train_support;

use std::path::{Path, PathBuf};

use qkernels::Device;
use qparallel::data::{DataCursor, DataLoader, LoadOptions, PretrainDataset};
use qparallel::hf;
use qparallel::model::{Batch, Qwen3Model};
use qparallel::optim::{AdamWConfig, DecayStyle, LrSchedule, Warmup};
use qparallel::train::{
    ModelSource, NoProgress, OptimizerOptions, Resume, TrainConfig, Trainer, TrainerState,
    run_training,
};
use train_support::{StopAfter, read_metrics, write_corpus};

fn tiny_config() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/models/qwen3-tiny.json")
}

fn config(corpus: &Path, out: &Path, train_iters: u64) -> TrainConfig {
    let mut c = TrainConfig::new(
        ModelSource::Random {
            config: tiny_config(),
        },
        vec![corpus.to_path_buf()],
        out.to_path_buf(),
        train_iters,
    );
    c.max_length = 32;
    c.micro_batch_size = 4;
    c.lr = 3e-3;
    c.min_lr = 3e-4;
    c.warmup = Warmup::Iters(3);
    c.lr_decay_style = DecayStyle::Cosine;
    c.logging_steps = 1;
    c.seed = 1234;
    c
}

#[test]
fn tiny_model_learns_and_writes_metrics_and_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path(), 200, 0x1234_5678, 40);
    let out = tmp.path().join("out");
    let mut cfg = config(&corpus, &out, 30);
    cfg.save_steps = 15;
    let summary = run_training(&cfg, &mut NoProgress).unwrap();
    assert_eq!(summary.final_step, 30);
    assert_eq!(summary.losses.len(), 30);
    let first = summary.losses[0].1;
    let last5: f64 = summary.losses[25..].iter().map(|(_, l)| l).sum::<f64>() / 5.0;
    println!("loss: first {first:.4}, mean of the last 5 {last5:.4}");
    // Random init over a 256-token vocabulary starts near ln 256 ≈ 5.55.
    assert!((first - 256f64.ln()).abs() < 0.3, "first loss {first}");
    assert!(
        last5 < first - 2.0,
        "loss did not fall clearly: {first} → {last5}"
    );

    let metrics = read_metrics(&out);
    assert_eq!(metrics.len(), 30);
    for (m, (step, loss)) in metrics.iter().zip(&summary.losses) {
        assert_eq!((m.step, m.loss), (*step, *loss));
        assert_eq!(m.tokens, 4 * 32);
        assert_eq!(m.total_tokens, m.step * 4 * 32);
        assert!(m.tokens_per_s > 0.0 && m.mfu > 0.0 && m.grad_norm.is_finite() && !m.skipped);
    }
    assert_eq!(
        metrics[0].lr, 0.0,
        "Megatron warmup: the first step has lr 0"
    );
    assert!(
        (metrics[3].lr - 3e-3).abs() < 1e-15,
        "end of warmup: {}",
        metrics[3].lr
    );

    // checkpoint-15 and checkpoint-30: HF model + optimizer + trainer state.
    let names: Vec<PathBuf> = summary.checkpoints.clone();
    assert_eq!(
        names,
        vec![out.join("checkpoint-15"), out.join("checkpoint-30")]
    );
    let ck = out.join("checkpoint-30");
    for f in [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(ck.join(f).is_file(), "{f} missing");
    }
    let state: TrainerState =
        serde_json::from_str(&std::fs::read_to_string(ck.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(
        (state.step, state.seed, state.total_tokens),
        (30, 1234, 30 * 128)
    );
    let model = Qwen3Model::from_hf_dir(&ck, Device::Cpu).unwrap();
    assert_eq!(model.config.num_hidden_layers, 2);
    let optim = hf::load_file(ck.join("optimizer.safetensors")).unwrap();
    assert_eq!(optim.len(), 2 * model.params.named().len());
    // No temp dirs left behind.
    let hidden: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(hidden.is_empty());

    // resume: auto on a finished run does nothing; resume: none refuses the used output dir.
    let again = run_training(&cfg, &mut NoProgress).unwrap();
    assert_eq!((again.final_step, again.losses.len()), (30, 0));
    cfg.resume = Resume::None;
    let e = run_training(&cfg, &mut NoProgress).unwrap_err().to_string();
    assert!(e.contains("resume") && e.contains("checkpoint-30"), "{e}");
}

#[test]
fn resume_reproduces_the_uninterrupted_run_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    // 30 documents ≈ 30 sequences of 32 → several epochs in 10 steps of 4, so the cursor crosses epochs.
    let corpus = write_corpus(tmp.path(), 30, 0x1234_5678, 40);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut cfg = config(&corpus, &a, 10);
    cfg.save_steps = 4;
    cfg.grad_accum = 2;
    cfg.micro_batch_size = 2;
    let full = run_training(&cfg, &mut NoProgress).unwrap();
    assert_eq!(full.losses.len(), 10);

    cfg.output_dir = b.clone();
    let part = run_training(&cfg, &mut StopAfter(6)).unwrap();
    assert!(part.stopped_early);
    assert_eq!(part.final_step, 6);
    assert_eq!(part.losses[..], full.losses[..6]);
    let rest = run_training(&cfg, &mut NoProgress).unwrap();
    assert_eq!(rest.resumed_from, Some(b.join("checkpoint-4")));
    assert_eq!(rest.losses.first().unwrap().0, 5);
    for ((s1, l1), (s2, l2)) in rest.losses.iter().zip(&full.losses[4..]) {
        assert_eq!(s1, s2);
        assert_eq!(
            l1.to_bits(),
            l2.to_bits(),
            "step {s1}: resumed {l1} vs uninterrupted {l2}"
        );
    }
    // metrics.jsonl holds one consistent history (steps 5, 6 of the interrupted run were dropped).
    let (ma, mb) = (read_metrics(&a), read_metrics(&b));
    let steps: Vec<u64> = mb.iter().map(|m| m.step).collect();
    assert_eq!(steps, (1..=10).collect::<Vec<_>>());
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(
            (x.step, x.loss.to_bits(), x.lr.to_bits()),
            (y.step, y.loss.to_bits(), y.lr.to_bits())
        );
    }
    // Same final weights and optimizer moments, bit for bit.
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let wa = hf::load_file(a.join("checkpoint-10").join(f)).unwrap();
        let wb = hf::load_file(b.join("checkpoint-10").join(f)).unwrap();
        assert_eq!(wa, wb, "{f}");
    }
}

#[test]
fn gradient_accumulation_equals_one_big_micro_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path(), 60, 0x1234_5678, 40);
    let mut one = config(&corpus, &tmp.path().join("one"), 4);
    one.micro_batch_size = 4;
    one.grad_accum = 1;
    one.warmup = Warmup::Iters(0);
    let mut two = one.clone();
    two.output_dir = tmp.path().join("two");
    two.micro_batch_size = 2;
    two.grad_accum = 2;
    let r1 = run_training(&one, &mut NoProgress).unwrap();
    let r2 = run_training(&two, &mut NoProgress).unwrap();
    for ((s, l1), (_, l2)) in r1.losses.iter().zip(&r2.losses) {
        let rel = (l1 - l2).abs() / l1.abs();
        println!("step {s}: micro 4 → {l1:.8}, 2 × micro 2 → {l2:.8} (rel {rel:.1e})");
        assert!(rel < 1e-5, "step {s}: {l1} vs {l2}");
    }
    let (m1, m2) = (read_metrics(&one.output_dir), read_metrics(&two.output_dir));
    for (x, y) in m1.iter().zip(&m2) {
        assert!((x.grad_norm - y.grad_norm).abs() / x.grad_norm < 1e-5);
        assert_eq!(x.tokens, y.tokens);
    }
    let w1 = hf::load_file(tmp.path().join("one/checkpoint-4/model.safetensors")).unwrap();
    let w2 = hf::load_file(tmp.path().join("two/checkpoint-4/model.safetensors")).unwrap();
    // Adam turns a 1e-8 gradient difference on an element with a near-zero gradient into an update of up to
    // lr, so after 4 steps the weights agree less tightly than the losses: ‖w1 − w2‖ / ‖w1‖ (observed ≤ 3e-5).
    for (name, t1) in &w1 {
        let t2 = &w2[name];
        let diff: f64 = t1
            .data
            .iter()
            .zip(&t2.data)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = t1
            .data
            .iter()
            .map(|a| (*a as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            diff / norm < 2e-4,
            "{name}: relative difference {:.2e}",
            diff / norm
        );
    }
}

#[test]
fn accumulated_gradient_equals_the_big_batch_gradient() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path(), 40, 0x1234_5678, 40);
    let ds = PretrainDataset::load(
        &[corpus],
        &LoadOptions {
            max_length: 32,
            vocab_size: 256,
            tokenizer_dir: None,
        },
    )
    .unwrap();
    let mut loader = DataLoader::new(ds, 5, DataCursor::default()).unwrap();
    let big = loader.next_batch(4);
    let (half1, half2) = {
        let n = 2 * 32;
        let a = Batch::causal_lm(big.input_ids[..n].to_vec(), 2, 32).unwrap();
        let b = Batch::causal_lm(big.input_ids[n..].to_vec(), 2, 32).unwrap();
        (a, b)
    };
    let cfg = qparallel::model::ModelConfig::from_file(tiny_config()).unwrap();
    let model = Qwen3Model::random(cfg, 9, 0.05, Device::Cpu).unwrap();
    let trainer = Trainer::new(
        model,
        OptimizerOptions {
            schedule: LrSchedule::constant(1e-3).unwrap(),
            adam: AdamWConfig::default(),
            weight_decay: 0.1,
            clip_grad: 1.0,
        },
    )
    .unwrap();
    let one = trainer.gradients(std::slice::from_ref(&big)).unwrap();
    let two = trainer.gradients(&[half1, half2]).unwrap();
    assert_eq!((one.tokens, two.tokens), (128, 128));
    assert_eq!((one.loss_weight, two.loss_weight), (124.0, 124.0));
    assert!(
        (one.loss - two.loss).abs() / one.loss < 1e-6,
        "{} vs {}",
        one.loss,
        two.loss
    );
    let mut worst = 0.0f64;
    for (name, g1) in &one.grads {
        let g2 = &two.grads[name];
        let diff: f64 = g1
            .data
            .iter()
            .zip(&g2.data)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = g1
            .data
            .iter()
            .map(|a| (*a as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        worst = worst.max(diff / norm);
        assert!(
            diff / norm < 1e-5,
            "{name}: relative gradient difference {:.2e}",
            diff / norm
        );
    }
    println!("worst relative gradient difference: {worst:.2e}");
}

#[test]
fn non_finite_gradients_skip_the_update_but_count_the_step() {
    let cfg = qparallel::model::ModelConfig::from_file(tiny_config()).unwrap();
    let mut model = Qwen3Model::random(cfg, 3, 0.05, Device::Cpu).unwrap();
    // A NaN in the final norm weight makes every logit, the loss and the gradients NaN.
    let mut norm = model.params.norm.to_vec_f32().unwrap();
    norm[0] = f32::NAN;
    model.params.norm = qkernels::Tensor::from_f32(norm, &[64], &Device::Cpu).unwrap();
    let opts = OptimizerOptions {
        schedule: LrSchedule::constant(1e-3).unwrap(),
        adam: AdamWConfig::default(),
        weight_decay: 0.1,
        clip_grad: 1.0,
    };
    let mut trainer = Trainer::new(model, opts).unwrap();
    let before = trainer.master().clone();
    let batch = Batch::causal_lm((0..32).collect(), 2, 16).unwrap();
    let s = trainer.step(&[batch]).unwrap();
    assert!(s.skipped && s.grad_norm.is_nan(), "{s:?}");
    assert_eq!((trainer.iteration(), trainer.skipped_steps()), (1, 1));
    assert!(trainer.optimizer().states().is_empty());
    for (name, t) in &before {
        let after = &trainer.master()[name].data;
        assert!(
            t.data
                .iter()
                .zip(after)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name} changed"
        );
    }
    let empty = Batch::causal_lm(vec![1], 1, 1).unwrap();
    assert!(matches!(
        trainer.step(&[empty]),
        Err(qparallel::train::TrainError::EmptyBatch { step: 2 })
    ));
}

/// Relative L2 distance of two vectors.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    diff / norm.max(1e-30)
}

/// Four micro-batches of random tokens (two per step) from the tiny vocabulary.
fn random_batches(seed: u64) -> Vec<Batch> {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..4)
        .map(|_| Batch::causal_lm((0..2 * 24).map(|_| r.random_range(0..256u32)).collect(), 2, 24).unwrap())
        .collect()
}

fn device_opts() -> OptimizerOptions {
    OptimizerOptions {
        schedule: LrSchedule::constant(2e-3).unwrap(),
        adam: AdamWConfig::default(),
        weight_decay: 0.1,
        clip_grad: 0.5, // small enough to clip: the clipping path runs too
    }
}

/// The optimizer on the model's device (the GPU path, run here on the CPU backend: DeviceAdamW with gradient sums
/// as tensors) takes the same steps as the host optimizer: losses, norms, masters and moments.
#[test]
fn device_optimizer_steps_equal_the_host_optimizer() {
    let cfg = qparallel::model::ModelConfig::from_file(tiny_config()).unwrap();
    let model = Qwen3Model::random(cfg, 11, 0.05, Device::Cpu).unwrap();
    let mut host = Trainer::new(model.clone(), device_opts()).unwrap();
    let mut dev = Trainer::with_device_optimizer(model, device_opts()).unwrap();
    assert!(!host.optimizer_on_device() && dev.optimizer_on_device());
    let batches = random_batches(5);
    for step in batches.chunks(2) {
        let (a, b) = (host.step(step).unwrap(), dev.step(step).unwrap());
        assert!((a.loss - b.loss).abs() <= 1e-6 * a.loss, "{a:?} vs {b:?}");
        assert!((a.grad_norm - b.grad_norm).abs() <= 1e-5 * a.grad_norm, "{a:?} vs {b:?}");
        assert!(a.grad_norm > 0.5, "clipping did not engage: {}", a.grad_norm);
        assert_eq!((a.step, a.tokens, a.skipped), (b.step, b.tokens, b.skipped));
    }
    assert!(!dev.host_state_current());
    dev.sync_host_state().unwrap();
    assert!(dev.host_state_current());
    for (name, m) in host.master() {
        let e = rel_l2(&m.data, &dev.master()[name].data);
        assert!(e < 1e-5, "{name}: master differs by {e:.2e}");
        let (sa, sb) = (host.optimizer().state(name).unwrap(), dev.optimizer().state(name).unwrap());
        assert_eq!(sa.step, sb.step);
        assert!(rel_l2(&sa.exp_avg, &sb.exp_avg) < 1e-5, "{name}: exp_avg");
        assert!(rel_l2(&sa.exp_avg_sq, &sb.exp_avg_sq) < 1e-5, "{name}: exp_avg_sq");
    }
}

/// A checkpoint of a device-optimizer run holds the device state (saving before the host copy is refreshed is
/// refused), and a trainer restored from it continues exactly as the uninterrupted run.
#[test]
fn device_optimizer_checkpoint_resumes_the_run() {
    use qparallel::train::{SaveRequest, read_optimizer, read_state, save_checkpoint};
    let tmp = tempfile::tempdir().unwrap();
    let cfg = qparallel::model::ModelConfig::from_file(tiny_config()).unwrap();
    let model = Qwen3Model::random(cfg.clone(), 12, 0.05, Device::Cpu).unwrap();
    let batches = random_batches(6);
    let mut full = Trainer::with_device_optimizer(model, device_opts()).unwrap();
    full.step(&batches[..2]).unwrap();
    let req = SaveRequest {
        output_dir: tmp.path(),
        source_dir: None,
        config: Some(cfg.to_hf_json()),
        data_cursor: DataCursor::default(),
        seed: 1,
        total_tokens: 96,
        max_length: 24,
        global_batch_size: 4,
    };
    let stale = save_checkpoint(&full, &req).unwrap_err().to_string();
    assert!(stale.contains("sync_host_state"), "{stale}");
    full.sync_host_state().unwrap();
    let dir = save_checkpoint(&full, &req).unwrap();
    let want = full.step(&batches[2..]).unwrap();

    let state = read_state(&dir).unwrap();
    let states = read_optimizer(&dir, &state).unwrap();
    let model = Qwen3Model::from_hf_dir(&dir, Device::Cpu).unwrap();
    let mut resumed = Trainer::with_device_optimizer(model, device_opts()).unwrap();
    resumed.restore(state.step, state.skipped_steps, states).unwrap();
    let got = resumed.step(&batches[2..]).unwrap();
    assert_eq!((got.step, got.lr), (want.step, want.lr));
    assert!((got.loss - want.loss).abs() <= 1e-7 * want.loss, "{got:?} vs {want:?}");
    assert!((got.grad_norm - want.grad_norm).abs() <= 1e-6 * want.grad_norm);
    full.sync_host_state().unwrap();
    resumed.sync_host_state().unwrap();
    for (name, m) in full.master() {
        let e = rel_l2(&m.data, &resumed.master()[name].data);
        assert!(e < 1e-6, "{name}: {e:.2e}");
    }
}

/// A non-finite norm skips the device optimizer's update without advancing its bias correction: no state, the
/// masters unchanged.
#[test]
fn device_optimizer_skips_non_finite_steps() {
    let cfg = qparallel::model::ModelConfig::from_file(tiny_config()).unwrap();
    let mut model = Qwen3Model::random(cfg, 3, 0.05, Device::Cpu).unwrap();
    let mut norm = model.params.norm.to_vec_f32().unwrap();
    norm[0] = f32::NAN;
    model.params.norm = qkernels::Tensor::from_f32(norm, &[64], &Device::Cpu).unwrap();
    let mut trainer = Trainer::with_device_optimizer(model, device_opts()).unwrap();
    assert!(trainer.master().is_empty() && !trainer.host_state_current());
    trainer.sync_host_state().unwrap();
    let before = trainer.master().clone();
    let s = trainer.step(&random_batches(1)[..1]).unwrap();
    assert!(s.skipped && s.grad_norm.is_nan(), "{s:?}");
    assert_eq!((trainer.iteration(), trainer.skipped_steps()), (1, 1));
    trainer.sync_host_state().unwrap();
    assert!(trainer.optimizer().states().is_empty());
    for (name, t) in &before {
        let after = &trainer.master()[name].data;
        assert!(t.data.iter().zip(after).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} changed");
    }
}
