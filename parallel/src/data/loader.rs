//! The seeded, resumable loader over any [`Dataset`] of training units (pretraining sequences, SFT samples or
//! packed SFT rows).

use serde::{Deserialize, Serialize};

use super::pretrain::PretrainDataset;
use super::sft::SftDataset;
use super::{DataError, Result};
use crate::model::Batch;

/// A dataset the [`DataLoader`] hands out: `len` units, any list of which becomes one [`Batch`].
pub trait Dataset {
    /// Number of units (≥ 1 for a loaded dataset).
    fn len(&self) -> usize;
    /// True when the dataset has no unit.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The micro-batch made of `units` (indices `< len`), one row per unit, in this order.
    fn batch(&self, units: &[u32]) -> Batch;
    /// Whether epochs visit the units in a seeded random order (`true`) or in dataset order.
    fn shuffled(&self) -> bool {
        true
    }
}

/// Where a [`DataLoader`] stands: the next unit is `order(seed, epoch)[position]`, with `order` =
/// [`epoch_order`] for a shuffled dataset and the identity otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    pub epoch: u64,
    pub position: u64,
}

/// splitmix64: a tiny, well-mixed generator whose output is fixed forever.
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The order of the `len` units in `epoch`: a Fisher–Yates shuffle seeded by `(seed, epoch)`.
pub fn epoch_order(seed: u64, epoch: u64, len: usize) -> Vec<u32> {
    let mut state = seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
    splitmix64(&mut state);
    let mut order: Vec<u32> = (0..len as u32).collect();
    for i in (1..len).rev() {
        // Multiply-shift maps 64 random bits onto 0..=i with negligible bias for corpus-sized i.
        let j = ((splitmix64(&mut state) as u128 * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    order
}

/// Hands out units in the order of each epoch, wrapping into the next epoch.
#[derive(Debug, Clone)]
pub struct DataLoader<D: Dataset = PretrainDataset> {
    dataset: D,
    seed: u64,
    cursor: DataCursor,
    /// The order of `cursor.epoch`.
    order: Vec<u32>,
}

impl<D: Dataset> DataLoader<D> {
    /// A loader positioned at `cursor` (use `DataCursor::default()` to start).
    pub fn new(dataset: D, seed: u64, cursor: DataCursor) -> Result<Self> {
        if cursor.position >= dataset.len() as u64 {
            return Err(DataError::Invalid {
                key: "data cursor",
                reason: format!(
                    "position {} is past the {} units of the dataset (was it changed since the checkpoint?)",
                    cursor.position,
                    dataset.len()
                ),
            });
        }
        let order = Self::order_of(&dataset, seed, cursor.epoch);
        Ok(DataLoader {
            dataset,
            seed,
            cursor,
            order,
        })
    }

    fn order_of(dataset: &D, seed: u64, epoch: u64) -> Vec<u32> {
        if dataset.shuffled() {
            epoch_order(seed, epoch, dataset.len())
        } else {
            (0..dataset.len() as u32).collect()
        }
    }

    /// The cursor of the next unit.
    pub fn cursor(&self) -> DataCursor {
        self.cursor
    }

    pub fn dataset(&self) -> &D {
        &self.dataset
    }

    /// The index of the next unit; advances the cursor (into the next epoch after the last one).
    pub fn next_index(&mut self) -> u32 {
        let idx = self.order[self.cursor.position as usize];
        self.cursor.position += 1;
        if self.cursor.position == self.dataset.len() as u64 {
            self.cursor = DataCursor {
                epoch: self.cursor.epoch + 1,
                position: 0,
            };
            self.order = Self::order_of(&self.dataset, self.seed, self.cursor.epoch);
        }
        idx
    }

    /// The next `rows` units as one micro-batch ([`Dataset::batch`]).
    pub fn next_batch(&mut self, rows: usize) -> Batch {
        let units: Vec<u32> = (0..rows).map(|_| self.next_index()).collect();
        self.dataset.batch(&units)
    }
}

impl DataLoader<PretrainDataset> {
    /// The next sequence; advances the cursor (into the next epoch after the last one).
    pub fn next_sequence(&mut self) -> &[u32] {
        let idx = self.next_index() as usize;
        self.dataset.sequence(idx)
    }
}

/// The training data of a run: pretraining sequences or SFT samples, behind one [`Dataset`].
#[derive(Debug, Clone)]
pub enum TrainDataset {
    Pretrain(PretrainDataset),
    Sft(SftDataset),
}

impl Dataset for TrainDataset {
    fn len(&self) -> usize {
        match self {
            TrainDataset::Pretrain(d) => d.len(),
            TrainDataset::Sft(d) => Dataset::len(d),
        }
    }

    fn batch(&self, units: &[u32]) -> Batch {
        match self {
            TrainDataset::Pretrain(d) => d.batch(units),
            TrainDataset::Sft(d) => d.batch(units),
        }
    }

    fn shuffled(&self) -> bool {
        match self {
            TrainDataset::Pretrain(d) => d.shuffled(),
            TrainDataset::Sft(d) => d.shuffled(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_a_seeded_permutation() {
        let a = epoch_order(7, 0, 50);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<u32>>());
        assert_eq!(a, epoch_order(7, 0, 50));
        assert_ne!(a, epoch_order(7, 1, 50));
        assert_ne!(a, epoch_order(8, 0, 50));
        assert_ne!(a, (0..50).collect::<Vec<u32>>());
    }

    #[test]
    fn cursor_resumes_the_same_stream_across_epochs() {
        let ds = PretrainDataset::from_stream((0..23).collect(), 4).unwrap();
        assert_eq!((ds.len(), ds.stream_tokens()), (5, 23));
        assert_eq!(ds.sequence(1), &[4, 5, 6, 7]);
        let mut full = DataLoader::new(ds.clone(), 3, DataCursor::default()).unwrap();
        let all: Vec<Vec<u32>> = (0..12).map(|_| full.next_sequence().to_vec()).collect();
        // Every epoch visits each sequence once.
        let mut first: Vec<u32> = all[..5].iter().map(|s| s[0] / 4).collect();
        first.sort();
        assert_eq!(first, vec![0, 1, 2, 3, 4]);
        let mut part = DataLoader::new(ds.clone(), 3, DataCursor::default()).unwrap();
        for _ in 0..7 {
            part.next_sequence();
        }
        assert_eq!(
            part.cursor(),
            DataCursor {
                epoch: 1,
                position: 2
            }
        );
        let mut resumed = DataLoader::new(ds.clone(), 3, part.cursor()).unwrap();
        let rest: Vec<Vec<u32>> = (7..12).map(|_| resumed.next_sequence().to_vec()).collect();
        assert_eq!(rest, all[7..].to_vec());
        assert!(
            DataLoader::new(
                ds,
                3,
                DataCursor {
                    epoch: 0,
                    position: 5
                }
            )
            .is_err()
        );
        assert!(matches!(
            PretrainDataset::from_stream(vec![1, 2, 3], 4),
            Err(DataError::TooSmall {
                tokens: 3,
                max_length: 4
            })
        ));
    }

    /// A dataset in file order: every epoch is `0..len`.
    struct Sequential(usize);

    impl Dataset for Sequential {
        fn len(&self) -> usize {
            self.0
        }
        fn batch(&self, units: &[u32]) -> Batch {
            Batch::causal_lm(units.iter().flat_map(|&u| [u, u]).collect(), units.len(), 2).unwrap()
        }
        fn shuffled(&self) -> bool {
            false
        }
    }

    #[test]
    fn unshuffled_datasets_are_visited_in_order() {
        let mut l = DataLoader::new(Sequential(3), 9, DataCursor::default()).unwrap();
        let got: Vec<u32> = (0..7).map(|_| l.next_index()).collect();
        assert_eq!(got, vec![0, 1, 2, 0, 1, 2, 0]);
        let b = l.next_batch(2);
        assert_eq!(b.input_ids, vec![1, 1, 2, 2]);
        assert_eq!(
            l.cursor(),
            DataCursor {
                epoch: 3,
                position: 0
            }
        );
    }
}
