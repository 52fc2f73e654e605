//! Which layers each pipeline rank holds ([`StageLayout`]) and how a global batch is cut into micro-batches
//! ([`micro_batches`]).

use std::ops::Range;

use super::{PipelineError, Result};
use crate::model::Batch;

/// The assignment of `layers` decoder layers to `pp` ranks × `vpp` chunks: virtual stage `s = chunk·pp + rank` holds
/// the contiguous layers `[s·L/(pp·vpp), (s+1)·L/(pp·vpp))`. Rank 0's chunk 0 (stage 0) also holds the embedding;
/// rank `pp − 1`'s chunk `vpp − 1` (the last stage) the final norm, the LM head and the loss.
///
/// Example, `L = 8, pp = 2, vpp = 2` (stages of 2 layers): rank 0 holds layers 0–1 (chunk 0) and 4–5 (chunk 1), rank
/// 1 holds 2–3 and 6–7; the activation path is rank 0 → 1 → 0 → 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StageLayout {
    pub layers: usize,
    pub pp: usize,
    pub vpp: usize,
}

impl StageLayout {
    /// Needs `layers % (pp·vpp) == 0` and every factor ≥ 1.
    pub fn new(layers: usize, pp: usize, vpp: usize) -> Result<Self> {
        if pp == 0 || vpp == 0 || layers == 0 || !layers.is_multiple_of(pp * vpp) {
            return Err(PipelineError::Layers { layers, pp, vpp });
        }
        Ok(StageLayout { layers, pp, vpp })
    }

    /// Layers per virtual stage, `L/(pp·vpp)`.
    pub fn layers_per_chunk(&self) -> usize {
        self.layers / (self.pp * self.vpp)
    }

    /// Global layer indices of chunk `chunk` of pipeline rank `rank`.
    pub fn chunk_layers(&self, rank: usize, chunk: usize) -> Range<usize> {
        let n = self.layers_per_chunk();
        let s = chunk * self.pp + rank;
        s * n..(s + 1) * n
    }

    /// `(rank, chunk)` holding global layer `layer`.
    pub fn owner(&self, layer: usize) -> (usize, usize) {
        let s = layer / self.layers_per_chunk();
        (s % self.pp, s / self.pp)
    }

    /// Is `(rank, chunk)` the first virtual stage (embedding)?
    pub fn is_first(&self, rank: usize, chunk: usize) -> bool {
        rank == 0 && chunk == 0
    }

    /// Is `(rank, chunk)` the last virtual stage (final norm, head, loss)?
    pub fn is_last(&self, rank: usize, chunk: usize) -> bool {
        rank == self.pp - 1 && chunk == self.vpp - 1
    }
}

/// `global_batch_size / (micro_batch_size · dp)`, checked to divide exactly.
pub fn num_micro_batches(
    global_batch_size: usize,
    micro_batch_size: usize,
    dp: usize,
) -> Result<usize> {
    let per_step = micro_batch_size * dp;
    if per_step == 0 || global_batch_size == 0 || !global_batch_size.is_multiple_of(per_step) {
        return Err(PipelineError::MicroBatches {
            global: global_batch_size,
            micro: micro_batch_size,
            dp,
        });
    }
    Ok(global_batch_size / per_step)
}

/// The micro-batches DP rank `dp_rank` runs from a global batch of `global.batch` rows (Megatron's sampler order):
/// global micro-batch `m` is rows `[m·b·dp, (m+1)·b·dp)` (`b = micro_batch_size`), and DP rank `r` runs its rows
/// `[m·b·dp + r·b, m·b·dp + (r+1)·b)`. With one micro-batch this is
/// [`split_batch_rows`](crate::tensor_parallel::split_batch_rows).
pub fn micro_batches(
    global: &Batch,
    micro_batch_size: usize,
    dp: usize,
    dp_rank: usize,
) -> Result<Vec<Batch>> {
    let m = num_micro_batches(global.batch, micro_batch_size, dp)?;
    if dp_rank >= dp {
        return Err(PipelineError::MicroBatches {
            global: global.batch,
            micro: micro_batch_size,
            dp,
        });
    }
    let seq = global.seq;
    Ok((0..m)
        .map(|mb| {
            let row0 = mb * micro_batch_size * dp + dp_rank * micro_batch_size;
            rows(global, row0, micro_batch_size, seq)
        })
        .collect())
}

/// Global micro-batch `m` (all DP ranks' rows of it, in DP order): what the single-rank reference runs as its
/// `m`-th accumulation step.
pub fn global_micro_batch(
    global: &Batch,
    micro_batch_size: usize,
    dp: usize,
    m: usize,
) -> Result<Batch> {
    let n = num_micro_batches(global.batch, micro_batch_size, dp)?;
    if m >= n {
        return Err(PipelineError::MicroBatches {
            global: global.batch,
            micro: micro_batch_size,
            dp,
        });
    }
    Ok(rows(
        global,
        m * micro_batch_size * dp,
        micro_batch_size * dp,
        global.seq,
    ))
}

fn rows(global: &Batch, row0: usize, n: usize, seq: usize) -> Batch {
    let r = row0 * seq..(row0 + n) * seq;
    Batch {
        batch: n,
        seq,
        input_ids: global.input_ids[r.clone()].to_vec(),
        position_ids: global.position_ids[r.clone()].to_vec(),
        segment_ids: global.segment_ids.as_ref().map(|s| s[r.clone()].to_vec()),
        targets: global.targets[r.clone()].to_vec(),
        loss_weights: global.loss_weights[r].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_assignment() {
        let l = StageLayout::new(8, 2, 2).unwrap();
        assert_eq!(l.chunk_layers(0, 0), 0..2);
        assert_eq!(l.chunk_layers(1, 0), 2..4);
        assert_eq!(l.chunk_layers(0, 1), 4..6);
        assert_eq!(l.chunk_layers(1, 1), 6..8);
        for layer in 0..8 {
            let (r, c) = l.owner(layer);
            assert!(l.chunk_layers(r, c).contains(&layer));
        }
        assert!(l.is_first(0, 0) && l.is_last(1, 1) && !l.is_last(1, 0));
        assert!(matches!(
            StageLayout::new(6, 2, 2),
            Err(PipelineError::Layers {
                layers: 6,
                pp: 2,
                vpp: 2
            })
        ));
    }

    #[test]
    fn micro_batch_rows_follow_megatrons_sampler() {
        let ids: Vec<u32> = (0..8 * 2).collect(); // 8 rows of 2 tokens: row i holds 2i, 2i+1
        let g = Batch::causal_lm(ids, 8, 2).unwrap();
        assert_eq!(num_micro_batches(8, 2, 2).unwrap(), 2);
        let r1 = micro_batches(&g, 2, 2, 1).unwrap();
        assert_eq!(r1.len(), 2);
        // micro-batch 0: rows 0..4, DP rank 1 takes rows 2, 3; micro-batch 1: rows 4..8 → rows 6, 7.
        assert_eq!(r1[0].input_ids, vec![4, 5, 6, 7]);
        assert_eq!(r1[1].input_ids, vec![12, 13, 14, 15]);
        assert_eq!(
            global_micro_batch(&g, 2, 2, 1).unwrap().input_ids,
            (8..16).collect::<Vec<_>>()
        );
        assert!(matches!(
            num_micro_batches(8, 3, 2),
            Err(PipelineError::MicroBatches {
                global: 8,
                micro: 3,
                dp: 2
            })
        ));
    }
}
