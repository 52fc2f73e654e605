//! Parity with Hugging Face transformers (PyTorch, f32, CPU) on the golden fixtures in `tests/fixtures/`
//! (made by `tests/fixtures/make_golden.py`; see that script's docstring for every key).
//!
//! For each tiny model (dense tied / untied, MoE with and without `norm_topk_prob`) our CPU f32 model must
//! reproduce transformers' logits, every decoder layer's output, the CE / aux / total losses, and the gradient
//! of the total loss for every parameter, each within a norm-relative error `‖ours − hf‖ / ‖hf‖`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use qkernels::Device;
use qparallel::hf::{self, HostTensor};
use qparallel::model::{Batch, Qwen3Model};

/// Logits and layer outputs: f32 forward of the same maths, only summation order differs (observed ≤ 7e-7).
const FWD_TOL: f64 = 5e-6;
/// Losses (observed ≤ 1.1e-7).
const LOSS_TOL: f64 = 1e-6;
/// Gradients: longer chains of f32 ops (observed ≤ 1.4e-6); a real bug shows up as O(1e-2) or worse.
const GRAD_TOL: f64 = 1e-5;

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// `‖ours − theirs‖ / ‖theirs‖`; when `theirs` is all zeros (an expert no token was routed to has a zero
/// gradient) the absolute `‖ours‖`, so that must be zero too.
fn rel_err(ours: &[f32], theirs: &[f32]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let diff: f64 = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = theirs
        .iter()
        .map(|b| (*b as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 { diff } else { diff / norm }
}

fn check_scalar(what: &str, ours: f64, theirs: f64) {
    let e = (ours - theirs).abs() / theirs.abs();
    println!("{what}: ours {ours:.8} hf {theirs:.8} rel {e:.2e}");
    assert!(
        e < LOSS_TOL,
        "{what}: ours {ours} vs hf {theirs} (relative {e:.2e})"
    );
}

fn run(name: &str, gradient_checkpointing: bool) {
    let dir = fixture_dir(name);
    let model = Qwen3Model::from_hf_dir(&dir, Device::Cpu)
        .unwrap()
        .with_gradient_checkpointing(gradient_checkpointing);
    let config = model.config.clone();
    let golden_path = dir.join("golden.safetensors");
    let golden =
        hf::load_file_filtered(&golden_path, |n| n != "input_ids" && n != "labels").unwrap();
    let (shape, ids) = hf::read_i64_tensor(&golden_path, "input_ids").unwrap();
    let (_, labels) = hf::read_i64_tensor(&golden_path, "labels").unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();

    let (b, s) = (shape[0], shape[1]);
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let batch = Batch::from_labels(ids, &labels, b, s)
        .unwrap()
        .scale_loss_weights(&golden["loss_weights"].data)
        .unwrap();

    // Forward: logits and every layer's output.
    let trace = model.forward_trace(&batch).unwrap();
    let e = rel_err(&trace.logits.to_vec_f32().unwrap(), &golden["logits"].data);
    println!("{name}: logits rel err {e:.2e}");
    assert!(e < FWD_TOL, "{name}: logits relative error {e:.2e}");
    for (i, out) in trace.layer_outputs.iter().enumerate() {
        let e = rel_err(
            &out.to_vec_f32().unwrap(),
            &golden[&format!("layer_out.{i}")].data,
        );
        assert!(
            e < FWD_TOL,
            "{name}: layer {i} output relative error {e:.2e}"
        );
    }

    // Losses and gradients.
    let step = model.forward_backward(&batch).unwrap();
    check_scalar(
        &format!("{name}: ce_loss"),
        step.ce_loss,
        info["ce_loss"].as_f64().unwrap(),
    );
    check_scalar(
        &format!("{name}: total_loss"),
        step.loss,
        info["total_loss"].as_f64().unwrap(),
    );
    if config.is_moe() {
        check_scalar(
            &format!("{name}: aux_loss"),
            step.aux_loss.unwrap(),
            info["aux_loss"].as_f64().unwrap(),
        );
    } else {
        assert!(step.aux_loss.is_none());
    }

    let hf_grads: BTreeMap<&str, &HostTensor> = golden
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("grad.").map(|n| (n, v)))
        .collect();
    let ours: Vec<&str> = step.grads.keys().map(String::as_str).collect();
    let theirs: Vec<&str> = hf_grads.keys().copied().collect();
    assert_eq!(ours, theirs, "{name}: gradient names differ");
    let mut worst = (0.0f64, "");
    let mut zero = 0;
    for (n, g) in &step.grads {
        let hf = hf_grads[n.as_str()];
        zero += hf.data.iter().all(|&v| v == 0.0) as usize;
        assert_eq!(g.shape(), hf.shape.as_slice(), "{name}: {n} shape");
        let e = rel_err(&g.to_vec_f32().unwrap(), &hf.data);
        assert!(e < GRAD_TOL, "{name}: grad {n} relative error {e:.2e}");
        if e > worst.0 {
            worst = (e, n);
        }
    }
    println!(
        "{name}: {} gradients ({zero} exactly zero in HF), worst rel err {:.2e} ({})",
        step.grads.len(),
        worst.0,
        worst.1
    );
}

#[test]
fn dense_tied_matches_transformers() {
    run("dense_tied", false);
}

#[test]
fn dense_untied_matches_transformers() {
    run("dense_untied", false);
}

#[test]
fn moe_norm_topk_matches_transformers() {
    run("moe_norm_topk", false);
}

#[test]
fn moe_no_norm_topk_matches_transformers() {
    run("moe_no_norm_topk", false);
}

#[test]
fn moe_with_gradient_checkpointing_matches_transformers() {
    run("moe_norm_topk", true);
}
