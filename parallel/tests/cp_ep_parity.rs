//! Context parallelism (CP) and expert parallelism (EP, with expert-TP) against the single-rank run.
//!
//! The parity matrix: the full model is built once (golden fixture weights, or a random MoE model with a large
//! aux-loss coefficient), sliced per rank (`CpEpModel::from_full`), run on thread ranks for 3 optimizer steps
//! (global grad-norm clipping active, AdamW). At step 0 the gradients are reduced over the data-parallel dimensions
//! (`reduce_grads`: dp-cp for replicated weights, expert-dp for expert shards) and gathered back to the HF layout;
//! every step's loss must be within 1e-5 (relative) of the single-rank run, every step-0 gradient within 1e-4
//! (norm-relative), the final parameters within 1e-4.
//!
//! The learning rate is 1e-3: AdamW's first updates are close to `lr·sign(g)`, so gradient elements whose size is
//! at the level of f32 rounding noise flip sign under any reordering of sums, and top-k routing flips with them.
//! Measured on these fixtures with the single-rank run against itself: a 1e-7 relative perturbation of the starting
//! weights moves the parameters after 3 steps by up to 1e-3 (norm-relative) at lr = 1e-2, by at most 6e-5 at
//! lr = 1e-3 — the parity bound must sit above that floor to test the parallel maths rather than chaos.
//!
//! Layouts (tp = pp = 1): cp2 (dense, MoE with replicated experts), cp2 with packed segments crossing chunk
//! boundaries, cp2·ep2 (MoE), ep2 (= dp2 in the dense view), ep2·etp2 (dp4), ep2 with expert-dp 2 (dp4),
//! dp2·cp2·ep2·etp2.
//!
//! Plus closed-form checks of the pieces: the indexed attention op against the plain one, the K/V all-gather /
//! reduce-scatter and the token dispatch / combine as adjoint pairs, and typed errors.

mod tp_support;

use qkernels::ops::{self, AttentionIndex};
use qkernels::{Device, Tensor};
use qparallel::comm::{Communicator, ReduceOp};
use qparallel::context_parallel::{
    CpAttention, CpEpGroups, CpEpModel, CpError, CpLayout, shard_batch,
};
use qparallel::dims::{ParallelConfig, ParallelDims};
use qparallel::expert_parallel::{ExpertGroups, ExpertLayout, ExpertRoute};
use qparallel::model::attention::AttentionCore;
use qparallel::model::{Batch, ModelConfig, NamedTensors, Qwen3Model};
use qparallel::optim::{AdamW, AdamWConfig};
use qparallel::zero::ZeroConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tp_support::{
    adamw_step, assert_params_close, clip, fixture_model, host_grads, rel, rel_err, run_ranks,
};

const LOSS_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;
const STEPS: usize = 3;
const LR: f64 = 1e-3;
const MAX_NORM: f64 = 0.5;
const WD: f64 = 0.1;

/// A layout of the matrix: `world` ranks, `dp` derived.
#[derive(Debug, Clone, Copy)]
struct Layout {
    world: usize,
    cp: usize,
    ep: usize,
    etp: usize,
}

impl Layout {
    const fn new(world: usize, cp: usize, ep: usize, etp: usize) -> Self {
        Layout { world, cp, ep, etp }
    }

    fn dims(&self) -> ParallelDims {
        ParallelDims::new(
            self.world,
            ParallelConfig {
                cp: self.cp,
                ep: self.ep,
                etp: Some(self.etp),
                ..Default::default()
            },
        )
        .unwrap()
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.dims();
        write!(
            f,
            "dp{}·cp{}·ep{}·etp{} (edp{})",
            d.dp(),
            self.cp,
            self.ep,
            self.etp,
            d.edp()
        )
    }
}

/// `rows` rows of 16 tokens, loss weights in [0.5, 1.5). Packed: every row holds several samples whose boundaries
/// (different per row) cross the CP chunk boundaries (chunks of 4 tokens with cp = 2).
fn batch(vocab: usize, rows: usize, packed: bool, seed: u64) -> Batch {
    let seq = 16;
    let mut rng = StdRng::seed_from_u64(seed);
    let ids: Vec<u32> = (0..rows * seq)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    let scale: Vec<f32> = (0..rows * seq).map(|_| 0.5 + rng.random::<f32>()).collect();
    let b = if packed {
        let bounds: [&[usize]; 4] = [&[5, 11], &[3], &[7, 9, 14], &[]];
        let seg: Vec<u32> = (0..rows)
            .flat_map(|r| {
                let cuts = bounds[r % 4];
                (0..seq)
                    .map(move |t| cuts.iter().filter(|&&c| t >= c).count() as u32 + 10 * r as u32)
            })
            .collect();
        Batch::packed(ids, seg, rows, seq).unwrap()
    } else {
        Batch::causal_lm(ids, rows, seq).unwrap()
    };
    b.scale_loss_weights(&scale).unwrap()
}

fn zero_config() -> ZeroConfig {
    ZeroConfig {
        weight_decay: WD,
        max_grad_norm: Some(MAX_NORM),
    }
}

struct Run {
    /// `(loss, ce, aux, grad norm)` per step.
    steps: Vec<(f64, f64, Option<f64>, f64)>,
    /// Full gradients of step 0.
    grads0: Vec<(String, Vec<f32>)>,
    /// Final full parameters.
    params: NamedTensors,
}

/// Single-rank training with plain `optim` pieces (as `zero_steps.rs`).
fn reference(full: &Qwen3Model, batches: &[Batch]) -> Run {
    let mut model = full.clone();
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let mut steps = Vec::new();
    let mut grads0 = Vec::new();
    for b in batches {
        let res = model.forward_backward(b).unwrap();
        let mut grads = host_grads(&res.grads);
        if grads0.is_empty() {
            grads0 = grads.clone();
        }
        let norm = clip(&mut grads, MAX_NORM);
        adamw_step(&mut model, &mut opt, LR, WD, &grads);
        steps.push((res.loss, res.ce_loss, res.aux_loss, norm));
    }
    Run {
        steps,
        grads0,
        params: model.params.to_named(),
    }
}

/// The same steps on `layout`, as global rank 0 sees them (every rank is checked to report the same losses).
fn distributed(full: &Qwen3Model, layout: Layout, batches: &[Batch]) -> Run {
    let dims = layout.dims();
    let cfg = &full.config;
    let mut runs = run_ranks(layout.world, |rank, world| {
        let groups = CpEpGroups::new(&world, &dims).unwrap();
        let mut model = CpEpModel::from_full(cfg, &full.params, dims, rank, groups).unwrap();
        let mut opt = model
            .optimizer(zero_config(), AdamWConfig::default())
            .unwrap();
        let mut steps = Vec::new();
        let mut grads0 = Vec::new();
        for (i, global) in batches.iter().enumerate() {
            let local = model.local_batch(global).unwrap();
            let out = model.forward_backward(&local).unwrap();
            if i == 0 {
                let reduced = model.reduce_grads(&out.grads).unwrap();
                let full_grads = model
                    .gather_full(&model.grads_as_params(&reduced).unwrap())
                    .unwrap();
                grads0 = full_grads
                    .named()
                    .into_iter()
                    .map(|(n, t)| (n, t.to_vec_f32().unwrap()))
                    .collect();
            }
            let stats = model.step(&mut opt, &out.grads, LR).unwrap();
            assert!(!stats.skipped);
            assert!(stats.clip_coef < 1.0, "step {i}: clipping should be active");
            steps.push((out.loss, out.ce_loss, out.aux_loss, stats.grad_norm));
        }
        Run {
            steps,
            grads0,
            params: model.gather_full_params().unwrap().to_named(),
        }
    });
    for (r, run) in runs.iter().enumerate() {
        for (s, (a, b)) in run.steps.iter().zip(&runs[0].steps).enumerate() {
            assert_eq!(
                a.0.to_bits(),
                b.0.to_bits(),
                "{layout}: rank {r} step {s} loss {} vs rank 0 {}",
                a.0,
                b.0
            );
        }
    }
    runs.swap_remove(0)
}

fn check(name: &str, full: &Qwen3Model, layouts: &[Layout], packed: bool) {
    let rows = layouts.iter().map(|l| l.dims().dp()).max().unwrap().max(2);
    let batches: Vec<Batch> = (0..STEPS)
        .map(|s| batch(full.config.vocab_size, rows, packed, 100 + s as u64))
        .collect();
    let want = reference(full, &batches);
    for &layout in layouts {
        let got = distributed(full, layout, &batches);
        for (s, (g, w)) in got.steps.iter().zip(&want.steps).enumerate() {
            println!(
                "{name} {layout} step {s}: loss {:.8} vs {:.8} (rel {:.2e}), grad norm {:.6} vs {:.6}",
                g.0,
                w.0,
                rel(g.0, w.0),
                g.3,
                w.3
            );
            assert!(
                rel(g.0, w.0) < LOSS_TOL,
                "{name} {layout} step {s}: loss {} vs {}",
                g.0,
                w.0
            );
            assert!(
                rel(g.1, w.1) < LOSS_TOL,
                "{name} {layout} step {s}: ce {} vs {}",
                g.1,
                w.1
            );
            match (g.2, w.2) {
                (Some(a), Some(b)) => {
                    assert!(
                        rel(a, b) < LOSS_TOL,
                        "{name} {layout} step {s}: aux {a} vs {b}"
                    )
                }
                (None, None) => {}
                other => panic!("{name} {layout}: aux {other:?}"),
            }
            assert!(
                rel(g.3, w.3) < 1e-4,
                "{name} {layout} step {s}: norm {} vs {}",
                g.3,
                w.3
            );
        }
        let mut names: Vec<&str> = got.grads0.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        let mut want_names: Vec<&str> = want.grads0.iter().map(|(n, _)| n.as_str()).collect();
        want_names.sort_unstable();
        assert_eq!(names, want_names, "{name} {layout}: gradient names");
        let mut worst = (0.0f64, String::new());
        for (n, g) in &got.grads0 {
            let w = &want.grads0.iter().find(|(wn, _)| wn == n).unwrap().1;
            let e = rel_err(g, w);
            assert!(e < GRAD_TOL, "{name} {layout}: grad {n} rel err {e:.2e}");
            if e > worst.0 {
                worst = (e, n.clone());
            }
        }
        println!(
            "{name} {layout}: {} gradients, worst rel err {:.2e} ({})",
            got.grads0.len(),
            worst.0,
            worst.1
        );
        assert_params_close(
            &format!("{name} {layout}"),
            &got.params,
            &want.params,
            GRAD_TOL,
        );
        let moved = rel_err(
            &got.params["model.norm.weight"].to_vec_f32().unwrap(),
            &full.params.norm.to_vec_f32().unwrap(),
        );
        assert!(
            moved > 1e-3,
            "{name} {layout}: parameters barely moved ({moved:.2e})"
        );
    }
}

/// A random MoE model (a MoE layer and a dense layer) with a large aux-loss coefficient, so the reduction of the
/// routing statistics matters.
fn random_moe() -> Qwen3Model {
    let cfg = ModelConfig::from_json_value(
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
    Qwen3Model::random(cfg, 7, 0.2, Device::Cpu).unwrap()
}

#[test]
fn cp2_dense_matches_single_rank() {
    check(
        "dense_tied",
        &fixture_model("dense_tied"),
        &[Layout::new(2, 2, 1, 1)],
        false,
    );
}

#[test]
fn cp2_packed_segments_match_single_rank() {
    check(
        "dense_untied",
        &fixture_model("dense_untied"),
        &[Layout::new(2, 2, 1, 1)],
        true,
    );
}

#[test]
fn cp2_moe_replicated_and_expert_parallel_match_single_rank() {
    check(
        "moe_norm_topk",
        &fixture_model("moe_norm_topk"),
        &[Layout::new(2, 2, 1, 1), Layout::new(2, 2, 2, 1)],
        true,
    );
}

#[test]
fn ep2_and_ep2_etp2_match_single_rank() {
    check(
        "moe_no_norm_topk",
        &fixture_model("moe_no_norm_topk"),
        &[Layout::new(2, 1, 2, 1), Layout::new(4, 1, 2, 2)],
        false,
    );
}

#[test]
fn ep2_with_expert_dp2_matches_single_rank() {
    check(
        "moe_norm_topk",
        &fixture_model("moe_norm_topk"),
        &[Layout::new(4, 1, 2, 1)],
        true,
    );
}

#[test]
fn dp2_cp2_ep2_etp2_random_moe_matches_single_rank() {
    check(
        "random_moe",
        &random_moe(),
        &[Layout::new(4, 2, 2, 2), Layout::new(4, 1, 4, 1)],
        true,
    );
}

// ------------------------------------------------------------------------------------------------------------
// The pieces, closed form.
// ------------------------------------------------------------------------------------------------------------

fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

fn u32s(v: impl IntoIterator<Item = usize>) -> Vec<u32> {
    v.into_iter().map(|x| x as u32).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// The indexed op with every query and key is the plain op; with the queries split into the CP chunks (against
/// all keys), each part gives the same rows of `out`/`lse`/`dq`, and the parts' `dk`/`dv` sum to the plain ones.
#[test]
fn indexed_attention_splits_the_plain_attention_by_query_rows() {
    let (b, s, hq, hkv, d) = (2, 8, 4, 2, 4);
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(3);
    let t = |rng: &mut StdRng, shape: &[usize]| {
        Tensor::from_f32(rand_vec(rng, shape.iter().product(), 1.5), shape, &dev).unwrap()
    };
    let (q, k, v) = (
        t(&mut rng, &[b, s, hq, d]),
        t(&mut rng, &[b, s, hkv, d]),
        t(&mut rng, &[b, s, hkv, d]),
    );
    let dout = t(&mut rng, &[b, s, hq, d]);
    let segv: Vec<u32> = vec![0, 0, 0, 1, 1, 1, 1, 2, 4, 4, 4, 4, 4, 5, 5, 5];
    let seg = Tensor::from_u32(segv.clone(), &[b, s], &dev).unwrap();
    let scale = 0.5;
    let plain = ops::attention_fwd(&q, &k, &v, Some(&seg), scale).unwrap();
    let pg =
        ops::attention_bwd(&dout, &q, &k, &v, &plain.out, &plain.lse, Some(&seg), scale).unwrap();
    let all = Tensor::from_u32(u32s(0..s), &[s], &dev).unwrap();
    let full = ops::attention_fwd_indexed(
        &q,
        &k,
        &v,
        &AttentionIndex {
            q_index: &all,
            k_index: &all,
            segments: Some((&seg, &seg)),
        },
        scale,
    )
    .unwrap();
    assert!(
        rel_err(
            &full.out.to_vec_f32().unwrap(),
            &plain.out.to_vec_f32().unwrap()
        ) < 1e-6
    );
    assert!(
        rel_err(
            &full.lse.to_vec_f32().unwrap(),
            &plain.lse.to_vec_f32().unwrap()
        ) < 1e-6
    );

    // Rows of a [b, s, h, d] (token-major) or [b, h, s] (lse) tensor at the given sequence indices.
    let rows_tm = |x: &[f32], h: usize, idx: &[usize]| -> Vec<f32> {
        let w = h * d;
        (0..b)
            .flat_map(|bi| {
                idx.iter()
                    .flat_map(move |&i| x[(bi * s + i) * w..(bi * s + i + 1) * w].to_vec())
            })
            .collect()
    };
    let rows_lse = |x: &[f32], idx: &[usize]| -> Vec<f32> {
        (0..b * hq)
            .flat_map(|bh| idx.iter().map(move |&i| x[bh * s + i]))
            .collect()
    };
    let cp = 2;
    let (mut dk_sum, mut dv_sum) = (vec![0f32; b * s * hkv * d], vec![0f32; b * s * hkv * d]);
    for r in 0..cp {
        let idx = CpLayout::new(s, cp, r).unwrap().local_indices();
        let qi = Tensor::from_u32(u32s(idx.iter().copied()), &[idx.len()], &dev).unwrap();
        let sub = |x: &Tensor, h: usize| {
            Tensor::from_f32(
                rows_tm(&x.to_vec_f32().unwrap(), h, &idx),
                &[b, idx.len(), h, d],
                &dev,
            )
            .unwrap()
        };
        let qseg = Tensor::from_u32(
            (0..b)
                .flat_map(|bi| idx.iter().map(|&i| segv[bi * s + i]).collect::<Vec<_>>())
                .collect(),
            &[b, idx.len()],
            &dev,
        )
        .unwrap();
        let index = AttentionIndex {
            q_index: &qi,
            k_index: &all,
            segments: Some((&qseg, &seg)),
        };
        let o = ops::attention_fwd_indexed(&sub(&q, hq), &k, &v, &index, scale).unwrap();
        let po = plain.out.to_vec_f32().unwrap();
        assert!(
            rel_err(&o.out.to_vec_f32().unwrap(), &rows_tm(&po, hq, &idx)) < 1e-6,
            "rank {r} out"
        );
        let pl = plain.lse.to_vec_f32().unwrap();
        assert!(
            rel_err(&o.lse.to_vec_f32().unwrap(), &rows_lse(&pl, &idx)) < 1e-6,
            "rank {r} lse"
        );
        let g = ops::attention_bwd_indexed(
            &sub(&dout, hq),
            &sub(&q, hq),
            &k,
            &v,
            &o.out,
            &o.lse,
            &index,
            scale,
        )
        .unwrap();
        let pdq = pg.dq.to_vec_f32().unwrap();
        assert!(
            rel_err(&g.dq.to_vec_f32().unwrap(), &rows_tm(&pdq, hq, &idx)) < 1e-5,
            "rank {r} dq"
        );
        dk_sum
            .iter_mut()
            .zip(g.dk.to_vec_f32().unwrap())
            .for_each(|(a, x)| *a += x);
        dv_sum
            .iter_mut()
            .zip(g.dv.to_vec_f32().unwrap())
            .for_each(|(a, x)| *a += x);
    }
    assert!(
        rel_err(&dk_sum, &pg.dk.to_vec_f32().unwrap()) < 1e-5,
        "Σ dk"
    );
    assert!(
        rel_err(&dv_sum, &pg.dv.to_vec_f32().unwrap()) < 1e-5,
        "Σ dv"
    );

    // A query that sees no key is a typed error, not NaN.
    let late = Tensor::from_u32(vec![5], &[1], &dev).unwrap();
    let q1 = Tensor::from_f32(vec![0.1; hq * d], &[1, 1, hq, d], &dev).unwrap();
    let k1 = Tensor::from_f32(vec![0.1; hkv * d], &[1, 1, hkv, d], &dev).unwrap();
    let err = ops::attention_fwd_indexed(
        &q1,
        &k1,
        &k1,
        &AttentionIndex {
            q_index: &Tensor::from_u32(vec![0], &[1], &dev).unwrap(),
            k_index: &late,
            segments: None,
        },
        scale,
    )
    .unwrap_err();
    assert!(
        matches!(err, qkernels::KernelError::InvalidArgument { .. }),
        "{err}"
    );
}

/// `gather_kv` is the all-gather into the global order, `gather_kv_backward` its adjoint:
/// `Σ_r ⟨G(k)_r, Y_r⟩ = Σ_r ⟨k_r, Gᵀ(Y)_r⟩`, and `Gᵀ` of a replicated `Y` is `cp·Y[local rows]`.
#[test]
fn kv_all_gather_and_reduce_scatter_are_adjoint() {
    let (cp, b, s, h, d) = (4, 2, 16, 2, 3);
    let global: Vec<f32> = (0..b * s * h * d).map(|i| i as f32).collect();
    let g = Batch::causal_lm(vec![0; b * s], b, s).unwrap();
    let res = run_ranks(cp, |rank, world| {
        let cb = shard_batch(&g, cp, rank).unwrap();
        let core = CpAttention::new(&world, &cb, &Device::Cpu).unwrap();
        let idx = cb.layout.local_indices();
        let sl = idx.len();
        let local: Vec<f32> = (0..b)
            .flat_map(|bi| {
                idx.iter()
                    .flat_map(|&i| global[(bi * s + i) * h * d..(bi * s + i + 1) * h * d].to_vec())
                    .collect::<Vec<_>>()
            })
            .collect();
        let k = Tensor::from_f32(local.clone(), &[b, sl, h, d], &Device::Cpu).unwrap();
        let v = k.scale(-1.0).unwrap();
        let (kf, vf) = core.gather_kv(&k, &v).unwrap();
        // Forward: the global tensor in natural order, on every rank.
        assert_eq!(kf.to_vec_f32().unwrap(), global, "rank {rank}: gathered K");
        assert_eq!(
            vf.to_vec_f32().unwrap(),
            global.iter().map(|x| -x).collect::<Vec<_>>()
        );
        // Adjoint identity with rank-dependent Y.
        let mut rng = StdRng::seed_from_u64(10 + rank as u64);
        let yk = rand_vec(&mut rng, b * s * h * d, 1.0);
        let yv = rand_vec(&mut rng, b * s * h * d, 1.0);
        let tk = |x: Vec<f32>| Tensor::from_f32(x, &[b, s, h, d], &Device::Cpu).unwrap();
        let (dk, dv) = core
            .gather_kv_backward(&tk(yk.clone()), &tk(yv.clone()))
            .unwrap();
        assert_eq!(dk.shape(), &[b, sl, h, d]);
        let lhs = dot(&kf.to_vec_f32().unwrap(), &yk) + dot(&vf.to_vec_f32().unwrap(), &yv);
        let rhs = dot(&local, &dk.to_vec_f32().unwrap())
            + dot(&v.to_vec_f32().unwrap(), &dv.to_vec_f32().unwrap());
        // Replicated Y: the reduce-scatter returns cp copies of the local rows.
        let (ones, _) = core.gather_kv_backward(&kf, &vf).unwrap();
        assert_eq!(
            ones.to_vec_f32().unwrap(),
            local.iter().map(|x| x * cp as f32).collect::<Vec<_>>()
        );
        let mut sums = [lhs as f32, rhs as f32];
        world.all_reduce(&mut sums, ReduceOp::Sum).unwrap();
        sums
    });
    let [l, r] = res[0];
    assert!(((l - r) / l).abs() < 1e-5, "{l} vs {r}");
}

/// Dispatch / combine of the token exchange over ep2 × etp2 (4 ranks with different tokens): every rank's experts
/// receive exactly the rows routed to them from the whole group (counted in closed form), `combine(dispatch(x)) =
/// etp·x` (each row comes back once per ETP rank, summed), and `Σ⟨D(x), y⟩ = Σ⟨x, C(y)⟩`.
#[test]
fn token_dispatch_and_combine_are_adjoint() {
    let (ep, etp, experts, w) = (2, 2, 6, 3);
    let dims = ParallelDims::new(
        4,
        ParallelConfig {
            ep,
            etp: Some(etp),
            ..Default::default()
        },
    )
    .unwrap();
    // Rank r routes rows_of(r, e) = (r + 2e) % 5 rows to expert e (some zero).
    let rows_of = |r: usize, e: usize| (r + 2 * e) % 5;
    let res = run_ranks(4, |rank, world| {
        let groups = CpEpGroups::new(&world, &dims).unwrap();
        let layout = ExpertLayout::from_dims(&dims, rank, experts, 8).unwrap();
        let eg = ExpertGroups {
            ep: &*groups.experts.ep,
            etp: &*groups.experts.etp,
        };
        let mut offsets = vec![0];
        for e in 0..experts {
            offsets.push(offsets[e] + rows_of(rank, e));
        }
        let n = offsets[experts];
        let route = ExpertRoute::new(&offsets, &layout, eg).unwrap();
        // Closed form: local expert j gets Σ over the EP×ETP group of that expert's rows.
        let c = dims.expert_coord(rank);
        let group: Vec<usize> = (0..4)
            .filter(|&r| dims.expert_coord(r).edp == c.edp)
            .collect();
        for j in 0..layout.local_experts() {
            let e = layout.first_expert() + j;
            let want: usize = group.iter().map(|&r| rows_of(r, e)).sum();
            let lo = route.local_offsets();
            assert_eq!(lo[j + 1] - lo[j], want, "rank {rank} expert {e}");
        }
        let mut rng = StdRng::seed_from_u64(rank as u64);
        let x = Tensor::from_f32(rand_vec(&mut rng, n * w, 1.0), &[n, w], &Device::Cpu).unwrap();
        let xe = route.dispatch(&x, eg).unwrap();
        assert_eq!(xe.shape(), &[route.expert_rows(), w]);
        let back = route.combine(&xe, eg).unwrap();
        let xv = x.to_vec_f32().unwrap();
        assert!(
            rel_err(
                &back.to_vec_f32().unwrap(),
                &xv.iter().map(|v| v * etp as f32).collect::<Vec<_>>()
            ) < 1e-6
        );
        let y = Tensor::from_f32(
            rand_vec(&mut rng, route.expert_rows() * w, 1.0),
            &[route.expert_rows(), w],
            &Device::Cpu,
        )
        .unwrap();
        let lhs = dot(&xe.to_vec_f32().unwrap(), &y.to_vec_f32().unwrap());
        let rhs = dot(&xv, &route.combine(&y, eg).unwrap().to_vec_f32().unwrap());
        world.all_reduce_vec_sum(&[lhs as f32, rhs as f32])
    });
    let (l, r) = (res[0][0], res[0][1]);
    assert!(((l - r) / l).abs() < 1e-5, "{l} vs {r}");
}

trait SumVec {
    fn all_reduce_vec_sum(&self, v: &[f32]) -> Vec<f32>;
}

impl<C: Communicator + ?Sized> SumVec for C {
    fn all_reduce_vec_sum(&self, v: &[f32]) -> Vec<f32> {
        let mut b = v.to_vec();
        self.all_reduce(&mut b, ReduceOp::Sum).unwrap();
        b
    }
}

/// Layouts and batches the driver cannot run are typed errors.
#[test]
fn unsupported_layouts_and_batches_are_typed_errors() {
    let full = fixture_model("moe_norm_topk");
    let cfg = &full.config;
    let tp2 = ParallelDims::new(
        2,
        ParallelConfig {
            tp: 2,
            ..Default::default()
        },
    )
    .unwrap();
    run_ranks(2, |_, world| {
        let err = CpEpGroups::new(&world, &tp2).unwrap_err();
        assert!(
            matches!(err, CpError::Unsupported(ref m) if m.contains("tp = 2")),
            "{err}"
        );
    });
    // 8 experts over ep = 3.
    let ep3 = ParallelDims::new(
        3,
        ParallelConfig {
            ep: 3,
            ..Default::default()
        },
    )
    .unwrap();
    run_ranks(3, |rank, world| {
        let groups = CpEpGroups::new(&world, &ep3).unwrap();
        let err = CpEpModel::from_full(cfg, &full.params, ep3, rank, groups).unwrap_err();
        assert!(
            err.to_string()
                .contains("experts 8 are not divisible by ep(3)"),
            "{err}"
        );
    });
    // 12 tokens do not split into 2·cp = 8 chunks; a batch cut for another rank is refused.
    let cp4 = ParallelDims::new(
        4,
        ParallelConfig {
            cp: 4,
            ..Default::default()
        },
    )
    .unwrap();
    run_ranks(4, |rank, world| {
        let groups = CpEpGroups::new(&world, &cp4).unwrap();
        let model = CpEpModel::from_full(cfg, &full.params, cp4, rank, groups).unwrap();
        let b = Batch::causal_lm(vec![1; 12], 1, 12).unwrap();
        let err = model.local_batch(&b).unwrap_err();
        assert!(
            matches!(err, CpError::SeqNotDivisible { seq: 12, cp: 4 }),
            "{err}"
        );
        let b = Batch::causal_lm(vec![1; 16], 1, 16).unwrap();
        let other = shard_batch(&b, 4, (rank + 1) % 4).unwrap();
        assert!(matches!(
            model.forward_backward(&other),
            Err(CpError::Groups(_))
        ));
    });
}

/// The forward-only loss equals what `forward_backward` reports, and the single-rank loss.
#[test]
fn forward_only_loss_matches() {
    let full = fixture_model("moe_no_norm_topk");
    let cfg = &full.config;
    let global = batch(cfg.vocab_size, 2, true, 21);
    let (want, _, want_aux) = full.loss(&global).unwrap();
    let dims = Layout::new(2, 2, 2, 1).dims();
    run_ranks(2, |rank, world| {
        let groups = CpEpGroups::new(&world, &dims).unwrap();
        let model = CpEpModel::from_full(cfg, &full.params, dims, rank, groups).unwrap();
        let local = model.local_batch(&global).unwrap();
        let (loss, _, aux) = model.loss(&local).unwrap();
        assert_eq!(
            loss.to_bits(),
            model.forward_backward(&local).unwrap().loss.to_bits()
        );
        assert!(rel(loss, want) < LOSS_TOL, "rank {rank}: {loss} vs {want}");
        assert!(rel(aux.unwrap(), want_aux.unwrap()) < LOSS_TOL);
    });
}
