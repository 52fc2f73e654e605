//! Megatron-style tensor parallelism (TP), sequence parallelism (SP) and the data-parallel glue, for the Qwen3
//! model of [`crate::model`], written over the [`Communicator`](crate::comm::Communicator) trait.
//!
//! The model code is written once for one device; this module runs the *same* blocks
//! ([`Attention`](crate::model::Attention), [`Mlp`](crate::model::Mlp), [`SparseMoe`](crate::model::SparseMoe))
//! on per-rank weight shards with a *local* config (heads, kv heads and ffn size divided by `tp`), and adds the
//! collectives around them. Nothing in [`crate::model`] changed for it.
//!
//! # Notation
//!
//! `T` tokens (`batch·seq`, row-major by batch), `H` hidden size, `p = tp` ranks, rank `i` of the TP group.
//! Weights are HF/PyTorch `[out, in]` and every linear is `Y = X·Aᵀ`.
//!
//! # The layers and their splits
//!
//! **Column-parallel linear** (q/k/v, gate/up, LM head): `A = [A_1; …; A_p]` split along its *output* rows, rank
//! `i` holds `A_i [out/p, in]` and computes `Y_i = X·A_iᵀ [T, out/p]`, the `i`-th column block of `Y`. Input `X` is
//! replicated on the TP ranks (entered through `f`, or through the SP all-gather); output stays split.
//!
//! **Row-parallel linear** (o, down): `A = [A_1 … A_p]` split along its *input* columns, rank `i` holds
//! `A_i [out, in/p]`, takes the split input `X_i [T, in/p]` (the column-parallel output of the same rank) and
//! computes the partial product `Y^{(i)} = X_i·A_iᵀ`; `Y = Σ_i Y^{(i)}` is formed by `g` (all-reduce) or, with SP,
//! by a reduce-scatter.
//!
//! So attention is column-parallel by *heads* (rank `i` owns q heads `[i·Hq/p, (i+1)·Hq/p)` and their kv heads; the
//! attention itself is local, GQA groups never straddle ranks) and row-parallel in `o_proj`; the SwiGLU MLP is
//! column-parallel in gate/up (the elementwise `silu(g)⊙u` is local) and row-parallel in down. One `f`/`g` pair per
//! block: forward communicates once (after o / down), backward once (before the block's input).
//!
//! **KV heads when `p > Hkv`** (the rule [`ParallelDims::validate_model`](crate::dims::ParallelDims::validate_model)
//! encodes; vLLM's `QKVParallelLinear` replicates the same way): `p % Hkv == 0`, rank `i` holds
//! the single kv head `i / (p/Hkv)` — the one its q heads use — replicated on the `p/Hkv` ranks of its *kv replica
//! group*. Each replica only back-propagates its own q heads' share of `dK, dV`, so the k/v weight gradients are
//! all-reduced (summed) over the kv replica group, after which the replicas agree.
//!
//! **Replicated small parameters.** `q_norm`, `k_norm` (`[head_dim]`, shared by all heads): every rank uses them on
//! its own heads, the gradient is a partial sum → all-reduced over TP. Layer norms and the final norm: without SP
//! every rank computes the same full gradient (no communication); with SP each rank sees only its `T/p` tokens →
//! all-reduced over TP (Megatron's `sequence_parallel` grads). MoE router and experts are **replicated under TP**
//! for now (no expert TP / EP yet): without SP every TP rank computes the whole block redundantly; with SP each rank
//! runs it on its own `T/p` tokens and the router/expert gradients are all-reduced over TP.
//!
//! **Vocab-parallel embedding**: `E = [E_1; …; E_p]` split by vocab rows, rank `i` owns ids
//! `[i·V/p, (i+1)·V/p)`; a token outside the range looks up zeros (`x^{(i)}_t = 1[id_t ∈ range_i]·E[id_t]`), and
//! `x = Σ_i x^{(i)}` is formed by `g` (all-reduce) or, with SP, a reduce-scatter. Backward is a masked local
//! scatter-add into `E_i` of `dx` (identity, or the SP all-gather).
//!
//! **Vocab-parallel cross-entropy** (the LM head is column-parallel over the vocab, and tied to `E_i` when the
//! embeddings are tied): rank `i` holds only `ℓ^{(i)} = logits[:, range_i] [T, V/p]`, never the full `[T, V]`.
//! ```text
//! m_t   = max_i max_v ℓ^{(i)}_{t,v}                  all-reduce(max)   over [T]
//! z_t   = Σ_i Σ_v exp(ℓ^{(i)}_{t,v} − m_t)             all-reduce(sum)   over [T]   (one buffer of 2T with:)
//! π_t   = Σ_i 1[y_t ∈ range_i]·ℓ^{(i)}_{t, y_t − start_i}                                 (the target logit)
//! CE_t  = m_t + log z_t − π_t,      loss = Σ_t w_t·CE_t / W      (W = Σ w over the *global* batch, all DP ranks)
//! dℓ^{(i)}_{t,v} = (w_t/W)·(exp(ℓ^{(i)}_{t,v} − m_t)/z_t − 1[v + start_i = y_t])            (local, no communication)
//! ```
//!
//! # Conjugate collective pairs ([`mappings`])
//!
//! With `⟨u, v⟩ = Σ_ranks ⟨u_r, v_r⟩` on distributed values, each forward map's backward is its adjoint:
//!
//! | name | forward | backward | where |
//! | --- | --- | --- | --- |
//! | `f` = [`copy_to_tp_region`](mappings::copy_to_tp_region) | identity: `X` replicated | all-reduce `Σ_i dX^{(i)}` | before column-parallel (no SP) |
//! | `g` = [`reduce_from_tp_region`](mappings::reduce_from_tp_region) | all-reduce `Σ_i Y^{(i)}` | identity | after row-parallel / vocab embedding (no SP) |
//! | [`gather_from_sp_region`](mappings::gather_from_sp_region) | all-gather `[T/p,H] → [T,H]` | reduce-scatter `[T,H] → [T/p,H]` | before column-parallel (SP) |
//! | [`reduce_scatter_to_sp_region`](mappings::reduce_scatter_to_sp_region) | reduce-scatter `[T,H] → [T/p,H]` | all-gather | after row-parallel / vocab embedding (SP) |
//!
//! Why `f`'s backward is an all-reduce: `X` feeds every rank's `Y_i = X·A_iᵀ`, so
//! `∂L/∂X = Σ_i ∂L/∂Y_i·A_i = Σ_i dX^{(i)}`. Why `g`'s backward is the identity: `Y = Σ_i Y^{(i)}` gives
//! `∂L/∂Y^{(i)} = ∂L/∂Y`, which every rank already holds (the region after `g` is replicated and computed
//! identically on every rank). The SP pair: all-gather and reduce-scatter are adjoint (see [`crate::comm`]), and
//! `reduce-scatter ∘ … ∘ all-gather` replaces `g ∘ … ∘ f` with the same total traffic: the norms, residual adds
//! and the MoE block between two TP regions then run on `T/p` tokens per rank instead of all `T` redundantly.
//!
//! Where the data moves: [`crate::comm::tensor`]. With CPU tensors (or a host-only group) through the host
//! communicator; with tensors on a GPU and [`NcclGroup`](crate::comm::NcclGroup)s (e.g. `ParallelGroups::new` over an
//! `NcclGroup` world) every pair above, the TP gradient reductions and the DP gradient sum
//! ([`TpModel::reduce_dp_grads`]) run on device buffers through NCCL — activations in their dtype (bf16), gradients
//! in f32 — and the vocab-parallel cross-entropy runs on the device with only `[T]` vectors on the host
//! ([`vocab`]). `qcluster-gpu-bench tp-dp-parity` checks tp2, tp2+sp and dp2 on two GPUs against the one-GPU run.
//!
//! The SP shard of rank `i` is the contiguous chunk `[i·T/p, (i+1)·T/p)` of the flattened token dimension (with one
//! row per batch this is Megatron's split of the sequence dimension); `T % p == 0` is required.
//!
//! # Data parallelism
//!
//! Each DP rank runs its own rows of the global batch ([`split_batch_rows`]). The CE is normalised by the weight
//! sum `W` of the *global* batch (all-reduced over DP), so the per-rank gradients *sum* (not average) to the
//! single-rank gradient, and the MoE routing statistics are all-reduced over DP (and over TP with SP) before the
//! aux loss, so the aux loss is the global batch's. Gradient reduction over DP happens in the distributed optimizer
//! ([`crate::zero`], host vectors), or, with a replicated device optimizer ([`crate::optim::DeviceAdamW`]), in
//! [`TpModel::reduce_dp_grads`] (an all-reduce sum, NCCL on GPUs) followed by [`TpModel::grad_norm`].
//!
//! # Limits (what is not here yet)
//!
//! - `dp`, `tp`, `sp` and `ep` (± `etp`, with sp when `tp > 1`): `pp`, `vpp` and `cp` > 1 are
//!   [`TpError::Unsupported`] for [`TpModel`] ([`crate::pipeline`] runs these blocks per pipeline stage;
//!   [`ParallelGroups::new`] accepts `pp > 1` without ep). Without ep the MoE experts and the router are replicated
//!   under TP; with ep they are sharded over ep × etp and the tokens dispatched (`experts`: where the tokens are,
//!   how the gradients are reduced, why the optimizer then steps every local parameter).
//! - The vocabulary is not padded: `vocab_size % tp == 0` is required (Qwen3's 151936 divides by 2…128).
//! - Under SP the attention and MLP blocks keep their gathered `[T, H]` inputs for backward (Megatron keeps the
//!   `[T/p, H]` shard and gathers again); recomputation ([`TpModel::with_gradient_checkpointing`]) keeps only the
//!   layer input and reruns the forward, collectives included.
//! - The DP weight sum, the DP loss sum and the routing statistics travel as f32 (exact for integer weights up to
//!   2²⁴ tokens).
//!
//! # A rank process
//!
//! ```no_run
//! use qkernels::Device;
//! use qparallel::comm::CpuCommunicator;
//! use qparallel::dims::{ParallelConfig, ParallelDims};
//! use qparallel::model::{Batch, Qwen3Model};
//! use qparallel::optim::AdamWConfig;
//! use qparallel::tensor_parallel::{ParallelGroups, TpModel, split_batch_rows};
//! use qparallel::zero::{DistributedOptimizer, ZeroConfig};
//! # fn world() -> CpuCommunicator { unimplemented!() }
//! # fn next_global_batch() -> Batch { unimplemented!() }
//! let world = world(); // e.g. CpuCommunicator::connect_tcp(..) or one of CpuCommunicator::thread_group(n)
//! let dims = ParallelDims::new(4, ParallelConfig { tp: 2, sp: true, ..Default::default() })?;
//! let full = Qwen3Model::from_hf_dir("ckpt/", Device::Cpu)?; // every rank builds (or loads) the full weights
//! let groups = ParallelGroups::new(&world, &dims, &full.config)?; // collective: every rank calls it
//! let mut model = TpModel::from_full(&full.config, &full.params, dims, world.global_rank(), groups)?;
//! let mut opt = DistributedOptimizer::new(ZeroConfig::default(), AdamWConfig::default(), &model)?;
//! let batch = split_batch_rows(&next_global_batch(), dims.dp(), model.dp_rank())?;
//! let out = model.forward_backward(&batch)?;
//! let stats = opt.step(&mut model, &out.grads, 1e-4)?; // reduce-scatter, clip, AdamW on the shard, all-gather
//! let full_params = model.gather_full_params()?; // HF layout, for checkpoints (collective over TP)
//! # let _ = (stats, full_params);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod experts;
pub mod mappings;
mod model;
mod shard;
pub mod vocab;

use thiserror::Error;

pub use model::{
    ParallelGroups, Replication, TpModel, TpStepOutput, replication_of, split_batch_rows,
};
pub use shard::{TpPlan, shard_for_rank, unshard};
// Crate-internal pieces the pipeline stages reuse ([`crate::pipeline`]): one TP/SP layer forward/backward and
// the TP gradient reductions, so a stage runs exactly the blocks `TpModel` runs.
pub(crate) use model::{LayerSaved, layer_backward, layer_forward_saved, reduce_layer_grads};
pub(crate) use shard::shard_with_plan;

use crate::comm::CommError;
use crate::dims::DimsError;
use crate::model::ModelError;

/// Errors of the tensor/sequence/data-parallel model.
#[derive(Debug, Error)]
pub enum TpError {
    #[error(transparent)]
    Dims(#[from] DimsError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("collective failed: {0}")]
    Comm(#[from] CommError),
    /// A parallel dimension this module does not implement yet (pp, cp, ep > 1).
    #[error("unsupported parallel layout: {0}")]
    Unsupported(String),
    /// The communicators handed in do not match the layout (sizes or this rank's position).
    #[error("process groups do not match the layout: {0}")]
    Groups(String),
    /// `vocab_size % tp != 0` (pad the vocabulary; not done automatically).
    #[error("vocab size {vocab} is not divisible by tp({tp})")]
    VocabNotDivisible { vocab: usize, tp: usize },
    /// Sequence parallelism needs `batch·seq % tp == 0`.
    #[error("sequence parallelism: {tokens} tokens are not divisible by tp({tp})")]
    TokensNotDivisible { tokens: usize, tp: usize },
    /// The batch cannot be split over the data-parallel ranks.
    #[error("batch of {rows} rows cannot be split over dp({dp}) ranks")]
    BatchNotDivisible { rows: usize, dp: usize },
    /// A tensor given as a full or sharded parameter has the wrong shape / count.
    #[error("parameter `{name}`: {detail}")]
    Shard { name: String, detail: String },
    #[error(transparent)]
    Ep(#[from] crate::expert_parallel::EpError),
}

impl From<crate::comm::TensorCommError> for TpError {
    fn from(e: crate::comm::TensorCommError) -> Self {
        match e {
            crate::comm::TensorCommError::Comm(c) => TpError::Comm(c),
            crate::comm::TensorCommError::Kernel(k) => TpError::Model(ModelError::Kernel(k)),
            crate::comm::TensorCommError::Shape { op, detail } => TpError::Shard {
                name: op.into(),
                detail,
            },
        }
    }
}

impl From<qkernels::KernelError> for TpError {
    fn from(e: qkernels::KernelError) -> Self {
        TpError::Model(ModelError::Kernel(e))
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, TpError>;
