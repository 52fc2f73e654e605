//! `qworker`, the node daemon, as a library: the daemon's `main.rs`, `qctl up` and the in-process test
//! cluster all call [`daemon::start`].
//!
//! Map:
//! - [`daemon`]: register, heartbeat, assignments, reports, log shipping.
//! - [`metrics`]: the Prometheus series of `--metrics-listen` (slots offered and in use, rank starts/exits).
//! - [`launch`]: rank processes (process groups, death signal, pid files, output pumps, stop).
//! - [`gpus`]: GPU discovery through the CUDA driver (0 without one).
//! - [`rank`]: the entry point that runs inside each rank process.
//! - [`serving`]: `kind: serve` and `serve_after_training` — the inference worker in a rank, endpoint reported.
//! - [`training`]: job spec → engine training config, and the rank-side training runner.
//! - [`launcher`] + [`tcp_store`]: launches without a coordinator (torchrun/Slurm/DLC style).

pub mod daemon;
pub mod gpus;
pub mod launch;
pub mod launcher;
pub mod metrics;
pub mod rank;
pub mod serving;
pub mod tcp_store;
pub mod training;

pub use daemon::{GpuSetting, WorkerConfig, WorkerHandle, start};
