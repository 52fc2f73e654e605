//! Durable cluster state behind one trait: an in-memory backend (tests, benchmarks) and redb (the
//! embedded default, one file in `--state-dir`).
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
mod tests {
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
        drop(store);
        let snap = open().load().unwrap();
        let mut jobs = snap.jobs;
        jobs.sort_by_key(|j| j.seq);
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0], a, "last write wins and survives reopening");
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
