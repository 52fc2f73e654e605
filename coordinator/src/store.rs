//! Durable cluster state behind one trait: an in-memory backend (tests, benchmarks), redb (the
//! embedded default, one file in `--state-dir`) and etcd ([`etcd`]: the state several coordinators share,
//! with writes fenced by the leader key).
//!
//! The coordinator keeps the authoritative state in memory and writes every changed record through
//! [`StateStore::write`]. Writes are applied in call order, so the last write of a record wins. The redb
//! backend group-commits: one writer thread drains every batch queued while the previous transaction
//! committed, so a burst of submissions costs one fsync, not one each.

use crate::domain::{JobRecord, NodeRecord};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, mpsc};
use tokio::sync::oneshot;

#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "etcd")]
pub use etcd::{EtcdConfig, EtcdStore, Fence};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {message}")]
    Database { path: PathBuf, message: String },
    #[error("state record {key} is corrupt: {source}")]
    Corrupt { key: String, source: serde_json::Error },
    #[error("the state writer has stopped")]
    WriterGone,
    #[error("etcd at {endpoints}: {message}")]
    Etcd { endpoints: String, message: String },
    #[error("not the leader any more: the etcd leader key changed hands, so this coordinator may not write")]
    Fenced,
}

/// Records changed by one mutation of the cluster state.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    pub jobs: Vec<JobRecord>,
    pub nodes: Vec<NodeRecord>,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.nodes.is_empty()
    }
}

/// Everything a coordinator needs to start again.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub jobs: Vec<JobRecord>,
    pub nodes: Vec<NodeRecord>,
}

/// Durable storage of jobs (with their attempts and events) and nodes.
pub trait StateStore: Send + Sync + 'static {
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Queues a batch; the returned receiver resolves once the batch is durable.
    fn write(&self, batch: WriteBatch) -> oneshot::Receiver<Result<(), String>>;
}

/// Keeps records in process memory; nothing survives the process.
#[derive(Default)]
pub struct MemoryStore {
    jobs: Mutex<BTreeMap<String, JobRecord>>,
    nodes: Mutex<BTreeMap<String, NodeRecord>>,
}

impl StateStore for MemoryStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            jobs: self.jobs.lock().unwrap().values().cloned().collect(),
            nodes: self.nodes.lock().unwrap().values().cloned().collect(),
        })
    }

    fn write(&self, batch: WriteBatch) -> oneshot::Receiver<Result<(), String>> {
        let mut jobs = self.jobs.lock().unwrap();
        for j in batch.jobs {
            jobs.insert(j.id.clone(), j);
        }
        let mut nodes = self.nodes.lock().unwrap();
        for n in batch.nodes {
            nodes.insert(n.name.clone(), n);
        }
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Ok(()));
        rx
    }
}

type Pending = (WriteBatch, oneshot::Sender<Result<(), String>>);

/// redb file `<state-dir>/state.redb`, written by one group-committing thread.
pub struct RedbStore {
    db: std::sync::Arc<Database>,
    path: PathBuf,
    queue: Mutex<Option<mpsc::Sender<Pending>>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for RedbStore {
    /// Lets the writer finish what is queued and release the database file, so the same state dir can
    /// be opened again as soon as this returns.
    fn drop(&mut self) {
        self.queue.lock().unwrap().take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl RedbStore {
    pub fn open(state_dir: &Path) -> Result<RedbStore, StoreError> {
        let path = state_dir.join("state.redb");
        let db_err = |e: &dyn std::fmt::Display| StoreError::Database { path: path.clone(), message: e.to_string() };
        std::fs::create_dir_all(state_dir).map_err(|e| db_err(&e))?;
        let db = Database::create(&path).map_err(|e| db_err(&e))?;
        {
            let tx = db.begin_write().map_err(|e| db_err(&e))?;
            tx.open_table(JOBS).map_err(|e| db_err(&e))?;
            tx.open_table(NODES).map_err(|e| db_err(&e))?;
            tx.commit().map_err(|e| db_err(&e))?;
        }
        let db = std::sync::Arc::new(db);
        let (tx, rx) = mpsc::channel::<Pending>();
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("qcoord-state-writer".into())
            .spawn(move || writer_loop(&writer_db, rx))
            .map_err(|e| db_err(&e))?;
        Ok(RedbStore { db, path, queue: Mutex::new(Some(tx)), writer: Some(writer) })
    }
}

fn writer_loop(db: &Database, rx: mpsc::Receiver<Pending>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while let Ok(more) = rx.try_recv() {
            group.push(more);
        }
        let result = commit_group(db, &group).map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!("state commit failed: {e}");
        }
        for (_, done) in group {
            let _ = done.send(result.clone());
        }
    }
}

fn commit_group(db: &Database, group: &[Pending]) -> Result<(), Box<dyn std::error::Error>> {
    let tx = db.begin_write()?;
    {
        let mut jobs = tx.open_table(JOBS)?;
        let mut nodes = tx.open_table(NODES)?;
        for (batch, _) in group {
            for j in &batch.jobs {
                jobs.insert(j.id.as_str(), serde_json::to_vec(j)?.as_slice())?;
            }
            for n in &batch.nodes {
                nodes.insert(n.name.as_str(), serde_json::to_vec(n)?.as_slice())?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

impl StateStore for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let db_err = |e: &dyn std::fmt::Display| StoreError::Database { path: self.path.clone(), message: e.to_string() };
        let tx = self.db.begin_read().map_err(|e| db_err(&e))?;
        let mut snap = Snapshot::default();
        let jobs = tx.open_table(JOBS).map_err(|e| db_err(&e))?;
        for row in jobs.iter().map_err(|e| db_err(&e))? {
            let (k, v) = row.map_err(|e| db_err(&e))?;
            let job = serde_json::from_slice(v.value())
                .map_err(|source| StoreError::Corrupt { key: format!("jobs/{}", k.value()), source })?;
            snap.jobs.push(job);
        }
        let nodes = tx.open_table(NODES).map_err(|e| db_err(&e))?;
        for row in nodes.iter().map_err(|e| db_err(&e))? {
            let (k, v) = row.map_err(|e| db_err(&e))?;
            let node = serde_json::from_slice(v.value())
                .map_err(|source| StoreError::Corrupt { key: format!("nodes/{}", k.value()), source })?;
            snap.nodes.push(node);
        }
        Ok(snap)
    }

    fn write(&self, batch: WriteBatch) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        let queue = self.queue.lock().unwrap();
        let refused = match queue.as_ref() {
            Some(q) => q.send((batch, tx)).err().map(|mpsc::SendError((_, tx))| tx),
            None => Some(tx),
        };
        if let Some(tx) = refused {
            let _ = tx.send(Err(StoreError::WriterGone.to_string()));
        }
        rx
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::{JobState, Progress};

    fn job(id: &str, seq: u64) -> JobRecord {
        JobRecord {
            id: id.into(),
            seq,
            name: "n".into(),
            kind: "comm-check".into(),
            priority: 0,
            max_restarts: 0,
            spec_yaml: "name: n".into(),
            world_size: 1,
            ranks_per_node: 1,
            gpus_per_node: 0,
            nodes: 1,
            tp: 1,
            state: JobState::Pending,
            message: String::new(),
            submitted_unix: 1.0,
            started_unix: 0.0,
            finished_unix: 0.0,
            attempts: vec![],
            progress: Progress::default(),
            results: Default::default(),
            latest_checkpoint: None,
            events: vec![],
        }
    }

    /// The suite every backend must pass.
    async fn store_suite(open: impl Fn() -> Box<dyn StateStore>) {
        let store = open();
        let mut a = job("a", 1);
        store.write(WriteBatch { jobs: vec![a.clone(), job("b", 2)], nodes: vec![] }).await.unwrap().unwrap();
        a.state = JobState::Running;
        a.event("started");
        let node = NodeRecord { name: "n1".into(), gpus: 8, cpu_slots: 4, gpu_names: vec![], address: "h".into() };
        store.write(WriteBatch { jobs: vec![a.clone()], nodes: vec![node.clone()] }).await.unwrap().unwrap();
        // A burst queued without waiting (one group commit): applied in call order, the last version wins.
        let mut b = job("b", 2);
        let mut pending = Vec::new();
        for i in 0..40 {
            b.message = format!("version {i}");
            let extra = job(&format!("burst-{i:02}"), 100 + i);
            pending.push(store.write(WriteBatch { jobs: vec![b.clone(), extra], nodes: vec![] }));
        }
        for p in pending {
            p.await.unwrap().unwrap();
        }
        assert_eq!(store.load().unwrap().jobs.len(), 42, "a load sees every write queued before it");
        drop(store);
        let snap = open().load().unwrap();
        let mut jobs = snap.jobs;
        jobs.sort_by_key(|j| j.seq);
        assert_eq!(jobs.len(), 42);
        assert_eq!(jobs[0], a, "last write wins and survives reopening");
        assert_eq!(jobs[1], b, "the burst's last version wins");
        assert_eq!(snap.nodes, vec![node]);
    }

    #[tokio::test]
    async fn redb_backend_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        store_suite(|| Box::new(RedbStore::open(&path).unwrap())).await;
    }

    #[tokio::test]
    async fn memory_backend_passes_the_suite() {
        let store = std::sync::Arc::new(MemoryStore::default());
        struct Shared(std::sync::Arc<MemoryStore>);
        impl StateStore for Shared {
            fn load(&self) -> Result<Snapshot, StoreError> {
                self.0.load()
            }
            fn write(&self, b: WriteBatch) -> oneshot::Receiver<Result<(), String>> {
                self.0.write(b)
            }
        }
        store_suite(|| Box::new(Shared(store.clone()))).await;
    }

    #[cfg(feature = "etcd")]
    /// etcd for tests: `QCLUSTER_TEST_ETCD` (default `127.0.0.1:2379`) under a fresh prefix, or `None` after
    /// printing why the test skips.
    pub(crate) fn test_etcd(test: &str) -> Option<EtcdConfig> {
        let endpoint = std::env::var("QCLUSTER_TEST_ETCD").unwrap_or_else(|_| "127.0.0.1:2379".into());
        let config = EtcdConfig::new(&endpoint, &format!("/qcluster-test/{test}-{}", uuid::Uuid::new_v4())).unwrap();
        let hostport = config.endpoints[0].split("://").nth(1).unwrap_or_default().trim_end_matches('/').to_string();
        let reachable = std::net::ToSocketAddrs::to_socket_addrs(&hostport)
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(1)).is_ok());
        if !reachable {
            println!("SKIPPED {test}: no etcd at {endpoint} (set QCLUSTER_TEST_ETCD, or start `etcd` on 127.0.0.1:2379)");
            return None;
        }
        Some(config)
    }

    #[cfg(feature = "etcd")]
    /// Deletes everything under the test's prefix.
    pub(crate) async fn wipe_etcd(config: &EtcdConfig) {
        let mut client = config.client().await.unwrap();
        let _ = client.delete(format!("{}/", config.prefix), Some(etcd_client::DeleteOptions::new().with_prefix())).await;
    }

    #[cfg(feature = "etcd")]
    #[tokio::test]
    async fn etcd_backend_passes_the_suite() {
        let Some(config) = test_etcd("store-suite") else { return };
        store_suite(|| Box::new(EtcdStore::connect(&config, None).unwrap())).await;
        wipe_etcd(&config).await;
    }

    #[cfg(feature = "etcd")]
    #[tokio::test]
    async fn etcd_loads_large_states_in_pages_and_splits_oversized_batches() {
        let Some(config) = test_etcd("store-large") else { return };
        let store = EtcdStore::connect(&config, None).unwrap();
        // More records than one transaction takes and than one load page returns.
        let jobs: Vec<JobRecord> = (0..(etcd::MAX_TXN_OPS as u64 * 2 + 17)).map(|i| job(&format!("j{i:04}"), i)).collect();
        store.write(WriteBatch { jobs: jobs.clone(), nodes: vec![] }).await.unwrap().unwrap();
        let mut loaded = store.load().unwrap().jobs;
        loaded.sort_by_key(|j| j.seq);
        assert_eq!(loaded, jobs);
        drop(store);
        wipe_etcd(&config).await;
    }

    #[cfg(feature = "etcd")]
    #[tokio::test]
    async fn etcd_writes_are_fenced_by_the_leader_key() {
        let Some(config) = test_etcd("store-fence") else { return };
        let mut client = config.client().await.unwrap();
        let key = config.leader_key();
        let put = client.put(key.clone(), "http://old-leader", None).await.unwrap();
        let fence = Fence { key: key.clone(), create_revision: put.header().unwrap().revision() };
        let store = EtcdStore::connect(&config, Some(fence)).unwrap();
        let fenced = store.fenced();
        store.write(WriteBatch { jobs: vec![job("a", 1)], nodes: vec![] }).await.unwrap().unwrap();
        // Another coordinator wins an election: the key is deleted (lease expiry) and created again.
        client.delete(key.clone(), None).await.unwrap();
        client.put(key.clone(), "http://new-leader", None).await.unwrap();
        let mut late = job("a", 1);
        late.state = JobState::Failed;
        let err = store.write(WriteBatch { jobs: vec![late], nodes: vec![] }).await.unwrap().unwrap_err();
        assert!(err.contains("not the leader"), "{err}");
        assert!(*fenced.borrow(), "the store signals that it was fenced");
        let err = store.write(WriteBatch { jobs: vec![job("b", 2)], nodes: vec![] }).await.unwrap().unwrap_err();
        assert!(err.contains("not the leader"), "every later write is refused too: {err}");
        let snap = EtcdStore::connect(&config, None).unwrap().load().unwrap();
        assert_eq!(snap.jobs, vec![job("a", 1)], "the deposed leader's writes never landed");
        drop(store);
        wipe_etcd(&config).await;
    }

    #[cfg(feature = "etcd")]
    #[tokio::test]
    async fn etcd_corrupt_record_is_named_and_unreachable_etcd_is_a_clear_error() {
        let Some(config) = test_etcd("store-corrupt") else { return };
        let mut client = config.client().await.unwrap();
        client.put(format!("{}job-x", config.jobs_prefix()), "{not json", None).await.unwrap();
        let err = EtcdStore::connect(&config, None).unwrap().load().unwrap_err().to_string();
        assert!(err.contains("/jobs/job-x"), "{err}");
        wipe_etcd(&config).await;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut nowhere = EtcdConfig::new(&format!("127.0.0.1:{port}"), "/q").unwrap();
        nowhere.request_timeout = std::time::Duration::from_secs(1);
        let err = EtcdStore::connect(&nowhere, None).err().expect("no etcd there").to_string();
        assert!(err.contains(&format!("etcd at http://127.0.0.1:{port}")), "{err}");
    }

    #[test]
    fn corrupt_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join("state.redb")).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(JOBS).unwrap().insert("job-x", b"{not json".as_slice()).unwrap();
            tx.open_table(NODES).unwrap();
            tx.commit().unwrap();
        }
        let err = RedbStore::open(dir.path()).unwrap().load().unwrap_err().to_string();
        assert!(err.contains("jobs/job-x"), "{err}");
    }
}
