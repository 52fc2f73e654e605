//! The same collectives over the TCP transport on 127.0.0.1, with threads acting as rank processes; plus mesh
//! setup errors and dead peers.

mod comm_support;

use std::io::Write;
use std::net::TcpListener;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use comm_support::*;
use qparallel::comm::{CommError, CpuCommunicator, ReduceOp, TcpTransport, Transport};
use qparallel::dims::{GroupKind, ParallelConfig, ParallelDims};

#[test]
fn every_collective_over_tcp_groups_of_1_to_4() {
    for n in 1..=4 {
        let results = spmd(tcp_world(n, TEST_TIMEOUT), |c| {
            exercise_all(&c, 10 + n as u64)
        });
        assert_identical(&results);
    }
}

#[test]
fn large_all_reduce_over_tcp() {
    // 3 Mi floats (12 MiB): frames far larger than the socket buffers, split and reassembled by the reader.
    let len = 3 << 20;
    let sums = spmd(tcp_world(3, TEST_TIMEOUT), |c| {
        let mut buf: Vec<f32> = (0..len)
            .map(|i| ((i % 1000) as f32) * (c.rank() as f32 + 1.0))
            .collect();
        c.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
        for (i, x) in buf.iter().enumerate().step_by(4099) {
            assert_eq!(*x, ((i % 1000) as f32) * 6.0, "element {i}");
        }
        buf.iter().map(|&x| x as f64).sum::<f64>()
    });
    assert!(sums.iter().all(|&s| s == sums[0]));
}

#[test]
fn groups_concurrently_over_one_tcp_mesh() {
    let dims = ParallelDims::new(
        4,
        ParallelConfig {
            tp: 2,
            ..Default::default()
        },
    )
    .unwrap();
    spmd(tcp_world(4, TEST_TIMEOUT), |world| {
        let me = world.rank();
        let tp = world.split(&dims.groups(GroupKind::Tp)).unwrap();
        let dp = world.split(&dims.groups(GroupKind::Dp)).unwrap();
        thread::scope(|s| {
            for (g, scale) in [(&tp, 1.0f32), (&dp, 1000.0)] {
                s.spawn(move || {
                    for it in 0..100 {
                        let len = 1 + it % 29;
                        let mut buf: Vec<f32> = (0..len)
                            .map(|i| scale * (me * 100 + i + it) as f32)
                            .collect();
                        g.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
                        let want: Vec<f32> = (0..len)
                            .map(|i| {
                                g.global_ranks()
                                    .iter()
                                    .map(|&r| scale * (r * 100 + i + it) as f32)
                                    .sum()
                            })
                            .collect();
                        assert_eq!(buf, want, "scale {scale} iteration {it}");
                    }
                });
            }
        });
    });
}

#[test]
fn dropped_tcp_peer_fails_the_others_within_the_timeout() {
    let timeout = Duration::from_secs(10);
    let comms = tcp_world(3, timeout);
    let t0 = Instant::now();
    let results = spmd(comms, |c| {
        if c.rank() == 1 {
            drop(c); // closes its connections, as a crashed process would
            return None;
        }
        let mut buf = vec![1.0f32; 1000];
        Some(c.all_reduce(&mut buf, ReduceOp::Sum))
    });
    let elapsed = t0.elapsed();
    for r in [0, 2] {
        match results[r].as_ref().unwrap() {
            Err(CommError::PeerGone { .. }) => {}
            other => panic!("rank {r}: expected PeerGone, got {other:?}"),
        }
    }
    assert!(elapsed < timeout, "took {elapsed:?}");
}

#[test]
fn mesh_times_out_when_a_rank_never_comes() {
    let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addresses = vec![
        l0.local_addr().unwrap().to_string(),
        l1.local_addr().unwrap().to_string(),
    ];
    drop(l1); // rank 1 never starts: nothing listens at its address
    let t0 = Instant::now();
    let err = TcpTransport::connect(0, l0, &addresses, Duration::from_millis(300)).unwrap_err();
    assert!(
        matches!(&err, CommError::Connect(m) if m.contains("[1]")),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));

    // The connecting side: rank 1 whose rank 0 does not listen.
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addresses = vec![addresses[0].clone(), l1.local_addr().unwrap().to_string()];
    let err = TcpTransport::connect(1, l1, &addresses, Duration::from_millis(300)).unwrap_err();
    assert!(
        matches!(&err, CommError::Connect(m) if m.contains("could not connect to rank 0")),
        "{err}"
    );
}

#[test]
fn a_foreign_endpoint_is_rejected() {
    // Something that is not a qcomm rank listens at rank 0's address and answers garbage.
    let foreign = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr0 = foreign.local_addr().unwrap().to_string();
    let server = thread::spawn(move || {
        let (mut s, _) = foreign.accept().unwrap();
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        thread::sleep(Duration::from_millis(200));
    });
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addresses = vec![addr0, l1.local_addr().unwrap().to_string()];
    let err = TcpTransport::connect(1, l1, &addresses, Duration::from_secs(2)).unwrap_err();
    assert!(
        matches!(&err, CommError::Connect(m) if m.contains("not a qcomm endpoint")),
        "{err}"
    );
    server.join().unwrap();
}

#[test]
fn transport_tags_do_not_mix_and_stay_fifo() {
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addresses: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let transports: Vec<TcpTransport> = thread::scope(|s| {
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let a = &addresses;
                s.spawn(move || TcpTransport::connect(r, l, a, Duration::from_secs(5)).unwrap())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let t = Duration::from_secs(5);
    transports[0].send(1, 7, b"a1".to_vec()).unwrap();
    transports[0].send(1, 9, b"b1".to_vec()).unwrap();
    transports[0].send(1, 7, b"a2".to_vec()).unwrap();
    transports[0].send(0, 7, b"self".to_vec()).unwrap();
    assert_eq!(transports[1].recv(0, 9, t, "test").unwrap(), b"b1");
    assert_eq!(transports[1].recv(0, 7, t, "test").unwrap(), b"a1");
    assert_eq!(transports[1].recv(0, 7, t, "test").unwrap(), b"a2");
    assert_eq!(transports[0].recv(0, 7, t, "test").unwrap(), b"self");
    let e = transports[1]
        .recv(0, 7, Duration::from_millis(100), "test")
        .unwrap_err();
    assert!(matches!(e, CommError::Timeout { peer: 0, .. }), "{e}");
    // The world communicator can be built on a transport made by the caller.
    let mut it = transports.into_iter();
    let (t0, t1) = (it.next().unwrap(), it.next().unwrap());
    let comms = vec![
        CpuCommunicator::world(Arc::new(t0)),
        CpuCommunicator::world(Arc::new(t1)),
    ];
    let out = spmd(comms, |c| {
        let mut x = [c.rank() as f32 + 1.0];
        c.all_reduce(&mut x, ReduceOp::Prod).unwrap();
        x[0]
    });
    assert_eq!(out, [2.0, 2.0]);
}
