//! The etcd backend of [`StateStore`]: the state of several coordinators that share one etcd (see
//! [`crate::ha`]).
//!
//! Layout under the prefix (`--etcd-prefix`, default `/qcluster`): `<prefix>/jobs/<job id>` and
//! `<prefix>/nodes/<node name>` hold one JSON record each (the same serde form as redb);
//! `<prefix>/leader` is the election key ([`crate::ha`]).
//!
//! Invariants:
//! - One thread with its own tokio runtime talks to etcd, like the redb writer thread: [`StateStore::load`]
//!   (synchronous) and [`StateStore::write`] are requests on one queue, answered in order, so a load sees
//!   every write queued before it.
//! - Group commit: every write queued while the previous transaction ran goes out together. Whole batches are
//!   packed into one etcd transaction up to [`MAX_TXN_OPS`] puts and [`MAX_TXN_BYTES`] bytes (etcd's defaults
//!   are 128 operations and 1.5 MiB per request); a record written twice in one transaction is sent once (the
//!   last version). Only a single batch larger than that is split over several transactions. Every batch of
//!   a group gets the group's result.
//! - Fencing: with a [`Fence`] every transaction carries the condition "the leader key still has the
//!   create-revision this coordinator got when it won the election". A coordinator whose lease expired (its
//!   key was deleted, or another coordinator has since created it) can therefore never overwrite the new
//!   leader's state, however late its writes arrive. The first refused write marks the store fenced: it
//!   refuses every later write and signals [`EtcdStore::fenced`], and the coordinator steps down.
//! - Reads are linearizable (etcd's default) and paged ([`LOAD_PAGE`] keys per range request), so a new leader
//!   sees every write the old leader had acknowledged, and a large state never meets gRPC's message limit.

use super::{Snapshot, StateStore, StoreError, WriteBatch};
use crate::domain::{JobRecord, NodeRecord};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// Most puts in one etcd transaction (etcd refuses more than `--max-txn-ops`, 128 by default).
pub const MAX_TXN_OPS: usize = 120;
/// Most bytes of keys and values in one transaction (etcd refuses requests over `--max-request-bytes`,
/// 1.5 MiB by default).
pub const MAX_TXN_BYTES: usize = 1 << 20;
/// Keys per range request when loading.
pub const LOAD_PAGE: i64 = 256;

/// Where the shared state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://host:2379` URLs of the etcd members.
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster's state (several clusters may share one etcd).
    pub prefix: String,
    /// Deadline of every etcd request.
    pub request_timeout: Duration,
}

impl EtcdConfig {
    /// `endpoints` as given on the command line: `http://a:2379,http://b:2379` (a bare `host:port` means
    /// `http://host:port`). The prefix loses any trailing `/`.
    pub fn new(endpoints: &str, prefix: &str) -> Result<EtcdConfig, StoreError> {
        let endpoints: Vec<String> = endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| if e.contains("://") { e.to_string() } else { format!("http://{e}") })
            .collect();
        if endpoints.is_empty() {
            return Err(StoreError::Etcd { endpoints: String::new(), message: "no etcd endpoint given".into() });
        }
        let prefix = prefix.trim_end_matches('/').to_string();
        Ok(EtcdConfig { endpoints, prefix, request_timeout: Duration::from_secs(5) })
    }

    pub fn jobs_prefix(&self) -> String {
        format!("{}/jobs/", self.prefix)
    }

    pub fn nodes_prefix(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    /// The election key (its value is the leader's URL).
    pub fn leader_key(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    fn describe(&self) -> String {
        self.endpoints.join(",")
    }

    /// A client for these endpoints (connects lazily; see [`EtcdConfig::check`]).
    pub async fn client(&self) -> Result<Client, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(self.request_timeout.min(Duration::from_secs(3)))
            .with_timeout(self.request_timeout)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        Client::connect(&self.endpoints, Some(options)).await.map_err(|e| self.error(e))
    }

    /// Fails with a clear error unless etcd answers.
    pub async fn check(&self, client: &mut Client) -> Result<(), StoreError> {
        let probe = GetOptions::new().with_count_only();
        client.get(self.leader_key(), Some(probe)).await.map(|_| ()).map_err(|e| self.error(e))
    }

    pub(crate) fn error(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Etcd { endpoints: self.describe(), message: e.to_string() }
    }
}

/// The condition on every write of a leader: `create_revision(key) == create_revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub create_revision: i64,
}

enum Request {
    Load(std::sync::mpsc::SyncSender<Result<Snapshot, StoreError>>),
    Write(WriteBatch, oneshot::Sender<Result<(), String>>),
}

/// State in etcd (see the module docs).
pub struct EtcdStore {
    queue: Mutex<Option<mpsc::UnboundedSender<Request>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    fenced: watch::Receiver<bool>,
}

impl Drop for EtcdStore {
    /// Lets the thread finish what is queued, then ends it.
    fn drop(&mut self) {
        self.queue.lock().unwrap().take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl EtcdStore {
    /// Connects (failing when etcd does not answer within the request timeout) and starts the store thread.
    /// May be called from inside a tokio runtime: the work happens on the store's own thread.
    pub fn connect(config: &EtcdConfig, fence: Option<Fence>) -> Result<EtcdStore, StoreError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), StoreError>>(1);
        let (queue_tx, queue_rx) = mpsc::unbounded_channel();
        let (fenced_tx, fenced_rx) = watch::channel(false);
        let config = config.clone();
        let err_config = config.clone();
        let thread = std::thread::Builder::new()
            .name("qcoord-etcd".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(config.error(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let mut client = match config.client().await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    if let Err(e) = config.check(&mut client).await {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                    let _ = ready_tx.send(Ok(()));
                    let mut worker = Worker { client, config, fence, fenced: fenced_tx };
                    worker.serve(queue_rx).await;
                });
            })
            .map_err(|e| err_config.error(e))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(EtcdStore { queue: Mutex::new(Some(queue_tx)), thread: Some(thread), fenced: fenced_rx }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(err_config.error("the etcd store thread ended while connecting"))
            }
        }
    }

    /// Becomes `true` once a write was refused because this coordinator no longer holds the leader key.
    pub fn fenced(&self) -> watch::Receiver<bool> {
        self.fenced.clone()
    }

    fn send(&self, request: Request) -> Result<(), Request> {
        match self.queue.lock().unwrap().as_ref() {
            Some(q) => q.send(request).map_err(|mpsc::error::SendError(r)| r),
            None => Err(request),
        }
    }
}

impl StateStore for EtcdStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.send(Request::Load(tx)).map_err(|_| StoreError::WriterGone)?;
        rx.recv().map_err(|_| StoreError::WriterGone)?
    }

    fn write(&self, batch: WriteBatch) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        if let Err(Request::Write(_, tx)) = self.send(Request::Write(batch, tx)) {
            let _ = tx.send(Err(StoreError::WriterGone.to_string()));
        }
        rx
    }
}

/// The store thread's side.
struct Worker {
    client: Client,
    config: EtcdConfig,
    fence: Option<Fence>,
    fenced: watch::Sender<bool>,
}

type Pending = (WriteBatch, oneshot::Sender<Result<(), String>>);

impl Worker {
    async fn serve(&mut self, mut rx: mpsc::UnboundedReceiver<Request>) {
        while let Some(first) = rx.recv().await {
            let mut requests = vec![first];
            while let Ok(more) = rx.try_recv() {
                requests.push(more);
            }
            let mut group: Vec<Pending> = Vec::new();
            for request in requests {
                match request {
                    Request::Write(batch, done) => group.push((batch, done)),
                    Request::Load(reply) => {
                        self.commit(std::mem::take(&mut group)).await;
                        let _ = reply.send(self.load().await);
                    }
                }
            }
            self.commit(group).await;
        }
    }

    async fn commit(&mut self, group: Vec<Pending>) {
        if group.is_empty() {
            return;
        }
        let batches: Vec<&WriteBatch> = group.iter().map(|(b, _)| b).collect();
        let result = match txn_plan(&self.config, &batches) {
            Ok(plan) => self.run_plan(plan).await,
            Err(e) => Err(e),
        };
        let result = result.map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!("state commit to etcd failed: {e}");
        }
        for (_, done) in group {
            let _ = done.send(result.clone());
        }
    }

    async fn run_plan(&mut self, plan: Vec<BTreeMap<String, Vec<u8>>>) -> Result<(), StoreError> {
        for puts in plan {
            if *self.fenced.borrow() {
                return Err(StoreError::Fenced);
            }
            let ops: Vec<TxnOp> = puts.into_iter().map(|(k, v)| TxnOp::put(k, v, None)).collect();
            let mut txn = Txn::new();
            if let Some(f) = &self.fence {
                txn = txn.when(vec![Compare::create_revision(f.key.clone(), CompareOp::Equal, f.create_revision)]);
            }
            let resp = self.client.txn(txn.and_then(ops)).await.map_err(|e| self.config.error(e))?;
            if !resp.succeeded() {
                let _ = self.fenced.send(true);
                return Err(StoreError::Fenced);
            }
        }
        Ok(())
    }

    async fn load(&mut self) -> Result<Snapshot, StoreError> {
        let mut snap = Snapshot::default();
        for (key, value) in self.range(&self.config.jobs_prefix()).await? {
            let job: JobRecord = serde_json::from_slice(&value).map_err(|source| StoreError::Corrupt { key, source })?;
            snap.jobs.push(job);
        }
        for (key, value) in self.range(&self.config.nodes_prefix()).await? {
            let node: NodeRecord = serde_json::from_slice(&value).map_err(|source| StoreError::Corrupt { key, source })?;
            snap.nodes.push(node);
        }
        Ok(snap)
    }

    /// Every key under `prefix`, in key order, [`LOAD_PAGE`] at a time.
    async fn range(&mut self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut out = Vec::new();
        loop {
            let options = GetOptions::new().with_range(end.clone()).with_limit(LOAD_PAGE);
            let resp = self.client.get(from.clone(), Some(options)).await.map_err(|e| self.config.error(e))?;
            for kv in resp.kvs() {
                out.push((String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec()));
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key (etcd's convention for "to the end")
}

/// Splits a group of batches into transactions (see the module docs): whole batches while they fit, a
/// batch that alone exceeds the limits over several transactions. Each transaction maps key → last value.
fn txn_plan(config: &EtcdConfig, batches: &[&WriteBatch]) -> Result<Vec<BTreeMap<String, Vec<u8>>>, StoreError> {
    let encode = |key: String, value: Result<Vec<u8>, serde_json::Error>| {
        value.map(|v| (key.clone(), v)).map_err(|source| StoreError::Corrupt { key, source })
    };
    let mut plan: Vec<BTreeMap<String, Vec<u8>>> = Vec::new();
    let mut txn: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut txn_bytes = 0usize;
    let size = |k: &String, v: &Vec<u8>| k.len() + v.len();
    for batch in batches {
        let mut records = Vec::with_capacity(batch.jobs.len() + batch.nodes.len());
        for j in &batch.jobs {
            records.push(encode(format!("{}{}", config.jobs_prefix(), j.id), serde_json::to_vec(j))?);
        }
        for n in &batch.nodes {
            records.push(encode(format!("{}{}", config.nodes_prefix(), n.name), serde_json::to_vec(n))?);
        }
        let batch_bytes: usize = records.iter().map(|(k, v)| size(k, v)).sum();
        let fits = txn.len() + records.len() <= MAX_TXN_OPS && txn_bytes + batch_bytes <= MAX_TXN_BYTES;
        if !fits && !txn.is_empty() {
            plan.push(std::mem::take(&mut txn));
            txn_bytes = 0;
        }
        for (k, v) in records {
            if !txn.is_empty() && (txn.len() >= MAX_TXN_OPS || txn_bytes + size(&k, &v) > MAX_TXN_BYTES) {
                plan.push(std::mem::take(&mut txn));
                txn_bytes = 0;
            }
            txn_bytes += size(&k, &v);
            if let Some(old) = txn.insert(k.clone(), v) {
                txn_bytes -= k.len() + old.len();
            }
        }
    }
    if !txn.is_empty() {
        plan.push(txn);
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/q/jobs/"), b"/q/jobs0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn endpoints_and_prefix_are_normalised() {
        let c = EtcdConfig::new(" 127.0.0.1:2379, https://e2:2379 ", "/qc/").unwrap();
        assert_eq!(c.endpoints, ["http://127.0.0.1:2379", "https://e2:2379"]);
        assert_eq!(c.jobs_prefix(), "/qc/jobs/");
        assert_eq!(c.leader_key(), "/qc/leader");
        assert!(EtcdConfig::new(" ,", "/q").is_err());
    }

    #[test]
    fn plan_packs_whole_batches_and_splits_only_oversized_ones() {
        use crate::domain::NodeRecord;
        let config = EtcdConfig::new("e:1", "/p").unwrap();
        let node = |i: usize| NodeRecord { name: format!("n{i}"), gpus: 0, cpu_slots: 1, gpu_names: vec![], address: "a".into() };
        let batch = |range: std::ops::Range<usize>| WriteBatch { jobs: vec![], nodes: range.map(node).collect() };
        // Two small batches writing n1 twice: one transaction, n1 once (the later version).
        let mut later = batch(1..2);
        later.nodes[0].cpu_slots = 9;
        let (a, b) = (batch(0..2), later);
        let plan = txn_plan(&config, &[&a, &b]).unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].len(), 2);
        assert!(String::from_utf8_lossy(&plan[0]["/p/nodes/n1"]).contains("\"cpu_slots\":9"));
        // A batch that cannot join the open transaction starts the next one; an oversized one is split.
        let (small, big) = (batch(0..100), batch(100..100 + 2 * MAX_TXN_OPS + 5));
        let plan = txn_plan(&config, &[&small, &big]).unwrap();
        assert_eq!(plan.iter().map(|t| t.len()).collect::<Vec<_>>(), [100, MAX_TXN_OPS, MAX_TXN_OPS, 5]);
    }
}
