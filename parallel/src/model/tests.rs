//! Model-level tests that the HF golden fixtures do not cover: packed sequences (segments and restarting
//! positions) in forward and backward, recomputation, parameter loading errors and the shape spec.

use std::collections::BTreeMap;

use qkernels::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::hf::HostTensor;

fn tiny(moe: bool, tied: bool) -> ModelConfig {
    let mut j = serde_json::json!({
        "model_type": "qwen3", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": tied
    });
    if moe {
        j["model_type"] = "qwen3_moe".into();
        j["num_experts"] = 4.into();
        j["num_experts_per_tok"] = 2.into();
        j["moe_intermediate_size"] = 16.into();
        j["norm_topk_prob"] = true.into();
        j["router_aux_loss_coef"] = 0.05.into();
        j["mlp_only_layers"] = serde_json::json!([1]); // one MoE layer, one dense layer
    }
    ModelConfig::from_json_value(&j, "tiny").unwrap()
}

fn ids(rng: &mut StdRng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// Two rows; row 0 packs three samples (5 + 4 + 3 tokens), row 1 holds one sample.
fn packed_batch(vocab: usize, seed: u64) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed);
    let seg = [vec![0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2], vec![7; 12]].concat();
    let scale: Vec<f32> = (0..24).map(|_| 0.5 + rng.random::<f32>()).collect();
    Batch::packed(ids(&mut rng, 24, vocab), seg, 2, 12)
        .unwrap()
        .scale_loss_weights(&scale)
        .unwrap()
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    d / n
}

#[test]
fn packed_samples_match_running_each_sample_alone() {
    for moe in [false, true] {
        let cfg = tiny(moe, true);
        let model = Qwen3Model::random(cfg.clone(), 3, 0.2, Device::Cpu).unwrap();
        let batch = packed_batch(cfg.vocab_size, 4);
        let packed = model.logits(&batch).unwrap().to_vec_f32().unwrap(); // [24, vocab]
        let v = cfg.vocab_size;
        for (start, len) in [(0, 5), (5, 4), (9, 3), (12, 12)] {
            let alone =
                Batch::causal_lm(batch.input_ids[start..start + len].to_vec(), 1, len).unwrap();
            let want = model.logits(&alone).unwrap().to_vec_f32().unwrap();
            let e = rel(&packed[start * v..(start + len) * v], &want);
            assert!(
                e < 1e-5,
                "moe={moe}: sample at {start}: packed logits differ from the lone run ({e:.2e})"
            );
        }
    }
}

/// Directional finite differences of the total loss, one random direction per parameter tensor.
fn check_gradients_by_finite_differences(moe: bool, tied: bool) {
    let cfg = tiny(moe, tied);
    let model = Qwen3Model::random(cfg.clone(), 11, 0.2, Device::Cpu).unwrap();
    let batch = packed_batch(cfg.vocab_size, 12);
    let step = model.forward_backward(&batch).unwrap();
    let (total, ce, aux) = model.loss(&batch).unwrap();
    assert_eq!(
        (total, ce, aux),
        (step.loss, step.ce_loss, step.aux_loss),
        "loss() and forward_backward agree"
    );
    assert_eq!(step.grads.contains_key("lm_head.weight"), !tied);
    let mut rng = StdRng::seed_from_u64(13);
    // f32 forward: eps 1e-2 shows O(eps²) truncation (~4%), 1e-3 f32 round-off (~0.3%); 2e-3 balances them.
    let eps = 2e-3f32;
    let mut worst = 0.0f64;
    for (name, g) in &step.grads {
        let n = g.elem_count();
        let dir: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        let analytic: f64 = g
            .to_vec_f32()
            .unwrap()
            .iter()
            .zip(&dir)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        let loss_at = |sign: f32| {
            let mut m = model.clone();
            m.params.visit_mut(&mut |n, t| {
                if &n == name {
                    let moved: Vec<f32> = t
                        .to_vec_f32()
                        .unwrap()
                        .iter()
                        .zip(&dir)
                        .map(|(x, d)| x + sign * eps * d)
                        .collect();
                    *t = Tensor::from_f32(moved, t.shape(), &Device::Cpu).unwrap();
                }
            });
            m.loss(&batch).unwrap().0
        };
        let fd = (loss_at(1.0) - loss_at(-1.0)) / (2.0 * eps as f64);
        let err = (fd - analytic).abs() / analytic.abs().max(1e-2);
        worst = worst.max(err);
        assert!(
            err < 1e-2,
            "moe={moe} tied={tied}: {name}: finite difference {fd:.6} vs analytic {analytic:.6}"
        );
    }
    println!(
        "moe={moe} tied={tied}: {} tensors, worst relative error {worst:.2e}",
        step.grads.len()
    );
}

#[test]
fn dense_gradients_match_finite_differences_on_packed_batch() {
    check_gradients_by_finite_differences(false, true);
}

#[test]
fn moe_gradients_match_finite_differences_on_packed_batch() {
    check_gradients_by_finite_differences(true, false);
}

#[test]
fn recomputation_gives_identical_gradients() {
    for moe in [false, true] {
        let cfg = tiny(moe, moe);
        let model = Qwen3Model::random(cfg.clone(), 21, 0.2, Device::Cpu).unwrap();
        let batch = packed_batch(cfg.vocab_size, 22);
        let plain = model.forward_backward(&batch).unwrap();
        let recomputed = model
            .clone()
            .with_gradient_checkpointing(true)
            .forward_backward(&batch)
            .unwrap();
        assert_eq!(plain.loss, recomputed.loss);
        assert_eq!(plain.aux_loss, recomputed.aux_loss);
        assert_eq!(plain.grads.len(), recomputed.grads.len());
        for (n, g) in &plain.grads {
            assert_eq!(
                g.to_vec_f32().unwrap(),
                recomputed.grads[n].to_vec_f32().unwrap(),
                "moe={moe}: {n} differs with recomputation"
            );
        }
    }
}

#[test]
fn shape_spec_matches_config_and_loading_checks_every_name() {
    let cfg = tiny(true, false);
    let spec = param_shapes(&cfg);
    let count: usize = spec.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    assert_eq!(count as u64, cfg.param_count());
    assert!(
        spec.iter().any(
            |(n, s)| n == "model.layers.0.mlp.experts.3.down_proj.weight" && s == &vec![32, 16]
        )
    );
    assert!(
        spec.iter()
            .any(|(n, s)| n == "model.layers.1.mlp.down_proj.weight" && s == &vec![32, 48])
    );
    assert!(
        spec.iter()
            .any(|(n, s)| n == "model.layers.0.mlp.gate.weight" && s == &vec![4, 32])
    );

    let host = |spec: &[(String, Vec<usize>)]| -> BTreeMap<String, HostTensor> {
        spec.iter()
            .map(|(n, s)| {
                let len = s.iter().product::<usize>();
                (
                    n.clone(),
                    HostTensor::new(
                        s.clone(),
                        (0..len).map(|i| 0.01 * (i % 7) as f32 - 0.02).collect(),
                    )
                    .unwrap(),
                )
            })
            .collect()
    };
    let model = Qwen3Model::from_host(cfg.clone(), host(&spec), Device::Cpu).unwrap();
    assert_eq!(model.params.to_named().len(), spec.len());

    let mut missing = host(&spec);
    missing.remove("model.layers.1.self_attn.k_norm.weight");
    let e = Qwen3Model::from_host(cfg.clone(), missing, Device::Cpu).unwrap_err();
    assert!(
        matches!(&e, ModelError::MissingParam { name } if name == "model.layers.1.self_attn.k_norm.weight"),
        "{e}"
    );

    let mut wrong = host(&spec);
    wrong.insert(
        "model.norm.weight".into(),
        HostTensor::new(vec![31], vec![1.0; 31]).unwrap(),
    );
    let e = Qwen3Model::from_host(cfg.clone(), wrong, Device::Cpu).unwrap_err();
    assert!(
        matches!(&e, ModelError::ParamShape { expected, .. } if expected == &vec![32]),
        "{e}"
    );

    let mut extra = host(&spec);
    extra.insert(
        "model.layers.9.mlp.up_proj.weight".into(),
        HostTensor::new(vec![1], vec![0.5]).unwrap(),
    );
    let e = Qwen3Model::from_host(cfg, extra, Device::Cpu).unwrap_err();
    assert!(
        matches!(&e, ModelError::UnexpectedParams { names } if names.len() == 1),
        "{e}"
    );

    // Tied: an lm_head equal to the embedding is accepted, a different one is not.
    let tied = tiny(false, true);
    let tspec = param_shapes(&tied);
    assert!(!tspec.iter().any(|(n, _)| n == "lm_head.weight"));
    let mut with_head = host(&tspec);
    let emb = with_head["model.embed_tokens.weight"].clone();
    with_head.insert("lm_head.weight".into(), emb.clone());
    assert!(Qwen3Model::from_host(tied.clone(), with_head.clone(), Device::Cpu).is_ok());
    let mut bad = emb;
    bad.data[0] += 1.0;
    with_head.insert("lm_head.weight".into(), bad);
    assert!(matches!(
        Qwen3Model::from_host(tied, with_head, Device::Cpu),
        Err(ModelError::TiedHeadMismatch)
    ));
}

#[test]
fn out_of_range_token_is_a_batch_error() {
    let cfg = tiny(false, true);
    let model = Qwen3Model::random(cfg, 1, 0.2, Device::Cpu).unwrap();
    let batch = Batch::causal_lm(vec![1, 2, 50], 1, 3).unwrap();
    assert!(matches!(model.logits(&batch), Err(ModelError::Batch(_))));
}
