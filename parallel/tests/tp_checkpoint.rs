//! Checkpoints keep the HF full layout under any parallel layout, and the ranks can be real TCP peers:
//! train 2 ZeRO-1 steps on dp=2·tp=2+sp over the TCP transport (threads as rank processes on 127.0.0.1), gather
//! the full parameters, save them as an HF checkpoint, load it back as a single-device model, and continue on a
//! *different* layout (tp=4, kv heads replicated) built from the loaded full weights: its loss and gradients must
//! match the single-rank run of the loaded model.

mod comm_support;
mod tp_support;

use qkernels::Device;
use qparallel::hf::{self, DiskDtype, SaveOptions};
use qparallel::model::Qwen3Model;
use qparallel::optim::AdamWConfig;
use qparallel::tensor_parallel::{ParallelGroups, TpModel, split_batch_rows};
use qparallel::zero::{DistributedOptimizer, ZeroConfig};
use tp_support::{Layout, batch, fixture_model, rel, rel_err, run_ranks};

#[test]
fn hf_checkpoint_from_one_layout_resumes_on_another() {
    let full = fixture_model("dense_tied");
    let cfg = full.config.clone();
    let layout = Layout::new(2, 2, true);
    let dims = layout.dims();
    let comms = comm_support::tcp_world(layout.world(), comm_support::TEST_TIMEOUT);
    let gathered = comm_support::spmd(comms, |world| {
        let rank = world.global_rank();
        let groups = ParallelGroups::new(&world, &dims, &cfg).unwrap();
        let mut model = TpModel::from_full(&cfg, &full.params, dims, rank, groups).unwrap();
        let mut opt =
            DistributedOptimizer::new(ZeroConfig::default(), AdamWConfig::default(), &model)
                .unwrap();
        for step in 0..2 {
            let global = batch(cfg.vocab_size, 200 + step);
            let local = split_batch_rows(&global, dims.dp(), model.dp_rank()).unwrap();
            let out = model.forward_backward(&local).unwrap();
            opt.step(&mut model, &out.grads, 1e-2).unwrap();
        }
        model.gather_full_params().unwrap()
    });
    // Every rank gathered the same full parameters.
    let host: Vec<_> = gathered.iter().map(|p| p.to_host().unwrap()).collect();
    for (r, h) in host.iter().enumerate() {
        assert_eq!(h, &host[0], "rank {r} gathered different parameters");
    }
    assert!(
        rel_err(
            &host[0]["model.norm.weight"].data,
            &full.params.norm.to_vec_f32().unwrap()
        ) > 1e-3,
        "training moved the parameters"
    );

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("step-2");
    hf::save_checkpoint(
        &dir,
        &host[0],
        &SaveOptions::new(DiskDtype::F32).config(cfg.to_hf_json()),
    )
    .unwrap();
    let loaded = Qwen3Model::from_hf_dir(&dir, Device::Cpu).unwrap();
    assert_eq!(
        loaded.params.to_host().unwrap(),
        host[0],
        "f32 round trip is exact"
    );

    let next = batch(cfg.vocab_size, 300);
    let want = loaded.forward_backward(&next).unwrap();
    let layout = Layout::new(1, 4, false);
    let dims = layout.dims();
    let results = run_ranks(layout.world(), |rank, world| {
        let groups = ParallelGroups::new(&world, &dims, &loaded.config).unwrap();
        let model = TpModel::from_full(&loaded.config, &loaded.params, dims, rank, groups).unwrap();
        let out = model.forward_backward(&next).unwrap();
        let grads = model
            .gather_full(&model.grads_as_params(&out.grads).unwrap())
            .unwrap();
        (out.loss, grads.to_named())
    });
    let (loss, grads) = &results[0];
    println!(
        "resumed on {layout}: loss {loss:.8} vs single-rank {:.8}",
        want.loss
    );
    assert!(rel(*loss, want.loss) < 1e-5);
    for (name, g) in grads {
        let e = rel_err(
            &g.to_vec_f32().unwrap(),
            &want.grads[name].to_vec_f32().unwrap(),
        );
        assert!(e < 1e-4, "{name}: rel err {e:.2e}");
    }
}
