//! A training / inference batch as the model consumes it: flat host vectors of `batch·seq` entries, row-major.
//!
//! Conventions (the same as the golden fixtures in `tests/fixtures/`):
//! - `targets[t]` is the token the model should predict AT position `t` (`logits[t]` vs `targets[t]`), i.e.
//!   for plain causal LM `targets[b, t] = input_ids[b, t + 1]`;
//! - `loss_weights[t]` weighs that prediction; 0 means "not trained" (prompt, padding, last position of a
//!   sample); the loss is `Σ w·CE / Σ w`;
//! - `position_ids` are explicit so packed samples restart at 0;
//! - `segment_ids`, when present, keep packed samples from attending to each other.

use super::error::{ModelError, Result};

/// One batch of `batch` rows of `seq` tokens (see module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Rows.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// `[batch·seq]`
    pub input_ids: Vec<u32>,
    /// `[batch·seq]`
    pub position_ids: Vec<u32>,
    /// `[batch·seq]`, or `None` for one sample per row.
    pub segment_ids: Option<Vec<u32>>,
    /// `[batch·seq]`: token predicted at each position (any valid id where the weight is 0).
    pub targets: Vec<u32>,
    /// `[batch·seq]`
    pub loss_weights: Vec<f32>,
}

fn check_len(what: &str, len: usize, batch: usize, seq: usize) -> Result<()> {
    if len != batch * seq {
        return Err(ModelError::Batch(format!(
            "{what} has {len} entries, expected batch·seq = {batch}·{seq}"
        )));
    }
    Ok(())
}

impl Batch {
    /// Plain causal LM: one sample per row, positions `0..seq`, `targets[t] = input_ids[t+1]`, weight 1 everywhere
    /// except the last position of each row.
    pub fn causal_lm(input_ids: Vec<u32>, batch: usize, seq: usize) -> Result<Self> {
        check_len("input_ids", input_ids.len(), batch, seq)?;
        let mut targets = vec![0u32; batch * seq];
        let mut loss_weights = vec![0.0f32; batch * seq];
        for b in 0..batch {
            for t in 0..seq.saturating_sub(1) {
                targets[b * seq + t] = input_ids[b * seq + t + 1];
                loss_weights[b * seq + t] = 1.0;
            }
        }
        let position_ids = (0..batch).flat_map(|_| 0..seq as u32).collect();
        Ok(Batch {
            batch,
            seq,
            input_ids,
            position_ids,
            segment_ids: None,
            targets,
            loss_weights,
        })
    }

    /// Already-shifted labels as HF losses take them after shifting: `labels[t]` is the target at position `t`,
    /// `-100` (or any negative value) means ignored. Weights are 1 for kept labels, 0 for ignored ones.
    pub fn from_labels(
        input_ids: Vec<u32>,
        labels: &[i64],
        batch: usize,
        seq: usize,
    ) -> Result<Self> {
        check_len("input_ids", input_ids.len(), batch, seq)?;
        check_len("labels", labels.len(), batch, seq)?;
        let targets = labels
            .iter()
            .map(|&l| if l < 0 { 0 } else { l as u32 })
            .collect();
        let loss_weights = labels
            .iter()
            .map(|&l| if l < 0 { 0.0 } else { 1.0 })
            .collect();
        let position_ids = (0..batch).flat_map(|_| 0..seq as u32).collect();
        Ok(Batch {
            batch,
            seq,
            input_ids,
            position_ids,
            segment_ids: None,
            targets,
            loss_weights,
        })
    }

    /// Packed samples: `segment_ids [batch·seq]` marks which sample each token belongs to (equal ids must be
    /// contiguous within a row). Positions restart at 0 at every segment start; each token predicts the next
    /// token of its own segment; the last token of every segment gets weight 0.
    pub fn packed(
        input_ids: Vec<u32>,
        segment_ids: Vec<u32>,
        batch: usize,
        seq: usize,
    ) -> Result<Self> {
        check_len("input_ids", input_ids.len(), batch, seq)?;
        check_len("segment_ids", segment_ids.len(), batch, seq)?;
        let n = batch * seq;
        let (mut position_ids, mut targets, mut loss_weights) =
            (vec![0u32; n], vec![0u32; n], vec![0.0f32; n]);
        for b in 0..batch {
            let row = b * seq;
            for t in 0..seq {
                let i = row + t;
                let starts = t == 0 || segment_ids[i] != segment_ids[i - 1];
                position_ids[i] = if starts { 0 } else { position_ids[i - 1] + 1 };
                if t + 1 < seq && segment_ids[i + 1] == segment_ids[i] {
                    targets[i] = input_ids[i + 1];
                    loss_weights[i] = 1.0;
                }
            }
        }
        Ok(Batch {
            batch,
            seq,
            input_ids,
            position_ids,
            segment_ids: Some(segment_ids),
            targets,
            loss_weights,
        })
    }

    /// Multiplies the loss weights elementwise by `scale [batch·seq]` (ignored positions stay ignored).
    pub fn scale_loss_weights(mut self, scale: &[f32]) -> Result<Self> {
        check_len("loss weight scale", scale.len(), self.batch, self.seq)?;
        for (w, s) in self.loss_weights.iter_mut().zip(scale) {
            *w *= s;
        }
        Ok(self)
    }

    /// Number of tokens, `batch·seq`.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    /// Checks lengths and that every id and target is `< vocab_size`.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        let (b, s) = (self.batch, self.seq);
        if b == 0 || s == 0 {
            return Err(ModelError::Batch(format!("empty batch ({b}×{s})")));
        }
        check_len("input_ids", self.input_ids.len(), b, s)?;
        check_len("position_ids", self.position_ids.len(), b, s)?;
        check_len("targets", self.targets.len(), b, s)?;
        check_len("loss_weights", self.loss_weights.len(), b, s)?;
        if let Some(seg) = &self.segment_ids {
            check_len("segment_ids", seg.len(), b, s)?;
        }
        for (what, ids) in [("input id", &self.input_ids), ("target", &self.targets)] {
            if let Some((i, id)) = ids
                .iter()
                .enumerate()
                .find(|(_, id)| **id as usize >= vocab_size)
            {
                return Err(ModelError::Batch(format!(
                    "{what} {id} at index {i} >= vocab_size {vocab_size}"
                )));
            }
        }
        if let Some(w) = self
            .loss_weights
            .iter()
            .find(|w| !w.is_finite() || **w < 0.0)
        {
            return Err(ModelError::Batch(format!(
                "loss weight {w} is negative or not finite"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_lm_shifts_and_masks_the_last_position() {
        let b = Batch::causal_lm(vec![5, 6, 7, 8, 9, 10], 2, 3).unwrap();
        assert_eq!(b.targets, vec![6, 7, 0, 9, 10, 0]);
        assert_eq!(b.loss_weights, vec![1.0, 1.0, 0.0, 1.0, 1.0, 0.0]);
        assert_eq!(b.position_ids, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn packed_restarts_positions_and_never_predicts_across_samples() {
        let b = Batch::packed(vec![11, 12, 13, 21, 22, 31], vec![0, 0, 0, 1, 1, 2], 1, 6).unwrap();
        assert_eq!(b.position_ids, vec![0, 1, 2, 0, 1, 0]);
        assert_eq!(b.targets, vec![12, 13, 0, 22, 0, 0]);
        assert_eq!(b.loss_weights, vec![1.0, 1.0, 0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn labels_and_scaling() {
        let b = Batch::from_labels(vec![1, 2, 3], &[2, -100, 4], 1, 3)
            .unwrap()
            .scale_loss_weights(&[0.5, 3.0, 2.0]);
        let b = b.unwrap();
        assert_eq!(b.targets, vec![2, 0, 4]);
        assert_eq!(b.loss_weights, vec![0.5, 0.0, 2.0]);
        assert!(b.validate(5).is_ok());
        assert!(matches!(b.validate(4), Err(ModelError::Batch(_))));
        assert!(Batch::causal_lm(vec![1, 2, 3], 2, 2).is_err());
    }
}
