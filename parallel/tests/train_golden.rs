//! The trainer against transformers: three AdamW steps (clip 1.0, constant lr, decoupled weight decay on
//! matrices) on the golden batch of each fixture model must give torch's loss before every step, its pre-clip
//! gradient norms, the loss after the third step and the stepped parameter values (tests/fixtures/README.md,
//! "Three optimizer steps").

use std::path::PathBuf;

use qkernels::Device;
use qparallel::hf;
use qparallel::model::{Batch, Qwen3Model};
use qparallel::optim::{AdamWConfig, DecayStyle, LrSchedule, Warmup};
use qparallel::train::{OptimizerOptions, Trainer};
use serde_json::Value;

/// Losses and norms: the brief's bound is 1e-4 relative; observed differences are ~1e-6.
const LOSS_TOL: f64 = 1e-4;
/// Parameters after three steps, `‖ours − torch‖ / ‖torch‖`.
const PARAM_TOL: f64 = 1e-5;

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

fn norm_rel_err(ours: &[f32], theirs: &[f32]) -> f64 {
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

fn three_steps(name: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let opt = &info["optimizer"];
    assert_eq!(opt["lr_schedule"], "constant");
    let golden_path = dir.join("golden.safetensors");
    let golden = hf::load_file_filtered(&golden_path, |n| {
        n == "loss_weights" || n.starts_with("after_step3.")
    })
    .unwrap();
    let (shape, ids) = hf::read_i64_tensor(&golden_path, "input_ids").unwrap();
    let (_, labels) = hf::read_i64_tensor(&golden_path, "labels").unwrap();
    let batch = Batch::from_labels(
        ids.iter().map(|&i| i as u32).collect(),
        &labels,
        shape[0],
        shape[1],
    )
    .unwrap()
    .scale_loss_weights(&golden["loss_weights"].data)
    .unwrap();

    let betas = opt["betas"].as_array().unwrap();
    let lr = opt["lr"].as_f64().unwrap();
    let opts = OptimizerOptions {
        schedule: LrSchedule::new(lr, 0.0, Warmup::Iters(0), 1, DecayStyle::Constant).unwrap(),
        adam: AdamWConfig {
            beta1: betas[0].as_f64().unwrap(),
            beta2: betas[1].as_f64().unwrap(),
            eps: opt["eps"].as_f64().unwrap(),
        },
        weight_decay: opt["weight_decay"].as_f64().unwrap(),
        clip_grad: opt["max_grad_norm"].as_f64().unwrap(),
    };
    let model = Qwen3Model::from_hf_dir(&dir, Device::Cpu).unwrap();
    let mut trainer = Trainer::new(model, opts).unwrap();

    let losses = opt["losses"].as_array().unwrap();
    let norms = opt["grad_norms_before_clip"].as_array().unwrap();
    assert_eq!(losses.len(), 3);
    for (i, (want_loss, want_norm)) in losses.iter().zip(norms).enumerate() {
        let s = trainer.step(std::slice::from_ref(&batch)).unwrap();
        let (want_loss, want_norm) = (want_loss.as_f64().unwrap(), want_norm.as_f64().unwrap());
        println!(
            "{name} step {}: loss {:.8} (torch {want_loss:.8}, rel {:.1e}), norm {:.6} (torch {want_norm:.6})",
            s.step,
            s.loss,
            rel(s.loss, want_loss),
            s.grad_norm
        );
        assert_eq!((s.step, s.lr, s.skipped), (i as u64 + 1, lr, false));
        assert!(
            rel(s.loss, want_loss) < LOSS_TOL,
            "{name} step {}: loss {} vs torch {want_loss}",
            s.step,
            s.loss
        );
        assert!(
            rel(s.grad_norm, want_norm) < LOSS_TOL,
            "{name} step {}: norm {} vs torch {want_norm}",
            s.step,
            s.grad_norm
        );
    }
    assert_eq!(trainer.iteration(), 3);
    let (after, _, _) = trainer.model().loss(&batch).unwrap();
    let want_after = opt["loss_after_steps"].as_f64().unwrap();
    println!("{name} after 3 steps: loss {after:.8} (torch {want_after:.8})");
    assert!(
        rel(after, want_after) < LOSS_TOL,
        "{name}: loss after 3 steps {after} vs {want_after}"
    );

    // The stepped parameters, both the master copy and what the model computes with.
    let model_params = trainer.model().params.to_host().unwrap();
    for pname in opt["after_step3_params"].as_array().unwrap() {
        let pname = pname.as_str().unwrap();
        let want = &golden[&format!("after_step3.{pname}")].data;
        let e = norm_rel_err(&trainer.master()[pname].data, want);
        assert!(
            e < PARAM_TOL,
            "{name}: {pname} after 3 steps, relative error {e:.2e}"
        );
        assert_eq!(
            model_params[pname].data,
            trainer.master()[pname].data,
            "{pname}: model != master"
        );
    }
    assert!(trainer.optimizer().states().values().all(|s| s.step == 3));
}

#[test]
fn three_adamw_steps_match_transformers_dense_tied() {
    three_steps("dense_tied");
}

#[test]
fn three_adamw_steps_match_transformers_dense_untied() {
    three_steps("dense_untied");
}

#[test]
fn three_adamw_steps_match_transformers_moe() {
    three_steps("moe_norm_topk");
}
