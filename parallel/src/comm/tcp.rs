//! TCP transport between rank processes: a full mesh, one connection per pair of ranks.
//!
//! Setup ([`TcpTransport::connect`]): every rank has already bound a listener and published its address through
//! the caller's rendezvous (the coordinator, or a TCP store on rank 0), so all ranks know `addresses[0..world]`.
//! Rank `r` then *connects* to every rank `j < r` and *accepts* from every rank `j > r` — each pair is connected
//! exactly once. Both sides exchange a hello `(magic, rank, world)` and check that they reached the rank they
//! meant, so stale or swapped addresses fail loudly.
//!
//! Wire format of a message: `tag: u64 LE`, `len: u64 LE`, then `len` payload bytes. A reader thread per peer reads
//! frames and delivers them to the endpoint's mailbox by `(peer, tag)`; when the connection ends (peer exited,
//! crashed, or dropped its transport) the peer is marked gone and receives from it fail with
//! [`CommError::PeerGone`]. Writes have a timeout (the connect timeout), so a frozen peer whose socket buffer is
//! full cannot block a sender forever.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::transport::{Mailbox, Tag, Transport};
use super::{CommError, CommResult};

const MAGIC: u64 = u64::from_le_bytes(*b"qcomm\0v1");
/// Largest frame accepted from a peer (a corrupted length must not make us allocate without bound).
const MAX_FRAME: u64 = 1 << 40;

/// Full-mesh TCP transport. Dropping it shuts down the write side of every connection, which peers observe as
/// [`CommError::PeerGone`].
pub struct TcpTransport {
    rank: usize,
    world: usize,
    mailbox: Arc<Mailbox>,
    /// `writers[p]` is the connection to peer `p` (`None` for ourselves).
    writers: Vec<Option<Mutex<TcpStream>>>,
}

impl fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpTransport")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> CommError {
    let context = context.into();
    move |source| CommError::Io { context, source }
}

fn hello(rank: usize, world: usize) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[..8].copy_from_slice(&MAGIC.to_le_bytes());
    h[8..16].copy_from_slice(&(rank as u64).to_le_bytes());
    h[16..].copy_from_slice(&(world as u64).to_le_bytes());
    h
}

/// Reads a hello; `Ok(None)` when the magic is wrong (not one of ours).
fn read_hello(s: &mut TcpStream) -> io::Result<Option<(usize, usize)>> {
    let mut h = [0u8; 24];
    s.read_exact(&mut h)?;
    let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    if word(0) != MAGIC {
        return Ok(None);
    }
    Ok(Some((word(8) as usize, word(16) as usize)))
}

fn remaining(deadline: Instant) -> Option<Duration> {
    let now = Instant::now();
    (now < deadline).then(|| deadline - now)
}

impl TcpTransport {
    /// Connects the full mesh. `listener` is this rank's bound listener (its address is `addresses[rank]`),
    /// `addresses[r]` is rank `r`'s `host:port`. Fails with [`CommError::Connect`] if the mesh is not complete
    /// within `timeout`; the same `timeout` bounds every later write.
    pub fn connect(
        rank: usize,
        listener: TcpListener,
        addresses: &[String],
        timeout: Duration,
    ) -> CommResult<TcpTransport> {
        let world = addresses.len();
        if rank >= world {
            return Err(CommError::Connect(format!(
                "rank {rank} out of range for {world} addresses"
            )));
        }
        let deadline = Instant::now() + timeout;
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();

        let (accepted, connected) = thread::scope(|scope| {
            let acceptor = scope.spawn(|| accept_higher(rank, world, &listener, deadline));
            let connected = connect_lower(rank, world, addresses, deadline);
            let accepted = acceptor
                .join()
                .unwrap_or_else(|_| Err(CommError::Connect("acceptor panicked".into())));
            (accepted, connected)
        });
        for (peer, s) in accepted?.into_iter().chain(connected?) {
            streams[peer] = Some(s);
        }

        let mailbox = Arc::new(Mailbox::default());
        let mut writers = Vec::with_capacity(world);
        for (peer, s) in streams.into_iter().enumerate() {
            let Some(s) = s else {
                writers.push(None);
                continue;
            };
            s.set_nodelay(true)
                .map_err(io_err(format!("set_nodelay to rank {peer}")))?;
            s.set_read_timeout(None)
                .map_err(io_err(format!("set_read_timeout to rank {peer}")))?;
            s.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
                .map_err(io_err(format!("set_write_timeout to rank {peer}")))?;
            let reader = s
                .try_clone()
                .map_err(io_err(format!("clone socket to rank {peer}")))?;
            let mb = mailbox.clone();
            thread::Builder::new()
                .name(format!("qcomm-rx-{rank}-from-{peer}"))
                .spawn(move || read_loop(reader, peer, mb))
                .map_err(io_err("spawn reader thread"))?;
            writers.push(Some(Mutex::new(s)));
        }
        Ok(TcpTransport {
            rank,
            world,
            mailbox,
            writers,
        })
    }
}

/// Accepts the ranks above ours.
fn accept_higher(
    rank: usize,
    world: usize,
    listener: &TcpListener,
    deadline: Instant,
) -> CommResult<Vec<(usize, TcpStream)>> {
    let expected = world - 1 - rank;
    let mut got: Vec<(usize, TcpStream)> = Vec::with_capacity(expected);
    listener
        .set_nonblocking(true)
        .map_err(io_err("listener set_nonblocking"))?;
    while got.len() < expected {
        match listener.accept() {
            Ok((mut s, addr)) => {
                s.set_nonblocking(false)
                    .map_err(io_err("accepted socket set_nonblocking"))?;
                let Some(left) = remaining(deadline) else {
                    break;
                };
                s.set_read_timeout(Some(left))
                    .map_err(io_err("accepted socket set_read_timeout"))?;
                let (peer, peer_world) = match read_hello(&mut s) {
                    Ok(Some(h)) => h,
                    // Not one of ours (or it hung up): ignore it and keep accepting.
                    Ok(None) | Err(_) => {
                        tracing::warn!(%addr, "ignoring a connection without a valid qcomm hello");
                        continue;
                    }
                };
                if peer_world != world
                    || peer <= rank
                    || peer >= world
                    || got.iter().any(|(p, _)| *p == peer)
                {
                    return Err(CommError::Connect(format!(
                        "rank {rank} accepted a connection from {addr} claiming rank {peer} of world {peer_world}; \
                         expected one of ranks {}..{world} not yet connected, world {world}",
                        rank + 1
                    )));
                }
                s.write_all(&hello(rank, world))
                    .map_err(io_err(format!("hello to rank {peer}")))?;
                got.push((peer, s));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if remaining(deadline).is_none() {
                    break;
                }
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(CommError::Io {
                    context: "accept".into(),
                    source: e,
                });
            }
        }
    }
    if got.len() < expected {
        let missing: Vec<usize> = (rank + 1..world)
            .filter(|p| !got.iter().any(|(q, _)| q == p))
            .collect();
        return Err(CommError::Connect(format!(
            "rank {rank}: timed out waiting for ranks {missing:?} to connect"
        )));
    }
    Ok(got)
}

/// Connects to the ranks below ours, retrying until the deadline (a peer may still be starting).
fn connect_lower(
    rank: usize,
    world: usize,
    addresses: &[String],
    deadline: Instant,
) -> CommResult<Vec<(usize, TcpStream)>> {
    let mut out = Vec::with_capacity(rank);
    for (peer, address) in addresses.iter().enumerate().take(rank) {
        let addrs: Vec<SocketAddr> = address
            .to_socket_addrs()
            .map_err(|e| {
                CommError::Connect(format!("bad address {address:?} of rank {peer}: {e}"))
            })?
            .collect();
        if addrs.is_empty() {
            return Err(CommError::Connect(format!(
                "address {address:?} of rank {peer} resolves to nothing"
            )));
        }
        let mut last_err = String::from("no attempt");
        let mut stream = None;
        'retry: while let Some(left) = remaining(deadline) {
            for a in &addrs {
                match TcpStream::connect_timeout(a, left.min(Duration::from_secs(1))) {
                    Ok(s) => {
                        stream = Some(s);
                        break 'retry;
                    }
                    Err(e) => last_err = e.to_string(),
                }
            }
            thread::sleep(Duration::from_millis(10));
        }
        let Some(mut s) = stream else {
            return Err(CommError::Connect(format!(
                "rank {rank}: could not connect to rank {peer} at {address}: {last_err}"
            )));
        };
        let left = remaining(deadline).unwrap_or(Duration::from_millis(1));
        s.set_read_timeout(Some(left))
            .map_err(io_err("set_read_timeout"))?;
        s.write_all(&hello(rank, world))
            .map_err(io_err(format!("hello to rank {peer}")))?;
        match read_hello(&mut s) {
            Ok(Some((r, w))) if r == peer && w == world => out.push((peer, s)),
            Ok(Some((r, w))) => {
                return Err(CommError::Connect(format!(
                    "address {address} of rank {peer} answered as rank {r} of world {w} (expected {peer} of {world})"
                )));
            }
            Ok(None) => {
                return Err(CommError::Connect(format!(
                    "address {address} of rank {peer} is not a qcomm endpoint"
                )));
            }
            Err(e) => {
                return Err(CommError::Io {
                    context: format!("hello from rank {peer} at {address}"),
                    source: e,
                });
            }
        }
    }
    Ok(out)
}

fn read_loop(mut s: TcpStream, peer: usize, mailbox: Arc<Mailbox>) {
    let reason = loop {
        let mut header = [0u8; 16];
        if let Err(e) = s.read_exact(&mut header) {
            break if e.kind() == ErrorKind::UnexpectedEof {
                "connection closed".to_string()
            } else {
                e.to_string()
            };
        }
        let tag = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        if len > MAX_FRAME {
            break format!("received a frame of {len} bytes (corrupt stream)");
        }
        let mut payload = vec![0u8; len as usize];
        if let Err(e) = s.read_exact(&mut payload) {
            break format!("connection lost inside a frame: {e}");
        }
        mailbox.deliver(peer, tag, payload);
    };
    mailbox.mark_gone(peer, reason);
}

impl Transport for TcpTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn send(&self, to: usize, tag: Tag, payload: Vec<u8>) -> CommResult<()> {
        if to >= self.world {
            return Err(CommError::InvalidArgument {
                op: "transport",
                detail: format!("rank {to} out of range for world size {}", self.world),
            });
        }
        let Some(writer) = &self.writers[to] else {
            self.mailbox.deliver(self.rank, tag, payload);
            return Ok(());
        };
        if let Some(reason) = self.mailbox.gone_reason(to) {
            return Err(CommError::PeerGone { peer: to, reason });
        }
        let mut header = [0u8; 16];
        header[..8].copy_from_slice(&tag.to_le_bytes());
        header[8..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        let res = if payload.len() <= 64 * 1024 {
            let mut frame = Vec::with_capacity(16 + payload.len());
            frame.extend_from_slice(&header);
            frame.extend_from_slice(&payload);
            w.write_all(&frame)
        } else {
            w.write_all(&header).and_then(|()| w.write_all(&payload))
        };
        res.map_err(|e| {
            // A partial frame may have been written: the stream to this peer is unusable from now on.
            let reason = format!("write failed: {e}");
            let _ = w.shutdown(Shutdown::Both);
            self.mailbox.mark_gone(to, reason.clone());
            CommError::PeerGone { peer: to, reason }
        })
    }

    fn recv(
        &self,
        from: usize,
        tag: Tag,
        timeout: Duration,
        op: &'static str,
    ) -> CommResult<Vec<u8>> {
        if from >= self.world {
            return Err(CommError::InvalidArgument {
                op: "transport",
                detail: format!("rank {from} out of range for world size {}", self.world),
            });
        }
        self.mailbox.take(from, tag, timeout, op)
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        // Half-close: the data already written is still delivered, then peers read end-of-stream and mark us gone.
        // Our reader threads end when the peers close their side.
        for w in self.writers.iter().flatten() {
            let w = w.lock().unwrap_or_else(|e| e.into_inner());
            let _ = w.shutdown(Shutdown::Write);
        }
    }
}
