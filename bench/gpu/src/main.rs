//! `qcluster-gpu-bench`: the whole Qwen3 model on one GPU.
//!
//! - `parity [--fixtures DIR] [--tol X]`: the golden fixtures (tiny dense and MoE, HF weights) plus a synthetic
//!   dense model with head_dim 128 (the tensor-core attention path), forward + backward on `Device::Cuda(0)` in
//!   f32 and in bf16 (weights and activations bf16, weight gradients f32), against the CPU f32 reference run on
//!   the same weights rounded to bf16. Loss and every parameter gradient are compared norm-relative
//!   (`‖gpu − cpu‖ / ‖cpu‖` per tensor). Bounds: f32 1e-4 for everything; bf16 1e-2 for the losses and 3e-2 per
//!   gradient tensor (`--tol`), because bf16 activations alone put gradients 1–3% off f32: HF transformers in
//!   bf16 vs f32 on these fixtures (torch CPU) gives median 1.6–1.8e-2, max 2.6–3.2e-2 (README.md). Prints a
//!   table; exit status 1 on any failure.
//! - `train-step MODEL SEQ MBS STEPS [--ckpt] [--no-breakdown]`: a random-init official Qwen3 shape in bf16 on one
//!   GPU, timed `forward_backward` (forward, loss, backward, f32 weight gradients; NO optimizer step: there is no
//!   GPU optimizer yet). Prints one JSON line like `torch_baseline.py` with MFU by DESIGN §7's formula and by
//!   torch_baseline's formula, then (dense models) a per-op breakdown: every op the step runs, at the step's
//!   shapes, timed alone (host timer around a synchronised launch, median of 5) times its count per step.
//!
//! - `tp-dp-parity`, `tp-dp`: two GPUs, tensor and data parallelism over NCCL against the one-GPU run, and their
//!   step throughput (see [`tp_dp`]).
//!
//! - `serve --model MODEL --concurrency 1,16,64 --prompt-len 128 --new-tokens 128`: the serving engine (continuous
//!   batching, paged KV cache, bf16) on one GPU, TTFT / TPOT / tokens per second next to
//!   `../shared/bench/torch_generate.py` (see [`serve`]).
//!
//! See README.md beside this file.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use qkernels::ops::{self, RopeTable};
use qkernels::{DType, Device, Tensor, cuda};
use qparallel::hf::{self, HostTensor, TensorMap};
use qparallel::model::{Batch, ModelConfig, Qwen3Model, Qwen3Params};

mod serve;
mod tp_dp;

type R<T> = Result<T, Box<dyn Error>>;

/// The device under test: `Device::Cuda(0)`, or the CPU when `QCLUSTER_GPU_BENCH_DEVICE=cpu` (a dry run of the
/// tool itself on a machine without a GPU; the numbers then mean nothing).
fn gpu() -> Device {
    static D: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    *D.get_or_init(
        || match std::env::var("QCLUSTER_GPU_BENCH_DEVICE").as_deref() {
            Ok("cpu") => Device::Cpu,
            _ => Device::Cuda(0),
        },
    )
}

/// bf16 on the GPU; f32 in a CPU dry run (the CPU ops compute in f32 only).
fn compute_dtype() -> DType {
    if gpu() == Device::Cpu {
        DType::F32
    } else {
        DType::BF16
    }
}

fn cuda_dev() -> R<Option<std::sync::Arc<cuda::device::CudaDev>>> {
    Ok(match gpu() {
        Device::Cpu => None,
        Device::Cuda(i) => Some(cuda::device::get(i)?),
    })
}
/// Dense bf16 peak of an H100/H200 SXM (DESIGN §7; torch_baseline uses the same).
const PEAK: f64 = 989e12;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("parity") => parity(&args[1..]),
        Some("train-step") => train_step(&args[1..]),
        Some("optim-parity") => optim_parity(),
        Some("tp-dp-parity") => tp_dp::parity(&args[1..]),
        Some("tp-dp") => tp_dp::throughput(&args[1..]),
        Some("serve") => serve::serve(&args[1..]),
        _ => {
            eprintln!(
                "usage: qcluster-gpu-bench parity [--fixtures DIR] [--tol X]\n       \
                 qcluster-gpu-bench train-step MODEL SEQ MBS STEPS [--ckpt] [--no-breakdown] [--optimizer]\n       \
                 qcluster-gpu-bench optim-parity\n       \
                 qcluster-gpu-bench tp-dp-parity [--fixtures DIR] [--tol X] [--rows FILE] [--layouts tp2,tp2sp,dp2]\n       \
                 qcluster-gpu-bench tp-dp MODEL SEQ MBS STEPS [--layouts single,dp2,tp2,tp2sp]\n       \
                 qcluster-gpu-bench serve [--model MODEL] [--concurrency 1,16,64] [--prompt-len 128] [--new-tokens 128] \
                 [--max-batch-tokens 8192] [--kv-fraction 0.85]\n\
                 MODEL: qwen3-0.6b | qwen3-1.7b | qwen3-4b | qwen3-8b | qwen3-50m"
            );
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Shared helpers.

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    if got.iter().any(|x| !x.is_finite()) {
        return f64::NAN;
    }
    let d: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let n: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
    if n == 0.0 { d } else { d / n }
}

fn round_bf16(map: &TensorMap) -> TensorMap {
    map.iter()
        .map(|(k, t)| {
            let data = t
                .data
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect();
            (
                k.clone(),
                HostTensor {
                    shape: t.shape.clone(),
                    data,
                },
            )
        })
        .collect()
}

/// Casts every parameter of `m` to `dt` in place.
fn cast_params(m: &mut Qwen3Model, dt: DType) -> R<()> {
    let mut err = None;
    m.params.visit_mut(&mut |_, t| {
        if err.is_none() {
            match t.to_dtype(dt) {
                Ok(x) => *t = x,
                Err(e) => err = Some(e),
            }
        }
    });
    match err {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// splitmix64: a small, fast generator for random inputs (not for statistics).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % n as u64) as u32
    }
}

/// A pool of uniform [-1, 1) values; tensors take a window of it at a random offset (cheap random data for
/// billions of parameters; every value is random, windows overlap).
struct Pool {
    vals: Vec<f32>,
    rng: Rng,
}

impl Pool {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let vals = (0..(1 << 24) + 4099).map(|_| rng.unit()).collect();
        Pool { vals, rng }
    }
    fn host(&mut self, n: usize, scale: f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(n);
        let len = self.vals.len();
        while out.len() < n {
            let start = self.rng.below(len as u32 - 1) as usize;
            let take = (n - out.len()).min(len - start);
            out.extend(self.vals[start..start + take].iter().map(|v| v * scale));
        }
        out
    }
    fn gpu(&mut self, shape: &[usize], scale: f32, dt: DType) -> R<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_f32(self.host(n, scale), shape, &gpu())?.to_dtype(dt)?)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// parity

struct Case {
    name: String,
    cfg: ModelConfig,
    weights: TensorMap,
    batch: Batch,
    golden_loss: Option<f64>,
}

fn fixture_case(dir: &Path, name: &str) -> R<Case> {
    let d = dir.join(name);
    let cfg = ModelConfig::from_file(d.join("config.json"))?;
    let weights = hf::load_checkpoint(&d)?;
    let gp = d.join("golden.safetensors");
    let golden = hf::load_file_filtered(&gp, |n| n == "loss_weights")?;
    let (shape, ids) = hf::read_i64_tensor(&gp, "input_ids")?;
    let (_, labels) = hf::read_i64_tensor(&gp, "labels")?;
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("golden.json"))?)?;
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let batch = Batch::from_labels(ids, &labels, shape[0], shape[1])?
        .scale_loss_weights(&golden["loss_weights"].data)?;
    Ok(Case {
        name: name.into(),
        cfg,
        weights,
        batch,
        golden_loss: info["total_loss"].as_f64(),
    })
}

/// A dense model with head_dim 128 and GQA 2 (the bf16 tensor-core attention path), random weights, 2 × 256 tokens.
fn synthetic_case() -> R<Case> {
    let j = serde_json::json!({
        "model_type": "qwen3", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true
    });
    let cfg = ModelConfig::from_json_value(&j, "synthetic-hd128")?;
    let model = Qwen3Model::random(cfg.clone(), 7, 0.05, Device::Cpu)?;
    let weights = model.params.to_host()?;
    let mut rng = Rng(99);
    let (b, s) = (2, 256);
    let ids = (0..b * s).map(|_| rng.below(1000)).collect();
    Ok(Case {
        name: "synthetic_hd128".into(),
        cfg,
        weights,
        batch: Batch::causal_lm(ids, b, s)?,
        golden_loss: None,
    })
}

struct Row {
    case: String,
    dtype: DType,
    what: String,
    err: f64,
    bound: f64,
    note: String,
}

impl Row {
    fn ok(&self) -> bool {
        self.err.is_finite() && self.err < self.bound
    }
}

fn parity(args: &[String]) -> R<bool> {
    let mut fixtures = PathBuf::from("tests/fixtures");
    let mut tol_bf16 = 3e-2; // per gradient tensor
    let loss_tol_bf16 = 1e-2;
    let tol_f32 = 1e-4;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--fixtures" => {
                fixtures = PathBuf::from(&args[i + 1]);
                i += 1;
            }
            "--tol" => {
                tol_bf16 = args[i + 1].parse()?;
                i += 1;
            }
            a => return Err(format!("parity: unknown argument {a}").into()),
        }
        i += 1;
    }
    match cuda_dev()? {
        Some(dev) => println!(
            "# device cuda:0 arch {} ({} SMs); GPU runs poisoned (every allocation NaN-filled)",
            dev.arch(),
            dev.sm_count()
        ),
        None => println!("# DRY RUN on the CPU (QCLUSTER_GPU_BENCH_DEVICE=cpu)"),
    }
    let mut cases = Vec::new();
    for name in [
        "dense_tied",
        "dense_untied",
        "moe_norm_topk",
        "moe_no_norm_topk",
    ] {
        cases.push(fixture_case(&fixtures, name)?);
    }
    cases.push(synthetic_case()?);

    let mut rows: Vec<Row> = Vec::new();
    for c in &cases {
        // Sanity: the CPU f32 run on the exact weights against the transformers golden.
        let cpu_exact = Qwen3Model::from_host(c.cfg.clone(), c.weights.clone(), Device::Cpu)?
            .forward_backward(&c.batch)?;
        if let Some(g) = c.golden_loss {
            println!(
                "# {}: CPU f32 loss {:.6} vs transformers golden {:.6} (rel {:.1e})",
                c.name,
                cpu_exact.loss,
                g,
                (cpu_exact.loss - g).abs() / g.abs()
            );
        }
        // Reference: CPU f32 on the bf16-rounded weights (so the comparison measures compute, not weight rounding).
        let rounded = round_bf16(&c.weights);
        let cpu = Qwen3Model::from_host(c.cfg.clone(), rounded.clone(), Device::Cpu)?
            .forward_backward(&c.batch)?;
        for dt in [DType::F32, DType::BF16] {
            let bound = if dt == DType::BF16 { tol_bf16 } else { tol_f32 };
            let loss_bound = if dt == DType::BF16 {
                loss_tol_bf16
            } else {
                tol_f32
            };
            let run = || -> R<qparallel::model::StepOutput> {
                cuda::set_poison_allocations(&gpu(), false)?;
                let mut m = Qwen3Model::from_host(c.cfg.clone(), rounded.clone(), gpu())?;
                cast_params(&mut m, dt)?;
                cuda::set_poison_allocations(&gpu(), true)?;
                let out = m.forward_backward(&c.batch)?;
                cuda::synchronize(&gpu())?;
                cuda::set_poison_allocations(&gpu(), false)?;
                Ok(out)
            };
            match run() {
                Err(e) => rows.push(Row {
                    case: c.name.clone(),
                    dtype: dt,
                    what: "forward_backward".into(),
                    err: f64::NAN,
                    bound,
                    note: format!("ERROR: {e}"),
                }),
                Ok(g) => {
                    let le = (g.loss - cpu.loss).abs() / cpu.loss.abs();
                    rows.push(Row {
                        case: c.name.clone(),
                        dtype: dt,
                        what: "loss".into(),
                        err: if g.loss.is_finite() { le } else { f64::NAN },
                        bound: loss_bound,
                        note: format!("gpu {:.6} cpu {:.6}", g.loss, cpu.loss),
                    });
                    if let (Some(a), Some(b)) = (g.aux_loss, cpu.aux_loss) {
                        rows.push(Row {
                            case: c.name.clone(),
                            dtype: dt,
                            what: "aux_loss".into(),
                            err: (a - b).abs() / b.abs(),
                            bound: loss_bound,
                            note: format!("gpu {a:.6} cpu {b:.6}"),
                        });
                    }
                    for (name, want) in &cpu.grads {
                        let (err, note) = match g.grads.get(name) {
                            None => (f64::NAN, "missing on GPU".to_string()),
                            Some(t) => {
                                let w = want.to_vec_f32()?;
                                let norm =
                                    w.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                                (
                                    rel_err(&t.to_vec_f32()?, &w),
                                    format!("{} {:?} ‖ref‖ {norm:.3e}", t.dtype(), t.shape()),
                                )
                            }
                        };
                        rows.push(Row {
                            case: c.name.clone(),
                            dtype: dt,
                            what: format!("d {name}"),
                            err,
                            bound,
                            note,
                        });
                    }
                    if g.grads.len() != cpu.grads.len() {
                        rows.push(Row {
                            case: c.name.clone(),
                            dtype: dt,
                            what: "gradient count".into(),
                            err: f64::NAN,
                            bound,
                            note: format!("gpu {} cpu {}", g.grads.len(), cpu.grads.len()),
                        });
                    }
                }
            }
        }
    }

    println!(
        "{:<18} {:<5} {:<52} {:>10} {:>8}  {:<4} note",
        "case", "dtype", "what", "rel err", "bound", "ok"
    );
    for r in &rows {
        println!(
            "{:<18} {:<5} {:<52} {:>10.2e} {:>8.0e}  {:<4} {}",
            r.case,
            r.dtype.to_string(),
            r.what,
            r.err,
            r.bound,
            if r.ok() { "ok" } else { "FAIL" },
            r.note
        );
    }
    // Summary per (case, dtype): worst gradient error.
    println!("# summary (worst row per case and dtype):");
    let mut all_ok = true;
    for c in &cases {
        for dt in [DType::F32, DType::BF16] {
            let sel: Vec<&Row> = rows
                .iter()
                .filter(|r| r.case == c.name && r.dtype == dt)
                .collect();
            let fails = sel.iter().filter(|r| !r.ok()).count();
            all_ok &= fails == 0;
            let worst = sel
                .iter()
                .max_by(|a, b| {
                    let (x, y) = (a.err, b.err);
                    if x.is_nan() {
                        std::cmp::Ordering::Greater
                    } else if y.is_nan() {
                        std::cmp::Ordering::Less
                    } else {
                        x.total_cmp(&y)
                    }
                })
                .map(|r| format!("{} {:.2e}", r.what, r.err))
                .unwrap_or_default();
            println!(
                "#   {:<18} {:<5} rows {:>3}  failures {:>3}  worst: {worst}",
                c.name,
                dt.to_string(),
                sel.len(),
                fails
            );
        }
    }
    println!("parity: {}", if all_ok { "PASS" } else { "FAIL" });
    Ok(all_ok)
}

// ---------------------------------------------------------------------------------------------------------------
// optim-parity

/// The fused AdamW kernel and the sum of squares on the GPU against the host loop, on random inputs of odd
/// sizes (NaN-poisoned outputs are impossible to miss: every output element is compared).
fn optim_parity() -> R<bool> {
    use qkernels::ops::{AdamWScalars, adamw_step, adamw_update_host, sum_squares};
    let mut pool = Pool::new(77);
    let mut ok = true;
    // Normwise: max |a − b| / max |b| (elementwise relative error is meaningless where m crosses zero).
    let rel = |a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(0f32, |acc, y| acc.max(y.abs())).max(f32::MIN_POSITIVE);
        a.iter().zip(b).map(|(x, y)| ((x - y).abs() / scale) as f64).fold(0.0, f64::max)
    };
    for (n, step, scale) in [(1usize, 1u64, 1.0f32), (1000, 3, 0.25), (1 << 20 | 7, 10, 1.0)] {
        let (p, g, m) = (pool.host(n, 1.0), pool.host(n, 1.0), pool.host(n, 0.1));
        let v: Vec<f32> = pool.host(n, 0.01).iter().map(|x| x * x).collect();
        let s = AdamWScalars::new(0.9, 0.95, 1e-8, 3e-4, 0.1, step);
        let (mut hp, mut hm, mut hv) = (p.clone(), m.clone(), v.clone());
        adamw_update_host(&s, scale, &mut hp, &g, &mut hm, &mut hv);
        let t = |x: &Vec<f32>| Tensor::from_f32(x.clone(), &[n], &gpu());
        let out = adamw_step(&t(&p)?, &t(&g)?, &t(&m)?, &t(&v)?, &s, scale, DType::BF16)?;
        let (ep, em, ev) = (
            rel(&out.master.to_vec_f32()?, &hp),
            rel(&out.exp_avg.to_vec_f32()?, &hm),
            rel(&out.exp_avg_sq.to_vec_f32()?, &hv),
        );
        let ew = rel(&out.weight.to_vec_f32()?, &hp);
        let pass = ep <= 1e-6 && em <= 1e-6 && ev <= 1e-6 && ew <= 1.0 / 128.0;
        ok &= pass;
        println!("adamw n={n} step={step} scale={scale}: max rel err master {ep:.2e} m {em:.2e} v {ev:.2e} bf16 weight {ew:.2e} {}", if pass { "ok" } else { "FAIL" });
    }
    let a = pool.host(12345, 1.0);
    let b = pool.host(777, 3.0);
    let host: f64 = a.iter().chain(&b).map(|&x| (x as f64) * (x as f64)).sum();
    let ta = Tensor::from_f32(a, &[12345], &gpu())?;
    let tb = Tensor::from_f32(b, &[777], &gpu())?.to_dtype(DType::BF16)?;
    let host_b: f64 = tb.to_vec_f32()?.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
    let host_a: f64 = ta.to_vec_f32()?.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
    let dev = sum_squares(&[&ta, &tb])?;
    let err = (dev - (host_a + host_b)).abs() / (host_a + host_b);
    let pass = err <= 1e-5;
    ok &= pass;
    println!("sum_squares f32+bf16: {dev:.6} vs host {:.6} (f32 inputs {host:.6}) rel err {err:.2e} {}", host_a + host_b, if pass { "ok" } else { "FAIL" });

    // The multi-tensor step (one launch, in place) over a list of odd sizes, weight/grad dtypes and decays, two
    // steps: bit for bit against the per-tensor kernel, and within the bounds above against the host loop.
    // `alias`: an f32 weight that is its master's buffer (what DeviceAdamW hands an f32 model).
    use qkernels::ops::adamw::{AdamWParam, adamw_step_multi};
    let (f32_, bf16_) = (DType::F32, DType::BF16);
    let specs: [(usize, f64, DType, DType, bool); 11] = [
        (1, 0.1, bf16_, f32_, false),
        (1000, 0.0, f32_, f32_, false),
        (1 << 20 | 7, 0.1, bf16_, bf16_, false),
        (3, 0.05, f32_, bf16_, true),
        (17, 0.0, bf16_, f32_, false),
        (255, 0.1, f32_, f32_, true),
        (65536, 0.2, bf16_, f32_, false),
        (65537, 0.0, bf16_, bf16_, false),
        (4099, 0.1, f32_, bf16_, false),
        (0, 0.1, bf16_, f32_, false),
        (2, 0.3, f32_, f32_, false),
    ];
    let dev_t = |x: &[f32], n: usize| Tensor::from_f32(x.to_vec(), &[n], &gpu());
    // (multi: master, m, v, grad, weight) (per-tensor: master, m, v, weight) (host: p, m, v) per parameter.
    let mut multi = Vec::new();
    let mut single = Vec::new();
    let mut host = Vec::new();
    for &(n, _, wdt, gdt, alias) in &specs {
        let (p, g, m) = (pool.host(n, 1.0), pool.host(n, 1.0), pool.host(n, 0.1));
        let v: Vec<f32> = pool.host(n, 0.01).iter().map(|x| x * x).collect();
        let grad = dev_t(&g, n)?.to_dtype(gdt)?;
        let master = dev_t(&p, n)?;
        let weight = if alias { master.clone() } else { dev_t(&p, n)?.to_dtype(wdt)? };
        multi.push((master, dev_t(&m, n)?, dev_t(&v, n)?, grad.clone(), weight));
        single.push((dev_t(&p, n)?, dev_t(&m, n)?, dev_t(&v, n)?, dev_t(&p, n)?.to_dtype(wdt)?));
        host.push((p, m, v, grad.to_vec_f32()?));
    }
    let dev = cuda_dev()?;
    let allocs = || dev.as_ref().map_or(0, |d| { let s = d.pool_stats(); s.mallocs + s.reuses });
    let mut multi_allocs = 0;
    for (step, scale) in [(1u64, 1.0f32), (2, 0.25)] {
        let scalars = |wd: f64| AdamWScalars::new(0.9, 0.95, 1e-8, 3e-4, wd, step);
        let mut list: Vec<AdamWParam<'_>> = multi
            .iter_mut()
            .zip(&specs)
            .map(|((p, m, v, g, w), spec)| AdamWParam { master: p, exp_avg: m, exp_avg_sq: v, grad: g, weight: w, decay: scalars(spec.1).decay })
            .collect();
        let a0 = allocs();
        adamw_step_multi(&mut list, &scalars(0.0), scale)?;
        multi_allocs = multi_allocs.max(allocs() - a0);
        drop(list);
        for (((p, m, v, w), (_, _, _, g, _)), spec) in single.iter_mut().zip(&multi).zip(&specs) {
            let out = adamw_step(p, &g.to_dtype(DType::F32)?, m, v, &scalars(spec.1), scale, w.dtype())?;
            (*p, *m, *v, *w) = (out.master, out.exp_avg, out.exp_avg_sq, out.weight);
        }
        for ((p, m, v, g), spec) in host.iter_mut().zip(&specs) {
            adamw_update_host(&scalars(spec.1), scale, p, g, m, v);
        }
    }
    let bits = |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    let mut multi_ok = true;
    for (((mt, st), ht), spec) in multi.iter().zip(&single).zip(&host).zip(&specs) {
        let (n, wd, wdt, gdt, alias) = *spec;
        let (mp, mm, mv, mw) = (mt.0.to_vec_f32()?, mt.1.to_vec_f32()?, mt.2.to_vec_f32()?, mt.4.to_vec_f32()?);
        let same = bits(&mp, &st.0.to_vec_f32()?)
            && bits(&mm, &st.1.to_vec_f32()?)
            && bits(&mv, &st.2.to_vec_f32()?)
            && bits(&mw, &st.3.to_vec_f32()?)
            && mt.4.dtype() == wdt;
        let (ep, em, ev, ew) = if n == 0 { (0.0, 0.0, 0.0, 0.0) } else { (rel(&mp, &ht.0), rel(&mm, &ht.1), rel(&mv, &ht.2), rel(&mw, &ht.0)) };
        let wbound = if wdt == DType::BF16 { 1.0 / 128.0 } else { 1e-6 };
        let pass = same && ep <= 1e-6 && em <= 1e-6 && ev <= 1e-6 && ew <= wbound;
        multi_ok &= pass;
        println!(
            "adamw multi n={n} wd={wd} weight {wdt:?}{} grad {gdt:?}: bit-identical to per-tensor {same}; vs host master {ep:.2e} m {em:.2e} v {ev:.2e} weight {ew:.2e} {}",
            if alias { " (= master)" } else { "" },
            if pass { "ok" } else { "FAIL" }
        );
    }
    if dev.is_some() {
        // One allocation per step: the descriptor table; none for outputs.
        let pass = multi_allocs <= 1;
        multi_ok &= pass;
        println!("adamw multi: {multi_allocs} device allocation(s) per step (expect 1: the descriptor table) {}", if pass { "ok" } else { "FAIL" });
    }
    ok &= multi_ok;
    println!("optim-parity multi-tensor: {}", if multi_ok { "PASS" } else { "FAIL" });

    // Timing (information only): every parameter of Qwen3-0.6B (bf16 weights, f32 grads), per-tensor launches
    // (fresh outputs) against one multi-tensor launch, 10 steps each after one warm-up.
    if dev.is_some() {
        let cfg = official_config("qwen3-0.6b")?;
        let shapes = Qwen3Params::build(&cfg, &mut |_, shape| Ok(shape))?;
        let mut state = Vec::new();
        shapes.visit(&mut |_, shape| state.push(shape.clone()));
        let z = |shape: &[usize], dt: DType| Tensor::zeros(shape, dt, &gpu());
        let mut ts = Vec::new();
        for shape in &state {
            ts.push((z(shape, f32_)?, z(shape, f32_)?, z(shape, f32_)?, Tensor::full(1e-3, shape, &gpu())?, z(shape, bf16_)?));
        }
        let s = AdamWScalars::new(0.9, 0.95, 1e-8, 3e-4, 0.1, 1);
        let time = |f: &mut dyn FnMut() -> R<()>| -> R<f64> {
            f()?;
            cuda::synchronize(&gpu())?;
            let t = Instant::now();
            for _ in 0..10 {
                f()?;
            }
            cuda::synchronize(&gpu())?;
            Ok(t.elapsed().as_secs_f64() * 1e3 / 10.0)
        };
        let per_tensor = time(&mut || {
            for (p, m, v, g, w) in ts.iter_mut() {
                let out = adamw_step(p, g, m, v, &s, 0.5, DType::BF16)?;
                (*p, *m, *v, *w) = (out.master, out.exp_avg, out.exp_avg_sq, out.weight);
            }
            Ok(())
        })?;
        let one_launch = time(&mut || {
            let mut list: Vec<AdamWParam<'_>> = ts
                .iter_mut()
                .map(|(p, m, v, g, w)| AdamWParam { master: p, exp_avg: m, exp_avg_sq: v, grad: g, weight: w, decay: s.decay })
                .collect();
            Ok(adamw_step_multi(&mut list, &s, 0.5)?)
        })?;
        let elems: usize = state.iter().map(|s| s.iter().product::<usize>()).sum();
        println!(
            "adamw qwen3-0.6b ({} tensors, {elems} elements): per-tensor {per_tensor:.3} ms/step, multi-tensor {one_launch:.3} ms/step ({:.0} GB/s at 30 B/element)",
            state.len(),
            elems as f64 * 30.0 / (one_launch * 1e-3) / 1e9
        );
    }
    println!("optim-parity: {}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}

// train-step

/// Random init straight to the compute dtype on the GPU, one tensor at a time: matrices uniform with std 0.02,
/// norm weights 1 (seeded, the same weights in every subcommand); the f32 staging copies are released after.
pub(crate) fn random_gpu_params(cfg: &ModelConfig, dev: Option<&std::sync::Arc<cuda::device::CudaDev>>) -> R<Qwen3Params> {
    let mut pool = Pool::new(1234);
    let a = 0.02 * 3f32.sqrt();
    let params = Qwen3Params::build(cfg, &mut |_, shape| {
        let n: usize = shape.iter().product();
        let data = if shape.len() == 1 { vec![1.0; n] } else { pool.host(n, a) };
        Ok(Tensor::from_f32(data, &shape, &gpu())?.to_dtype(compute_dtype())?)
    })?;
    cuda::synchronize(&gpu())?;
    if let Some(d) = dev {
        d.release_cache()?; // the f32 staging copies
    }
    Ok(params)
}

fn official_config(name: &str) -> R<ModelConfig> {
    let text = match name {
        "qwen3-50m" => include_str!("../../../configs/models/qwen3-50m.json"),
        "qwen3-0.6b" => include_str!("../../../configs/models/qwen3-0.6b.json"),
        "qwen3-1.7b" => include_str!("../../../configs/models/qwen3-1.7b.json"),
        "qwen3-4b" => include_str!("../../../configs/models/qwen3-4b.json"),
        "qwen3-8b" => include_str!("../../../configs/models/qwen3-8b.json"),
        _ => return Err(format!("unknown model {name}").into()),
    };
    Ok(ModelConfig::from_json_str(text)?)
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn train_step(args: &[String]) -> R<bool> {
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    if pos.len() != 4 {
        return Err("train-step MODEL SEQ MBS STEPS [--ckpt] [--no-breakdown] [--optimizer]".into());
    }
    let name = pos[0].as_str();
    let seq: usize = pos[1].parse()?;
    let mbs: usize = pos[2].parse()?;
    let steps: usize = pos[3].parse()?;
    let ckpt = args.iter().any(|a| a == "--ckpt");
    let breakdown = !args.iter().any(|a| a == "--no-breakdown");
    let with_optimizer = args.iter().any(|a| a == "--optimizer");
    let cfg = official_config(name)?;
    let dev = cuda_dev()?;
    let pool_stats = || dev.as_ref().map(|d| d.pool_stats()).unwrap_or_default();

    let t0 = Instant::now();
    let params = random_gpu_params(&cfg, dev.as_ref())?;
    let mut model = Qwen3Model::new(cfg.clone(), params, gpu()).with_gradient_checkpointing(ckpt);
    // With --optimizer: fp32 masters + AdamW moments on the GPU, clipping at 1.0, torch_baseline's lr.
    let mut optimizer = if with_optimizer {
        Some(qparallel::optim::DeviceAdamW::new(&model, qparallel::optim::AdamWConfig::default(), 0.1)?)
    } else {
        None
    };
    let init_s = t0.elapsed().as_secs_f64();

    let mut rng = Rng(42);
    let v = cfg.vocab_size as u32;
    let ids = (0..mbs * seq).map(|_| rng.below(v)).collect();
    let batch = Batch::causal_lm(ids, mbs, seq)?;

    // Warm-up: NVRTC compile / module load, cuBLASLt heuristics, allocator fill.
    let tw = Instant::now();
    for _ in 0..2 {
        let out = model.forward_backward(&batch)?;
        if let Some(opt) = optimizer.as_mut() {
            opt.step(&mut model, &out.grads, 1e-5, 1.0)?;
        }
    }
    cuda::synchronize(&gpu())?;
    let warm_s = tw.elapsed().as_secs_f64();
    let mallocs_before = pool_stats().mallocs;

    let mut per_step = Vec::with_capacity(steps);
    let mut loss = f64::NAN;
    let t_all = Instant::now();
    for _ in 0..steps {
        let t = Instant::now();
        let out = model.forward_backward(&batch)?;
        loss = out.loss;
        if let Some(opt) = optimizer.as_mut() {
            opt.step(&mut model, &out.grads, 1e-5, 1.0)?;
        }
        drop(out);
        cuda::synchronize(&gpu())?;
        per_step.push(t.elapsed().as_secs_f64());
    }
    let step_s = t_all.elapsed().as_secs_f64() / steps as f64;
    let st = pool_stats();
    let tokens = (mbs * seq) as f64;
    let tps = tokens / step_s;

    // DESIGN §7 (Megatron causal counting) and torch_baseline's (PaLM: 6·N + 12·L·H·Q·T, N without the input
    // embedding, the LM head counted; with tied embeddings the one matrix counts once).
    let f_design = cfg.flops_per_token(seq);
    let n_all = cfg.param_count() as f64;
    let n_emb = (cfg.vocab_size * cfg.hidden_size) as f64;
    let n_flop = n_all - n_emb + if cfg.tie_word_embeddings { n_emb } else { 0.0 };
    let f_torch = 6.0 * n_flop
        + 12.0
            * (cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim) as f64
            * seq as f64;
    let j = serde_json::json!({
        "system": format!("qcluster-rust{}", if ckpt { "+ckpt" } else { "" }),
        "model": name, "params": cfg.param_count(), "seq": seq, "mbs": mbs, "steps": steps,
        "includes": if with_optimizer {
            "forward+loss+backward (bf16 weights/activations, f32 weight grads) + grad-norm clipping + AdamW on fp32 masters (GPU)"
        } else {
            "forward+loss+backward (bf16 weights/activations, f32 weight grads); NO optimizer step"
        },
        "step_s": (step_s * 1e4).round() / 1e4,
        "step_s_median": (median(per_step.clone()) * 1e4).round() / 1e4,
        "step_s_min": (per_step.iter().cloned().fold(f64::INFINITY, f64::min) * 1e4).round() / 1e4,
        "tokens_per_s": tps.round(),
        "tflops_design": (tps * f_design / 1e12 * 10.0).round() / 10.0,
        "mfu_design_vs_989": (tps * f_design / PEAK * 1000.0).round() / 1000.0,
        "tflops_torch_formula": (tps * f_torch / 1e12 * 10.0).round() / 10.0,
        "mfu_torch_formula_vs_989": (tps * f_torch / PEAK * 1000.0).round() / 1000.0,
        "pool_reserved_gib": (gib(st.live_bytes + st.cached_bytes) * 10.0).round() / 10.0,
        "mallocs_in_timed_steps": st.mallocs - mallocs_before,
        "loss": loss,
        "init_s": (init_s * 10.0).round() / 10.0,
        "warmup_s": (warm_s * 10.0).round() / 10.0,
    });
    println!("{j}");

    if breakdown {
        if cfg.is_moe() {
            println!("# breakdown: dense models only");
        } else {
            op_breakdown(&cfg, mbs, seq, ckpt, step_s)?;
        }
    }
    Ok(loss.is_finite())
}

/// Times every op of a dense step alone at the step's shapes and multiplies by its count per step.
fn op_breakdown(cfg: &ModelConfig, b: usize, s: usize, ckpt: bool, step_s: f64) -> R<()> {
    let bf = compute_dtype();
    let t = b * s;
    let (h, f, v, l) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.num_hidden_layers,
    );
    let (hq, hkv, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let (dq, dkv) = (hq * d, hkv * d);
    let eps = cfg.rms_norm_eps;
    let mut pool = Pool::new(777);
    // With recomputation every layer forward runs twice.
    let fw = if ckpt { 2 } else { 1 };

    struct Op {
        name: String,
        count: usize,
        secs: f64,
        flops: f64,
    }
    let mut rows: Vec<Op> = Vec::new();
    let reps = 5;
    let mut time =
        |name: String, count: usize, flops: f64, f: &mut dyn FnMut() -> R<()>| -> R<()> {
            f()?;
            cuda::synchronize(&gpu())?;
            let mut v = Vec::with_capacity(reps);
            for _ in 0..reps {
                let t0 = Instant::now();
                f()?;
                cuda::synchronize(&gpu())?;
                v.push(t0.elapsed().as_secs_f64());
            }
            rows.push(Op {
                name,
                count,
                secs: median(v),
                flops,
            });
            Ok(())
        };

    // Inputs.
    let x = pool.gpu(&[t, h], 1.0, bf)?;
    let nw = pool.gpu(&[h], 1.0, bf)?;
    let hw = pool.gpu(&[d], 1.0, bf)?;
    let mut r = Rng(5);
    let ids = Tensor::from_u32((0..t).map(|_| r.below(v as u32)).collect(), &[t], &gpu())?;
    let pos = Tensor::from_u32((0..b).flat_map(|_| 0..s as u32).collect(), &[t], &gpu())?;
    let rope = RopeTable::new(&pos, d, cfg.rope_theta)?;
    let table = pool.gpu(&[v, h], 0.02, bf)?;

    // Embedding.
    time("embedding_fwd".into(), 1, 0.0, &mut || {
        ops::embedding_fwd(&ids, &table)?;
        Ok(())
    })?;
    time(
        "embedding_bwd (f32 scatter-add)".into(),
        1,
        0.0,
        &mut || {
            ops::embedding_bwd(&ids, &x, v)?;
            Ok(())
        },
    )?;
    if cfg.tie_word_embeddings {
        let mut acc = Tensor::zeros(&[v, h], DType::F32, &gpu())?;
        let g = Tensor::zeros(&[v, h], DType::F32, &gpu())?;
        time(
            "add_assign [V,h] f32 (tied grad)".into(),
            1,
            0.0,
            &mut || {
                acc.add_assign(&g)?;
                Ok(())
            },
        )?;
    }

    // Norms.
    let n = ops::rmsnorm_fwd(&x, &nw, eps)?;
    time(
        format!("rmsnorm_fwd [T,{h}]"),
        fw * 2 * l + 1,
        0.0,
        &mut || {
            ops::rmsnorm_fwd(&x, &nw, eps)?;
            Ok(())
        },
    )?;
    time(format!("rmsnorm_bwd [T,{h}]"), 2 * l + 1, 0.0, &mut || {
        ops::rmsnorm_bwd(&x, &x, &nw, &n.rstd)?;
        Ok(())
    })?;
    for (label, heads) in [("q", hq), ("k", hkv)] {
        let xh = pool.gpu(&[t, heads, d], 1.0, bf)?;
        let nh = ops::rmsnorm_fwd(&xh, &hw, eps)?;
        time(
            format!("rmsnorm_fwd {label} heads"),
            fw * l,
            0.0,
            &mut || {
                ops::rmsnorm_fwd(&xh, &hw, eps)?;
                Ok(())
            },
        )?;
        time(format!("rmsnorm_bwd {label} heads"), l, 0.0, &mut || {
            ops::rmsnorm_bwd(&xh, &xh, &hw, &nh.rstd)?;
            Ok(())
        })?;
        time(format!("rope_fwd {label}"), fw * l, 0.0, &mut || {
            ops::rope_fwd(&xh, &rope)?;
            Ok(())
        })?;
        time(format!("rope_bwd {label}"), l, 0.0, &mut || {
            ops::rope_bwd(&xh, &rope)?;
            Ok(())
        })?;
    }

    // Residual and gradient adds: 2 per layer forward, 5 per layer backward (dxn = dq+dk+dv, dh, dx, mlp dxn).
    let y = pool.gpu(&[t, h], 1.0, bf)?;
    time(format!("add [T,{h}]"), fw * 2 * l + 5 * l, 0.0, &mut || {
        x.add(&y)?;
        Ok(())
    })?;

    // GEMMs: (label, in, out, count per step).
    let gemms = [
        ("q_proj", h, dq, l),
        ("k_proj+v_proj", h, dkv, 2 * l),
        ("o_proj", dq, h, l),
        ("gate_proj+up_proj", h, f, 2 * l),
        ("down_proj", f, h, l),
        ("lm_head", h, v, 1),
    ];
    for (label, k_in, k_out, count) in gemms {
        let xin = pool.gpu(&[t, k_in], 1.0, bf)?;
        let w = pool.gpu(&[k_out, k_in], 0.02, bf)?;
        let fl = 2.0 * (t * k_in * k_out) as f64;
        let fwd_count = if label == "lm_head" {
            count
        } else {
            fw * count
        };
        time(
            format!("linear_fwd {label} [{t}x{k_in}]·[{k_out}x{k_in}]ᵀ"),
            fwd_count,
            fl,
            &mut || {
                ops::linear_fwd(&xin, &w)?;
                Ok(())
            },
        )?;
        let dy = pool.gpu(&[t, k_out], 1.0, bf)?;
        time(
            format!("linear_bwd {label} (dx bf16 + dw f32)"),
            count,
            2.0 * fl,
            &mut || {
                ops::linear_bwd(&dy, &xin, &w)?;
                Ok(())
            },
        )?;
    }

    // SwiGLU.
    let g = pool.gpu(&[t, f], 1.0, bf)?;
    let u = pool.gpu(&[t, f], 1.0, bf)?;
    time(format!("swiglu_fwd [T,{f}]"), fw * l, 0.0, &mut || {
        ops::swiglu_fwd(&g, &u)?;
        Ok(())
    })?;
    time(format!("swiglu_bwd [T,{f}]"), l, 0.0, &mut || {
        ops::swiglu_bwd(&g, &g, &u)?;
        Ok(())
    })?;
    drop((g, u));

    // Attention (causal: half of the 4·b·hq·s²·d of a full product pair; backward 2.5× forward).
    let q = pool.gpu(&[b, s, hq, d], 1.0, bf)?;
    let k = pool.gpu(&[b, s, hkv, d], 1.0, bf)?;
    let vv = pool.gpu(&[b, s, hkv, d], 1.0, bf)?;
    let scale = 1.0 / (d as f32).sqrt();
    let afl = 2.0 * (b * hq * s * s * d) as f64;
    let ao = ops::attention_fwd(&q, &k, &vv, None, scale)?;
    time(
        "attention_fwd (causal GQA)".into(),
        fw * l,
        afl,
        &mut || {
            ops::attention_fwd(&q, &k, &vv, None, scale)?;
            Ok(())
        },
    )?;
    let dout = pool.gpu(&[b, s, hq, d], 1.0, bf)?;
    time("attention_bwd".into(), l, 2.5 * afl, &mut || {
        ops::attention_bwd(&dout, &q, &k, &vv, &ao.out, &ao.lse, None, scale)?;
        Ok(())
    })?;
    drop((q, k, vv, ao, dout));

    // Cross-entropy on [T, V] bf16 logits (per-token weights, dlogits bf16).
    let logits = pool.gpu(&[t, v], 4.0, bf)?;
    let targets = Tensor::from_u32((0..t).map(|_| r.below(v as u32)).collect(), &[t], &gpu())?;
    let wts = Tensor::from_f32(vec![1.0; t], &[t], &gpu())?;
    time("cross_entropy_fwd_bwd [T,V]".into(), 1, 0.0, &mut || {
        ops::cross_entropy_fwd_bwd(&logits, &targets, &wts, None)?;
        Ok(())
    })?;
    drop(logits);

    let total: f64 = rows.iter().map(|o| o.secs * o.count as f64).sum();
    println!(
        "# per-op breakdown ({}; each op timed alone at the step's shapes, median of {reps}, host timer around a \
         synchronised launch)",
        if ckpt {
            "with recomputation"
        } else {
            "no recomputation"
        }
    );
    println!(
        "# {:<58} {:>6} {:>10} {:>11} {:>7} {:>9}",
        "op", "count", "ms each", "ms / step", "% step", "TFLOP/s"
    );
    let mut sorted: Vec<&Op> = rows.iter().collect();
    sorted.sort_by(|a, b| (b.secs * b.count as f64).total_cmp(&(a.secs * a.count as f64)));
    for o in sorted {
        let per = o.secs * o.count as f64;
        let tf = if o.flops > 0.0 {
            format!("{:.0}", o.flops / o.secs / 1e12)
        } else {
            "-".into()
        };
        println!(
            "# {:<58} {:>6} {:>10.3} {:>11.1} {:>6.1}% {:>9}",
            o.name,
            o.count,
            o.secs * 1e3,
            per * 1e3,
            100.0 * per / step_s,
            tf
        );
    }
    let gemm: f64 = rows
        .iter()
        .filter(|o| o.name.starts_with("linear"))
        .map(|o| o.secs * o.count as f64)
        .sum();
    let attn: f64 = rows
        .iter()
        .filter(|o| o.name.starts_with("attention"))
        .map(|o| o.secs * o.count as f64)
        .sum();
    println!(
        "# sum of ops {:.1} ms (GEMMs {:.1}, attention {:.1}, rest {:.1}) vs measured step {:.1} ms: unaccounted {:.1} ms \
         (host work, syncs, allocation, launch gaps)",
        total * 1e3,
        gemm * 1e3,
        attn * 1e3,
        (total - gemm - attn) * 1e3,
        step_s * 1e3,
        (step_s - total) * 1e3
    );
    Ok(())
}
