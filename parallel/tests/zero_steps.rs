//! ZeRO-1 distributed optimizer against a single-rank AdamW: 3 optimizer steps (with global grad-norm clipping
//! active) from the same full weights must give the single-rank losses within 1e-5 relative at every step, and the
//! same final parameters (gathered back to the HF layout) within 1e-4.
//!
//! The reference is built from `optim`'s pieces directly (`clip_grad_norm` over every gradient, `AdamW::step` over
//! every full parameter), not from the distributed optimizer with one rank. Both ZeRO-1 implementations are
//! checked: the host one ([`DistributedOptimizer`]) and the device one ([`DeviceDistributedOptimizer`], here on
//! CPU tensors: same flat layout, tensor collectives, multi-tensor AdamW).

mod tp_support;

use qparallel::model::{NamedTensors, Qwen3Model};
use qparallel::optim::{AdamW, AdamWConfig, ParamSlot, clip_grad_norm, decays};
use qparallel::tensor_parallel::{ParallelGroups, TpModel, split_batch_rows};
use qparallel::zero::{DeviceDistributedOptimizer, DistributedOptimizer, ZeroConfig};
use tp_support::{
    Layout, adamw_step, assert_params_close, batch, clip, fixture_model, host_grads, rel, rel_err,
    run_ranks,
};

const STEPS: usize = 3;
const LR: f64 = 1e-2;
/// Small enough that every step clips (the tiny models' gradient norms are O(1)).
const MAX_NORM: f64 = 0.5;
const WD: f64 = 0.1;

fn zero_config() -> ZeroConfig {
    ZeroConfig {
        weight_decay: WD,
        max_grad_norm: Some(MAX_NORM),
    }
}

/// Single-rank training: `(loss, pre-clip grad norm)` per step and the final parameters by name.
fn reference(full: &Qwen3Model) -> (Vec<(f64, f64)>, NamedTensors) {
    let mut model = full.clone();
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let mut out = Vec::new();
    for step in 0..STEPS {
        let b = batch(model.config.vocab_size, 100 + step as u64);
        let res = model.forward_backward(&b).unwrap();
        let mut grads = host_grads(&res.grads);
        let norm = clip(&mut grads, MAX_NORM);
        adamw_step(&mut model, &mut opt, LR, WD, &grads);
        out.push((res.loss, norm));
    }
    (out, model.params.to_named())
}

/// Which ZeRO-1 optimizer a run uses.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Zero {
    Host,
    Device,
}

/// Either optimizer behind one step call.
enum AnyZero {
    Host(DistributedOptimizer),
    Device(DeviceDistributedOptimizer),
}

impl AnyZero {
    fn new(kind: Zero, model: &TpModel) -> AnyZero {
        match kind {
            Zero::Host => AnyZero::Host(
                DistributedOptimizer::new(zero_config(), AdamWConfig::default(), model).unwrap(),
            ),
            Zero::Device => {
                let dp = &*model.groups().dp;
                AnyZero::Device(
                    DeviceDistributedOptimizer::for_params(
                        zero_config(),
                        AdamWConfig::default(),
                        &model.params,
                        dp.size(),
                        dp.rank(),
                        &|n| model.counts_in_norm(n),
                    )
                    .unwrap(),
                )
            }
        }
    }

    /// Over any parameter set, every tensor counted in the norm.
    fn for_params(
        kind: Zero,
        cfg: ZeroConfig,
        p: &qparallel::model::Qwen3Params,
        dp: usize,
        rank: usize,
    ) -> AnyZero {
        let adam = AdamWConfig::default();
        match kind {
            Zero::Host => AnyZero::Host(
                DistributedOptimizer::for_params(cfg, adam, p, dp, rank, &|_| true).unwrap(),
            ),
            Zero::Device => AnyZero::Device(
                DeviceDistributedOptimizer::for_params(cfg, adam, p, dp, rank, &|_| true).unwrap(),
            ),
        }
    }

    fn step_with(
        &mut self,
        p: &mut qparallel::model::Qwen3Params,
        grads: NamedTensors,
        dp: &dyn qparallel::comm::Communicator,
    ) -> qparallel::zero::StepStats {
        match self {
            AnyZero::Host(o) => o.step_with(p, &grads, LR, dp, &[]).unwrap(),
            AnyZero::Device(o) => o.step_with(p, grads, LR, dp, &[]).unwrap(),
        }
    }

    fn shard_range(&self) -> (std::ops::Range<usize>, usize) {
        match self {
            AnyZero::Host(o) => o.shard_range(),
            AnyZero::Device(o) => o.shard_range(),
        }
    }

    fn step(&mut self, model: &mut TpModel, grads: NamedTensors) -> qparallel::zero::StepStats {
        match self {
            AnyZero::Host(o) => o.step(model, &grads, LR).unwrap(),
            AnyZero::Device(o) => {
                let (params, groups) = model.params_and_groups_mut();
                o.step_with(params, grads, LR, &*groups.dp, &[&*groups.tp])
                    .unwrap()
            }
        }
    }

    fn steps(&self) -> u64 {
        match self {
            AnyZero::Host(o) => o.steps(),
            AnyZero::Device(o) => o.steps(),
        }
    }
}

/// The same 3 steps on `layout` with the distributed optimizer `kind`; rank 0's `(loss, grad norm)` per step and
/// the final full parameters.
fn distributed(full: &Qwen3Model, layout: Layout, kind: Zero) -> (Vec<(f64, f64)>, NamedTensors) {
    let dims = layout.dims();
    let cfg = &full.config;
    let mut results = run_ranks(layout.world(), |rank, world| {
        let groups = ParallelGroups::new(&world, &dims, cfg).unwrap();
        let mut model = TpModel::from_full(cfg, &full.params, dims, rank, groups).unwrap();
        let mut opt = AnyZero::new(kind, &model);
        // Each DP rank holds about 1/dp of the flat buffer.
        let (shard, padded) = opt.shard_range();
        assert_eq!(shard.len() * dims.dp(), padded);
        let mut out = Vec::new();
        for step in 0..STEPS {
            let global = batch(cfg.vocab_size, 100 + step as u64);
            let local = split_batch_rows(&global, dims.dp(), model.dp_rank()).unwrap();
            let res = model.forward_backward(&local).unwrap();
            let stats = opt.step(&mut model, res.grads);
            assert!(!stats.skipped);
            assert!(
                stats.clip_coef < 1.0,
                "step {step}: clipping should be active"
            );
            out.push((res.loss, stats.grad_norm));
        }
        assert_eq!(opt.steps(), STEPS as u64);
        (out, model.gather_full_params().unwrap().to_named())
    });
    results.swap_remove(0)
}

fn check(fixture: &str, layouts: &[Layout], kinds: &[Zero]) {
    let full = fixture_model(fixture);
    let (want, want_params) = reference(&full);
    for &layout in layouts {
        for &kind in kinds {
            let name = format!("{fixture} {layout} {kind:?}");
            let (got, params) = distributed(&full, layout, kind);
            for (step, ((l, n), (wl, wn))) in got.iter().zip(&want).enumerate() {
                println!(
                    "{name} step {step}: loss {l:.8} vs {wl:.8} (rel {:.2e}), grad norm {n:.6} vs {wn:.6}",
                    rel(*l, *wl)
                );
                assert!(rel(*l, *wl) < 1e-5, "{name} step {step}: loss {l} vs {wl}");
                assert!(rel(*n, *wn) < 1e-5, "{name} step {step}: norm {n} vs {wn}");
            }
            assert_params_close(&name, &params, &want_params, 1e-4);
            // Training moved the parameters (the test would be vacuous otherwise).
            let moved = rel_err(
                &params["model.norm.weight"].to_vec_f32().unwrap(),
                &full.params.norm.to_vec_f32().unwrap(),
            );
            assert!(
                moved > 1e-3,
                "{name}: parameters barely moved ({moved:.2e})"
            );
        }
    }
}

#[test]
fn zero1_dense_matches_single_rank_adamw() {
    check(
        "dense_tied",
        &[
            Layout::new(2, 1, false),
            Layout::new(2, 2, false),
            Layout::new(2, 2, true),
        ],
        &[Zero::Host, Zero::Device],
    );
}

#[test]
fn zero1_dense_untied_tp4_kv_replicated_matches_single_rank_adamw() {
    check(
        "dense_untied",
        &[Layout::new(2, 2, false), Layout::new(1, 4, true)],
        &[Zero::Host, Zero::Device],
    );
}

#[test]
fn zero1_moe_matches_single_rank_adamw() {
    check(
        "moe_norm_topk",
        &[Layout::new(2, 1, false), Layout::new(2, 2, true)],
        &[Zero::Host, Zero::Device],
    );
}

/// Uneven flat length (padding), four DP ranks with *different* gradients (so the reduce-scatter sums real
/// data), parameters straddling shard boundaries: two steps equal AdamW on the summed full gradient. A non-finite
/// gradient skips the step on every rank and changes nothing. Both optimizers.
#[test]
fn zero1_uneven_shards_and_skipped_step() {
    use qkernels::{Device, Tensor};
    use qparallel::model::{ModelConfig, Qwen3Params};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    let cfg = ModelConfig::from_json_value(
        &serde_json::json!({
            "model_type": "qwen3", "vocab_size": 11, "hidden_size": 6, "intermediate_size": 5,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 3,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false
        }),
        "odd",
    )
    .unwrap();
    let params = Qwen3Params::random(&cfg, 1, 0.3, &Device::Cpu).unwrap();
    let dp = 4; // 354 values: padded to 356
    let grads_of = |rank: usize, step: usize, poison: bool| -> NamedTensors {
        let mut rng = StdRng::seed_from_u64((rank * 10 + step) as u64);
        params
            .named()
            .into_iter()
            .map(|(n, t)| {
                let mut v: Vec<f32> = (0..t.elem_count())
                    .map(|_| rng.random::<f32>() - 0.5)
                    .collect();
                if poison && n == "model.norm.weight" {
                    v[0] = f32::NAN;
                }
                (n, Tensor::from_f32(v, t.shape(), &Device::Cpu).unwrap())
            })
            .collect()
    };
    let cfgz = ZeroConfig {
        weight_decay: WD,
        max_grad_norm: Some(1.0),
    };

    // Reference: AdamW on Σ_ranks grads, clipped.
    let mut want: Vec<(String, Vec<usize>, Vec<f32>)> = params
        .named()
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec(), t.to_vec_f32().unwrap()))
        .collect();
    let mut adam = AdamW::new(AdamWConfig::default()).unwrap();
    for step in 0..2 {
        let per_rank: Vec<NamedTensors> = (0..dp).map(|r| grads_of(r, step, false)).collect();
        let mut sums: Vec<Vec<f32>> = want
            .iter()
            .map(|(n, _, _)| {
                let mut s = per_rank[0][n].to_vec_f32().unwrap();
                for g in &per_rank[1..] {
                    for (a, b) in s.iter_mut().zip(g[n].to_vec_f32().unwrap()) {
                        *a += b;
                    }
                }
                s
            })
            .collect();
        let mut views: Vec<&mut [f32]> = sums.iter_mut().map(|v| v.as_mut_slice()).collect();
        clip_grad_norm(&mut views, 1.0);
        let mut slots: Vec<ParamSlot<'_>> = want
            .iter_mut()
            .zip(&sums)
            .map(|((n, shape, p), g)| ParamSlot {
                name: n.as_str(),
                param: p.as_mut_slice(),
                grad: g.as_slice(),
                weight_decay: if decays(shape) { WD } else { 0.0 },
            })
            .collect();
        adam.step(LR, &mut slots).unwrap();
    }

    for kind in [Zero::Host, Zero::Device] {
        let results = run_ranks(dp, |rank, world| {
            let mut p = params.clone();
            let mut opt = AnyZero::for_params(kind, cfgz, &p, dp, rank);
            let (shard, padded) = opt.shard_range();
            let n: usize = params.named().iter().map(|(_, t)| t.elem_count()).sum();
            assert!(
                padded > n && padded % dp == 0,
                "padding exercised: {n} -> {padded}"
            );
            assert_eq!(shard.len(), padded / dp);
            for step in 0..2 {
                let s = opt.step_with(&mut p, grads_of(rank, step, false), &world);
                assert!(s.clip_coef < 1.0 && !s.skipped);
            }
            let before = p.to_named();
            let s = opt.step_with(&mut p, grads_of(rank, 9, rank == 1), &world);
            assert!(s.skipped && s.grad_norm.is_nan(), "{s:?}");
            for (name, t) in p.named() {
                assert_eq!(
                    t.to_vec_f32().unwrap(),
                    before[&name].to_vec_f32().unwrap(),
                    "{name}"
                );
            }
            assert_eq!(opt.steps(), 2);
            p.named()
                .into_iter()
                .map(|(n, t)| (n, t.to_vec_f32().unwrap()))
                .collect::<Vec<_>>()
        });
        for got in results {
            for ((n, g), (wn, _, w)) in got.iter().zip(&want) {
                assert_eq!(n, wn);
                let e = rel_err(g, w);
                assert!(e < 1e-6, "{kind:?} {n}: rel err {e:.2e}");
            }
        }
    }
}
