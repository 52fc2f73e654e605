//! The `comm-check` job body on GPUs: [`crate::comm_check`]'s verification and nccl-tests bandwidths, on device
//! buffers through an [`NcclCommunicator`].
//!
//! Same sizes (`S` = the all-reduce buffer, the all-gather output, the reduce-scatter input, the all-to-all's
//! per-rank input, rounded down to whole elements of the chosen dtype and to a multiple of `n` for all-gather /
//! reduce-scatter / all-to-all), same data (rank `r`'s element `i` is [`check_value`](crate::comm_check::check_value)`(r, i)`, an integer in
//! −15..=15; the inputs and expected outputs are [`check_input`] and [`check_expected`]), same formulas
//! (`algbw = S / t`, `busbw = algbw · 2(n−1)/n` for all-reduce, `· (n−1)/n` for the others), same report type
//! ([`CommCheckReport`]). The all-to-all (`n` equal chunks of `m = S/n`, chunk `j` to rank `j`, stored there at
//! position `r` of the sender: `out_j[r·m + k] = in_r[j·m + k]`) is [`NcclCommunicator::all_to_all_v_dev`] with
//! all counts `m` (grouped `ncclSend`/`ncclRecv`, also to itself).
//!
//! Differences, because a device collective returns before the data has moved:
//! - **Timing**: after a barrier, the `iters` timed collectives are enqueued back to back and the host waits once
//!   for the communication stream; `t` = elapsed / `iters`, the maximum over ranks (as nccl-tests and
//!   `torch_nccl.py` do). The all-reduce is in place (like `torch.distributed.all_reduce`); its timed iterations
//!   keep summing into one buffer, which only changes values, not the time.
//! - **Verification**: every warm-up iteration, and one more after the timed loop, is checked exactly on the
//!   host: output poisoned with NaN bytes, all-reduce input copied in, collective, download, compare with the
//!   expected values. `wrong` counts those iterations' wrong elements, summed over ranks.
//! - **dtype**: `f32` or `bf16`. Sums of up to 17 ranks of values in −15..=15 stay within ±256 and are exact in
//!   bf16 whatever the order; more ranks in bf16 may round and fail the exact check.

use std::fmt;
use std::time::{Duration, Instant};

use qkernels::DType as KDType;

use crate::comm::{CommBuffer, Communicator, DeviceBuffer, NcclCommunicator, NcclError, ReduceOp};
use crate::comm_check::{
    Collective, CollectiveResult, CommCheckError, CommCheckOptions, CommCheckReport,
    check_expected, check_input, count_wrong,
};

/// A GPU comm-check's report: the shared report plus the element type used.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuCommCheckReport {
    pub dtype: KDType,
    pub report: CommCheckReport,
}

impl fmt::Display for GpuCommCheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dt = match self.dtype {
            KDType::F32 => "f32",
            KDType::BF16 => "bf16",
            KDType::U32 => "u32",
        };
        // The shared Display names f32; say what ran instead.
        let text = self.report.to_string().replacen(
            ", f32",
            &format!(", {dt}, NCCL on device buffers"),
            1,
        );
        f.write_str(&text)
    }
}

/// Parses `f32` / `bf16` (the `COMM_CHECK_DTYPE` values).
pub fn parse_dtype(s: &str) -> Option<KDType> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Some(KDType::F32),
        "bf16" | "bfloat16" => Some(KDType::BF16),
        _ => None,
    }
}

fn nccl(me: usize) -> impl Fn(NcclError) -> CommCheckError {
    move |e| CommCheckError::Comm(e.into_comm_error(me))
}

/// Runs the check on `comm`'s device. Every member must call it with the same arguments.
pub fn run_comm_check_nccl(
    comm: &NcclCommunicator,
    opts: CommCheckOptions,
    dtype: KDType,
) -> Result<GpuCommCheckReport, CommCheckError> {
    if opts.iters == 0 {
        return Err(CommCheckError::NoIterations);
    }
    let me = comm.global_ranks()[comm.rank()];
    if !matches!(dtype, KDType::F32 | KDType::BF16) {
        return Err(nccl(me)(NcclError::InvalidArgument {
            op: "comm-check",
            detail: format!("dtype {dtype:?}: f32 or bf16"),
        }));
    }
    let results = Collective::ALL
        .into_iter()
        .map(|c| check_one(comm, c, opts, dtype))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(GpuCommCheckReport {
        dtype,
        report: CommCheckReport {
            ranks: comm.size(),
            iters: opts.iters,
            warmup: opts.warmup,
            results,
        },
    })
}

fn check_one(
    comm: &NcclCommunicator,
    c: Collective,
    opts: CommCheckOptions,
    dtype: KDType,
) -> Result<CollectiveResult, CommCheckError> {
    let (n, rank) = (comm.size(), comm.rank());
    let me = comm.global_ranks()[rank];
    let err = nccl(me);
    let ordinal = comm.device().ordinal();
    let es = dtype.size_in_bytes();
    let count = c.count(opts.bytes / es, n);
    let (in_len, out_len) = c.lengths(count, n);
    let host_in = check_input(c, n, rank, count);
    debug_assert_eq!(host_in.len(), in_len);
    let expected = check_expected(c, n, rank, count);
    // All-to-all: equal chunks of m = count / n elements to and from every rank.
    let chunks = vec![count / n; n];
    let mut input = DeviceBuffer::alloc(ordinal, in_len, dtype).map_err(&err)?;
    input.upload_f32(&host_in).map_err(&err)?;
    drop(host_in);
    let mut output = DeviceBuffer::alloc(ordinal, out_len, dtype).map_err(&err)?;

    let run = |input: &DeviceBuffer, output: &mut DeviceBuffer| -> Result<(), NcclError> {
        match c {
            Collective::AllReduce => comm.all_reduce_dev(output, ReduceOp::Sum),
            Collective::AllGather => comm.all_gather_dev(input, output),
            Collective::ReduceScatter => comm.reduce_scatter_dev(input, output, ReduceOp::Sum),
            Collective::AllToAll => comm.all_to_all_v_dev(input, &chunks, output, &chunks),
        }
    };
    let checked = |input: &DeviceBuffer, output: &mut DeviceBuffer| -> Result<u64, NcclError> {
        output.poison()?;
        if c == Collective::AllReduce {
            output.copy_from(input)?;
        }
        run(input, output)?;
        comm.synchronize()?;
        let got = output.download_f32()?;
        debug_assert_eq!(got.len(), expected.len());
        Ok(count_wrong(&got, &expected))
    };

    let mut wrong = 0u64;
    comm.barrier_dev().map_err(&err)?;
    for _ in 0..opts.warmup {
        wrong += checked(&input, &mut output).map_err(&err)?;
    }
    if c == Collective::AllReduce {
        output.copy_from(&input).map_err(&err)?;
    }
    comm.barrier_dev().map_err(&err)?;
    let t0 = Instant::now();
    for _ in 0..opts.iters {
        run(&input, &mut output).map_err(&err)?;
    }
    comm.synchronize().map_err(&err)?;
    let timed = t0.elapsed();
    wrong += checked(&input, &mut output).map_err(&err)?;

    // Agree on the slowest rank's time and the total of wrong elements (one-element NCCL all-reduces).
    let mut t = DeviceBuffer::alloc(ordinal, 1, KDType::F32).map_err(&err)?;
    t.upload_f32(&[(timed.as_secs_f64() / opts.iters as f64) as f32])
        .map_err(&err)?;
    comm.all_reduce_dev(&mut t, ReduceOp::Max).map_err(&err)?;
    let mut w = DeviceBuffer::alloc(ordinal, 1, KDType::F32).map_err(&err)?;
    w.upload_f32(&[wrong.min(1 << 24) as f32]).map_err(&err)?;
    comm.all_reduce_dev(&mut w, ReduceOp::Sum).map_err(&err)?;
    comm.synchronize().map_err(&err)?;
    let t = t.download_f32().map_err(&err)?[0];
    let w = w.download_f32().map_err(&err)?[0];

    let avg_time = Duration::from_secs_f64(f64::from(t).max(0.0));
    let bytes = count * es;
    let secs = avg_time.as_secs_f64();
    let algbw = if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        f64::INFINITY
    };
    debug_assert_eq!(output.len(), out_len);
    Ok(CollectiveResult {
        collective: c,
        bytes,
        count,
        avg_time,
        algbw_gbps: algbw,
        busbw_gbps: algbw * c.bus_factor(n),
        wrong: w as u64,
        passed: w == 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm_check::check_value;

    #[test]
    fn dtype_names() {
        assert_eq!(parse_dtype("BF16"), Some(KDType::BF16));
        assert_eq!(parse_dtype("f32"), Some(KDType::F32));
        assert_eq!(parse_dtype("fp8"), None);
    }

    #[test]
    fn bf16_check_values_and_small_sums_are_exact() {
        for n in 1..=17 {
            let sums = check_expected(Collective::AllReduce, n, 0, 200);
            for (i, &s) in sums.iter().enumerate() {
                assert_eq!(half::bf16::from_f32(s).to_f32(), s, "n={n} i={i}");
                assert_eq!(
                    half::bf16::from_f32(check_value(n, i)).to_f32(),
                    check_value(n, i)
                );
            }
        }
    }
}
