//! The comm-check job body over thread and TCP groups, and a deliberately corrupted communicator that must fail
//! verification.

mod comm_support;

use comm_support::*;
use qparallel::comm::{CommResult, Communicator, CpuCommunicator, ReduceOp};
use qparallel::comm_check::{
    Collective, CommCheckError, CommCheckOptions, DEFAULT_WARMUP, run_comm_check,
    run_comm_check_with,
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
    assert_eq!(rep.results.len(), 3);
    for r in &rep.results {
        assert!(r.passed && r.wrong == 0, "{r:?}");
        assert_eq!((r.bytes, r.count), (1 << 16, 1 << 14));
        assert!(r.avg_time.as_secs_f64() > 0.0);
        assert!(r.algbw_gbps.is_finite() && r.algbw_gbps > 0.0, "{r:?}");
        assert!(r.busbw_gbps.is_finite() && r.busbw_gbps > 0.0, "{r:?}");
        let algbw = r.bytes as f64 / r.avg_time.as_secs_f64() / 1e9;
        assert!((r.algbw_gbps - algbw).abs() <= 1e-9 * algbw);
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
        table.contains("all_reduce") && table.contains("reduce_scatter") && table.contains("OK"),
        "{table}"
    );
}

#[test]
fn comm_check_sizes_follow_nccl_tests() {
    // 1001 bytes on 3 ranks: all-reduce 250 floats; all-gather / reduce-scatter 249 (a multiple of 3).
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
    assert_eq!(sizes, [(250, 1000), (249, 996), (249, 996)]);
    // Tiny request: at least one element per rank.
    let reports = spmd(thread_world(2, TEST_TIMEOUT), |c| {
        run_comm_check(&c, 0, 1).unwrap()
    });
    let sizes: Vec<usize> = reports[0].results.iter().map(|r| r.count).collect();
    assert_eq!(sizes, [1, 2, 2]);
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
        self.inner.all_to_all_v(i, sc, o, rc)
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
