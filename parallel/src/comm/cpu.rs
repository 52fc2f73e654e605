//! [`CpuCommunicator`]: the collective set written once over a [`Transport`] (ring reduce-scatter / all-gather /
//! all-reduce, binomial-tree broadcast, dissemination barrier, direct all-to-all-v).
//!
//! Every message starts with a 24-byte header — `kind: u8, dtype: u8, 0 × 6, seq: u64 LE, param: u64 LE` — then
//! the little-endian elements. `seq` counts this communicator's collectives (or, for point-to-point messages, the
//! messages sent from one rank to another); `param` is the collective's size argument, equal on all members
//! (e.g. the all-reduce length). The receiver checks all of them, which turns a misuse (members calling different
//! collectives or sizes) into [`CommError::Mismatch`] / [`CommError::SizeMismatch`].
//!
//! Tags: a communicator owns two tags, `tag` (collectives, low bit 0) and `tag | 1` (point-to-point). The world
//! communicator's tag is a constant; a sub-communicator's tag is a hash of (parent tag, how many `split`s the parent
//! did before, index of the group), identical on all members because `split` is called in the same order on all
//! members of the parent.

use std::fmt;
use std::net::TcpListener;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::transport::{Tag, ThreadTransport, Transport};
use super::{
    CommError, CommResult, Communicator, DType, Element, ReduceOp, TcpTransport, chunk_range,
};

/// Default time a communicator waits for any single message before failing with [`CommError::Timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

const HEADER: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    AllReduce = 1,
    AllGather = 2,
    ReduceScatter = 3,
    AllToAllV = 4,
    Broadcast = 5,
    Barrier = 6,
    Split = 7,
    P2p = 8,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::AllReduce => "all_reduce",
            Kind::AllGather => "all_gather",
            Kind::ReduceScatter => "reduce_scatter",
            Kind::AllToAllV => "all_to_all_v",
            Kind::Broadcast => "broadcast",
            Kind::Barrier => "barrier",
            Kind::Split => "split",
            Kind::P2p => "send/recv",
        }
    }

    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::AllReduce,
            2 => Kind::AllGather,
            3 => Kind::ReduceScatter,
            4 => Kind::AllToAllV,
            5 => Kind::Broadcast,
            6 => Kind::Barrier,
            7 => Kind::Split,
            8 => Kind::P2p,
            _ => return None,
        })
    }
}

/// One member's handle on a process group, over a shared [`Transport`]. Cheap to create; sub-communicators from
/// [`split`](CpuCommunicator::split) share the parent's transport.
pub struct CpuCommunicator {
    transport: Arc<dyn Transport>,
    /// Global ranks of the members, indexed by group rank.
    members: Arc<[usize]>,
    rank: usize,
    tag: Tag,
    timeout: Duration,
    seq: AtomicU64,
    splits: AtomicU64,
    send_seq: Vec<AtomicU64>,
    recv_seq: Vec<AtomicU64>,
    aborted: Mutex<Option<String>>,
}

impl fmt::Debug for CpuCommunicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuCommunicator")
            .field("rank", &self.rank)
            .field("members", &self.members)
            .field("tag", &format_args!("{:#018x}", self.tag))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// splitmix64's finaliser: a fixed, well-mixing 64-bit hash step (identical in every process and Rust version).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hash_words(words: impl IntoIterator<Item = u64>) -> u64 {
    words
        .into_iter()
        .fold(0x51_7cc1_b727_220a, |h, w| mix(h ^ w))
}

const WORLD_TAG: Tag = 0x7763_6f6d_6d5f_7700; // low bit 0

impl CpuCommunicator {
    /// The communicator of all ranks of `transport` (group rank = global rank), with [`DEFAULT_TIMEOUT`].
    pub fn world(transport: Arc<dyn Transport>) -> CpuCommunicator {
        let n = transport.world_size();
        let rank = transport.rank();
        Self::from_parts(
            transport,
            (0..n).collect::<Vec<_>>().into(),
            rank,
            WORLD_TAG,
            DEFAULT_TIMEOUT,
        )
    }

    /// `n` world communicators over an in-process [`ThreadTransport`], one per thread-rank.
    pub fn thread_group(n: usize) -> Vec<CpuCommunicator> {
        ThreadTransport::group(n)
            .into_iter()
            .map(|t| CpuCommunicator::world(Arc::new(t)))
            .collect()
    }

    /// Connects a [`TcpTransport`] (see [`TcpTransport::connect`]) and returns the world communicator, whose
    /// message timeout is `timeout` too.
    pub fn connect_tcp(
        rank: usize,
        listener: TcpListener,
        addresses: &[String],
        timeout: Duration,
    ) -> CommResult<CpuCommunicator> {
        let t = TcpTransport::connect(rank, listener, addresses, timeout)?;
        Ok(CpuCommunicator::world(Arc::new(t)).with_timeout(timeout))
    }

    /// Sets how long any single receive may wait (inherited by later `split`s).
    pub fn with_timeout(mut self, timeout: Duration) -> CpuCommunicator {
        self.timeout = timeout;
        self
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// This member's global rank.
    pub fn global_rank(&self) -> usize {
        self.members[self.rank]
    }

    fn from_parts(
        transport: Arc<dyn Transport>,
        members: Arc<[usize]>,
        rank: usize,
        tag: Tag,
        timeout: Duration,
    ) -> CpuCommunicator {
        let n = members.len();
        CpuCommunicator {
            transport,
            members,
            rank,
            tag,
            timeout,
            seq: AtomicU64::new(0),
            splits: AtomicU64::new(0),
            send_seq: (0..n).map(|_| AtomicU64::new(0)).collect(),
            recv_seq: (0..n).map(|_| AtomicU64::new(0)).collect(),
            aborted: Mutex::new(None),
        }
    }

    /// See [`Communicator::split`]; returns the concrete type.
    pub fn split(&self, groups: &[Vec<usize>]) -> CommResult<CpuCommunicator> {
        const OP: &str = "split";
        self.check_alive()?;
        let mut seen = std::collections::HashSet::new();
        let mut mine = None;
        for (gi, g) in groups.iter().enumerate() {
            if g.is_empty() {
                return Err(invalid(OP, format!("group {gi} is empty")));
            }
            for &r in g {
                if !self.members.contains(&r) {
                    return Err(invalid(
                        OP,
                        format!(
                            "rank {r} (group {gi}) is not a member of {:?}",
                            self.members
                        ),
                    ));
                }
                if !seen.insert(r) {
                    return Err(invalid(
                        OP,
                        format!("rank {r} appears in more than one group"),
                    ));
                }
                if r == self.global_rank() {
                    mine = Some(gi);
                }
            }
        }
        let Some(gi) = mine else {
            return Err(invalid(
                OP,
                format!("rank {} is in none of the groups", self.global_rank()),
            ));
        };
        let layout = hash_words(
            groups
                .iter()
                .flat_map(|g| std::iter::once(u64::MAX).chain(g.iter().map(|&r| r as u64))),
        );
        let index = self.splits.fetch_add(1, Ordering::Relaxed);
        let seq = self.next_seq();
        // Every member contributes its layout hash; all must agree.
        self.run(|| {
            let n = self.size_();
            let mut hashes = vec![0u64; n];
            hashes[self.rank] = layout;
            self.ring_all_gather(
                &mut hashes,
                &|q| q..q + 1,
                Kind::Split,
                seq,
                groups.len() as u64,
            )?;
            if let Some(q) = hashes.iter().position(|&h| h != layout) {
                return Err(CommError::Mismatch {
                    peer: self.members[q],
                    expected: format!("split layout hash {layout:#018x}"),
                    got: format!(
                        "{:#018x} (the ranks passed different groups to split)",
                        hashes[q]
                    ),
                });
            }
            Ok(())
        })?;
        let members: Arc<[usize]> = groups[gi].clone().into();
        let rank = members
            .iter()
            .position(|&r| r == self.global_rank())
            .expect("member of its group");
        let tag = hash_words([self.tag, index, gi as u64]) & !1;
        Ok(CpuCommunicator::from_parts(
            self.transport.clone(),
            members,
            rank,
            tag,
            self.timeout,
        ))
    }

    // ---- plumbing ----------------------------------------------------------------------------------------------

    fn check_alive(&self) -> CommResult<()> {
        match &*self.aborted.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(reason) => Err(CommError::Aborted(reason.clone())),
            None => Ok(()),
        }
    }

    /// Runs the communicating part of an operation; any error aborts the communicator.
    fn run<R>(&self, f: impl FnOnce() -> CommResult<R>) -> CommResult<R> {
        f().inspect_err(|e| {
            self.aborted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(|| e.to_string());
        })
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn send_msg<T: Element>(
        &self,
        to: usize,
        tag: Tag,
        kind: Kind,
        seq: u64,
        param: u64,
        data: &[T],
    ) -> CommResult<()> {
        let mut msg = vec![0u8; HEADER + data.len() * T::SIZE];
        msg[0] = kind as u8;
        msg[1] = T::DTYPE as u8;
        msg[8..16].copy_from_slice(&seq.to_le_bytes());
        msg[16..24].copy_from_slice(&param.to_le_bytes());
        for (out, &x) in msg[HEADER..].chunks_exact_mut(T::SIZE).zip(data) {
            x.write_le(out);
        }
        self.transport.send(self.members[to], tag, msg)
    }

    /// Receives the next message from group rank `from` and checks kind, dtype and sequence number.
    /// Returns `(param, message)`; the elements start at `HEADER`.
    fn recv_msg<T: Element>(
        &self,
        from: usize,
        tag: Tag,
        kind: Kind,
        seq: u64,
    ) -> CommResult<(u64, Vec<u8>)> {
        let peer = self.members[from];
        let msg = self.transport.recv(peer, tag, self.timeout, kind.name())?;
        if msg.len() < HEADER {
            return Err(CommError::Mismatch {
                peer,
                expected: format!("a {}-byte header", HEADER),
                got: format!("a {}-byte message", msg.len()),
            });
        }
        let got_kind = Kind::from_u8(msg[0]);
        let got_dtype = DType::from_u8(msg[1]);
        let got_seq = u64::from_le_bytes(msg[8..16].try_into().expect("8 bytes"));
        let param = u64::from_le_bytes(msg[16..24].try_into().expect("8 bytes"));
        if got_kind != Some(kind) || got_dtype != Some(T::DTYPE) || got_seq != seq {
            return Err(CommError::Mismatch {
                peer,
                expected: format!("{} #{seq} of {:?}", kind.name(), T::DTYPE),
                got: format!(
                    "{} #{got_seq} of {:?}",
                    got_kind.map_or("unknown kind", Kind::name),
                    got_dtype
                ),
            });
        }
        Ok((param, msg))
    }

    fn check_param(&self, kind: Kind, from: usize, ours: u64, theirs: u64) -> CommResult<()> {
        if ours != theirs {
            return Err(CommError::SizeMismatch {
                op: kind.name(),
                peer: self.members[from],
                expected: ours as usize,
                got: theirs as usize,
            });
        }
        Ok(())
    }

    fn check_len<T: Element>(
        &self,
        kind: Kind,
        from: usize,
        msg: &[u8],
        dst_len: usize,
    ) -> CommResult<()> {
        let bytes = msg.len() - HEADER;
        if bytes != dst_len * T::SIZE {
            return Err(CommError::SizeMismatch {
                op: kind.name(),
                peer: self.members[from],
                expected: dst_len,
                got: bytes / T::SIZE,
            });
        }
        Ok(())
    }

    fn decode_into<T: Element>(
        &self,
        kind: Kind,
        from: usize,
        msg: &[u8],
        dst: &mut [T],
    ) -> CommResult<()> {
        self.check_len::<T>(kind, from, msg, dst.len())?;
        for (d, b) in dst.iter_mut().zip(msg[HEADER..].chunks_exact(T::SIZE)) {
            *d = T::read_le(b);
        }
        Ok(())
    }

    fn reduce_into<T: Element>(
        &self,
        kind: Kind,
        op: ReduceOp,
        from: usize,
        msg: &[u8],
        dst: &mut [T],
    ) -> CommResult<()> {
        self.check_len::<T>(kind, from, msg, dst.len())?;
        fn apply<T: Element>(dst: &mut [T], src: &[u8], f: impl Fn(T, T) -> T) {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(T::SIZE)) {
                *d = f(T::read_le(b), *d);
            }
        }
        // One loop per operator, so that the operator is a constant inside the loop.
        let src = &msg[HEADER..];
        match op {
            ReduceOp::Sum | ReduceOp::Avg => apply(dst, src, |a, b| T::reduce(ReduceOp::Sum, a, b)),
            ReduceOp::Prod => apply(dst, src, |a, b| T::reduce(ReduceOp::Prod, a, b)),
            ReduceOp::Max => apply(dst, src, |a, b| T::reduce(ReduceOp::Max, a, b)),
            ReduceOp::Min => apply(dst, src, |a, b| T::reduce(ReduceOp::Min, a, b)),
        }
        Ok(())
    }

    fn neighbours(&self) -> (usize, usize) {
        let n = self.size_();
        ((self.rank + 1) % n, (self.rank + n - 1) % n)
    }

    fn size_(&self) -> usize {
        self.members.len()
    }

    /// Ring reduce-scatter over the balanced chunks of `buf` (module docs of `comm`): afterwards chunk `rank`
    /// holds the reduction over all members (not yet divided for `Avg`).
    fn ring_reduce_scatter<T: Element>(
        &self,
        buf: &mut [T],
        op: ReduceOp,
        kind: Kind,
        seq: u64,
        param: u64,
    ) -> CommResult<()> {
        let n = self.size_();
        let (next, prev) = self.neighbours();
        let len = buf.len();
        for s in 0..n.saturating_sub(1) {
            let send_c = (self.rank + 2 * n - s - 1) % n;
            let recv_c = (self.rank + 2 * n - s - 2) % n;
            self.send_msg(
                next,
                self.tag,
                kind,
                seq,
                param,
                &buf[chunk_range(len, n, send_c)],
            )?;
            let (theirs, msg) = self.recv_msg::<T>(prev, self.tag, kind, seq)?;
            self.check_param(kind, prev, param, theirs)?;
            self.reduce_into(kind, op, prev, &msg, &mut buf[chunk_range(len, n, recv_c)])?;
        }
        Ok(())
    }

    /// Ring all-gather: on entry chunk `part(rank)` of `buf` is this member's; on exit every chunk is filled.
    fn ring_all_gather<T: Element>(
        &self,
        buf: &mut [T],
        part: &dyn Fn(usize) -> Range<usize>,
        kind: Kind,
        seq: u64,
        param: u64,
    ) -> CommResult<()> {
        let n = self.size_();
        let (next, prev) = self.neighbours();
        for s in 0..n.saturating_sub(1) {
            let send_c = (self.rank + n - s) % n;
            let recv_c = (self.rank + 2 * n - s - 1) % n;
            self.send_msg(next, self.tag, kind, seq, param, &buf[part(send_c)])?;
            let (theirs, msg) = self.recv_msg::<T>(prev, self.tag, kind, seq)?;
            self.check_param(kind, prev, param, theirs)?;
            self.decode_into(kind, prev, &msg, &mut buf[part(recv_c)])?;
        }
        Ok(())
    }
}

fn invalid(op: &'static str, detail: String) -> CommError {
    CommError::InvalidArgument { op, detail }
}

fn offsets(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .scan(0, |acc, &c| {
            let start = *acc;
            *acc += c;
            Some(start)
        })
        .collect()
}

/// The collectives as inherent generic methods (see [`Communicator`] for their contracts); the trait impl below
/// forwards to them. Calling these on the concrete type needs no type annotations.
impl CpuCommunicator {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.members.len()
    }

    pub fn global_ranks(&self) -> &[usize] {
        &self.members
    }

    pub fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> CommResult<()> {
        self.check_alive()?;
        let n = self.size_();
        let seq = self.next_seq();
        self.run(|| {
            let len = buf.len();
            self.ring_reduce_scatter(buf, op, Kind::AllReduce, seq, len as u64)?;
            if op == ReduceOp::Avg {
                for x in &mut buf[chunk_range(len, n, self.rank)] {
                    *x = x.div_count(n);
                }
            }
            self.ring_all_gather(
                buf,
                &|q| chunk_range(len, n, q),
                Kind::AllReduce,
                seq,
                len as u64,
            )
        })
    }

    pub fn all_gather<T: Element>(&self, input: &[T], output: &mut [T]) -> CommResult<()> {
        self.check_alive()?;
        let n = self.size_();
        let m = input.len();
        if output.len() != n * m {
            return Err(invalid(
                "all_gather",
                format!(
                    "output has {} elements, expected group size {n} × input {m} = {}",
                    output.len(),
                    n * m
                ),
            ));
        }
        let seq = self.next_seq();
        self.run(|| {
            output[self.rank * m..(self.rank + 1) * m].copy_from_slice(input);
            self.ring_all_gather(
                output,
                &|q| q * m..(q + 1) * m,
                Kind::AllGather,
                seq,
                m as u64,
            )
        })
    }

    pub fn reduce_scatter<T: Element>(
        &self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> CommResult<()> {
        self.check_alive()?;
        let n = self.size_();
        let len = input.len();
        let mine = chunk_range(len, n, self.rank);
        if output.len() != mine.len() {
            return Err(invalid(
                "reduce_scatter",
                format!(
                    "output has {} elements, but chunk {} of {len} elements over {n} ranks has {}",
                    output.len(),
                    self.rank,
                    mine.len()
                ),
            ));
        }
        let seq = self.next_seq();
        self.run(|| {
            let mut scratch = input.to_vec();
            self.ring_reduce_scatter(&mut scratch, op, Kind::ReduceScatter, seq, len as u64)?;
            output.copy_from_slice(&scratch[mine]);
            if op == ReduceOp::Avg {
                for x in output.iter_mut() {
                    *x = x.div_count(n);
                }
            }
            Ok(())
        })
    }

    pub fn all_to_all_v<T: Element>(
        &self,
        input: &[T],
        send_counts: &[usize],
        output: &mut [T],
        recv_counts: &[usize],
    ) -> CommResult<()> {
        const OP: &str = "all_to_all_v";
        self.check_alive()?;
        let n = self.size_();
        let me = self.rank;
        if send_counts.len() != n || recv_counts.len() != n {
            return Err(invalid(
                OP,
                format!(
                    "{} send and {} recv counts for {n} ranks",
                    send_counts.len(),
                    recv_counts.len()
                ),
            ));
        }
        let (sent, recvd) = (
            send_counts.iter().sum::<usize>(),
            recv_counts.iter().sum::<usize>(),
        );
        if sent != input.len() || recvd != output.len() {
            return Err(invalid(
                OP,
                format!(
                    "input has {} elements, send counts sum to {sent}; output has {}, recv counts sum to {recvd}",
                    input.len(),
                    output.len()
                ),
            ));
        }
        if send_counts[me] != recv_counts[me] {
            return Err(invalid(
                OP,
                format!(
                    "rank {me} sends {} elements to itself but expects {}",
                    send_counts[me], recv_counts[me]
                ),
            ));
        }
        let (soff, roff) = (offsets(send_counts), offsets(recv_counts));
        let seq = self.next_seq();
        self.run(|| {
            for k in 1..n {
                let to = (me + k) % n;
                let part = &input[soff[to]..soff[to] + send_counts[to]];
                self.send_msg(
                    to,
                    self.tag,
                    Kind::AllToAllV,
                    seq,
                    send_counts[to] as u64,
                    part,
                )?;
            }
            output[roff[me]..roff[me] + recv_counts[me]]
                .copy_from_slice(&input[soff[me]..soff[me] + send_counts[me]]);
            for k in 1..n {
                let from = (me + n - k) % n;
                let (count, msg) = self.recv_msg::<T>(from, self.tag, Kind::AllToAllV, seq)?;
                self.check_param(Kind::AllToAllV, from, recv_counts[from] as u64, count)?;
                let dst = &mut output[roff[from]..roff[from] + recv_counts[from]];
                self.decode_into(Kind::AllToAllV, from, &msg, dst)?;
            }
            Ok(())
        })
    }

    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> CommResult<()> {
        self.check_alive()?;
        let n = self.size_();
        if root >= n {
            return Err(invalid(
                "broadcast",
                format!("root {root} out of range for group size {n}"),
            ));
        }
        let seq = self.next_seq();
        self.run(|| {
            // Binomial tree on virtual ranks v = rank - root: in round `mask`, ranks v < mask (which hold the
            // data) send to v + mask. ⌈log2 n⌉ rounds.
            let len = buf.len() as u64;
            let v = (self.rank + n - root) % n;
            let mut mask = 1;
            while mask < n {
                if v < mask {
                    if v + mask < n {
                        self.send_msg(
                            (v + mask + root) % n,
                            self.tag,
                            Kind::Broadcast,
                            seq,
                            len,
                            buf,
                        )?;
                    }
                } else if v < 2 * mask {
                    let from = (v - mask + root) % n;
                    let (theirs, msg) = self.recv_msg::<T>(from, self.tag, Kind::Broadcast, seq)?;
                    self.check_param(Kind::Broadcast, from, len, theirs)?;
                    self.decode_into(Kind::Broadcast, from, &msg, buf)?;
                }
                mask *= 2;
            }
            Ok(())
        })
    }

    pub fn send<T: Element>(&self, buf: &[T], peer: usize) -> CommResult<()> {
        self.check_alive()?;
        if peer >= self.size_() {
            return Err(invalid(
                "send",
                format!("peer {peer} out of range for group size {}", self.size_()),
            ));
        }
        let seq = self.send_seq[peer].fetch_add(1, Ordering::Relaxed);
        self.run(|| self.send_msg(peer, self.tag | 1, Kind::P2p, seq, buf.len() as u64, buf))
    }

    pub fn recv<T: Element>(&self, buf: &mut [T], peer: usize) -> CommResult<()> {
        self.check_alive()?;
        if peer >= self.size_() {
            return Err(invalid(
                "recv",
                format!("peer {peer} out of range for group size {}", self.size_()),
            ));
        }
        let seq = self.recv_seq[peer].fetch_add(1, Ordering::Relaxed);
        self.run(|| {
            let (len, msg) = self.recv_msg::<T>(peer, self.tag | 1, Kind::P2p, seq)?;
            self.check_param(Kind::P2p, peer, buf.len() as u64, len)?;
            self.decode_into(Kind::P2p, peer, &msg, buf)
        })
    }

    pub fn barrier(&self) -> CommResult<()> {
        self.check_alive()?;
        let n = self.size_();
        let seq = self.next_seq();
        self.run(|| {
            // Dissemination barrier: in round k (distance d = 2^k) signal rank + d, wait for rank - d. After
            // ⌈log2 n⌉ rounds every rank has (transitively) heard from every other, so all have entered.
            let mut d = 1;
            while d < n {
                self.send_msg::<u64>((self.rank + d) % n, self.tag, Kind::Barrier, seq, 0, &[])?;
                self.recv_msg::<u64>((self.rank + n - d) % n, self.tag, Kind::Barrier, seq)?;
                d *= 2;
            }
            Ok(())
        })
    }
}

impl<T: Element> Communicator<[T]> for CpuCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn global_ranks(&self) -> &[usize] {
        &self.members
    }

    fn all_reduce(&self, buf: &mut [T], op: ReduceOp) -> CommResult<()> {
        CpuCommunicator::all_reduce(self, buf, op)
    }

    fn all_gather(&self, input: &[T], output: &mut [T]) -> CommResult<()> {
        CpuCommunicator::all_gather(self, input, output)
    }

    fn reduce_scatter(&self, input: &[T], output: &mut [T], op: ReduceOp) -> CommResult<()> {
        CpuCommunicator::reduce_scatter(self, input, output, op)
    }

    fn all_to_all_v(
        &self,
        input: &[T],
        send_counts: &[usize],
        output: &mut [T],
        recv_counts: &[usize],
    ) -> CommResult<()> {
        CpuCommunicator::all_to_all_v(self, input, send_counts, output, recv_counts)
    }

    fn broadcast(&self, buf: &mut [T], root: usize) -> CommResult<()> {
        CpuCommunicator::broadcast(self, buf, root)
    }

    fn send(&self, buf: &[T], peer: usize) -> CommResult<()> {
        CpuCommunicator::send(self, buf, peer)
    }

    fn recv(&self, buf: &mut [T], peer: usize) -> CommResult<()> {
        CpuCommunicator::recv(self, buf, peer)
    }

    fn barrier(&self) -> CommResult<()> {
        CpuCommunicator::barrier(self)
    }

    fn split(&self, groups: &[Vec<usize>]) -> CommResult<Box<dyn Communicator<[T]>>> {
        Ok(Box::new(CpuCommunicator::split(self, groups)?))
    }
}
