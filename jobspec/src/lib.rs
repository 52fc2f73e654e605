//! The YAML job spec that `qctl submit job.yaml` sends and every daemon reads.
//!
//! Parsing follows ripgrep's flags discipline: parse and validate first (unknown keys rejected, every
//! error names the source file, the key and the line where the YAML parser gives one), resolve derived
//! values second ([`JobSpec::world_size`], [`JobSpec::ranks_per_node`], [`JobSpec::data_parallel`]).
//!
//! Keys follow ms-swift / Megatron-SWIFT names where those exist; the Megatron long names of the
//! parallel block (`tensor_model_parallel_size` …) are accepted as aliases.
//!
//! Invariants of a [`JobSpec`] returned by [`JobSpec::parse`]:
//! - `resources.nodes ≥ 1`, and the world size is a positive multiple of `nodes`;
//! - with GPUs, one rank per GPU: world size = `nodes × gpus_per_node`;
//! - `tp × pp × cp` divides the world size, and `tp` divides the ranks of one node, so a tensor-parallel
//!   group never spans nodes (ranks are laid out node-major, tp innermost).

use serde::{Deserialize, Serialize};
use std::fmt;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// Collectives benchmark and verification across the job's ranks (like nccl-tests).
    CommCheck,
    Pretrain,
    Sft,
    Dpo,
    Grpo,
    Infer,
    Serve,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::CommCheck => "comm-check",
            JobKind::Pretrain => "pretrain",
            JobKind::Sft => "sft",
            JobKind::Dpo => "dpo",
            JobKind::Grpo => "grpo",
            JobKind::Infer => "infer",
            JobKind::Serve => "serve",
        }
    }

    /// Kinds this build can run on the cluster.
    pub fn is_runnable(self) -> bool {
        matches!(self, JobKind::CommCheck)
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a job asks of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default = "one")]
    pub nodes: u32,
    /// 0 means CPU ranks (one CPU slot each).
    #[serde(default)]
    pub gpus_per_node: u32,
    /// Total ranks; defaults to `nodes × gpus_per_node`. Required for CPU jobs.
    #[serde(default)]
    pub ranks: Option<u32>,
}

impl Default for Resources {
    fn default() -> Self {
        Resources { nodes: 1, gpus_per_node: 0, ranks: None }
    }
}

/// The `parallel:` block. `dp` is derived, never given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelSpec {
    #[serde(default = "one", alias = "tensor_model_parallel_size")]
    pub tp: u32,
    #[serde(default = "one", alias = "pipeline_model_parallel_size")]
    pub pp: u32,
    /// Virtual pipeline stages per pipeline rank.
    #[serde(default = "one")]
    pub vpp: u32,
    /// Megatron's way of giving the virtual pipeline size; resolved into `vpp` by the engine.
    #[serde(default)]
    pub num_layers_per_virtual_pipeline_stage: Option<u32>,
    #[serde(default = "one", alias = "expert_model_parallel_size")]
    pub ep: u32,
    #[serde(default = "one", alias = "expert_tensor_parallel_size")]
    pub etp: u32,
    #[serde(default = "one", alias = "context_parallel_size")]
    pub cp: u32,
    #[serde(default, alias = "sequence_parallel")]
    pub sp: bool,
}

impl Default for ParallelSpec {
    fn default() -> Self {
        ParallelSpec {
            tp: 1,
            pp: 1,
            vpp: 1,
            num_layers_per_virtual_pipeline_stage: None,
            ep: 1,
            etp: 1,
            cp: 1,
            sp: false,
        }
    }
}

/// The `comm_check:` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommCheckSpec {
    /// Message size per collective in bytes.
    #[serde(default = "default_comm_bytes")]
    pub bytes: u64,
    #[serde(default = "default_comm_iters")]
    pub iters: u32,
    /// Seconds every rank stays up after the collectives before exiting (lets an operator watch a
    /// placed gang; the fault-injection tests kill nodes during it).
    #[serde(default)]
    pub hold_s: f64,
}

impl Default for CommCheckSpec {
    fn default() -> Self {
        CommCheckSpec { bytes: default_comm_bytes(), iters: default_comm_iters(), hold_s: 0.0 }
    }
}

/// A job as written in YAML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    pub kind: JobKind,
    /// Higher runs first; equal priorities run in submit order.
    #[serde(default)]
    pub priority: i32,
    /// How many times a failed attempt is retried (from the last committed checkpoint).
    #[serde(default)]
    pub max_restarts: u32,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub parallel: ParallelSpec,
    #[serde(default)]
    pub comm_check: CommCheckSpec,
    /// Environment variables for the rank processes (names must be valid identifiers).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

/// Why a job spec was refused. Every variant names the source (a file name or "<request>").
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobSpecError {
    #[error("{source_name}{}: {message}", location(*line, *column))]
    Parse { source_name: String, line: Option<usize>, column: Option<usize>, message: String },
    #[error("{source_name}: key `{key}`: {message}")]
    Invalid { source_name: String, key: String, message: String },
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

impl JobSpec {
    /// Parses and validates YAML text. `source_name` (a file path, or "<request>") appears in errors.
    pub fn parse(yaml: &str, source_name: &str) -> Result<JobSpec, JobSpecError> {
        let spec: JobSpec = serde_norway::from_str(yaml).map_err(|e| {
            let loc = e.location();
            JobSpecError::Parse {
                source_name: source_name.to_string(),
                line: loc.as_ref().map(|l| l.line()),
                column: loc.as_ref().map(|l| l.column()),
                message: e.to_string(),
            }
        })?;
        spec.validate(source_name)?;
        Ok(spec)
    }

    /// The YAML text of this spec (normalised; parses back to an equal spec).
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("a JobSpec always serialises")
    }

    /// Total number of rank processes.
    pub fn world_size(&self) -> u32 {
        let r = &self.resources;
        r.ranks.unwrap_or(r.nodes * r.gpus_per_node)
    }

    /// Ranks placed on each node (the world size split evenly, node-major).
    pub fn ranks_per_node(&self) -> u32 {
        self.world_size() / self.resources.nodes
    }

    /// Data-parallel size derived from the world size and the model-parallel factors.
    pub fn data_parallel(&self) -> u32 {
        let p = &self.parallel;
        self.world_size() / (p.tp * p.pp * p.cp)
    }

    fn validate(&self, source_name: &str) -> Result<(), JobSpecError> {
        let invalid = |key: &str, message: String| JobSpecError::Invalid {
            source_name: source_name.to_string(),
            key: key.to_string(),
            message,
        };
        if self.name.is_empty()
            || self.name.len() > 128
            || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(
                "name",
                format!("{:?} must be 1-128 characters of letters, digits, '-', '_' or '.'", self.name),
            ));
        }
        if !self.kind.is_runnable() {
            return Err(invalid(
                "kind",
                format!("kind `{}` is not supported by this build yet (supported: comm-check)", self.kind),
            ));
        }
        if self.max_restarts > 100 {
            return Err(invalid("max_restarts", format!("{} is more than 100", self.max_restarts)));
        }
        let r = &self.resources;
        if r.nodes == 0 {
            return Err(invalid("resources.nodes", "must be at least 1".into()));
        }
        match (r.gpus_per_node, r.ranks) {
            (0, None) => {
                return Err(invalid(
                    "resources.ranks",
                    "a CPU job (gpus_per_node: 0) must say how many ranks it runs".into(),
                ));
            }
            (0, Some(0)) => return Err(invalid("resources.ranks", "must be at least 1".into())),
            (0, Some(ranks)) if ranks % r.nodes != 0 => {
                return Err(invalid(
                    "resources.ranks",
                    format!("{ranks} ranks cannot be spread evenly over {} nodes", r.nodes),
                ));
            }
            (gpus, Some(ranks)) if gpus > 0 && ranks != r.nodes * gpus => {
                return Err(invalid(
                    "resources.ranks",
                    format!(
                        "{ranks} ranks with nodes {} × gpus_per_node {gpus} = {} GPUs: a GPU job runs one rank per GPU",
                        r.nodes,
                        r.nodes * gpus
                    ),
                ));
            }
            _ => {}
        }
        if r.ranks.unwrap_or(0) > 65536 || r.gpus_per_node > 64 || r.nodes > 4096 {
            return Err(invalid("resources", "asks for more than 4096 nodes, 64 GPUs per node or 65536 ranks".into()));
        }
        let p = &self.parallel;
        for (key, v) in [("tp", p.tp), ("pp", p.pp), ("vpp", p.vpp), ("ep", p.ep), ("etp", p.etp), ("cp", p.cp)] {
            if v == 0 {
                return Err(invalid(&format!("parallel.{key}"), "must be at least 1".into()));
            }
        }
        let world = self.world_size();
        let model_parallel = p.tp * p.pp * p.cp;
        if world % model_parallel != 0 {
            return Err(invalid(
                "parallel",
                format!(
                    "world size {world} is not divisible by tp({}) × pp({}) × cp({}) = {model_parallel}",
                    p.tp, p.pp, p.cp
                ),
            ));
        }
        if self.ranks_per_node() % p.tp != 0 {
            return Err(invalid(
                "parallel.tp",
                format!(
                    "tp {} does not divide the {} ranks of one node: a tensor-parallel group must stay inside a node",
                    p.tp,
                    self.ranks_per_node()
                ),
            ));
        }
        if p.vpp > 1 && p.pp == 1 {
            return Err(invalid("parallel.vpp", "virtual pipeline stages need pp > 1".into()));
        }
        if p.sp && p.tp == 1 {
            return Err(invalid("parallel.sp", "sequence parallelism needs tp > 1".into()));
        }
        if !(0.0..=86_400.0).contains(&self.comm_check.hold_s) {
            return Err(invalid("comm_check.hold_s", format!("{} is not between 0 and 86400 seconds", self.comm_check.hold_s)));
        }
        if self.comm_check.iters == 0 || self.comm_check.bytes < 4 || self.comm_check.bytes > (1 << 34) {
            return Err(invalid(
                "comm_check",
                format!(
                    "bytes must be 4..=16 GiB and iters ≥ 1 (got bytes {}, iters {})",
                    self.comm_check.bytes, self.comm_check.iters
                ),
            ));
        }
        for name in self.env.keys() {
            let ok = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok || name.starts_with("QCLUSTER_") || name == "LD_PRELOAD" {
                return Err(invalid(
                    &format!("env.{name}"),
                    "must be an identifier that is not reserved (QCLUSTER_*, LD_PRELOAD)".into(),
                ));
            }
        }
        Ok(())
    }
}

fn one() -> u32 {
    1
}
fn default_comm_bytes() -> u64 {
    1 << 20
}
fn default_comm_iters() -> u32 {
    20
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "name: demo\nkind: comm-check\npriority: 3\nmax_restarts: 2\n\
resources: {nodes: 2, gpus_per_node: 0, ranks: 4}\nparallel: {tp: 2}\ncomm_check: {bytes: 4096, iters: 3}\n";

    #[test]
    fn parses_and_derives() {
        let s = JobSpec::parse(GOOD, "job.yaml").unwrap();
        assert_eq!(s.kind, JobKind::CommCheck);
        assert_eq!(s.world_size(), 4);
        assert_eq!(s.ranks_per_node(), 2);
        assert_eq!(s.data_parallel(), 2);
        assert_eq!(s.priority, 3);
        assert_eq!(JobSpec::parse(&s.to_yaml(), "x").unwrap(), s);
    }

    #[test]
    fn megatron_long_names_are_aliases() {
        let y = "name: a\nkind: comm-check\nresources: {ranks: 4}\nparallel: {tensor_model_parallel_size: 2, sequence_parallel: true}\n";
        let s = JobSpec::parse(y, "j.yaml").unwrap();
        assert_eq!(s.parallel.tp, 2);
        assert!(s.parallel.sp);
    }

    #[test]
    fn unknown_key_names_key_file_and_line() {
        let y = "name: a\nkind: comm-check\nresources: {ranks: 2}\nlearning_rat: 3\n";
        let e = JobSpec::parse(y, "job.yaml").unwrap_err().to_string();
        assert!(e.starts_with("job.yaml:4:"), "{e}");
        assert!(e.contains("learning_rat"), "{e}");
    }

    #[test]
    fn nested_unknown_key_is_rejected() {
        let y = "name: a\nkind: comm-check\nresources: {ranks: 2, gpu: 1}\n";
        let e = JobSpec::parse(y, "job.yaml").unwrap_err().to_string();
        assert!(e.contains("gpu") && e.contains("job.yaml:3"), "{e}");
    }

    #[test]
    fn bad_yaml_gives_line() {
        let e = JobSpec::parse("name: a\nkind: [comm-check\n", "bad.yaml").unwrap_err();
        match e {
            JobSpecError::Parse { line: Some(_), ref source_name, .. } => assert_eq!(source_name, "bad.yaml"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn impossible_resources_name_the_key() {
        let cases = [
            ("resources: {nodes: 0, ranks: 1}", "resources.nodes"),
            ("resources: {gpus_per_node: 0}", "resources.ranks"),
            ("resources: {nodes: 2, ranks: 3}", "resources.ranks"),
            ("resources: {nodes: 1, gpus_per_node: 8, ranks: 4}", "resources.ranks"),
            ("resources: {ranks: 6}\nparallel: {tp: 4}", "parallel"),
            ("resources: {nodes: 2, ranks: 4}\nparallel: {tp: 4}", "parallel.tp"),
            ("resources: {ranks: 2}\nparallel: {sp: true}", "parallel.sp"),
            ("resources: {ranks: 2}\nparallel: {vpp: 2}", "parallel.vpp"),
        ];
        for (yaml, key) in cases {
            let y = format!("name: a\nkind: comm-check\n{yaml}\n");
            let e = JobSpec::parse(&y, "j.yaml").unwrap_err();
            match &e {
                JobSpecError::Invalid { key: k, .. } => assert_eq!(k, key, "{yaml}: {e}"),
                other => panic!("{yaml}: {other:?}"),
            }
        }
    }

    #[test]
    fn unsupported_kind_and_reserved_env_are_refused() {
        let e = JobSpec::parse("name: a\nkind: dpo\nresources: {ranks: 1}\n", "j").unwrap_err().to_string();
        assert!(e.contains("`kind`") && e.contains("dpo"), "{e}");
        let e = JobSpec::parse("name: a\nkind: comm-check\nresources: {ranks: 1}\nenv: {QCLUSTER_RANK: '3'}\n", "j")
            .unwrap_err()
            .to_string();
        assert!(e.contains("env.QCLUSTER_RANK"), "{e}");
        let e = JobSpec::parse("name: a\nkind: train\n", "j").unwrap_err().to_string();
        assert!(e.contains("j:2"), "{e}");
    }
}
