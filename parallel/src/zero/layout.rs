//! [`FlatLayout`]: where every parameter of a rank sits in the flat buffer the distributed optimizers shard over
//! the data-parallel group, and which pieces of it this rank owns. Shared by the host
//! ([`super::DistributedOptimizer`]) and device ([`super::DeviceDistributedOptimizer`]) optimizers, so both shard
//! identically and their checkpoints are interchangeable.
//!
//! Invariants: segments are laid end to end in [`ParamSet`] visiting order starting at 0; `padded` is the total
//! `N` rounded up to a multiple of the DP size `d`; DP rank `r` owns `S_r = chunk_range(padded, d, r)`
//! (= `[r·N'/d, (r+1)·N'/d)`); the pieces of `S_r` are its intersections with the segments, in order, and they
//! cover `S_r ∩ [0, N)` without gaps (the padding is the tail of the buffer).

use std::ops::Range;

use super::{ParamSet, Result, ShardPiece, StepStats, ZeroError};
use crate::comm::{Communicator, ReduceOp, chunk_range};
use crate::optim::{OptimError, clip_coefficient, decays};

/// One parameter's place in the flat buffer.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub(crate) name: String,
    pub(crate) shape: Vec<usize>,
    /// Range in the flat buffer.
    pub(crate) range: Range<usize>,
    pub(crate) weight_decay: f64,
    pub(crate) counts_in_norm: bool,
}

/// The flat layout of one rank's parameters and its DP shard (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct FlatLayout {
    pub(crate) segments: Vec<Segment>,
    /// `N'`: padded flat length (a multiple of the DP size).
    pub(crate) padded: usize,
    pub(crate) dp: usize,
    pub(crate) dp_rank: usize,
    /// This rank's range `S_r` of the flat buffer.
    pub(crate) shard: Range<usize>,
}

impl FlatLayout {
    /// The layout of `params` for DP rank `dp_rank` of `dp_size`: matrices get `weight_decay`, 1-D tensors none
    /// ([`decays`]); `counts_in_norm(name)` says whether this rank counts the tensor in the global norm.
    pub(crate) fn new(
        params: &(impl ParamSet + ?Sized),
        dp_size: usize,
        dp_rank: usize,
        weight_decay: f64,
        counts_in_norm: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        if dp_size == 0 || dp_rank >= dp_size {
            return Err(ZeroError::Optim(OptimError::Invalid {
                key: "dp",
                reason: format!("rank {dp_rank} of a DP group of {dp_size}"),
            }));
        }
        if !(weight_decay >= 0.0 && weight_decay.is_finite()) {
            return Err(ZeroError::Optim(OptimError::Invalid {
                key: "weight_decay",
                reason: format!("must be a finite number >= 0, got {weight_decay}"),
            }));
        }
        let mut segments = Vec::new();
        let mut off = 0;
        params.visit_params(&mut |name, t| {
            let n = t.elem_count();
            segments.push(Segment {
                counts_in_norm: counts_in_norm(&name),
                weight_decay: if decays(t.shape()) { weight_decay } else { 0.0 },
                name,
                shape: t.shape().to_vec(),
                range: off..off + n,
            });
            off += n;
        });
        let padded = off.div_ceil(dp_size) * dp_size;
        Ok(FlatLayout {
            segments,
            padded,
            dp: dp_size,
            dp_rank,
            shard: chunk_range(padded, dp_size, dp_rank),
        })
    }

    /// `(segment index, range relative to the shard)` of every parameter piece inside this rank's shard, in order.
    pub(crate) fn pieces(&self) -> Vec<(usize, Range<usize>)> {
        let (s, e) = (self.shard.start, self.shard.end);
        self.segments
            .iter()
            .enumerate()
            .filter_map(|(i, seg)| {
                let lo = seg.range.start.max(s);
                let hi = seg.range.end.min(e);
                (lo < hi).then(|| (i, lo - s..hi - s))
            })
            .collect()
    }

    /// The pieces of this rank's shard as [`ShardPiece`]s (name, elements of the parameter, range in the shard).
    pub(crate) fn shard_pieces(&self) -> Vec<ShardPiece<'_>> {
        let base = self.shard.start;
        self.pieces()
            .into_iter()
            .map(|(si, r)| {
                let seg = &self.segments[si];
                let abs = r.start + base..r.end + base;
                ShardPiece {
                    name: &seg.name,
                    param: abs.start - seg.range.start..abs.end - seg.range.start,
                    shard: r,
                }
            })
            .collect()
    }

    /// `(name, range in the flat buffer)` of every parameter, in layout order.
    pub(crate) fn ranges(&self) -> impl Iterator<Item = (&str, Range<usize>)> {
        self.segments
            .iter()
            .map(|s| (s.name.as_str(), s.range.clone()))
    }

    /// Fails unless `dp` is the group this layout was built for.
    pub(crate) fn check_dp(&self, dp: &dyn Communicator) -> Result<()> {
        if dp.size() != self.dp || dp.rank() != self.dp_rank {
            return Err(ZeroError::Optim(OptimError::Invalid {
                key: "dp",
                reason: format!(
                    "communicator is rank {} of {}, the optimizer was built for rank {} of {}",
                    dp.rank(),
                    dp.size(),
                    self.dp_rank,
                    self.dp
                ),
            }));
        }
        Ok(())
    }

    /// Checks that every buffer of `values` (a shard's masters and moments) has the shard's length.
    pub(crate) fn check_shard_values(&self, values: &[&[f32]]) -> Result<()> {
        let n = self.shard.len();
        if values.iter().any(|v| v.len() != n) {
            let got: Vec<usize> = values.iter().map(|v| v.len()).collect();
            return Err(ZeroError::Layout {
                name: format!("<shard of {n} values; got {got:?}>"),
            });
        }
        Ok(())
    }

    /// Checks that `t` (a gradient, moment or parameter handed in for segment `seg`) has the segment's shape.
    pub(crate) fn check_shape(&self, seg: &Segment, t: &qkernels::Tensor) -> Result<()> {
        if t.shape() != seg.shape.as_slice() {
            return Err(ZeroError::GradShape {
                name: seg.name.clone(),
                expected: seg.shape.clone(),
                got: t.shape().to_vec(),
            });
        }
        Ok(())
    }

    /// Replaces every parameter of `params` by `value(segment, current tensor)`, walking the parameters and the
    /// segments together (a name or shape that differs from the layout is [`ZeroError::Layout`]). On error the
    /// parameters before the failing one are already replaced.
    pub(crate) fn assign(
        &self,
        params: &mut (impl ParamSet + ?Sized),
        value: &mut dyn FnMut(&Segment, &qkernels::Tensor) -> Result<qkernels::Tensor>,
    ) -> Result<()> {
        let mut k = 0;
        let mut err = None;
        params.visit_params_mut(&mut |name, t| {
            if err.is_some() {
                return;
            }
            let Some(seg) = self
                .segments
                .get(k)
                .filter(|s| s.name == name && s.shape == t.shape())
            else {
                err = Some(ZeroError::Layout { name });
                return;
            };
            match value(seg, t) {
                Ok(v) => *t = v,
                Err(e) => err = Some(e),
            }
            k += 1;
        });
        match (err, k == self.segments.len()) {
            (Some(e), _) => Err(e),
            (None, true) => Ok(()),
            (None, false) => Err(ZeroError::Layout {
                name: self.segments[k].name.clone(),
            }),
        }
    }
}

/// The global gradient norm from this rank's partial sum of squares — all-reduced (f32 on the wire) over `dp`,
/// then over every group of `norm_groups` (the model-parallel groups whose ranks hold different parts of the
/// model) — and what a step does with it: torch's clipping factor for `max_grad_norm` (`None`: 1), or
/// `skipped` when the norm is not finite. Collective over all the groups.
pub(crate) fn norm_and_clip(
    local_sumsq: f64,
    dp: &dyn Communicator,
    norm_groups: &[&dyn Communicator],
    max_grad_norm: Option<f64>,
) -> Result<StepStats> {
    let mut total = [local_sumsq as f32];
    for c in std::iter::once(dp).chain(norm_groups.iter().copied()) {
        if c.size() > 1 {
            c.all_reduce(&mut total, ReduceOp::Sum)?;
        }
    }
    let grad_norm = (total[0] as f64).sqrt();
    let skipped = !grad_norm.is_finite();
    let clip_coef = match max_grad_norm {
        Some(m) if !skipped => clip_coefficient(grad_norm, m),
        _ => 1.0,
    };
    Ok(StepStats {
        grad_norm,
        clip_coef,
        skipped,
    })
}
