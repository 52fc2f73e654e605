//! Pipeline parallelism (1F1B and interleaved 1F1B) composed with TP/SP and DP against the single-rank run, over 3
//! optimizer steps: the full model is built once (golden fixture weights, or a random 4-layer config when the
//! fixtures' 2 layers are too few), sliced per rank (`PipelineModel::from_full`), run on thread ranks with the
//! ZeRO-1 optimizer; at every step the loss must be the single-rank loss within 1e-5 relative and every gradient
//! (reduced over DP, gathered over PP and TP back to the HF layout) within 1e-4 norm-relative; the final parameters
//! within 1e-4.
//!
//! The single-rank reference accumulates the same global micro-batches as the trainer does
//! (`g = Σ_m (W_m/W)·∇loss(b_m)`, AdamW on the clipped sum). Every layout here uses `micro_batch_size·dp = 2`, so the
//! 8-row global batch is the same 4 global micro-batches for all of them.
//!
//! Layouts: pp2 (1F1B), pp2·vpp2 (interleaved), pp4, and the 8-rank tp2·pp2·dp2 (+sp; with vpp2 on 4 layers) — on
//! dense tied, dense untied and MoE models.

mod tp_support;

use qkernels::Device;
use qparallel::dims::{ParallelConfig, ParallelDims};
use qparallel::model::{Batch, ModelConfig, NamedTensors, Qwen3Model};
use qparallel::optim::{AdamW, AdamWConfig};
use qparallel::pipeline::{
    Action, PipelineError, PipelineGroups, PipelineModel, global_micro_batch, micro_batches,
    schedule,
};
use qparallel::tensor_parallel::mappings;
use qparallel::zero::ZeroConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tp_support::{
    adamw_step, assert_bit_identical, assert_params_close, clip, fixture_model, rel, rel_err,
    run_ranks,
};

const STEPS: usize = 3;
const LR: f64 = 1e-2;
const MAX_NORM: f64 = 0.5;
const WD: f64 = 0.1;
const LOSS_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;
/// Global batch: 8 rows of 8 tokens; `micro_batch_size·dp = 2` rows per global micro-batch → 4 micro-batches.
const ROWS: usize = 8;
const SEQ: usize = 8;
const ROWS_PER_MICRO: usize = 2;

#[derive(Debug, Clone, Copy)]
struct Layout {
    dp: usize,
    tp: usize,
    pp: usize,
    vpp: usize,
    sp: bool,
}

impl Layout {
    const fn new(dp: usize, tp: usize, pp: usize, vpp: usize, sp: bool) -> Self {
        Layout {
            dp,
            tp,
            pp,
            vpp,
            sp,
        }
    }
    fn world(&self) -> usize {
        self.dp * self.tp * self.pp
    }
    fn dims(&self) -> ParallelDims {
        ParallelDims::new(
            self.world(),
            ParallelConfig {
                tp: self.tp,
                pp: self.pp,
                vpp: self.vpp,
                sp: self.sp,
                ..Default::default()
            },
        )
        .unwrap()
    }
    fn micro_batch_size(&self) -> usize {
        ROWS_PER_MICRO / self.dp
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dp={} tp={}{} pp={} vpp={}",
            self.dp,
            self.tp,
            if self.sp { "+sp" } else { "" },
            self.pp,
            self.vpp
        )
    }
}

const PP2: Layout = Layout::new(1, 1, 2, 1, false);
const PP2_VPP2: Layout = Layout::new(1, 1, 2, 2, false);
const PP4: Layout = Layout::new(1, 1, 4, 1, false);
const TP2_PP2_DP2_SP: Layout = Layout::new(2, 2, 2, 1, true);
const TP2_PP2_DP2: Layout = Layout::new(2, 2, 2, 1, false);
const TP2_PP2_VPP2_DP2_SP: Layout = Layout::new(2, 2, 2, 2, true);
/// No pipeline: the same executor as plain gradient accumulation over the micro-batches.
const TP2_DP2_SP: Layout = Layout::new(2, 2, 1, 1, true);

/// Rows 0, 3 and 6 pack two samples; loss weights in [0.5, 1.5) with a few zeros, so the global normalisation and
/// the micro-batch weights `W_m` differ. Deterministic in `seed`.
fn global_batch(vocab: usize, seed: u64) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed);
    let ids: Vec<u32> = (0..ROWS * SEQ)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    let seg: Vec<u32> = (0..ROWS)
        .flat_map(|r| (0..SEQ).map(move |t| if r % 3 == 0 { u32::from(t >= 5) } else { 0 }))
        .collect();
    let scale: Vec<f32> = (0..ROWS * SEQ)
        .map(|i| {
            if i % 11 == 4 {
                0.0
            } else {
                0.5 + rng.random::<f32>()
            }
        })
        .collect();
    Batch::packed(ids, seg, ROWS, SEQ)
        .unwrap()
        .scale_loss_weights(&scale)
        .unwrap()
}

/// A random 4-layer config (pp2·vpp2 and pp4 need 4 layers; the fixtures have 2).
fn random_model(kind: &str) -> Qwen3Model {
    let mut j = serde_json::json!({
        "model_type": "qwen3", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": kind != "dense_untied"
    });
    if kind == "moe" {
        // Layer 2 dense, the others MoE; a large aux coefficient so its routing statistics across stages matter.
        let o = j.as_object_mut().unwrap();
        o.insert("model_type".into(), "qwen3_moe".into());
        o.insert("num_experts".into(), 4.into());
        o.insert("num_experts_per_tok".into(), 2.into());
        o.insert("moe_intermediate_size".into(), 16.into());
        o.insert("norm_topk_prob".into(), true.into());
        o.insert("router_aux_loss_coef".into(), 0.5.into());
        o.insert("mlp_only_layers".into(), serde_json::json!([2]));
    }
    let cfg = ModelConfig::from_json_value(&j, kind).unwrap();
    Qwen3Model::random(cfg, 17, 0.2, Device::Cpu).unwrap()
}

/// One reference step: `(loss, Σ_m (W_m/W)·grads_m)` over the 4 global micro-batches.
fn reference_grads(model: &Qwen3Model, global: &Batch) -> (f64, Vec<(String, Vec<f32>)>) {
    let mbs: Vec<Batch> = (0..ROWS / ROWS_PER_MICRO)
        .map(|m| global_micro_batch(global, ROWS_PER_MICRO, 1, m).unwrap())
        .collect();
    let w: Vec<f64> = mbs
        .iter()
        .map(|b| b.loss_weights.iter().map(|&x| x as f64).sum())
        .collect();
    let total: f64 = w.iter().sum();
    let mut loss = 0.0;
    let mut acc: Vec<(String, Vec<f32>)> = Vec::new();
    for (b, wm) in mbs.iter().zip(&w) {
        let out = model.forward_backward(b).unwrap();
        let frac = wm / total;
        loss += frac * out.loss;
        for (i, (name, g)) in out.grads.iter().enumerate() {
            let g: Vec<f32> = g
                .to_vec_f32()
                .unwrap()
                .into_iter()
                .map(|x| x * frac as f32)
                .collect();
            if acc.len() <= i {
                acc.push((name.clone(), g));
            } else {
                acc[i].1.iter_mut().zip(g).for_each(|(a, b)| *a += b);
            }
        }
    }
    (loss, acc)
}

/// Per step of the single-rank run.
struct RefStep {
    loss: f64,
    grad_norm: f64,
    grads: Vec<(String, Vec<f32>)>,
}

fn reference(full: &Qwen3Model) -> (Vec<RefStep>, NamedTensors) {
    let mut model = full.clone();
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let mut out = Vec::new();
    for step in 0..STEPS {
        let global = global_batch(model.config.vocab_size, 100 + step as u64);
        let (loss, grads) = reference_grads(&model, &global);
        let mut clipped = grads.clone();
        let grad_norm = clip(&mut clipped, MAX_NORM);
        adamw_step(&mut model, &mut opt, LR, WD, &clipped);
        out.push(RefStep {
            loss,
            grad_norm,
            grads,
        });
    }
    (out, model.params.to_named())
}

/// Per step on one rank: `(loss, grad norm, full gradients)`.
type StepResult = (f64, f64, Vec<(String, Vec<f32>)>);

fn distributed(full: &Qwen3Model, layout: Layout) -> (Vec<StepResult>, NamedTensors) {
    let dims = layout.dims();
    let cfg = &full.config;
    let mut results = run_ranks(layout.world(), |rank, world| {
        let groups = PipelineGroups::new(&world, &dims, cfg).unwrap();
        let mut model = PipelineModel::from_full(cfg, &full.params, dims, rank, groups).unwrap();
        let mut opt = model
            .optimizer(
                ZeroConfig {
                    weight_decay: WD,
                    max_grad_norm: Some(MAX_NORM),
                },
                AdamWConfig::default(),
            )
            .unwrap();
        let mut out = Vec::new();
        for step in 0..STEPS {
            let global = global_batch(cfg.vocab_size, 100 + step as u64);
            let mbs = micro_batches(
                &global,
                layout.micro_batch_size(),
                dims.dp(),
                model.dp_rank(),
            )
            .unwrap();
            assert_eq!(mbs.len(), ROWS / ROWS_PER_MICRO);
            let res = model.forward_backward(&mbs).unwrap();
            // Reduce over DP (the optimizer does it in training) and gather over PP and TP, to compare.
            let mut grads = model.grads_as_params(&res.grads).unwrap();
            let dp = &*model.groups().stage.dp;
            grads.visit_mut(&mut |_, t| *t = mappings::all_reduce_sum(t, dp).unwrap());
            let full_grads: Vec<(String, Vec<f32>)> = model
                .gather_full(&grads)
                .unwrap()
                .named()
                .into_iter()
                .map(|(n, t)| (n, t.to_vec_f32().unwrap()))
                .collect();
            let stats = model.step(&mut opt, &res.grads, LR).unwrap();
            assert!(
                !stats.skipped && stats.clip_coef < 1.0,
                "step {step}: {stats:?}"
            );
            out.push((res.loss, stats.grad_norm, full_grads));
        }
        (out, model.gather_full_params().unwrap().to_named())
    });
    for (r, res) in results.iter().enumerate() {
        for (step, (a, b)) in res.0.iter().zip(&results[0].0).enumerate() {
            assert_eq!(
                a.0.to_bits(),
                b.0.to_bits(),
                "{layout}: rank {r} step {step} loss {} vs rank 0 {}",
                a.0,
                b.0
            );
        }
    }
    results.swap_remove(0)
}

fn check(name: &str, full: &Qwen3Model, layouts: &[Layout]) {
    let (want, want_params) = reference(full);
    // Sanity: for a dense model the accumulated micro-batches equal the one big batch (so the reference is the
    // single-rank run of the global batch).
    if full.config.moe.is_none() {
        let g = global_batch(full.config.vocab_size, 100);
        let big = full.forward_backward(&g).unwrap();
        assert!(rel(big.loss, want[0].loss) < LOSS_TOL);
    }
    for &layout in layouts {
        let (got, params) = distributed(full, layout);
        for (step, ((loss, norm, grads), w)) in got.iter().zip(&want).enumerate() {
            let e = rel(*loss, w.loss);
            assert!(
                e < LOSS_TOL,
                "{name} {layout} step {step}: loss {loss} vs {} ({e:.2e})",
                w.loss
            );
            assert!(
                rel(*norm, w.grad_norm) < LOSS_TOL,
                "{name} {layout} step {step}: grad norm {norm} vs {}",
                w.grad_norm
            );
            let mut names: Vec<&str> = grads.iter().map(|(n, _)| n.as_str()).collect();
            names.sort_unstable();
            let mut want_names: Vec<&str> = w.grads.iter().map(|(n, _)| n.as_str()).collect();
            want_names.sort_unstable();
            assert_eq!(names, want_names, "{name} {layout}: gradient names");
            let mut worst = (0.0f64, String::new());
            for (n, g) in grads {
                let wg = &w.grads.iter().find(|(wn, _)| wn == n).unwrap().1;
                let e = rel_err(g, wg);
                assert!(
                    e < GRAD_TOL,
                    "{name} {layout} step {step}: grad {n} rel err {e:.2e}"
                );
                if e > worst.0 {
                    worst = (e, n.clone());
                }
            }
            println!(
                "{name} {layout} step {step}: loss {loss:.8} vs {:.8} (rel {e:.2e}), {} gradients, worst {:.2e} ({})",
                w.loss,
                grads.len(),
                worst.0,
                worst.1
            );
        }
        assert_params_close(&format!("{name} {layout}"), &params, &want_params, GRAD_TOL);
        let moved = rel_err(
            &params["model.norm.weight"].to_vec_f32().unwrap(),
            &full.params.norm.to_vec_f32().unwrap(),
        );
        assert!(
            moved > 1e-3,
            "{name} {layout}: parameters barely moved ({moved:.2e})"
        );
    }
}

#[test]
fn pp_dense_tied_fixture() {
    check(
        "dense_tied",
        &fixture_model("dense_tied"),
        &[PP2, TP2_PP2_DP2_SP],
    );
}

#[test]
fn pp_dense_untied_fixture() {
    check(
        "dense_untied",
        &fixture_model("dense_untied"),
        &[PP2, TP2_PP2_DP2, TP2_DP2_SP],
    );
}

#[test]
fn pp_moe_fixture() {
    check(
        "moe_norm_topk",
        &fixture_model("moe_norm_topk"),
        &[PP2, TP2_PP2_DP2_SP],
    );
}

#[test]
fn pp_random_dense_tied_4_layers() {
    check(
        "random dense tied",
        &random_model("dense_tied"),
        &[PP2_VPP2, PP4, TP2_PP2_VPP2_DP2_SP],
    );
}

#[test]
fn pp_random_dense_untied_4_layers() {
    check(
        "random dense untied",
        &random_model("dense_untied"),
        &[PP2_VPP2, PP4, TP2_PP2_VPP2_DP2_SP],
    );
}

#[test]
fn pp_random_moe_4_layers() {
    check(
        "random moe",
        &random_model("moe"),
        &[PP2_VPP2, PP4, TP2_PP2_VPP2_DP2_SP, TP2_DP2_SP],
    );
}

/// Activation recomputation under tp2·pp2·vpp2 + sp reruns the layer forwards (collectives included) inside the
/// interleaved schedule: loss and gradients are bit-identical to the run that kept its activations.
#[test]
fn pp_gradient_checkpointing_is_bit_identical() {
    let full = random_model("moe");
    let cfg = &full.config;
    let layout = Layout::new(1, 2, 2, 2, true);
    let dims = layout.dims();
    let global = global_batch(cfg.vocab_size, 5);
    run_ranks(layout.world(), |rank, world| {
        let groups = PipelineGroups::new(&world, &dims, cfg).unwrap();
        let model = PipelineModel::from_full(cfg, &full.params, dims, rank, groups).unwrap();
        let mbs = micro_batches(&global, 2, 1, 0).unwrap();
        let keep = model.forward_backward(&mbs).unwrap();
        let model = model.with_gradient_checkpointing(true);
        let recompute = model.forward_backward(&mbs).unwrap();
        assert_bit_identical(
            rank,
            (keep.loss, &keep.grads),
            (recompute.loss, &recompute.grads),
        );
    });
}

/// The forward-only loss (evaluation, `schedule::forward_only`) equals the loss `forward_backward` reports, bit for
/// bit on every rank, and the single-rank loss.
#[test]
fn pp_forward_only_loss_matches() {
    let full = random_model("moe");
    let cfg = &full.config;
    let global = global_batch(cfg.vocab_size, 9);
    let (want, _) = reference_grads(&full, &global);
    let layout = Layout::new(1, 2, 2, 2, true);
    let dims = layout.dims();
    run_ranks(layout.world(), |rank, world| {
        let groups = PipelineGroups::new(&world, &dims, cfg).unwrap();
        let model = PipelineModel::from_full(cfg, &full.params, dims, rank, groups).unwrap();
        let mbs = micro_batches(&global, 2, 1, 0).unwrap();
        let (loss, ce, aux) = model.loss(&mbs).unwrap();
        let out = model.forward_backward(&mbs).unwrap();
        assert_eq!(loss.to_bits(), out.loss.to_bits(), "rank {rank}");
        assert_eq!(ce.to_bits(), out.ce_loss.to_bits());
        assert_eq!(aux.map(f64::to_bits), out.aux_loss.map(f64::to_bits));
        assert!(rel(loss, want) < LOSS_TOL, "rank {rank}: {loss} vs {want}");
    });
}

/// Inputs that do not fit are typed errors on every rank, before any transfer.
#[test]
fn pp_bad_inputs_are_typed_errors() {
    let full = random_model("dense_tied");
    let cfg = &full.config;
    // 4 layers over pp = 2 × vpp = 3 chunks.
    let dims = ParallelDims::new(
        2,
        ParallelConfig {
            pp: 2,
            vpp: 3,
            ..Default::default()
        },
    )
    .unwrap();
    run_ranks(2, |rank, world| {
        let groups = PipelineGroups::new(&world, &dims, cfg).unwrap();
        let err = PipelineModel::from_full(cfg, &full.params, dims, rank, groups).unwrap_err();
        assert!(
            matches!(
                err,
                PipelineError::Layers {
                    layers: 4,
                    pp: 2,
                    vpp: 3
                }
            ),
            "{err}"
        );
    });
    let layout = Layout::new(1, 2, 2, 2, true);
    let dims = layout.dims();
    let global = global_batch(cfg.vocab_size, 1);
    run_ranks(layout.world(), |rank, world| {
        let groups = PipelineGroups::new(&world, &dims, cfg).unwrap();
        let model = PipelineModel::from_full(cfg, &full.params, dims, rank, groups).unwrap();
        let mbs = micro_batches(&global, 2, 1, 0).unwrap();
        // Interleaving needs the micro-batch count to be a multiple of pp.
        let err = model.forward_backward(&mbs[..3]).unwrap_err();
        assert!(
            matches!(err, PipelineError::Schedule { num_micro: 3, .. }),
            "{err}"
        );
        // Micro-batches of different shapes.
        let mut odd = mbs.clone();
        odd[1] = global_micro_batch(&global, 4, 1, 0).unwrap();
        let err = model.forward_backward(&odd).unwrap_err();
        assert!(matches!(err, PipelineError::Batch(_)), "{err}");
        // SP: 1 row of 7 tokens is not divisible by tp = 2.
        let b = Batch::causal_lm(vec![1; 7], 1, 7).unwrap();
        let err = model.forward_backward(&[b.clone(), b]).unwrap_err();
        assert!(
            matches!(
                err,
                PipelineError::Tp(qparallel::tensor_parallel::TpError::TokensNotDivisible { .. })
            ),
            "{err}"
        );
        // No loss weight anywhere.
        let z: Vec<Batch> = mbs
            .iter()
            .map(|b| {
                b.clone()
                    .scale_loss_weights(&vec![0.0; b.tokens()])
                    .unwrap()
            })
            .collect();
        let err = model.forward_backward(&z).unwrap_err();
        assert!(matches!(err, PipelineError::EmptyBatch), "{err}");
    });
    assert!(matches!(
        micro_batches(&global, 3, 1, 0),
        Err(PipelineError::MicroBatches {
            global: 8,
            micro: 3,
            dp: 1
        })
    ));
}

/// Communicators split for one layout cannot drive a pipeline of another.
#[test]
fn pp_mismatched_groups_are_typed_errors() {
    let full = random_model("dense_tied");
    let cfg = &full.config;
    let (pp2, dp2) = (PP2.dims(), Layout::new(2, 1, 1, 1, false).dims());
    run_ranks(2, |rank, world| {
        let groups = PipelineGroups::new(&world, &dp2, cfg).unwrap();
        let err = PipelineModel::from_full(cfg, &full.params, pp2, rank, groups).unwrap_err();
        assert!(matches!(err, PipelineError::Groups(_)), "{err}");
    });
}

/// The executor checks what it runs: a backward before its forward, and a receive that gets another micro-batch's
/// activation (rank 1's first two activation receives swapped), are protocol errors, not silent mix-ups.
#[test]
fn pp_executor_rejects_broken_schedules() {
    let full = random_model("dense_tied");
    let cfg = &full.config;
    let global = global_batch(cfg.vocab_size, 2);
    let single = ParallelDims::single();
    run_ranks(1, |rank, world| {
        let groups = PipelineGroups::new(&world, &single, cfg).unwrap();
        let model = PipelineModel::from_full(cfg, &full.params, single, rank, groups).unwrap();
        let mbs = micro_batches(&global, 2, 1, 0).unwrap();
        let err = model
            .run_schedule(&mbs[..1], &[Action::Backward { mb: 0, chunk: 0 }])
            .unwrap_err();
        assert!(matches!(err, PipelineError::Protocol(_)), "{err}");
        // A schedule that leaves work undone.
        let err = model
            .run_schedule(&mbs[..1], &[Action::Forward { mb: 0, chunk: 0 }])
            .unwrap_err();
        assert!(matches!(err, PipelineError::Protocol(_)), "{err}");
    });
    let dims = PP2.dims();
    let errs = run_ranks(2, |rank, world| {
        let groups = PipelineGroups::new(&world, &dims, cfg).unwrap();
        let model = PipelineModel::from_full(cfg, &full.params, dims, rank, groups).unwrap();
        let mbs = micro_batches(&global, 2, 1, 0).unwrap();
        let mut actions = schedule::schedule(2, 1, rank, mbs.len()).unwrap();
        if rank == 1 {
            let pos = |mb| {
                actions
                    .iter()
                    .position(|a| {
                        *a == Action::RecvActivation {
                            mb,
                            chunk: 0,
                            from: 0,
                        }
                    })
                    .unwrap()
            };
            let (i, j) = (pos(0), pos(1));
            actions.swap(i, j);
        }
        model.run_schedule(&mbs, &actions).map(|_| ()).unwrap_err()
    });
    assert!(
        matches!(&errs[1], PipelineError::Protocol(m) if m.contains("micro-batch 0")),
        "{}",
        errs[1]
    );
}
