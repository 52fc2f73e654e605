//! Launches without a coordinator, as torchrun, Slurm `srun` and Alibaba DLC do: `qctl launch job.yaml`
//! runs on every node, starts that node's rank processes directly, and the ranks meet through a TCP
//! store served by the launcher of node 0 (see [`crate::tcp_store`]).
//!
//! Environment (torchrun names first; DLC/PyTorchJob names as fallbacks):
//! - `NNODES` (else `WORLD_SIZE` read as the node count, DLC's convention; default 1)
//! - `NODE_RANK` (else `RANK` read as the node index; default 0)
//! - `NPROC_PER_NODE` (default: the job's ranks per node)
//! - `MASTER_ADDR` (default 127.0.0.1), `MASTER_PORT` (default 29500): where node 0 serves the store (0 = any
//!   free port, one node only: what `qctl train --local --nproc N` uses).
//!
//! Global rank = `NODE_RANK · NPROC_PER_NODE + local rank`. The launcher exits 0 when all its ranks do;
//! when one fails it stops the others (SIGTERM, then SIGKILL after 10 s) and exits 1.

use crate::launch::{self, LaunchSpec, LogMsg, RankKey};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where this launcher sits in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    pub nnodes: u32,
    pub node_rank: u32,
    pub nproc_per_node: u32,
    pub master_addr: String,
    pub master_port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchEnvError {
    #[error("environment variable {name}={value:?} is not a number")]
    NotNumber { name: String, value: String },
    #[error("{0}")]
    Inconsistent(String),
}

impl LaunchEnv {
    /// Reads the launcher environment; `default_nproc` is the job's ranks per node.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>, default_nproc: u32) -> Result<LaunchEnv, LaunchEnvError> {
        let num = |names: &[&str], default: u32| -> Result<u32, LaunchEnvError> {
            for name in names {
                if let Some(value) = get(name).filter(|v| !v.is_empty()) {
                    return value.parse().map_err(|_| LaunchEnvError::NotNumber { name: name.to_string(), value });
                }
            }
            Ok(default)
        };
        let env = LaunchEnv {
            nnodes: num(&["NNODES", "WORLD_SIZE"], 1)?,
            node_rank: num(&["NODE_RANK", "RANK"], 0)?,
            nproc_per_node: num(&["NPROC_PER_NODE"], default_nproc)?,
            master_addr: get("MASTER_ADDR").filter(|v| !v.is_empty()).unwrap_or_else(|| "127.0.0.1".into()),
            master_port: num(&["MASTER_PORT"], 29500)? as u16,
        };
        if env.nnodes == 0 || env.nproc_per_node == 0 || env.node_rank >= env.nnodes {
            return Err(LaunchEnvError::Inconsistent(format!(
                "NNODES={} NODE_RANK={} NPROC_PER_NODE={}: need NNODES ≥ 1, NPROC_PER_NODE ≥ 1 and NODE_RANK < NNODES",
                env.nnodes, env.node_rank, env.nproc_per_node
            )));
        }
        Ok(env)
    }

    pub fn world_size(&self) -> u32 {
        self.nnodes * self.nproc_per_node
    }
}

/// Runs this node's ranks of `spec_path` with `rank_command` (program + leading args); returns the exit
/// code the launcher should end with.
pub fn launch(spec_path: &Path, env: &LaunchEnv, rank_command: Vec<String>, run_dir: PathBuf) -> anyhow::Result<i32> {
    let yaml = std::fs::read_to_string(spec_path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", spec_path.display()))?;
    let spec = qjobspec::JobSpec::parse(&yaml, &spec_path.display().to_string())?;
    anyhow::ensure!(
        env.world_size() == spec.world_size(),
        "{}: the job asks for {} ranks but NNODES {} × NPROC_PER_NODE {} = {}",
        spec_path.display(),
        spec.world_size(),
        env.nnodes,
        env.nproc_per_node,
        env.world_size()
    );
    anyhow::ensure!(
        env.master_port != 0 || env.nnodes == 1,
        "MASTER_PORT 0 (any free port) works on one node only: the other nodes could not know the port"
    );
    let server = if env.node_rank == 0 {
        Some(crate::tcp_store::StoreServer::start(&format!("0.0.0.0:{}", env.master_port))
            .map_err(|e| anyhow::anyhow!("cannot serve the TCP store on port {}: {e}", env.master_port))?)
    } else {
        None
    };
    // Port 0: the store took a free port (`qctl train --local --nproc N`).
    let port = server.as_ref().map_or(env.master_port, |s| s.addr.port());
    let store_addr = format!("{}:{}", env.master_addr, port);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let (log_tx, mut log_rx) = tokio::sync::mpsc::unbounded_channel();
        let printer = tokio::spawn(async move {
            use std::io::Write;
            while let Some(msg) = log_rx.recv().await {
                match msg {
                    LogMsg::Data(_, "stderr", data) => {
                        let _ = std::io::stderr().write_all(&data);
                    }
                    LogMsg::Data(_, _, data) => {
                        let _ = std::io::stdout().write_all(&data);
                    }
                    LogMsg::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        let job_id = format!("{}-launch", spec.name);
        let mut procs = Vec::new();
        for local in 0..env.nproc_per_node {
            let rank = env.node_rank * env.nproc_per_node + local;
            let key = RankKey { job_id: job_id.clone(), attempt: 1, rank };
            let rank_dir = run_dir.join(format!("rank-{rank}"));
            let identity = crate::rank::RankEnv {
                meeting: crate::rank::Meeting::TcpStore(store_addr.clone()),
                job_id: job_id.clone(),
                attempt: 1,
                rank,
                local_rank: local,
                world_size: env.world_size(),
                node_address: if env.nnodes == 1 { "127.0.0.1".into() } else { local_address() },
                spec_path: spec_path.canonicalize().unwrap_or(spec_path.to_path_buf()),
                run_dir: rank_dir.clone(),
                resume_from: None,
            };
            let mut vars: BTreeMap<String, String> = spec.env.clone();
            vars.extend(identity.to_vars().into_iter().map(|(k, v)| (k.to_string(), v)));
            let spec = LaunchSpec { key, command: rank_command.clone(), env: vars, cwd: rank_dir };
            procs.push(launch::spawn_rank(&spec, &run_dir, log_tx.clone())?);
        }
        drop(log_tx);
        let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
        let mut waits: futures::stream::FuturesUnordered<_> =
            procs.into_iter().map(|mut p| async move { (p.pid, p.wait().await) }).collect();
        let mut code = 0;
        use futures::StreamExt;
        while let Some((pid, exit)) = waits.next().await {
            if exit.code != 0 && code == 0 {
                eprintln!("rank process {pid} exited with code {}; stopping the others", exit.code);
                code = 1;
                for other in pids.iter().filter(|p| **p != pid) {
                    tokio::spawn(launch::stop_group(*other, Duration::from_secs(10)));
                }
            }
        }
        let _ = printer.await;
        anyhow::Ok(code)
    })
}

/// This host's address as other nodes see it: the source address of a route to a public address
/// (no packet is sent), else loopback.
fn local_address() -> String {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| "127.0.0.1".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn torchrun_names_win_and_dlc_names_are_fallbacks() {
        let e = LaunchEnv::from_lookup(env(&[("NNODES", "2"), ("NODE_RANK", "1"), ("WORLD_SIZE", "9"), ("MASTER_PORT", "1234")]), 4).unwrap();
        assert_eq!((e.nnodes, e.node_rank, e.nproc_per_node, e.master_port), (2, 1, 4, 1234));
        let dlc = LaunchEnv::from_lookup(env(&[("WORLD_SIZE", "3"), ("RANK", "2"), ("MASTER_ADDR", "10.0.0.5")]), 8).unwrap();
        assert_eq!((dlc.nnodes, dlc.node_rank, dlc.master_addr.as_str(), dlc.world_size()), (3, 2, "10.0.0.5", 24));
        assert!(LaunchEnv::from_lookup(env(&[("NNODES", "2"), ("NODE_RANK", "2")]), 1).is_err());
        let e = LaunchEnv::from_lookup(env(&[("NPROC_PER_NODE", "x")]), 1).unwrap_err().to_string();
        assert!(e.contains("NPROC_PER_NODE"), "{e}");
    }
}
