//! The `comm-check` job body: an nccl-tests-style benchmark and correctness check of a communicator.
//!
//! For all-reduce (sum), all-gather and reduce-scatter (sum): `warmup` untimed iterations, then `iters` timed ones,
//! each followed (untimed) by an exact check of the result on every rank.
//!
//! **Sizes** follow nccl-tests: the reported size `S` is the all-reduce buffer, the all-gather *output*
//! (`n·m` for a per-rank input of `m`), and the reduce-scatter *input* (`n·m` for a per-rank output of `m`);
//! `S` is `bytes` rounded down to whole `f32`s (and to a multiple of `n` elements for all-gather / reduce-scatter),
//! at least one element per rank.
//!
//! **Bandwidths** (GB/s = 10⁹ B/s): `algbw = S / t`; `busbw = algbw · 2(n-1)/n` for all-reduce and
//! `algbw · (n-1)/n` for all-gather and reduce-scatter — the traffic each rank puts on its link in a ring, comparable
//! with the hardware bandwidth for any `n` (see the `comm` module docs). `t` is the mean time of one iteration,
//! taking the slowest rank (max over ranks), so every rank reports the same numbers.
//!
//! **Data**: rank `r`'s element `i` is `((7r + 13i) mod 31) − 15`, a small integer, so any sum over up to 2²⁴/15
//! ranks is exact in `f32` whatever the summation order; results are compared for exact equality. The number of
//! wrong elements is summed over ranks, so a corruption seen by one rank fails the check everywhere.

use std::fmt;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::comm::{CommError, Communicator, ReduceOp, chunk_range};

/// Warm-up iterations used by [`run_comm_check`] (nccl-tests' default `-w 5`).
pub const DEFAULT_WARMUP: usize = 5;

#[derive(Debug, Error)]
pub enum CommCheckError {
    #[error("comm-check needs at least one timed iteration")]
    NoIterations,
    #[error(transparent)]
    Comm(#[from] CommError),
}

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommCheckOptions {
    /// Requested size `S` in bytes (see the module docs).
    pub bytes: usize,
    pub iters: usize,
    pub warmup: usize,
}

/// The collectives checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Collective {
    AllReduce,
    AllGather,
    ReduceScatter,
}

impl Collective {
    pub const ALL: [Collective; 3] = [
        Collective::AllReduce,
        Collective::AllGather,
        Collective::ReduceScatter,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Collective::AllReduce => "all_reduce",
            Collective::AllGather => "all_gather",
            Collective::ReduceScatter => "reduce_scatter",
        }
    }

    /// nccl-tests' bus-bandwidth factor for `n` ranks.
    pub fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Collective::AllReduce => 2.0 * (n - 1.0) / n,
            Collective::AllGather | Collective::ReduceScatter => (n - 1.0) / n,
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectiveResult {
    pub collective: Collective,
    /// nccl-tests size `S` in bytes.
    pub bytes: usize,
    /// `S` in `f32` elements.
    pub count: usize,
    /// Mean time of one iteration on the slowest rank.
    pub avg_time: Duration,
    pub algbw_gbps: f64,
    pub busbw_gbps: f64,
    /// Wrong elements over all ranks and all iterations (warm-up included); saturates at 2²⁴ per rank.
    pub wrong: u64,
    pub passed: bool,
}

/// The result of [`run_comm_check`]; identical on every rank.
#[derive(Debug, Clone, PartialEq)]
pub struct CommCheckReport {
    pub ranks: usize,
    pub iters: usize,
    pub warmup: usize,
    pub results: Vec<CollectiveResult>,
}

impl CommCheckReport {
    /// Whether every collective verified.
    pub fn passed(&self) -> bool {
        self.results.iter().all(|r| r.passed)
    }

    pub fn get(&self, c: Collective) -> Option<&CollectiveResult> {
        self.results.iter().find(|r| r.collective == c)
    }
}

impl fmt::Display for CommCheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "comm-check: {} ranks, {} iterations ({} warm-up), f32",
            self.ranks, self.iters, self.warmup
        )?;
        writeln!(
            f,
            "{:<16} {:>12} {:>10} {:>11} {:>12} {:>12} {:>8}  check",
            "collective", "size(B)", "count", "time(us)", "algbw(GB/s)", "busbw(GB/s)", "#wrong"
        )?;
        for r in &self.results {
            writeln!(
                f,
                "{:<16} {:>12} {:>10} {:>11.1} {:>12.3} {:>12.3} {:>8}  {}",
                r.collective.name(),
                r.bytes,
                r.count,
                r.avg_time.as_secs_f64() * 1e6,
                r.algbw_gbps,
                r.busbw_gbps,
                r.wrong,
                if r.passed { "OK" } else { "FAILED" }
            )?;
        }
        Ok(())
    }
}

/// Rank `r`'s element `i` (an integer in −15..=15, exact in f32).
pub fn check_value(rank: usize, i: usize) -> f32 {
    ((7 * rank + 13 * i) % 31) as f32 - 15.0
}

fn expected_sum(n: usize, i: usize) -> f32 {
    (0..n).map(|r| check_value(r, i)).sum()
}

/// Runs the check with [`DEFAULT_WARMUP`] warm-up iterations. Every member of `comm` must call it with the same
/// arguments.
pub fn run_comm_check(
    comm: &dyn Communicator,
    bytes: usize,
    iters: usize,
) -> Result<CommCheckReport, CommCheckError> {
    run_comm_check_with(
        comm,
        CommCheckOptions {
            bytes,
            iters,
            warmup: DEFAULT_WARMUP,
        },
    )
}

/// [`run_comm_check`] with explicit options.
pub fn run_comm_check_with(
    comm: &dyn Communicator,
    opts: CommCheckOptions,
) -> Result<CommCheckReport, CommCheckError> {
    if opts.iters == 0 {
        return Err(CommCheckError::NoIterations);
    }
    let n = comm.size();
    let results = Collective::ALL
        .into_iter()
        .map(|c| check_one(comm, c, opts))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CommCheckReport {
        ranks: n,
        iters: opts.iters,
        warmup: opts.warmup,
        results,
    })
}

fn check_one(
    comm: &dyn Communicator,
    c: Collective,
    opts: CommCheckOptions,
) -> Result<CollectiveResult, CommError> {
    let n = comm.size();
    let me = comm.rank();
    let elems = opts.bytes / 4;
    // nccl-tests size S, in elements, and the per-rank input/output lengths.
    let count = match c {
        Collective::AllReduce => elems.max(1),
        Collective::AllGather | Collective::ReduceScatter => (elems / n).max(1) * n,
    };
    let m = count / n;
    let (input, mut output): (Vec<f32>, Vec<f32>) = match c {
        Collective::AllReduce => (
            (0..count).map(|i| check_value(me, i)).collect(),
            vec![0.0; count],
        ),
        // Rank r contributes the block r of the global index space, so the gathered vector is check_value(q, i).
        Collective::AllGather => (
            (0..m).map(|j| check_value(me, me * m + j)).collect(),
            vec![0.0; count],
        ),
        Collective::ReduceScatter => (
            (0..count).map(|i| check_value(me, i)).collect(),
            vec![0.0; m],
        ),
    };
    let expected: Vec<f32> = match c {
        Collective::AllReduce => (0..count).map(|i| expected_sum(n, i)).collect(),
        Collective::AllGather => (0..count).map(|i| check_value(i / m, i)).collect(),
        Collective::ReduceScatter => chunk_range(count, n, me)
            .map(|i| expected_sum(n, i))
            .collect(),
    };

    let mut wrong = 0u64;
    let mut timed = Duration::ZERO;
    comm.barrier()?;
    for it in 0..opts.warmup + opts.iters {
        output.fill(f32::NAN); // poison: an unwritten element cannot pass
        if c == Collective::AllReduce {
            output.copy_from_slice(&input);
        }
        let t0 = Instant::now();
        match c {
            Collective::AllReduce => comm.all_reduce(&mut output, ReduceOp::Sum)?,
            Collective::AllGather => comm.all_gather(&input, &mut output)?,
            Collective::ReduceScatter => comm.reduce_scatter(&input, &mut output, ReduceOp::Sum)?,
        }
        let dt = t0.elapsed();
        if it >= opts.warmup {
            timed += dt;
        }
        wrong += output.iter().zip(&expected).filter(|(a, b)| a != b).count() as u64;
    }

    // Agree on the numbers: the slowest rank's mean time, and the wrong elements summed over ranks (exact in f32
    // below 2^24; larger counts saturate there, which still fails the check).
    let mut t = [(timed.as_secs_f64() / opts.iters as f64) as f32];
    let mut w = [wrong.min(1 << 24) as f32];
    comm.all_reduce(&mut t, ReduceOp::Max)?;
    comm.all_reduce(&mut w, ReduceOp::Sum)?;
    let avg_time = Duration::from_secs_f64(f64::from(t[0]).max(0.0));
    let bytes = count * 4;
    let secs = avg_time.as_secs_f64();
    let algbw = if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        f64::INFINITY
    };
    Ok(CollectiveResult {
        collective: c,
        bytes,
        count,
        avg_time,
        algbw_gbps: algbw,
        busbw_gbps: algbw * c.bus_factor(n),
        wrong: w[0] as u64,
        passed: w[0] == 0.0,
    })
}
