//! Expert parallelism (EP) and expert tensor parallelism (ETP) for the Qwen3-MoE sparse block, written over the
//! [`Communicator`] trait (Megatron-Core's `MoEAlltoAllTokenDispatcher` + grouped MLP, in explicit forward and
//! backward form).
//!
//! # Notation
//!
//! `E` routed experts, `k` experts per token, `H` hidden size, `f` = `moe_intermediate_size`. The EP group has `P`
//! ranks (`ep`), the ETP group `Q` ranks (`etp`); EP rank `p` owns the `E_l = E/P` experts
//! `[p·E_l, (p+1)·E_l)` ([`ExpertLayout`]), and inside the ETP group rank `q` holds the slice
//! `[q·f/Q, (q+1)·f/Q)` of each of them: rows of `gate_proj`/`up_proj` (`[f/Q, H]`, column-parallel) and columns of
//! `down_proj` (`[H, f/Q]`, row-parallel). The router `gate [E, H]` is replicated on every rank. With the
//! expert-parallel folding of [`crate::dims`], the ranks of one EP×ETP group hold *different tokens* (different
//! dp / cp coordinates when `tp = 1`), `T` of them on each rank.
//!
//! # Forward ([`moe_forward`])
//!
//! ```text
//! xn [T, H] ── router (replicated) ── probs [T, E], idx / weight [T, k]          (exactly the single-device maths)
//!    ── permute ── xp [T·k, H]   rows grouped by *global* expert, so by owning EP rank (experts are contiguous)
//!    ── D = dispatch ([`ExpertRoute::dispatch`]):
//!         1. counts: c[e] rows for expert e; all-to-all(counts) over EP → c_from[s][j] (EP rank s, local expert j)
//!         2. all-to-all-v over EP: the rows of EP rank r's experts go to r       → xr [Σ_s,j c_from[s][j], H]
//!         3. (Q > 1) all-gather-v over ETP (counts first, then rows)           → xg, blocks (q, s, j)
//!         4. regroup rows expert-major (j, q, s) for the grouped GEMMs        → xe [N, H], local offsets [E_l+1]
//!    ── experts on the local shards: g, u = xe·G_jᵀ, xe·U_jᵀ [N, f/Q], h = silu(g)⊙u, ye = h·D_jᵀ [N, H]
//!         (with Q > 1 `ye` is a *partial* sum over the f/Q columns this rank holds)
//!    ── C = combine ([`ExpertRoute::combine`]): inverse regroup, (Q > 1) reduce-scatter-v over ETP (Σ_q of the
//!         partials, each row back to the ETP rank that sent it), inverse all-to-all-v over EP   → yp [T·k, H]
//!    ── unpermute: y_t = Σ_j weight[t, j]·yp[row(t, j)]
//! ```
//! `y` equals the single-device block's output row for row: each (token, slot) row meets the same expert weights,
//! only on another rank, and `Σ_q h_q·D_qᵀ = h·Dᵀ` because `silu(g)⊙u` is elementwise in the `f` columns.
//!
//! # The conjugate pair: `Dᵀ = C`
//!
//! With `⟨u, v⟩ = Σ_ranks ⟨u_r, v_r⟩` on distributed row sets: the all-to-all-v with counts `(s, r)` is a
//! permutation of rows across ranks, its adjoint is its inverse, the all-to-all-v with counts `(r, s)` (see
//! [`crate::comm`]); the regroup is a local permutation, adjoint = inverse; the uneven all-gather over ETP
//! (`x ↦ (x_0; …; x_{Q-1})` on every rank) has as adjoint the uneven reduce-scatter (`(y_r) ↦ Σ_r y_r[block q]` on
//! rank q) — the same identity as for the even pair in [`crate::comm`]. Hence
//! `C = a2a⁻¹ ∘ RS_etp ∘ regroup⁻¹ = (regroup ∘ AG_etp ∘ a2a)ᵀ = Dᵀ`, and the backward needs no new collective:
//!
//! ```text
//! dyp, dweight = unpermute_bwd(dy)            dye = D(dyp)            (the expert outputs' gradient, on every ETP rank)
//! dh, dD_j = grouped_bwd(dye, h)   dg, du = swiglu_bwd(dh)   dxe = dg·G_j + du·U_j (partial over f/Q), dG_j, dU_j
//! dxp = C(dxe)                     (Σ over ETP of the partial input gradients, back to the token's rank)
//! dxn = permute_bwd(dxp) + router_bwd(dweight, aux)·W_r
//! ```
//! The expert weight gradients `dG_j = dgᵀ·xe`, `dU_j`, `dD_j = dyeᵀ·h` are complete for the rows this rank's shard
//! saw — every row of every token in its EP×ETP group routed to expert `j` — and stay on their owner; the expert-DP
//! group (ranks holding the same shard, other tokens) sums them (the driver's job:
//! [`CpEpModel::reduce_grads`](crate::context_parallel::CpEpModel::reduce_grads)).
//!
//! # Router and aux loss
//!
//! The router runs replicated on each rank's own tokens; its statistics ([`RouterStats`]: assignments `A_e`,
//! probability sums `P_e`, rows `N`) are *sums* over tokens, so summing them over every rank that holds different
//! tokens gives the single-device statistics, and `aux = E·Σ_e A_e·P_e/N²` with its per-row gradient
//! `coef·E·A_e/N²` is then exact on every rank. The driver does that sum (over dp × cp) before any backward.
//! The router weight's gradient is a sum over tokens → reduced with the other replicated weights.
//!
//! # Limits
//!
//! Counts travel as f32 (exact below 2²⁴ rows). The rows stay tensors on their device: every exchange is
//! [`all_to_all_rows`] (NCCL grouped send/recv on device buffers when the rows are on a GPU) — the EP all-to-all-v,
//! the uneven ETP all-gather (our block sent to every ETP rank) and reduce-scatter (block `q` back to rank `q`,
//! then a sum over the `Q` partials) — and the regroup is a row gather ([`ops::embedding_fwd`] with the order as
//! ids; the inverse regroup gathers by the inverse permutation). No capacity factor / token dropping (HF
//! Qwen3-MoE has none).

use crate::model::moe::expert_weights;
use qkernels::ops::{self, MoePlan, RouterOut, RouterStats};
use qkernels::{Device, Tensor};
use thiserror::Error;

use crate::comm::tensor::all_to_all_rows;
use crate::comm::{CommError, CommExt, Communicator, TensorCommError};
use crate::dims::{DimsError, GroupKind, ParallelDims};
use crate::model::moe::AuxLossGrad;
use crate::model::{Ffn, Mlp, ModelError, Qwen3Params, SparseMoe};

/// Errors of expert parallelism.
#[derive(Debug, Error)]
pub enum EpError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Dims(#[from] DimsError),
    #[error("collective failed: {0}")]
    Comm(#[from] CommError),
    /// The experts or their inner size do not split over the layout.
    #[error("expert layout: {0}")]
    Layout(String),
    /// A tensor handed in as a full or sharded expert has the wrong shape or count.
    #[error("expert parameter `{name}`: {detail}")]
    Shard { name: String, detail: String },
}

impl From<qkernels::KernelError> for EpError {
    fn from(e: qkernels::KernelError) -> Self {
        EpError::Model(ModelError::Kernel(e))
    }
}

impl From<TensorCommError> for EpError {
    fn from(e: TensorCommError) -> Self {
        match e {
            TensorCommError::Comm(c) => EpError::Comm(c),
            TensorCommError::Kernel(k) => EpError::from(k),
            TensorCommError::Shape { op, detail } => EpError::Layout(format!("{op}: {detail}")),
        }
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, EpError>;

/// Which experts, and which slice of each, one rank holds (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertLayout {
    /// `E`: routed experts of a MoE layer.
    pub experts: usize,
    /// `f`: the full `moe_intermediate_size`.
    pub ffn: usize,
    pub ep: usize,
    pub ep_rank: usize,
    pub etp: usize,
    pub etp_rank: usize,
}

impl ExpertLayout {
    /// Checks `E % ep == 0`, `f % etp == 0` and the ranks.
    pub fn new(
        experts: usize,
        ffn: usize,
        (ep, ep_rank): (usize, usize),
        (etp, etp_rank): (usize, usize),
    ) -> Result<Self> {
        let mut bad = Vec::new();
        if ep == 0 || !experts.is_multiple_of(ep) {
            bad.push(format!("experts {experts} are not divisible by ep({ep})"));
        }
        if etp == 0 || !ffn.is_multiple_of(etp) {
            bad.push(format!(
                "moe intermediate size {ffn} is not divisible by etp({etp})"
            ));
        }
        if ep_rank >= ep || etp_rank >= etp {
            bad.push(format!(
                "rank (ep {ep_rank}, etp {etp_rank}) outside ep({ep}) × etp({etp})"
            ));
        }
        if !bad.is_empty() {
            return Err(EpError::Layout(bad.join("; ")));
        }
        Ok(ExpertLayout {
            experts,
            ffn,
            ep,
            ep_rank,
            etp,
            etp_rank,
        })
    }

    /// The layout of global rank `rank` under `dims` (expert-view coordinates).
    pub fn from_dims(dims: &ParallelDims, rank: usize, experts: usize, ffn: usize) -> Result<Self> {
        let c = dims.expert_coord(rank);
        ExpertLayout::new(experts, ffn, (dims.ep(), c.ep), (dims.etp(), c.etp))
    }

    /// `E_l = E/ep`.
    pub fn local_experts(&self) -> usize {
        self.experts / self.ep
    }

    /// Global index of local expert 0.
    pub fn first_expert(&self) -> usize {
        self.ep_rank * self.local_experts()
    }

    /// `f/etp`: the inner size of each local expert shard.
    pub fn local_ffn(&self) -> usize {
        self.ffn / self.etp
    }

    /// Position of `(ep_rank, etp_rank)` in the EP×ETP group (`etp_rank + etp·ep_rank`, the group order of
    /// [`GroupKind::EtpEp`]).
    pub fn etp_ep_index(&self) -> usize {
        self.etp_rank + self.etp * self.ep_rank
    }
}

/// This rank's share of a full MoE block: the replicated router, experts `[first, first + E_l)`, each sliced to
/// `[q·f/Q, (q+1)·f/Q)` (gate/up rows, down columns).
pub fn shard_moe(full: &SparseMoe, layout: &ExpertLayout) -> Result<SparseMoe> {
    if full.experts.len() != layout.experts {
        return Err(EpError::Shard {
            name: "mlp.experts".into(),
            detail: format!(
                "{} experts, the layout has {}",
                full.experts.len(),
                layout.experts
            ),
        });
    }
    let (f_l, start) = (layout.local_ffn(), layout.etp_rank * layout.local_ffn());
    let experts = full.experts
        [layout.first_expert()..layout.first_expert() + layout.local_experts()]
        .iter()
        .map(|m| {
            Ok(Mlp {
                gate_proj: m.gate_proj.narrow(0, start, f_l)?,
                up_proj: m.up_proj.narrow(0, start, f_l)?,
                down_proj: m.down_proj.narrow(1, start, f_l)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SparseMoe {
        gate: full.gate.clone(),
        experts,
    })
}

/// Inverse of [`shard_moe`]: `parts[etp_rank + etp·ep_rank]` is that rank's share (parameters, or expert
/// gradients after their expert-DP reduction); the router is taken from `parts[0]`.
pub fn unshard_moe(parts: &[SparseMoe], ep: usize, etp: usize) -> Result<SparseMoe> {
    if parts.len() != ep * etp || parts.is_empty() {
        return Err(EpError::Shard {
            name: "mlp.experts".into(),
            detail: format!("{} shares for ep({ep}) × etp({etp})", parts.len()),
        });
    }
    let el = parts[0].experts.len();
    if let Some(p) = parts.iter().find(|p| p.experts.len() != el) {
        return Err(EpError::Shard {
            name: "mlp.experts".into(),
            detail: format!("shares hold {} and {el} experts", p.experts.len()),
        });
    }
    let mut experts = Vec::with_capacity(el * ep);
    for p in 0..ep {
        for j in 0..el {
            let shards: Vec<&Mlp> = (0..etp).map(|q| &parts[q + etp * p].experts[j]).collect();
            let cat = |get: fn(&Mlp) -> &Tensor, dim: usize| -> Result<Tensor> {
                let ts: Vec<&Tensor> = shards.iter().map(|m| get(m)).collect();
                Ok(Tensor::cat(&ts, dim)?)
            };
            experts.push(Mlp {
                gate_proj: cat(|m| &m.gate_proj, 0)?,
                up_proj: cat(|m| &m.up_proj, 0)?,
                down_proj: cat(|m| &m.down_proj, 1)?,
            });
        }
    }
    Ok(SparseMoe {
        gate: parts[0].gate.clone(),
        experts,
    })
}

/// `local` (laid out like a rank's parameters: its expert shards, everything else whole) with every MoE layer's
/// experts gathered over the etp-ep group `group` and unsharded ([`unshard_moe`]) into the full HF experts; the
/// other tensors are taken as they are. Collective over `group`.
pub fn gather_experts(
    local: &Qwen3Params,
    layout: &ExpertLayout,
    group: &dyn Communicator,
    device: Device,
) -> Result<Qwen3Params> {
    let mut mine = Vec::new();
    let mut shapes = Vec::new();
    for l in &local.layers {
        if let Ffn::Moe(m) = &l.mlp {
            for e in &m.experts {
                for t in [&e.gate_proj, &e.up_proj, &e.down_proj] {
                    mine.extend(t.to_vec_f32()?);
                    shapes.push(t.shape().to_vec());
                }
            }
        }
    }
    let mut all = vec![0f32; mine.len() * group.size()];
    group.all_gather(&mine, &mut all)?;
    let mut out = local.clone();
    let per_rank: Vec<&[f32]> = if mine.is_empty() {
        vec![&[]; group.size()]
    } else {
        all.chunks(mine.len()).collect()
    };
    // Walk the MoE layers; for each, rebuild every rank's share and unshard.
    let mut cursor = vec![0usize; group.size()];
    let mut shape_i = 0;
    for l in &mut out.layers {
        let Ffn::Moe(m) = &l.mlp else { continue };
        let el = m.experts.len();
        let mut parts = Vec::with_capacity(group.size());
        for (r, data) in per_rank.iter().enumerate() {
            let mut experts = Vec::with_capacity(el);
            let mut si = shape_i;
            for _ in 0..el {
                let mut take = || -> Result<Tensor> {
                    let shape = &shapes[si];
                    let n: usize = shape.iter().product();
                    let t = Tensor::from_f32(data[cursor[r]..cursor[r] + n].to_vec(), shape, &device)?;
                    cursor[r] += n;
                    si += 1;
                    Ok(t)
                };
                experts.push(Mlp {
                    gate_proj: take()?,
                    up_proj: take()?,
                    down_proj: take()?,
                });
            }
            parts.push(SparseMoe {
                gate: m.gate.clone(),
                experts,
            });
        }
        shape_i += 3 * el;
        l.mlp = Ffn::Moe(unshard_moe(&parts, layout.ep, layout.etp)?);
    }
    Ok(out)
}

/// Is `name` an expert shard (an `…mlp.experts.j.*` tensor)?
pub fn is_expert_param(name: &str) -> bool {
    name.contains(".mlp.experts.")
}

/// The data-parallel reduction of a model with expert shards: the non-expert tensors of `grads` summed over
/// `dense` (the ranks replicating them), the expert shards over `expert_dp` (the ranks holding the same shard) —
/// one f32 tensor all-reduce per group of the gradients laid end to end, on their device (NCCL on GPUs).
pub fn reduce_split(
    grads: &crate::model::NamedTensors,
    dense: &dyn Communicator,
    expert_dp: &dyn Communicator,
) -> Result<crate::model::NamedTensors> {
    let mut out = grads.clone();
    for (expert, group) in [(false, dense), (true, expert_dp)] {
        let names: Vec<&String> = grads.keys().filter(|n| is_expert_param(n) == expert).collect();
        if group.size() == 1 || names.is_empty() {
            continue;
        }
        let parts = names
            .iter()
            .map(|n| {
                let t = grads[*n].reshape(&[grads[*n].elem_count()])?;
                if t.dtype() == qkernels::DType::F32 { Ok(t) } else { t.to_dtype(qkernels::DType::F32) }
            })
            .collect::<qkernels::Result<Vec<_>>>()?;
        let refs: Vec<&Tensor> = parts.iter().collect();
        let flat = Tensor::cat(&refs, 0)?;
        let summed = crate::comm::tensor::all_reduce(&flat, group, crate::comm::ReduceOp::Sum)?;
        let mut off = 0;
        for n in names {
            let t = &grads[n];
            let len = t.elem_count();
            out.insert(n.clone(), summed.narrow(0, off, len)?.reshape(t.shape())?);
            off += len;
        }
    }
    Ok(out)
}

/// `full` with every MoE layer's experts replaced by this rank's shards ([`shard_moe`]); everything else as is.
pub fn shard_experts(full: &Qwen3Params, layout: &ExpertLayout) -> Result<Qwen3Params> {
    let mut params = full.clone();
    for l in &mut params.layers {
        if let Ffn::Moe(m) = &l.mlp {
            l.mlp = Ffn::Moe(shard_moe(m, layout)?);
        }
    }
    Ok(params)
}

/// The communicators of expert parallelism, shared by the cp/ep model and the TP model (split from the world in
/// this order).
pub struct ExpertComms {
    /// Expert parallel: the token all-to-alls.
    pub ep: Box<dyn Communicator>,
    /// Expert tensor parallel: the uneven all-gather / reduce-scatter of dispatched rows.
    pub etp: Box<dyn Communicator>,
    /// EP × ETP: where the expert shards of one layer live (checkpoint gathers).
    pub etp_ep: Box<dyn Communicator>,
    /// Ranks holding the same expert shard: where expert gradients are summed.
    pub expert_dp: Box<dyn Communicator>,
    /// Every rank of the (single) pipeline stage: the optimizer's global norm.
    pub all: Box<dyn Communicator>,
    /// This rank alone: the optimizer's dp group once the model has reduced the gradients itself.
    pub solo: Box<dyn Communicator>,
}

impl ExpertComms {
    /// Splits `world` into the expert groups of `dims`. Collective over `world`.
    pub fn new(world: &dyn Communicator, dims: &ParallelDims) -> Result<Self> {
        let n = dims.world();
        Ok(ExpertComms {
            ep: world.split(&dims.groups(GroupKind::Ep))?,
            etp: world.split(&dims.groups(GroupKind::Etp))?,
            etp_ep: world.split(&dims.groups(GroupKind::EtpEp))?,
            expert_dp: world.split(&dims.groups(GroupKind::ExpertDp))?,
            all: world.split(&[(0..n).collect()])?,
            solo: world.split(&(0..n).map(|r| vec![r]).collect::<Vec<_>>())?,
        })
    }

    /// The token dispatcher's groups.
    pub fn dispatch(&self) -> ExpertGroups<'_> {
        ExpertGroups {
            ep: &*self.ep,
            etp: &*self.etp,
        }
    }
}

/// The communicators of the token dispatcher: the EP group and the ETP group of this rank (groups of one for
/// `ep = 1` / `etp = 1`).
#[derive(Clone, Copy)]
pub struct ExpertGroups<'a> {
    pub ep: &'a dyn Communicator,
    pub etp: &'a dyn Communicator,
}

impl ExpertGroups<'_> {
    fn check(&self, layout: &ExpertLayout) -> Result<()> {
        if self.ep.size() != layout.ep
            || self.ep.rank() != layout.ep_rank
            || self.etp.size() != layout.etp
            || self.etp.rank() != layout.etp_rank
        {
            return Err(EpError::Layout(format!(
                "communicators are ep rank {}/{} and etp rank {}/{}, the layout says {}/{} and {}/{}",
                self.ep.rank(),
                self.ep.size(),
                self.etp.rank(),
                self.etp.size(),
                layout.ep_rank,
                layout.ep,
                layout.etp_rank,
                layout.etp
            )));
        }
        Ok(())
    }
}




/// The token exchange of one MoE layer for one batch: row counts per rank, the regrouping order and the local
/// expert offsets. Built once in the forward ([`ExpertRoute::new`], collective: counts only) and reused by the
/// backward, so both move exactly the same rows.
#[derive(Debug, Clone)]
pub struct ExpertRoute {
    /// `[P]`: rows this rank sends to each EP rank (the rows of that rank's experts).
    send_rows: Vec<usize>,
    /// `[P]`: rows this rank receives from each EP rank.
    recv_rows: Vec<usize>,
    /// `[Q]`: rows each ETP rank received in step 2 (the blocks of the ETP all-gather).
    etp_rows: Vec<usize>,
    /// Expert-major row `i` of `xe` is row `order[i]` of the ETP-gathered buffer.
    order: Vec<usize>,
    /// `[E_l + 1]`: local expert `j` owns rows `local_offsets[j]..local_offsets[j+1]` of `xe`.
    local_offsets: Vec<usize>,
    etp: usize,
    ep: usize,
}

impl ExpertRoute {
    /// Exchanges the per-expert row counts of `expert_offsets` (`[E + 1]`, a [`MoePlan`]'s) over the EP group and
    /// then the ETP group. Collective over both.
    pub fn new(
        expert_offsets: &[usize],
        layout: &ExpertLayout,
        groups: ExpertGroups<'_>,
    ) -> Result<Self> {
        groups.check(layout)?;
        let (e, el, ep, etp) = (
            layout.experts,
            layout.local_experts(),
            layout.ep,
            layout.etp,
        );
        if expert_offsets.len() != e + 1 {
            return Err(EpError::Layout(format!(
                "{} expert offsets for {e} experts",
                expert_offsets.len()
            )));
        }
        let counts: Vec<f32> = expert_offsets
            .windows(2)
            .map(|w| (w[1] - w[0]) as f32)
            .collect();
        // c_from[s·E_l + j]: rows EP rank s has for our local expert j.
        let c_from = if ep > 1 {
            groups
                .ep
                .all_to_all_v_vec(&counts, &vec![el; ep], &vec![el; ep])?
        } else {
            counts.clone()
        };
        let sum_blocks = |c: &[f32]| -> Vec<usize> {
            c.chunks(el)
                .map(|b| b.iter().map(|&x| x as usize).sum())
                .collect()
        };
        let send_rows = sum_blocks(&counts);
        let recv_rows = sum_blocks(&c_from);
        // all[(q·P + s)·E_l + j]: the same, for every ETP rank q.
        let all = if etp > 1 {
            groups.etp.all_gather_vec(&c_from)?
        } else {
            c_from
        };
        let all: Vec<usize> = all.iter().map(|&x| x as usize).collect();
        let etp_rows: Vec<usize> = all.chunks(ep * el).map(|b| b.iter().sum()).collect();
        let mut start = vec![0usize; all.len()];
        let mut acc = 0;
        for (s, c) in start.iter_mut().zip(&all) {
            *s = acc;
            acc += c;
        }
        let mut order = Vec::with_capacity(acc);
        let mut local_offsets = vec![0usize];
        for j in 0..el {
            for q in 0..etp {
                for s in 0..ep {
                    let b = (q * ep + s) * el + j;
                    order.extend(start[b]..start[b] + all[b]);
                }
            }
            local_offsets.push(order.len());
        }
        Ok(ExpertRoute {
            send_rows,
            recv_rows,
            etp_rows,
            order,
            local_offsets,
            etp,
            ep,
        })
    }

    /// `[E_l + 1]` row offsets of the local experts in the dispatched rows.
    pub fn local_offsets(&self) -> &[usize] {
        &self.local_offsets
    }

    /// Rows this rank's experts process (`N`).
    pub fn expert_rows(&self) -> usize {
        self.order.len()
    }

    /// `D`: rows `[T·k, W]` grouped by global expert → this rank's expert-major rows `[N, W]` (see the module
    /// docs). Used on the activations in forward and on `dyp` in backward. Collective over EP and ETP.
    pub fn dispatch(&self, x: &Tensor, groups: ExpertGroups<'_>) -> Result<Tensor> {
        self.width(x, self.send_rows.iter().sum(), "dispatch")?;
        // 2. The rows of EP rank r's experts go to r (NCCL on GPUs).
        let xr = if self.ep > 1 {
            all_to_all_rows(x, &self.send_rows, &self.recv_rows, groups.ep)?
        } else {
            x.clone()
        };
        // 3. Uneven all-gather over ETP as an all-to-all of rows: our block to every ETP rank, theirs back.
        let xg = if self.etp > 1 {
            let mine = xr.shape()[0];
            let copies = vec![&xr; self.etp];
            all_to_all_rows(&Tensor::cat(&copies, 0)?, &vec![mine; self.etp], &self.etp_rows, groups.etp)?
        } else {
            xr
        };
        // 4. Regroup expert-major: a row gather.
        Ok(ops::embedding_fwd(&self.row_ids(&self.order, &x.device())?, &xg)?)
    }

    /// `C = Dᵀ`: expert-major rows `[N, W]` (partial sums over ETP) → rows `[T·k, W]` in the layout `dispatch`
    /// took them from, summed over ETP. Used on the expert outputs in forward and on `dxe` in backward.
    /// Collective over ETP and EP.
    pub fn combine(&self, y: &Tensor, groups: ExpertGroups<'_>) -> Result<Tensor> {
        let w = self.width(y, self.order.len(), "combine")?;
        // Inverse regroup: a gather by the inverse permutation.
        let mut inverse = vec![0usize; self.order.len()];
        for (i, &r) in self.order.iter().enumerate() {
            inverse[r] = i;
        }
        let yg = ops::embedding_fwd(&self.row_ids(&inverse, &y.device())?, y)?;
        // Uneven reduce-scatter over ETP: block q back to ETP rank q, then the sum of the `etp` partials.
        let yr = if self.etp > 1 {
            let mine: usize = self.recv_rows.iter().sum();
            let parts = all_to_all_rows(&yg, &self.etp_rows, &vec![mine; self.etp], groups.etp)?;
            parts.reshape(&[self.etp, mine * w])?.sum_dim0()?.reshape(&[mine, w])?
        } else {
            yg
        };
        // The inverse all-to-all over EP.
        Ok(if self.ep > 1 {
            all_to_all_rows(&yr, &self.recv_rows, &self.send_rows, groups.ep)?
        } else {
            yr
        })
    }

    /// `ids` as a u32 index tensor on `device` (the rows a gather takes).
    fn row_ids(&self, ids: &[usize], device: &qkernels::Device) -> Result<Tensor> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let n = ids.len();
        Ok(Tensor::from_u32(ids, &[n], device)?)
    }

    fn width(&self, x: &Tensor, rows: usize, op: &str) -> Result<usize> {
        match x.shape() {
            [r, w] if *r == rows => Ok(*w),
            s => Err(EpError::Layout(format!(
                "{op}: expected [{rows}, width] rows, got {s:?}"
            ))),
        }
    }
}

/// What [`moe_forward`] keeps for [`moe_backward`].
#[derive(Debug, Clone)]
pub struct EpMoeSaved {
    /// `[T, H]`
    xn: Tensor,
    routing: RouterOut,
    plan: MoePlan,
    route: ExpertRoute,
    /// `[N, H]`: dispatched rows.
    xe: Tensor,
    /// `[N, f/Q]`
    gate: Tensor,
    /// `[N, f/Q]`
    up: Tensor,
    /// `[N, f/Q]`
    h: Tensor,
    /// `[T·k, H]`: combined expert outputs before weighting.
    yp: Tensor,
    stats: RouterStats,
}

impl EpMoeSaved {
    /// This layer's routing statistics over this rank's tokens (sum them over layers and ranks for the aux loss).
    pub fn stats(&self) -> &RouterStats {
        &self.stats
    }

    /// The router's outputs on this rank's tokens.
    pub fn routing(&self) -> &RouterOut {
        &self.routing
    }
}

fn check_local(moe: &SparseMoe, layout: &ExpertLayout) -> Result<()> {
    let e = moe.gate.shape().first().copied().unwrap_or(0);
    if e != layout.experts || moe.experts.len() != layout.local_experts() {
        return Err(EpError::Shard {
            name: "mlp".into(),
            detail: format!(
                "router over {e} experts with {} local experts, the layout needs {} and {}",
                moe.experts.len(),
                layout.experts,
                layout.local_experts()
            ),
        });
    }
    Ok(())
}

/// `y [T, H]` of the sparse block on this rank's tokens `xn [T, H]`, with the local expert shards `moe` (router
/// over all `E` experts, `E_l` local experts). Collective over EP and ETP. See the module docs.
pub fn moe_forward(
    moe: &SparseMoe,
    xn: &Tensor,
    (top_k, norm_topk_prob): (usize, bool),
    layout: &ExpertLayout,
    groups: ExpertGroups<'_>,
) -> Result<(Tensor, EpMoeSaved)> {
    check_local(moe, layout)?;
    let logits = ops::linear_fwd(xn, &moe.gate)?; // [T, E]
    let routing = ops::router_fwd(&logits, top_k, norm_topk_prob)?;
    let plan = ops::moe_plan(&routing.topk_idx, layout.experts)?;
    let xp = ops::moe_permute(xn, &plan)?; // [T·k, H], grouped by global expert
    let route = ExpertRoute::new(&plan.expert_offsets, layout, groups)?;
    let xe = route.dispatch(&xp, groups)?; // [N, H], local-expert-major
    let [wg, wu, wd] = expert_weights(&moe.experts);
    let offs = route.local_offsets();
    let gate = ops::grouped_linear_fwd(&xe, &wg, offs)?;
    let up = ops::grouped_linear_fwd(&xe, &wu, offs)?;
    let h = ops::swiglu_fwd(&gate, &up)?;
    let ye = ops::grouped_linear_fwd(&h, &wd, offs)?; // partial over ETP
    let yp = route.combine(&ye, groups)?; // [T·k, H]
    let y = ops::moe_unpermute(&yp, &routing.topk_weight, &plan)?;
    let stats = RouterStats::from_router(&routing)?;
    Ok((
        y,
        EpMoeSaved {
            xn: xn.clone(),
            routing,
            plan,
            route,
            xe,
            gate,
            up,
            h,
            yp,
            stats,
        },
    ))
}

/// `(dxn [T, H], gradients of the local shards)` from `dy [T, H]`: the router gradient over this rank's tokens
/// (plus the aux-loss term when `aux` is given, with statistics already summed over all ranks) and the expert
/// shard gradients over every row this rank's experts processed. Collective over EP and ETP (`D` on `dyp`, `C` on
/// `dxe`).
pub fn moe_backward(
    moe: &SparseMoe,
    dy: &Tensor,
    saved: &EpMoeSaved,
    norm_topk_prob: bool,
    aux: Option<AuxLossGrad<'_>>,
    groups: ExpertGroups<'_>,
) -> Result<(Tensor, SparseMoe)> {
    let t = saved.plan.tokens;
    let (dyp, dweight) =
        ops::moe_unpermute_bwd(dy, &saved.yp, &saved.routing.topk_weight, &saved.plan)?;
    let route = &saved.route;
    let dye = route.dispatch(&dyp, groups)?; // Cᵀ = D
    let [wg, wu, wd] = expert_weights(&moe.experts);
    let offs = route.local_offsets();
    let (dh, d_down) = ops::grouped_linear_bwd(&dye, &saved.h, &wd, offs)?;
    let g_act = ops::swiglu_bwd(&dh, &saved.gate, &saved.up)?;
    let (dxe_g, d_gate) = ops::grouped_linear_bwd(&g_act.dgate, &saved.xe, &wg, offs)?;
    let (dxe_u, d_up) = ops::grouped_linear_bwd(&g_act.dup, &saved.xe, &wu, offs)?;
    let dxp = route.combine(&dxe_g.add(&dxe_u)?, groups)?; // Dᵀ = C
    let dxn_experts = ops::moe_permute_bwd(&dxp, &saved.plan)?;

    let dprobs = match aux {
        Some(a) if a.coef != 0.0 => Some(a.stats.aux_dprobs(t, a.coef, &dy.device())?),
        _ => None,
    };
    let dlogits = ops::router_bwd(&dweight, dprobs.as_ref(), &saved.routing, norm_topk_prob)?
        .to_dtype(saved.xn.dtype())?;
    let g_router = ops::linear_bwd(&dlogits, &saved.xn, &moe.gate)?;
    let dxn = dxn_experts
        .to_dtype(g_router.dx.dtype())?
        .add(&g_router.dx)?;
    let experts = d_gate
        .into_iter()
        .zip(d_up)
        .zip(d_down)
        .map(|((gate_proj, up_proj), down_proj)| Mlp {
            gate_proj,
            up_proj,
            down_proj,
        })
        .collect();
    Ok((
        dxn,
        SparseMoe {
            gate: g_router.dw,
            experts,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On one rank the regroup order is the identity: dispatch hands the rows over as they are, with the expert
    /// offsets of the plan, and combine puts them back (the permutations of several ranks, and dispatch/combine
    /// adjointness, are checked in tests/cp_ep_parity.rs).
    #[test]
    fn single_rank_dispatch_regroups_rows_and_combine_puts_them_back() {
        let comms = crate::comm::CpuCommunicator::thread_group(1);
        let one: &dyn Communicator = &comms[0];
        let layout = ExpertLayout::new(2, 4, (1, 0), (1, 0)).unwrap();
        let groups = ExpertGroups { ep: one, etp: one };
        // Expert 0 has rows 0..3, expert 1 rows 3..5 (already grouped by global expert, as moe_permute leaves them).
        let route = ExpertRoute::new(&[0, 3, 5], &layout, groups).unwrap();
        let x = Tensor::from_f32((0..10).map(|v| v as f32).collect(), &[5, 2], &Device::Cpu).unwrap();
        let xe = route.dispatch(&x, groups).unwrap();
        assert_eq!(xe.to_vec_f32().unwrap(), x.to_vec_f32().unwrap(), "one rank: expert-major = expert order");
        assert_eq!(route.local_offsets(), &[0, 3, 5]);
        let back = route.combine(&xe.scale(2.0).unwrap(), groups).unwrap();
        assert_eq!(back.to_vec_f32().unwrap(), x.scale(2.0).unwrap().to_vec_f32().unwrap());
    }

    #[test]
    fn layout_rejects_uneven_splits() {
        assert!(ExpertLayout::new(8, 32, (2, 1), (2, 0)).is_ok());
        let e = ExpertLayout::new(6, 30, (4, 0), (4, 0)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("experts 6 are not divisible by ep(4)"),
            "{msg}"
        );
        assert!(msg.contains("30 is not divisible by etp(4)"), "{msg}");
        let l = ExpertLayout::new(8, 32, (2, 1), (2, 1)).unwrap();
        assert_eq!(
            (
                l.local_experts(),
                l.first_expert(),
                l.local_ffn(),
                l.etp_ep_index()
            ),
            (4, 4, 16, 3)
        );
    }
}
