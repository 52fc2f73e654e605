//! Rank logs shipped by workers, kept as plain files under `<state-dir>/logs/<job>/`:
//! `a<attempt>-r<rank>.<stream>` (stream = stdout | stderr). Files are append-only, so a reader that
//! remembers its offset (`qctl logs -f`) sees every byte exactly once.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogFileId {
    pub attempt: u32,
    pub rank: u32,
    pub stream: String,
}

impl LogFileId {
    fn file_name(&self) -> String {
        format!("a{}-r{}.{}", self.attempt, self.rank, self.stream)
    }

    fn parse(name: &str) -> Option<LogFileId> {
        let (stem, stream) = name.rsplit_once('.')?;
        let (a, r) = stem.strip_prefix('a')?.split_once("-r")?;
        Some(LogFileId { attempt: a.parse().ok()?, rank: r.parse().ok()?, stream: stream.to_string() })
    }
}

#[derive(Debug, Clone)]
pub struct LogStore {
    root: PathBuf,
}

fn valid_stream(stream: &str) -> bool {
    stream == "stdout" || stream == "stderr"
}

impl LogStore {
    pub fn new(state_dir: &Path) -> LogStore {
        LogStore { root: state_dir.join("logs") }
    }

    fn job_dir(&self, job_id: &str) -> PathBuf {
        self.root.join(job_id)
    }

    pub fn append(&self, job_id: &str, id: &LogFileId, data: &[u8]) -> std::io::Result<()> {
        if !valid_stream(&id.stream) || job_id.contains(['/', '\\', '.']) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad log stream or job id"));
        }
        let dir = self.job_dir(job_id);
        std::fs::create_dir_all(&dir)?;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(id.file_name()))?;
        f.write_all(data)
    }

    /// The job's log files, ordered by attempt, rank, stream.
    pub fn files(&self, job_id: &str) -> Vec<LogFileId> {
        let mut out: Vec<LogFileId> = std::fs::read_dir(self.job_dir(job_id))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| LogFileId::parse(&e.file_name().to_string_lossy()))
            .filter(|id| valid_stream(&id.stream))
            .collect();
        out.sort();
        out
    }

    /// Bytes of a log file from `offset` on (at most `max` bytes).
    pub fn read_from(&self, job_id: &str, id: &LogFileId, offset: u64, max: usize) -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(self.job_dir(job_id).join(id.file_name()))?;
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = Vec::new();
        f.take(max as u64).read_to_end(&mut buf)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_list_and_read_from_offset() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::new(dir.path());
        let out = |rank| LogFileId { attempt: 1, rank, stream: "stdout".into() };
        logs.append("j1", &out(1), b"hello ").unwrap();
        logs.append("j1", &out(0), b"zero").unwrap();
        logs.append("j1", &out(1), b"world").unwrap();
        assert_eq!(logs.files("j1"), vec![out(0), out(1)]);
        assert_eq!(logs.read_from("j1", &out(1), 6, 100).unwrap(), b"world");
        assert!(logs.append("../x", &out(0), b"no").is_err());
        let bad = LogFileId { attempt: 1, rank: 0, stream: "passwd".into() };
        assert!(logs.append("j1", &bad, b"no").is_err());
    }
}
