//! Pipeline parallelism (PP): 1F1B and interleaved 1F1B (`vpp > 1`), composed with the tensor/sequence parallel
//! blocks of [`crate::tensor_parallel`] inside each stage and with data parallelism across pipeline replicas.
//!
//! # Partition ([`StageLayout`])
//!
//! `L` decoder layers are cut into `pp·vpp` contiguous *virtual stages* of `L/(pp·vpp)` layers. Pipeline rank `r`
//! holds `vpp` model chunks; chunk `c` is virtual stage `s = c·pp + r` (Megatron's interleaved assignment), so an
//! activation visits ranks `0, 1, …, pp−1, 0, 1, …` — `vpp` times round the ring. The first virtual stage (rank 0,
//! chunk 0) also owns the word embedding; the last one (rank `pp−1`, chunk `vpp−1`) the final norm, the LM head and
//! the loss. Inside a stage every tensor is TP-sharded exactly as [`TpModel`](crate::tensor_parallel::TpModel)
//! shards it, and every layer runs through the same TP/SP forward and backward (the same conjugate pairs).
//!
//! **Tied embeddings** (Megatron's embedding group). With `tie_word_embeddings` the LM head *is* the embedding
//! `E [V, H]` (vocab-sharded `E_i [V/tp, H]` under TP). With `pp > 1` the first and last stages each hold a replica
//! of `E_i` (same HF name, `model.embed_tokens.weight`). The loss depends on `E` through both uses, so
//! ```text
//! ∂L/∂E = ∂L/∂E|_lookup (first stage: scatter-add of dx₀)  +  ∂L/∂E|_head (last stage: dlogitsᵀ·hn)
//! ```
//! and the *embedding group* `{first, last}` of each pipeline group all-reduces (sums) the two partial gradients, so
//! both replicas receive the full gradient. Both replicas start equal (sliced from one full weight), take the same
//! optimizer update (AdamW is elementwise and the clip coefficient is global) and so stay equal; the global
//! gradient norm counts the tensor on the first stage only ([`PipelineModel::counts_in_norm`]). With `pp = 1` the
//! one rank adds both terms locally, as [`TpModel`](crate::tensor_parallel::TpModel) does.
//!
//! # Micro-batches and the loss ([`micro_batches`])
//!
//! A global batch of `B` rows is `M = B / (b·dp)` micro-batches of `b` rows per DP rank (`b =
//! micro_batch_size`); global micro-batch `m` is rows `[m·b·dp, (m+1)·b·dp)` and DP rank `d` runs its rows
//! `[m·b·dp + d·b, …+b)` (Megatron's sampler). With `W_m` the loss-weight sum of global micro-batch `m` (all DP
//! ranks; all-reduced over DP before the schedule starts) and `W = Σ_m W_m`, the step's loss is
//! ```text
//! loss = Σ_m Σ_{t∈m} w_t·CE_t / W   +   coef · Σ_m (W_m/W) · aux_m
//! ```
//! i.e. the token-weighted CE of the whole global batch (every micro-batch's CE gradient is normalised by the
//! global `W`, so the per-micro-batch, per-DP-rank gradients *sum* to the single-rank gradient), plus the MoE
//! load-balancing loss of each global micro-batch weighted by its share of the tokens — exactly what the
//! single-rank [`Trainer`](crate::train::Trainer) computes with gradient accumulation over the same micro-batches
//! (`Σ_m (W_m/W)·∇loss(b_m)`). With one micro-batch both terms are the global batch's, as in
//! [`TpModel`](crate::tensor_parallel::TpModel).
//!
//! The aux loss of micro-batch `m` needs the routing statistics `A_e, P_e, N` (assignments, probability sums,
//! rows; [`RouterStats`](qkernels::ops::RouterStats)) summed over *all* MoE layers — which live on different stages
//! — and over all tokens of `m`. They travel with the activations: each stage adds its layers' statistics to the
//! partial sum it received and sends it on; the last stage sums over the TP group (with SP, where each TP rank
//! routed its `T/tp` tokens) and the DP group, computes `aux_m`, and the global statistics then travel back with the
//! gradients, so every stage's MoE backward uses `d(coef·(W_m/W)·aux_m)/dprobs = coef·(W_m/W)·E·A_e/N²`. They are
//! available in time because a stage's backward of `m` always follows the last stage's forward of `m`.
//!
//! # Schedules ([`schedule`])
//!
//! Pure functions give each rank its list of [`Action`]s: `Forward(mb, chunk)`, `Backward(mb, chunk)` and the
//! transfers around them. 1F1B: `pp − r − 1` warm-up forwards, then alternate one forward and one backward, then
//! the remaining backwards (peak in-flight micro-batches `min(pp − r, M)`). Interleaved 1F1B: Megatron's schedule
//! table (groups of `pp` micro-batches through chunk 0, then chunk 1, …; backwards with the chunks reversed),
//! `2·(pp − r − 1) + (vpp − 1)·pp` warm-up forwards; needs `M % pp == 0`. [`schedule::simulate`] checks any set of
//! lists: coverage, dependency order, FIFO pairing and freedom from deadlock.
//!
//! # Send/recv pairs (the pipeline's conjugate collectives)
//!
//! Between virtual stages `s` and `s+1` the forward *sends* `x_{s+1} = f_s(x_s)` (`[T, H]`, or the SP shard
//! `[T/tp, H]` of this TP rank — each TP rank talks to the same TP rank of the next stage, so sequence-parallel
//! activations cross stages without a gather) and the next stage *receives* it. `send` is the adjoint of `recv`
//! (`⟨send(x), y⟩ = ⟨x, recv(y)⟩`), so the backward of "receive `x_{s+1}`" on stage `s+1` is "send `dx_{s+1}`" to
//! stage `s`, whose backward receives it:
//! ```text
//! forward   stage s:  Forward(m) → SendActivation(m)  ──x──▶  RecvActivation(m) → Forward(m)   :stage s+1
//! backward  stage s:  Backward(m) ← RecvGrad(m)       ◀──dx──  SendGrad(m) ← Backward(m)       :stage s+1
//! ```
//! Every message is `[kind, micro-batch, receiving virtual stage] ++ tensor ++ routing statistics (MoE)` in f32 —
//! on GPUs with a device-capable pipeline group the tensor is left out of that host message and follows it on its
//! own, device to device through NCCL in the weights' dtype (`comm::tensor::send`/`recv`); the receiver checks the
//! header, so a schedule whose pairs do not line up fails with
//! [`PipelineError::Protocol`] instead of training on the wrong tensor. Activations and gradients use two
//! communicators over the same pipeline group, so each direction between two ranks is a FIFO of one kind.
//!
//! # After the schedule
//!
//! Gradients are summed over micro-batches in local accumulators; then, once per step: the TP reductions of
//! [`TpModel`](crate::tensor_parallel::TpModel) (they are linear, so reducing the sum equals summing the
//! reductions), the embedding-group all-reduce, and the losses broadcast from the last stage over the pipeline
//! group (bit-exact, so every rank reports the same loss). The DP reduction is the optimizer's:
//! [`PipelineModel::step`] runs the ZeRO-1 [`DistributedOptimizer`](crate::zero::DistributedOptimizer) (or, on GPUs,
//! [`PipelineModel::step_device`] sums the gradients over DP on the device and steps a replicated
//! [`DeviceAdamW`](crate::optim::DeviceAdamW)) over the DP
//! group with the global norm summed over DP, TP and PP.
//!
//! # Limits
//!
//! - `cp` and `ep` > 1 are not composed with PP yet (rejected as in [`crate::tensor_parallel`]).
//! - The executor relies on eager sends (the CPU communicator); the lists are also deadlock-free when each run of
//!   consecutive transfers is posted as one group (NCCL), which [`schedule::simulate`] checks, but no NCCL executor
//!   exists yet. Activations move through host buffers.
//! - Every rank takes the whole micro-batch (ids, positions, targets): middle stages need positions and segment
//!   ids for RoPE and the attention mask; only the first uses the ids and only the last the targets.
//!
//! # A rank process
//!
//! ```no_run
//! use qkernels::Device;
//! use qparallel::comm::CpuCommunicator;
//! use qparallel::dims::{ParallelConfig, ParallelDims};
//! use qparallel::model::{Batch, Qwen3Model};
//! use qparallel::optim::AdamWConfig;
//! use qparallel::pipeline::{PipelineGroups, PipelineModel, micro_batches};
//! use qparallel::zero::ZeroConfig;
//! # fn world() -> CpuCommunicator { unimplemented!() }
//! # fn next_global_batch() -> Batch { unimplemented!() }
//! let world = world();
//! let dims = ParallelDims::new(8, ParallelConfig { tp: 2, pp: 2, vpp: 2, sp: true, ..Default::default() })?;
//! let full = Qwen3Model::from_hf_dir("ckpt/", Device::Cpu)?;
//! let groups = PipelineGroups::new(&world, &dims, &full.config)?; // collective
//! let mut model = PipelineModel::from_full(&full.config, &full.params, dims, world.global_rank(), groups)?;
//! let mut opt = model.optimizer(ZeroConfig::default(), AdamWConfig::default())?;
//! let mbs = micro_batches(&next_global_batch(), 1, dims.dp(), model.dp_rank())?;
//! let out = model.forward_backward(&mbs)?; // interleaved 1F1B over the micro-batches
//! let stats = model.step(&mut opt, &out.grads, 1e-4)?;
//! let full_params = model.gather_full_params()?; // HF layout (collective over PP and TP)
//! # let _ = (stats, full_params);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod model;
mod partition;
pub mod schedule;

use thiserror::Error;

pub use model::{ModelChunk, PipelineGroups, PipelineModel, PpStepOutput, StageParams, stage_dims};
pub use partition::{StageLayout, global_micro_batch, micro_batches, num_micro_batches};
pub use schedule::Action;

use crate::comm::CommError;
use crate::dims::DimsError;
use crate::model::ModelError;
use crate::tensor_parallel::TpError;
use crate::zero::ZeroError;

/// Errors of the pipeline.
#[derive(Debug, Error)]
pub enum PipelineError {
    #[error(transparent)]
    Tp(#[from] TpError),
    #[error(transparent)]
    Dims(#[from] DimsError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Zero(#[from] ZeroError),
    #[error(transparent)]
    DeviceOptim(#[from] crate::optim::DeviceOptimError),
    #[error("collective failed: {0}")]
    Comm(#[from] CommError),
    /// A schedule cannot be built for this shape.
    #[error("pipeline schedule (pp {pp}, vpp {vpp}, {num_micro} micro-batches): {reason}")]
    Schedule {
        pp: usize,
        vpp: usize,
        num_micro: usize,
        reason: String,
    },
    /// The layers do not split into `pp·vpp` equal chunks.
    #[error("{layers} layers cannot be split into pp({pp})·vpp({vpp}) = {} equal chunks", .pp * .vpp)]
    Layers {
        layers: usize,
        pp: usize,
        vpp: usize,
    },
    /// The global batch does not split into micro-batches.
    #[error(
        "global batch of {global} rows is not a positive multiple of micro_batch_size({micro})·dp({dp})"
    )]
    MicroBatches {
        global: usize,
        micro: usize,
        dp: usize,
    },
    /// The communicators handed in do not match the layout.
    #[error("process groups do not match the layout: {0}")]
    Groups(String),
    /// A parameter has the wrong name, shape or place for this stage.
    #[error("parameter `{name}`: {detail}")]
    Shard { name: String, detail: String },
    /// The micro-batches are unusable (none, or of different shapes).
    #[error("invalid micro-batches: {0}")]
    Batch(String),
    /// Every loss weight of the global batch is zero.
    #[error("the global batch has no loss weight (Σ w = 0)")]
    EmptyBatch,
    /// An action without its input, or a received message of another kind, micro-batch or stage.
    #[error("pipeline protocol: {0}")]
    Protocol(String),
}

impl From<qkernels::KernelError> for PipelineError {
    fn from(e: qkernels::KernelError) -> Self {
        PipelineError::Model(ModelError::Kernel(e))
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, PipelineError>;
