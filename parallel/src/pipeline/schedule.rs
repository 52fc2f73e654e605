//! Pipeline schedules as pure functions: the per-rank list of [`Action`]s of 1F1B and interleaved 1F1B
//! (Megatron-Core's `forward_backward_pipelining_without_interleaving` / `…_with_interleaving`), and a simulator
//! ([`simulate`]) that runs the lists of all ranks against each other and checks them.
//!
//! # Notation
//!
//! `p = pp` pipeline ranks, `v = vpp` model chunks per rank, `M` micro-batches, rank `r`. Chunk `c` of rank `r` is
//! *virtual stage* `s = c·p + r` (Megatron's interleaved assignment); the model runs virtual stages `0 … p·v − 1`
//! in order, so the activation of `(r, c)` goes to `(r + 1, c)`, or to `(0, c + 1)` from the last rank, and
//! gradients go the other way ([`next_stage`], [`prev_stage`]). With `v = 1` this is plain pipelining.
//!
//! # The compute order
//!
//! A rank runs `M·v` forward passes and `M·v` backward passes. Virtual micro-batch `k` (`0 ≤ k < M·v`) maps to
//! `(mb, chunk)` through Megatron's schedule table ([`forward_item`], [`backward_item`]): micro-batches go in groups
//! of `p`, and each group runs through chunk 0, then chunk 1, …:
//! ```text
//! g = k / (p·v),  i = k mod (p·v),  mb = g·p + i mod p,  chunk_fwd = i / p,  chunk_bwd = v − 1 − i / p
//! ```
//! (identity `k ↦ (k, 0)` when `v = 1`). With `W` warm-up forwards:
//! ```text
//! warm-up   F(0) … F(W−1)
//! steady    F(W+j), B(j)           for j = 0 … M·v − W − 1       (one forward, one backward: "1F1B")
//! cool-down B(M·v − W) … B(M·v − 1)
//! ```
//! `W = min(p − r − 1, M)` for 1F1B and `W = min(2·(p − r − 1) + (v − 1)·p, M·v)` interleaved ([`warmup_forwards`]).
//! The peak number of forward passes whose backward has not run yet (activations held) is therefore
//! `min(p − r, M)` for 1F1B and `W + 1` (or `M·v` when everything is warm-up) interleaved — the first stage holds
//! the most, which is 1F1B's memory bound. Interleaving needs `M mod p = 0` (Megatron's condition for its table).
//!
//! # Send/recv pairs
//!
//! A forward of any virtual stage but the last sends its output (`SendActivation`), a backward of any stage but
//! the first sends its input gradient (`SendGrad`); each `Send*` on rank `a` is paired with exactly one `Recv*` on
//! rank `b` (same micro-batch, the neighbouring virtual stage). The transfers are placed by a lockstep run of all
//! ranks' compute orders ([`schedules`]): in each round every rank runs its next compute if its input has arrived,
//! then each output of the round is exchanged — the `Send*` is appended to the producer's list and the `Recv*` to
//! the consumer's in the *same* round (sends before receives). So both ends of every pair are posted together, a
//! receive may come several computes before the compute that consumes it (the executor keeps the tensor), and the
//! lists are deadlock-free whether sends are eager or rendezvous (Megatron's batched `isend/irecv` exchanges
//! follow the same idea). Activations (`[T, H]`, the SP shard `[T/tp, H]` with
//! sequence parallelism) flow forwards, their gradients backwards; `send` is the adjoint of `recv`, so the
//! backward of "receive `x` from the previous stage" is "send `dx` to it".
//!
//! The executor sends activations on one communicator and gradients on another, so each direction between two
//! ranks is a FIFO of one kind; [`simulate`] checks that every receiver takes, in order, exactly the items its
//! sender put in (same micro-batch and matching chunk), that every forward of a virtual stage `s > 0` comes after
//! the forward of `s − 1`, every backward after its own forward and after the backward of `s + 1`, and that the
//! lists cannot deadlock, both with *eager* sends (the CPU communicator: `send` queues and returns) and with
//! *rendezvous* transfers where each run of consecutive transfers between two computes is posted as one group
//! that completes only when all its partners are posted too (NCCL `ncclGroupStart/End`, Megatron's batched
//! `isend/irecv`).

use std::collections::{HashMap, HashSet, VecDeque};

use super::{PipelineError, Result};

/// One step of a pipeline rank. `chunk` is the rank's local model chunk (virtual stage `chunk·pp + rank`), `mb` the
/// micro-batch; `from`/`to` are pipeline ranks. A `Recv*` names the chunk that will *consume* the tensor, a `Send*`
/// the chunk that produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Receive the input activation of `Forward { mb, chunk }` from the previous virtual stage.
    RecvActivation {
        mb: usize,
        chunk: usize,
        from: usize,
    },
    /// Run the chunk's layers on the micro-batch (the first virtual stage starts from the embedding, the last one
    /// ends with the final norm, LM head and loss).
    Forward { mb: usize, chunk: usize },
    /// Send the output activation of `Forward { mb, chunk }` to the next virtual stage.
    SendActivation { mb: usize, chunk: usize, to: usize },
    /// Receive the gradient of the output of `chunk` from the next virtual stage.
    RecvGrad {
        mb: usize,
        chunk: usize,
        from: usize,
    },
    /// Back-propagate through the chunk's layers, accumulating its parameter gradients.
    Backward { mb: usize, chunk: usize },
    /// Send the gradient of the input of `chunk` to the previous virtual stage.
    SendGrad { mb: usize, chunk: usize, to: usize },
}

impl Action {
    /// `(mb, chunk)` of the action.
    pub fn item(&self) -> (usize, usize) {
        match *self {
            Action::RecvActivation { mb, chunk, .. }
            | Action::Forward { mb, chunk }
            | Action::SendActivation { mb, chunk, .. }
            | Action::RecvGrad { mb, chunk, .. }
            | Action::Backward { mb, chunk }
            | Action::SendGrad { mb, chunk, .. } => (mb, chunk),
        }
    }

    /// Is this a transfer (send or receive) rather than a compute?
    pub fn is_transfer(&self) -> bool {
        !matches!(self, Action::Forward { .. } | Action::Backward { .. })
    }
}

/// The shape of a pipeline: `pp` ranks, `vpp` chunks per rank, `num_micro` micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PipeShape {
    pub pp: usize,
    pub vpp: usize,
    pub num_micro: usize,
}

impl PipeShape {
    /// Checks the shape: every factor ≥ 1, `vpp > 1` needs `pp > 1` and `num_micro % pp == 0`.
    pub fn new(pp: usize, vpp: usize, num_micro: usize) -> Result<Self> {
        let bad = |reason: String| {
            Err(PipelineError::Schedule {
                pp,
                vpp,
                num_micro,
                reason,
            })
        };
        if pp == 0 || vpp == 0 || num_micro == 0 {
            return bad("pp, vpp and the number of micro-batches must be >= 1".into());
        }
        if vpp > 1 && pp == 1 {
            return bad("interleaving (vpp > 1) needs pp > 1".into());
        }
        if vpp > 1 && !num_micro.is_multiple_of(pp) {
            return bad(format!(
                "the interleaved schedule needs the number of micro-batches to be a multiple of pp \
                 ({num_micro} % {pp} != 0)"
            ));
        }
        Ok(PipeShape { pp, vpp, num_micro })
    }

    /// Virtual stages `pp·vpp`.
    pub fn stages(&self) -> usize {
        self.pp * self.vpp
    }

    /// Forward (and backward) passes per rank, `num_micro·vpp`.
    pub fn passes(&self) -> usize {
        self.num_micro * self.vpp
    }

    fn check_rank(&self, rank: usize) -> Result<()> {
        if rank >= self.pp {
            return Err(PipelineError::Schedule {
                pp: self.pp,
                vpp: self.vpp,
                num_micro: self.num_micro,
                reason: format!("pipeline rank {rank} out of range"),
            });
        }
        Ok(())
    }
}

/// Virtual stage of chunk `chunk` on pipeline rank `rank`: `chunk·pp + rank`.
pub fn virtual_stage(pp: usize, rank: usize, chunk: usize) -> usize {
    chunk * pp + rank
}

/// `(rank, chunk)` of the virtual stage after `(rank, chunk)`, or `None` for the last one.
pub fn next_stage(pp: usize, vpp: usize, rank: usize, chunk: usize) -> Option<(usize, usize)> {
    let s = virtual_stage(pp, rank, chunk) + 1;
    (s < pp * vpp).then_some((s % pp, s / pp))
}

/// `(rank, chunk)` of the virtual stage before `(rank, chunk)`, or `None` for the first one.
pub fn prev_stage(pp: usize, rank: usize, chunk: usize) -> Option<(usize, usize)> {
    let s = virtual_stage(pp, rank, chunk);
    (s > 0).then(|| ((s - 1) % pp, (s - 1) / pp))
}

/// `(mb, chunk)` of the `k`-th forward pass of a rank (the schedule table in the module docs).
pub fn forward_item(shape: PipeShape, k: usize) -> (usize, usize) {
    let (p, v) = (shape.pp, shape.vpp);
    if v == 1 {
        return (k, 0);
    }
    let (g, i) = (k / (p * v), k % (p * v));
    (g * p + i % p, i / p)
}

/// `(mb, chunk)` of the `k`-th backward pass of a rank: the forward table with the chunks reversed.
pub fn backward_item(shape: PipeShape, k: usize) -> (usize, usize) {
    let (mb, c) = forward_item(shape, k);
    (mb, shape.vpp - 1 - c)
}

/// Warm-up forward passes of pipeline rank `rank` (see the module docs).
pub fn warmup_forwards(shape: PipeShape, rank: usize) -> usize {
    let (p, v, m) = (shape.pp, shape.vpp, shape.num_micro);
    if v == 1 {
        (p - rank - 1).min(m)
    } else {
        (2 * (p - rank - 1) + (v - 1) * p).min(m * v)
    }
}

/// Megatron's bound on the forward passes rank `rank` holds at once: `min(pp − rank, M)` (1F1B), `W + 1` or `M·vpp`
/// (interleaved).
pub fn megatron_peak_in_flight(shape: PipeShape, rank: usize) -> usize {
    let w = warmup_forwards(shape, rank);
    if w == shape.passes() { w } else { w + 1 }
}

/// The computes of rank `rank` only, in order (warm-up, steady 1F1B, cool-down).
pub fn compute_order(shape: PipeShape, rank: usize) -> Result<Vec<Action>> {
    shape.check_rank(rank)?;
    let n = shape.passes();
    let w = warmup_forwards(shape, rank);
    let f = |k| {
        let (mb, chunk) = forward_item(shape, k);
        Action::Forward { mb, chunk }
    };
    let b = |k| {
        let (mb, chunk) = backward_item(shape, k);
        Action::Backward { mb, chunk }
    };
    let mut out = Vec::with_capacity(2 * n);
    out.extend((0..w).map(f));
    for j in 0..n - w {
        out.push(f(w + j));
        out.push(b(j));
    }
    out.extend((n - w..n).map(b));
    Ok(out)
}

/// Places the transfers around the compute orders of all ranks (`orders[r]` = rank `r`'s), by a lockstep run: in
/// each round every rank runs its next compute if its input has arrived; then every output produced in the round
/// is exchanged — the producer's `Send*` and the consumer's `Recv*` are appended to both lists (sends before
/// receives). Fails if the compute orders cannot make progress.
fn place_transfers(shape: PipeShape, orders: &[Vec<Action>]) -> Result<Vec<Vec<Action>>> {
    let (p, v) = (shape.pp, shape.vpp);
    let mut pos = vec![0usize; p];
    let mut have_act: HashSet<(usize, usize, usize)> = HashSet::new(); // (rank, mb, chunk)
    let mut have_grad: HashSet<(usize, usize, usize)> = HashSet::new();
    let mut out: Vec<Vec<Action>> = orders
        .iter()
        .map(|o| Vec::with_capacity(2 * o.len()))
        .collect();
    while (0..p).any(|r| pos[r] < orders[r].len()) {
        let mut exchanges = Vec::new(); // (sender, send, receiver, recv)
        let mut progressed = false;
        for r in 0..p {
            let Some(&a) = orders[r].get(pos[r]) else {
                continue;
            };
            let (mb, chunk) = a.item();
            let ready = match a {
                Action::Forward { .. } => {
                    prev_stage(p, r, chunk).is_none() || have_act.remove(&(r, mb, chunk))
                }
                Action::Backward { .. } => {
                    next_stage(p, v, r, chunk).is_none() || have_grad.remove(&(r, mb, chunk))
                }
                _ => true,
            };
            if !ready {
                continue;
            }
            out[r].push(a);
            pos[r] += 1;
            progressed = true;
            match a {
                Action::Forward { .. } => {
                    if let Some((to, c)) = next_stage(p, v, r, chunk) {
                        exchanges.push((
                            r,
                            Action::SendActivation { mb, chunk, to },
                            to,
                            Action::RecvActivation {
                                mb,
                                chunk: c,
                                from: r,
                            },
                        ));
                    }
                }
                Action::Backward { .. } => {
                    if let Some((to, c)) = prev_stage(p, r, chunk) {
                        exchanges.push((
                            r,
                            Action::SendGrad { mb, chunk, to },
                            to,
                            Action::RecvGrad {
                                mb,
                                chunk: c,
                                from: r,
                            },
                        ));
                    }
                }
                _ => {}
            }
        }
        if !progressed {
            let stuck: Vec<String> = (0..p)
                .filter_map(|r| orders[r].get(pos[r]).map(|a| format!("rank {r} at {a:?}")))
                .collect();
            return Err(PipelineError::Schedule {
                pp: p,
                vpp: v,
                num_micro: shape.num_micro,
                reason: format!("the compute orders cannot progress: {}", stuck.join(", ")),
            });
        }
        for &(r, send, _, _) in &exchanges {
            out[r].push(send);
        }
        for &(_, _, to, recv) in &exchanges {
            out[to].push(recv);
            let (mb, chunk) = recv.item();
            match recv {
                Action::RecvActivation { .. } => have_act.insert((to, mb, chunk)),
                _ => have_grad.insert((to, mb, chunk)),
            };
        }
    }
    Ok(out)
}

/// Every rank's list for the compute orders `order(rank)`.
fn lists_for(
    shape: PipeShape,
    order: impl Fn(usize) -> Result<Vec<Action>>,
) -> Result<Vec<Vec<Action>>> {
    let orders = (0..shape.pp).map(order).collect::<Result<Vec<_>>>()?;
    place_transfers(shape, &orders)
}

/// The training lists of every rank (1F1B when `vpp == 1`, else interleaved 1F1B), indexed by pipeline rank.
pub fn schedules(pp: usize, vpp: usize, num_micro: usize) -> Result<Vec<Vec<Action>>> {
    let shape = PipeShape::new(pp, vpp, num_micro)?;
    lists_for(shape, |r| compute_order(shape, r))
}

/// Non-interleaved 1F1B for pipeline rank `rank` of `pp`, over `num_micro` micro-batches.
pub fn one_f_one_b(pp: usize, rank: usize, num_micro: usize) -> Result<Vec<Action>> {
    let shape = PipeShape::new(pp, 1, num_micro)?;
    shape.check_rank(rank)?;
    Ok(schedules(pp, 1, num_micro)?.swap_remove(rank))
}

/// Interleaved 1F1B (`vpp` chunks per rank, Megatron's order); needs `num_micro % pp == 0`.
pub fn interleaved_1f1b(
    pp: usize,
    vpp: usize,
    rank: usize,
    num_micro: usize,
) -> Result<Vec<Action>> {
    let shape = PipeShape::new(pp, vpp, num_micro)?;
    shape.check_rank(rank)?;
    Ok(schedules(pp, vpp, num_micro)?.swap_remove(rank))
}

/// The training schedule of a layout: [`one_f_one_b`] when `vpp == 1`, else [`interleaved_1f1b`].
pub fn schedule(pp: usize, vpp: usize, rank: usize, num_micro: usize) -> Result<Vec<Action>> {
    if vpp == 1 {
        one_f_one_b(pp, rank, num_micro)
    } else {
        interleaved_1f1b(pp, vpp, rank, num_micro)
    }
}

/// Forward passes only (evaluation), in the schedule table's order, with their transfers.
pub fn forward_only(pp: usize, vpp: usize, rank: usize, num_micro: usize) -> Result<Vec<Action>> {
    let shape = PipeShape::new(pp, vpp, num_micro)?;
    shape.check_rank(rank)?;
    let lists = lists_for(shape, |_| {
        Ok((0..shape.passes())
            .map(|k| {
                let (mb, chunk) = forward_item(shape, k);
                Action::Forward { mb, chunk }
            })
            .collect())
    })?;
    Ok(lists.into_iter().nth(rank).unwrap_or_default())
}

/// Peak number of forward passes whose backward has not yet run, over a rank's list.
pub fn peak_in_flight(actions: &[Action]) -> usize {
    let (mut cur, mut peak) = (0usize, 0usize);
    for a in actions {
        match a {
            Action::Forward { .. } => {
                cur += 1;
                peak = peak.max(cur);
            }
            Action::Backward { .. } => cur = cur.saturating_sub(1),
            _ => {}
        }
    }
    peak
}

/// How transfers complete in [`simulate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferModel {
    /// A send queues its message and returns; a receive waits for the message (the CPU communicator).
    Eager,
    /// Each maximal run of consecutive transfers of a rank is posted as one group, which completes only when the
    /// partner of every transfer in it is posted (NCCL groups).
    Rendezvous,
}

/// Which FIFO a transfer uses: `(sender, receiver, is_gradient)`.
type Channel = (usize, usize, bool);

/// Runs the lists of all `pp` ranks (`lists[r]` = rank `r`'s) against each other and checks the invariants in the
/// module docs. `forward_only` lists (no backward at all) are accepted too. Returns a description of the first
/// violation.
pub fn simulate(
    shape: PipeShape,
    lists: &[Vec<Action>],
    model: TransferModel,
) -> std::result::Result<(), String> {
    let (p, v, m) = (shape.pp, shape.vpp, shape.num_micro);
    if lists.len() != p {
        return Err(format!("{} lists for pp = {p}", lists.len()));
    }
    let training = lists
        .iter()
        .any(|l| l.iter().any(|a| matches!(a, Action::Backward { .. })));
    // Static checks: each rank computes every (mb, chunk) once forward (and once backward when training), and
    // the transfers name the right peers.
    for (r, list) in lists.iter().enumerate() {
        let mut fwd = HashSet::new();
        let mut bwd = HashSet::new();
        for a in list {
            let (mb, chunk) = a.item();
            if mb >= m || chunk >= v {
                return Err(format!("rank {r}: {a:?} out of range"));
            }
            match *a {
                Action::Forward { .. } if !fwd.insert((mb, chunk)) => {
                    return Err(format!("rank {r}: {a:?} twice"));
                }
                Action::Backward { .. } if !bwd.insert((mb, chunk)) => {
                    return Err(format!("rank {r}: {a:?} twice"));
                }
                Action::RecvActivation { from, .. } | Action::SendGrad { to: from, .. }
                    if prev_stage(p, r, chunk).map(|x| x.0) != Some(from) =>
                {
                    return Err(format!("rank {r}: {a:?} does not name the previous stage"));
                }
                Action::SendActivation { to, .. } | Action::RecvGrad { from: to, .. }
                    if next_stage(p, v, r, chunk).map(|x| x.0) != Some(to) =>
                {
                    return Err(format!("rank {r}: {a:?} does not name the next stage"));
                }
                _ => {}
            }
        }
        if fwd.len() != m * v || (training && bwd.len() != m * v) {
            return Err(format!(
                "rank {r}: {} forwards and {} backwards, expected {} each",
                fwd.len(),
                bwd.len(),
                m * v
            ));
        }
    }

    // Dynamic run. `done_f`/`done_b` hold (virtual stage, mb) computed so far (global view for the dependency
    // checks); `have_act`/`have_grad` what each rank has received.
    let mut pc = vec![0usize; p];
    let mut queues: HashMap<Channel, VecDeque<(usize, usize)>> = HashMap::new();
    let mut done_f: HashSet<(usize, usize)> = HashSet::new();
    let mut done_b: HashSet<(usize, usize)> = HashSet::new();
    let mut have_act: HashSet<(usize, usize, usize)> = HashSet::new(); // (rank, mb, chunk)
    let mut have_grad: HashSet<(usize, usize, usize)> = HashSet::new();
    // Rendezvous: static pairing of the i-th send and the i-th receive of every channel, by (rank, index).
    let mut partner: HashMap<(usize, usize), (usize, usize)> = HashMap::new();
    let mut completed: HashSet<(usize, usize)> = HashSet::new();
    if model == TransferModel::Rendezvous {
        let mut sends: HashMap<Channel, VecDeque<(usize, usize)>> = HashMap::new();
        let mut recvs: HashMap<Channel, VecDeque<(usize, usize)>> = HashMap::new();
        for (r, list) in lists.iter().enumerate() {
            for (i, a) in list.iter().enumerate() {
                match *a {
                    Action::SendActivation { to, .. } => {
                        sends.entry((r, to, false)).or_default().push_back((r, i))
                    }
                    Action::SendGrad { to, .. } => {
                        sends.entry((r, to, true)).or_default().push_back((r, i))
                    }
                    Action::RecvActivation { from, .. } => {
                        recvs.entry((from, r, false)).or_default().push_back((r, i))
                    }
                    Action::RecvGrad { from, .. } => {
                        recvs.entry((from, r, true)).or_default().push_back((r, i))
                    }
                    _ => {}
                }
            }
        }
        for (ch, s) in sends {
            let r = recvs.remove(&ch).unwrap_or_default();
            if s.len() != r.len() {
                return Err(format!(
                    "channel {ch:?}: {} sends, {} receives",
                    s.len(),
                    r.len()
                ));
            }
            for (a, b) in s.into_iter().zip(r) {
                partner.insert(a, b);
                partner.insert(b, a);
            }
        }
        if let Some((ch, _)) = recvs.into_iter().find(|(_, r)| !r.is_empty()) {
            return Err(format!("channel {ch:?}: receives without sends"));
        }
    }

    // Executes action `i` of rank `r` (its transfers' partners are known to be ready). Checks dependencies.
    let mut exec = |r: usize,
                    a: Action,
                    queues: &mut HashMap<Channel, VecDeque<(usize, usize)>>|
     -> std::result::Result<bool, String> {
        let (mb, chunk) = a.item();
        let s = virtual_stage(p, r, chunk);
        match a {
            Action::Forward { .. } => {
                if s > 0 && !have_act.remove(&(r, mb, chunk)) {
                    return Err(format!("rank {r}: {a:?} before its input arrived"));
                }
                if s > 0 && !done_f.contains(&(s - 1, mb)) {
                    return Err(format!("rank {r}: {a:?} before stage {} ran it", s - 1));
                }
                done_f.insert((s, mb));
            }
            Action::Backward { .. } => {
                if !done_f.contains(&(s, mb)) {
                    return Err(format!("rank {r}: {a:?} before its forward"));
                }
                if s + 1 < p * v {
                    if !have_grad.remove(&(r, mb, chunk)) {
                        return Err(format!("rank {r}: {a:?} before its gradient arrived"));
                    }
                    if !done_b.contains(&(s + 1, mb)) {
                        return Err(format!("rank {r}: {a:?} before stage {} ran it", s + 1));
                    }
                }
                done_b.insert((s, mb));
            }
            Action::SendActivation { to, .. } => {
                if !done_f.contains(&(s, mb)) {
                    return Err(format!("rank {r}: {a:?} before its forward"));
                }
                queues
                    .entry((r, to, false))
                    .or_default()
                    .push_back((mb, chunk));
            }
            Action::SendGrad { to, .. } => {
                if !done_b.contains(&(s, mb)) {
                    return Err(format!("rank {r}: {a:?} before its backward"));
                }
                queues
                    .entry((r, to, true))
                    .or_default()
                    .push_back((mb, chunk));
            }
            Action::RecvActivation { from, .. } | Action::RecvGrad { from, .. } => {
                let grad = matches!(a, Action::RecvGrad { .. });
                let Some(got) = queues
                    .get_mut(&(from, r, grad))
                    .and_then(VecDeque::pop_front)
                else {
                    return Ok(false); // blocked
                };
                // The sender's chunk of the item: the neighbouring virtual stage.
                let want_chunk = if grad {
                    next_stage(p, v, r, chunk).map(|x| x.1)
                } else {
                    prev_stage(p, r, chunk).map(|x| x.1)
                };
                if (got.0, Some(got.1)) != (mb, want_chunk) {
                    return Err(format!(
                        "rank {r}: {a:?} received mb {} of chunk {} instead",
                        got.0, got.1
                    ));
                }
                let set = if grad { &mut have_grad } else { &mut have_act };
                set.insert((r, mb, chunk));
            }
        }
        Ok(true)
    };

    loop {
        let mut progressed = false;
        match model {
            TransferModel::Eager => {
                for r in 0..p {
                    while pc[r] < lists[r].len() {
                        if !exec(r, lists[r][pc[r]], &mut queues)? {
                            break;
                        }
                        pc[r] += 1;
                        progressed = true;
                    }
                }
            }
            TransferModel::Rendezvous => {
                // Computes run freely; a rank standing at a transfer has posted the group of consecutive
                // transfers there. A pair completes once both ends are posted (data moves then); a group once all
                // its transfers have completed.
                let group_end = |r: usize, pc: &[usize]| {
                    let l = &lists[r];
                    let mut e = pc[r];
                    while e < l.len() && l[e].is_transfer() {
                        e += 1;
                    }
                    e
                };
                for r in 0..p {
                    while pc[r] < lists[r].len() && !lists[r][pc[r]].is_transfer() {
                        exec(r, lists[r][pc[r]], &mut queues)?;
                        pc[r] += 1;
                        progressed = true;
                    }
                }
                for r in 0..p {
                    for i in pc[r]..group_end(r, &pc) {
                        let a = lists[r][i];
                        if completed.contains(&(r, i))
                            || !matches!(a, Action::SendActivation { .. } | Action::SendGrad { .. })
                        {
                            continue;
                        }
                        let &(q, j) = partner
                            .get(&(r, i))
                            .ok_or_else(|| format!("rank {r}: {a:?} has no receiver"))?;
                        if pc[q] <= j && j < group_end(q, &pc) {
                            exec(r, a, &mut queues)?;
                            if !exec(q, lists[q][j], &mut queues)? {
                                return Err(format!(
                                    "rank {q}: {:?} found no message",
                                    lists[q][j]
                                ));
                            }
                            completed.insert((r, i));
                            completed.insert((q, j));
                            progressed = true;
                        }
                    }
                }
                for r in 0..p {
                    let e = group_end(r, &pc);
                    if pc[r] < e && (pc[r]..e).all(|i| completed.contains(&(r, i))) {
                        pc[r] = e;
                        progressed = true;
                    }
                }
            }
        }
        if (0..p).all(|r| pc[r] == lists[r].len()) {
            break;
        }
        if !progressed {
            let stuck: Vec<String> = (0..p)
                .filter(|&r| pc[r] < lists[r].len())
                .map(|r| format!("rank {r} at {:?}", lists[r][pc[r]]))
                .collect();
            return Err(format!("deadlock ({model:?}): {}", stuck.join(", ")));
        }
    }
    if let Some((ch, q)) = queues.iter().find(|(_, q)| !q.is_empty()) {
        return Err(format!(
            "channel {ch:?}: {} messages never received",
            q.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lists(shape: PipeShape) -> Vec<Vec<Action>> {
        (0..shape.pp)
            .map(|r| schedule(shape.pp, shape.vpp, r, shape.num_micro).unwrap())
            .collect()
    }

    /// Every shape we care about: both transfer models, every invariant, Megatron's in-flight bound.
    #[test]
    fn schedules_are_valid_and_hold_megatrons_in_flight_count() {
        for pp in 1..=5 {
            for vpp in 1..=3 {
                for num_micro in 1..=12 {
                    let Ok(shape) = PipeShape::new(pp, vpp, num_micro) else {
                        continue;
                    };
                    let l = lists(shape);
                    for model in [TransferModel::Eager, TransferModel::Rendezvous] {
                        simulate(shape, &l, model)
                            .unwrap_or_else(|e| panic!("{shape:?} {model:?}: {e}"));
                    }
                    for (r, list) in l.iter().enumerate() {
                        let want = megatron_peak_in_flight(shape, r);
                        assert_eq!(peak_in_flight(list), want, "{shape:?} rank {r}");
                        if vpp == 1 {
                            assert_eq!(want, (pp - r).min(num_micro), "{shape:?} rank {r}");
                        }
                    }
                    let fwd: Vec<_> = (0..pp)
                        .map(|r| forward_only(pp, vpp, r, num_micro).unwrap())
                        .collect();
                    simulate(shape, &fwd, TransferModel::Eager)
                        .unwrap_or_else(|e| panic!("{shape:?} forward only: {e}"));
                }
            }
        }
    }

    /// The exact 1F1B list of a small case, written out by hand.
    #[test]
    fn one_f_one_b_pp2_m3_by_hand() {
        use Action::*;
        let r0 = one_f_one_b(2, 0, 3).unwrap();
        assert_eq!(
            r0,
            vec![
                Forward { mb: 0, chunk: 0 }, // warm-up: pp − 0 − 1 = 1
                SendActivation {
                    mb: 0,
                    chunk: 0,
                    to: 1
                },
                Forward { mb: 1, chunk: 0 },
                SendActivation {
                    mb: 1,
                    chunk: 0,
                    to: 1
                },
                RecvGrad {
                    mb: 0,
                    chunk: 0,
                    from: 1
                },
                Backward { mb: 0, chunk: 0 },
                Forward { mb: 2, chunk: 0 },
                SendActivation {
                    mb: 2,
                    chunk: 0,
                    to: 1
                },
                RecvGrad {
                    mb: 1,
                    chunk: 0,
                    from: 1
                },
                Backward { mb: 1, chunk: 0 },
                RecvGrad {
                    mb: 2,
                    chunk: 0,
                    from: 1
                }, // cool-down
                Backward { mb: 2, chunk: 0 },
            ]
        );
        let r1 = one_f_one_b(2, 1, 3).unwrap();
        let computes: Vec<_> = r1.iter().filter(|a| !a.is_transfer()).copied().collect();
        assert_eq!(
            computes,
            vec![
                Forward { mb: 0, chunk: 0 },
                Backward { mb: 0, chunk: 0 },
                Forward { mb: 1, chunk: 0 },
                Backward { mb: 1, chunk: 0 },
                Forward { mb: 2, chunk: 0 },
                Backward { mb: 2, chunk: 0 },
            ]
        );
    }

    /// Megatron's interleaved table for pp = 2, vpp = 2, M = 4: micro-batches in groups of pp through chunk 0, then
    /// chunk 1; backward with the chunks reversed; warm-up 2·(pp−r−1) + (vpp−1)·pp.
    #[test]
    fn interleaved_table_and_warmup() {
        let shape = PipeShape::new(2, 2, 4).unwrap();
        let f: Vec<_> = (0..8).map(|k| forward_item(shape, k)).collect();
        assert_eq!(
            f,
            vec![
                (0, 0),
                (1, 0),
                (0, 1),
                (1, 1),
                (2, 0),
                (3, 0),
                (2, 1),
                (3, 1)
            ]
        );
        let b: Vec<_> = (0..8).map(|k| backward_item(shape, k)).collect();
        assert_eq!(
            b,
            vec![
                (0, 1),
                (1, 1),
                (0, 0),
                (1, 0),
                (2, 1),
                (3, 1),
                (2, 0),
                (3, 0)
            ]
        );
        assert_eq!(warmup_forwards(shape, 0), 4);
        assert_eq!(warmup_forwards(shape, 1), 2);
        // The chunk hand-over: rank 1's chunk 0 (virtual stage 1) feeds rank 0's chunk 1 (virtual stage 2).
        assert_eq!(next_stage(2, 2, 1, 0), Some((0, 1)));
        assert_eq!(prev_stage(2, 0, 1), Some((1, 0)));
        assert_eq!(next_stage(2, 2, 1, 1), None);
        assert_eq!(prev_stage(2, 0, 0), None);
        let r1 = interleaved_1f1b(2, 2, 1, 4).unwrap();
        assert!(r1.contains(&Action::SendActivation {
            mb: 0,
            chunk: 0,
            to: 0
        }));
        assert!(r1.contains(&Action::RecvGrad {
            mb: 0,
            chunk: 0,
            from: 0
        }));
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        for (pp, vpp, m) in [(0, 1, 1), (2, 1, 0), (1, 2, 2), (2, 2, 3), (4, 2, 6)] {
            assert!(
                matches!(schedule(pp, vpp, 0, m), Err(PipelineError::Schedule { .. })),
                "pp {pp} vpp {vpp} M {m}"
            );
        }
        assert!(matches!(
            one_f_one_b(2, 2, 4),
            Err(PipelineError::Schedule { .. })
        ));
    }

    /// The simulator catches broken lists (so the test above can fail): a swapped pair of sends, a missing
    /// backward, a backward before its forward, and a receive order that deadlocks.
    #[test]
    fn simulator_rejects_broken_lists() {
        let shape = PipeShape::new(2, 1, 3).unwrap();
        let good = lists(shape);
        let find = |l: &[Action], want: Action| l.iter().position(|a| *a == want).unwrap();
        use Action::*;
        // Swap the first two activation receives of rank 1: it takes mb 0's message where it expects mb 1.
        let mut l = good.clone();
        let (i, j) = (
            find(
                &l[1],
                RecvActivation {
                    mb: 0,
                    chunk: 0,
                    from: 0,
                },
            ),
            find(
                &l[1],
                RecvActivation {
                    mb: 1,
                    chunk: 0,
                    from: 0,
                },
            ),
        );
        l[1].swap(i, j);
        let err = simulate(shape, &l, TransferModel::Eager).unwrap_err();
        assert!(err.contains("received mb 0"), "{err}");
        // Drop a backward.
        let mut l = good.clone();
        let i = find(&l[1], Backward { mb: 2, chunk: 0 });
        l[1].remove(i);
        assert!(simulate(shape, &l, TransferModel::Eager).is_err());
        // Last stage: backward before forward.
        let mut l = good.clone();
        let i = find(&l[1], Backward { mb: 0, chunk: 0 });
        let b0 = l[1].remove(i);
        let f0 = find(&l[1], Forward { mb: 0, chunk: 0 });
        l[1].insert(f0, b0);
        let err = simulate(shape, &l, TransferModel::Eager).unwrap_err();
        assert!(err.contains("before its forward"), "{err}");
        // Rank 0 waits for mb 0's gradient before sending mb 0's activation: deadlock.
        let mut l = good;
        let i = find(
            &l[0],
            RecvGrad {
                mb: 0,
                chunk: 0,
                from: 1,
            },
        );
        let recv = l[0].remove(i);
        l[0].insert(0, recv);
        let err = simulate(shape, &l, TransferModel::Eager).unwrap_err();
        assert!(err.contains("deadlock"), "{err}");
    }
}
