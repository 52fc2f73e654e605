//! The comm-check job body over thread and TCP groups, the all-to-all's expected result against its definition, and
//! deliberately corrupted results (a communicator, host buffers) that must fail verification.

mod comm_support;

use comm_support::*;
use qparallel::comm::{CommExt, CommResult, Communicator, CpuCommunicator, ReduceOp};
use qparallel::comm_check::{
    Collective, CommCheckError, CommCheckOptions, DEFAULT_WARMUP, check_expected, check_input,
    count_wrong, run_comm_check, run_comm_check_with,
};

#[test]
fn comm_check_passes_on_4_threads_with_sane_numbers() {
    let reports = spmd(thread_world(4, TEST_TIMEOUT), |c| {
        run_comm_check(&c, 1 << 16, 5).unwrap()
    });
    for rep in &reports {
        assert_eq!(rep, &reports[0], "every rank reports the same numbers");
    }
    let rep = &reports[0];
    println!("{rep}");
    assert!(rep.passed());
    assert_eq!((rep.ranks, rep.iters, rep.warmup), (4, 5, DEFAULT_WARMUP));
    assert_eq!(rep.results.len(), 4);
    let order: Vec<Collective> = rep.results.iter().map(|r| r.collective).collect();
    assert_eq!(order, Collective::ALL);
    assert_eq!(Collective::ALL[3], Collective::AllToAll);
    for r in &rep.results {
        assert!(r.passed && r.wrong == 0, "{r:?}");
        assert_eq!((r.bytes, r.count), (1 << 16, 1 << 14));
        assert!(r.avg_time.as_secs_f64() > 0.0);
        assert!(r.algbw_gbps.is_finite() && r.algbw_gbps > 0.0, "{r:?}");
        assert!(r.busbw_gbps.is_finite() && r.busbw_gbps > 0.0, "{r:?}");
        let algbw = r.bytes as f64 / r.avg_time.as_secs_f64() / 1e9;
        assert!((r.algbw_gbps - algbw).abs() <= 1e-9 * algbw);
        // 2(n-1)/n for all-reduce, (n-1)/n for all-gather, reduce-scatter and all-to-all (n = 4).
        let factor = if r.collective == Collective::AllReduce {
            1.5
        } else {
            0.75
        };
        assert!(
            (r.busbw_gbps - factor * r.algbw_gbps).abs() <= 1e-12 * r.busbw_gbps.max(1.0),
            "{r:?}"
        );
    }
    let table = rep.to_string();
    assert!(
        table.contains("all_reduce")
            && table.contains("reduce_scatter")
            && table.contains("all_to_all")
            && table.contains("OK"),
        "{table}"
    );
    assert_eq!(Collective::AllToAll.name(), "all_to_all");
}

#[test]
fn comm_check_sizes_follow_nccl_tests() {
    // 1001 bytes on 3 ranks: all-reduce 250 floats; all-gather / reduce-scatter / all-to-all 249 (a multiple of 3).
    let reports = spmd(tcp_world(3, TEST_TIMEOUT), |c| {
        run_comm_check_with(
            &c,
            CommCheckOptions {
                bytes: 1001,
                iters: 2,
                warmup: 1,
            },
        )
        .unwrap()
    });
    let rep = &reports[0];
    assert!(rep.passed(), "{rep}");
    let sizes: Vec<(usize, usize)> = rep.results.iter().map(|r| (r.count, r.bytes)).collect();
    assert_eq!(sizes, [(250, 1000), (249, 996), (249, 996), (249, 996)]);
    // Tiny request: at least one element per rank.
    let reports = spmd(thread_world(2, TEST_TIMEOUT), |c| {
        run_comm_check(&c, 0, 1).unwrap()
    });
    let sizes: Vec<usize> = reports[0].results.iter().map(|r| r.count).collect();
    assert_eq!(sizes, [1, 2, 2, 2]);
    // Zero iterations is an error, not a division by zero.
    let c = CpuCommunicator::thread_group(1).pop().unwrap();
    assert!(matches!(
        run_comm_check(&c, 64, 0),
        Err(CommCheckError::NoIterations)
    ));
}

/// A communicator that perturbs one element of one collective's result on one rank.
struct Corrupt {
    inner: CpuCommunicator,
    target: Collective,
    rank: usize,
}

impl Corrupt {
    fn perturb(&self, c: Collective, out: &mut [f32]) {
        // Only multi-element buffers: the check's own 1-element agreement reductions stay intact.
        if c == self.target && self.inner.rank() == self.rank && out.len() > 1 {
            out[out.len() / 2] += 1.0;
        }
    }
}

impl Communicator for Corrupt {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn global_ranks(&self) -> &[usize] {
        self.inner.global_ranks()
    }
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> CommResult<()> {
        self.inner.all_reduce(buf, op)?;
        self.perturb(Collective::AllReduce, buf);
        Ok(())
    }
    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> CommResult<()> {
        self.inner.all_gather(input, output)?;
        self.perturb(Collective::AllGather, output);
        Ok(())
    }
    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], op: ReduceOp) -> CommResult<()> {
        self.inner.reduce_scatter(input, output, op)?;
        self.perturb(Collective::ReduceScatter, output);
        Ok(())
    }
    fn all_to_all_v(&self, i: &[f32], sc: &[usize], o: &mut [f32], rc: &[usize]) -> CommResult<()> {
        self.inner.all_to_all_v(i, sc, o, rc)?;
        self.perturb(Collective::AllToAll, o);
        Ok(())
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> CommResult<()> {
        self.inner.broadcast(buf, root)
    }
    fn send(&self, buf: &[f32], peer: usize) -> CommResult<()> {
        self.inner.send(buf, peer)
    }
    fn recv(&self, buf: &mut [f32], peer: usize) -> CommResult<()> {
        self.inner.recv(buf, peer)
    }
    fn barrier(&self) -> CommResult<()> {
        self.inner.barrier()
    }
    fn split(&self, groups: &[Vec<usize>]) -> CommResult<Box<dyn Communicator>> {
        Communicator::<[f32]>::split(&self.inner, groups)
    }
}

#[test]
fn corrupted_collective_fails_verification_on_every_rank() {
    for target in Collective::ALL {
        let reports = spmd(thread_world(4, TEST_TIMEOUT), |c| {
            let bad = Corrupt {
                inner: c,
                target,
                rank: 1,
            };
            run_comm_check_with(
                &bad,
                CommCheckOptions {
                    bytes: 4096,
                    iters: 3,
                    warmup: 2,
                },
            )
            .unwrap()
        });
        for rep in &reports {
            assert!(!rep.passed(), "{target:?}: {rep}");
            for r in &rep.results {
                if r.collective == target {
                    // One wrong element per iteration (2 warm-up + 3 timed) on rank 1, summed over ranks.
                    assert_eq!((r.passed, r.wrong), (false, 5), "{target:?}: {r:?}");
                } else {
                    assert!(r.passed, "{target:?} corrupted, but {r:?} failed");
                }
            }
        }
        assert!(reports[0].to_string().contains("FAILED"));
    }
}

/// Runs the check with `bytes` on `n` ranks (TCP when `tcp`) and returns rank 0's all-to-all line, after checking that
/// every rank agrees and everything verified.
fn all_to_all_result(n: usize, bytes: usize, tcp: bool) -> qparallel::comm_check::CollectiveResult {
    let world = if tcp {
        tcp_world(n, TEST_TIMEOUT)
    } else {
        thread_world(n, TEST_TIMEOUT)
    };
    let reports = spmd(world, |c| {
        run_comm_check_with(
            &c,
            CommCheckOptions {
                bytes,
                iters: 2,
                warmup: 1,
            },
        )
        .unwrap()
    });
    for rep in &reports {
        assert_eq!(rep, &reports[0], "every rank reports the same numbers");
    }
    assert!(reports[0].passed(), "n={n} bytes={bytes}: {}", reports[0]);
    reports[0].get(Collective::AllToAll).unwrap().clone()
}

#[test]
fn all_to_all_verifies_on_1_to_4_ranks_with_rounded_sizes() {
    // (ranks, requested bytes, transport, expected S in elements): S = bytes / 4 rounded down to a multiple of n,
    // at least n.
    let cases = [
        (1, 1003, false, 250), // n = 1: a plain copy of 250 floats
        (2, 1030, false, 256), // 257 floats -> 256
        (2, 1030, true, 256),
        (3, 1001, true, 249),   // 250 floats -> 249
        (3, 4099, false, 1023), // 1024 floats -> 1023
        (4, 1030, false, 256),  // 257 floats -> 256
        (4, 1038, true, 256),   // 259 floats -> 256
        (4, 5, false, 4),       // 1 float -> one per rank
    ];
    for (n, bytes, tcp, count) in cases {
        let r = all_to_all_result(n, bytes, tcp);
        assert_eq!(
            (r.count, r.bytes),
            (count, 4 * count),
            "n={n} bytes={bytes}"
        );
        assert!(r.passed && r.wrong == 0, "n={n} bytes={bytes}: {r:?}");
        let algbw = r.bytes as f64 / r.avg_time.as_secs_f64() / 1e9;
        assert!((r.algbw_gbps - algbw).abs() <= 1e-9 * algbw, "{r:?}");
        let factor = (n as f64 - 1.0) / n as f64;
        assert!(
            (r.busbw_gbps - factor * r.algbw_gbps).abs() <= 1e-12 * r.algbw_gbps.max(1.0),
            "n={n}: {r:?}"
        );
        if n == 1 {
            assert_eq!(r.busbw_gbps, 0.0, "nothing leaves a single rank");
        }
    }
}

#[test]
fn all_to_all_expectation_matches_its_definition_and_the_cpu_exchange() {
    for n in 1..=5 {
        for count in [n, 7 * n, 31 * n, 64 * n] {
            assert_eq!(Collective::AllToAll.count(count + n - 1, n), count);
            assert_eq!(Collective::AllToAll.lengths(count, n), (count, count));
            let m = count / n;
            let inputs: Vec<Vec<f32>> = (0..n)
                .map(|r| check_input(Collective::AllToAll, n, r, count))
                .collect();
            for j in 0..n {
                // Definition: rank j's chunk r is rank r's chunk j.
                let by_definition: Vec<f32> = (0..n)
                    .flat_map(|r| inputs[r][j * m..(j + 1) * m].iter().copied())
                    .collect();
                assert_eq!(
                    check_expected(Collective::AllToAll, n, j, count),
                    by_definition,
                    "n={n} count={count} rank={j}"
                );
            }
        }
    }
    // The CPU communicator's exchange gives exactly the expectation.
    for (n, count) in [(2, 10), (3, 21), (4, 40)] {
        let wrong = spmd(thread_world(n, TEST_TIMEOUT), |c| {
            let (me, counts) = (c.rank(), vec![count / n; n]);
            let input = check_input(Collective::AllToAll, n, me, count);
            let got = c.all_to_all_v_vec(&input, &counts, &counts).unwrap();
            count_wrong(&got, &check_expected(Collective::AllToAll, n, me, count))
        });
        assert_eq!(wrong, vec![0; n], "n={n}");
    }
}

#[test]
fn verification_flags_corrupted_all_to_all_buffers() {
    // 3 ranks, chunks of m = 7 elements (m is neither 0 nor 22 mod 31, where the data cannot see some faults).
    let (n, count) = (3, 21);
    let m = count / n;
    let j = 1; // the checked rank
    let inputs: Vec<Vec<f32>> = (0..n)
        .map(|r| check_input(Collective::AllToAll, n, r, count))
        .collect();
    let expected = check_expected(Collective::AllToAll, n, j, count);
    let exchange = |chunk_of: &dyn Fn(usize) -> (usize, usize)| -> Vec<f32> {
        // Output chunk r is chunk `c` of rank `s`'s input, with (s, c) = chunk_of(r).
        (0..n)
            .flat_map(|r| {
                let (s, c) = chunk_of(r);
                inputs[s][c * m..(c + 1) * m].to_vec()
            })
            .collect()
    };
    let correct = exchange(&|r| (r, j));
    assert_eq!(count_wrong(&correct, &expected), 0);

    // One element off by one, and one unwritten (NaN poison) element.
    let mut bad = correct.clone();
    bad[m + 3] += 1.0;
    assert_eq!(count_wrong(&bad, &expected), 1);
    let mut bad = correct.clone();
    bad[count - 1] = f32::NAN;
    assert_eq!(count_wrong(&bad, &expected), 1);
    // Nothing exchanged: every rank keeps its own input. Only rank j's own chunk is right.
    assert_eq!(count_wrong(&inputs[j], &expected), (count - m) as u64);
    // Chunks stored at the wrong positions (the senders reversed).
    let reversed = exchange(&|r| (n - 1 - r, j));
    assert_eq!(count_wrong(&reversed, &expected), (count - m) as u64);
    // Every sender sent the wrong chunk (its chunk j+1 instead of j).
    let wrong_chunk = exchange(&|r| (r, (j + 1) % n));
    assert_eq!(count_wrong(&wrong_chunk, &expected), count as u64);
    // A short output counts its missing elements.
    assert_eq!(count_wrong(&correct[..count - 2], &expected), 2);
    // Every collective's poisoned (all-NaN) output fails everywhere.
    for c in Collective::ALL {
        for rank in 0..n {
            let want = check_expected(c, n, rank, count);
            assert!(!want.is_empty());
            assert_eq!(
                count_wrong(&vec![f32::NAN; want.len()], &want),
                want.len() as u64,
                "{c:?}"
            );
        }
    }
}
