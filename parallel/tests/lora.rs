//! LoRA end to end on the tiny fixtures (`tests/fixtures/dense_tied`, `moe_norm_topk`):
//! - adapter gradients against central finite differences of the loss (dense and MoE, nonzero `B`);
//! - the training model's logits equal those of the merged model written by `merge_to_dir`, bit for bit;
//! - LoRA training lowers the loss, keeps the base weights bit for bit, writes PEFT checkpoints and resumes
//!   bit-exactly;
//! - PEFT parity against `tests/fixtures/lora` (made by PEFT itself with `make_lora_golden.py`), and — when python3
//!   with torch, transformers and peft is available — PEFT loads the adapters we write and reproduces our logits.

mod train_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use qkernels::Device;
use qparallel::hf::{self, HostTensor};
use qparallel::lora::{
    self, LoraAdapters, LoraConfig, TargetModules, effective_weight, merge_to_dir, merged_weights,
    read_adapters,
};
use qparallel::model::{Batch, Qwen3Model};
use qparallel::optim::{AdamWConfig, LrSchedule, Warmup};
use qparallel::train::{
    ModelSource, NoProgress, OptimizerOptions, TrainConfig, Trainer, run_training,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use train_support::{StopAfter, write_corpus};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn opts(lr: f64) -> OptimizerOptions {
    OptimizerOptions {
        schedule: LrSchedule::constant(lr).unwrap(),
        adam: AdamWConfig::default(),
        weight_decay: 0.1,
        clip_grad: 1.0,
    }
}

fn rel_err(ours: &[f32], theirs: &[f32]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let d: f64 = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let n: f64 = theirs
        .iter()
        .map(|b| (*b as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    d / n
}

/// Adapters with PEFT's init for `A` and a random nonzero `B` (uniform in ±`b_scale`).
fn random_adapters(model: &Qwen3Model, lc: &LoraConfig, seed: u64, b_scale: f32) -> LoraAdapters {
    let mut ad = LoraAdapters::init(&model.config, lc, seed).unwrap();
    let mut rng = StdRng::seed_from_u64(seed + 100);
    for p in ad.pairs.values_mut() {
        p.b.data
            .iter_mut()
            .for_each(|x| *x = b_scale * (rng.random::<f32>() * 2.0 - 1.0));
    }
    ad
}

fn random_batch(vocab: usize, seed: u64, batch: usize, seq: usize) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed);
    let ids = (0..batch * seq)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    Batch::causal_lm(ids, batch, seq).unwrap()
}

/// The golden input ids `[B, S]` of `tests/fixtures/lora/golden.safetensors` as a batch.
fn golden_batch() -> (Batch, Vec<usize>) {
    let (shape, ids) =
        hf::read_i64_tensor(fixture("lora/golden.safetensors"), "input_ids").unwrap();
    let ids = ids.into_iter().map(|x| x as u32).collect();
    (Batch::causal_lm(ids, shape[0], shape[1]).unwrap(), shape)
}

fn golden_f32() -> hf::TensorMap {
    hf::load_file_filtered(fixture("lora/golden.safetensors"), |n| n != "input_ids").unwrap()
}

/// Central finite differences of the loss w.r.t. the adapter factors: one random direction per factor tensor,
/// and single entries (the largest gradients of a few tensors).
fn check_fd(fixture_name: &str, b_scale: f32) {
    let base = Qwen3Model::from_hf_dir(fixture(fixture_name), Device::Cpu).unwrap();
    let lc = LoraConfig::new(4, 8.0);
    let adapters = random_adapters(&base, &lc, 1, b_scale);
    let batch = random_batch(base.config.vocab_size, 2, 2, 12);
    let trainer =
        Trainer::new_lora(base.clone(), opts(1e-3), lc.clone(), adapters.clone()).unwrap();
    let g = trainer.gradients(std::slice::from_ref(&batch)).unwrap();
    assert_eq!(g.grads.len(), 2 * adapters.pairs.len());
    let loss_with = |moved: &LoraAdapters| {
        let t = Trainer::new_lora(base.clone(), opts(1e-3), lc.clone(), moved.clone()).unwrap();
        t.model().loss(&batch).unwrap().0
    };
    // Perturbs the factor `key` (a PEFT key) by `delta` (same length).
    let moved = |key: &str, delta: &[f32], sign: f32| {
        let (weight, is_a) = lora::parse_peft_key(key).unwrap();
        let mut m = adapters.clone();
        let p = m.pairs.get_mut(&weight).unwrap();
        let t = if is_a { &mut p.a } else { &mut p.b };
        t.data
            .iter_mut()
            .zip(delta)
            .for_each(|(x, d)| *x += sign * d);
        m
    };
    let mut rng = StdRng::seed_from_u64(3);
    // f32 forward: eps 2e-3 balances O(eps²) truncation against f32 round-off (as in the model's own FD test).
    let eps = 2e-3f32;
    let mut worst = 0.0f64;
    for (key, grad) in &g.grads {
        let dir: Vec<f32> = (0..grad.data.len())
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        let analytic: f64 = grad
            .data
            .iter()
            .zip(&dir)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        let delta: Vec<f32> = dir.iter().map(|d| eps * d).collect();
        let fd = (loss_with(&moved(key, &delta, 1.0)) - loss_with(&moved(key, &delta, -1.0)))
            / (2.0 * eps as f64);
        let err = (fd - analytic).abs() / analytic.abs().max(1e-2);
        worst = worst.max(err);
        assert!(
            err < 1e-2,
            "{fixture_name}: {key}: finite difference {fd:.6} vs analytic {analytic:.6}"
        );
    }
    println!(
        "{fixture_name}: {} factor tensors, directional FD worst relative error {worst:.2e}",
        g.grads.len()
    );

    // Single entries: the three largest gradients of A and B of the first and last adapted weight.
    let names: Vec<&String> = adapters.pairs.keys().collect();
    let eps = 1e-2f32;
    let mut worst = 0.0f64;
    for weight in [names[0], names[names.len() - 1]] {
        for part in ["lora_A", "lora_B"] {
            let key = lora::peft_key(weight, part);
            let grad = &g.grads[&key].data;
            let mut idx: Vec<usize> = (0..grad.len()).collect();
            idx.sort_by(|&i, &j| grad[j].abs().total_cmp(&grad[i].abs()));
            for &i in &idx[..3] {
                let mut delta = vec![0.0f32; grad.len()];
                delta[i] = eps;
                let fd = (loss_with(&moved(&key, &delta, 1.0))
                    - loss_with(&moved(&key, &delta, -1.0)))
                    / (2.0 * eps as f64);
                let analytic = grad[i] as f64;
                let err = (fd - analytic).abs() / analytic.abs();
                worst = worst.max(err);
                assert!(
                    err < 2e-2,
                    "{fixture_name}: {key}[{i}]: finite difference {fd:.6e} vs analytic {analytic:.6e}"
                );
            }
        }
    }
    println!("{fixture_name}: single-entry FD worst relative error {worst:.2e}");
}

#[test]
fn adapter_gradients_match_finite_differences_dense() {
    check_fd("dense_tied", 0.1);
}

#[test]
fn adapter_gradients_match_finite_differences_moe_experts() {
    check_fd("moe_norm_topk", 0.02);
}

#[test]
fn lora_model_logits_equal_merged_model_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = fixture("dense_untied");
    let base = Qwen3Model::from_hf_dir(&base_dir, Device::Cpu).unwrap();
    let lc = LoraConfig {
        target_modules: TargetModules::Names(vec![
            "q_proj".into(),
            "v_proj".into(),
            "down_proj".into(),
        ]),
        ..LoraConfig::new(3, 5.0)
    };
    let adapters = random_adapters(&base, &lc, 4, 0.2);
    assert_eq!(adapters.pairs.len(), 6);
    let trainer =
        Trainer::new_lora(base.clone(), opts(1e-3), lc.clone(), adapters.clone()).unwrap();
    let dir = tmp.path().join("adapter");
    lora::save_adapters(&dir, &lc, &trainer.adapters().unwrap(), &base_dir).unwrap();
    let out = tmp.path().join("merged");
    merge_to_dir(&base_dir, &dir, &out).unwrap();
    let merged = Qwen3Model::from_hf_dir(&out, Device::Cpu).unwrap();
    let batch = random_batch(base.config.vocab_size, 5, 2, 10);
    let ours = trainer
        .model()
        .logits(&batch)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let theirs = merged.logits(&batch).unwrap().to_vec_f32().unwrap();
    assert!(
        ours.iter()
            .zip(&theirs)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "LoRA model and merged model logits differ"
    );
    let plain = base.logits(&batch).unwrap().to_vec_f32().unwrap();
    let moved = rel_err(&ours, &plain);
    println!("adapters move the logits by {moved:.3} (relative)");
    assert!(moved > 1e-2, "the adapters must change the output: {moved}");
}

#[test]
fn lora_trainer_learns_and_never_touches_the_base() {
    let base = Qwen3Model::from_hf_dir(fixture("dense_tied"), Device::Cpu).unwrap();
    let lc = LoraConfig::new(8, 16.0);
    let adapters = LoraAdapters::init(&base.config, &lc, 11).unwrap();
    let mut trainer = Trainer::new_lora(base.clone(), opts(1e-2), lc, adapters).unwrap();
    // B = 0 at init: the LoRA model is the base model.
    let batch = random_batch(256, 6, 4, 16);
    assert_eq!(
        trainer
            .model()
            .logits(&batch)
            .unwrap()
            .to_vec_f32()
            .unwrap(),
        base.logits(&batch).unwrap().to_vec_f32().unwrap()
    );
    // One fixed batch, memorised.
    let mut losses = Vec::new();
    for _ in 0..15 {
        losses.push(trainer.step(std::slice::from_ref(&batch)).unwrap().loss);
    }
    println!("LoRA losses on a fixed batch: {losses:.4?}");
    assert!(
        losses[14] < losses[0] - 1.0,
        "loss did not fall: {} → {}",
        losses[0],
        losses[14]
    );
    // Optimizer state and masters cover the adapters only.
    assert_eq!(trainer.master().len(), 2 * 14);
    assert!(
        trainer
            .master()
            .keys()
            .all(|k| k.contains(".lora_A.") || k.contains(".lora_B."))
    );
    assert_eq!(
        trainer.optimizer().states().keys().collect::<Vec<_>>(),
        trainer.master().keys().collect::<Vec<_>>()
    );
    // The base is untouched: non-target weights are the base's, targets are exactly W + s·B·A.
    let ad = trainer.adapters().unwrap();
    let base_named = base.params.to_named();
    for (name, t) in trainer.model().params.to_named() {
        let want = match ad.pairs.get(&name) {
            None => base_named[&name].clone(),
            Some(p) => {
                let cpu = Device::Cpu;
                let a = qkernels::Tensor::from_f32(p.a.data.clone(), &p.a.shape, &cpu).unwrap();
                let b = qkernels::Tensor::from_f32(p.b.data.clone(), &p.b.shape, &cpu).unwrap();
                effective_weight(&base_named[&name], &a, &b, ad.scaling).unwrap()
            }
        };
        let (x, y) = (t.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
        assert!(
            x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}"
        );
    }
    assert!(
        ad.pairs
            .values()
            .all(|p| p.b.data.iter().any(|&x| x != 0.0))
    );
}

fn lora_run(corpus: &Path, out: &Path, base: &Path, iters: u64) -> TrainConfig {
    let mut c = TrainConfig::new(
        ModelSource::Pretrained(base.to_path_buf()),
        vec![corpus.to_path_buf()],
        out.to_path_buf(),
        iters,
    );
    c.max_length = 24;
    c.micro_batch_size = 2;
    c.grad_accum = 2;
    c.lr = 1e-2;
    c.min_lr = 1e-3;
    c.warmup = Warmup::Iters(1);
    c.logging_steps = 1;
    c.seed = 77;
    c.lora = Some(LoraConfig::new(4, 8.0));
    c
}

fn dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn lora_training_writes_peft_checkpoints_and_resumes_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("dense_tied");
    let before = dir_bytes(&base);
    let corpus = write_corpus(tmp.path(), 40, 0x9e37_79b9, 30);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));

    let mut cfg = lora_run(&corpus, &a, &base, 4);
    cfg.save_steps = 2;
    let full = run_training(&cfg, &mut NoProgress).unwrap();
    assert_eq!(full.losses.len(), 4);
    println!("LoRA run losses: {:?}", full.losses);

    cfg.output_dir = b.clone();
    let part = run_training(&cfg, &mut StopAfter(2)).unwrap();
    assert_eq!(part.losses[..], full.losses[..2]);
    let rest = run_training(&cfg, &mut NoProgress).unwrap();
    assert_eq!(rest.resumed_from, Some(b.join("checkpoint-2")));
    for ((s1, l1), (s2, l2)) in rest.losses.iter().zip(&full.losses[2..]) {
        assert_eq!(
            (s1, l1.to_bits()),
            (s2, l2.to_bits()),
            "step {s1}: resumed {l1} vs uninterrupted {l2}"
        );
    }
    for f in [lora::ADAPTER_WEIGHTS_FILE, "optimizer.safetensors"] {
        let wa = hf::load_file(a.join("checkpoint-4").join(f)).unwrap();
        let wb = hf::load_file(b.join("checkpoint-4").join(f)).unwrap();
        assert_eq!(wa, wb, "{f}");
    }

    // Checkpoint layout: PEFT adapter dir + optimizer/trainer state, no base weights.
    let ck = a.join("checkpoint-4");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(ck.join(f).is_file(), "{f} missing");
    }
    assert!(!ck.join("model.safetensors").exists() && !ck.join("config.json").exists());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("adapter_config.json")).unwrap())
            .unwrap();
    let base_abs = std::fs::canonicalize(&base).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 8);
    assert_eq!(json["lora_dropout"], 0.0);
    assert_eq!(json["bias"], "none");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["fan_in_fan_out"], false);
    assert_eq!(json["inference_mode"], true);
    assert_eq!(
        json["base_model_name_or_path"],
        base_abs.display().to_string()
    );
    assert_eq!(
        json["target_modules"],
        serde_json::json!([
            "down_proj",
            "gate_proj",
            "k_proj",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj"
        ])
    );
    let tensors = hf::load_file(ck.join("adapter_model.safetensors")).unwrap();
    assert_eq!(tensors.len(), 28);
    assert_eq!(
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape,
        vec![4, 64]
    );
    assert_eq!(
        tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape,
        vec![64, 4]
    );
    let optim = hf::load_file(ck.join("optimizer.safetensors")).unwrap();
    assert_eq!(optim.len(), 2 * 28);
    assert_eq!(lora::base_model_dir(&ck).unwrap(), base_abs);
    // The base model directory is unchanged, byte for byte.
    assert_eq!(dir_bytes(&base), before);

    // A resume with other LoRA settings, or a full-model run on LoRA checkpoints, is refused.
    let mut other = lora_run(&corpus, &a, &base, 6);
    other.lora = Some(LoraConfig::new(8, 8.0));
    let e = run_training(&other, &mut NoProgress)
        .unwrap_err()
        .to_string();
    assert!(e.contains("r=4") && e.contains("r=8"), "{e}");
    other.lora = None;
    let e = run_training(&other, &mut NoProgress)
        .unwrap_err()
        .to_string();
    assert!(e.contains("LoRA adapter checkpoint"), "{e}");
    // Dropout is refused for training, naming the key.
    let mut d = lora_run(&corpus, &tmp.path().join("d"), &base, 2);
    d.lora.as_mut().unwrap().dropout = 0.1;
    let e = run_training(&d, &mut NoProgress).unwrap_err().to_string();
    assert!(e.contains("lora.dropout"), "{e}");
    // Random init has no base to adapt.
    let mut r = lora_run(&corpus, &tmp.path().join("r"), &base, 2);
    r.model = ModelSource::Random {
        config: base.join("config.json"),
    };
    let e = run_training(&r, &mut NoProgress).unwrap_err().to_string();
    assert!(e.contains("`lora`"), "{e}");
}

#[test]
fn lora_run_training_learns() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path(), 80, 0x9e37_79b9, 30);
    let mut cfg = lora_run(&corpus, &tmp.path().join("out"), &fixture("dense_tied"), 30);
    cfg.lora = Some(LoraConfig::new(8, 16.0));
    let summary = run_training(&cfg, &mut NoProgress).unwrap();
    let first = summary.losses[0].1;
    let last5 = summary.losses[25..].iter().map(|(_, l)| l).sum::<f64>() / 5.0;
    println!("LoRA run: first loss {first:.4}, mean of the last 5 {last5:.4}");
    assert!(
        last5 < first - 1.0,
        "loss did not fall clearly: {first} → {last5}"
    );
}

/// PEFT's own adapter (tests/fixtures/lora/adapter) gives PEFT's logits and merged weights.
#[test]
fn peft_written_adapter_matches_peft_logits() {
    let base_dir = fixture("dense_tied");
    let adapter = fixture("lora/adapter");
    let (lc, adapters) = read_adapters(&adapter).unwrap();
    assert_eq!(
        (lc.rank, lc.alpha, lc.dropout, adapters.scaling),
        (4, 8.0, 0.0, 2.0)
    );
    // PEFT's "all-linear" resolved to the same 14 modules as ours.
    let base = Qwen3Model::from_hf_dir(&base_dir, Device::Cpu).unwrap();
    let ours: Vec<String> = lora::target_weights(&base.config, &TargetModules::AllLinear)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(adapters.pairs.keys().cloned().collect::<Vec<_>>(), ours);
    assert_eq!(
        lora::target_weights(&base.config, &lc.target_modules)
            .unwrap()
            .len(),
        14,
        "PEFT's saved target_modules select the same weights"
    );

    let golden = golden_f32();
    let merged = merged_weights(&base_dir, &adapter).unwrap();
    let mut worst = 0.0f64;
    for (name, t) in &merged {
        if let Some(g) = golden.get(&format!("merged.{name}")) {
            let e = rel_err(&t.data, &g.data);
            worst = worst.max(e);
            assert!(e < 1e-6, "{name}: merged weight rel {e:.2e}");
        }
    }
    println!("merged weights vs PEFT merge_and_unload: worst rel {worst:.2e}");

    let (batch, shape) = golden_batch();
    let merged_model = Qwen3Model::from_host(base.config.clone(), merged, Device::Cpu).unwrap();
    let logits = merged_model.logits(&batch).unwrap().to_vec_f32().unwrap();
    let e_peft = rel_err(&logits, &golden["logits"].data);
    let e_merged = rel_err(&logits, &golden["merged_logits"].data);
    println!(
        "logits {shape:?}: vs PEFT (unmerged adapter path) rel {e_peft:.2e}, vs PEFT merged rel {e_merged:.2e}"
    );
    assert!(e_peft < 1e-4 && e_merged < 1e-4);
    // The LoRA training model on PEFT's adapters computes the same.
    let trainer = Trainer::new_lora(base, opts(1e-3), lc, adapters).unwrap();
    let t_logits = trainer
        .model()
        .logits(&batch)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    assert!(
        t_logits
            .iter()
            .zip(&logits)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
}

fn have_peft() -> bool {
    Command::new("python3")
        .args(["-c", "import torch, transformers, peft"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Writes `input_ids` (I64) and `logits` (F32) as one safetensors file for `make_lora_golden.py --logits`.
fn write_logits(path: &Path, shape: &[usize], ids: &[u32], logits: &HostTensor) {
    use safetensors::Dtype;
    use safetensors::tensor::TensorView;
    let id_bytes: Vec<u8> = ids.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect();
    let lg_bytes: Vec<u8> = logits.data.iter().flat_map(|x| x.to_le_bytes()).collect();
    let views = vec![
        (
            "input_ids",
            TensorView::new(Dtype::I64, shape.to_vec(), &id_bytes).unwrap(),
        ),
        (
            "logits",
            TensorView::new(Dtype::F32, logits.shape.clone(), &lg_bytes).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// PEFT loads the adapters of our LoRA checkpoint (`PeftModel.from_pretrained`) and reproduces our merged model's
/// logits. Skipped (with a message) without python3 + torch + transformers + peft.
#[test]
fn peft_loads_our_adapters() {
    if !have_peft() {
        eprintln!("SKIPPED: python3 with torch, transformers and peft is not available");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("dense_tied");
    let corpus = write_corpus(tmp.path(), 20, 0x9e37_79b9, 30);
    let out = tmp.path().join("out");
    let mut cfg = lora_run(&corpus, &out, &base, 3);
    cfg.lora = Some(LoraConfig::new(4, 16.0));
    run_training(&cfg, &mut NoProgress).unwrap();
    let ck = out.join("checkpoint-3");
    let (batch, shape) = golden_batch();
    let model = Qwen3Model::from_host(
        Qwen3Model::from_hf_dir(&base, Device::Cpu).unwrap().config,
        merged_weights(&base, &ck).unwrap(),
        Device::Cpu,
    )
    .unwrap();
    let logits = model.logits(&batch).unwrap();
    let v = logits.shape()[1];
    let host = HostTensor::new(vec![shape[0], shape[1], v], logits.to_vec_f32().unwrap()).unwrap();
    let file = tmp.path().join("ours.safetensors");
    write_logits(&file, &shape, &batch.input_ids, &host);
    let o = Command::new("python3")
        .arg(fixture("lora/make_lora_golden.py"))
        .arg("--check")
        .arg(&ck)
        .arg("--logits")
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    println!("{stdout}");
    assert!(
        o.status.success() && stdout.contains("check: OK"),
        "{stdout}\n{stderr}"
    );
}
