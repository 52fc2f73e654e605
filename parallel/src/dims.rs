//! The parallel layout of a job: how `world` ranks are factored into data, tensor, pipeline, context and expert
//! parallelism, and which ranks form each process group.
//!
//! # Factors
//!
//! | factor | meaning |
//! | --- | --- |
//! | `tp`  | tensor parallel: each linear layer's weight is split over `tp` ranks |
//! | `sp`  | sequence parallel (a flag, needs `tp > 1`): the regions between TP layers are split along the sequence |
//! | `cp`  | context parallel: the sequence is split into `2·cp` chunks, rank `i` holds chunks `i` and `2·cp-1-i` |
//! | `pp`  | pipeline parallel: the layers are split into `pp` stages |
//! | `vpp` | virtual pipeline stages per pipeline rank (interleaved 1F1B); `layers` is split into `pp·vpp` chunks |
//! | `dp`  | data parallel, derived: `dp = world / (tp·cp·pp)` |
//! | `ep`  | expert parallel: the experts of a MoE layer are split over `ep` ranks |
//! | `etp` | expert tensor parallel: each expert's weights are split over `etp` ranks (defaults to `tp`) |
//! | `edp` | expert data parallel, derived: `edp = world / (etp·ep·pp)` |
//!
//! Invariants of a constructed [`ParallelDims`] (checked by [`ParallelDims::new`], which reports every violated
//! rule in one error):
//!
//! - every factor is ≥ 1 and `world = dp·cp·tp·pp` exactly;
//! - `ep·etp` divides `dp·cp·tp`: the expert layers of one pipeline stage run on the same `dp·cp·tp` ranks as the
//!   dense layers, re-factored as `edp·ep·etp` (Megatron-Core's "expert-parallel folding"), so the pipeline groups
//!   of both views coincide;
//! - `sp` implies `tp > 1`; `vpp > 1` implies `pp > 1`.
//!
//! Rules that depend on the model (heads, layers, experts, sequence length) are checked separately by
//! [`ParallelDims::validate_model`], because the same layout is reused across models.
//!
//! # Rank → coordinates
//!
//! Ranks are laid out as in Megatron-Core's `RankGenerator` with its default order, innermost (fastest varying)
//! first, so that a tensor-parallel group is a run of consecutive ranks (inside one node, on NVLink):
//!
//! ```text
//! dense  view, order tp-cp-dp-pp :   rank = tp_i + tp·(cp_i + cp·(dp_i + dp·pp_i))
//! expert view, order etp-ep-edp-pp:  rank = etp_i + etp·(ep_i + ep·(edp_i + edp·pp_i))
//! ```
//!
//! Both views have the same stride for `pp` (`tp·cp·dp = etp·ep·edp = world/pp`), hence the same pipeline stage
//! for every rank and the same pipeline groups.
//!
//! A group of kind `K` is the set of ranks whose coordinates differ only in the dimensions of `K`
//! (e.g. `dp-cp`: ranks that agree on `tp` and `pp`). Groups are listed as Megatron does
//! ([`orthogonal_groups`]): the groups are ordered by the index of their fixed coordinates, innermost fastest, and
//! the ranks inside a group are ordered by their varying coordinates, innermost fastest, so that the position of a
//! rank inside its group is its coordinate (its group rank) in that dimension.
//!
//! The embedding group of each pipeline group is its first and last stage (`[first]` when `pp = 1`): with tied
//! embeddings both ends hold the word embedding and all-reduce its gradient.
//!
//! # Worked example (Megatron's 16-GPU table)
//!
//! `world = 16, tp = 2, pp = 4` ⇒ `dp = 16 / (2·1·4) = 2`, and `rank = tp_i + 2·dp_i + 4·pp_i`:
//!
//! ```text
//! rank   0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
//! tp_i   0  1  0  1  0  1  0  1  0  1  0  1  0  1  0  1
//! dp_i   0  0  1  1  0  0  1  1  0  0  1  1  0  0  1  1
//! pp_i   0  0  0  0  1  1  1  1  2  2  2  2  3  3  3  3
//!
//! tp groups (8):        [0,1] [2,3] [4,5] [6,7] [8,9] [10,11] [12,13] [14,15]
//! dp groups (8):        [0,2] [1,3] [4,6] [5,7] [8,10] [9,11] [12,14] [13,15]
//! pp groups (4):        [0,4,8,12] [1,5,9,13] [2,6,10,14] [3,7,11,15]
//! embedding groups (4): [0,12] [1,13] [2,14] [3,15]
//! tp-pp groups (2):     [0,1,4,5,8,9,12,13] [2,3,6,7,10,11,14,15]
//! cp groups (16):       [0] [1] … [15]          (cp = 1), and dp-cp groups = dp groups
//! expert view (ep = 1, etp = tp = 2, edp = 16/(2·1·4) = 2):
//!   etp groups = tp groups, ep groups = singletons, expert-dp groups = dp groups
//! ```
//!
//! A MoE example with folding: `world = 16, tp = 2, cp = 2, pp = 2, ep = 2, etp = 1` ⇒ `dp = 2`, `edp = 4`
//! (`ep·etp = 2` divides `dp·cp·tp = 8`):
//!
//! ```text
//! dense:  tp groups    [0,1] [2,3] … [14,15]
//!         cp groups    [0,2] [1,3] [4,6] [5,7] [8,10] [9,11] [12,14] [13,15]
//!         dp groups    [0,4] [1,5] [2,6] [3,7] [8,12] [9,13] [10,14] [11,15]
//!         dp-cp groups [0,2,4,6] [1,3,5,7] [8,10,12,14] [9,11,13,15]
//!         pp groups    [0,8] [1,9] [2,10] [3,11] [4,12] [5,13] [6,14] [7,15]
//! expert: ep groups    [0,1] [2,3] … [14,15]
//!         expert-dp    [0,2,4,6] [1,3,5,7] [8,10,12,14] [9,11,13,15]
//!         etp groups   [0] [1] … [15]
//! ```
//!
//! Both tables are asserted by `parallel/tests/dims_layout.rs`.

use std::fmt;

use thiserror::Error;

/// The configured factors (what a job file sets); `dp` and `edp` are derived by [`ParallelDims::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParallelConfig {
    pub tp: usize,
    pub pp: usize,
    /// Virtual pipeline stages per pipeline rank (1 = plain 1F1B).
    pub vpp: usize,
    pub cp: usize,
    pub ep: usize,
    /// Expert tensor parallel size; `None` means "same as `tp`" (Megatron's default).
    pub etp: Option<usize>,
    pub sp: bool,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            tp: 1,
            pp: 1,
            vpp: 1,
            cp: 1,
            ep: 1,
            etp: None,
            sp: false,
        }
    }
}

/// A validated parallel layout. Construct with [`ParallelDims::new`]; the fields are private so that every value
/// of this type satisfies the invariants in the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParallelDims {
    world: usize,
    dp: usize,
    tp: usize,
    pp: usize,
    vpp: usize,
    ep: usize,
    etp: usize,
    cp: usize,
    sp: bool,
}

/// One violated rule of a layout (world-level) or of a layout against a model.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DimsProblem {
    #[error("{name} must be >= 1 (got 0)")]
    ZeroFactor { name: &'static str },
    #[error("world size {world} is not divisible by tp({tp})·pp({pp})·cp({cp}) = {product}")]
    WorldNotDivisible {
        world: usize,
        tp: usize,
        pp: usize,
        cp: usize,
        product: usize,
    },
    #[error(
        "ep({ep})·etp({etp}) = {product} must divide dp({dp})·cp({cp})·tp({tp}) = {dense} \
         (the expert layers of a pipeline stage are folded onto its dp·cp·tp ranks)"
    )]
    ExpertNotFolding {
        ep: usize,
        etp: usize,
        product: usize,
        dp: usize,
        cp: usize,
        tp: usize,
        dense: usize,
    },
    #[error("sp (sequence parallelism) requires tp > 1 (tp = {tp})")]
    SpWithoutTp { tp: usize },
    #[error("vpp({vpp}) > 1 (interleaved pipeline) requires pp > 1 (pp = {pp})")]
    VppWithoutPp { vpp: usize, pp: usize },
    #[error("attention heads {heads} are not divisible by tp({tp})")]
    HeadsNotDivisible { heads: usize, tp: usize },
    #[error(
        "kv heads {kv_heads} do not fit tp({tp}): need kv_heads % tp == 0, or kv_heads < tp with \
         tp % kv_heads == 0 (kv heads replicated)"
    )]
    KvHeadsNotDivisible { kv_heads: usize, tp: usize },
    #[error("attention heads {heads} are not a multiple of kv heads {kv_heads} (GQA)")]
    HeadsNotMultipleOfKv { heads: usize, kv_heads: usize },
    #[error("layers {layers} are not divisible by pp({pp})·vpp({vpp}) = {product}")]
    LayersNotDivisible {
        layers: usize,
        pp: usize,
        vpp: usize,
        product: usize,
    },
    #[error("ep({ep}) > 1 but the model has no experts")]
    EpWithoutExperts { ep: usize },
    #[error("experts {experts} are not divisible by ep({ep})")]
    ExpertsNotDivisible { experts: usize, ep: usize },
    #[error("intermediate size {size} is not divisible by tp({tp})")]
    FfnNotDivisible { size: usize, tp: usize },
    #[error("moe intermediate size {size} is not divisible by etp({etp})")]
    MoeFfnNotDivisible { size: usize, etp: usize },
    #[error("sequence length must be >= 1 (got 0)")]
    EmptySequence,
    #[error(
        "sequence length {seq} is not divisible by 2·cp({cp}) = {product} (causal load balancing)"
    )]
    SeqNotDivisibleByCp {
        seq: usize,
        cp: usize,
        product: usize,
    },
    #[error(
        "sequence length {seq} is not divisible by cp({cp})·tp({tp}) = {product} (sequence parallelism)"
    )]
    SeqNotDivisibleBySp {
        seq: usize,
        cp: usize,
        tp: usize,
        product: usize,
    },
}

/// Errors of this module. Each lists *every* violated rule, not only the first.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DimsError {
    #[error("invalid parallel layout for world size {world}: {}", join(.problems))]
    Layout {
        world: usize,
        problems: Vec<DimsProblem>,
    },
    #[error("parallel layout ({dims}) does not fit the model: {}", join(.problems))]
    Model {
        dims: String,
        problems: Vec<DimsProblem>,
    },
}

fn join(problems: &[DimsProblem]) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The numbers of a model that constrain the layout (plain numbers, so this module does not depend on a config
/// type). `moe_intermediate_size` is ignored when `experts == 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ModelShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub layers: usize,
    /// Routed experts per MoE layer; 0 for a dense model.
    pub experts: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    /// Training sequence length (packed `max_length`).
    pub seq_len: usize,
}

/// Coordinates of a rank in the dense view (order tp-cp-dp-pp).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DenseCoord {
    pub tp: usize,
    pub cp: usize,
    pub dp: usize,
    pub pp: usize,
}

/// Coordinates of a rank in the expert view (order etp-ep-edp-pp).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExpertCoord {
    pub etp: usize,
    pub ep: usize,
    pub edp: usize,
    pub pp: usize,
}

/// The kinds of process groups. The names are Megatron-Core's group tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupKind {
    /// Tensor parallel (dense view).
    Tp,
    /// Context parallel.
    Cp,
    /// Data parallel, for one `cp` coordinate.
    Dp,
    /// Data × context parallel: where dense-parameter gradients are reduced (CP ranks hold the same weights).
    DpCp,
    /// Pipeline parallel.
    Pp,
    /// Tensor × pipeline ("model parallel"): ranks that together hold one full copy of the model for one `cp`/`dp`.
    TpPp,
    /// Expert tensor parallel (expert view).
    Etp,
    /// Expert parallel (expert view).
    Ep,
    /// Expert tensor × expert parallel (the MoE token dispatcher's group when `etp > 1`).
    EtpEp,
    /// Expert data parallel: where expert-parameter gradients are reduced.
    ExpertDp,
    /// First and last pipeline stage of each pipeline group (tied word embeddings).
    Embedding,
}

impl GroupKind {
    pub const ALL: [GroupKind; 11] = [
        GroupKind::Tp,
        GroupKind::Cp,
        GroupKind::Dp,
        GroupKind::DpCp,
        GroupKind::Pp,
        GroupKind::TpPp,
        GroupKind::Etp,
        GroupKind::Ep,
        GroupKind::EtpEp,
        GroupKind::ExpertDp,
        GroupKind::Embedding,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GroupKind::Tp => "tp",
            GroupKind::Cp => "cp",
            GroupKind::Dp => "dp",
            GroupKind::DpCp => "dp-cp",
            GroupKind::Pp => "pp",
            GroupKind::TpPp => "tp-pp",
            GroupKind::Etp => "etp",
            GroupKind::Ep => "ep",
            GroupKind::EtpEp => "etp-ep",
            GroupKind::ExpertDp => "expert-dp",
            GroupKind::Embedding => "embedding",
        }
    }
}

impl fmt::Display for GroupKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl ParallelDims {
    /// Validates `cfg` against `world` and derives `dp` (and `edp`). On failure the error lists every violated
    /// rule, e.g. `world size 6 is not divisible by tp(4)·pp(1)·cp(1) = 4`.
    pub fn new(world: usize, cfg: ParallelConfig) -> Result<Self, DimsError> {
        let etp = cfg.etp.unwrap_or(cfg.tp);
        let mut problems = Vec::new();
        for (name, v) in [
            ("world size", world),
            ("tp", cfg.tp),
            ("pp", cfg.pp),
            ("vpp", cfg.vpp),
            ("cp", cfg.cp),
            ("ep", cfg.ep),
            // An unset etp follows tp, whose zero is already reported.
            ("etp", cfg.etp.unwrap_or(1)),
        ] {
            if v == 0 {
                problems.push(DimsProblem::ZeroFactor { name });
            }
        }
        if !problems.is_empty() {
            return Err(DimsError::Layout { world, problems });
        }
        let product = cfg.tp * cfg.pp * cfg.cp;
        let dp = world / product;
        if !world.is_multiple_of(product) {
            problems.push(DimsProblem::WorldNotDivisible {
                world,
                tp: cfg.tp,
                pp: cfg.pp,
                cp: cfg.cp,
                product,
            });
        } else {
            let dense = dp * cfg.cp * cfg.tp;
            if !dense.is_multiple_of(cfg.ep * etp) {
                problems.push(DimsProblem::ExpertNotFolding {
                    ep: cfg.ep,
                    etp,
                    product: cfg.ep * etp,
                    dp,
                    cp: cfg.cp,
                    tp: cfg.tp,
                    dense,
                });
            }
        }
        if cfg.sp && cfg.tp == 1 {
            problems.push(DimsProblem::SpWithoutTp { tp: cfg.tp });
        }
        if cfg.vpp > 1 && cfg.pp == 1 {
            problems.push(DimsProblem::VppWithoutPp {
                vpp: cfg.vpp,
                pp: cfg.pp,
            });
        }
        if !problems.is_empty() {
            return Err(DimsError::Layout { world, problems });
        }
        Ok(ParallelDims {
            world,
            dp,
            tp: cfg.tp,
            pp: cfg.pp,
            vpp: cfg.vpp,
            ep: cfg.ep,
            etp,
            cp: cfg.cp,
            sp: cfg.sp,
        })
    }

    /// The trivial layout of one rank.
    pub fn single() -> Self {
        ParallelDims {
            world: 1,
            dp: 1,
            tp: 1,
            pp: 1,
            vpp: 1,
            ep: 1,
            etp: 1,
            cp: 1,
            sp: false,
        }
    }

    /// Checks the model-dependent rules (listed in [`DimsProblem`]); reports every violation at once.
    pub fn validate_model(&self, m: &ModelShape) -> Result<(), DimsError> {
        let mut problems = Vec::new();
        let tp = self.tp;
        if !m.heads.is_multiple_of(tp) {
            problems.push(DimsProblem::HeadsNotDivisible { heads: m.heads, tp });
        }
        let kv_ok = m.kv_heads > 0
            && (m.kv_heads.is_multiple_of(tp)
                || (m.kv_heads < tp && tp.is_multiple_of(m.kv_heads)));
        if !kv_ok {
            problems.push(DimsProblem::KvHeadsNotDivisible {
                kv_heads: m.kv_heads,
                tp,
            });
        }
        if m.kv_heads > 0 && !m.heads.is_multiple_of(m.kv_heads) {
            problems.push(DimsProblem::HeadsNotMultipleOfKv {
                heads: m.heads,
                kv_heads: m.kv_heads,
            });
        }
        let chunks = self.pp * self.vpp;
        if !m.layers.is_multiple_of(chunks) || m.layers == 0 {
            problems.push(DimsProblem::LayersNotDivisible {
                layers: m.layers,
                pp: self.pp,
                vpp: self.vpp,
                product: chunks,
            });
        }
        if m.experts == 0 {
            if self.ep > 1 {
                problems.push(DimsProblem::EpWithoutExperts { ep: self.ep });
            }
        } else {
            if !m.experts.is_multiple_of(self.ep) {
                problems.push(DimsProblem::ExpertsNotDivisible {
                    experts: m.experts,
                    ep: self.ep,
                });
            }
            if !m.moe_intermediate_size.is_multiple_of(self.etp) {
                problems.push(DimsProblem::MoeFfnNotDivisible {
                    size: m.moe_intermediate_size,
                    etp: self.etp,
                });
            }
        }
        if !m.intermediate_size.is_multiple_of(tp) {
            problems.push(DimsProblem::FfnNotDivisible {
                size: m.intermediate_size,
                tp,
            });
        }
        if m.seq_len == 0 {
            problems.push(DimsProblem::EmptySequence);
        } else {
            if self.cp > 1 && !m.seq_len.is_multiple_of(2 * self.cp) {
                problems.push(DimsProblem::SeqNotDivisibleByCp {
                    seq: m.seq_len,
                    cp: self.cp,
                    product: 2 * self.cp,
                });
            }
            if self.sp && !m.seq_len.is_multiple_of(self.cp * tp) {
                problems.push(DimsProblem::SeqNotDivisibleBySp {
                    seq: m.seq_len,
                    cp: self.cp,
                    tp,
                    product: self.cp * tp,
                });
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(DimsError::Model {
                dims: self.to_string(),
                problems,
            })
        }
    }

    pub fn world(&self) -> usize {
        self.world
    }
    pub fn dp(&self) -> usize {
        self.dp
    }
    pub fn tp(&self) -> usize {
        self.tp
    }
    pub fn pp(&self) -> usize {
        self.pp
    }
    pub fn vpp(&self) -> usize {
        self.vpp
    }
    pub fn ep(&self) -> usize {
        self.ep
    }
    pub fn etp(&self) -> usize {
        self.etp
    }
    pub fn cp(&self) -> usize {
        self.cp
    }
    pub fn sp(&self) -> bool {
        self.sp
    }
    /// Expert data-parallel size `world / (etp·ep·pp)`.
    pub fn edp(&self) -> usize {
        self.world / (self.etp * self.ep * self.pp)
    }

    /// Sizes of the dense view, innermost first: `[tp, cp, dp, pp]`.
    pub fn dense_sizes(&self) -> [usize; 4] {
        [self.tp, self.cp, self.dp, self.pp]
    }

    /// Sizes of the expert view, innermost first: `[etp, ep, edp, pp]`.
    pub fn expert_sizes(&self) -> [usize; 4] {
        [self.etp, self.ep, self.edp(), self.pp]
    }

    /// Dense-view coordinates of `rank`.
    ///
    /// # Panics
    /// If `rank >= world`.
    pub fn coord(&self, rank: usize) -> DenseCoord {
        let [tp, cp, dp, pp] = decompose(rank, self.dense_sizes(), self.world);
        DenseCoord { tp, cp, dp, pp }
    }

    /// Inverse of [`coord`](Self::coord).
    ///
    /// # Panics
    /// If a coordinate is out of range.
    pub fn rank_of(&self, c: DenseCoord) -> usize {
        compose([c.tp, c.cp, c.dp, c.pp], self.dense_sizes())
    }

    /// Expert-view coordinates of `rank`.
    ///
    /// # Panics
    /// If `rank >= world`.
    pub fn expert_coord(&self, rank: usize) -> ExpertCoord {
        let [etp, ep, edp, pp] = decompose(rank, self.expert_sizes(), self.world);
        ExpertCoord { etp, ep, edp, pp }
    }

    /// Inverse of [`expert_coord`](Self::expert_coord).
    ///
    /// # Panics
    /// If a coordinate is out of range.
    pub fn expert_rank_of(&self, c: ExpertCoord) -> usize {
        compose([c.etp, c.ep, c.edp, c.pp], self.expert_sizes())
    }

    /// Pipeline stage of `rank` (the same in both views).
    pub fn pp_stage(&self, rank: usize) -> usize {
        self.coord(rank).pp
    }

    pub fn is_first_stage(&self, rank: usize) -> bool {
        self.pp_stage(rank) == 0
    }

    pub fn is_last_stage(&self, rank: usize) -> bool {
        self.pp_stage(rank) == self.pp - 1
    }

    /// Every group of `kind`, in Megatron's enumeration order (see the module docs). The groups partition
    /// `0..world`, except [`GroupKind::Embedding`], which covers only the first and last pipeline stages.
    pub fn groups(&self, kind: GroupKind) -> Vec<Vec<usize>> {
        let dense = self.dense_sizes();
        let expert = self.expert_sizes();
        //                                         innermost … outermost
        match kind {
            GroupKind::Tp => orthogonal_groups(&dense, &[true, false, false, false]),
            GroupKind::Cp => orthogonal_groups(&dense, &[false, true, false, false]),
            GroupKind::Dp => orthogonal_groups(&dense, &[false, false, true, false]),
            GroupKind::DpCp => orthogonal_groups(&dense, &[false, true, true, false]),
            GroupKind::Pp => orthogonal_groups(&dense, &[false, false, false, true]),
            GroupKind::TpPp => orthogonal_groups(&dense, &[true, false, false, true]),
            GroupKind::Etp => orthogonal_groups(&expert, &[true, false, false, false]),
            GroupKind::Ep => orthogonal_groups(&expert, &[false, true, false, false]),
            GroupKind::EtpEp => orthogonal_groups(&expert, &[true, true, false, false]),
            GroupKind::ExpertDp => orthogonal_groups(&expert, &[false, false, true, false]),
            GroupKind::Embedding => self
                .groups(GroupKind::Pp)
                .into_iter()
                .map(|g| {
                    let (first, last) = (g[0], g[g.len() - 1]);
                    if first == last {
                        vec![first]
                    } else {
                        vec![first, last]
                    }
                })
                .collect(),
        }
    }

    /// The group of `kind` that contains `rank`, or `None` (only possible for [`GroupKind::Embedding`] on a
    /// middle pipeline stage).
    ///
    /// # Panics
    /// If `rank >= world`.
    pub fn group_of(&self, kind: GroupKind, rank: usize) -> Option<Vec<usize>> {
        assert!(
            rank < self.world,
            "rank {rank} out of range for world size {}",
            self.world
        );
        self.groups(kind).into_iter().find(|g| g.contains(&rank))
    }
}

impl fmt::Display for ParallelDims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "world {} = dp {} × cp {} × tp {} × pp {} (vpp {}, ep {}, etp {}, edp {}, sp {})",
            self.world,
            self.dp,
            self.cp,
            self.tp,
            self.pp,
            self.vpp,
            self.ep,
            self.etp,
            self.edp(),
            if self.sp { "on" } else { "off" }
        )
    }
}

fn decompose<const N: usize>(rank: usize, sizes: [usize; N], world: usize) -> [usize; N] {
    assert!(
        rank < world,
        "rank {rank} out of range for world size {world}"
    );
    let mut rest = rank;
    let mut out = [0; N];
    for (o, s) in out.iter_mut().zip(sizes) {
        *o = rest % s;
        rest /= s;
    }
    out
}

fn compose<const N: usize>(coord: [usize; N], sizes: [usize; N]) -> usize {
    let mut rank = 0;
    let mut stride = 1;
    for (c, s) in coord.into_iter().zip(sizes) {
        assert!(c < s, "coordinate {c} out of range for size {s}");
        rank += c * stride;
        stride *= s;
    }
    rank
}

/// Megatron-Core's `generate_masked_orthogonal_rank_groups`, as a plain function.
///
/// `sizes` are the dimensions innermost first (rank = Σ coordᵢ·Πⱼ<ᵢ sizeⱼ); `vary[i]` says whether dimension `i`
/// varies inside a group. Returns `Π_{fixed} size` groups of `Π_{varying} size` ranks each. Groups are ordered by
/// the mixed-radix index of their fixed coordinates (innermost fastest), ranks inside a group by the mixed-radix
/// index of their varying coordinates (innermost fastest).
///
/// # Panics
/// If `sizes` and `vary` differ in length.
pub fn orthogonal_groups(sizes: &[usize], vary: &[bool]) -> Vec<Vec<usize>> {
    assert_eq!(
        sizes.len(),
        vary.len(),
        "sizes and vary must have the same length"
    );
    let mut strides = Vec::with_capacity(sizes.len());
    let mut s = 1;
    for &size in sizes {
        strides.push(s);
        s *= size;
    }
    let pick = |want: bool| -> Vec<(usize, usize)> {
        sizes
            .iter()
            .zip(&strides)
            .zip(vary)
            .filter(|&(_, &v)| v == want)
            .map(|((&sz, &st), _)| (sz, st))
            .collect()
    };
    let fixed = pick(false);
    let varying = pick(true);
    // Offset of the mixed-radix index `i` over `dims` (size, stride pairs), innermost first.
    let offset = |mut i: usize, dims: &[(usize, usize)]| -> usize {
        let mut off = 0;
        for &(size, stride) in dims {
            off += (i % size) * stride;
            i /= size;
        }
        off
    };
    let n_groups: usize = fixed.iter().map(|d| d.0).product();
    let group_size: usize = varying.iter().map(|d| d.0).product();
    (0..n_groups)
        .map(|g| {
            let base = offset(g, &fixed);
            (0..group_size)
                .map(|i| base + offset(i, &varying))
                .collect()
        })
        .collect()
}
