//! The parity matrix of tensor, sequence and data parallelism against the single-rank run, one forward/backward:
//! the full model is built once (golden fixture weights), sliced per rank with `shard_for_rank`'s rules
//! (`TpModel::from_full`), run on thread ranks, and the gradients are reduced over DP and gathered back to the HF
//! layout (`TpModel::gather_full`). Every layout must give the single-rank loss within 1e-5 relative and every
//! parameter's gradient within 1e-4 (norm-relative).
//!
//! Layouts: tp=2, tp=2+sp, tp=4 (kv heads replicated: the fixtures have 2 kv heads), tp=4+sp, dp=2, dp=2·tp=2,
//! dp=2·tp=2+sp — on dense tied, dense untied and MoE (experts replicated under TP) models.

mod tp_support;

use qparallel::model::Qwen3Model;
use qparallel::tensor_parallel::{
    ParallelGroups, TpModel, mappings, shard_for_rank, split_batch_rows, unshard,
};
use tp_support::{Layout, assert_bit_identical, batch, fixture_model, rel, rel_err, run_ranks};

const LOSS_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;

const LAYOUTS: [Layout; 7] = [
    Layout::new(1, 2, false),
    Layout::new(1, 2, true),
    Layout::new(1, 4, false),
    Layout::new(1, 4, true),
    Layout::new(2, 1, false),
    Layout::new(2, 2, false),
    Layout::new(2, 2, true),
];

/// `(loss, ce_loss, aux_loss, full gradients by name)`.
type LayoutResult = (f64, f64, Option<f64>, Vec<(String, Vec<f32>)>);

/// `(loss, ce_loss, aux_loss, full gradients by name)` of one layout, as seen by global rank 0 (every rank's view
/// is checked to agree on the loss).
fn run_layout(full: &Qwen3Model, layout: Layout, global: &qparallel::model::Batch) -> LayoutResult {
    let dims = layout.dims();
    let cfg = &full.config;
    let results = run_ranks(layout.world(), |rank, world| {
        let groups = ParallelGroups::new(&world, &dims, cfg).unwrap();
        let model = TpModel::from_full(cfg, &full.params, dims, rank, groups).unwrap();
        let local = split_batch_rows(global, dims.dp(), model.dp_rank()).unwrap();
        let out = model.forward_backward(&local).unwrap();
        // Reduce the gradients over DP (the distributed optimizer's job in training) and gather over TP.
        let mut grads = model.grads_as_params(&out.grads).unwrap();
        grads.visit_mut(&mut |_, t| {
            *t = mappings::all_reduce_sum(t, &*model.groups().dp).unwrap();
        });
        let full_grads = model.gather_full(&grads).unwrap();
        let named: Vec<(String, Vec<f32>)> = full_grads
            .named()
            .into_iter()
            .map(|(n, t)| (n, t.to_vec_f32().unwrap()))
            .collect();
        (out.loss, out.ce_loss, out.aux_loss, named)
    });
    for (r, res) in results.iter().enumerate() {
        assert_eq!(
            res.0.to_bits(),
            results[0].0.to_bits(),
            "{layout}: rank {r} reports loss {} but rank 0 {}",
            res.0,
            results[0].0
        );
    }
    results.into_iter().next().unwrap()
}

fn check_model(fixture: &str) {
    check_full_model(fixture, &fixture_model(fixture));
}

fn check_full_model(fixture: &str, full: &Qwen3Model) {
    let global = batch(full.config.vocab_size, 11);
    let want = full.forward_backward(&global).unwrap();
    for layout in LAYOUTS {
        let (loss, ce, aux, grads) = run_layout(full, layout, &global);
        let e = rel(loss, want.loss);
        println!(
            "{fixture} {layout}: loss {loss:.8} vs single-rank {:.8} (rel {e:.2e})",
            want.loss
        );
        assert!(e < LOSS_TOL, "{fixture} {layout}: loss rel err {e:.2e}");
        assert!(
            rel(ce, want.ce_loss) < LOSS_TOL,
            "{fixture} {layout}: ce {ce}"
        );
        match (aux, want.aux_loss) {
            (Some(a), Some(b)) => {
                assert!(rel(a, b) < LOSS_TOL, "{fixture} {layout}: aux {a} vs {b}")
            }
            (None, None) => {}
            other => panic!("{fixture} {layout}: aux loss {other:?}"),
        }
        let mut names: Vec<&str> = grads.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            want.grads.keys().map(String::as_str).collect::<Vec<_>>(),
            "{fixture} {layout}: gradient names"
        );
        let mut worst = (0.0f64, String::new());
        for (name, g) in &grads {
            let w = want.grads[name].to_vec_f32().unwrap();
            let e = rel_err(g, &w);
            assert!(
                e < GRAD_TOL,
                "{fixture} {layout}: grad {name} rel err {e:.2e}"
            );
            if e > worst.0 {
                worst = (e, name.clone());
            }
        }
        println!(
            "{fixture} {layout}: {} gradients, worst rel err {:.2e} ({})",
            grads.len(),
            worst.0,
            worst.1
        );
    }
}

#[test]
fn dense_tied_layouts_match_single_rank() {
    check_model("dense_tied");
}

#[test]
fn dense_untied_layouts_match_single_rank() {
    check_model("dense_untied");
}

#[test]
fn moe_layouts_match_single_rank() {
    check_model("moe_norm_topk");
}

#[test]
fn moe_tied_no_norm_topk_layouts_match_single_rank() {
    check_model("moe_no_norm_topk");
}

/// A random MoE model mixing a MoE layer and a dense layer (`mlp_only_layers`), so dense TP and replicated experts
/// meet in one model, with a larger aux-loss coefficient so the DP/SP reduction of the routing statistics matters.
#[test]
fn random_mixed_moe_layouts_match_single_rank() {
    let cfg = qparallel::model::ModelConfig::from_json_value(
        &serde_json::json!({
            "model_type": "qwen3_moe", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true,
            "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
            "norm_topk_prob": true, "router_aux_loss_coef": 0.5, "mlp_only_layers": [1]
        }),
        "mixed",
    )
    .unwrap();
    let full = Qwen3Model::random(cfg, 7, 0.2, qkernels::Device::Cpu).unwrap();
    check_full_model("random_mixed_moe", &full);
}

/// `unshard ∘ shard_for_rank` is the identity on the full parameters, and the shards have the local shapes of the
/// module table; with tp > kv heads (dense_tied: 2 kv heads, dense_untied: 1) rank `i` holds kv head
/// `i / (tp / kv_heads)`.
#[test]
fn shard_then_unshard_round_trips() {
    for fixture in ["dense_tied", "dense_untied"] {
        let full = fixture_model(fixture);
        let cfg = &full.config;
        for layout in [Layout::new(1, 2, false), Layout::new(1, 4, false)] {
            let dims = layout.dims();
            let shards: Vec<_> = (0..layout.tp)
                .map(|r| shard_for_rank(cfg, &full.params, &dims, r).unwrap())
                .collect();
            let (h, d, p, hkv) = (
                cfg.hidden_size,
                cfg.head_dim,
                layout.tp,
                cfg.num_key_value_heads,
            );
            let k_full = full.params.layers[0].self_attn.k_proj.to_vec_f32().unwrap();
            for (r, shard) in shards.iter().enumerate() {
                let a = &shard.layers[0].self_attn;
                assert_eq!(a.q_proj.shape(), &[cfg.num_attention_heads / p * d, h]);
                assert_eq!(a.o_proj.shape(), &[h, cfg.num_attention_heads / p * d]);
                assert_eq!(shard.embed_tokens.shape(), &[cfg.vocab_size / p, h]);
                let (kv_local, first) = if hkv >= p {
                    (hkv / p, r * hkv / p)
                } else {
                    (1, r / (p / hkv))
                };
                assert_eq!(a.k_proj.shape(), &[kv_local * d, h]);
                assert_eq!(
                    a.k_proj.to_vec_f32().unwrap(),
                    k_full[first * d * h..(first + kv_local) * d * h].to_vec(),
                    "{fixture} {layout}: rank {r} k_proj rows"
                );
            }
            let back = unshard(cfg, &dims, &shards).unwrap();
            for ((n, a), (_, b)) in back.named().into_iter().zip(full.params.named()) {
                assert_eq!(a.shape(), b.shape(), "{n}");
                assert_eq!(
                    a.to_vec_f32().unwrap(),
                    b.to_vec_f32().unwrap(),
                    "{fixture} {layout}: {n} differs after the round trip"
                );
            }
        }
    }
}

/// Layout problems are typed errors naming the factor.
#[test]
fn unsupported_layouts_are_typed_errors() {
    use qparallel::dims::{ParallelConfig, ParallelDims};
    use qparallel::tensor_parallel::TpError;
    let full = fixture_model("dense_tied");
    let cfg = &full.config;
    let pp = ParallelDims::new(
        2,
        ParallelConfig {
            pp: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let err = shard_for_rank(cfg, &full.params, &pp, 0).unwrap_err();
    assert!(
        matches!(err, TpError::Unsupported(ref m) if m.contains("pp = 2")),
        "{err}"
    );
    let tp8 = ParallelDims::new(
        8,
        ParallelConfig {
            tp: 8,
            ..Default::default()
        },
    )
    .unwrap();
    let err = shard_for_rank(cfg, &full.params, &tp8, 0).unwrap_err();
    assert!(matches!(err, TpError::Dims(_)), "{err}");
    assert!(
        err.to_string()
            .contains("heads 4 are not divisible by tp(8)"),
        "{err}"
    );
}

/// Batches that do not fit the layout are typed errors, on every rank, before any communication.
#[test]
fn batches_that_do_not_fit_are_typed_errors() {
    use qparallel::tensor_parallel::TpError;
    let full = fixture_model("dense_tied");
    let cfg = &full.config;
    let layout = Layout::new(1, 4, true);
    let dims = layout.dims();
    run_ranks(layout.world(), |rank, world| {
        let groups = ParallelGroups::new(&world, &dims, cfg).unwrap();
        let model = TpModel::from_full(cfg, &full.params, dims, rank, groups).unwrap();
        // 1 row of 6 tokens: not divisible by tp = 4 under sequence parallelism.
        let b = qparallel::model::Batch::causal_lm(vec![1, 2, 3, 4, 5, 6], 1, 6).unwrap();
        let err = model.forward_backward(&b).unwrap_err();
        assert!(
            matches!(err, TpError::TokensNotDivisible { tokens: 6, tp: 4 }),
            "{err}"
        );
        let err = split_batch_rows(&b, 2, 0).unwrap_err();
        assert!(
            matches!(err, TpError::BatchNotDivisible { rows: 1, dp: 2 }),
            "{err}"
        );
    });
}

/// Activation recomputation under TP+SP+DP reruns the forward (collectives included) in backward: the loss and
/// every gradient are bit-identical to the run that kept its activations.
#[test]
fn gradient_checkpointing_is_bit_identical() {
    let full = fixture_model("moe_norm_topk");
    let cfg = &full.config;
    let global = batch(cfg.vocab_size, 5);
    let layout = Layout::new(2, 2, true);
    let dims = layout.dims();
    run_ranks(layout.world(), |rank, world| {
        let groups = ParallelGroups::new(&world, &dims, cfg).unwrap();
        let model = TpModel::from_full(cfg, &full.params, dims, rank, groups).unwrap();
        let local = split_batch_rows(&global, dims.dp(), model.dp_rank()).unwrap();
        let keep = model.forward_backward(&local).unwrap();
        let model = model.with_gradient_checkpointing(true);
        let recompute = model.forward_backward(&local).unwrap();
        assert_bit_identical(
            rank,
            (keep.loss, &keep.grads),
            (recompute.loss, &recompute.grads),
        );
    });
}

/// Communicators split for one layout cannot drive a model of another.
#[test]
fn mismatched_groups_are_typed_errors() {
    use qparallel::tensor_parallel::TpError;
    let full = fixture_model("dense_tied");
    let cfg = &full.config;
    let (tp2, dp2) = (
        Layout::new(1, 2, false).dims(),
        Layout::new(2, 1, false).dims(),
    );
    run_ranks(2, |rank, world| {
        let groups = ParallelGroups::new(&world, &tp2, cfg).unwrap();
        let err = TpModel::from_full(cfg, &full.params, dp2, rank, groups).unwrap_err();
        assert!(matches!(err, TpError::Groups(_)), "{err}");
    });
}

/// The forward-only loss (evaluation) equals the loss `forward_backward` reports, on every rank.
#[test]
fn forward_only_loss_matches() {
    let full = fixture_model("moe_no_norm_topk");
    let cfg = &full.config;
    let global = batch(cfg.vocab_size, 21);
    let (want, _, want_aux) = full.loss(&global).unwrap();
    let layout = Layout::new(2, 2, true);
    let dims = layout.dims();
    run_ranks(layout.world(), |rank, world| {
        let groups = ParallelGroups::new(&world, &dims, cfg).unwrap();
        let model = TpModel::from_full(cfg, &full.params, dims, rank, groups).unwrap();
        let local = split_batch_rows(&global, dims.dp(), model.dp_rank()).unwrap();
        let (loss, _, aux) = model.loss(&local).unwrap();
        assert_eq!(
            loss.to_bits(),
            model.forward_backward(&local).unwrap().loss.to_bits()
        );
        assert!(rel(loss, want) < 1e-5, "rank {rank}: {loss} vs {want}");
        assert!(rel(aux.unwrap(), want_aux.unwrap()) < 1e-5);
    });
}
