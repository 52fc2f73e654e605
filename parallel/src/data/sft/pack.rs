//! Packing (first-fit decreasing) and the micro-batches of SFT samples.
//!
//! - Unpacked: a micro-batch is its samples right-padded to the longest one (`seq` = that length); pads have
//!   weight 0, positions `0..seq` per row, no `segment_ids`.
//! - Packed: each row is exactly `max_length` tokens: its samples back to back, segment `k` for the `k`-th
//!   sample, positions restarting at 0 per sample, each sample's last token with weight 0, then padding as one
//!   more segment (weight 0) so no sample attends to it. Because attention respects segments and positions
//!   restart, every trained token sees exactly what it sees unpacked: the packed loss equals the unpacked
//!   loss over the same samples (`Σ w·CE / Σ w` has the same terms).
//!
//! Pad tokens still pass through the model, so an MoE router's aux-loss statistics count them (as in
//! Megatron without a router mask).

use super::SftSample;
use crate::model::Batch;

/// First-fit decreasing: samples by length, longest first (ties by index), each into the first row with
/// room. Every length must be `≤ capacity`. Returns each row's sample indices in insertion order; rows are
/// in the order they were opened. Deterministic, `O(n log n)` (a max segment tree over row room).
pub fn first_fit_decreasing(lengths: &[usize], capacity: usize) -> Vec<Vec<u32>> {
    let n = lengths.len();
    if n == 0 {
        return Vec::new();
    }
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i as usize]));
    let leaves = n.next_power_of_two();
    // tree[1] is the root; leaf j is tree[leaves + j]; unopened rows have full room.
    let mut tree = vec![capacity; 2 * leaves];
    let mut rows: Vec<Vec<u32>> = Vec::new();
    for i in order {
        let len = lengths[i as usize];
        assert!(
            len <= capacity,
            "sample of {len} tokens does not fit rows of {capacity}"
        );
        let mut node = 1;
        while node < leaves {
            node = if tree[2 * node] >= len {
                2 * node
            } else {
                2 * node + 1
            };
        }
        let row = node - leaves;
        if row == rows.len() {
            rows.push(Vec::new());
        }
        rows[row].push(i);
        tree[node] -= len;
        node /= 2;
        while node >= 1 {
            tree[node] = tree[2 * node].max(tree[2 * node + 1]);
            node /= 2;
        }
    }
    rows
}

/// Samples right-padded to the longest (see the module docs).
pub fn padded_batch(samples: &[&SftSample], pad_id: u32) -> Batch {
    let rows = samples.len();
    let seq = samples.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
    let n = rows * seq;
    let mut b = Batch {
        batch: rows,
        seq,
        input_ids: vec![pad_id; n],
        position_ids: (0..rows).flat_map(|_| 0..seq as u32).collect(),
        segment_ids: None,
        targets: vec![pad_id; n],
        loss_weights: vec![0.0; n],
    };
    for (r, s) in samples.iter().enumerate() {
        let at = r * seq;
        write_sample(&mut b, at, s);
    }
    b
}

/// Packed rows of exactly `seq` tokens (see the module docs); `rows[i]` are the samples of row `i`, their
/// lengths summing to at most `seq`.
pub fn packed_batch(rows: &[Vec<&SftSample>], seq: usize, pad_id: u32) -> Batch {
    let n = rows.len() * seq;
    let mut b = Batch {
        batch: rows.len(),
        seq,
        input_ids: vec![pad_id; n],
        position_ids: vec![0; n],
        segment_ids: Some(vec![0; n]),
        targets: vec![pad_id; n],
        loss_weights: vec![0.0; n],
    };
    for (r, samples) in rows.iter().enumerate() {
        let mut at = r * seq;
        let end = at + seq;
        let segments = b.segment_ids.as_mut().expect("set above");
        for (k, s) in samples.iter().enumerate() {
            segments[at..at + s.len()].fill(k as u32);
            at += s.len();
        }
        assert!(at <= end, "packed row {r} holds more than {seq} tokens");
        segments[at..end].fill(samples.len() as u32);
        for (p, slot) in b.position_ids[at..end].iter_mut().enumerate() {
            *slot = p as u32;
        }
        let mut at = r * seq;
        for s in samples {
            write_sample(&mut b, at, s);
            at += s.len();
        }
    }
    b
}

/// Writes `s` at flat index `at`: ids, positions `0..len`, targets (next ids) and weights.
fn write_sample(b: &mut Batch, at: usize, s: &SftSample) {
    let len = s.len();
    b.input_ids[at..at + len].copy_from_slice(&s.input_ids);
    for t in 0..len {
        b.position_ids[at + t] = t as u32;
        if t + 1 < len {
            b.targets[at + t] = s.input_ids[t + 1];
        }
        b.loss_weights[at + t] = s.loss_weights[t];
    }
}
