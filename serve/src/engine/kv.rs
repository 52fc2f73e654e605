//! Paged KV cache: fixed-size blocks, a block allocator and per-sequence block tables.
//!
//! Layout: for every layer one `k` and one `v` pool, each a `qkernels` tensor
//! `[num_blocks, block_size, kv_heads, head_dim]` on the model's device (f32 on the CPU; the model's compute dtype,
//! bf16, on CUDA). A sequence owns an ordered list of block ids, its [`BlockTable`]; the K/V of its token at
//! position `p` live in block `table[p / block_size]`, slot `p % block_size` (flat slot
//! `block · block_size + p % block_size`, see [`KvCache::slot`]), so a sequence's cache needs no contiguous
//! memory and grows one block at a time. The pools are written in place by
//! [`qkernels::ops::kv_cache_write`] and read by [`qkernels::ops::paged_attention`]; they are never handed out
//! as values (the cache is not `Clone`), because those writes mutate the storage every clone would share.
//!
//! Invariants:
//! - a block id is either in the allocator's free list or owned by exactly one block table;
//! - `blocks_in_use() + free_blocks() == num_blocks()` at all times;
//! - a table of `n` blocks covers positions `0..n·block_size`; the engine writes position `p` only after the
//!   table covers it ([`KvCache::reserve`]) and frees the whole table when the sequence ends or is aborted
//!   ([`KvCache::release`]).

use qkernels::{DType, Device, Tensor};

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
#[derive(Debug)]
struct LayerPool {
    k: Tensor,
    v: Tensor,
}

/// The paged cache of all layers plus its allocator (see module docs).
#[derive(Debug)]
pub struct KvCache {
    config: KvCacheConfig,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
    layers: Vec<LayerPool>,
    allocator: BlockAllocator,
}

impl KvCache {
    /// An empty (zeroed) cache for `layers` layers of `kv_heads × head_dim` keys and values, held as `dtype` on
    /// `device`.
    pub fn new(
        config: KvCacheConfig,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: Device,
    ) -> Result<Self, EngineError> {
        if config.block_size == 0 || config.num_blocks == 0 {
            return Err(EngineError::InvalidConfig(format!(
                "KV cache needs block_size > 0 and num_blocks > 0, got {config:?}"
            )));
        }
        let shape = [config.num_blocks, config.block_size, kv_heads, head_dim];
        let layers = (0..layers)
            .map(|_| {
                Ok(LayerPool {
                    k: Tensor::zeros(&shape, dtype, &device)?,
                    v: Tensor::zeros(&shape, dtype, &device)?,
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(KvCache {
            config,
            kv_heads,
            head_dim,
            dtype,
            device,
            layers,
            allocator: BlockAllocator::new(config.num_blocks),
        })
    }

    /// Bytes of one block over all layers (K and V) for a model of these sizes.
    pub fn bytes_per_block(
        block_size: usize,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> usize {
        2 * layers * block_size * kv_heads * head_dim * dtype.size_in_bytes()
    }

    /// The cache's sizes.
    pub fn config(&self) -> KvCacheConfig {
        self.config
    }

    /// Element type of the pools.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Where the pools live.
    pub fn device(&self) -> Device {
        self.device
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

    /// Flat slot of position `pos` (`block · block_size + pos % block_size`). The table must cover `pos`.
    pub fn slot(&self, table: &BlockTable, pos: usize) -> u32 {
        let bs = self.config.block_size;
        table.blocks[pos / bs] * bs as u32 + (pos % bs) as u32
    }

    /// Stores `k`, `v` (`[T, kv_heads, head_dim]`, the pools' dtype and device) of layer `layer` at `slots`
    /// (`[T]` u32, see [`KvCache::slot`]).
    pub fn write(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        slots: &Tensor,
    ) -> Result<(), EngineError> {
        let pool = &mut self.layers[layer];
        qkernels::ops::kv_cache_write(&mut pool.k, &mut pool.v, k, v, slots)?;
        Ok(())
    }

    /// The `(k, v)` pools of `layer`, for [`qkernels::ops::paged_attention`] (read them, never keep them).
    pub fn pools(&self, layer: usize) -> (&Tensor, &Tensor) {
        let p = &self.layers[layer];
        (&p.k, &p.v)
    }

    /// Sizes of one pool row: `(kv_heads, head_dim)`.
    pub fn row_shape(&self) -> (usize, usize) {
        (self.kv_heads, self.head_dim)
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
            DType::F32,
            Device::Cpu,
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
            DType::F32,
            Device::Cpu,
        )
        .unwrap();
        let mut other = BlockTable::default();
        c.reserve(&mut other, 1).unwrap();
        let mut t = BlockTable::default();
        c.reserve(&mut t, 5).unwrap();
        let slots: Vec<u32> = (0..5).map(|p| c.slot(&t, p)).collect();
        let k: Vec<f32> = (0..5).flat_map(|p| [p as f32, p as f32 + 0.5]).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        let kt = Tensor::from_f32(k, &[5, 1, 2], &Device::Cpu).unwrap();
        let vt = Tensor::from_f32(v, &[5, 1, 2], &Device::Cpu).unwrap();
        let st = Tensor::from_u32(slots.clone(), &[5], &Device::Cpu).unwrap();
        c.write(1, &kt, &vt, &st).unwrap();
        let (kp, vp) = c.pools(1);
        let (kp, vp) = (kp.to_vec_f32().unwrap(), vp.to_vec_f32().unwrap());
        for (p, &s) in slots.iter().enumerate() {
            let (x, s) = (p as f32, s as usize);
            assert_eq!(s / 2, t.blocks()[p / 2] as usize);
            assert_eq!(&kp[2 * s..2 * s + 2], &[x, x + 0.5]);
            assert_eq!(&vp[2 * s..2 * s + 2], &[-x, -x - 0.5]);
        }
        let other_slot = c.slot(&other, 0) as usize;
        assert_eq!(
            &kp[2 * other_slot..2 * other_slot + 2],
            &[0.0, 0.0],
            "other sequence untouched"
        );
        let (k0, _) = c.pools(0);
        assert!(
            k0.to_vec_f32().unwrap().iter().all(|&x| x == 0.0),
            "other layer untouched"
        );
    }
}
