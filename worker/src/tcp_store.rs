//! A small key-value store over TCP for launches without a coordinator (torchrun-style launchers,
//! Slurm `srun`, Alibaba DLC's `MASTER_ADDR`/`MASTER_PORT`), in the role torch's TCPStore plays: the
//! launcher on node 0 serves it; every rank sets its own address and waits for its peers'.
//!
//! Wire format, one request per message on a persistent connection, integers little-endian:
//! `op:u8 | key_len:u32 | key | value_len:u32 | value` where op 1 = SET (answer: `1`) and op 2 = GET with
//! `value` = the wait timeout in milliseconds as u64 (answer: `1 | len:u32 | value`, or `0` on timeout).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const SET: u8 = 1;
const GET: u8 = 2;
const MAX_FIELD: u32 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("TCP store at {addr}: {source}")]
    Io { addr: String, source: std::io::Error },
    #[error("TCP store at {addr}: timed out after {after:?} waiting for key {key:?}")]
    Timeout { addr: String, key: String, after: Duration },
}

#[derive(Default)]
struct Table {
    values: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

/// The serving side; lives as long as the launcher that started it.
pub struct StoreServer {
    pub addr: std::net::SocketAddr,
}

impl StoreServer {
    /// Binds `addr` and serves in background threads.
    pub fn start(addr: &str) -> std::io::Result<StoreServer> {
        let listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        let table = Arc::new(Table::default());
        std::thread::Builder::new().name("qcluster-tcp-store".into()).spawn(move || {
            for conn in listener.incoming().flatten() {
                let table = table.clone();
                let _ = std::thread::Builder::new().name("qcluster-tcp-store-conn".into()).spawn(move || serve(conn, &table));
            }
        })?;
        Ok(StoreServer { addr: local })
    }
}

fn read_field(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_FIELD {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "field too large"));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

fn write_field(w: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    w.write_all(&(data.len() as u32).to_le_bytes())?;
    w.write_all(data)
}

fn serve(mut conn: TcpStream, table: &Table) {
    let _ = conn.set_nodelay(true);
    loop {
        let mut op = [0u8; 1];
        if conn.read_exact(&mut op).is_err() {
            return;
        }
        let (Ok(key), Ok(value)) = (read_field(&mut conn), read_field(&mut conn)) else { return };
        let key = String::from_utf8_lossy(&key).into_owned();
        let reply = match op[0] {
            SET => {
                table.values.lock().unwrap().insert(key, value);
                table.changed.notify_all();
                vec![1u8]
            }
            GET => {
                let wait_ms = value.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap())).unwrap_or(0);
                let deadline = Instant::now() + Duration::from_millis(wait_ms);
                let mut values = table.values.lock().unwrap();
                loop {
                    if let Some(v) = values.get(&key) {
                        let mut reply = vec![1u8];
                        reply.extend((v.len() as u32).to_le_bytes());
                        reply.extend(v);
                        break reply;
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        break vec![0u8];
                    }
                    values = table.changed.wait_timeout(values, deadline - now).unwrap().0;
                }
            }
            _ => return,
        };
        if conn.write_all(&reply).is_err() {
            return;
        }
    }
}

/// A rank's connection to the store.
pub struct StoreClient {
    addr: String,
    conn: TcpStream,
}

impl StoreClient {
    /// Connects, retrying until `timeout` (the store may start after the ranks).
    pub fn connect(addr: &str, timeout: Duration) -> Result<StoreClient, StoreError> {
        let start = Instant::now();
        loop {
            match TcpStream::connect(addr) {
                Ok(conn) => {
                    let _ = conn.set_nodelay(true);
                    return Ok(StoreClient { addr: addr.to_string(), conn });
                }
                Err(source) if start.elapsed() >= timeout => return Err(StoreError::Io { addr: addr.to_string(), source }),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io { addr: self.addr.clone(), source }
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut msg = vec![SET];
        write_field(&mut msg, key.as_bytes()).map_err(|e| self.io(e))?;
        write_field(&mut msg, value).map_err(|e| self.io(e))?;
        self.conn.write_all(&msg).map_err(|e| self.io(e))?;
        let mut ack = [0u8; 1];
        self.conn.read_exact(&mut ack).map_err(|e| self.io(e))
    }

    /// Waits up to `timeout` for `key`.
    pub fn get(&mut self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        let mut msg = vec![GET];
        write_field(&mut msg, key.as_bytes()).map_err(|e| self.io(e))?;
        write_field(&mut msg, &(timeout.as_millis() as u64).to_le_bytes()).map_err(|e| self.io(e))?;
        self.conn.write_all(&msg).map_err(|e| self.io(e))?;
        let mut found = [0u8; 1];
        self.conn.read_exact(&mut found).map_err(|e| self.io(e))?;
        if found[0] == 0 {
            return Err(StoreError::Timeout { addr: self.addr.clone(), key: key.to_string(), after: timeout });
        }
        read_field(&mut self.conn).map_err(|e| self.io(e))
    }

    /// The rendezvous: publishes this rank's address, returns every rank's (index = rank).
    pub fn join(&mut self, prefix: &str, rank: u32, world: u32, address: &str, timeout: Duration) -> Result<Vec<String>, StoreError> {
        self.set(&format!("{prefix}/addr/{rank}"), address.as_bytes())?;
        (0..world)
            .map(|r| self.get(&format!("{prefix}/addr/{r}"), timeout).map(|v| String::from_utf8_lossy(&v).into_owned()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_meet_through_the_store() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr.to_string();
        let handles: Vec<_> = (0..4u32)
            .map(|rank| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c = StoreClient::connect(&addr, Duration::from_secs(5)).unwrap();
                    c.join("job", rank, 4, &format!("host:{rank}"), Duration::from_secs(5)).unwrap()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), vec!["host:0", "host:1", "host:2", "host:3"]);
        }
    }

    #[test]
    fn missing_key_times_out_with_its_name() {
        let server = StoreServer::start("127.0.0.1:0").unwrap();
        let mut c = StoreClient::connect(&server.addr.to_string(), Duration::from_secs(5)).unwrap();
        let err = c.get("nobody/addr/3", Duration::from_millis(50)).unwrap_err().to_string();
        assert!(err.contains("nobody/addr/3"), "{err}");
        c.set("k", b"v").unwrap();
        assert_eq!(c.get("k", Duration::from_millis(50)).unwrap(), b"v");
    }
}
