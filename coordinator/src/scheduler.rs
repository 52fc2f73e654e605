//! Gang placement: all ranks of an attempt at once, or none.
//!
//! Pure functions over a snapshot of free capacity, so they are tested and benchmarked without a
//! server. Rules:
//! - A job asks for `nodes` nodes with `ranks_per_node` ranks each. A GPU job takes one GPU per rank; a
//!   CPU job (`gpus_per_node == 0`) one CPU slot per rank.
//! - Ranks are laid out node-major (node i holds ranks `i·rpn .. (i+1)·rpn`) and tensor parallelism is
//!   innermost, so since `tp | rpn` (checked by the job spec) every tensor-parallel group stays inside
//!   one node.
//! - Nodes are chosen best-fit (the fullest node that still fits, then by name), which keeps large
//!   holes free for large gangs.
//! - The queue runs in order (priority descending, then submit order). A job that does not fit now
//!   blocks every job behind it (no backfill: a large job is never starved by a stream of small ones),
//!   except a job that could not fit even on the idle cluster: it waits with a reason and blocks nobody.

/// Free capacity of one alive node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFree {
    pub name: String,
    /// Indices of the node's free GPUs, ascending.
    pub free_gpus: Vec<u32>,
    pub free_cpu_slots: u32,
    /// Total capacity, to tell "busy now" from "never fits".
    pub total_gpus: u32,
    pub total_cpu_slots: u32,
}

/// What one attempt needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GangRequest {
    pub nodes: u32,
    pub ranks_per_node: u32,
    pub gpus_per_node: u32,
}

/// One placed rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedRank {
    pub rank: u32,
    pub node: String,
    pub local_rank: u32,
    pub gpu: Option<u32>,
}

/// Why a gang was not placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotPlaced {
    /// It fits the idle cluster; it waits for running jobs to end.
    Busy(String),
    /// Not even the idle cluster of alive nodes can hold it.
    NeverFits(String),
}

impl GangRequest {
    fn need_per_node(&self) -> u32 {
        if self.gpus_per_node > 0 { self.gpus_per_node } else { self.ranks_per_node }
    }

    fn unit(&self) -> &'static str {
        if self.gpus_per_node > 0 { "free GPUs" } else { "free CPU slots" }
    }

    fn free_on(&self, n: &NodeFree) -> u32 {
        if self.gpus_per_node > 0 { n.free_gpus.len() as u32 } else { n.free_cpu_slots }
    }

    fn total_on(&self, n: &NodeFree) -> u32 {
        if self.gpus_per_node > 0 { n.total_gpus } else { n.total_cpu_slots }
    }
}

/// Places a gang on `nodes`, taking the capacity it uses out of them. On failure nothing changes.
pub fn place(req: GangRequest, nodes: &mut [NodeFree]) -> Result<Vec<PlacedRank>, NotPlaced> {
    let need = req.need_per_node();
    let mut fitting: Vec<usize> = (0..nodes.len()).filter(|&i| req.free_on(&nodes[i]) >= need).collect();
    if fitting.len() < req.nodes as usize {
        let could = nodes.iter().filter(|n| req.total_on(n) >= need).count();
        let what = format!("needs {} node(s) with {need} {} each", req.nodes, req.unit());
        return Err(if could < req.nodes as usize {
            NotPlaced::NeverFits(format!("{what}; only {could} alive node(s) have that many in total"))
        } else {
            NotPlaced::Busy(format!("{what}; {} node(s) have that now", fitting.len()))
        });
    }
    fitting.sort_by(|&a, &b| req.free_on(&nodes[a]).cmp(&req.free_on(&nodes[b])).then(nodes[a].name.cmp(&nodes[b].name)));
    fitting.truncate(req.nodes as usize);
    fitting.sort_by(|&a, &b| nodes[a].name.cmp(&nodes[b].name));
    let mut placed = Vec::with_capacity((req.nodes * req.ranks_per_node) as usize);
    for (node_index, &i) in fitting.iter().enumerate() {
        let node = &mut nodes[i];
        let gpus: Vec<u32> = if req.gpus_per_node > 0 {
            node.free_gpus.drain(..need as usize).collect()
        } else {
            node.free_cpu_slots -= need;
            vec![]
        };
        for local in 0..req.ranks_per_node {
            placed.push(PlacedRank {
                rank: node_index as u32 * req.ranks_per_node + local,
                node: node.name.clone(),
                local_rank: local,
                gpu: gpus.get(local as usize).copied(),
            });
        }
    }
    Ok(placed)
}

/// Why a job waits when an earlier job in queue order is waiting for resources.
pub const QUEUED_BEHIND: &str = "queued behind an earlier job that is waiting for resources";

/// A queued job as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct QueuedJob {
    pub id: String,
    pub priority: i32,
    pub seq: u64,
    pub request: GangRequest,
}

/// Runs the queue once: returns the jobs placed now, and the reasons the others wait.
pub fn schedule(
    mut queue: Vec<QueuedJob>,
    nodes: &mut [NodeFree],
) -> (Vec<(String, Vec<PlacedRank>)>, Vec<(String, String)>) {
    queue.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.seq.cmp(&b.seq)));
    let mut placed = Vec::new();
    let mut waiting = Vec::new();
    let mut blocked_by: Option<String> = None; // the first job that waits for resources
    for job in queue {
        if blocked_by.is_some() {
            // A fixed text, so a long queue is not rewritten each time the head changes.
            waiting.push((job.id, QUEUED_BEHIND.to_string()));
            continue;
        }
        match place(job.request, nodes) {
            Ok(ranks) => placed.push((job.id, ranks)),
            Err(NotPlaced::Busy(why)) => {
                waiting.push((job.id.clone(), format!("waiting for resources: {why}")));
                blocked_by = Some(job.id);
            }
            Err(NotPlaced::NeverFits(why)) => waiting.push((job.id, format!("unschedulable on the alive nodes: {why}"))),
        }
    }
    (placed, waiting)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu_node(name: &str, slots: u32) -> NodeFree {
        NodeFree { name: name.into(), free_gpus: vec![], free_cpu_slots: slots, total_gpus: 0, total_cpu_slots: slots }
    }

    fn gpu_node(name: &str, gpus: u32) -> NodeFree {
        NodeFree {
            name: name.into(),
            free_gpus: (0..gpus).collect(),
            free_cpu_slots: 0,
            total_gpus: gpus,
            total_cpu_slots: 0,
        }
    }

    #[test]
    fn gpu_gang_is_node_major_and_best_fit() {
        let mut nodes = vec![gpu_node("a", 8), gpu_node("b", 8), gpu_node("c", 8)];
        nodes[1].free_gpus = vec![4, 5, 6, 7];
        let req = GangRequest { nodes: 2, ranks_per_node: 4, gpus_per_node: 4 };
        let ranks = place(req, &mut nodes).unwrap();
        // b (4 free) is the fullest that fits, then a (8 free, before c by name).
        let layout: Vec<_> = ranks.iter().map(|r| (r.rank, r.node.as_str(), r.local_rank, r.gpu)).collect();
        assert_eq!(
            layout,
            vec![
                (0, "a", 0, Some(0)),
                (1, "a", 1, Some(1)),
                (2, "a", 2, Some(2)),
                (3, "a", 3, Some(3)),
                (4, "b", 0, Some(4)),
                (5, "b", 1, Some(5)),
                (6, "b", 2, Some(6)),
                (7, "b", 3, Some(7)),
            ]
        );
        assert!(nodes[1].free_gpus.is_empty());
        assert_eq!(nodes[0].free_gpus, vec![4, 5, 6, 7]);
        assert_eq!(nodes[2].free_gpus.len(), 8);
    }

    #[test]
    fn all_or_nothing() {
        let mut nodes = vec![cpu_node("a", 4), cpu_node("b", 1)];
        let before = nodes.clone();
        let err = place(GangRequest { nodes: 2, ranks_per_node: 2, gpus_per_node: 0 }, &mut nodes).unwrap_err();
        assert!(matches!(err, NotPlaced::Busy(_) | NotPlaced::NeverFits(_)));
        assert_eq!(nodes, before, "a failed placement takes nothing");
    }

    #[test]
    fn queue_order_priority_then_seq_and_blocking() {
        let mut nodes = vec![cpu_node("a", 4)];
        let q = |id: &str, priority, seq, ranks| QueuedJob {
            id: id.into(),
            priority,
            seq,
            request: GangRequest { nodes: 1, ranks_per_node: ranks, gpus_per_node: 0 },
        };
        let queue = vec![q("low", 0, 1, 2), q("high", 5, 3, 3), q("big", 1, 2, 4), q("huge", 9, 4, 16)];
        let (placed, waiting) = schedule(queue, &mut nodes);
        let placed: Vec<_> = placed.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(placed, vec!["high"]);
        let reasons: std::collections::BTreeMap<_, _> = waiting.into_iter().collect();
        assert!(reasons["huge"].starts_with("unschedulable"), "{}", reasons["huge"]);
        assert!(reasons["big"].starts_with("waiting for resources"), "{}", reasons["big"]);
        assert_eq!(reasons["low"], QUEUED_BEHIND);
    }
}
