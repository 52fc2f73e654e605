//! The conjugate collective pairs of tensor / sequence parallelism are adjoint: `⟨F(x), y⟩ = ⟨x, F*(y)⟩` where
//! `F*` is the function we run in backward. A *distributed* value (partial sums, SP shards, per-rank column
//! blocks) has the inner product `Σ_r ⟨u_r, v_r⟩`; a *replicated* value (the same tensor on every rank) is one
//! value, its inner product counted once. `f`: replicated → distributed copies, `g`: distributed partials →
//! replicated sum; the SP pair maps distributed to distributed. Checked on thread ranks for `enter`/`exit` with
//! and without SP, plus the exact values of the SP shards.

mod tp_support;

use qkernels::{Device, Tensor};
use qparallel::comm::{CommExt, Communicator, ReduceOp};
use qparallel::tensor_parallel::mappings::{self, enter, enter_backward, exit, exit_backward};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tp_support::run_ranks;

fn rand_tensor(seed: u64, rows: usize, cols: usize) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let data = (0..rows * cols)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    Tensor::from_f32(data, &[rows, cols], &Device::Cpu).unwrap()
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// `⟨F(x), y⟩` and `⟨x, F*(y)⟩` over `p` ranks, for `x_r [xr, C]`, `y_r [yr, C]`; `x_rep` / `y_rep`: the input /
/// output space is replicated (same random values on every rank, inner product counted once).
fn adjoint_sides(
    p: usize,
    (xr, yr, c): (usize, usize, usize),
    (x_rep, y_rep): (bool, bool),
    fwd: impl Fn(&Tensor, &dyn Communicator) -> Tensor + Sync,
    bwd: impl Fn(&Tensor, &dyn Communicator) -> Tensor + Sync,
) -> (f64, f64) {
    let per_rank = run_ranks(p, |rank, world| {
        let x = rand_tensor(10 + if x_rep { 0 } else { rank as u64 }, xr, c);
        let y = rand_tensor(50 + if y_rep { 0 } else { rank as u64 }, yr, c);
        let once = |v: f64, rep: bool| if rep { v / p as f64 } else { v };
        let lhs = once(dot(&fwd(&x, &world), &y), y_rep);
        let rhs = once(dot(&x, &bwd(&y, &world)), x_rep);
        let mut sums = vec![lhs as f32, rhs as f32];
        world.all_reduce(&mut sums, ReduceOp::Sum).unwrap();
        (sums[0] as f64, sums[1] as f64)
    });
    per_rank[0]
}

#[test]
fn conjugate_pairs_are_adjoint() {
    for p in [2, 4] {
        let (t, c) = (8, 5);
        for sp in [false, true] {
            let xr = if sp { t / p } else { t };
            let (l, r) = adjoint_sides(
                p,
                (xr, t, c),
                (!sp, false),
                |x, w| enter(x, w, sp).unwrap(),
                |y, w| enter_backward(y, w, sp).unwrap(),
            );
            println!("p={p} sp={sp} enter: {l:.6} vs {r:.6}");
            assert!(
                (l - r).abs() < 1e-4 * l.abs().max(1.0),
                "enter p={p} sp={sp}: {l} vs {r}"
            );
            let yr = if sp { t / p } else { t };
            let (l, r) = adjoint_sides(
                p,
                (t, yr, c),
                (false, !sp),
                |x, w| exit(x, w, sp).unwrap(),
                |y, w| exit_backward(y, w, sp).unwrap(),
            );
            println!("p={p} sp={sp} exit: {l:.6} vs {r:.6}");
            assert!(
                (l - r).abs() < 1e-4 * l.abs().max(1.0),
                "exit p={p} sp={sp}: {l} vs {r}"
            );
        }
    }
}

/// The SP all-gather concatenates row shards in rank order; the reduce-scatter leaves rank `i` the summed rows
/// `[i·R/p, (i+1)·R/p)`; `split_rows` is the local inverse of the gather.
#[test]
fn sp_shards_are_contiguous_token_chunks() {
    let p = 4;
    let out = run_ranks(p, |rank, world| {
        let (rows, c) = (2, 3);
        let x = Tensor::from_f32(
            (0..rows * c).map(|i| (rank * 100 + i) as f32).collect(),
            &[rows, c],
            &Device::Cpu,
        )
        .unwrap();
        let gathered = mappings::gather_from_sp_region(&x, &world).unwrap();
        assert_eq!(gathered.shape(), &[rows * p, c]);
        assert_eq!(
            mappings::split_rows(&gathered, p, rank)
                .unwrap()
                .to_vec_f32()
                .unwrap(),
            x.to_vec_f32().unwrap()
        );
        let full = Tensor::full(rank as f32 + 1.0, &[8, c], &Device::Cpu).unwrap();
        let shard = mappings::reduce_scatter_to_sp_region(&full, &world).unwrap();
        assert_eq!(shard.shape(), &[2, c]);
        let all = world
            .all_gather_vec(&gathered.to_vec_f32().unwrap())
            .unwrap();
        (all, shard.to_vec_f32().unwrap())
    });
    let want_gathered: Vec<f32> = (0..p)
        .flat_map(|r| (0..6).map(move |i| (r * 100 + i) as f32))
        .collect();
    for (all, shard) in &out {
        assert_eq!(&all[..want_gathered.len()], want_gathered.as_slice());
        assert_eq!(shard, &vec![10.0; 6], "1+2+3+4 on every element");
    }
    // Rows not divisible by the group size are a typed error.
    run_ranks(2, |_, world| {
        let odd = Tensor::full(1.0, &[3, 2], &Device::Cpu).unwrap();
        assert!(matches!(
            mappings::reduce_scatter_to_sp_region(&odd, &world),
            Err(qparallel::tensor_parallel::TpError::TokensNotDivisible { tokens: 3, tp: 2 })
        ));
    });
}
