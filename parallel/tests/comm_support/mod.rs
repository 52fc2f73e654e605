//! Shared harness of the communicator tests: run one closure per rank on its own thread ("SPMD"), build thread
//! or TCP worlds, and a battery that checks every collective against a direct computation.
#![allow(dead_code)]

use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use qparallel::comm::{CommError, CpuCommunicator, ReduceOp, chunk_range};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Timeout used by the battery: long enough for a loaded 2-core machine, short enough that a bug fails fast.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `f` once per communicator, each on its own thread; returns the results in rank order.
pub fn spmd<R: Send>(
    comms: Vec<CpuCommunicator>,
    f: impl Fn(CpuCommunicator) -> R + Sync,
) -> Vec<R> {
    thread::scope(|s| {
        let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(|| f(c))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

pub fn thread_world(n: usize, timeout: Duration) -> Vec<CpuCommunicator> {
    CpuCommunicator::thread_group(n)
        .into_iter()
        .map(|c| c.with_timeout(timeout))
        .collect()
}

/// `n` TCP-connected world communicators on 127.0.0.1; the "rendezvous" is this function collecting the
/// listeners' addresses before the ranks connect concurrently.
pub fn tcp_world(n: usize, timeout: Duration) -> Vec<CpuCommunicator> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addresses: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let addresses = &addresses;
                s.spawn(move || CpuCommunicator::connect_tcp(rank, l, addresses, timeout))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().expect("tcp connect"))
            .collect()
    })
}

/// Rank `rank`'s random data for test case `case` (every rank can regenerate every other rank's data).
pub fn data(case: u64, rank: usize, len: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(
        case.wrapping_mul(1_000_003) ^ (rank as u64).wrapping_mul(0x9e37_79b9),
    );
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn reduce_direct(op: ReduceOp, n: usize, case: u64, len: usize) -> Vec<f64> {
    let all: Vec<Vec<f32>> = (0..n).map(|r| data(case, r, len)).collect();
    (0..len)
        .map(|i| {
            let xs = all.iter().map(|v| v[i] as f64);
            match op {
                ReduceOp::Sum => xs.sum(),
                ReduceOp::Avg => xs.sum::<f64>() / n as f64,
                ReduceOp::Prod => xs.product(),
                ReduceOp::Max => xs.fold(f64::NEG_INFINITY, f64::max),
                ReduceOp::Min => xs.fold(f64::INFINITY, f64::min),
            }
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-5 * (1.0 + w.abs());
        assert!(
            (g as f64 - w).abs() <= tol,
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

pub const LENGTHS: [usize; 9] = [0, 1, 2, 3, 5, 7, 13, 64, 1001];

/// Every collective on `c`, checked against direct computations. All members must call it with the same `seed`.
/// Returns the all-reduce results so the caller can check they are bit-identical across ranks.
pub fn exercise_all(c: &CpuCommunicator, seed: u64) -> Vec<Vec<f32>> {
    let n = c.size();
    let me = c.rank();
    let mut case = seed * 1000;
    let mut reduced = Vec::new();

    // all_reduce, every op, lengths below / not divisible by / above n.
    for op in [
        ReduceOp::Sum,
        ReduceOp::Avg,
        ReduceOp::Max,
        ReduceOp::Min,
        ReduceOp::Prod,
    ] {
        for len in LENGTHS {
            case += 1;
            let mut buf = data(case, me, len);
            c.all_reduce(&mut buf, op).unwrap();
            let want = reduce_direct(op, n, case, len);
            if matches!(op, ReduceOp::Max | ReduceOp::Min) {
                // No rounding in max/min: must be exact.
                let exact: Vec<f32> = want.iter().map(|&w| w as f32).collect();
                assert_eq!(buf, exact, "all_reduce {op:?} len {len} n {n}");
            } else {
                assert_close(&buf, &want, &format!("all_reduce {op:?} len {len} n {n}"));
            }
            reduced.push(buf);
        }
    }

    // Integer all_reduce is exact.
    {
        let mine: Vec<i64> = (0..11)
            .map(|i| (me as i64 + 1) * 1_000_000_007 * (i - 5))
            .collect();
        let mut buf = mine.clone();
        c.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
        let total: i64 = (1..=n as i64).sum();
        let want: Vec<i64> = (0..11).map(|i| total * 1_000_000_007 * (i - 5)).collect();
        assert_eq!(buf, want, "i64 all_reduce");
    }

    // all_gather: any per-rank length, output in rank order, exact.
    for m in [0, 1, 3, 7, 100] {
        case += 1;
        let input = data(case, me, m);
        let mut out = vec![f32::NAN; n * m];
        c.all_gather(&input, &mut out).unwrap();
        let want: Vec<f32> = (0..n).flat_map(|r| data(case, r, m)).collect();
        assert_eq!(out, want, "all_gather m {m} n {n}");
    }

    // reduce_scatter: lengths not divisible by n, rank r gets balanced chunk r.
    for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
        for len in LENGTHS {
            case += 1;
            let input = data(case, me, len);
            let range = chunk_range(len, n, me);
            let mut out = vec![f32::NAN; range.len()];
            c.reduce_scatter(&input, &mut out, op).unwrap();
            let want = reduce_direct(op, n, case, len);
            assert_close(
                &out,
                &want[range],
                &format!("reduce_scatter {op:?} len {len} n {n}"),
            );
        }
    }

    // all_to_all_v: random count matrix (zeros included), known to all ranks from the seed.
    for _ in 0..4 {
        case += 1;
        let mut rng = StdRng::seed_from_u64(case);
        let counts: Vec<Vec<usize>> = (0..n)
            .map(|_| (0..n).map(|_| rng.random_range(0..6usize)).collect())
            .collect();
        // counts[s][d]: elements from s to d.
        let send_counts = counts[me].clone();
        let recv_counts: Vec<usize> = (0..n).map(|s| counts[s][me]).collect();
        let input = data(case, me, send_counts.iter().sum());
        let mut out = vec![f32::NAN; recv_counts.iter().sum()];
        c.all_to_all_v(&input, &send_counts, &mut out, &recv_counts)
            .unwrap();
        let mut want = Vec::new();
        for s in 0..n {
            let theirs = data(case, s, counts[s].iter().sum());
            let off: usize = counts[s][..me].iter().sum();
            want.extend_from_slice(&theirs[off..off + counts[s][me]]);
        }
        assert_eq!(out, want, "all_to_all_v n {n} counts {counts:?}");
    }

    // broadcast from every root.
    for root in 0..n {
        for len in [0, 1, 17] {
            case += 1;
            let mut buf = if me == root {
                data(case, root, len)
            } else {
                vec![f32::NAN; len]
            };
            c.broadcast(&mut buf, root).unwrap();
            assert_eq!(
                buf,
                data(case, root, len),
                "broadcast root {root} len {len} n {n}"
            );
        }
    }

    // send/recv around the ring, three messages in a row (order preserved), uneven lengths.
    if n > 1 {
        let next = (me + 1) % n;
        let prev = (me + n - 1) % n;
        for k in 0..3 {
            case += 1;
            c.send(&data(case, me, me + k), next).unwrap();
        }
        for k in 0..3 {
            let mut buf = vec![f32::NAN; prev + k];
            c.recv(&mut buf, prev).unwrap();
            assert_eq!(
                buf,
                data(case - 2 + k as u64, prev, prev + k),
                "recv {k} from {prev}"
            );
        }
    }

    c.barrier().unwrap();
    reduced
}

/// Asserts that `results` (one per rank) are bit-identical.
pub fn assert_identical(results: &[Vec<Vec<f32>>]) {
    for (r, res) in results.iter().enumerate() {
        for (k, (a, b)) in res.iter().zip(&results[0]).enumerate() {
            let (a, b): (Vec<u32>, Vec<u32>) = (
                a.iter().map(|x| x.to_bits()).collect(),
                b.iter().map(|x| x.to_bits()).collect(),
            );
            assert_eq!(a, b, "rank {r} result {k} differs from rank 0");
        }
    }
}

pub fn is_peer_failure(e: &CommError) -> bool {
    matches!(e, CommError::PeerGone { .. } | CommError::Timeout { .. })
}
