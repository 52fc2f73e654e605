//! The optimizer against torch: tests/fixtures/optim (made by tests/fixtures/make_golden.py) holds 8 steps of
//! torch.optim.AdamW with clip_grad_norm_ and a Megatron warmup+cosine schedule, and the lr sequences of four
//! schedules.

use std::path::{Path, PathBuf};

use qparallel::hf::{self, TensorMap};
use qparallel::optim::{
    AdamW, AdamWConfig, DecayStyle, LrSchedule, ParamSlot, Warmup, clip_grad_norm,
};
use serde_json::Value;

fn golden() -> (TensorMap, Value) {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/optim");
    let tensors = hf::load_file(dir.join("golden.safetensors")).unwrap();
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    (tensors, info)
}

fn schedule(s: &Value) -> LrSchedule {
    LrSchedule::new(
        s["max_lr"].as_f64().unwrap(),
        s["min_lr"].as_f64().unwrap(),
        Warmup::Iters(s["lr_warmup_iters"].as_u64().unwrap()),
        s["lr_decay_iters"].as_u64().unwrap(),
        DecayStyle::parse(s["lr_decay_style"].as_str().unwrap()).unwrap(),
    )
    .unwrap()
}

/// Largest `|a − b| / max(|b|, 1e-3)` over the elements.
fn max_rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs() / (y.abs() as f64).max(1e-3))
        .fold(0.0, f64::max)
}

/// Largest `|a − b|` relative to the largest `|b|` of the tensor. Used for the Adam moments: `m` is a sum of
/// gradients with alternating signs, so its small elements carry the cancellation error of the larger terms.
fn max_err_rel_to_tensor(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .fold(0.0, f64::max)
        / scale
}

#[test]
fn schedules_match_golden_lrs() {
    let (_, info) = golden();
    let schedules = info["schedules"].as_object().unwrap();
    assert_eq!(schedules.len(), 4);
    for (name, s) in schedules {
        let sched = schedule(s);
        let want: Vec<f64> = s["lrs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (i, w) in want.iter().enumerate() {
            let got = sched.lr(i as u64);
            assert!(
                (got - w).abs() <= 1e-15 + 1e-12 * w.abs(),
                "{name} iteration {i}: {got} vs {w}"
            );
        }
    }
}

#[test]
fn adamw_with_clipping_and_cosine_matches_torch() {
    let (t, info) = golden();
    let adamw = &info["adamw"];
    let betas = adamw["betas"].as_array().unwrap();
    let mut opt = AdamW::new(AdamWConfig {
        beta1: betas[0].as_f64().unwrap(),
        beta2: betas[1].as_f64().unwrap(),
        eps: adamw["eps"].as_f64().unwrap(),
    })
    .unwrap();
    let sched = schedule(&info["schedules"][adamw["schedule"].as_str().unwrap()]);
    let max_norm = adamw["max_grad_norm"].as_f64().unwrap();
    let names = ["w_matrix", "w_tensor3", "norm_vec"];
    let wd: Vec<f64> = names
        .iter()
        .map(|n| info["params"][n]["weight_decay"].as_f64().unwrap())
        .collect();
    assert_eq!(wd, vec![0.1, 0.1, 0.0]);
    let mut params: Vec<Vec<f32>> = names
        .iter()
        .map(|n| t[&format!("init.{n}")].data.clone())
        .collect();
    let steps = adamw["steps"].as_u64().unwrap();
    let (mut clipped, mut unclipped) = (0, 0);
    let mut worst = 0.0f64;
    for it in 0..steps {
        let lr = sched.lr(it);
        let want_lr = adamw["lrs"][it as usize].as_f64().unwrap();
        assert!(
            (lr - want_lr).abs() <= 1e-15,
            "iteration {it}: lr {lr} vs {want_lr}"
        );
        let mut grads: Vec<Vec<f32>> = names
            .iter()
            .map(|n| t[&format!("grad.{it}.{n}")].data.clone())
            .collect();
        let norm = {
            let mut views: Vec<&mut [f32]> = grads.iter_mut().map(|g| g.as_mut_slice()).collect();
            clip_grad_norm(&mut views, max_norm)
        };
        let want_norm = adamw["grad_norms_before_clip"][it as usize]
            .as_f64()
            .unwrap();
        assert!(
            (norm - want_norm).abs() <= 1e-6 * want_norm,
            "iteration {it}: norm {norm} vs {want_norm}"
        );
        if norm > max_norm {
            clipped += 1
        } else {
            unclipped += 1
        }
        let mut slots: Vec<ParamSlot<'_>> = params
            .iter_mut()
            .zip(&grads)
            .zip(names.iter().zip(&wd))
            .map(|((p, g), (name, &weight_decay))| ParamSlot {
                name,
                param: p.as_mut_slice(),
                grad: g.as_slice(),
                weight_decay,
            })
            .collect();
        opt.step(lr, &mut slots).unwrap();
        for (n, p) in names.iter().zip(&params) {
            let err = max_rel_err(p, &t[&format!("param.{it}.{n}")].data);
            worst = worst.max(err);
            assert!(err <= 1e-6, "iteration {it}, {n}: relative error {err:e}");
        }
    }
    assert!(
        clipped >= 2 && unclipped >= 2,
        "golden must exercise both clipping branches"
    );
    for n in names {
        let st = opt.state(n).unwrap();
        assert_eq!(st.step, steps);
        let e1 = max_err_rel_to_tensor(&st.exp_avg, &t[&format!("exp_avg.{n}")].data);
        let e2 = max_err_rel_to_tensor(&st.exp_avg_sq, &t[&format!("exp_avg_sq.{n}")].data);
        assert!(
            e1 <= 1e-6 && e2 <= 1e-6,
            "{n}: exp_avg error {e1:e}, exp_avg_sq error {e2:e}"
        );
    }
    eprintln!("largest relative parameter error vs torch: {worst:e}");
}
