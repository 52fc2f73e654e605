//! Point-to-point transports: tagged byte messages between global ranks.
//!
//! A message is `(from, tag, payload)`. Messages from one sender with one tag are delivered in the order they were
//! sent (FIFO per `(from, tag)`); messages with different tags never block each other, which lets several process
//! groups share one connection. Sends are *eager*: `send` queues the message and returns without waiting for the
//! receiver to call `recv`, so a ring step "send to next, then receive from previous" cannot deadlock.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{CommError, CommResult};

/// Message tag. The CPU communicator derives one per process group (and one for its point-to-point traffic).
pub type Tag = u64;

/// Sends and receives tagged byte messages to and from global ranks.
pub trait Transport: Send + Sync + fmt::Debug {
    /// Global rank of this endpoint.
    fn rank(&self) -> usize;
    /// Number of endpoints.
    fn world_size(&self) -> usize;
    /// Queues `payload` for global rank `to` (which may be this rank). Fails with [`CommError::PeerGone`] when the
    /// peer is known to be gone; a send that succeeds is not a proof of delivery.
    fn send(&self, to: usize, tag: Tag, payload: Vec<u8>) -> CommResult<()>;
    /// The next message from global rank `from` with `tag`, waiting at most `timeout`. `op` names the operation
    /// for error messages. Messages that arrived before the peer went away are still delivered.
    fn recv(
        &self,
        from: usize,
        tag: Tag,
        timeout: Duration,
        op: &'static str,
    ) -> CommResult<Vec<u8>>;
}

/// Incoming messages of one endpoint, keyed by `(from, tag)`, plus which peers are gone.
#[derive(Default)]
pub(crate) struct Mailbox {
    state: Mutex<MailState>,
    cv: Condvar,
}

#[derive(Default)]
struct MailState {
    queues: HashMap<(usize, Tag), VecDeque<Vec<u8>>>,
    gone: HashMap<usize, String>,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, MailState> {
        // A panic while holding this lock cannot leave the maps half-updated (each update is one insert/push),
        // so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn deliver(&self, from: usize, tag: Tag, payload: Vec<u8>) {
        self.lock()
            .queues
            .entry((from, tag))
            .or_default()
            .push_back(payload);
        self.cv.notify_all();
    }

    pub(crate) fn mark_gone(&self, peer: usize, reason: String) {
        self.lock().gone.entry(peer).or_insert(reason);
        self.cv.notify_all();
    }

    pub(crate) fn gone_reason(&self, peer: usize) -> Option<String> {
        self.lock().gone.get(&peer).cloned()
    }

    pub(crate) fn take(
        &self,
        from: usize,
        tag: Tag,
        timeout: Duration,
        op: &'static str,
    ) -> CommResult<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(q) = st.queues.get_mut(&(from, tag))
                && let Some(msg) = q.pop_front()
            {
                if q.is_empty() {
                    st.queues.remove(&(from, tag));
                }
                return Ok(msg);
            }
            if let Some(reason) = st.gone.get(&from) {
                return Err(CommError::PeerGone {
                    peer: from,
                    reason: reason.clone(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout {
                    peer: from,
                    op,
                    after: timeout,
                });
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

struct ThreadShared {
    boxes: Vec<Mailbox>,
}

/// In-process transport: one endpoint per rank, to be moved into one thread each. Dropping an endpoint marks its
/// rank gone for every other endpoint (their pending and future receives from it fail with
/// [`CommError::PeerGone`] once its already-sent messages are consumed).
pub struct ThreadTransport {
    rank: usize,
    shared: Arc<ThreadShared>,
}

impl ThreadTransport {
    /// `n` connected endpoints; endpoint `i` has rank `i`.
    pub fn group(n: usize) -> Vec<ThreadTransport> {
        let shared = Arc::new(ThreadShared {
            boxes: (0..n).map(|_| Mailbox::default()).collect(),
        });
        (0..n)
            .map(|rank| ThreadTransport {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn check_rank(&self, peer: usize) -> CommResult<()> {
        if peer >= self.shared.boxes.len() {
            return Err(CommError::InvalidArgument {
                op: "transport",
                detail: format!(
                    "rank {peer} out of range for world size {}",
                    self.shared.boxes.len()
                ),
            });
        }
        Ok(())
    }
}

impl fmt::Debug for ThreadTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadTransport")
            .field("rank", &self.rank)
            .field("world", &self.shared.boxes.len())
            .finish()
    }
}

impl Transport for ThreadTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.boxes.len()
    }

    fn send(&self, to: usize, tag: Tag, payload: Vec<u8>) -> CommResult<()> {
        self.check_rank(to)?;
        // Our own mailbox records which peers are gone.
        if let Some(reason) = self.shared.boxes[self.rank].gone_reason(to) {
            return Err(CommError::PeerGone { peer: to, reason });
        }
        self.shared.boxes[to].deliver(self.rank, tag, payload);
        Ok(())
    }

    fn recv(
        &self,
        from: usize,
        tag: Tag,
        timeout: Duration,
        op: &'static str,
    ) -> CommResult<Vec<u8>> {
        self.check_rank(from)?;
        self.shared.boxes[self.rank].take(from, tag, timeout, op)
    }
}

impl Drop for ThreadTransport {
    fn drop(&mut self) {
        for (peer, mailbox) in self.shared.boxes.iter().enumerate() {
            if peer != self.rank {
                mailbox.mark_gone(
                    self.rank,
                    "its thread transport endpoint was dropped".to_string(),
                );
            }
        }
    }
}
