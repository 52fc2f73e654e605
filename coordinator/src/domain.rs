//! The coordinator's domain types: jobs, attempts, ranks, nodes, and their conversion to wire types.
//!
//! These are what the state store persists (as JSON) and what the scheduler reasons about; the proto
//! types exist only at the gRPC edge ([`JobRecord::to_proto`], [`NodeRecord::to_proto`]).
//!
//! Invariants:
//! - `JobRecord::attempts[i].number == i + 1`; the current attempt is the last one.
//! - A job in `Scheduled`/`Running`/`Checkpointing` has a current attempt whose ranks are placed.
//! - A rank is *live* (holds its node's resources) until it is `Exited`, `Lost` or `FailedToStart`.

use qcluster_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, as a float (what status output shows).
pub fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Pending,
    Scheduled,
    Running,
    Checkpointing,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "Pending",
            JobState::Scheduled => "Scheduled",
            JobState::Running => "Running",
            JobState::Checkpointing => "Checkpointing",
            JobState::Succeeded => "Succeeded",
            JobState::Failed => "Failed",
            JobState::Cancelled => "Cancelled",
        }
    }
}

/// Where a rank process is in its life, as its worker reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RankState {
    /// Assigned, not yet reported started.
    Assigned,
    Running { pid: u32 },
    Exited { code: i32 },
    /// Its node was declared lost (or restarted without it).
    Lost,
    FailedToStart { message: String },
}

impl RankState {
    pub fn is_live(&self) -> bool {
        matches!(self, RankState::Assigned | RankState::Running { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankRecord {
    pub rank: u32,
    pub node: String,
    pub local_rank: u32,
    /// GPU index on the node, or `None` for a CPU rank.
    pub gpu: Option<u32>,
    pub state: RankState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1-based.
    pub number: u32,
    pub ranks: Vec<RankRecord>,
    pub started_unix: f64,
    /// Set once the attempt is over (all ranks done, or failed/cancelled).
    pub ended: bool,
    pub resume_from: Option<String>,
}

impl Attempt {
    pub fn live_ranks(&self) -> impl Iterator<Item = &RankRecord> {
        self.ranks.iter().filter(|r| r.state.is_live())
    }

    /// Nodes the attempt runs on, in first-rank order, with their ranks.
    pub fn placement(&self) -> Vec<(String, Vec<u32>)> {
        let mut out: Vec<(String, Vec<u32>)> = Vec::new();
        for r in &self.ranks {
            match out.iter_mut().find(|(n, _)| *n == r.node) {
                Some((_, ranks)) => ranks.push(r.rank),
                None => out.push((r.node.clone(), vec![r.rank])),
            }
        }
        out
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    pub tokens_per_s: f64,
    pub eta_s: f64,
    pub updated_unix: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub unix: f64,
    pub text: String,
}

/// Events kept per job (oldest dropped first).
pub const MAX_EVENTS_PER_JOB: usize = 500;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    /// Submission order, unique and increasing; ties in priority run in this order.
    pub seq: u64,
    pub name: String,
    pub kind: String,
    pub priority: i32,
    pub max_restarts: u32,
    /// The normalised YAML of the spec (re-parsed when needed).
    pub spec_yaml: String,
    pub world_size: u32,
    pub ranks_per_node: u32,
    pub gpus_per_node: u32,
    pub nodes: u32,
    pub tp: u32,
    pub state: JobState,
    pub message: String,
    pub submitted_unix: f64,
    pub started_unix: f64,
    pub finished_unix: f64,
    pub attempts: Vec<Attempt>,
    pub progress: Progress,
    pub results: BTreeMap<String, String>,
    /// Newest committed checkpoint reported by the ranks; the next attempt resumes from it.
    pub latest_checkpoint: Option<String>,
    pub events: Vec<Event>,
}

impl JobRecord {
    pub fn current_attempt(&self) -> Option<&Attempt> {
        self.attempts.last()
    }

    pub fn current_attempt_mut(&mut self) -> Option<&mut Attempt> {
        self.attempts.last_mut()
    }

    pub fn attempt_number(&self) -> u32 {
        self.attempts.len() as u32
    }

    pub fn event(&mut self, text: impl Into<String>) {
        self.events.push(Event { unix: now_unix(), text: text.into() });
        if self.events.len() > MAX_EVENTS_PER_JOB {
            let extra = self.events.len() - MAX_EVENTS_PER_JOB;
            self.events.drain(..extra);
        }
    }

    pub fn to_proto(&self) -> pb::JobStatus {
        let attempt = self.current_attempt();
        pb::JobStatus {
            job_id: self.id.clone(),
            name: self.name.clone(),
            kind: self.kind.clone(),
            state: self.state.as_str().to_string(),
            priority: self.priority,
            attempt: self.attempt_number(),
            max_restarts: self.max_restarts,
            submitted_unix: self.submitted_unix,
            started_unix: self.started_unix,
            finished_unix: self.finished_unix,
            message: self.message.clone(),
            placement: attempt
                .map(|a| a.placement())
                .unwrap_or_default()
                .into_iter()
                .map(|(node, ranks)| pb::Placement { node, ranks })
                .collect(),
            progress: Some(pb::Progress {
                step: self.progress.step,
                total_steps: self.progress.total_steps,
                loss: self.progress.loss,
                tokens_per_s: self.progress.tokens_per_s,
                eta_s: self.progress.eta_s,
                updated_unix: self.progress.updated_unix,
            }),
            results: self.results.clone().into_iter().collect(),
            events: self.events.iter().map(|e| pb::JobEvent { unix: e.unix, text: e.text.clone() }).collect(),
            spec_yaml: self.spec_yaml.clone(),
            world_size: self.world_size,
            resume_from: attempt.and_then(|a| a.resume_from.clone()).unwrap_or_default(),
        }
    }
}

/// A node as the coordinator remembers it (persisted without its liveness, which is runtime state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub gpus: u32,
    pub cpu_slots: u32,
    pub gpu_names: Vec<String>,
    pub address: String,
}
