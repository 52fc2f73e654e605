//! Causal self-attention with grouped-query attention (GQA) and optional packed-sample segments.
//!
//! Shapes:
//! - `q [batch, seq, q_heads, head_dim]`, `k`, `v [batch, seq, kv_heads, head_dim]` (token-major, as the
//!   q/k/v projections produce them), `q_heads % kv_heads == 0`;
//! - optional `segment_ids [batch, seq]` (u32): token `i` may attend to token `j` only if `j ≤ i` and both have
//!   the same segment id, so packed samples never see each other;
//! - output `out [batch, seq, q_heads, head_dim]` and `lse [batch, q_heads, seq]`, the log-sum-exp of every
//!   softmax row, which backward uses to rebuild the probabilities (as flash attention does).
//!
//! GQA: q head `h` reads kv head `h / (q_heads / kv_heads)` (HF `repeat_kv` order); in backward the k/v
//! gradients of the q heads sharing a kv head are summed.
//!
//! Maths: `S = scale·Q·Kᵀ + M` (`M` is 0 where allowed, −∞ elsewhere), `P = softmax(S)`, `O = P·V`.
//! Backward: `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `D_i = Σ_d dO_id·O_id`, `dS = P ⊙ (dP − D)`, `dQ = scale·dS·K`,
//! `dK = scale·dSᵀ·Q`. Every row keeps at least its own position, so no row is fully masked.
//!
//! Indexed variant ([`attention_fwd_indexed`] / [`attention_bwd_indexed`], for context parallelism): `sq` query rows
//! against `sk` key rows, each placed by an explicit global sequence index ([`AttentionIndex`]); the mask is
//! `M_ij = 0` iff `k_index[j] ≤ q_index[i]` and the segments agree. Same maths; `dK`, `dV` are the contributions
//! of the given queries only. CPU reference only (CUDA operands go through the host).

use crate::{DType, KernelError, Result, Tensor};

/// Output of [`attention_fwd`].
#[derive(Debug, Clone)]
pub struct AttentionOut {
    /// `[batch, seq, q_heads, head_dim]`
    pub out: Tensor,
    /// `[batch, q_heads, seq]`: log-sum-exp of each softmax row (save it for backward).
    pub lse: Tensor,
}

/// Gradients of [`attention_fwd`].
#[derive(Debug, Clone)]
pub struct AttentionGrads {
    /// `[batch, seq, q_heads, head_dim]`
    pub dq: Tensor,
    /// `[batch, seq, kv_heads, head_dim]`
    pub dk: Tensor,
    /// `[batch, seq, kv_heads, head_dim]`
    pub dv: Tensor,
}

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    s: usize,
    hq: usize,
    hkv: usize,
    d: usize,
}

impl Dims {
    fn group(&self) -> usize {
        self.hq / self.hkv
    }

    /// As an indexed call whose queries are its keys.
    fn square(self) -> IDims {
        let Dims { b, s, hq, hkv, d } = self;
        IDims {
            b,
            sq: s,
            sk: s,
            hq,
            hkv,
            d,
        }
    }
}

fn check(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seg: Option<&Tensor>,
) -> Result<Dims> {
    Tensor::common_device(op, &[q, k, v])?;
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        t.expect_dtype(op, DType::F32)?;
        t.expect_rank(op, name, 4)?;
    }
    let (b, s, hq, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let hkv = k.shape()[2];
    k.expect_shape(op, "k", &[b, s, hkv, d])?;
    v.expect_shape(op, "v", &[b, s, hkv, d])?;
    if hkv == 0 || hq % hkv != 0 {
        return Err(KernelError::shape(
            op,
            format!("q_heads {hq} is not a multiple of kv_heads {hkv}"),
        ));
    }
    if let Some(seg) = seg {
        Tensor::common_device(op, &[q, seg])?;
        seg.expect_dtype(op, DType::U32)?;
        seg.expect_shape(op, "segment_ids", &[b, s])?;
    }
    Ok(Dims { b, s, hq, hkv, d })
}

/// Additive mask `[batch, 1, 1, seq, seq]`: 0 where key `j` is visible from query `i`, −∞ elsewhere.
fn mask(dims: Dims, seg: Option<&Tensor>) -> Result<candle_core::Tensor> {
    let Dims { b, s, .. } = dims;
    let seg = match seg {
        Some(t) => t.to_vec_u32()?,
        None => vec![0; b * s],
    };
    let mut m = vec![f32::NEG_INFINITY; b * s * s];
    for bi in 0..b {
        for i in 0..s {
            for j in 0..=i {
                if seg[bi * s + i] == seg[bi * s + j] {
                    m[(bi * s + i) * s + j] = 0.0;
                }
            }
        }
    }
    Ok(candle_core::Tensor::from_vec(
        m,
        (b, 1, 1, s, s),
        &candle_core::Device::Cpu,
    )?)
}

/// `[b, s, h, d]` → heads-major `[b, h, s, d]`.
fn heads_major(t: &Tensor) -> Result<candle_core::Tensor> {
    Ok(t.cpu()?.transpose(1, 2)?.contiguous()?)
}

/// Masked, scaled scores `[b, hkv, g, s, s]` plus the heads-major q `[b, hkv, g·s, d]` and k, v `[b, hkv, s, d]`.
struct Scores {
    s: candle_core::Tensor,
    qh: candle_core::Tensor,
    kh: candle_core::Tensor,
    vh: candle_core::Tensor,
}

fn scores(
    dims: Dims,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seg: Option<&Tensor>,
    scale: f32,
) -> Result<Scores> {
    let Dims { b, s, hkv, d, .. } = dims;
    let g = dims.group();
    // q heads h = kv·g + j, so grouping the q heads of one kv head is a plain reshape.
    let qh = heads_major(q)?.reshape((b, hkv, g * s, d))?;
    let kh = heads_major(k)?;
    let vh = heads_major(v)?;
    let sc = qh.matmul(&kh.t()?)?.affine(scale as f64, 0.0)?; // [b, hkv, g·s, s]
    let sc = sc
        .reshape((b, hkv, g, s, s))?
        .broadcast_add(&mask(dims, seg)?)?;
    Ok(Scores { s: sc, qh, kh, vh })
}

/// The forward from masked scores `[b, hkv, g, sq, sk]`: softmax over the keys, the output `[b, sq, hq, d]` and
/// its log-sum-exp `[b, hq, sq]` (the CPU tail of [`attention_fwd`] and [`attention_fwd_indexed`]).
fn softmax_out(dims: IDims, sc: &Scores) -> Result<AttentionOut> {
    let IDims {
        b,
        sq,
        sk,
        hq,
        hkv,
        d,
    } = dims;
    let g = hq / hkv;
    let m = sc.s.max_keepdim(4)?; // [b, hkv, g, sq, 1]
    let e = sc.s.broadcast_sub(&m)?.exp()?;
    let l = e.sum_keepdim(4)?;
    let p = e.broadcast_div(&l)?.reshape((b, hkv, g * sq, sk))?;
    let lse = m.add(&l.log()?)?.reshape((b, hq, sq))?;
    let o = p
        .matmul(&sc.vh)?
        .reshape((b, hq, sq, d))?
        .transpose(1, 2)?
        .contiguous()?;
    Ok(AttentionOut {
        out: Tensor::from_cpu(o),
        lse: Tensor::from_cpu(lse),
    })
}

/// The backward from masked scores `[b, hkv, g, sq, sk]` with `P` rebuilt from the forward's `lse` (the CPU tail of
/// [`attention_bwd`] and [`attention_bwd_indexed`]; checks `dout`, `out` and `lse` first).
#[allow(clippy::too_many_arguments)]
fn softmax_out_bwd(
    op: &'static str,
    dims: IDims,
    sc: impl FnOnce() -> Result<Scores>,
    q: &Tensor,
    dout: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    scale: f32,
) -> Result<AttentionGrads> {
    let IDims {
        b,
        sq,
        sk,
        hq,
        hkv,
        d,
    } = dims;
    let g = hq / hkv;
    dout.expect_shape(op, "dout", q.shape())?;
    out.expect_shape(op, "out", q.shape())?;
    lse.expect_shape(op, "lse", &[b, hq, sq])?;
    Tensor::common_device(op, &[q, dout, out, lse])?;
    let sc = sc()?;
    let lse5 = lse.cpu()?.reshape((b, hkv, g, sq, 1))?;
    let p =
        sc.s.broadcast_sub(&lse5)?
            .exp()?
            .reshape((b, hkv, g * sq, sk))?; // P, rebuilt
    let doh = heads_major(dout)?.reshape((b, hkv, g * sq, d))?;
    let oh = heads_major(out)?.reshape((b, hkv, g * sq, d))?;
    let dv = p.t()?.matmul(&doh)?; // [b, hkv, sk, d], summed over the group
    let dp = doh.matmul(&sc.vh.t()?)?; // [b, hkv, g·sq, sk]
    let di = doh.mul(&oh)?.sum_keepdim(3)?; // [b, hkv, g·sq, 1]
    let ds = p.mul(&dp.broadcast_sub(&di)?)?;
    let dq = ds.matmul(&sc.kh)?.affine(scale as f64, 0.0)?; // [b, hkv, g·sq, d]
    let dk = ds.t()?.matmul(&sc.qh)?.affine(scale as f64, 0.0)?; // [b, hkv, sk, d]
    let token_major = |t: candle_core::Tensor, h: usize, s: usize| -> Result<Tensor> {
        Ok(Tensor::from_cpu(
            t.reshape((b, h, s, d))?.transpose(1, 2)?.contiguous()?,
        ))
    };
    Ok(AttentionGrads {
        dq: token_major(dq, hq, sq)?,
        dk: token_major(dk, hkv, sk)?,
        dv: token_major(dv, hkv, sk)?,
    })
}

/// Attention forward (see module docs). `scale` is usually `1/√head_dim`.
pub fn attention_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segment_ids: Option<&Tensor>,
    scale: f32,
) -> Result<AttentionOut> {
    if q.is_cuda() {
        let (out, lse) = crate::cuda::ops::attention_fwd(q, k, v, segment_ids, scale)?;
        return Ok(AttentionOut { out, lse });
    }
    let dims = check("attention_fwd", q, k, v, segment_ids)?;
    let sc = scores(dims, q, k, v, segment_ids, scale)?;
    softmax_out(dims.square(), &sc)
}

/// Attention backward. `out` and `lse` are what [`attention_fwd`] returned for the same `q, k, v`.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    segment_ids: Option<&Tensor>,
    scale: f32,
) -> Result<AttentionGrads> {
    let op = "attention_bwd";
    if q.is_cuda() {
        let (dq, dk, dv) =
            crate::cuda::ops::attention_bwd(dout, q, k, v, out, lse, segment_ids, scale)?;
        return Ok(AttentionGrads { dq, dk, dv });
    }
    let dims = check(op, q, k, v, segment_ids)?;
    let sc = || scores(dims, q, k, v, segment_ids, scale);
    softmax_out_bwd(op, dims.square(), sc, q, dout, out, lse, scale)
}

// ---------------------------------------------------------------------------------------------------------------
// Attention over a subset of queries against explicitly placed keys (context parallelism).
// ---------------------------------------------------------------------------------------------------------------

/// Where the queries and keys of [`attention_fwd_indexed`] sit in the full sequence.
///
/// Query row `i` (`0 ≤ i < sq`) may attend to key `j` (`0 ≤ j < sk`) iff `k_index[j] ≤ q_index[i]` (causal on the
/// *global* sequence index, not on the RoPE positions, which restart inside packed samples) and, when segments are
/// given, `q_segments[b, i] == k_segments[b, j]`. Indices are shared by the batch rows; segments are per row.
/// Every query row must see at least one key (normally itself: `q_index ⊆ k_index`), else the op is an
/// [`KernelError::InvalidArgument`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionIndex<'a> {
    /// `[sq]` (u32): global sequence index of each query row.
    pub q_index: &'a Tensor,
    /// `[sk]` (u32): global sequence index of each key row.
    pub k_index: &'a Tensor,
    /// `([batch, sq], [batch, sk])` (u32) segment ids of the queries and of the keys, or `None` (one sample per row).
    pub segments: Option<(&'a Tensor, &'a Tensor)>,
}

/// Sizes of one indexed call: `sq` queries, `sk` keys.
#[derive(Debug, Clone, Copy)]
struct IDims {
    b: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hkv: usize,
    d: usize,
}

fn check_indexed(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    index: &AttentionIndex<'_>,
) -> Result<IDims> {
    Tensor::common_device(op, &[q, k, v])?;
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        t.expect_dtype(op, DType::F32)?;
        t.expect_rank(op, name, 4)?;
    }
    let (b, sq, hq, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let (sk, hkv) = (k.shape()[1], k.shape()[2]);
    k.expect_shape(op, "k", &[b, sk, hkv, d])?;
    v.expect_shape(op, "v", &[b, sk, hkv, d])?;
    if hkv == 0 || hq % hkv != 0 {
        return Err(KernelError::shape(
            op,
            format!("q_heads {hq} is not a multiple of kv_heads {hkv}"),
        ));
    }
    for (name, t, n) in [
        ("q_index", index.q_index, sq),
        ("k_index", index.k_index, sk),
    ] {
        t.expect_dtype(op, DType::U32)?;
        t.expect_shape(op, name, &[n])?;
    }
    if let Some((qs, ks)) = index.segments {
        qs.expect_dtype(op, DType::U32)?;
        ks.expect_dtype(op, DType::U32)?;
        qs.expect_shape(op, "q_segments", &[b, sq])?;
        ks.expect_shape(op, "k_segments", &[b, sk])?;
    }
    Ok(IDims {
        b,
        sq,
        sk,
        hq,
        hkv,
        d,
    })
}

/// Additive mask `[batch, 1, 1, sq, sk]` of [`AttentionIndex`]; a query row without any visible key is an error.
fn mask_indexed(
    op: &'static str,
    dims: IDims,
    index: &AttentionIndex<'_>,
) -> Result<candle_core::Tensor> {
    let IDims { b, sq, sk, .. } = dims;
    let (qi, ki) = (index.q_index.to_vec_u32()?, index.k_index.to_vec_u32()?);
    let (qs, ks) = match index.segments {
        Some((qs, ks)) => (qs.to_vec_u32()?, ks.to_vec_u32()?),
        None => (vec![0; b * sq], vec![0; b * sk]),
    };
    let mut m = vec![f32::NEG_INFINITY; b * sq * sk];
    for bi in 0..b {
        for i in 0..sq {
            let row = &mut m[(bi * sq + i) * sk..(bi * sq + i + 1) * sk];
            let mut any = false;
            for j in 0..sk {
                if ki[j] <= qi[i] && qs[bi * sq + i] == ks[bi * sk + j] {
                    row[j] = 0.0;
                    any = true;
                }
            }
            if !any {
                return Err(KernelError::invalid(
                    op,
                    format!(
                        "query row {i} of batch row {bi} (global index {}) sees no key",
                        qi[i]
                    ),
                ));
            }
        }
    }
    Ok(candle_core::Tensor::from_vec(
        m,
        (b, 1, 1, sq, sk),
        &candle_core::Device::Cpu,
    )?)
}

/// Masked, scaled scores `[b, hkv, g, sq, sk]` plus the heads-major q `[b, hkv, g·sq, d]` and k, v `[b, hkv, sk, d]`.
fn scores_indexed(
    op: &'static str,
    dims: IDims,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    index: &AttentionIndex<'_>,
    scale: f32,
) -> Result<Scores> {
    let IDims {
        b,
        sq,
        sk,
        hq,
        hkv,
        d,
    } = dims;
    let g = hq / hkv;
    let qh = heads_major(q)?.reshape((b, hkv, g * sq, d))?;
    let kh = heads_major(k)?;
    let vh = heads_major(v)?;
    let sc = qh.matmul(&kh.t()?)?.affine(scale as f64, 0.0)?; // [b, hkv, g·sq, sk]
    let sc = sc
        .reshape((b, hkv, g, sq, sk))?
        .broadcast_add(&mask_indexed(op, dims, index)?)?;
    Ok(Scores { s: sc, qh, kh, vh })
}

/// Runs `f` on host f32 copies of CUDA operands and moves the results back (the indexed op has no CUDA kernel
/// yet; see the module docs of [`attention_fwd_indexed`]).
fn on_host(ts: &[&Tensor]) -> Result<Vec<Tensor>> {
    ts.iter()
        .map(|t| match t.dtype() {
            DType::U32 => t.to_device(&crate::Device::Cpu),
            _ => t.to_dtype(DType::F32)?.to_device(&crate::Device::Cpu),
        })
        .collect()
}

fn back_to(t: Tensor, like: &Tensor) -> Result<Tensor> {
    t.to_device(&like.device())?.to_dtype(like.dtype())
}

/// Attention of `q [batch, sq, q_heads, head_dim]` over `k, v [batch, sk, kv_heads, head_dim]` with the causal /
/// segment mask of `index` ([`AttentionIndex`]). Same maths and outputs as [`attention_fwd`] (`out [b, sq, hq, d]`,
/// `lse [b, hq, sq]`); with `sq = sk = seq`, `q_index = k_index = 0..seq` and the segments twice, it *is*
/// [`attention_fwd`].
///
/// Context parallelism calls it with the local query chunks and the K/V all-gathered over the CP group.
///
/// Device support: the CPU reference only. A CUDA operand is copied to the host (f32), computed there and copied
/// back in its dtype — correct but slow; a flash-attention kernel with index-based masking is future work.
pub fn attention_fwd_indexed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    index: &AttentionIndex<'_>,
    scale: f32,
) -> Result<AttentionOut> {
    let op = "attention_fwd_indexed";
    if q.is_cuda() {
        let mut ts = vec![q, k, v, index.q_index, index.k_index];
        if let Some((qs, ks)) = index.segments {
            ts.extend([qs, ks]);
        }
        let h = on_host(&ts)?;
        let hi = AttentionIndex {
            q_index: &h[3],
            k_index: &h[4],
            segments: index.segments.map(|_| (&h[5], &h[6])),
        };
        let o = attention_fwd_indexed(&h[0], &h[1], &h[2], &hi, scale)?;
        return Ok(AttentionOut {
            out: back_to(o.out, q)?,
            lse: o.lse.to_device(&q.device())?,
        });
    }
    let dims = check_indexed(op, q, k, v, index)?;
    let sc = scores_indexed(op, dims, q, k, v, index, scale)?;
    softmax_out(dims, &sc)
}

/// Backward of [`attention_fwd_indexed`]: `dq [b, sq, hq, d]`, `dk, dv [b, sk, hkv, d]` (the maths of
/// [`attention_bwd`]; `dk`/`dv` hold only the contributions of *these* queries — context parallelism sums them over
/// the CP group with a reduce-scatter).
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_indexed(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    index: &AttentionIndex<'_>,
    scale: f32,
) -> Result<AttentionGrads> {
    let op = "attention_bwd_indexed";
    if q.is_cuda() {
        let mut ts = vec![dout, q, k, v, out, lse, index.q_index, index.k_index];
        if let Some((qs, ks)) = index.segments {
            ts.extend([qs, ks]);
        }
        let h = on_host(&ts)?;
        let hi = AttentionIndex {
            q_index: &h[6],
            k_index: &h[7],
            segments: index.segments.map(|_| (&h[8], &h[9])),
        };
        let g = attention_bwd_indexed(&h[0], &h[1], &h[2], &h[3], &h[4], &h[5], &hi, scale)?;
        return Ok(AttentionGrads {
            dq: back_to(g.dq, q)?,
            dk: back_to(g.dk, k)?,
            dv: back_to(g.dv, v)?,
        });
    }
    let dims = check_indexed(op, q, k, v, index)?;
    let sc = || scores_indexed(op, dims, q, k, v, index, scale);
    softmax_out_bwd(op, dims, sc, q, dout, out, lse, scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;
    use crate::test_util::*;

    /// Naive f64 attention with explicit loops, `repeat_kv` semantics and a segment-aware causal mask.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        seg: &[u32],
        b: usize,
        s: usize,
        hq: usize,
        hkv: usize,
        d: usize,
    ) -> Vec<f64> {
        let scale = 1.0 / (d as f64).sqrt();
        let g = hq / hkv;
        let mut o = vec![0.0; b * s * hq * d];
        for bi in 0..b {
            for h in 0..hq {
                let kvh = h / g;
                for i in 0..s {
                    let qi = |c: usize| q[((bi * s + i) * hq + h) * d + c];
                    let allowed: Vec<usize> = (0..=i)
                        .filter(|&j| seg[bi * s + j] == seg[bi * s + i])
                        .collect();
                    let logits: Vec<f64> = allowed
                        .iter()
                        .map(|&j| {
                            (0..d)
                                .map(|c| qi(c) * k[((bi * s + j) * hkv + kvh) * d + c])
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = logits.iter().map(|l| (l - mx).exp()).sum();
                    for (n, &j) in allowed.iter().enumerate() {
                        let p = (logits[n] - mx).exp() / z;
                        for c in 0..d {
                            o[((bi * s + i) * hq + h) * d + c] +=
                                p * v[((bi * s + j) * hkv + kvh) * d + c];
                        }
                    }
                }
            }
        }
        o
    }

    fn setup(
        seed: u64,
        b: usize,
        s: usize,
        hq: usize,
        hkv: usize,
        d: usize,
    ) -> [(Tensor, Vec<f32>); 3] {
        let mut r = rng(seed);
        [
            rand_tensor(&mut r, &[b, s, hq, d], 1.5),
            rand_tensor(&mut r, &[b, s, hkv, d], 1.5),
            rand_tensor(&mut r, &[b, s, hkv, d], 1.0),
        ]
    }

    #[test]
    fn forward_matches_naive_gqa_with_segments() {
        let (b, s, hq, hkv, d) = (2, 6, 4, 2, 4);
        let [(q, qv), (k, kv), (v, vv)] = setup(40, b, s, hq, hkv, d);
        let segv = vec![0u32, 0, 0, 1, 1, 2, 5, 5, 5, 5, 5, 5];
        let seg = Tensor::from_u32(segv.clone(), &[b, s], &Device::Cpu).unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        let out = attention_fwd(&q, &k, &v, Some(&seg), scale).unwrap();
        let want = naive(&f64s(&qv), &f64s(&kv), &f64s(&vv), &segv, b, s, hq, hkv, d);
        assert_close("out", &out.out.to_vec_f32().unwrap(), &want, 1e-6);
        assert_eq!(out.lse.shape(), &[b, hq, s]);
        // A token that starts a segment only sees itself: its output is its own v row.
        let o = out.out.to_vec_f32().unwrap();
        let (bi, i, h) = (0, 3, 3);
        for c in 0..d {
            assert!(
                (o[((bi * s + i) * hq + h) * d + c] - vv[((bi * s + i) * hkv + h / 2) * d + c])
                    .abs()
                    < 1e-6
            );
        }
        // Without segments it is plain causal attention, which differs.
        let plain = attention_fwd(&q, &k, &v, None, scale).unwrap();
        let want_plain = naive(
            &f64s(&qv),
            &f64s(&kv),
            &f64s(&vv),
            &[0; 12],
            b,
            s,
            hq,
            hkv,
            d,
        );
        assert_close(
            "causal out",
            &plain.out.to_vec_f32().unwrap(),
            &want_plain,
            1e-6,
        );
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (b, s, hq, hkv, d) = (2, 5, 6, 2, 4);
        let [(q, qv), (k, kv), (v, vv)] = setup(41, b, s, hq, hkv, d);
        let mut r = rng(42);
        let (dout, dov) = rand_tensor(&mut r, &[b, s, hq, d], 1.0);
        let segv = vec![0u32, 0, 1, 1, 1, 3, 3, 3, 3, 3];
        let seg = Tensor::from_u32(segv.clone(), &[b, s], &Device::Cpu).unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        let f = attention_fwd(&q, &k, &v, Some(&seg), scale).unwrap();
        let gr = attention_bwd(&dout, &q, &k, &v, &f.out, &f.lse, Some(&seg), scale).unwrap();
        let (qd, kd, vd, dod) = (f64s(&qv), f64s(&kv), f64s(&vv), f64s(&dov));
        let obj =
            |q: &[f64], k: &[f64], v: &[f64]| dot(&dod, &naive(q, k, v, &segv, b, s, hq, hkv, d));
        let want_dq = fd_grad(&qd, 1e-6, |x| obj(x, &kd, &vd));
        let want_dk = fd_grad(&kd, 1e-6, |x| obj(&qd, x, &vd));
        let want_dv = fd_grad(&vd, 1e-6, |x| obj(&qd, &kd, x));
        assert_close("dq", &gr.dq.to_vec_f32().unwrap(), &want_dq, 2e-5);
        assert_close("dk", &gr.dk.to_vec_f32().unwrap(), &want_dk, 2e-5);
        assert_close("dv", &gr.dv.to_vec_f32().unwrap(), &want_dv, 2e-5);
    }

    #[test]
    fn heads_not_divisible_are_rejected() {
        let [(q, _), ..] = setup(43, 1, 2, 3, 3, 4);
        let [(_, _), (k, _), (v, _)] = setup(44, 1, 2, 3, 2, 4);
        assert!(matches!(
            attention_fwd(&q, &k, &v, None, 0.5),
            Err(KernelError::Shape { .. })
        ));
    }
}
