//! Prometheus metrics of a worker (`qworker --metrics-listen ADDR`, `GET /metrics`): what this node offers,
//! what its ranks use now, and counters of rank starts, exits and coordinator sessions — the numbers an
//! operator alerts on (a node that keeps restarting ranks, a worker that keeps losing its coordinator).
//!
//! Counters only grow for the life of the process; gauges are read from the daemon's state at scrape time. The
//! HTTP endpoint is [`qcluster_cli::serve_metrics`], the same as the coordinator's.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters the daemon bumps as things happen.
#[derive(Default)]
pub struct WorkerCounters {
    pub rank_starts: AtomicU64,
    pub rank_start_failures: AtomicU64,
    pub rank_exits_ok: AtomicU64,
    pub rank_exits_failed: AtomicU64,
    /// Successful registrations with a coordinator (the first one and every reconnect).
    pub registrations: AtomicU64,
}

/// Gauges read from the daemon at scrape time.
pub struct WorkerGauges {
    pub gpus: u64,
    pub cpu_slots: u64,
    pub gpu_ranks: u64,
    pub cpu_ranks: u64,
    pub connected: bool,
}

fn counter(out: &mut String, name: &str, help: &str, value: u64, labels: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{labels} {value}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
}

/// The Prometheus text exposition of one scrape.
pub fn render(node: &str, c: &WorkerCounters, g: &WorkerGauges) -> String {
    let mut out = String::new();
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let _ = writeln!(out, "# HELP qworker_info The node this worker serves.\n# TYPE qworker_info gauge\nqworker_info{{node=\"{node}\"}} 1");
    gauge(&mut out, "qworker_gpus", "GPUs this worker offers.", g.gpus);
    gauge(&mut out, "qworker_cpu_slots", "CPU rank slots this worker offers.", g.cpu_slots);
    gauge(&mut out, "qworker_gpus_in_use", "GPUs held by running ranks.", g.gpu_ranks);
    gauge(&mut out, "qworker_cpu_slots_in_use", "CPU slots held by running ranks.", g.cpu_ranks);
    gauge(&mut out, "qworker_coordinator_connected", "1 while registered with a coordinator.", g.connected as u64);
    counter(&mut out, "qworker_rank_starts_total", "Rank processes started.", get(&c.rank_starts), "");
    counter(&mut out, "qworker_rank_start_failures_total", "Rank processes that could not be started.", get(&c.rank_start_failures), "");
    let _ = writeln!(
        out,
        "# HELP qworker_rank_exits_total Rank processes that ended, by result.\n# TYPE qworker_rank_exits_total counter\n\
         qworker_rank_exits_total{{result=\"ok\"}} {}\nqworker_rank_exits_total{{result=\"failed\"}} {}",
        get(&c.rank_exits_ok),
        get(&c.rank_exits_failed)
    );
    counter(&mut out, "qworker_registrations_total", "Registrations with a coordinator (first and reconnects).", get(&c.registrations), "");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_series() {
        let c = WorkerCounters::default();
        c.rank_starts.fetch_add(3, Ordering::Relaxed);
        c.rank_exits_failed.fetch_add(1, Ordering::Relaxed);
        let text = render("n1", &c, &WorkerGauges { gpus: 8, cpu_slots: 4, gpu_ranks: 2, cpu_ranks: 1, connected: true });
        for line in [
            "qworker_info{node=\"n1\"} 1",
            "qworker_gpus 8",
            "qworker_gpus_in_use 2",
            "qworker_cpu_slots_in_use 1",
            "qworker_coordinator_connected 1",
            "qworker_rank_starts_total 3",
            "qworker_rank_exits_total{result=\"failed\"} 1",
            "qworker_rank_exits_total{result=\"ok\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
