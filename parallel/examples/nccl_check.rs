//! NCCL communicator on every GPU of this machine, one thread per GPU (one process, in-memory id store):
//! contract checks of every collective (uneven reduce-scatter, all-to-all-v, broadcast, send/recv, split,
//! average) on small random-free integer data, then the GPU comm-check (verification + busbw).
//!
//! ```text
//! cargo run --release -p qparallel --example nccl_check -- [--gpus N] [--bytes B] [--iters I] [--dtype f32|bf16]
//! ```
//! Exits 1 when NCCL or the GPUs are missing (with the reason) or when a check fails.

use std::time::Duration;

use qkernels::DType;
use qparallel::comm::{
    CommBuffer, Communicator, DeviceBuffer, MemIdStore, NcclCommunicator, ReduceOp, chunk_range,
};
use qparallel::comm_check::{CommCheckOptions, DEFAULT_WARMUP};
use qparallel::comm_check_gpu::{parse_dtype, run_comm_check_nccl};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn buf(ordinal: usize, data: &[f32]) -> Res<DeviceBuffer> {
    let mut b = DeviceBuffer::alloc(ordinal, data.len(), DType::F32)?;
    b.upload_f32(data)?;
    Ok(b)
}

fn expect(what: &str, rank: usize, got: &[f32], want: &[f32]) -> Res<()> {
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        return Err(format!(
            "{what} on rank {rank}: wrong (first difference at {first:?}; lens {} vs {})",
            got.len(),
            want.len()
        )
        .into());
    }
    if rank == 0 {
        println!("  {what}: OK");
    }
    Ok(())
}

fn contracts(c: &NcclCommunicator, ordinal: usize) -> Res<()> {
    let (n, r) = (c.size(), c.rank());
    // Uneven reduce-scatter: L = 7n + 3 elements, rank r gets chunk_range(L, n, r) of the sum.
    let l = 7 * n + 3;
    let x: Vec<f32> = (0..l).map(|i| (r * 10 + i) as f32).collect();
    let mut out = DeviceBuffer::alloc(ordinal, chunk_range(l, n, r).len(), DType::F32)?;
    out.poison()?;
    c.reduce_scatter(&buf(ordinal, &x)?, &mut out, ReduceOp::Sum)?;
    let want: Vec<f32> = chunk_range(l, n, r)
        .map(|i| (0..n).map(|q| (q * 10 + i) as f32).sum())
        .collect();
    expect(
        "reduce_scatter uneven (L = 7n+3)",
        r,
        &out.download_f32()?,
        &want,
    )?;

    // Even reduce-scatter with Avg.
    let x: Vec<f32> = (0..4 * n).map(|i| (r * n * 2 + i) as f32).collect();
    let mut out = DeviceBuffer::alloc(ordinal, 4, DType::F32)?;
    c.reduce_scatter(&buf(ordinal, &x)?, &mut out, ReduceOp::Avg)?;
    let want: Vec<f32> = chunk_range(4 * n, n, r)
        .map(|i| (0..n).map(|q| (q * n * 2 + i) as f32).sum::<f32>() / n as f32)
        .collect();
    expect("reduce_scatter avg", r, &out.download_f32()?, &want)?;

    // all_to_all_v: rank r sends r+q+1 elements to q, valued r*1000 + q*100 + j.
    let send: Vec<usize> = (0..n).map(|q| r + q + 1).collect();
    let recv: Vec<usize> = (0..n).map(|q| q + r + 1).collect();
    let x: Vec<f32> = (0..n)
        .flat_map(|q| (0..send[q]).map(move |j| (r * 1000 + q * 100 + j) as f32))
        .collect();
    let mut out = DeviceBuffer::alloc(ordinal, recv.iter().sum(), DType::F32)?;
    out.poison()?;
    c.all_to_all_v(&buf(ordinal, &x)?, &send, &mut out, &recv)?;
    let want: Vec<f32> = (0..n)
        .flat_map(|q| (0..recv[q]).map(move |j| (q * 1000 + r * 100 + j) as f32))
        .collect();
    expect("all_to_all_v", r, &out.download_f32()?, &want)?;

    // Broadcast from the last rank.
    let mut b = buf(
        ordinal,
        &(0..1000).map(|i| (r * 7 + i) as f32).collect::<Vec<_>>(),
    )?;
    c.broadcast(&mut b, n - 1)?;
    let want: Vec<f32> = (0..1000).map(|i| ((n - 1) * 7 + i) as f32).collect();
    expect("broadcast", r, &b.download_f32()?, &want)?;

    // send/recv: rank 0 → rank 1.
    if n >= 2 {
        let data: Vec<f32> = (0..333).map(|i| i as f32 * 0.5).collect();
        if r == 0 {
            c.send(&buf(ordinal, &data)?, 1)?;
        } else if r == 1 {
            let mut b = DeviceBuffer::alloc(ordinal, data.len(), DType::F32)?;
            b.poison()?;
            c.recv(&mut b, 0)?;
            let got = b.download_f32()?;
            if got != data {
                return Err("send/recv: wrong data on rank 1".into());
            }
        }
        c.barrier()?;
        if r == 0 {
            println!("  send/recv: OK");
        }
    }

    // split into one group with reversed order: new rank = n-1-r; all_gather order follows the new ranks.
    let groups = vec![(0..n).rev().collect::<Vec<usize>>()];
    let sub = c.split(&groups)?;
    if sub.rank() != n - 1 - r || sub.size() != n {
        return Err(format!("split: rank {} size {}", sub.rank(), sub.size()).into());
    }
    let x = buf(ordinal, &[r as f32; 3])?;
    let mut g = DeviceBuffer::alloc(ordinal, 3 * n, DType::F32)?;
    sub.all_gather(&x, &mut g)?;
    let want: Vec<f32> = (0..n).flat_map(|k| [(n - 1 - k) as f32; 3]).collect();
    expect(
        "split (reversed) + all_gather",
        r,
        &g.download_f32()?,
        &want,
    )?;

    // all_reduce Max and a length check error that does not abort the communicator.
    let mut m = buf(ordinal, &[r as f32, -(r as f32)])?;
    c.all_reduce(&mut m, ReduceOp::Max)?;
    expect(
        "all_reduce max",
        r,
        &m.download_f32()?,
        &[(n - 1) as f32, 0.0],
    )?;
    let mut wrong = DeviceBuffer::alloc(ordinal, 5, DType::F32)?;
    if c.all_gather(&x, &mut wrong).is_ok() {
        return Err("all_gather with a wrong output length was accepted".into());
    }
    c.barrier()?;
    if r == 0 {
        println!("  invalid arguments rejected locally, communicator still usable: OK");
    }
    let _ = wrong.len();
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let avail = qkernels::cuda::device_count();
    let gpus: usize = arg(&args, "--gpus")
        .map(|s| s.parse().expect("--gpus N"))
        .unwrap_or(avail);
    let bytes: usize = arg(&args, "--bytes")
        .map(|s| s.parse().expect("--bytes B"))
        .unwrap_or(256 << 20);
    let iters: usize = arg(&args, "--iters")
        .map(|s| s.parse().expect("--iters I"))
        .unwrap_or(20);
    let dtype = arg(&args, "--dtype")
        .map(|s| parse_dtype(&s).expect("--dtype f32|bf16"))
        .unwrap_or(DType::BF16);
    match qparallel::comm::nccl::nccl_version() {
        Ok(v) => println!("NCCL version code {v}, {avail} CUDA device(s), using {gpus}"),
        Err(e) => {
            eprintln!("nccl_check: {e}");
            std::process::exit(1);
        }
    }
    if gpus == 0 || gpus > avail {
        eprintln!("nccl_check: {gpus} GPUs requested, {avail} available");
        std::process::exit(1);
    }
    let store = MemIdStore::default();
    let handles: Vec<_> = (0..gpus)
        .map(|r| {
            let mut store = store.clone();
            std::thread::spawn(move || -> Res<()> {
                let c = NcclCommunicator::init(
                    r,
                    r,
                    (0..gpus).collect(),
                    "world",
                    &mut store,
                    Duration::from_secs(60),
                )?;
                if r == 0 {
                    println!("contract checks ({gpus} ranks):");
                }
                contracts(&c, r)?;
                let report = run_comm_check_nccl(
                    &c,
                    CommCheckOptions {
                        bytes,
                        iters,
                        warmup: DEFAULT_WARMUP,
                    },
                    dtype,
                )?;
                if r == 0 {
                    println!("{report}");
                }
                if !report.report.passed() {
                    return Err("comm-check verification failed".into());
                }
                Ok(())
            })
        })
        .collect();
    let mut failed = false;
    for (r, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("rank {r}: {e}");
                failed = true;
            }
            Err(_) => {
                eprintln!("rank {r}: panicked");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
    println!("nccl_check: all checks passed");
}
