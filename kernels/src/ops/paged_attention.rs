//! Paged KV cache for inference: writing new keys/values into block pools, and causal GQA attention that reads
//! them back through per-sequence block tables.
//!
//! Shapes (`Hq` query heads, `Hkv` kv heads, `D` head dim, `NB` blocks of `BS` slots each):
//! - caches `k_cache`, `v_cache`: `[NB, BS, Hkv, D]`, one pool per layer; slot `s = block·BS + offset` is the
//!   row `[Hkv, D]` at `[s / BS, s % BS]`;
//! - [`kv_cache_write`]: `k`, `v` `[T, Hkv, D]`, `slots [T]` u32 → row `t` of `k`/`v` is stored at slot
//!   `slots[t]` of `k_cache`/`v_cache`, **in place** (see below);
//! - [`paged_attention`]: `q [T, Hq, D]`, `block_tables [S, MB]` u32 (sequence `s`'s position `p` lives in
//!   block `block_tables[s, p / BS]`, slot offset `p % BS`), `row_seq [T]` u32 (the sequence of row `t`),
//!   `row_pos [T]` u32 (its position) → `o [T, Hq, D]` with
//!   `o[t, h] = Σ_{p ≤ row_pos[t]} softmax_p(q[t, h]·k_p / √D) · v_p`, `k_p`/`v_p` being kv head
//!   `h / (Hq/Hkv)` (HF `repeat_kv` order) of position `p` of sequence `row_seq[t]`.
//!
//! Invariants the caller keeps: `Hq % Hkv == 0`; slots of one [`kv_cache_write`] call are distinct; a table
//! covers every position its rows read (`row_pos[t] / BS < MB`) and names only blocks `< NB`; positions
//! `0..=row_pos[t]` of the row's sequence have been written (a row may read keys written by the same
//! forward: write first, then attend). Table entries past a sequence's length are never read (pad with 0).
//!
//! In-place writes: [`Tensor`]s are otherwise immutable values; the cache pools are the one exception.
//! [`kv_cache_write`] mutates the storage the cache tensors share with all their clones and reshapes, so the
//! owner (the engine's `KvCache`) must not hand clones out as values. On the CPU this is candle's in-place
//! `slice_set`; on CUDA the kernel writes into the existing buffer, ordered on the device's single stream with
//! every other op (a later [`paged_attention`] sees the write).
//!
//! Maths/precision: scores, the online softmax (running max and sum) and the weighted sum of values are f32
//! whatever the storage dtype. CPU: f32 only (the reference), plain loops over the pool's host memory, no
//! copy of the pool. CUDA: f32 or bf16 (all float operands one dtype), `D ≤ 256`; one thread block per
//! (row, kv head) computing all `Hq/Hkv` query heads of that group over key tiles, so nothing larger than a tile
//! is materialised. Invalid inputs on CUDA (a block id `≥ NB`, a sequence `≥ S`, a position past the table)
//! are not read: the affected output rows are NaN, and out-of-range slots of [`kv_cache_write`] are skipped;
//! the CPU reference reports them as errors.

use crate::{DType, KernelError, Result, Tensor};

/// Sizes shared by the checks of both ops.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CacheDims {
    pub num_blocks: usize,
    pub block_size: usize,
    pub hkv: usize,
    pub d: usize,
}

pub(crate) fn check_caches(
    op: &'static str,
    k_cache: &Tensor,
    v_cache: &Tensor,
) -> Result<CacheDims> {
    Tensor::common_device(op, &[k_cache, v_cache])?;
    let &[num_blocks, block_size, hkv, d] = k_cache.shape() else {
        return Err(KernelError::shape(
            op,
            format!(
                "k_cache must be [blocks, block_size, kv_heads, head_dim], got {:?}",
                k_cache.shape()
            ),
        ));
    };
    v_cache.expect_shape(op, "v_cache", k_cache.shape())?;
    v_cache.expect_dtype(op, k_cache.dtype())?;
    if num_blocks == 0 || block_size == 0 || hkv == 0 || d == 0 {
        return Err(KernelError::invalid(
            op,
            format!("empty cache {:?}", k_cache.shape()),
        ));
    }
    Ok(CacheDims {
        num_blocks,
        block_size,
        hkv,
        d,
    })
}

/// Stores row `t` of `k`, `v` (`[T, Hkv, D]`) at slot `slots[t]` of `k_cache`, `v_cache` (`[NB, BS, Hkv, D]`),
/// in place (see the module docs). `k`, `v` have the caches' dtype.
pub fn kv_cache_write(
    k_cache: &mut Tensor,
    v_cache: &mut Tensor,
    k: &Tensor,
    v: &Tensor,
    slots: &Tensor,
) -> Result<()> {
    let op = "kv_cache_write";
    let c = check_caches(op, k_cache, v_cache)?;
    Tensor::common_device(op, &[k_cache, k, v, slots])?;
    let t = k.shape().first().copied().unwrap_or(0);
    k.expect_shape(op, "k", &[t, c.hkv, c.d])?;
    v.expect_shape(op, "v", &[t, c.hkv, c.d])?;
    k.expect_dtype(op, k_cache.dtype())?;
    v.expect_dtype(op, k_cache.dtype())?;
    slots.expect_shape(op, "slots", &[t])?;
    slots.expect_dtype(op, DType::U32)?;
    if t == 0 {
        return Ok(());
    }
    if k_cache.is_cuda() {
        return crate::cuda::paged::kv_cache_write(k_cache, v_cache, k, v, slots);
    }
    let n_slots = c.num_blocks * c.block_size;
    let slots = slots.to_vec_u32()?;
    if let Some(&bad) = slots.iter().find(|&&s| s as usize >= n_slots) {
        return Err(KernelError::invalid(
            op,
            format!("slot {bad} out of {n_slots}"),
        ));
    }
    // Views with one row per slot; they share the pools' storage (candle reshapes contiguous tensors in place).
    let kc = k_cache.cpu()?.reshape((n_slots, c.hkv, c.d))?;
    let vc = v_cache.cpu()?.reshape((n_slots, c.hkv, c.d))?;
    let (kr, vr) = (k.cpu()?.contiguous()?, v.cpu()?.contiguous()?);
    // One copy per run of consecutive slots (a prefill chunk inside one block is a single run).
    let mut i = 0;
    while i < t {
        let mut j = i + 1;
        while j < t && slots[j] == slots[j - 1] + 1 {
            j += 1;
        }
        kc.slice_set(&kr.narrow(0, i, j - i)?, 0, slots[i] as usize)?;
        vc.slice_set(&vr.narrow(0, i, j - i)?, 0, slots[i] as usize)?;
        i = j;
    }
    Ok(())
}

/// Causal GQA attention of `q [T, Hq, D]` over the paged cache (see the module docs) → `[T, Hq, D]` in `q`'s
/// dtype.
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_tables: &Tensor,
    row_seq: &Tensor,
    row_pos: &Tensor,
) -> Result<Tensor> {
    let op = "paged_attention";
    let c = check_caches(op, k_cache, v_cache)?;
    Tensor::common_device(op, &[q, k_cache, block_tables, row_seq, row_pos])?;
    let &[t, hq, d] = q.shape() else {
        return Err(KernelError::shape(
            op,
            format!("q must be [T, Hq, D], got {:?}", q.shape()),
        ));
    };
    if d != c.d || hq == 0 || hq % c.hkv != 0 {
        return Err(KernelError::shape(
            op,
            format!(
                "q {:?} does not fit a cache of {} kv heads × {}",
                q.shape(),
                c.hkv,
                c.d
            ),
        ));
    }
    q.expect_dtype(op, k_cache.dtype())?;
    let &[s, mb] = block_tables.shape() else {
        return Err(KernelError::shape(
            op,
            format!(
                "block_tables must be [S, max_blocks], got {:?}",
                block_tables.shape()
            ),
        ));
    };
    for (what, x) in [
        ("block_tables", block_tables),
        ("row_seq", row_seq),
        ("row_pos", row_pos),
    ] {
        x.expect_dtype(op, DType::U32)?;
        if what != "block_tables" {
            x.expect_shape(op, what, &[t])?;
        }
    }
    if t == 0 {
        return Tensor::zeros(q.shape(), q.dtype(), &q.device());
    }
    if q.is_cuda() {
        return crate::cuda::paged::paged_attention(
            q,
            k_cache,
            v_cache,
            block_tables,
            row_seq,
            row_pos,
            s,
            mb,
        );
    }
    q.expect_dtype(op, DType::F32)?;
    let tables = block_tables.to_vec_u32()?;
    let seqs = row_seq.to_vec_u32()?;
    let poss = row_pos.to_vec_u32()?;
    for r in 0..t {
        let (sq, pos) = (seqs[r] as usize, poss[r] as usize);
        if sq >= s || pos / c.block_size >= mb {
            return Err(KernelError::invalid(
                op,
                format!(
                    "row {r}: sequence {sq} of {s}, position {pos} past a table of {mb} blocks"
                ),
            ));
        }
        if let Some(&b) = tables[sq * mb..sq * mb + pos / c.block_size + 1]
            .iter()
            .find(|&&b| b as usize >= c.num_blocks)
        {
            return Err(KernelError::invalid(
                op,
                format!("row {r}: block {b} out of {}", c.num_blocks),
            ));
        }
    }
    let qv = q.to_vec_f32()?;
    let (kg, kl) = k_cache.cpu()?.storage_and_layout();
    let (vg, vl) = v_cache.cpu()?.storage_and_layout();
    let (
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(kd)),
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(vd)),
    ) = (&*kg, &*vg)
    else {
        return Err(KernelError::DType {
            op,
            expected: DType::F32,
            got: k_cache.dtype(),
        });
    };
    if !kl.is_contiguous() || !vl.is_contiguous() {
        return Err(KernelError::invalid(op, "cache pools must be contiguous"));
    }
    let n = c.num_blocks * c.block_size * c.hkv * c.d;
    let kd = &kd[kl.start_offset()..kl.start_offset() + n];
    let vd = &vd[vl.start_offset()..vl.start_offset() + n];
    let mut o = vec![0.0f32; t * hq * d];
    let group = hq / c.hkv;
    let scale = 1.0 / (d as f32).sqrt();
    let row = c.hkv * d;
    let mut scores = Vec::new();
    for r in 0..t {
        let table = &tables[seqs[r] as usize * mb..(seqs[r] as usize + 1) * mb];
        let npos = poss[r] as usize + 1;
        // Offset of position p's row in a pool.
        let base =
            |p: usize| (table[p / c.block_size] as usize * c.block_size + p % c.block_size) * row;
        scores.resize(npos, 0.0f32);
        for h in 0..hq {
            let kvh = h / group;
            let qh = &qv[(r * hq + h) * d..(r * hq + h + 1) * d];
            let mut max = f32::NEG_INFINITY;
            for (p, sc) in scores.iter_mut().enumerate() {
                let k0 = base(p) + kvh * d;
                let dot: f32 = qh.iter().zip(&kd[k0..k0 + d]).map(|(a, b)| a * b).sum();
                *sc = dot * scale;
                max = max.max(*sc);
            }
            let mut sum = 0.0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let oh = &mut o[(r * hq + h) * d..(r * hq + h + 1) * d];
            for (p, sc) in scores.iter().enumerate() {
                let v0 = base(p) + kvh * d;
                let w = sc / sum;
                for (acc, x) in oh.iter_mut().zip(&vd[v0..v0 + d]) {
                    *acc += w * x;
                }
            }
        }
    }
    drop((kg, vg));
    Tensor::from_f32(o, &[t, hq, d], &q.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;
    use crate::test_util::{rel_err, rng, uniform};

    /// Naive reference: per row, gather the sequence's keys/values from a dense per-sequence list.
    fn naive(
        q: &[f32],
        seq_k: &[Vec<Vec<f32>>],
        seq_v: &[Vec<Vec<f32>>],
        rows: &[(usize, usize)],
        (hq, hkv, d): (usize, usize, usize),
    ) -> Vec<f64> {
        let mut out = vec![0.0f64; rows.len() * hq * d];
        for (r, &(s, pos)) in rows.iter().enumerate() {
            for h in 0..hq {
                let g = h / (hq / hkv);
                let qh = &q[(r * hq + h) * d..(r * hq + h + 1) * d];
                let sc: Vec<f64> = (0..=pos)
                    .map(|p| {
                        let k = &seq_k[s][p][g * d..(g + 1) * d];
                        qh.iter()
                            .zip(k)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                for (p, x) in sc.iter().enumerate() {
                    let w = (x - m).exp() / z;
                    let v = &seq_v[s][p][g * d..(g + 1) * d];
                    for j in 0..d {
                        out[(r * hq + h) * d + j] += w * v[j] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn paged_matches_naive_over_scattered_blocks() {
        let mut g = rng(11);
        let (hq, hkv, d, bs, nb) = (6, 2, 5, 3, 16);
        let dev = Device::Cpu;
        let mut kc = Tensor::zeros(&[nb, bs, hkv, d], DType::F32, &dev).unwrap();
        let mut vc = Tensor::zeros(&[nb, bs, hkv, d], DType::F32, &dev).unwrap();
        // Two sequences with non-contiguous, interleaved blocks.
        let tables: [Vec<u32>; 2] = [vec![7, 2, 11, 0], vec![5, 13, 1]];
        let lens = [11usize, 8];
        let mut seq_k = vec![Vec::new(), Vec::new()];
        let mut seq_v = vec![Vec::new(), Vec::new()];
        // Write each sequence in two calls (a "prefill" then the rest, mixed across sequences).
        for part in 0..2 {
            let mut kr = Vec::new();
            let mut vr = Vec::new();
            let mut slots = Vec::new();
            for s in 0..2 {
                let half = lens[s] / 2;
                let range = if part == 0 { 0..half } else { half..lens[s] };
                for p in range {
                    let (k, v) = (uniform(&mut g, hkv * d, 1.0), uniform(&mut g, hkv * d, 1.0));
                    kr.extend_from_slice(&k);
                    vr.extend_from_slice(&v);
                    seq_k[s].push(k);
                    seq_v[s].push(v);
                    slots.push(tables[s][p / bs] * bs as u32 + (p % bs) as u32);
                }
            }
            let n = slots.len();
            let k = Tensor::from_f32(kr, &[n, hkv, d], &dev).unwrap();
            let v = Tensor::from_f32(vr, &[n, hkv, d], &dev).unwrap();
            let sl = Tensor::from_u32(slots, &[n], &dev).unwrap();
            kv_cache_write(&mut kc, &mut vc, &k, &v, &sl).unwrap();
        }
        let mb = 5;
        let mut bt = vec![0u32; 2 * mb];
        for s in 0..2 {
            bt[s * mb..s * mb + tables[s].len()].copy_from_slice(&tables[s]);
        }
        let rows: Vec<(usize, usize)> =
            vec![(0, 0), (1, 7), (0, 10), (0, 4), (1, 0), (1, 3), (0, 9)];
        let t = rows.len();
        let qv = uniform(&mut g, t * hq * d, 1.0);
        let q = Tensor::from_f32(qv.clone(), &[t, hq, d], &dev).unwrap();
        let bt = Tensor::from_u32(bt, &[2, mb], &dev).unwrap();
        let rs = Tensor::from_u32(rows.iter().map(|r| r.0 as u32).collect(), &[t], &dev).unwrap();
        let rp = Tensor::from_u32(rows.iter().map(|r| r.1 as u32).collect(), &[t], &dev).unwrap();
        let o = paged_attention(&q, &kc, &vc, &bt, &rs, &rp).unwrap();
        assert_eq!(o.shape(), &[t, hq, d]);
        let want = naive(&qv, &seq_k, &seq_v, &rows, (hq, hkv, d));
        let e = rel_err(&o.to_vec_f32().unwrap(), &want);
        assert!(e < 1e-6, "rel err {e}");
    }

    #[test]
    fn writes_land_in_their_slots_and_bad_inputs_are_errors() {
        let dev = Device::Cpu;
        let (nb, bs, hkv, d) = (3, 2, 1, 2);
        let mut kc = Tensor::zeros(&[nb, bs, hkv, d], DType::F32, &dev).unwrap();
        let mut vc = Tensor::zeros(&[nb, bs, hkv, d], DType::F32, &dev).unwrap();
        let k = Tensor::from_f32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 1, 2], &dev).unwrap();
        let v = k.scale(-1.0).unwrap();
        let alias = kc.clone();
        let slots = Tensor::from_u32(vec![5, 0, 1], &[3], &dev).unwrap();
        kv_cache_write(&mut kc, &mut vc, &k, &v, &slots).unwrap();
        let got = kc.to_vec_f32().unwrap();
        assert_eq!(
            got,
            vec![3.0, 4.0, 5.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0]
        );
        assert_eq!(alias.to_vec_f32().unwrap(), got, "clones share the pool");
        assert_eq!(vc.to_vec_f32().unwrap()[10..], [-1.0, -2.0]);
        let bad = Tensor::from_u32(vec![6, 0, 1], &[3], &dev).unwrap();
        assert!(kv_cache_write(&mut kc, &mut vc, &k, &v, &bad).is_err());
        // A position past the table, a block out of the pool.
        let q = Tensor::from_f32(vec![0.5; 2], &[1, 1, 2], &dev).unwrap();
        let one = |x: u32| Tensor::from_u32(vec![x], &[1], &dev).unwrap();
        let bt = Tensor::from_u32(vec![2, 9], &[1, 2], &dev).unwrap();
        assert!(paged_attention(&q, &kc, &vc, &bt, &one(0), &one(4)).is_err());
        assert!(paged_attention(&q, &kc, &vc, &bt, &one(0), &one(2)).is_err());
        assert!(paged_attention(&q, &kc, &vc, &bt, &one(1), &one(0)).is_err());
        // Position 1 of block 2 = slot 5: the only key is k[0] → output v[0].
        let o = paged_attention(&q, &kc, &vc, &bt, &one(0), &one(0)).unwrap();
        assert_eq!(
            o.to_vec_f32().unwrap(),
            vec![0.0, 0.0],
            "slot 4 was never written"
        );
        let o = paged_attention(&q, &kc, &vc, &bt, &one(0), &one(1))
            .unwrap()
            .to_vec_f32()
            .unwrap();
        // Softmax over slot 4 (zeros, score 0) and slot 5 (k = [1, 2], score 1.5/√2): a convex mix of 0 and v.
        let w = (1.5f32 / 2f32.sqrt()).exp() / (1.0 + (1.5f32 / 2f32.sqrt()).exp());
        assert!(
            (o[0] + w).abs() < 1e-6 && (o[1] + 2.0 * w).abs() < 1e-6,
            "{o:?}"
        );
    }
}
