//! The multi-rank training loop ([`run_distributed_training`]) on in-process thread ranks against the single-rank
//! [`run_training`]: the same seed, data and global batch give the same losses (within 1e-5 relative) under every
//! layout; checkpoints resume under another layout (and between one and several ranks) as if never interrupted;
//! layouts and settings no model supports are typed errors, and a rank-0 failure reaches every rank.

mod train_support;

use std::path::{Path, PathBuf};

use qparallel::comm::CpuCommunicator;
use qparallel::dims::{ParallelConfig, ParallelDims};
use qparallel::hf;
use qparallel::optim::{DecayStyle, Warmup};
use qparallel::train::optimizer_shards;
use qparallel::train::{
    ModelSource, NoProgress, Resume, TrainConfig, TrainError, TrainObserver, TrainSummary,
    run_distributed_training, run_training,
};
use train_support::{StopAfter, read_metrics, write_corpus};

const LOSS_TOL: f64 = 1e-5;

/// A config of `configs/models` by name (an absolute path is taken as is).
fn model_config(name: impl AsRef<Path>) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../configs/models")
        .join(name)
}

/// A run of `train_iters` steps on `model` (a config in `configs/models`), `micro` sequences per micro-batch and
/// rank, `accum` micro-batches per step.
fn config(
    model: impl AsRef<Path>,
    corpus: &Path,
    out: &Path,
    train_iters: u64,
    micro: usize,
    accum: usize,
) -> TrainConfig {
    let mut c = TrainConfig::new(
        ModelSource::Random {
            config: model_config(model.as_ref()),
        },
        vec![corpus.to_path_buf()],
        out.to_path_buf(),
        train_iters,
    );
    c.max_length = 32;
    c.micro_batch_size = micro;
    c.grad_accum = accum;
    c.lr = 3e-3;
    c.min_lr = 3e-4;
    c.warmup = Warmup::Iters(0);
    c.lr_decay_style = DecayStyle::Cosine;
    c.logging_steps = 1;
    c.seed = 77;
    c.init_std = 0.05;
    c
}

fn dims(world: usize, cfg: ParallelConfig) -> ParallelDims {
    ParallelDims::new(world, cfg).unwrap()
}

/// Runs the distributed loop on `dims.world()` thread ranks; every rank's result, by rank.
fn run_ranks_with(
    dims: ParallelDims,
    cfg: &TrainConfig,
    observer0: &mut (dyn TrainObserver + Send),
) -> Vec<Result<TrainSummary, TrainError>> {
    let comms = CpuCommunicator::thread_group(dims.world());
    let mut observer0 = Some(observer0);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, c)| {
                let obs = if rank == 0 { observer0.take() } else { None };
                s.spawn(move || match obs {
                    Some(o) => run_distributed_training(&c, dims, cfg, o),
                    None => run_distributed_training(&c, dims, cfg, &mut NoProgress),
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Runs the distributed loop and returns rank 0's summary (every rank must succeed with the same losses).
fn run_distributed(
    dims: ParallelDims,
    cfg: &TrainConfig,
    observer0: &mut (dyn TrainObserver + Send),
) -> TrainSummary {
    let results = run_ranks_with(dims, cfg, observer0);
    let summaries: Vec<TrainSummary> = results
        .into_iter()
        .enumerate()
        .map(|(r, res)| res.unwrap_or_else(|e| panic!("rank {r}: {e}")))
        .collect();
    for (r, s) in summaries.iter().enumerate() {
        assert_eq!(
            s.losses, summaries[0].losses,
            "rank {r} reports other losses than rank 0"
        );
        assert_eq!(s.checkpoints, summaries[0].checkpoints, "rank {r}");
    }
    summaries.into_iter().next().unwrap()
}

fn assert_losses_match(what: &str, got: &[(u64, f64)], want: &[(u64, f64)]) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for ((s1, l1), (s2, l2)) in got.iter().zip(want) {
        assert_eq!(s1, s2, "{what}");
        let rel = (l1 - l2).abs() / l2.abs();
        println!("{what} step {s1}: {l1:.8} vs single rank {l2:.8} (rel {rel:.1e})");
        assert!(
            rel < LOSS_TOL,
            "{what} step {s1}: {l1} vs {l2} (rel {rel:.2e})"
        );
    }
}

/// One layout against the single-rank run: 3 steps, `micro` rows per rank, `accum` micro-batches.
fn check_layout(model: &str, world: usize, pc: ParallelConfig, micro: usize, accum: usize) {
    check_layout_with(model, world, pc, micro, accum, |_| {});
}

/// [`check_layout`] with the multi-rank run's config changed by `tweak` (e.g. the device engines).
fn check_layout_with(
    model: &str,
    world: usize,
    pc: ParallelConfig,
    micro: usize,
    accum: usize,
    tweak: impl Fn(&mut TrainConfig),
) {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path(), 60, 0x9E37_79B9, 40);
    let d = dims(world, pc);
    let single = config(
        model,
        &corpus,
        &tmp.path().join("single"),
        3,
        micro * d.dp(),
        accum,
    );
    let want = run_training(&single, &mut NoProgress).unwrap();
    let mut cfg = config(model, &corpus, &tmp.path().join("multi"), 3, micro, accum);
    tweak(&mut cfg);
    let got = run_distributed(d, &cfg, &mut NoProgress);
    let what = format!("{model} {pc:?} world {world} (device optimizer: {})", cfg.optimizer_on_device);
    assert_losses_match(&what, &got.losses, &want.losses);
    // Rank 0 wrote the same metrics history, with the global batch's tokens and norm.
    let (m1, m2) = (
        read_metrics(&single.output_dir),
        read_metrics(&cfg.output_dir),
    );
    assert_eq!(m1.len(), 3);
    for (a, b) in m1.iter().zip(&m2) {
        assert_eq!(
            (a.step, a.tokens, a.total_tokens, a.lr),
            (b.step, b.tokens, b.total_tokens, b.lr),
            "{what}"
        );
        assert!(
            (a.grad_norm - b.grad_norm).abs() / a.grad_norm < 1e-4,
            "{what}: {} vs {}",
            a.grad_norm,
            b.grad_norm
        );
    }
    // The model has the single-rank format (same tensor names and shapes); the optimizer state is sharded by its
    // owners, covers every element once and reassembles to the single-rank run's.
    let shapes = |m: &hf::TensorMap| {
        m.iter()
            .map(|(k, t)| (k.clone(), t.shape.clone()))
            .collect::<Vec<_>>()
    };
    let a = hf::load_file(single.output_dir.join("checkpoint-3/model.safetensors")).unwrap();
    let b = hf::load_file(cfg.output_dir.join("checkpoint-3/model.safetensors")).unwrap();
    assert_eq!(shapes(&a), shapes(&b), "{what}: model.safetensors");
    let ck = cfg.output_dir.join("checkpoint-3");
    assert!(!ck.join("optimizer.safetensors").exists(), "{what}");
    assert_shards_partition(&ck, d.world(), &what);
    assert_state_matches(&single.output_dir.join("checkpoint-3"), &ck, &what);
}

/// Every element of every parameter is in exactly one shard range (read from the JSON files themselves), every
/// rank wrote a shard, and no shard file holds the full state.
fn assert_shards_partition(ck: &Path, world: usize, what: &str) {
    let odir = ck.join(optimizer_shards::OPTIMIZER_DIR);
    let json = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(odir.join(f)).unwrap()).unwrap()
    };
    let index = json(optimizer_shards::INDEX_FILE);
    let params: Vec<(String, usize)> = index["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_string(),
                p[1].as_u64().unwrap() as usize,
            )
        })
        .collect();
    let total: usize = params.iter().map(|(_, n)| n).sum();
    let mut count: std::collections::HashMap<&str, Vec<u8>> = params
        .iter()
        .map(|(n, k)| (n.as_str(), vec![0u8; *k]))
        .collect();
    let shards = index["shards"].as_array().unwrap();
    assert_eq!(shards.len(), world, "{what}: one shard per rank");
    for (rank, sh) in shards.iter().enumerate() {
        let meta = json(sh.as_str().unwrap());
        assert_eq!(meta["rank"].as_u64(), Some(rank as u64));
        let mut mine = 0;
        for r in meta["ranges"].as_array().unwrap() {
            let c = count.get_mut(r["param"].as_str().unwrap()).unwrap();
            let (start, len) = (
                r["start"].as_u64().unwrap() as usize,
                r["len"].as_u64().unwrap() as usize,
            );
            c[start..start + len].iter_mut().for_each(|x| *x += 1);
            mine += len;
        }
        // Rank 0 built no full-shape state: its file holds its ranges (3 × f32 each, plus a small header).
        let bytes = std::fs::metadata(odir.join(meta["file"].as_str().unwrap()))
            .unwrap()
            .len() as usize;
        assert!(
            bytes < 12 * mine + 64 * 1024 && mine <= total,
            "{what}: rank {rank}'s shard is {bytes} bytes for {mine} of {total} elements"
        );
        println!("{what}: rank {rank} owns {mine} of {total} elements ({bytes} bytes)");
    }
    for (name, c) in &count {
        if let Some(i) = c.iter().position(|&x| x != 1) {
            panic!("{what}: `{name}` element {i} is in {} shards", c[i]);
        }
    }
}

/// The sharded state of `got` reassembled equals the single-rank checkpoint `want` (moments and masters).
fn assert_state_matches(want: &Path, got: &Path, what: &str) {
    let single = hf::load_file(want.join("optimizer.safetensors")).unwrap();
    let model = hf::load_file(want.join("model.safetensors")).unwrap();
    let state = qparallel::train::checkpoint::read_state(got).unwrap();
    let states = optimizer_shards::read_full_states(got, &state.adam_steps).unwrap();
    assert_eq!(states.len() * 2, single.len(), "{what}");
    let close = |a: &[f32], b: &[f32], tol: f32, key: &str| {
        assert_eq!(a.len(), b.len(), "{what}: {key}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * y.abs().max(1.0),
                "{what}: {key}[{i}] = {x}, expected {y}"
            );
        }
    };
    for (name, st) in &states {
        let m = &single[&format!("exp_avg.{name}")].data;
        close(&st.exp_avg, m, 1e-6, &format!("exp_avg.{name}"));
        let v = &single[&format!("exp_avg_sq.{name}")].data;
        close(&st.exp_avg_sq, v, 1e-6, &format!("exp_avg_sq.{name}"));
    }
    // Masters: bit for bit the run's own (gathered) f32 weights; the single-rank weights up to the f32 summation
    // order of the gradients, which AdamW amplifies where exp_avg_sq is still tiny (an update is up to lr = 3e-3
    // there whatever the gradient's size).
    let shards = optimizer_shards::ShardedOptimizer::open(got).unwrap();
    let own = hf::load_file(got.join("model.safetensors")).unwrap();
    for (name, t) in &model {
        let n = t.data.len();
        let v = shards.read(n, &[(name.as_str(), 0..n, 0)]).unwrap();
        assert_eq!(v.master, own[name].data, "{what}: master {name}");
        close(&v.master, &t.data, 1e-3, &format!("master {name}"));
    }
}

#[test]
fn tp2_equals_the_single_rank_run() {
    check_layout(
        "qwen3-tiny.json",
        2,
        ParallelConfig {
            tp: 2,
            ..Default::default()
        },
        4,
        1,
    );
}

#[test]
fn tp2_with_sequence_parallelism_equals_the_single_rank_run() {
    check_layout(
        "qwen3-tiny.json",
        2,
        ParallelConfig {
            tp: 2,
            sp: true,
            ..Default::default()
        },
        2,
        2,
    );
}

#[test]
fn dp2_with_accumulation_equals_the_single_rank_run() {
    check_layout("qwen3-tiny.json", 2, ParallelConfig::default(), 2, 2);
}

#[test]
fn pp2_equals_the_single_rank_run() {
    check_layout(
        "qwen3-tiny.json",
        2,
        ParallelConfig {
            pp: 2,
            ..Default::default()
        },
        2,
        2,
    );
}

#[test]
fn tp2_dp2_equals_the_single_rank_run() {
    check_layout(
        "qwen3-tiny.json",
        4,
        ParallelConfig {
            tp: 2,
            ..Default::default()
        },
        2,
        1,
    );
}

/// Interleaved 1F1B: 4 layers as pp 2 × vpp 2 chunks of one layer, 2 micro-batches per step.
#[test]
fn pp2_vpp2_interleaved_equals_the_single_rank_run() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_config("qwen3-tiny.json")).unwrap())
            .unwrap();
    cfg["num_hidden_layers"] = 4.into();
    let path = tmp.path().join("qwen3-tiny-4-layers.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let interleaved = ParallelConfig {
        pp: 2,
        vpp: 2,
        ..Default::default()
    };
    check_layout(path.to_str().unwrap(), 2, interleaved, 2, 2);
    // An odd number of micro-batches cannot interleave over 2 stages: refused before anything runs.
    let corpus = write_corpus(tmp.path(), 20, 0x9E37_79B9, 40);
    let odd = config(&path, &corpus, &tmp.path().join("odd"), 2, 2, 3);
    for r in run_ranks_with(dims(2, interleaved), &odd, &mut NoProgress) {
        let e = r.unwrap_err();
        assert!(
            matches!(
                e,
                TrainError::Invalid {
                    key: "global_batch_size",
                    ..
                }
            ),
            "{e}"
        );
    }
}

/// tp4 replicates the kv heads (2 kv heads) and the norms on every tp rank: each is written once.
#[test]
fn tp4_with_replicated_kv_heads_shards_every_element_once() {
    check_layout(
        "qwen3-tiny.json",
        4,
        ParallelConfig {
            tp: 4,
            ..Default::default()
        },
        2,
        1,
    );
}

/// ZeRO over dp 2 with pipeline stages and the tied embedding replicated on both stages.
#[test]
fn pp2_dp2_with_tied_embeddings_shards_every_element_once() {
    check_layout(
        "qwen3-tiny.json",
        4,
        ParallelConfig {
            pp: 2,
            ..Default::default()
        },
        2,
        2,
    );
}

#[test]
fn moe_pp2_dp2_equals_the_single_rank_run() {
    check_layout(
        "qwen3-moe-tiny.json",
        4,
        ParallelConfig {
            pp: 2,
            ..Default::default()
        },
        1,
        2,
    );
}

#[test]
fn moe_cp2_equals_the_single_rank_run() {
    check_layout(
        "qwen3-moe-tiny.json",
        2,
        ParallelConfig {
            cp: 2,
            ..Default::default()
        },
        2,
        1,
    );
}

#[test]
fn moe_ep2_equals_the_single_rank_run() {
    check_layout(
        "qwen3-moe-tiny.json",
        2,
        ParallelConfig {
            ep: 2,
            ..Default::default()
        },
        2,
        2,
    );
}

/// The context/expert-parallel engine of GPU ranks (`optimizer_on_device`: gradients summed and reduced as
/// tensors, the device optimizer over the full local parameters) on CPU thread ranks: cp2 and ep2·dp2 on the MoE
/// model equal the single-rank run, with the same metrics and single-rank-format checkpoints.
#[test]
fn moe_cp2_and_ep2_dp2_on_the_device_engine_equal_the_single_rank_run() {
    let on_device = |c: &mut TrainConfig| c.optimizer_on_device = true;
    check_layout_with("qwen3-moe-tiny.json", 2, ParallelConfig { cp: 2, ..Default::default() }, 2, 1, on_device);
    check_layout_with("qwen3-moe-tiny.json", 4, ParallelConfig { ep: 2, ..Default::default() }, 1, 2, on_device);
}

/// Expert parallelism inside the TP model (ep with tp and sp, the 30B-A3B `ep·tp` layouts): ep2·tp2 with
/// etp = tp (each rank its own expert shard, expert-dp 1) and with etp 1 (whole experts, expert-dp 2) equal the
/// single-rank run, with its metrics and a single-rank-format checkpoint; the same on the device engine; ep with
/// tp but without sp is refused naming `sp`.
#[test]
fn moe_ep2_tp2_with_sp_equals_the_single_rank_run() {
    let layout = |etp| ParallelConfig {
        tp: 2,
        ep: 2,
        etp: Some(etp),
        sp: true,
        ..Default::default()
    };
    check_layout("qwen3-moe-tiny.json", 4, layout(2), 1, 2);
    check_layout("qwen3-moe-tiny.json", 4, layout(1), 1, 2);
    check_layout_with("qwen3-moe-tiny.json", 4, layout(2), 1, 2, |c| c.optimizer_on_device = true);

    // An ep2·tp2 checkpoint resumes under ep2 (the cp/ep engine) as if uninterrupted.
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path(), 40, 0x5EED_0E92, 40);
    let want = run_training(
        &config("qwen3-moe-tiny.json", &corpus, &tmp.path().join("one"), 4, 2, 2),
        &mut NoProgress,
    )
    .unwrap();
    let out = tmp.path().join("ep2tp2-then-ep2");
    let mut first = config("qwen3-moe-tiny.json", &corpus, &out, 4, 1, 2);
    first.save_steps = 2;
    let got = run_distributed(dims(4, layout(2)), &first, &mut StopAfter(2));
    assert_losses_match("ep2·tp2 steps 1–2", &got.losses, &want.losses[..2]);
    let ep2 = ParallelConfig {
        ep: 2,
        ..Default::default()
    };
    // ep2 on 2 ranks folds over dp 2: micro-batch 1 per rank keeps the global batch.
    let second = run_distributed(dims(2, ep2), &config("qwen3-moe-tiny.json", &corpus, &out, 4, 1, 2), &mut NoProgress);
    assert_eq!(second.resumed_from, Some(out.join("checkpoint-2")));
    assert_losses_match("ep2 resumed from ep2·tp2", &second.losses, &want.losses[2..]);

    let cfg = config("qwen3-moe-tiny.json", &corpus, &tmp.path().join("no-sp"), 2, 1, 1);
    let no_sp = ParallelConfig {
        tp: 2,
        ep: 2,
        ..Default::default()
    };
    for r in run_ranks_with(dims(4, no_sp), &cfg, &mut NoProgress) {
        let e = r.unwrap_err();
        assert!(matches!(e, TrainError::Invalid { key: "sp", .. }), "{e}");
    }
}

/// SFT rows (unpacked) have the length of their longest sample, so micro-batches differ in length: the pipeline
/// pads them to one shape and sequence parallelism to an even token count, which changes no loss.
#[test]
fn sft_rows_of_different_lengths_train_under_pp_and_sp() {
    let tmp = tempfile::tempdir().unwrap();
    let sft = |out: &Path, micro: usize| {
        let mut c = TrainConfig::new(
            ModelSource::Random {
                config: model_config("qwen3-tiny-chat/config.json"),
            },
            vec![PathBuf::from("self-cognition#24")],
            out.to_path_buf(),
            3,
        );
        c.max_length = 160;
        c.micro_batch_size = micro;
        c.grad_accum = 2;
        c.lr = 1e-2;
        c.warmup = Warmup::Iters(0);
        c.sft = Some(qparallel::data::SftOptions {
            model_name: Some(("小Q".into(), "Q".into())),
            model_author: Some(("团队".into(), "Team".into())),
            ..Default::default()
        });
        c
    };
    let want = run_training(&sft(&tmp.path().join("single"), 1), &mut NoProgress).unwrap();
    for (name, world, pc) in [
        (
            "pp2",
            2,
            ParallelConfig {
                pp: 2,
                ..Default::default()
            },
        ),
        (
            "tp2+sp",
            2,
            ParallelConfig {
                tp: 2,
                sp: true,
                ..Default::default()
            },
        ),
    ] {
        let cfg = sft(&tmp.path().join(name), 1);
        let got = run_distributed(dims(world, pc), &cfg, &mut NoProgress);
        assert_losses_match(&format!("sft {name}"), &got.losses, &want.losses);
    }
}

#[test]
fn a_tp2_pp2_checkpoint_resumes_under_dp4_as_if_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path(), 60, 0x9E37_79B9, 40);
    let full = config(
        "qwen3-tiny.json",
        &corpus,
        &tmp.path().join("full"),
        4,
        4,
        1,
    );
    let want = run_training(&full, &mut NoProgress).unwrap();

    let out = tmp.path().join("resharded");
    let mut part = config("qwen3-tiny.json", &corpus, &out, 4, 4, 1);
    part.save_steps = 2;
    let tp2pp2 = dims(
        4,
        ParallelConfig {
            tp: 2,
            pp: 2,
            ..Default::default()
        },
    );
    let first = run_distributed(tp2pp2, &part, &mut StopAfter(2));
    assert!(first.stopped_early);
    assert_eq!(first.checkpoints, vec![out.join("checkpoint-2")]);
    assert_losses_match("tp2·pp2 steps 1–2", &first.losses, &want.losses[..2]);

    let mut rest = config("qwen3-tiny.json", &corpus, &out, 4, 1, 1);
    rest.save_steps = 2;
    let dp4 = dims(4, ParallelConfig::default());
    let second = run_distributed(dp4, &rest, &mut NoProgress);
    assert_eq!(second.resumed_from, Some(out.join("checkpoint-2")));
    assert_losses_match("dp4 resumed, steps 3–4", &second.losses, &want.losses[2..]);
    let steps: Vec<u64> = read_metrics(&out).iter().map(|m| m.step).collect();
    assert_eq!(steps, vec![1, 2, 3, 4], "one consistent metrics history");
}

#[test]
fn checkpoints_move_between_one_and_several_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path(), 60, 0x9E37_79B9, 40);
    let full = config(
        "qwen3-tiny.json",
        &corpus,
        &tmp.path().join("full"),
        4,
        4,
        1,
    );
    let want = run_training(&full, &mut NoProgress).unwrap();

    // dp2 → single rank.
    let out = tmp.path().join("dp2-then-one");
    let mut multi = config("qwen3-tiny.json", &corpus, &out, 4, 2, 1);
    multi.save_steps = 2;
    let first = run_distributed(
        dims(2, ParallelConfig::default()),
        &multi,
        &mut StopAfter(2),
    );
    assert_losses_match("dp2 steps 1–2", &first.losses, &want.losses[..2]);
    let single = config("qwen3-tiny.json", &corpus, &out, 4, 4, 1);
    let second = run_training(&single, &mut NoProgress).unwrap();
    assert_eq!(second.resumed_from, Some(out.join("checkpoint-2")));
    assert_losses_match(
        "single rank resumed from dp2",
        &second.losses,
        &want.losses[2..],
    );

    // single rank → pp2.
    let out = tmp.path().join("one-then-pp2");
    let mut single = config("qwen3-tiny.json", &corpus, &out, 4, 4, 1);
    single.save_steps = 2;
    let first = run_training(&single, &mut StopAfter(2)).unwrap();
    assert_eq!(first.final_step, 2);
    let multi = config("qwen3-tiny.json", &corpus, &out, 4, 2, 2);
    let second = run_distributed(
        dims(
            2,
            ParallelConfig {
                pp: 2,
                ..Default::default()
            },
        ),
        &multi,
        &mut NoProgress,
    );
    assert_eq!(second.resumed_from, Some(out.join("checkpoint-2")));
    assert_losses_match(
        "pp2 resumed from a single rank",
        &second.losses,
        &want.losses[2..],
    );
}

#[test]
fn unsupported_settings_are_typed_errors_and_a_rank0_failure_reaches_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path(), 20, 0x9E37_79B9, 40);
    let cfg = config("qwen3-tiny.json", &corpus, &tmp.path().join("out"), 2, 2, 1);

    let mixed = dims(
        4,
        ParallelConfig {
            tp: 2,
            cp: 2,
            ..Default::default()
        },
    );
    for r in run_ranks_with(mixed, &cfg, &mut NoProgress) {
        let e = r.unwrap_err();
        assert!(matches!(e, TrainError::Layout(_)), "{e}");
    }

    let mut lora = cfg.clone();
    lora.lora = Some(qparallel::lora::LoraConfig::new(8, 16.0));
    for r in run_ranks_with(dims(2, ParallelConfig::default()), &lora, &mut NoProgress) {
        assert!(matches!(
            r.unwrap_err(),
            TrainError::Invalid { key: "lora", .. }
        ));
    }

    // Rank 0 cannot resume from a checkpoint that does not exist: it reports why, the others that it failed.
    let mut missing = cfg.clone();
    missing.resume = Resume::Path(tmp.path().join("no-such-checkpoint"));
    let results = run_ranks_with(
        dims(
            2,
            ParallelConfig {
                tp: 2,
                ..Default::default()
            },
        ),
        &missing,
        &mut NoProgress,
    );
    let e0 = results[0].as_ref().unwrap_err().to_string();
    assert!(e0.contains("no-such-checkpoint"), "{e0}");
    match &results[1] {
        Err(TrainError::PeerFailed {
            rank: 0,
            message: Some(m),
            ..
        }) => {
            assert!(m.contains("no-such-checkpoint"), "{m}")
        }
        other => panic!("rank 1: {other:?}"),
    }
}

/// The GPU engine's optimizer (DeviceAdamW over a TP model, replicated over dp, gradients summed and dp-reduced as
/// tensors) on CPU thread ranks: tp2·dp2 equals the single-rank run, and its whole-parameter optimizer shards
/// resume under ZeRO-1 (dp2) and on one rank as if uninterrupted.
#[test]
fn device_optimizer_tp2_dp2_equals_the_single_rank_run_and_its_checkpoints_resume_anywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path(), 60, 0x51ED_2701, 40);
    let full = config("qwen3-tiny.json", &corpus, &tmp.path().join("full"), 4, 4, 2);
    let want = run_training(&full, &mut NoProgress).unwrap();
    let tp2dp2 = dims(4, ParallelConfig { tp: 2, ..Default::default() });

    for (what, resume_dims, micro) in [("dp2 (ZeRO-1)", Some(dims(2, ParallelConfig::default())), 2), ("one rank", None, 4)] {
        let out = tmp.path().join(format!("dev-then-{}", what.replace(' ', "-")));
        let mut multi = config("qwen3-tiny.json", &corpus, &out, 4, 2, 2);
        multi.save_steps = 2;
        multi.optimizer_on_device = true;
        let first = run_distributed(tp2dp2, &multi, &mut StopAfter(2));
        assert_losses_match("device-optimizer tp2·dp2 steps 1–2", &first.losses, &want.losses[..2]);
        assert_shards_partition(&out.join("checkpoint-2"), 4, "device-optimizer tp2·dp2");
        let next = config("qwen3-tiny.json", &corpus, &out, 4, micro, 2);
        let second = match resume_dims {
            Some(d) => run_distributed(d, &next, &mut NoProgress),
            None => run_training(&next, &mut NoProgress).unwrap(),
        };
        assert_eq!(second.resumed_from, Some(out.join("checkpoint-2")));
        assert_losses_match(&format!("{what} resumed from device-optimizer shards"), &second.losses, &want.losses[2..]);
    }
}

/// The pipeline engine with the GPU engine's optimizer (DeviceAdamW replicated over dp, `PipelineModel::step_device`)
/// on CPU thread ranks: pp2 and tp2·pp2 (tied embeddings: the embedding group's replicas) equal the single-rank
/// run, and a pp2 checkpoint resumes on one rank as if uninterrupted.
#[test]
fn device_optimizer_pipelines_equal_the_single_rank_run_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path(), 60, 0x00DD_BA11, 40);
    let full = config("qwen3-tiny.json", &corpus, &tmp.path().join("full"), 4, 4, 2);
    let want = run_training(&full, &mut NoProgress).unwrap();

    let mut tp2pp2 = config("qwen3-tiny.json", &corpus, &tmp.path().join("tp2pp2"), 4, 4, 2);
    tp2pp2.optimizer_on_device = true;
    let got = run_distributed(
        dims(4, ParallelConfig { tp: 2, pp: 2, ..Default::default() }),
        &tp2pp2,
        &mut NoProgress,
    );
    assert_losses_match("device-optimizer tp2·pp2", &got.losses, &want.losses);

    let out = tmp.path().join("pp2-then-one");
    let mut pp2 = config("qwen3-tiny.json", &corpus, &out, 4, 4, 2);
    pp2.save_steps = 2;
    pp2.optimizer_on_device = true;
    let first = run_distributed(dims(2, ParallelConfig { pp: 2, ..Default::default() }), &pp2, &mut StopAfter(2));
    assert_losses_match("device-optimizer pp2 steps 1–2", &first.losses, &want.losses[..2]);
    assert_shards_partition(&out.join("checkpoint-2"), 2, "device-optimizer pp2");
    let one = config("qwen3-tiny.json", &corpus, &out, 4, 4, 2);
    let second = run_training(&one, &mut NoProgress).unwrap();
    assert_eq!(second.resumed_from, Some(out.join("checkpoint-2")));
    assert_losses_match("one rank resumed from device-optimizer pp2 shards", &second.losses, &want.losses[2..]);
}

/// The GPU engines' ZeRO-1 (`distributed_optimizer`: `DeviceDistributedOptimizer`, masters and moments sharded over
/// dp, gradients reduce-scattered and weights all-gathered as tensors) on CPU thread ranks: tp2·dp2 and pp2·dp2
/// equal the single-rank run; a sharded checkpoint resumes under the replicated device optimizer and the other
/// way round, as if uninterrupted.
#[test]
fn device_distributed_optimizer_equals_the_single_rank_run_and_resumes_across_optimizers() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path(), 60, 0x2E80_0001, 40);
    let full = config("qwen3-tiny.json", &corpus, &tmp.path().join("full"), 4, 4, 2);
    let want = run_training(&full, &mut NoProgress).unwrap();
    let tp2dp2 = dims(4, ParallelConfig { tp: 2, ..Default::default() });

    for (first_sharded, what) in [(true, "sharded then replicated"), (false, "replicated then sharded")] {
        let out = tmp.path().join(what.replace(' ', "-"));
        let mut first_cfg = config("qwen3-tiny.json", &corpus, &out, 4, 2, 2);
        first_cfg.save_steps = 2;
        first_cfg.optimizer_on_device = true;
        first_cfg.distributed_optimizer = first_sharded;
        let first = run_distributed(tp2dp2, &first_cfg, &mut StopAfter(2));
        assert_losses_match(&format!("{what}: tp2·dp2 steps 1–2"), &first.losses, &want.losses[..2]);
        assert_shards_partition(&out.join("checkpoint-2"), 4, what);
        let mut next = config("qwen3-tiny.json", &corpus, &out, 4, 2, 2);
        next.optimizer_on_device = true;
        next.distributed_optimizer = !first_sharded;
        let second = run_distributed(tp2dp2, &next, &mut NoProgress);
        assert_eq!(second.resumed_from, Some(out.join("checkpoint-2")));
        assert_losses_match(&format!("{what}: tp2·dp2 resumed"), &second.losses, &want.losses[2..]);
    }

    let mut pp2dp2 = config("qwen3-tiny.json", &corpus, &tmp.path().join("pp2dp2"), 4, 2, 2);
    pp2dp2.optimizer_on_device = true;
    pp2dp2.distributed_optimizer = true;
    let got = run_distributed(dims(4, ParallelConfig { pp: 2, ..Default::default() }), &pp2dp2, &mut NoProgress);
    assert_losses_match("sharded device optimizer pp2·dp2", &got.losses, &want.losses);
}
