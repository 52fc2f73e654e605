//! GPU parity and throughput check of the CUDA backend against the CPU reference.
//!
//! For every CUDA op, on fresh random inputs (never zeros) of several shapes, odd ones included, in f32 and
//! bf16: runs the CPU reference (f32; for bf16 the inputs are first rounded to bf16 so both sides see the same
//! values) and the CUDA op with every device allocation poisoned with NaN bytes (so an output element a kernel
//! forgets to write fails the check), and compares with the norm-relative error `‖gpu − cpu‖ / ‖cpu‖`.
//! Bounds: f32 1e-4, bf16 2e-2 (bf16 keeps 8 significant bits, ~4e-3 per element).
//! Then: steady-state allocation check (no cuMemAlloc in a repeated step) and throughput lines for a bf16
//! 8192³ GEMM (cuBLASLt) and causal GQA attention forward/backward.
//!
//! Run: `cargo run --release -p qkernels --example cuda_parity [-- --skip-bench] [--attn-only] [--router-only] [--paged-only]` on a machine with a GPU,
//! libcuda, libnvrtc and libcublasLt loadable (LD_LIBRARY_PATH) and `cuda_bf16.h` findable (see
//! `qkernels::cuda::nvrtc`). Exit status 1 when any check fails.

use std::time::Instant;

use qkernels::ops::*;
use qkernels::{DType, Device, Tensor, cuda};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const GPU: Device = Device::Cuda(0);

struct Report {
    rows: Vec<(String, DType, String, String, f64, f64, bool)>,
}

impl Report {
    fn check(&mut self, op: &str, dt: DType, shape: &str, what: &str, gpu: &Tensor, cpu: &Tensor) {
        let g = gpu.to_vec_f32().expect("gpu read-back");
        let c = cpu.to_vec_f32().expect("cpu read-back");
        let bound = if dt == DType::BF16 { 2e-2 } else { 1e-4 };
        let (err, ok) = if g.len() != c.len() || gpu.shape() != cpu.shape() {
            (f64::INFINITY, false)
        } else {
            let nonfinite = g
                .iter()
                .zip(&c)
                .any(|(a, b)| !a.is_finite() && b.is_finite());
            let diff: f64 = g
                .iter()
                .zip(&c)
                .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm: f64 = c.iter().map(|&b| (b as f64).powi(2)).sum::<f64>().sqrt();
            let e = if norm == 0.0 { diff } else { diff / norm };
            let e = if nonfinite { f64::NAN } else { e };
            (e, !nonfinite && e < bound && norm > 0.0)
        };
        self.rows
            .push((op.into(), dt, shape.into(), what.into(), err, bound, ok));
    }

    fn scalar(&mut self, op: &str, dt: DType, shape: &str, what: &str, gpu: f64, cpu: f64) {
        let bound = if dt == DType::BF16 { 2e-2 } else { 1e-4 };
        let e = (gpu - cpu).abs() / cpu.abs().max(1e-12);
        self.rows.push((
            op.into(),
            dt,
            shape.into(),
            what.into(),
            e,
            bound,
            e < bound,
        ));
    }
}

fn uniform(r: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (r.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

/// `(cpu f32 tensor, gpu tensor of dtype dt)` holding the same values (rounded to bf16 first when dt is bf16).
fn pair(r: &mut StdRng, shape: &[usize], scale: f32, dt: DType) -> (Tensor, Tensor) {
    let n = shape.iter().product();
    let mut v = uniform(r, n, scale);
    if dt == DType::BF16 {
        v.iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
    }
    let c = Tensor::from_f32(v.clone(), shape, &Device::Cpu).unwrap();
    let g = Tensor::from_f32(v, shape, &GPU)
        .unwrap()
        .to_dtype(dt)
        .unwrap();
    (c, g)
}

fn ids(r: &mut StdRng, n: usize, below: u32) -> (Tensor, Tensor, Vec<u32>) {
    let v: Vec<u32> = (0..n).map(|_| r.random_range(0..below)).collect();
    (
        Tensor::from_u32(v.clone(), &[n], &Device::Cpu).unwrap(),
        Tensor::from_u32(v.clone(), &[n], &GPU).unwrap(),
        v,
    )
}

fn run_parity(rep: &mut Report) {
    let mut r = StdRng::seed_from_u64(7);
    for dt in [DType::F32, DType::BF16] {
        // Tensor primitives.
        for shape in [vec![7usize, 33], vec![64, 1000]] {
            let s = format!("{shape:?}");
            let (a, ag) = pair(&mut r, &shape, 1.0, dt);
            let (b, bg) = pair(&mut r, &shape, 1.0, dt);
            rep.check(
                "add",
                dt,
                &s,
                "out",
                &ag.add(&bg).unwrap(),
                &a.add(&b).unwrap(),
            );
            rep.check(
                "sub",
                dt,
                &s,
                "out",
                &ag.sub(&bg).unwrap(),
                &a.sub(&b).unwrap(),
            );
            rep.check(
                "mul",
                dt,
                &s,
                "out",
                &ag.mul(&bg).unwrap(),
                &a.mul(&b).unwrap(),
            );
            rep.check(
                "scale",
                dt,
                &s,
                "out",
                &ag.scale(-1.75).unwrap(),
                &a.scale(-1.75).unwrap(),
            );
            rep.check(
                "transpose",
                dt,
                &s,
                "out",
                &ag.transpose(0, 1).unwrap(),
                &a.transpose(0, 1).unwrap(),
            );
            rep.check(
                "narrow0",
                dt,
                &s,
                "out",
                &ag.narrow(0, 2, 3).unwrap(),
                &a.narrow(0, 2, 3).unwrap(),
            );
            rep.check(
                "narrow1",
                dt,
                &s,
                "out",
                &ag.narrow(1, 5, 11).unwrap(),
                &a.narrow(1, 5, 11).unwrap(),
            );
            rep.check(
                "cat1",
                dt,
                &s,
                "out",
                &Tensor::cat(&[&ag, &bg], 1).unwrap(),
                &Tensor::cat(&[&a, &b], 1).unwrap(),
            );
            rep.check(
                "sum_dim0",
                dt,
                &s,
                "out",
                &ag.sum_dim0().unwrap(),
                &a.sum_dim0().unwrap(),
            );
            let rt = ag.to_dtype(DType::F32).unwrap().to_dtype(dt).unwrap();
            rep.check("cast roundtrip", dt, &s, "out", &rt, &a);
        }
        // RMSNorm (hidden and per head).
        for shape in [vec![7usize, 33], vec![64, 4096], vec![5, 3, 128]] {
            let s = format!("{shape:?}");
            let d = *shape.last().unwrap();
            let (x, xg) = pair(&mut r, &shape, 2.0, dt);
            let (w, wg) = pair(&mut r, &[d], 1.0, dt);
            let (dy, dyg) = pair(&mut r, &shape, 1.0, dt);
            let c = rmsnorm_fwd(&x, &w, 1e-6).unwrap();
            let g = rmsnorm_fwd(&xg, &wg, 1e-6).unwrap();
            rep.check("rmsnorm_fwd", dt, &s, "y", &g.y, &c.y);
            rep.check("rmsnorm_fwd", dt, &s, "rstd", &g.rstd, &c.rstd);
            let cb = rmsnorm_bwd(&dy, &x, &w, &c.rstd).unwrap();
            let gb = rmsnorm_bwd(&dyg, &xg, &wg, &g.rstd).unwrap();
            rep.check("rmsnorm_bwd", dt, &s, "dx", &gb.dx, &cb.dx);
            rep.check("rmsnorm_bwd", dt, &s, "dw", &gb.dw, &cb.dw);
        }
        // RoPE.
        for (t, h, d) in [(7usize, 3usize, 64usize), (33, 5, 128)] {
            let s = format!("[{t}, {h}, {d}]");
            let pos: Vec<u32> = (0..t as u32).map(|i| (i * 37) % 1000).collect();
            let tc = RopeTable::new(
                &Tensor::from_u32(pos.clone(), &[t], &Device::Cpu).unwrap(),
                d,
                1e6,
            )
            .unwrap();
            let tg = RopeTable::new(&Tensor::from_u32(pos, &[t], &GPU).unwrap(), d, 1e6).unwrap();
            let (x, xg) = pair(&mut r, &[t, h, d], 1.0, dt);
            rep.check(
                "rope_fwd",
                dt,
                &s,
                "y",
                &rope_fwd(&xg, &tg).unwrap(),
                &rope_fwd(&x, &tc).unwrap(),
            );
            rep.check(
                "rope_bwd",
                dt,
                &s,
                "dx",
                &rope_bwd(&xg, &tg).unwrap(),
                &rope_bwd(&x, &tc).unwrap(),
            );
        }
        // SwiGLU.
        for shape in [vec![7usize, 33], vec![128, 3000]] {
            let s = format!("{shape:?}");
            let (g, gg) = pair(&mut r, &shape, 3.0, dt);
            let (u, ug) = pair(&mut r, &shape, 1.0, dt);
            let (dh, dhg) = pair(&mut r, &shape, 1.0, dt);
            rep.check(
                "swiglu_fwd",
                dt,
                &s,
                "h",
                &swiglu_fwd(&gg, &ug).unwrap(),
                &swiglu_fwd(&g, &u).unwrap(),
            );
            let c = swiglu_bwd(&dh, &g, &u).unwrap();
            let gb = swiglu_bwd(&dhg, &gg, &ug).unwrap();
            rep.check("swiglu_bwd", dt, &s, "dgate", &gb.dgate, &c.dgate);
            rep.check("swiglu_bwd", dt, &s, "dup", &gb.dup, &c.dup);
        }
        // Embedding (repeated ids).
        for (vocab, hidden, t) in [(50usize, 33usize, 17usize), (1000, 256, 300)] {
            let s = format!("V{vocab} H{hidden} T{t}");
            let (tab, tabg) = pair(&mut r, &[vocab, hidden], 1.0, dt);
            let (i, ig, _) = ids(&mut r, t, vocab as u32);
            rep.check(
                "embedding_fwd",
                dt,
                &s,
                "x",
                &embedding_fwd(&ig, &tabg).unwrap(),
                &embedding_fwd(&i, &tab).unwrap(),
            );
            let (dx, dxg) = pair(&mut r, &[t, hidden], 1.0, dt);
            rep.check(
                "embedding_bwd",
                dt,
                &s,
                "dtable",
                &embedding_bwd(&ig, &dxg, vocab).unwrap(),
                &embedding_bwd(&i, &dx, vocab).unwrap(),
            );
        }
        // Cross-entropy with per-token weights (some zero).
        for (t, v) in [(7usize, 33usize), (16, 15000)] {
            let s = format!("[{t}, {v}]");
            let (l, lg) = pair(&mut r, &[t, v], 4.0, dt);
            let (tg, tgg, _) = ids(&mut r, t, v as u32);
            let wv: Vec<f32> = (0..t)
                .map(|i| {
                    if i % 3 == 1 {
                        0.0
                    } else {
                        0.5 + (i % 4) as f32
                    }
                })
                .collect();
            let w = Tensor::from_f32(wv.clone(), &[t], &Device::Cpu).unwrap();
            let wg = Tensor::from_f32(wv, &[t], &GPU).unwrap();
            let c = cross_entropy_fwd_bwd(&l, &tg, &w, None).unwrap();
            let g = cross_entropy_fwd_bwd(&lg, &tgg, &wg, None).unwrap();
            rep.scalar("cross_entropy", dt, &s, "loss", g.loss, c.loss);
            rep.check("cross_entropy", dt, &s, "dlogits", &g.dlogits, &c.dlogits);
            rep.check(
                "ce_per_token",
                dt,
                &s,
                "ce",
                &cross_entropy_per_token(&lg, &tgg).unwrap(),
                &cross_entropy_per_token(&l, &tg).unwrap(),
            );
        }
        // GEMMs.
        for (n, k, o) in [(7usize, 33usize, 5usize), (128, 256, 384), (1000, 513, 77)] {
            let s = format!("n{n} k{k} out{o}");
            let (x, xg) = pair(&mut r, &[n, k], 1.0, dt);
            let (w, wg) = pair(&mut r, &[o, k], 1.0, dt);
            let (dy, dyg) = pair(&mut r, &[n, o], 1.0, dt);
            rep.check(
                "linear_fwd",
                dt,
                &s,
                "y",
                &linear_fwd(&xg, &wg).unwrap(),
                &linear_fwd(&x, &w).unwrap(),
            );
            let c = linear_bwd(&dy, &x, &w).unwrap();
            let g = linear_bwd(&dyg, &xg, &wg).unwrap();
            rep.check("linear_bwd", dt, &s, "dx", &g.dx, &c.dx);
            rep.check("linear_bwd", dt, &s, "dw", &g.dw, &c.dw);
        }
        {
            let (a, ag) = pair(&mut r, &[13, 17], 1.0, dt);
            let (b, bg) = pair(&mut r, &[17, 19], 1.0, dt);
            rep.check(
                "matmul",
                dt,
                "[13,17]·[17,19]",
                "out",
                &matmul(&ag, &bg).unwrap(),
                &matmul(&a, &b).unwrap(),
            );
            let (x, xg) = pair(&mut r, &[20, 16], 1.0, dt);
            let ws: Vec<(Tensor, Tensor)> =
                (0..3).map(|_| pair(&mut r, &[12, 16], 1.0, dt)).collect();
            let wc: Vec<&Tensor> = ws.iter().map(|p| &p.0).collect();
            let wgs: Vec<&Tensor> = ws.iter().map(|p| &p.1).collect();
            let offs = [0usize, 7, 7, 20];
            rep.check(
                "grouped_fwd",
                dt,
                "x[20,16] 3 groups",
                "y",
                &grouped_linear_fwd(&xg, &wgs, &offs).unwrap(),
                &grouped_linear_fwd(&x, &wc, &offs).unwrap(),
            );
            let (dy, dyg) = pair(&mut r, &[20, 12], 1.0, dt);
            let (cdx, cdw) = grouped_linear_bwd(&dy, &x, &wc, &offs).unwrap();
            let (gdx, gdw) = grouped_linear_bwd(&dyg, &xg, &wgs, &offs).unwrap();
            rep.check("grouped_bwd", dt, "x[20,16] 3 groups", "dx", &gdx, &cdx);
            for gi in [0, 2] {
                rep.check(
                    "grouped_bwd",
                    dt,
                    "x[20,16] 3 groups",
                    &format!("dw[{gi}]"),
                    &gdw[gi],
                    &cdw[gi],
                );
            }
        }
        // MoE router and token permutation (more router cases: `router_parity`).
        for (t, e, k, h) in [(9usize, 4usize, 2usize, 33usize), (200, 8, 2, 256)] {
            let sh = format!("T{t} E{e} k{k} H{h}");
            let (lg, lgg) = pair(&mut r, &[t, e], 2.0, dt);
            let rc = router_fwd(&lg, k, true).unwrap();
            let rg = router_fwd(&lgg, k, true).unwrap();
            rep.check("router_fwd", dt, &sh, "probs", &rg.probs, &rc.probs);
            rep.check(
                "router_fwd",
                dt,
                &sh,
                "topk_w",
                &rg.topk_weight,
                &rc.topk_weight,
            );
            let same_idx = rg.topk_idx.to_vec_u32().unwrap() == rc.topk_idx.to_vec_u32().unwrap();
            rep.scalar(
                "router_fwd",
                dt,
                &sh,
                "topk_idx",
                same_idx as u8 as f64,
                1.0,
            );
            // Use the CPU routing for both sides so the permutation tests do not depend on near-ties.
            let idx_g = rc.topk_idx.to_device(&GPU).unwrap();
            let w_g = rc.topk_weight.to_device(&GPU).unwrap();
            let (dtw, dtwg) = pair(&mut r, &[t, k], 1.0, DType::F32);
            let rg_cpu_idx = RouterOut {
                probs: rc.probs.to_device(&GPU).unwrap(),
                topk_idx: idx_g.clone(),
                topk_weight: w_g.clone(),
            };
            rep.check(
                "router_bwd",
                dt,
                &sh,
                "dlogits",
                &router_bwd(&dtwg, None, &rg_cpu_idx, true).unwrap(),
                &router_bwd(&dtw, None, &rc, true).unwrap(),
            );
            let pc = moe_plan(&rc.topk_idx, e).unwrap();
            let pg = moe_plan(&idx_g, e).unwrap();
            let (x, xg) = pair(&mut r, &[t, h], 1.0, dt);
            rep.check(
                "moe_permute",
                dt,
                &sh,
                "xp",
                &moe_permute(&xg, &pg).unwrap(),
                &moe_permute(&x, &pc).unwrap(),
            );
            let (dxp, dxpg) = pair(&mut r, &[t * k, h], 1.0, dt);
            rep.check(
                "moe_permute_bwd",
                dt,
                &sh,
                "dx",
                &moe_permute_bwd(&dxpg, &pg).unwrap(),
                &moe_permute_bwd(&dxp, &pc).unwrap(),
            );
            let (yp, ypg) = pair(&mut r, &[t * k, h], 1.0, dt);
            rep.check(
                "moe_unpermute",
                dt,
                &sh,
                "y",
                &moe_unpermute(&ypg, &w_g, &pg).unwrap(),
                &moe_unpermute(&yp, &rc.topk_weight, &pc).unwrap(),
            );
            let (dy, dyg) = pair(&mut r, &[t, h], 1.0, dt);
            let (cdyp, cdw) = moe_unpermute_bwd(&dy, &yp, &rc.topk_weight, &pc).unwrap();
            let (gdyp, gdw) = moe_unpermute_bwd(&dyg, &ypg, &w_g, &pg).unwrap();
            rep.check("moe_unpermute_bwd", dt, &sh, "dyp", &gdyp, &cdyp);
            rep.check("moe_unpermute_bwd", dt, &sh, "dweights", &gdw, &cdw);
        }
        attention_parity(rep, &mut r, dt);
        paged_parity(rep, &mut r, dt);
    }
    router_parity(rep, &mut r);
}

/// Paged KV cache: `kv_cache_write` then `paged_attention` against the CPU reference. Sequences get shuffled,
/// non-contiguous blocks; K/V go in with two writes (a "prefill" of the first part of every sequence, then the
/// rest); the query rows mix every position of every sequence (prefill rows) in a shuffled order. The GPU pools
/// start as NaN, so a read of a slot never written fails the check. Shapes: odd block sizes (1, 5, 7), GQA
/// groups 1–16, head_dim 30–256 (30: the unvectorised gather), contexts up to 1100, Qwen3-8B's heads.
fn paged_parity(rep: &mut Report, r: &mut StdRng, dt: DType) {
    for (lens, hq, hkv, d, bs) in [
        (vec![1usize, 17, 40], 4usize, 2usize, 64usize, 16usize),
        (vec![300, 5], 8, 2, 128, 16),
        (vec![1100], 2, 1, 96, 7),
        (vec![33, 64, 2, 129], 32, 8, 128, 16),
        (vec![50, 3], 16, 1, 256, 5),
        (vec![9, 4], 3, 3, 40, 1),
        (vec![20, 7], 4, 2, 30, 3),
    ] {
        let sh = format!("L{lens:?} hq{hq} hkv{hkv} d{d} bs{bs}");
        let blocks: Vec<usize> = lens.iter().map(|l| l.div_ceil(bs)).collect();
        let nb = blocks.iter().sum::<usize>() + 3;
        let mut ids: Vec<u32> = (0..nb as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, r.random_range(0..=i));
        }
        let mb = *blocks.iter().max().unwrap();
        let mut tables = vec![0u32; lens.len() * mb];
        let mut next = 0;
        for (si, &nbk) in blocks.iter().enumerate() {
            tables[si * mb..si * mb + nbk].copy_from_slice(&ids[next..next + nbk]);
            next += nbk;
        }
        let slot = |si: usize, p: usize| tables[si * mb + p / bs] * bs as u32 + (p % bs) as u32;
        let cache_shape = [nb, bs, hkv, d];
        let mut kc = Tensor::zeros(&cache_shape, DType::F32, &Device::Cpu).unwrap();
        let mut vc = Tensor::zeros(&cache_shape, DType::F32, &Device::Cpu).unwrap();
        let nan = || {
            Tensor::full(f32::NAN, &cache_shape, &GPU)
                .unwrap()
                .to_dtype(dt)
                .unwrap()
        };
        let (mut kg, mut vg) = (nan(), nan());
        let mut written = Vec::new();
        for part in 0..2 {
            let mut sl = Vec::new();
            for (si, &l) in lens.iter().enumerate() {
                let range = if part == 0 { 0..l / 2 } else { l / 2..l };
                for p in range {
                    sl.push(slot(si, p));
                }
            }
            if sl.is_empty() {
                continue;
            }
            let n = sl.len();
            written.extend_from_slice(&sl);
            let (k, kgr) = pair(r, &[n, hkv, d], 1.0, dt);
            let (v, vgr) = pair(r, &[n, hkv, d], 1.0, dt);
            let slc = Tensor::from_u32(sl.clone(), &[n], &Device::Cpu).unwrap();
            let slg = Tensor::from_u32(sl, &[n], &GPU).unwrap();
            kv_cache_write(&mut kc, &mut vc, &k, &v, &slc).unwrap();
            kv_cache_write(&mut kg, &mut vg, &kgr, &vgr, &slg).unwrap();
        }
        // The written rows of the pools, gathered on the host.
        let row = hkv * d;
        let gather = |t: &Tensor| {
            let all = t.to_vec_f32().unwrap();
            let v: Vec<f32> = written
                .iter()
                .flat_map(|&s| all[s as usize * row..(s as usize + 1) * row].to_vec())
                .collect();
            Tensor::from_f32(v, &[written.len(), row], &Device::Cpu).unwrap()
        };
        rep.check("kv_cache_write", dt, &sh, "k", &gather(&kg), &gather(&kc));
        rep.check("kv_cache_write", dt, &sh, "v", &gather(&vg), &gather(&vc));
        // Every position of every sequence, shuffled.
        let mut rows: Vec<(u32, u32)> = lens
            .iter()
            .enumerate()
            .flat_map(|(si, &l)| (0..l as u32).map(move |p| (si as u32, p)))
            .collect();
        for i in (1..rows.len()).rev() {
            rows.swap(i, r.random_range(0..=i));
        }
        let t = rows.len();
        let (q, qg) = pair(r, &[t, hq, d], 1.0, dt);
        let u32s = |v: Vec<u32>, shape: &[usize]| {
            (
                Tensor::from_u32(v.clone(), shape, &Device::Cpu).unwrap(),
                Tensor::from_u32(v, shape, &GPU).unwrap(),
            )
        };
        let (btc, btg) = u32s(tables.clone(), &[lens.len(), mb]);
        let (rsc, rsg) = u32s(rows.iter().map(|x| x.0).collect(), &[t]);
        let (rpc, rpg) = u32s(rows.iter().map(|x| x.1).collect(), &[t]);
        let c = paged_attention(&q, &kc, &vc, &btc, &rsc, &rpc).unwrap();
        let g = paged_attention(&qg, &kg, &vg, &btg, &rsg, &rpg).unwrap();
        rep.check("paged_attention", dt, &sh, "out", &g, &c);
        // Decode rows (the last position of each sequence): few rows, so the key range is split into parts.
        let t = lens.len();
        let (q, qg) = pair(r, &[t, hq, d], 1.0, dt);
        let (rsc, rsg) = u32s((0..t as u32).collect(), &[t]);
        let (rpc, rpg) = u32s(lens.iter().map(|&l| l as u32 - 1).collect(), &[t]);
        let c = paged_attention(&q, &kc, &vc, &btc, &rsc, &rpc).unwrap();
        let g = paged_attention(&qg, &kg, &vg, &btg, &rsg, &rpg).unwrap();
        rep.check("paged_attention", dt, &sh, "decode", &g, &c);
    }
    // Row argmax (greedy decoding): ids must match exactly (ties, frequent in bf16, go to the lowest index on both
    // sides); compared as f32 values of the ids.
    for (rows, cols) in [(1usize, 7usize), (3, 1000), (64, 151_936), (5, 33_000)] {
        let (x, xg) = pair(r, &[rows, cols], 4.0, dt);
        let as_f32 = |t: Tensor| {
            let v: Vec<f32> = t
                .to_vec_u32()
                .unwrap()
                .iter()
                .map(|&i| i as f32 + 1.0)
                .collect();
            Tensor::from_f32(v, &[rows], &Device::Cpu).unwrap()
        };
        rep.check(
            "argmax_rows",
            dt,
            &format!("[{rows}, {cols}]"),
            "ids",
            &as_f32(argmax_rows(&xg).unwrap()),
            &as_f32(argmax_rows(&x).unwrap()),
        );
    }
}

/// Attention forward/backward against the CPU reference: bf16 on both the tensor-core and the CUDA-core kernels,
/// f32 on the CUDA-core ones; odd lengths, GQA, segments, several tiles of every kernel.
fn attention_parity(rep: &mut Report, r: &mut StdRng, dt: DType) {
    // Attention: bf16 with head_dim 64/128 runs on the tensor-core kernels by default; the CUDA-core
    // kernels are checked on the same shapes too.
    let paths: &[bool] = if dt == DType::BF16 {
        &[true, false]
    } else {
        &[false]
    };
    for &tc in paths {
        cuda::set_attention_tensor_cores(tc);
        let tag = if tc { " [tc]" } else { "" };
        for (b, s, hq, hkv, d, segs) in [
            (1usize, 7usize, 2usize, 1usize, 64usize, false),
            (2, 67, 4, 2, 128, true),
            (1, 130, 8, 2, 128, false),
            (1, 40, 2, 2, 96, true),
            (1, 300, 4, 1, 64, true),
            (1, 520, 2, 1, 128, false),
            (1, 1100, 4, 2, 128, true),
            (2, 777, 4, 1, 64, false),
        ] {
            let sh = format!(
                "b{b} s{s} hq{hq} hkv{hkv} d{d}{}{tag}",
                if segs { " seg" } else { "" }
            );
            let (q, qg) = pair(r, &[b, s, hq, d], 1.0, dt);
            let (k, kg) = pair(r, &[b, s, hkv, d], 1.0, dt);
            let (v, vg) = pair(r, &[b, s, hkv, d], 1.0, dt);
            let segv: Vec<u32> = (0..b * s).map(|i| ((i % s) / 23) as u32).collect();
            let seg_c = Tensor::from_u32(segv.clone(), &[b, s], &Device::Cpu).unwrap();
            let seg_g = Tensor::from_u32(segv, &[b, s], &GPU).unwrap();
            let (sc, sg) = if segs {
                (Some(&seg_c), Some(&seg_g))
            } else {
                (None, None)
            };
            let scale = 1.0 / (d as f32).sqrt();
            let c = attention_fwd(&q, &k, &v, sc, scale).unwrap();
            let g = attention_fwd(&qg, &kg, &vg, sg, scale).unwrap();
            rep.check("attention_fwd", dt, &sh, "out", &g.out, &c.out);
            rep.check("attention_fwd", dt, &sh, "lse", &g.lse, &c.lse);
            let (dout, doutg) = pair(r, &[b, s, hq, d], 1.0, dt);
            let cb = attention_bwd(&dout, &q, &k, &v, &c.out, &c.lse, sc, scale).unwrap();
            let gb = attention_bwd(&doutg, &qg, &kg, &vg, &g.out, &g.lse, sg, scale).unwrap();
            rep.check("attention_bwd", dt, &sh, "dq", &gb.dq, &cb.dq);
            rep.check("attention_bwd", dt, &sh, "dk", &gb.dk, &cb.dk);
            rep.check("attention_bwd", dt, &sh, "dv", &gb.dv, &cb.dv);
        }
    }
    cuda::set_attention_tensor_cores(true);
}

/// Router and MoE plan on the device against the CPU reference, f32 and bf16 logits (the CPU runs on the
/// bf16-rounded values, so the selected indices must match exactly in both cases; probabilities, weights and
/// gradients are f32 compute on identical inputs, so the f32 bound applies to both). Shapes cover odd token
/// counts, experts 8/60/128, top_k 1/2/8 (and k = E), norm on/off, and a case of integer logits full of ties.
fn router_parity(rep: &mut Report, r: &mut StdRng) {
    // A row whose bound is the f32 one whatever the logits' dtype. An all-zero reference (k = 1 with
    // renormalisation: the weight is constantly 1, so its gradient is 0) needs an all-zero result.
    fn check32(rep: &mut Report, dt: DType, sh: &str, what: &str, g: &Tensor, c: &Tensor) {
        let cv = c.to_vec_f32().expect("cpu read-back");
        if cv.iter().all(|&x| x == 0.0) {
            let gv = g.to_vec_f32().expect("gpu read-back");
            exact(
                rep,
                dt,
                sh,
                what,
                g.shape() == c.shape() && gv.iter().all(|&x| x == 0.0),
            );
            return;
        }
        rep.check("router", DType::F32, sh, what, g, c);
        rep.rows.last_mut().expect("just pushed").1 = dt;
    }
    fn exact(rep: &mut Report, dt: DType, sh: &str, what: &str, same: bool) {
        let e = if same { 0.0 } else { 1.0 };
        rep.rows
            .push(("router".into(), dt, sh.into(), what.into(), e, 0.0, same));
    }
    for dt in [DType::F32, DType::BF16] {
        for (t, e, k, ties) in [
            (1usize, 8usize, 1usize, false),
            (7, 8, 2, false),
            (1, 8, 8, false),
            (33, 60, 8, false),
            (129, 60, 2, false),
            (1000, 128, 8, false),
            (4097, 128, 1, false),
            (257, 128, 2, false),
            (65, 60, 8, true),
            (300, 8, 2, true),
        ] {
            for norm in [true, false] {
                let sh = format!(
                    "T{t} E{e} k{k}{}{}",
                    if norm { " norm" } else { "" },
                    if ties { " ties" } else { "" }
                );
                let (lg, lgg) = if ties {
                    // Integers in -2..=2: exact in bf16, many equal probabilities per row.
                    let v: Vec<f32> = (0..t * e)
                        .map(|_| r.random_range(-2i32..=2) as f32)
                        .collect();
                    (
                        Tensor::from_f32(v.clone(), &[t, e], &Device::Cpu).unwrap(),
                        Tensor::from_f32(v, &[t, e], &GPU)
                            .unwrap()
                            .to_dtype(dt)
                            .unwrap(),
                    )
                } else {
                    pair(r, &[t, e], 3.0, dt)
                };
                let rc = router_fwd(&lg, k, norm).unwrap();
                let rg = router_fwd(&lgg, k, norm).unwrap();
                check32(rep, dt, &sh, "probs", &rg.probs, &rc.probs);
                check32(rep, dt, &sh, "topk_w", &rg.topk_weight, &rc.topk_weight);
                let (ig, ic) = (
                    rg.topk_idx.to_vec_u32().unwrap(),
                    rc.topk_idx.to_vec_u32().unwrap(),
                );
                exact(
                    rep,
                    dt,
                    &sh,
                    "topk_idx",
                    ig == ic && rg.topk_idx.shape() == [t, k],
                );
                // Aux-loss statistics (device column sums / counts) and the broadcast dprobs.
                let sc = RouterStats::from_router(&rc).unwrap();
                let sg = RouterStats::from_router(&rg).unwrap();
                exact(
                    rep,
                    dt,
                    &sh,
                    "assign",
                    sg.assignments == sc.assignments && sg.rows == sc.rows,
                );
                let f = |v: &[f64]| {
                    Tensor::from_f32(
                        v.iter().map(|&x| x as f32).collect(),
                        &[v.len()],
                        &Device::Cpu,
                    )
                    .unwrap()
                };
                check32(rep, dt, &sh, "p_sums", &f(&sg.prob_sums), &f(&sc.prob_sums));
                let dpc = sc.aux_dprobs(t, 0.01, &Device::Cpu).unwrap();
                let dpg = sg.aux_dprobs(t, 0.01, &GPU).unwrap();
                check32(rep, dt, &sh, "aux_dp", &dpg, &dpc);
                // Backward, with and without the aux loss's dprobs.
                let (dw, dwg) = pair(r, &[t, k], 1.0, DType::F32);
                for (what, dc, dg) in [("dlogits", None, None), ("dl+aux", Some(&dpc), Some(&dpg))]
                {
                    check32(
                        rep,
                        dt,
                        &sh,
                        what,
                        &router_bwd(&dwg, dg, &rg, norm).unwrap(),
                        &router_bwd(&dw, dc, &rc, norm).unwrap(),
                    );
                }
                // MoE plan from the device indices: offsets exactly, and the three index tensors through the
                // ops that use them (row_token: permute; slot_row: unpermute; row_slot: unpermute_bwd's dyp).
                let pc = moe_plan(&rc.topk_idx, e).unwrap();
                let pg = moe_plan(&rg.topk_idx, e).unwrap();
                exact(
                    rep,
                    dt,
                    &sh,
                    "offsets",
                    pg.expert_offsets == pc.expert_offsets,
                );
                let h = 16;
                let (x, xg) = pair(r, &[t, h], 1.0, DType::F32);
                check32(
                    rep,
                    dt,
                    &sh,
                    "plan:xp",
                    &moe_permute(&xg, &pg).unwrap(),
                    &moe_permute(&x, &pc).unwrap(),
                );
                let (yp, ypg) = pair(r, &[t * k, h], 1.0, DType::F32);
                check32(
                    rep,
                    dt,
                    &sh,
                    "plan:y",
                    &moe_unpermute(&ypg, &rg.topk_weight, &pg).unwrap(),
                    &moe_unpermute(&yp, &rc.topk_weight, &pc).unwrap(),
                );
                let (dy, dyg) = pair(r, &[t, h], 1.0, DType::F32);
                let (cdyp, _) = moe_unpermute_bwd(&dy, &yp, &rc.topk_weight, &pc).unwrap();
                let (gdyp, _) = moe_unpermute_bwd(&dyg, &ypg, &rg.topk_weight, &pg).unwrap();
                check32(rep, dt, &sh, "plan:dyp", &gdyp, &cdyp);
            }
        }
    }
    // An expert index out of range is a typed error on the device too.
    let bad = Tensor::from_u32(vec![0, 4, 1, 2], &[2, 2], &GPU).unwrap();
    exact(
        rep,
        DType::F32,
        "idx 4 of E4",
        "bad_idx",
        matches!(
            moe_plan(&bad, 4),
            Err(qkernels::KernelError::InvalidArgument { .. })
        ),
    );
}

fn time<F: FnMut()>(iters: usize, mut f: F) -> f64 {
    f();
    cuda::synchronize(&GPU).unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    cuda::synchronize(&GPU).unwrap();
    t.elapsed().as_secs_f64() / iters as f64
}

fn gpu_rand(r: &mut StdRng, shape: &[usize], scale: f32, dt: DType) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_f32(uniform(r, n, scale), shape, &GPU)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
}

fn steady_state() -> (u64, u64) {
    let mut r = StdRng::seed_from_u64(3);
    let x = gpu_rand(&mut r, &[512, 1024], 1.0, DType::BF16);
    let w = gpu_rand(&mut r, &[1024], 1.0, DType::BF16);
    let wl = gpu_rand(&mut r, &[2048, 1024], 0.03, DType::BF16);
    let step = || {
        let n = rmsnorm_fwd(&x, &w, 1e-6).unwrap();
        let y = linear_fwd(&n.y, &wl).unwrap();
        let g = linear_bwd(&y, &n.y, &wl).unwrap();
        let _ = rmsnorm_bwd(&g.dx, &x, &w, &n.rstd).unwrap();
    };
    step();
    cuda::synchronize(&GPU).unwrap();
    let before = cuda::pool_stats(&GPU).unwrap().unwrap().mallocs;
    step();
    step();
    cuda::synchronize(&GPU).unwrap();
    let after = cuda::pool_stats(&GPU).unwrap().unwrap().mallocs;
    (before, after)
}

fn bench(attn_only: bool) {
    let mut r = StdRng::seed_from_u64(11);
    if !attn_only {
        bench_gemm(&mut r);
    }
    bench_attention(&mut r);
}

fn bench_gemm(r: &mut StdRng) {
    let n = 8192;
    let x = gpu_rand(r, &[n, n], 1.0, DType::BF16);
    let w = gpu_rand(r, &[n, n], 1.0, DType::BF16);
    let t = time(10, || {
        let _ = linear_fwd(&x, &w).unwrap();
    });
    let fl = 2.0 * (n as f64).powi(3);
    println!(
        "GEMM bf16 {n}x{n}x{n} (cuBLASLt, x·wᵀ): {:.3} ms, {:.1} TFLOP/s",
        t * 1e3,
        fl / t / 1e12
    );
    let t = time(5, || {
        let _ = linear_bwd(&x, &x, &w).unwrap();
    });
    println!(
        "GEMM bf16 linear_bwd {n}³ (dx bf16 + dw f32): {:.3} ms, {:.1} TFLOP/s",
        t * 1e3,
        2.0 * fl / t / 1e12
    );
}

/// Causal GQA attention at the training shapes of qwen3-0.6b/1.7b/4b (s 4096) and a few more.
fn bench_attention(r: &mut StdRng) {
    for (b, s, hq, hkv, d, tc) in [
        (4usize, 4096usize, 16usize, 8usize, 128usize, true),
        (2, 4096, 16, 8, 128, true),
        (1, 4096, 32, 8, 128, true),
        (4, 2048, 16, 8, 128, true),
        (1, 8192, 32, 8, 128, true),
        (1, 4096, 32, 8, 64, true),
        (1, 4096, 32, 8, 128, false),
    ] {
        cuda::set_attention_tensor_cores(tc);
        let q = gpu_rand(r, &[b, s, hq, d], 1.0, DType::BF16);
        let k = gpu_rand(r, &[b, s, hkv, d], 1.0, DType::BF16);
        let v = gpu_rand(r, &[b, s, hkv, d], 1.0, DType::BF16);
        let scale = 1.0 / (d as f32).sqrt();
        // Causal: half of the S² score matrix; fwd 2 GEMMs (4·b·hq·s²·d/2 FLOPs), bwd 2.5× that.
        let fl = 4.0 * (b * hq * d) as f64 * (s as f64).powi(2) / 2.0;
        let o = attention_fwd(&q, &k, &v, None, scale).unwrap();
        let tf = time(20, || {
            let _ = attention_fwd(&q, &k, &v, None, scale).unwrap();
        });
        let tb = time(10, || {
            let _ = attention_bwd(&o.out, &q, &k, &v, &o.out, &o.lse, None, scale).unwrap();
        });
        println!(
            "attention{} bf16 b{b} s{s} hq{hq} hkv{hkv} d{d} causal: fwd {:.2} ms {:.1} TFLOP/s, bwd {:.2} ms {:.1} TFLOP/s",
            if tc { " [tc]" } else { " [simt]" },
            tf * 1e3,
            fl / tf / 1e12,
            tb * 1e3,
            2.5 * fl / tb / 1e12
        );
    }
}

/// Decode attention through the paged cache at Qwen3-8B's heads (32 q / 8 kv, d 128, bf16, block 16): one
/// query row per sequence at the end of its context, the time and the effective K/V read bandwidth.
fn bench_paged(r: &mut StdRng) {
    let (hq, hkv, d, bs) = (32usize, 8usize, 128usize, 16usize);
    for (seqs, ctx) in [(1usize, 256usize), (64, 256), (64, 2048), (8, 16384)] {
        let mb = ctx.div_ceil(bs);
        let nb = seqs * mb;
        let kc = gpu_rand(r, &[nb, bs, hkv, d], 1.0, DType::BF16);
        let vc = gpu_rand(r, &[nb, bs, hkv, d], 1.0, DType::BF16);
        let q = gpu_rand(r, &[seqs, hq, d], 1.0, DType::BF16);
        let tables: Vec<u32> = (0..nb as u32).collect();
        let bt = Tensor::from_u32(tables, &[seqs, mb], &GPU).unwrap();
        let rs = Tensor::from_u32((0..seqs as u32).collect(), &[seqs], &GPU).unwrap();
        let rp = Tensor::from_u32(vec![ctx as u32 - 1; seqs], &[seqs], &GPU).unwrap();
        let s = time(20, || {
            paged_attention(&q, &kc, &vc, &bt, &rs, &rp).unwrap();
        });
        let bytes = (2 * seqs * ctx * hkv * d * 2) as f64;
        println!(
            "paged_attention decode bf16 seqs {seqs} ctx {ctx} hq {hq} hkv {hkv} d {d}: {:.3} ms, {:.0} GB/s K/V read",
            s * 1e3,
            bytes / s / 1e9
        );
    }
}

fn main() {
    let skip_bench = std::env::args().any(|a| a == "--skip-bench");
    // `--attn-only`: attention parity (f32 + bf16) and the attention timings, nothing else.
    let attn_only = std::env::args().any(|a| a == "--attn-only");
    // `--router-only`: the router / MoE-plan parity (f32 + bf16 logits), no benchmarks.
    let router_only = std::env::args().any(|a| a == "--router-only");
    // `--paged-only`: the paged KV-cache parity (f32 + bf16) and the decode attention timing.
    let paged_only = std::env::args().any(|a| a == "--paged-only");
    let n = cuda::device_count();
    if n == 0 {
        eprintln!(
            "cuda_parity: no CUDA device (driver present: {}); nothing to check",
            cuda::driver_present()
        );
        std::process::exit(2);
    }
    let t0 = Instant::now();
    let probe = Tensor::zeros(&[1], DType::F32, &GPU).unwrap();
    drop(probe);
    println!(
        "device cuda:0 of {n}; NVRTC {:?}; headers {:?}",
        cuda::nvrtc::nvrtc_version().ok(),
        cuda::nvrtc::find_include_dir().ok()
    );
    cuda::set_poison_allocations(&GPU, true).unwrap();
    let mut rep = Report { rows: Vec::new() };
    if router_only {
        router_parity(&mut rep, &mut StdRng::seed_from_u64(5));
    } else if paged_only {
        let mut r = StdRng::seed_from_u64(9);
        for dt in [DType::F32, DType::BF16] {
            paged_parity(&mut rep, &mut r, dt);
        }
    } else if attn_only {
        let mut r = StdRng::seed_from_u64(7);
        for dt in [DType::F32, DType::BF16] {
            attention_parity(&mut rep, &mut r, dt);
        }
    } else {
        run_parity(&mut rep);
    }
    cuda::set_poison_allocations(&GPU, false).unwrap();
    println!(
        "{:<16} {:<5} {:<30} {:<8} {:>10} {:>8}  ok",
        "op", "dtype", "shape", "output", "rel_err", "bound"
    );
    let mut fails = 0;
    for (op, dt, shape, what, e, b, ok) in &rep.rows {
        if !ok {
            fails += 1;
        }
        println!(
            "{op:<16} {:<5} {shape:<30} {what:<8} {e:>10.2e} {b:>8.0e}  {}",
            dt.to_string(),
            if *ok { "ok" } else { "FAIL" }
        );
    }
    cuda::set_attention_tensor_cores(true);
    println!(
        "parity: {} checks, {} failed ({:.1} s incl. NVRTC compile/cache)",
        rep.rows.len(),
        fails,
        t0.elapsed().as_secs_f64()
    );
    let (before, after) = steady_state();
    println!(
        "allocator: cuMemAlloc calls during two repeated steps: {} (total {after}); stats {:?}",
        after - before,
        cuda::pool_stats(&GPU).unwrap().unwrap()
    );
    if !skip_bench && paged_only {
        bench_paged(&mut StdRng::seed_from_u64(3));
    } else if !skip_bench && !router_only {
        bench(attn_only);
        bench_paged(&mut StdRng::seed_from_u64(3));
    }
    if fails > 0 || after != before {
        std::process::exit(1);
    }
}
