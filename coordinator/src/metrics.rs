//! Prometheus metrics of the coordinator, served as text on `GET /metrics` of `--metrics-listen`.
//!
//! Gauges are computed from the cluster state at scrape time (jobs by state, queue depth, nodes,
//! GPUs and CPU slots in use); counters and the scheduling-latency histogram are kept by the cluster as
//! it runs ([`SchedulingStats`]). Scheduling latency = time from a job becoming `Pending` (submit or
//! requeue after a failed attempt) to its gang being placed.

use std::fmt::Write;
use std::time::Duration;

/// Upper bounds (seconds) of the scheduling-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0];

/// Counters the cluster updates as it runs.
#[derive(Debug, Default, Clone)]
pub struct SchedulingStats {
    pub submitted_total: u64,
    pub attempts_started_total: u64,
    pub attempts_failed_total: u64,
    /// Count of observations ≤ each bound of [`LATENCY_BUCKETS`] (cumulative, as Prometheus wants).
    latency_buckets: [u64; LATENCY_BUCKETS.len()],
    latency_count: u64,
    latency_sum_s: f64,
}

impl SchedulingStats {
    pub fn observe_latency(&mut self, latency: Duration) {
        let s = latency.as_secs_f64();
        for (bound, count) in LATENCY_BUCKETS.iter().zip(self.latency_buckets.iter_mut()) {
            if s <= *bound {
                *count += 1;
            }
        }
        self.latency_count += 1;
        self.latency_sum_s += s;
    }
}

/// Point-in-time gauges.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    /// (state name, number of jobs), every state listed.
    pub jobs_by_state: Vec<(&'static str, u64)>,
    pub nodes_total: u64,
    pub nodes_alive: u64,
    pub gpus_total: u64,
    pub gpus_used: u64,
    pub cpu_slots_total: u64,
    pub cpu_slots_used: u64,
}

/// Renders the Prometheus text exposition format.
pub fn render(g: &Gauges, s: &SchedulingStats) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
    };
    let queue = g.jobs_by_state.iter().find(|(st, _)| *st == "Pending").map(|(_, n)| *n).unwrap_or(0);
    gauge("qcluster_queue_depth", "Jobs waiting to be placed (state Pending).", queue);
    gauge("qcluster_nodes", "Nodes known to the coordinator.", g.nodes_total);
    gauge("qcluster_nodes_alive", "Nodes with a live worker session.", g.nodes_alive);
    gauge("qcluster_gpus", "GPUs offered by alive and known nodes.", g.gpus_total);
    gauge("qcluster_gpus_used", "GPUs held by live ranks.", g.gpus_used);
    gauge("qcluster_cpu_slots", "CPU rank slots offered by known nodes.", g.cpu_slots_total);
    gauge("qcluster_cpu_slots_used", "CPU rank slots held by live ranks.", g.cpu_slots_used);
    let _ = writeln!(out, "# HELP qcluster_jobs Jobs by state.\n# TYPE qcluster_jobs gauge");
    for (state, n) in &g.jobs_by_state {
        let _ = writeln!(out, "qcluster_jobs{{state=\"{state}\"}} {n}");
    }
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
    };
    counter("qcluster_jobs_submitted_total", "Jobs accepted since the coordinator started.", s.submitted_total);
    counter("qcluster_attempts_started_total", "Attempts placed since the coordinator started.", s.attempts_started_total);
    counter("qcluster_attempts_failed_total", "Attempts failed since the coordinator started.", s.attempts_failed_total);
    let name = "qcluster_scheduling_latency_seconds";
    let _ = writeln!(out, "# HELP {name} Time from a job becoming Pending to its gang being placed.\n# TYPE {name} histogram");
    for (bound, count) in LATENCY_BUCKETS.iter().zip(s.latency_buckets.iter()) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", s.latency_count);
    let _ = writeln!(out, "{name}_sum {}", s.latency_sum_s);
    let _ = writeln!(out, "{name}_count {}", s.latency_count);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_text_is_well_formed() {
        let mut s = SchedulingStats::default();
        s.observe_latency(Duration::from_millis(3));
        s.observe_latency(Duration::from_millis(70));
        s.observe_latency(Duration::from_secs(2));
        let g = Gauges { jobs_by_state: vec![("Pending", 4), ("Running", 1)], nodes_alive: 2, ..Default::default() };
        let text = render(&g, &s);
        assert!(text.contains("qcluster_queue_depth 4\n"), "{text}");
        assert!(text.contains("qcluster_jobs{state=\"Running\"} 1\n"));
        assert!(text.contains("qcluster_scheduling_latency_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("qcluster_scheduling_latency_seconds_bucket{le=\"0.1\"} 2\n"));
        assert!(text.contains("qcluster_scheduling_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("qcluster_scheduling_latency_seconds_count 3\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit_once(' ').unwrap().1;
            assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
        }
    }
}
