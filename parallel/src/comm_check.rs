//! The `comm-check` job body: an nccl-tests-style benchmark and correctness check of a communicator.
//!
//! For all-reduce (sum), all-gather, reduce-scatter (sum) and all-to-all: `warmup` untimed iterations, then `iters`
//! timed ones, each followed (untimed) by an exact check of the result on every rank.
//!
//! **Sizes** follow nccl-tests: the reported size `S` is the all-reduce buffer, the all-gather *output*
//! (`n·m` for a per-rank input of `m`), the reduce-scatter *input* (`n·m` for a per-rank output of `m`), and the
//! all-to-all's per-rank *input* (= its per-rank output, `n` chunks of `m`); `S` is `bytes` rounded down to whole
//! `f32`s (and to a multiple of `n` elements for all-gather / reduce-scatter / all-to-all), at least one element
//! per rank.
//!
//! **All-to-all**: every rank's input of `S = n·m` elements is cut into `n` chunks of `m`; chunk `j` goes to rank
//! `j`, which stores what rank `r` sent it at chunk position `r`: `out_j[r·m + k] = in_r[j·m + k]` (`0 ≤ k < m`), a
//! block transpose over ranks. Run as [`Communicator::all_to_all_v`] with all counts `m`; with `n = 1` a copy.
//!
//! **Bandwidths** (GB/s = 10⁹ B/s): `algbw = S / t`; `busbw = algbw · 2(n-1)/n` for all-reduce and
//! `algbw · (n-1)/n` for all-gather, reduce-scatter and all-to-all — the traffic each rank puts on its link in a
//! ring (for all-to-all: the `(n-1)/n` of its buffer that leaves the rank), comparable with the hardware bandwidth
//! for any `n` (see the `comm` module docs). `t` is the mean time of one iteration, taking the slowest rank (max
//! over ranks), so every rank reports the same numbers.
//!
//! **Data**: rank `r`'s element `i` is `((7r + 13i) mod 31) − 15`, a small integer, so any sum over up to 2²⁴/15
//! ranks is exact in `f32` whatever the summation order; results are compared for exact equality. The number of
//! wrong elements is summed over ranks, so a corruption seen by one rank fails the check everywhere. Expected
//! results: all-reduce `Σ_r value(r, i)`; all-gather `value(i / m, i)` (rank `q` contributes the block `q` of the
//! global index space); reduce-scatter chunk `rank` of the all-reduce; all-to-all at rank `j`, chunk `r`, offset
//! `k`: `value(r, j·m + k)`. The data repeats every 31 elements and every 31 ranks, so a fault that moves data by a
//! multiple of 31 elements goes unseen; for all-to-all also a sender's chunks mixed up when `m ≡ 0 (mod 31)`, and a
//! missing exchange (output = input) when `m ≡ 22 (mod 31)` (`7(j−r) ≡ 13m(j−r)`).

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
    AllToAll,
}

impl Collective {
    pub const ALL: [Collective; 4] = [
        Collective::AllReduce,
        Collective::AllGather,
        Collective::ReduceScatter,
        Collective::AllToAll,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Collective::AllReduce => "all_reduce",
            Collective::AllGather => "all_gather",
            Collective::ReduceScatter => "reduce_scatter",
            Collective::AllToAll => "all_to_all",
        }
    }

    /// The nccl-tests size `S` in elements for a request of `elems` whole elements on `n` ranks (see the module
    /// docs): at least one element per rank, a multiple of `n` except for all-reduce.
    pub fn count(self, elems: usize, n: usize) -> usize {
        match self {
            Collective::AllReduce => elems.max(1),
            Collective::AllGather | Collective::ReduceScatter | Collective::AllToAll => {
                (elems / n).max(1) * n
            }
        }
    }

    /// One rank's (input, output) lengths for the size `count` (from [`Collective::count`]); all-reduce runs in
    /// place on its output.
    pub fn lengths(self, count: usize, n: usize) -> (usize, usize) {
        let m = count / n;
        match self {
            Collective::AllReduce | Collective::AllToAll => (count, count),
            Collective::AllGather => (m, count),
            Collective::ReduceScatter => (count, m),
        }
    }

    /// nccl-tests' bus-bandwidth factor for `n` ranks.
    pub fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Collective::AllReduce => 2.0 * (n - 1.0) / n,
            Collective::AllGather | Collective::ReduceScatter | Collective::AllToAll => {
                (n - 1.0) / n
            }
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

/// Rank `rank`'s input (of `n` ranks) for collective `c` of size `count` (from [`Collective::count`]): its values
/// [`check_value`]`(rank, i)`; for all-gather only its block `rank` of the global index space.
pub fn check_input(c: Collective, n: usize, rank: usize, count: usize) -> Vec<f32> {
    match c {
        Collective::AllGather => {
            let m = count / n;
            (rank * m..(rank + 1) * m)
                .map(|i| check_value(rank, i))
                .collect()
        }
        Collective::AllReduce | Collective::ReduceScatter | Collective::AllToAll => {
            (0..count).map(|i| check_value(rank, i)).collect()
        }
    }
}

/// The exact output rank `rank` (of `n`) must hold after collective `c` (sum for the reductions) of size `count`
/// on the [`check_input`]s; see the module docs.
pub fn check_expected(c: Collective, n: usize, rank: usize, count: usize) -> Vec<f32> {
    let m = count / n;
    match c {
        Collective::AllReduce => (0..count).map(|i| expected_sum(n, i)).collect(),
        Collective::AllGather => (0..count).map(|i| check_value(i / m, i)).collect(),
        Collective::ReduceScatter => chunk_range(count, n, rank)
            .map(|i| expected_sum(n, i))
            .collect(),
        // Chunk r came from rank r: its chunk `rank`, i.e. its elements rank·m + k.
        Collective::AllToAll => (0..count)
            .map(|i| check_value(i / m, rank * m + i % m))
            .collect(),
    }
}

/// Elements of `got` that differ from `expected` (NaN never matches); a length difference counts as that many
/// wrong elements.
pub fn count_wrong(got: &[f32], expected: &[f32]) -> u64 {
    let differ = got.iter().zip(expected).filter(|(a, b)| a != b).count();
    (differ + got.len().abs_diff(expected.len())) as u64
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
    // nccl-tests size S, in elements, and the per-rank input/output lengths.
    let count = c.count(opts.bytes / 4, n);
    let (_, out_len) = c.lengths(count, n);
    let input = check_input(c, n, me, count);
    let mut output = vec![0.0f32; out_len];
    let expected = check_expected(c, n, me, count);
    // All-to-all: equal chunks of m = count / n elements to and from every rank.
    let chunks = vec![count / n; n];

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
            Collective::AllToAll => comm.all_to_all_v(&input, &chunks, &mut output, &chunks)?,
        }
        let dt = t0.elapsed();
        if it >= opts.warmup {
            timed += dt;
        }
        wrong += count_wrong(&output, &expected);
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
