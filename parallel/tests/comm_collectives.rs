//! Collectives over the in-process thread transport: correctness against direct computation, sub-communicators,
//! concurrency of groups sharing one transport, and failure behaviour (dead or silent peers, misuse).

mod comm_support;

use std::thread;
use std::time::{Duration, Instant};

use comm_support::*;
use qparallel::comm::{CommError, CommExt, Communicator, CpuCommunicator, ReduceOp, chunk_range};
use qparallel::dims::{GroupKind, ParallelConfig, ParallelDims};

#[test]
fn chunk_range_is_balanced_and_covers() {
    for len in 0..40 {
        for n in 1..7 {
            let mut next = 0;
            for i in 0..n {
                let r = chunk_range(len, n, i);
                assert_eq!(r.start, next);
                assert!(r.len() == len / n || r.len() == len / n + 1);
                assert_eq!(r.len() == len / n + 1, i < len % n);
                next = r.end;
            }
            assert_eq!(next, len);
        }
    }
}

#[test]
fn every_collective_on_thread_groups_of_1_to_4() {
    for n in 1..=4 {
        let results = spmd(thread_world(n, TEST_TIMEOUT), |c| {
            exercise_all(&c, n as u64)
        });
        assert_eq!(results.len(), n);
        assert_identical(&results);
    }
}

#[test]
fn through_the_trait_object_and_ext_helpers() {
    let n = 3;
    spmd(thread_world(n, TEST_TIMEOUT), |c| {
        let d: &dyn Communicator = &c;
        assert_eq!((d.rank(), d.size()), (c.rank(), 3));
        let mine = data(7, d.rank(), 10);
        let gathered = d.all_gather_vec(&mine).unwrap();
        assert_eq!(
            gathered,
            (0..n).flat_map(|r| data(7, r, 10)).collect::<Vec<_>>()
        );
        let scattered = d.reduce_scatter_vec(&gathered, ReduceOp::Sum).unwrap();
        // Every rank contributed the same `gathered`, so the sum is n times its chunk (exact: n·x is exact for n=3
        // only up to rounding; compare with tolerance).
        let want: Vec<f32> = gathered[chunk_range(30, n, d.rank())]
            .iter()
            .map(|x| x * 3.0)
            .collect();
        for (a, b) in scattered.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
        let counts = vec![1; n];
        let exchanged = d
            .all_to_all_v_vec(&data(8, d.rank(), n), &counts, &counts)
            .unwrap();
        let want: Vec<f32> = (0..n).map(|s| data(8, s, n)[d.rank()]).collect();
        assert_eq!(exchanged, want);
    });
}

/// Σ_r ⟨AG(x)_r, y_r⟩ = Σ_r ⟨x_r, RS(y)_r⟩: all-gather and reduce-scatter are adjoint (module docs of `comm`).
#[test]
fn all_gather_and_reduce_scatter_are_adjoint() {
    let n = 4;
    let m = 9;
    let sides = spmd(thread_world(n, TEST_TIMEOUT), |c| {
        let x = data(100, c.rank(), m);
        let y = data(200, c.rank(), n * m);
        let mut ag = vec![0.0; n * m];
        c.all_gather(&x, &mut ag).unwrap();
        let mut rs = vec![0.0; m];
        c.reduce_scatter(&y, &mut rs, ReduceOp::Sum).unwrap();
        let dot = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(p, q)| *p as f64 * *q as f64)
                .sum::<f64>()
        };
        (dot(&ag, &y), dot(&x, &rs))
    });
    let lhs: f64 = sides.iter().map(|s| s.0).sum();
    let rhs: f64 = sides.iter().map(|s| s.1).sum();
    assert!(lhs.abs() > 1e-3, "degenerate test data");
    assert!(
        (lhs - rhs).abs() < 1e-4,
        "⟨AG x, y⟩ = {lhs}, ⟨x, RS y⟩ = {rhs}"
    );
}

#[test]
fn split_into_dims_groups() {
    // world 8 = tp 2 × dp 2 × pp 2.
    let dims = ParallelDims::new(
        8,
        ParallelConfig {
            tp: 2,
            pp: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let out = spmd(thread_world(8, TEST_TIMEOUT), |world| {
        let me = world.rank();
        let tp = world.split(&dims.groups(GroupKind::Tp)).unwrap();
        let dp = world.split(&dims.groups(GroupKind::Dp)).unwrap();
        let pp = world.split(&dims.groups(GroupKind::Pp)).unwrap();
        let coord = dims.coord(me);
        assert_eq!((tp.rank(), tp.size()), (coord.tp, 2));
        assert_eq!((dp.rank(), dp.size()), (coord.dp, 2));
        assert_eq!((pp.rank(), pp.size()), (coord.pp, 2));
        assert_eq!(
            tp.global_ranks(),
            dims.group_of(GroupKind::Tp, me).unwrap().as_slice()
        );
        // Sum of global ranks inside each group.
        let mut a = [me as f32];
        tp.all_reduce(&mut a, ReduceOp::Sum).unwrap();
        let mut b = [me as f32];
        dp.all_reduce(&mut b, ReduceOp::Sum).unwrap();
        let mut p = [me as f32];
        pp.all_reduce(&mut p, ReduceOp::Sum).unwrap();
        // Splitting a sub-communicator again (the tp group into singletons) works too.
        let solo = tp
            .split(&[vec![tp.global_ranks()[0]], vec![tp.global_ranks()[1]]])
            .unwrap();
        assert_eq!((solo.rank(), solo.size()), (0, 1));
        (a[0], b[0], p[0])
    });
    for (r, (a, b, p)) in out.into_iter().enumerate() {
        let sum = |k| dims.group_of(k, r).unwrap().iter().sum::<usize>() as f32;
        assert_eq!(
            (a, b, p),
            (sum(GroupKind::Tp), sum(GroupKind::Dp), sum(GroupKind::Pp)),
            "rank {r}"
        );
    }
}

/// Identical member lists (dp and dp-cp when cp = 1) still get separate tags: used concurrently they do not mix.
#[test]
fn two_groups_concurrently_over_one_transport() {
    let dims = ParallelDims::new(
        4,
        ParallelConfig {
            tp: 2,
            ..Default::default()
        },
    )
    .unwrap();
    spmd(thread_world(4, TEST_TIMEOUT), |world| {
        let me = world.rank();
        let tp = world.split(&dims.groups(GroupKind::Tp)).unwrap();
        let dp = world.split(&dims.groups(GroupKind::Dp)).unwrap();
        let dp2 = world.split(&dims.groups(GroupKind::DpCp)).unwrap();
        assert_eq!(dp.global_ranks(), dp2.global_ranks());
        let groups = [(&tp, 1.0f32), (&dp, 1000.0), (&dp2, 1e6)];
        thread::scope(|s| {
            for (g, scale) in groups {
                s.spawn(move || {
                    for it in 0..200 {
                        let len = 1 + it % 37;
                        let mut buf: Vec<f32> = (0..len)
                            .map(|i| scale * (me * 100 + i + it) as f32)
                            .collect();
                        g.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
                        let members = g.global_ranks();
                        let want: Vec<f32> = (0..len)
                            .map(|i| {
                                members
                                    .iter()
                                    .map(|&r| scale * (r * 100 + i + it) as f32)
                                    .sum()
                            })
                            .collect();
                        assert_eq!(buf, want, "scale {scale} iteration {it}");
                        if it % 50 == 0 {
                            g.barrier().unwrap();
                        }
                    }
                });
            }
            // Meanwhile the world communicator is used from this thread.
            for it in 0..50 {
                let mut x = [(me + it) as f32];
                world.all_reduce(&mut x, ReduceOp::Max).unwrap();
                assert_eq!(x[0], (3 + it) as f32);
            }
        });
    });
}

#[test]
fn barrier_waits_for_the_last_rank() {
    let times = spmd(thread_world(4, TEST_TIMEOUT), |c| {
        let t0 = Instant::now();
        if c.rank() == 2 {
            thread::sleep(Duration::from_millis(300));
        }
        c.barrier().unwrap();
        t0.elapsed()
    });
    for (r, t) in times.iter().enumerate() {
        assert!(
            *t >= Duration::from_millis(290),
            "rank {r} left the barrier after {t:?}"
        );
    }
}

#[test]
fn dropped_peer_fails_the_others_with_an_error() {
    let timeout = Duration::from_secs(10);
    let t0 = Instant::now();
    let results = spmd(thread_world(3, timeout), |c| {
        if c.rank() == 2 {
            drop(c); // this "process" dies before the collective
            return None;
        }
        let mut buf = vec![1.0f32; 100];
        Some(c.all_reduce(&mut buf, ReduceOp::Sum))
    });
    let elapsed = t0.elapsed();
    for (r, res) in results.into_iter().enumerate().take(2) {
        match res.unwrap() {
            Err(CommError::PeerGone { .. }) => {}
            other => panic!("rank {r}: expected PeerGone, got {other:?}"),
        }
    }
    assert!(
        elapsed < timeout,
        "dead peer detected only after {elapsed:?}"
    );
}

#[test]
fn silent_peer_times_out_and_aborts_the_communicator() {
    let timeout = Duration::from_millis(300);
    let results = spmd(thread_world(3, timeout), |c| {
        if c.rank() == 1 {
            thread::sleep(Duration::from_millis(1500)); // alive (holds its endpoint) but never participates
            return None;
        }
        let t0 = Instant::now();
        let mut buf = vec![1.0f32; 8];
        let first = c.all_reduce(&mut buf, ReduceOp::Sum);
        let elapsed = t0.elapsed();
        let second = c.barrier();
        Some((first, elapsed, second))
    });
    for (r, res) in results.into_iter().enumerate() {
        let Some((first, elapsed, second)) = res else {
            continue;
        };
        let e = first.expect_err("must fail");
        assert!(is_peer_failure(&e), "rank {r}: {e}");
        assert!(
            elapsed < Duration::from_millis(1400),
            "rank {r} waited {elapsed:?}"
        );
        assert!(
            matches!(second, Err(CommError::Aborted(_))),
            "rank {r}: {second:?}"
        );
    }
}

#[test]
fn size_mismatch_is_reported() {
    let results = spmd(thread_world(2, Duration::from_secs(5)), |c| {
        let mut buf = vec![1.0f32; 4 + c.rank()];
        c.all_reduce(&mut buf, ReduceOp::Sum)
    });
    // Each rank receives from the other, so both see the mismatch.
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Err(CommError::SizeMismatch {
                op: "all_reduce",
                peer,
                expected,
                got,
            }) => {
                assert_eq!(peer, 1 - r);
                assert_eq!((expected, got), (4 + r, 4 + (1 - r)));
            }
            other => panic!("rank {r}: {other:?}"),
        }
    }
}

#[test]
fn different_collectives_are_a_mismatch() {
    // Rank 1 stays alive until rank 0 is done: had it exited, rank 0's first send would (rightly) fail with
    // PeerGone instead.
    let done = std::sync::Barrier::new(2);
    let results = spmd(thread_world(2, Duration::from_secs(5)), |c| {
        let mut buf = vec![1.0f32; 4];
        let res = if c.rank() == 0 {
            c.all_reduce(&mut buf, ReduceOp::Sum)
        } else {
            c.broadcast(&mut buf, 1)
        };
        done.wait();
        res
    });
    // Rank 0 receives rank 1's broadcast message where it expects an all-reduce one.
    match &results[0] {
        Err(CommError::Mismatch {
            peer: 1,
            expected,
            got,
        }) => {
            assert!(
                expected.contains("all_reduce") && got.contains("broadcast"),
                "{expected} / {got}"
            );
        }
        other => panic!("rank 0: {other:?}"),
    }
}

#[test]
fn send_recv_length_mismatch_and_bad_arguments() {
    let results = spmd(thread_world(2, Duration::from_secs(5)), |c| {
        let bad = c.all_gather(&[1.0f32; 3], &mut [0.0; 5]);
        assert!(
            matches!(
                bad,
                Err(CommError::InvalidArgument {
                    op: "all_gather",
                    ..
                })
            ),
            "{bad:?}"
        );
        let bad = c.broadcast(&mut [0.0f32; 1], 2);
        assert!(
            matches!(bad, Err(CommError::InvalidArgument { .. })),
            "{bad:?}"
        );
        // Local argument errors do not abort: the communicator still works.
        let mut x = [c.rank() as f32];
        c.all_reduce(&mut x, ReduceOp::Sum).unwrap();
        assert_eq!(x[0], 1.0);
        if c.rank() == 0 {
            c.send(&[1.0f32, 2.0, 3.0], 1).map(|()| 0)
        } else {
            let mut buf = [0.0f32; 2];
            c.recv(&mut buf, 0).map(|()| 1)
        }
    });
    assert_eq!(results[0].as_ref().unwrap(), &0);
    match &results[1] {
        Err(CommError::SizeMismatch {
            op: "send/recv",
            peer: 0,
            expected: 2,
            got: 3,
        }) => {}
        other => panic!("rank 1: {other:?}"),
    }
}

#[test]
fn split_with_disagreeing_layouts_is_a_mismatch() {
    let results = spmd(thread_world(2, Duration::from_secs(5)), |c| {
        let groups = if c.rank() == 0 {
            vec![vec![0, 1]]
        } else {
            vec![vec![1, 0]]
        };
        c.split(&groups).map(|_| ())
    });
    for (r, res) in results.iter().enumerate() {
        assert!(
            matches!(res, Err(CommError::Mismatch { .. })),
            "rank {r}: {res:?}"
        );
    }
    // Groups that do not cover the caller are a local argument error.
    let results = spmd(thread_world(2, Duration::from_secs(5)), |c| {
        c.split(&[vec![0]]).map(|_| ())
    });
    assert!(
        matches!(
            results[1],
            Err(CommError::InvalidArgument { op: "split", .. })
        ),
        "{:?}",
        results[1]
    );
}

#[test]
fn single_rank_group_is_identity() {
    let c = CpuCommunicator::thread_group(1).pop().unwrap();
    let mut x = vec![1.5f32, -2.0];
    c.all_reduce(&mut x, ReduceOp::Avg).unwrap();
    assert_eq!(x, [1.5, -2.0]);
    let mut out = vec![0.0f32; 2];
    c.reduce_scatter(&x, &mut out, ReduceOp::Sum).unwrap();
    assert_eq!(out, x);
    c.send(&x, 0).unwrap();
    let mut y = vec![0.0f32; 2];
    c.recv(&mut y, 0).unwrap();
    assert_eq!(y, x);
}
