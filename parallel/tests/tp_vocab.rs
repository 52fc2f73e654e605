//! Vocab-parallel embedding and cross-entropy against the single-device ops on random inputs (never zeros):
//! each rank sees only its `[T, V/p]` logits / `[V/p, H]` table, yet the loss equals the full-vocabulary loss
//! and the local gradients are the matching column / row blocks of the full gradients.

mod tp_support;

use qkernels::{Device, Tensor, ops};
use qparallel::tensor_parallel::{mappings, vocab};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tp_support::{rel, rel_err, run_ranks};

fn uniform(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| scale * (rng.random::<f32>() * 2.0 - 1.0))
        .collect()
}

#[test]
fn vocab_parallel_cross_entropy_matches_full_vocab() {
    let (t, v) = (12, 40);
    let mut rng = StdRng::seed_from_u64(3);
    let logits = uniform(&mut rng, t * v, 6.0);
    let targets: Vec<u32> = (0..t).map(|_| rng.random_range(0..v as u32)).collect();
    let mut weights: Vec<f32> = (0..t).map(|_| 0.5 + rng.random::<f32>()).collect();
    weights[3] = 0.0;
    let dev = Device::Cpu;
    let full_logits = Tensor::from_f32(logits.clone(), &[t, v], &dev).unwrap();
    let want = ops::cross_entropy_fwd_bwd(
        &full_logits,
        &Tensor::from_u32(targets.clone(), &[t], &dev).unwrap(),
        &Tensor::from_f32(weights.clone(), &[t], &dev).unwrap(),
        None,
    )
    .unwrap();
    let want_d = want.dlogits.to_vec_f32().unwrap();
    let denom: f64 = weights.iter().map(|&w| w as f64).sum();
    for p in [1, 2, 4] {
        let vl = v / p;
        let outs = run_ranks(p, |rank, world| {
            let local = full_logits.narrow(1, rank * vl, vl).unwrap();
            let out =
                vocab::cross_entropy_fwd_bwd(&local, &targets, &weights, denom, rank * vl, &world)
                    .unwrap();
            assert_eq!(out.dlogits.shape(), &[t, vl], "gradient stays vocab-split");
            (out.loss, out.dlogits.to_vec_f32().unwrap())
        });
        for (rank, (loss, d)) in outs.iter().enumerate() {
            let e = rel(*loss, want.loss);
            assert!(
                e < 1e-6,
                "p={p} rank {rank}: loss {loss} vs {} ({e:.2e})",
                want.loss
            );
            let block: Vec<f32> = (0..t)
                .flat_map(|r| want_d[r * v + rank * vl..r * v + (rank + 1) * vl].to_vec())
                .collect();
            let e = rel_err(d, &block);
            assert!(e < 1e-5, "p={p} rank {rank}: dlogits rel err {e:.2e}");
            assert!(
                d[3 * vl..4 * vl].iter().all(|&g| g == 0.0),
                "zero-weight token"
            );
        }
    }
}

#[test]
fn vocab_parallel_embedding_matches_full_table() {
    let (vocab_size, h, t) = (24, 5, 10);
    let mut rng = StdRng::seed_from_u64(9);
    let table = Tensor::from_f32(
        uniform(&mut rng, vocab_size * h, 1.0),
        &[vocab_size, h],
        &Device::Cpu,
    )
    .unwrap();
    let ids: Vec<u32> = (0..t)
        .map(|i| [0, 23, 5, 5, 12, 17, 6, 11, 18, 0][i])
        .collect();
    let ids_t = Tensor::from_u32(ids.clone(), &[t], &Device::Cpu).unwrap();
    let want_x = ops::embedding_fwd(&ids_t, &table)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let dx = Tensor::from_f32(uniform(&mut rng, t * h, 1.0), &[t, h], &Device::Cpu).unwrap();
    let want_dt = ops::embedding_bwd(&ids_t, &dx, vocab_size)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    for p in [2, 3, 4] {
        let vl = vocab_size / p;
        let outs = run_ranks(p, |rank, world| {
            let shard = table.narrow(0, rank * vl, vl).unwrap();
            let partial = vocab::embedding_fwd(&ids, &shard, rank * vl).unwrap();
            let x = mappings::reduce_from_tp_region(&partial, &world).unwrap();
            let dt = vocab::embedding_bwd(&ids, &dx, vl, rank * vl).unwrap();
            (x.to_vec_f32().unwrap(), dt.to_vec_f32().unwrap())
        });
        for (rank, (x, dt)) in outs.iter().enumerate() {
            assert_eq!(
                x, &want_x,
                "p={p}: rank {rank} embedding (one owner per id, others add zeros)"
            );
            assert_eq!(
                dt.as_slice(),
                &want_dt[rank * vl * h..(rank + 1) * vl * h],
                "p={p} rank {rank}"
            );
        }
    }
}
