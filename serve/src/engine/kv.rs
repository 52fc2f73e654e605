//! Paged KV cache: fixed-size blocks, a block allocator and per-sequence block tables.
//!
//! Layout (host memory, CPU backend): for every layer one `k` and one `v` pool of
//! `[num_blocks, block_size, kv_heads, head_dim]` f32. A sequence owns an ordered list of block ids, its
//! [`BlockTable`]; the K/V of its token at position `p` live in block `table[p / block_size]`, slot
//! `p % block_size`, so a sequence's cache needs no contiguous memory and grows one block at a time.
//!
//! Invariants:
//! - a block id is either in the allocator's free list or owned by exactly one block table;
//! - `blocks_in_use() + free_blocks() == num_blocks()` at all times;
//! - a table of `n` blocks covers positions `0..n·block_size`; the engine writes position `p` only after the
//!   table covers it ([`KvCache::reserve`]) and frees the whole table when the sequence ends or is aborted
//!   ([`KvCache::release`]).

use super::error::EngineError;

/// Sizes of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool (shared by all sequences); 0 lets the engine size it (see
    /// `EngineConfig::kv_cache_bytes`).
    pub num_blocks: usize,
}

impl Default for KvCacheConfig {
    fn default() -> Self {
        KvCacheConfig {
            block_size: 16,
            num_blocks: 0,
        }
    }
}

/// The block ids one sequence owns, in position order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<u32>,
}

impl BlockTable {
    /// The block ids, in position order.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Number of blocks owned.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// True when no block is owned.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// LIFO free list of block ids.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<u32>,
    num_blocks: usize,
}

impl BlockAllocator {
    /// All `num_blocks` blocks free.
    pub fn new(num_blocks: usize) -> Self {
        BlockAllocator {
            free: (0..num_blocks as u32).rev().collect(),
            num_blocks,
        }
    }

    /// One free block, or `None` when the pool is exhausted.
    pub fn allocate(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// Returns blocks to the pool.
    pub fn free(&mut self, blocks: impl IntoIterator<Item = u32>) {
        for b in blocks {
            debug_assert!((b as usize) < self.num_blocks && !self.free.contains(&b));
            self.free.push(b);
        }
    }

    /// Blocks available.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks owned by some table.
    pub fn blocks_in_use(&self) -> usize {
        self.num_blocks - self.free.len()
    }

    /// Pool size.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
}

/// K and V pools of one layer, `[num_blocks, block_size, kv_heads, head_dim]` each.
#[derive(Debug, Clone)]
struct LayerPool {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The paged cache of all layers plus its allocator (see module docs).
#[derive(Debug, Clone)]
pub struct KvCache {
    config: KvCacheConfig,
    kv_heads: usize,
    head_dim: usize,
    layers: Vec<LayerPool>,
    allocator: BlockAllocator,
}

impl KvCache {
    /// An empty cache for `layers` layers of `kv_heads × head_dim` keys and values.
    pub fn new(
        config: KvCacheConfig,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self, EngineError> {
        if config.block_size == 0 || config.num_blocks == 0 {
            return Err(EngineError::InvalidConfig(format!(
                "KV cache needs block_size > 0 and num_blocks > 0, got {config:?}"
            )));
        }
        let n = config.num_blocks * config.block_size * kv_heads * head_dim;
        Ok(KvCache {
            config,
            kv_heads,
            head_dim,
            layers: (0..layers)
                .map(|_| LayerPool {
                    k: vec![0.0; n],
                    v: vec![0.0; n],
                })
                .collect(),
            allocator: BlockAllocator::new(config.num_blocks),
        })
    }

    /// The cache's sizes.
    pub fn config(&self) -> KvCacheConfig {
        self.config
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.config.block_size)
    }

    /// Grows `table` so that it covers positions `0..tokens`. On exhaustion the table keeps the blocks it got
    /// and the call fails with [`EngineError::OutOfBlocks`].
    pub fn reserve(&mut self, table: &mut BlockTable, tokens: usize) -> Result<(), EngineError> {
        let need = self.blocks_for(tokens);
        while table.blocks.len() < need {
            match self.allocator.allocate() {
                Some(b) => table.blocks.push(b),
                None => {
                    return Err(EngineError::OutOfBlocks {
                        needed: need - table.blocks.len(),
                        free: 0,
                    });
                }
            }
        }
        Ok(())
    }

    /// Frees every block of `table` and empties it.
    pub fn release(&mut self, table: &mut BlockTable) {
        self.allocator.free(table.blocks.drain(..));
    }

    /// Free blocks.
    pub fn free_blocks(&self) -> usize {
        self.allocator.free_blocks()
    }

    /// Blocks owned by sequences.
    pub fn blocks_in_use(&self) -> usize {
        self.allocator.blocks_in_use()
    }

    /// Pool size in blocks.
    pub fn num_blocks(&self) -> usize {
        self.allocator.num_blocks()
    }

    /// Floats per token per layer per pool (`kv_heads · head_dim`).
    fn row(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Offset of position `pos`'s row in a layer pool.
    fn offset(&self, table: &BlockTable, pos: usize) -> usize {
        let bs = self.config.block_size;
        let block = table.blocks[pos / bs] as usize;
        (block * bs + pos % bs) * self.row()
    }

    /// Writes `k`, `v` (`[kv_heads·head_dim]` each) of position `pos` in `layer`. The table must cover `pos`.
    pub fn write(&mut self, layer: usize, table: &BlockTable, pos: usize, k: &[f32], v: &[f32]) {
        let (o, r) = (self.offset(table, pos), self.row());
        let pool = &mut self.layers[layer];
        pool.k[o..o + r].copy_from_slice(k);
        pool.v[o..o + r].copy_from_slice(v);
    }

    /// Key row (`[kv_heads·head_dim]`) of position `pos` in `layer`.
    pub fn key(&self, layer: usize, table: &BlockTable, pos: usize) -> &[f32] {
        let (o, r) = (self.offset(table, pos), self.row());
        &self.layers[layer].k[o..o + r]
    }

    /// Value row (`[kv_heads·head_dim]`) of position `pos` in `layer`.
    pub fn value(&self, layer: usize, table: &BlockTable, pos: usize) -> &[f32] {
        let (o, r) = (self.offset(table, pos), self.row());
        &self.layers[layer].v[o..o + r]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_and_release_keep_the_pool_consistent() {
        let mut c = KvCache::new(
            KvCacheConfig {
                block_size: 4,
                num_blocks: 5,
            },
            1,
            1,
            2,
        )
        .unwrap();
        let mut a = BlockTable::default();
        let mut b = BlockTable::default();
        c.reserve(&mut a, 9).unwrap(); // 3 blocks
        assert_eq!(a.len(), 3);
        c.reserve(&mut b, 4).unwrap();
        assert_eq!(c.blocks_in_use() + c.free_blocks(), 5);
        assert_eq!(c.free_blocks(), 1);
        let err = c.reserve(&mut b, 12).unwrap_err();
        assert!(matches!(err, EngineError::OutOfBlocks { .. }));
        assert_eq!(b.len(), 2, "got the last free block before failing");
        // Distinct owners.
        let mut all: Vec<u32> = a.blocks().iter().chain(b.blocks()).copied().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 5);
        c.release(&mut a);
        c.release(&mut b);
        assert_eq!(c.free_blocks(), 5);
        assert!(a.is_empty() && b.is_empty());
    }

    #[test]
    fn rows_land_in_their_block_slot() {
        let mut c = KvCache::new(
            KvCacheConfig {
                block_size: 2,
                num_blocks: 4,
            },
            2,
            1,
            2,
        )
        .unwrap();
        let mut t = BlockTable::default();
        c.reserve(&mut t, 5).unwrap();
        for p in 0..5 {
            let x = p as f32;
            c.write(1, &t, p, &[x, x + 0.5], &[-x, -x - 0.5]);
        }
        for p in 0..5 {
            let x = p as f32;
            assert_eq!(c.key(1, &t, p), &[x, x + 0.5]);
            assert_eq!(c.value(1, &t, p), &[-x, -x - 0.5]);
            assert_eq!(c.key(0, &t, p), &[0.0, 0.0], "other layer untouched");
        }
    }
}
