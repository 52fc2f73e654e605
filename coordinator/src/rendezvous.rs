//! Rendezvous rooms: one per (job, attempt). Rank processes announce their address and wait for all
//! peers (like torch's TCPStore barrier), and share small values such as NCCL unique ids per process
//! group. Rooms live in memory only: after a coordinator restart ranks simply retry their calls.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, Clone, Default)]
struct Room {
    addresses: Vec<Option<String>>,
    kv: HashMap<String, Vec<u8>>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RendezvousError {
    #[error("rank {rank} is outside world size {world_size}")]
    BadRank { rank: u32, world_size: u32 },
    #[error("world size {given} does not match the attempt's {expected}")]
    WorldMismatch { given: u32, expected: u32 },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

type RoomKey = (String, u32);

#[derive(Default)]
pub struct Rendezvous {
    rooms: Mutex<HashMap<RoomKey, watch::Sender<Room>>>,
}

impl Rendezvous {
    fn room(&self, job: &str, attempt: u32, world_size: u32) -> watch::Sender<Room> {
        let mut rooms = self.rooms.lock().unwrap();
        rooms
            .entry((job.to_string(), attempt))
            .or_insert_with(|| {
                watch::Sender::new(Room { addresses: vec![None; world_size as usize], kv: HashMap::new() })
            })
            .clone()
    }

    /// Records `address` for `rank` and waits until every rank of the attempt has joined.
    pub async fn join(
        &self,
        job: &str,
        attempt: u32,
        rank: u32,
        world_size: u32,
        address: String,
        timeout: Duration,
    ) -> Result<Vec<String>, RendezvousError> {
        if rank >= world_size {
            return Err(RendezvousError::BadRank { rank, world_size });
        }
        let room = self.room(job, attempt, world_size);
        // A room first made by `put`/`get` learns its size from the first join.
        room.send_if_modified(|r| {
            let empty = r.addresses.is_empty();
            if empty {
                r.addresses = vec![None; world_size as usize];
            }
            empty
        });
        let expected = room.borrow().addresses.len() as u32;
        if expected != world_size {
            return Err(RendezvousError::WorldMismatch { given: world_size, expected });
        }
        room.send_modify(|r| r.addresses[rank as usize] = Some(address));
        // Only the room map keeps the sender alive, so closing the room ends this wait.
        let mut rx = room.subscribe();
        drop(room);
        let outcome = tokio::time::timeout(timeout, rx.wait_for(|r| r.addresses.iter().all(Option::is_some)))
            .await
            .map(|r| r.map(|r| r.addresses.iter().map(|a| a.clone().unwrap_or_default()).collect::<Vec<_>>()));
        match outcome {
            Ok(Ok(addresses)) => Ok(addresses),
            _ => {
                let missing: Vec<usize> =
                    rx.borrow().addresses.iter().enumerate().filter(|(_, a)| a.is_none()).map(|(i, _)| i).collect();
                Err(RendezvousError::Timeout(timeout, format!("ranks {missing:?} to join")))
            }
        }
    }

    pub fn put(&self, job: &str, attempt: u32, key: String, value: Vec<u8>) {
        let room = self.room(job, attempt, 0);
        room.send_modify(|r| {
            r.kv.insert(key, value);
        });
    }

    /// Waits until `key` is set.
    pub async fn get(&self, job: &str, attempt: u32, key: &str, timeout: Duration) -> Result<Vec<u8>, RendezvousError> {
        let mut rx = self.room(job, attempt, 0).subscribe();
        let wait = rx.wait_for(|r| r.kv.contains_key(key));
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(r)) => Ok(r.kv[key].clone()),
            _ => Err(RendezvousError::Timeout(timeout, format!("key {key:?}"))),
        }
    }

    /// Forgets every room; waiting calls end with a timeout error.
    pub fn close_all(&self) {
        self.rooms.lock().unwrap().clear();
    }

    /// Forgets an attempt's room (its ranks are gone).
    pub fn close(&self, job: &str, attempt: u32) {
        self.rooms.lock().unwrap().remove(&(job.to_string(), attempt));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn join_waits_for_all_and_orders_by_rank() {
        let rv = Arc::new(Rendezvous::default());
        let mut handles = Vec::new();
        for rank in (0..3).rev() {
            let rv = rv.clone();
            handles.push(tokio::spawn(async move {
                rv.join("j", 1, rank, 3, format!("h:{rank}"), Duration::from_secs(5)).await
            }));
        }
        for h in handles {
            assert_eq!(h.await.unwrap().unwrap(), vec!["h:0", "h:1", "h:2"]);
        }
    }

    #[tokio::test]
    async fn join_times_out_naming_missing_ranks() {
        let rv = Rendezvous::default();
        let err = rv.join("j", 1, 0, 2, "a".into(), Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(err, RendezvousError::Timeout(Duration::from_millis(50), "ranks [1] to join".into()));
        assert_eq!(
            rv.join("j", 1, 5, 2, "a".into(), Duration::from_millis(5)).await.unwrap_err(),
            RendezvousError::BadRank { rank: 5, world_size: 2 }
        );
    }

    #[tokio::test]
    async fn kv_get_waits_for_put() {
        let rv = Arc::new(Rendezvous::default());
        let getter = {
            let rv = rv.clone();
            tokio::spawn(async move { rv.get("j", 2, "nccl/tp0", Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        rv.put("j", 2, "nccl/tp0".into(), vec![1, 2, 3]);
        assert_eq!(getter.await.unwrap().unwrap(), vec![1, 2, 3]);
    }
}
