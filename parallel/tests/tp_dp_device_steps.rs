//! The training step `qcluster-gpu-bench tp-dp` runs on two GPUs, checked on CPU thread ranks: a [`TpModel`] per
//! rank, the DP gradient sum through `TpModel::reduce_dp_grads` (the device-aware `comm::tensor` collectives;
//! host path here), the global norm over TP (`TpModel::grad_norm`), clipping and AdamW on each rank's shard with
//! [`DeviceAdamW::step_params`] — against one rank running `Qwen3Model` + `DeviceAdamW::step` on the global batch,
//! over 3 steps. Every layout must give the single-rank losses within 1e-5 and the final parameters (gathered to
//! the HF layout) within 1e-4 norm-relative.

mod tp_support;

use qparallel::model::Qwen3Model;
use qparallel::optim::{AdamWConfig, DeviceAdamW};
use qparallel::tensor_parallel::{ParallelGroups, TpModel, split_batch_rows};
use tp_support::{Layout, batch, fixture_model, rel, rel_err, run_ranks};

const STEPS: usize = 3;
const LR: f64 = 1e-3;
const CLIP: f64 = 1.0;
const WD: f64 = 0.1;

fn check(fixture: &str, layouts: &[Layout]) {
    let full = fixture_model(fixture);
    let global = batch(full.config.vocab_size, 5);
    // Reference: one rank, the whole batch.
    let mut single = Qwen3Model::new(
        full.config.clone(),
        full.params.clone(),
        qkernels::Device::Cpu,
    );
    let mut opt = DeviceAdamW::new(&single, AdamWConfig::default(), WD).unwrap();
    let mut want_losses = Vec::new();
    let mut want_norms = Vec::new();
    for _ in 0..STEPS {
        let out = single.forward_backward(&global).unwrap();
        want_losses.push(out.loss);
        let rep = opt.step(&mut single, &out.grads, LR, CLIP).unwrap();
        want_norms.push(rep.grad_norm);
    }
    for &layout in layouts {
        let dims = layout.dims();
        let cfg = &full.config;
        let results = run_ranks(layout.world(), |rank, world| {
            let groups = ParallelGroups::new(&world, &dims, cfg).unwrap();
            let mut model = TpModel::from_full(cfg, &full.params, dims, rank, groups).unwrap();
            let local = split_batch_rows(&global, dims.dp(), model.dp_rank()).unwrap();
            let mut opt =
                DeviceAdamW::for_params(&model.params, AdamWConfig::default(), WD).unwrap();
            let mut losses = Vec::new();
            let mut norms = Vec::new();
            for _ in 0..STEPS {
                let mut out = model.forward_backward(&local).unwrap();
                losses.push(out.loss);
                model.reduce_dp_grads(&mut out.grads).unwrap();
                let norm = model.grad_norm(&out.grads).unwrap();
                norms.push(norm);
                opt.step_params(&mut model.params, &out.grads, LR, CLIP, norm)
                    .unwrap();
            }
            let params: Vec<(String, Vec<f32>)> = model
                .gather_full_params()
                .unwrap()
                .named()
                .into_iter()
                .map(|(n, t)| (n, t.to_vec_f32().unwrap()))
                .collect();
            (losses, norms, params)
        });
        let (losses, norms, params) = &results[0];
        for s in 0..STEPS {
            let e = rel(losses[s], want_losses[s]);
            assert!(
                e < 1e-5,
                "{fixture} {layout}: step {s} loss {} vs {} ({e:.2e})",
                losses[s],
                want_losses[s]
            );
            let e = rel(norms[s], want_norms[s]);
            assert!(
                e < 1e-4,
                "{fixture} {layout}: step {s} norm {} vs {} ({e:.2e})",
                norms[s],
                want_norms[s]
            );
        }
        let want = single.params.named();
        assert_eq!(
            params.len(),
            want.len(),
            "{fixture} {layout}: parameter count"
        );
        let mut worst = 0.0f64;
        for ((n, got), (wn, w)) in params.iter().zip(&want) {
            assert_eq!(n, wn);
            let e = rel_err(got, &w.to_vec_f32().unwrap());
            assert!(
                e < 1e-4,
                "{fixture} {layout}: {n} after {STEPS} steps: rel err {e:.2e}"
            );
            worst = worst.max(e);
        }
        println!(
            "{fixture} {layout}: {STEPS} steps, losses {losses:?}, worst parameter rel err {worst:.2e}"
        );
    }
}

const LAYOUTS: [Layout; 3] = [
    Layout::new(1, 2, false),
    Layout::new(1, 2, true),
    Layout::new(2, 1, false),
];

#[test]
fn dense_tied_tp2_sp_dp2_steps_match_single_rank() {
    check("dense_tied", &LAYOUTS);
}

#[test]
fn dense_untied_kv_replicated_steps_match_single_rank() {
    // One kv head: tp2 replicates it (the kv replica group reduction).
    check("dense_untied", &LAYOUTS);
}

#[test]
fn moe_steps_match_single_rank() {
    check("moe_norm_topk", &LAYOUTS);
}
