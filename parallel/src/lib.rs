//! The training engine that runs inside a rank process.
//!
//! It knows nothing of gRPC, YAML or the coordinator: callers hand it explicit values (a `ParallelDims`,
//! a `Communicator`, a `qkernels::Device`). See ARCHITECTURE.md for the module map.

pub mod comm;
pub mod comm_check;
pub mod comm_check_gpu;
pub mod context_parallel;
pub mod data;
pub mod dims;
pub mod expert_parallel;
pub mod hf;
pub mod lora;
pub mod model;
pub mod optim;
pub mod pipeline;
pub mod tensor_parallel;
pub mod train;
pub mod zero;
