//! Launching and supervising rank processes.
//!
//! Each rank is one child process, in its own process group (so a stop reaches everything it spawned),
//! with `PR_SET_PDEATHSIG = SIGKILL` (so a worker that dies, however it dies, takes its ranks with it:
//! a worker restart leaves no orphans), and a pid file under `<work-dir>/pids/` that a restarted worker
//! uses to kill anything that still escaped. Its stdout and stderr are read line-agnostically in chunks
//! and handed to a [`LogSink`]; its exit becomes a [`RankExit`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// Identifies one rank of one attempt.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RankKey {
    pub job_id: String,
    pub attempt: u32,
    pub rank: u32,
}

/// Everything needed to start one rank process.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub key: RankKey,
    /// Program and leading arguments (the worker's own binary and `rank` by default).
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
}

/// What flows to the log shipper: output chunks (stream `stdout` or `stderr`), and flush requests
/// answered once everything sent before them has been handed on.
#[derive(Debug)]
pub enum LogMsg {
    Data(RankKey, &'static str, Vec<u8>),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Where rank output goes.
pub type LogSink = tokio::sync::mpsc::UnboundedSender<LogMsg>;

/// How a rank process ended: its exit code, or 128 + the signal that killed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankExit {
    pub code: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("rank command is empty")]
    EmptyCommand,
    #[error("cannot create {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("cannot start {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
}

/// A started rank.
pub struct RankProcess {
    pub pid: u32,
    child: Child,
    pid_file: PathBuf,
    pumps: Vec<tokio::task::JoinHandle<()>>,
}

fn pid_file(work_dir: &Path, key: &RankKey) -> PathBuf {
    work_dir.join("pids").join(format!("{}.a{}.r{}.pid", key.job_id, key.attempt, key.rank))
}

/// Starts a rank process and pumps its output into `logs`.
pub fn spawn_rank(spec: &LaunchSpec, work_dir: &Path, logs: LogSink) -> Result<RankProcess, LaunchError> {
    let (program, args) = spec.command.split_first().ok_or(LaunchError::EmptyCommand)?;
    for dir in [spec.cwd.clone(), work_dir.join("pids")] {
        std::fs::create_dir_all(&dir).map_err(|source| LaunchError::Dir { path: dir.clone(), source })?;
    }
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(inherited_env())
        .envs(&spec.env)
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    // SAFETY: the closure runs in the forked child before exec; it only calls prctl(2), which is
    // async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(|source| LaunchError::Spawn { program: program.clone(), source })?;
    let pid = child.id().unwrap_or(0);
    let pid_file = pid_file(work_dir, &spec.key);
    let _ = std::fs::write(&pid_file, pid.to_string());
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(tokio::spawn(pump(out, spec.key.clone(), "stdout", logs.clone())));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(tokio::spawn(pump(err, spec.key.clone(), "stderr", logs)));
    }
    Ok(RankProcess { pid, child, pid_file, pumps })
}

/// The parts of the worker's environment a rank inherits (nothing job-specific or secret).
fn inherited_env() -> Vec<(String, String)> {
    const KEEP: &[&str] = &["PATH", "HOME", "USER", "LANG", "TMPDIR", "LD_LIBRARY_PATH", "CUDA_HOME", "RUST_LOG", "RUST_BACKTRACE"];
    std::env::vars().filter(|(k, _)| KEEP.contains(&k.as_str()) || k.starts_with("NCCL_")).collect()
}

async fn pump(mut r: impl tokio::io::AsyncRead + Unpin, key: RankKey, stream: &'static str, logs: LogSink) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if logs.send(LogMsg::Data(key.clone(), stream, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }
    }
}

impl RankProcess {
    /// Waits for the process to end and for its output to be read to the end (at most a few seconds
    /// more: a grandchild holding the pipes open does not hold the exit report back).
    pub async fn wait(&mut self) -> RankExit {
        use std::os::unix::process::ExitStatusExt;
        let code = match self.child.wait().await {
            Ok(status) => status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            Err(_) => -1,
        };
        let _ = std::fs::remove_file(&self.pid_file);
        for pump in self.pumps.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(3), pump).await;
        }
        RankExit { code }
    }
}

/// Sends `signal` to the process group of `pid` (the rank and everything it started).
pub fn signal_group(pid: u32, signal: nix::sys::signal::Signal) {
    if pid > 1 {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), signal);
    }
}

/// SIGTERM now, SIGKILL after `grace` if the group leader is still there.
pub async fn stop_group(pid: u32, grace: Duration) {
    signal_group(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        if !process_alive(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal_group(pid, nix::sys::signal::Signal::SIGKILL);
}

/// Whether a process with this pid exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

/// Kills rank process groups left behind by an earlier worker on this work dir; returns their pids.
pub fn kill_leftovers(work_dir: &Path) -> Vec<u32> {
    let mut killed = Vec::new();
    let Ok(entries) = std::fs::read_dir(work_dir.join("pids")) else { return killed };
    for entry in entries.flatten() {
        let path = entry.path();
        let pid: Option<u32> = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok());
        if let Some(pid) = pid {
            // Only a process that is still a qcluster rank (its environment says so) is ours to kill.
            let ours = std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|b| *b == 0).any(|kv| kv.starts_with(b"QCLUSTER_JOB_ID=")))
                .unwrap_or(false);
            if ours && process_alive(pid) {
                signal_group(pid, nix::sys::signal::Signal::SIGKILL);
                killed.push(pid);
            }
        }
        let _ = std::fs::remove_file(path);
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, script: &str) -> LaunchSpec {
        LaunchSpec {
            key: RankKey { job_id: "j".into(), attempt: 1, rank: 0 },
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: [("QCLUSTER_JOB_ID".to_string(), "j".to_string())].into(),
            cwd: dir.join("run"),
        }
    }

    #[tokio::test]
    async fn output_and_exit_code_are_captured() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut p = spawn_rank(&spec(dir.path(), "echo out; echo err >&2; exit 7"), dir.path(), tx).unwrap();
        assert_eq!(p.wait().await, RankExit { code: 7 });
        let mut got: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
        while let Some(LogMsg::Data(_, stream, data)) = rx.recv().await {
            got.entry(stream).or_default().extend(data);
        }
        assert_eq!(got["stdout"], b"out\n");
        assert_eq!(got["stderr"], b"err\n");
        assert!(!pid_file(dir.path(), &spec(dir.path(), "").key).exists(), "pid file removed on exit");
    }

    #[tokio::test]
    async fn stop_group_kills_children_too_and_term_is_reported_as_signal() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        // The rank starts a grandchild that would outlive it without a group kill.
        let mut p = spawn_rank(&spec(dir.path(), "sleep 60 & echo $! > child.pid; wait"), dir.path(), tx).unwrap();
        let child_pid_file = dir.path().join("run/child.pid");
        // The shell creates the file before it writes the pid: wait for a whole number.
        let mut grandchild: Option<u32> = None;
        for _ in 0..250 {
            grandchild = std::fs::read_to_string(&child_pid_file).ok().and_then(|s| s.trim().parse().ok());
            if grandchild.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let grandchild = grandchild.expect("the rank wrote its child's pid");
        assert!(process_alive(grandchild));
        stop_group(p.pid, Duration::from_secs(2)).await;
        assert_eq!(p.wait().await, RankExit { code: 128 + 15 });
        for _ in 0..100 {
            if !process_alive(grandchild) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!process_alive(grandchild), "grandchild {grandchild} survived");
    }

    #[tokio::test]
    async fn leftovers_from_a_dead_worker_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let mut p = spawn_rank(&spec(dir.path(), "sleep 60"), dir.path(), tx).unwrap();
        // Until the child has exec'd, /proc/<pid>/environ is still this test's environment (not a rank's):
        // wait for the exec, as a real restart always comes long after it.
        for _ in 0..250 {
            let env = std::fs::read(format!("/proc/{}/environ", p.pid)).unwrap_or_default();
            if env.split(|b| *b == 0).any(|kv| kv.starts_with(b"QCLUSTER_JOB_ID=")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let killed = kill_leftovers(dir.path());
        assert_eq!(killed, vec![p.pid]);
        assert_eq!(p.wait().await.code, 128 + 9);
    }
}
