//! Two ranks on two GPUs: tensor parallelism (`tp2`, `tp2sp`) and data parallelism (`dp2`) through
//! [`TpModel`] with NCCL collectives on device tensors ([`NcclGroup`]), against the one-GPU run.
//!
//! Ranks are two threads of this process, rank `r` on `Device::Cuda(r)`; rank 0 creates the NCCL unique id and
//! hands it over through an in-process [`MemIdStore`], then `ParallelGroups::new` splits the world into the tp,
//! dp and kv-replica groups (`ncclCommSplit`). With `QCLUSTER_GPU_BENCH_DEVICE=cpu` the same code runs on CPU
//! thread ranks over the CPU communicator (a dry run of the tool; the numbers then mean nothing).
//!
//! - `tp-dp-parity [--fixtures DIR] [--tol X] [--rows FILE] [--layouts tp2,tp2sp,dp2]`: the four golden fixtures and the synthetic
//!   head_dim-128 model, in f32 and bf16: loss, aux loss, global grad norm and every parameter gradient of each
//!   layout (gradients reduced over dp, gathered to the HF layout) against the one-GPU `Qwen3Model` run of the same
//!   global batch. Bounds as `parity`: f32 1e-4; bf16 1e-2 for losses and the norm, `--tol` (3e-2) per gradient
//!   tensor. Each layout's and the one-GPU run's error against the CPU f32 reference is printed beside it (bf16
//!   noise of two bf16 runs). Every GPU allocation of the measured step is NaN-poisoned.
//! - `tp-dp MODEL SEQ MBS STEPS [--layouts single,dp2,tp2,tp2sp]`: the full training step (forward, loss,
//!   backward, dp gradient all-reduce over NCCL, global grad norm, clipping at 1.0, AdamW on fp32 masters with
//!   [`DeviceAdamW`]) timed after 2 warm-up steps, one JSON line per layout. `MBS` rows per data-parallel rank:
//!   `single` runs MBS rows on GPU 0 (`Qwen3Model` + `DeviceAdamW::step`, as `train-step --optimizer`), `dp2`
//!   2·MBS rows (MBS per GPU), `tp2`/`tp2sp` MBS rows split over the two GPUs by heads/ffn/vocab. Reports the
//!   step time (slowest rank), tokens/s of the whole step and per GPU, and the scaling against `single` measured in
//!   the same process.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use qparallel::comm::{Communicator, CpuCommunicator, MemIdStore, NcclGroup};
use qparallel::dims::{ParallelConfig, ParallelDims};
use qparallel::optim::{AdamWConfig, DeviceAdamW};
use qparallel::tensor_parallel::{
    ParallelGroups, TpModel, TpPlan, shard_for_rank, split_batch_rows, unshard,
};

use super::*;

/// NCCL host-wait limit (barriers, staged host collectives).
const NCCL_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    Single,
    Tp2,
    Tp2Sp,
    Dp2,
}

impl Layout {
    fn parse(s: &str) -> R<Layout> {
        Ok(match s {
            "single" => Layout::Single,
            "tp2" => Layout::Tp2,
            "tp2sp" => Layout::Tp2Sp,
            "dp2" => Layout::Dp2,
            _ => return Err(format!("unknown layout {s} (single, tp2, tp2sp, dp2)").into()),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Layout::Single => "single",
            Layout::Tp2 => "tp2",
            Layout::Tp2Sp => "tp2sp",
            Layout::Dp2 => "dp2",
        }
    }

    fn dims(self) -> R<ParallelDims> {
        let c = match self {
            Layout::Single => return Ok(ParallelDims::new(1, ParallelConfig::default())?),
            Layout::Tp2 => ParallelConfig {
                tp: 2,
                ..Default::default()
            },
            Layout::Tp2Sp => ParallelConfig {
                tp: 2,
                sp: true,
                ..Default::default()
            },
            Layout::Dp2 => ParallelConfig::default(),
        };
        Ok(ParallelDims::new(2, c)?)
    }
}

type S<T> = Result<T, String>;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Runs `f(rank, world, device)` on two ranks (threads); results by rank. NCCL world on GPUs, CPU thread
/// communicators in a dry run.
fn run_two<T: Send>(f: impl Fn(usize, &dyn Communicator, Device) -> S<T> + Sync) -> S<Vec<T>> {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let name = format!("tp-dp-world-{}", SEQ.fetch_add(1, Ordering::Relaxed));
    let cpu = gpu() == Device::Cpu;
    let mut cpu_comms: Vec<Option<CpuCommunicator>> = if cpu {
        CpuCommunicator::thread_group(2)
            .into_iter()
            .map(Some)
            .collect()
    } else {
        vec![None, None]
    };
    let store = MemIdStore::default();
    let results: Vec<S<T>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let (f, name, mut store) = (&f, &name, store.clone());
                let cpu_comm = cpu_comms[rank].take();
                sc.spawn(move || -> S<T> {
                    match cpu_comm {
                        Some(c) => f(rank, &c, Device::Cpu),
                        None => {
                            let world = NcclGroup::init(
                                rank,
                                rank,
                                vec![0, 1],
                                name,
                                &mut store,
                                NCCL_TIMEOUT,
                            )
                            .map_err(|e| format!("rank {rank}: NCCL init: {e}"))?;
                            f(rank, &world, Device::Cuda(rank))
                                .map_err(|e| format!("rank {rank}: {e}"))
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join()
                    .unwrap_or_else(|_| Err(format!("rank {r} panicked")))
            })
            .collect()
    });
    results.into_iter().collect()
}

/// `p` with every tensor replaced by `f(tensor)`.
fn map_params(p: &Qwen3Params, f: &dyn Fn(&Tensor) -> qkernels::Result<Tensor>) -> R<Qwen3Params> {
    let mut out = p.clone();
    let mut err = None;
    out.visit_mut(&mut |_, t| {
        if err.is_none() {
            match f(t) {
                Ok(x) => *t = x,
                Err(e) => err = Some(e),
            }
        }
    });
    match err {
        Some(e) => Err(e.into()),
        None => Ok(out),
    }
}

fn to_cpu_f32(t: &Tensor) -> qkernels::Result<Tensor> {
    Tensor::from_f32(t.to_vec_f32()?, t.shape(), &Device::Cpu)
}

fn release(dev: Device) -> R<()> {
    cuda::synchronize(&dev)?;
    if let Device::Cuda(i) = dev {
        cuda::device::get(i)?.release_cache()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// tp-dp-parity

/// One layout's result on one rank.
struct RankOut {
    loss: f64,
    aux: Option<f64>,
    norm: f64,
    tp_rank: usize,
    dp_rank: usize,
    /// Gradients in the rank's parameter layout, on the CPU (f32).
    grads: Qwen3Params,
}

/// `(loss, aux, grad norm, gradients by HF name as host vectors)` of one run.
struct Run {
    loss: f64,
    aux: Option<f64>,
    norm: f64,
    grads: Vec<(String, Vec<f32>)>,
}

fn host_grads(named: Vec<(String, &Tensor)>) -> R<Vec<(String, Vec<f32>)>> {
    named
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_vec_f32()?)))
        .collect()
}

fn norm_of(grads: &[(String, Vec<f32>)]) -> f64 {
    grads
        .iter()
        .flat_map(|(_, g)| g.iter())
        .map(|&x| (x as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The one-GPU run: `Qwen3Model` on GPU 0 in `dt`, all allocations of the step poisoned.
fn one_gpu(c: &Case, rounded: &TensorMap, dt: DType) -> R<Run> {
    cuda::set_poison_allocations(&gpu(), false)?;
    let mut m = Qwen3Model::from_host(c.cfg.clone(), rounded.clone(), gpu())?;
    cast_params(&mut m, dt)?;
    cuda::set_poison_allocations(&gpu(), true)?;
    let out = m.forward_backward(&c.batch);
    cuda::synchronize(&gpu())?;
    cuda::set_poison_allocations(&gpu(), false)?;
    let out = out?;
    let grads = host_grads(out.grads.iter().map(|(n, t)| (n.clone(), t)).collect())?;
    Ok(Run {
        loss: out.loss,
        aux: out.aux_loss,
        norm: norm_of(&grads),
        grads,
    })
}

/// One layout on two ranks: shards of the (bf16-rounded) CPU weights moved to each rank's GPU in `dt`.
fn two_ranks(c: &Case, full: &Qwen3Params, layout: Layout, dt: DType) -> R<Run> {
    let dims = layout.dims()?;
    let cfg = &c.cfg;
    let outs = run_two(|rank, world, dev| -> S<RankOut> {
        let groups = ParallelGroups::new(world, &dims, cfg).map_err(s)?;
        let local = shard_for_rank(cfg, full, &dims, rank).map_err(s)?;
        cuda::set_poison_allocations(&dev, false).map_err(s)?;
        let params = map_params(&local, &|t| t.to_device(&dev)?.to_dtype(dt)).map_err(s)?;
        let model = TpModel::new(cfg, params, dims, rank, groups).map_err(s)?;
        let batch = split_batch_rows(&c.batch, dims.dp(), model.dp_rank()).map_err(s)?;
        cuda::set_poison_allocations(&dev, true).map_err(s)?;
        let step = (|| -> Result<_, qparallel::tensor_parallel::TpError> {
            let mut out = model.forward_backward(&batch)?;
            model.reduce_dp_grads(&mut out.grads)?;
            let norm = model.grad_norm(&out.grads)?;
            Ok((out, norm))
        })();
        cuda::synchronize(&dev).map_err(s)?;
        cuda::set_poison_allocations(&dev, false).map_err(s)?;
        let (out, norm) = step.map_err(s)?;
        let g = model.grads_as_params(&out.grads).map_err(s)?;
        let grads = map_params(&g, &to_cpu_f32).map_err(s)?;
        Ok(RankOut {
            loss: out.loss,
            aux: out.aux_loss,
            norm,
            tp_rank: model.plan().tp_rank,
            dp_rank: model.dp_rank(),
            grads,
        })
    })?;
    if outs
        .iter()
        .any(|o| o.loss.to_bits() != outs[0].loss.to_bits())
    {
        return Err(format!(
            "ranks disagree on the loss: {} vs {}",
            outs[0].loss, outs[1].loss
        )
        .into());
    }
    let mut shards: Vec<&RankOut> = outs.iter().filter(|o| o.dp_rank == 0).collect();
    shards.sort_by_key(|o| o.tp_rank);
    let shards: Vec<Qwen3Params> = shards.into_iter().map(|o| o.grads.clone()).collect();
    let full_grads = unshard(cfg, &dims, &shards)?;
    let grads = host_grads(full_grads.named())?;
    Ok(Run {
        loss: outs[0].loss,
        aux: outs[0].aux,
        norm: outs[0].norm,
        grads,
    })
}

struct PRow {
    case: String,
    dtype: DType,
    layout: &'static str,
    what: String,
    /// Against the one-GPU run (the bound applies to this).
    err: f64,
    bound: f64,
    /// This layout against the CPU f32 reference, and the one-GPU run against it (for scale).
    vs_cpu: f64,
    one_vs_cpu: f64,
}

impl PRow {
    fn ok(&self) -> bool {
        self.err.is_finite() && self.err < self.bound
    }
}

fn rel(a: f64, b: f64) -> f64 {
    if a.is_finite() {
        (a - b).abs() / b.abs().max(1e-30)
    } else {
        f64::NAN
    }
}

pub(crate) fn parity(args: &[String]) -> R<bool> {
    let mut fixtures = PathBuf::from("tests/fixtures");
    let mut tol_bf16 = 3e-2;
    let mut rows_file: Option<PathBuf> = None;
    let mut layouts = vec![Layout::Tp2, Layout::Tp2Sp, Layout::Dp2];
    let mut i = 0;
    while i < args.len() {
        let val = || {
            args.get(i + 1)
                .cloned()
                .ok_or_else(|| format!("{} needs a value", args[i]))
        };
        match args[i].as_str() {
            "--fixtures" => fixtures = PathBuf::from(val()?),
            "--tol" => tol_bf16 = val()?.parse()?,
            "--rows" => rows_file = Some(PathBuf::from(val()?)),
            "--layouts" => {
                layouts = val()?.split(',').map(Layout::parse).collect::<R<_>>()?;
                if layouts.contains(&Layout::Single) {
                    return Err(
                        "tp-dp-parity: the layouts are tp2, tp2sp, dp2 (single is the reference)"
                            .into(),
                    );
                }
            }
            a => return Err(format!("tp-dp-parity: unknown argument {a}").into()),
        }
        i += 2;
    }
    let (loss_tol_bf16, tol_f32) = (1e-2, 1e-4);
    match gpu() {
        Device::Cpu => println!("# DRY RUN on CPU thread ranks (QCLUSTER_GPU_BENCH_DEVICE=cpu)"),
        Device::Cuda(_) => {
            let n = cuda::device_count();
            println!(
                "# {n} CUDA devices; ranks on cuda:0 and cuda:1, NCCL {:?}",
                qparallel::comm::nccl::nccl_version()
            );
            if n < 2 {
                return Err(format!("tp-dp-parity needs 2 GPUs, found {n}").into());
            }
        }
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

    let mut rows: Vec<PRow> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    for c in &cases {
        let rounded = round_bf16(&c.weights);
        let cpu_model = Qwen3Model::from_host(c.cfg.clone(), rounded.clone(), Device::Cpu)?;
        let cpu = cpu_model.forward_backward(&c.batch)?;
        let cpu_grads: std::collections::BTreeMap<String, Vec<f32>> =
            host_grads(cpu.grads.iter().map(|(n, t)| (n.clone(), t)).collect())?
                .into_iter()
                .collect();
        let cpu_norm = cpu_grads
            .values()
            .flat_map(|g| g.iter())
            .map(|&x| (x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let dtypes: &[DType] = if gpu() == Device::Cpu {
            &[DType::F32]
        } else {
            &[DType::F32, DType::BF16]
        };
        for &dt in dtypes {
            let (gb, lb) = if dt == DType::BF16 {
                (tol_bf16, loss_tol_bf16)
            } else {
                (tol_f32, tol_f32)
            };
            let one = match one_gpu(c, &rounded, dt) {
                Ok(r) => r,
                Err(e) => {
                    errors.push(format!("{} {dt} one-GPU: {e}", c.name));
                    continue;
                }
            };
            let one_grads: std::collections::BTreeMap<&str, &Vec<f32>> =
                one.grads.iter().map(|(n, g)| (n.as_str(), g)).collect();
            for &layout in &layouts {
                let t0 = Instant::now();
                let run = match two_ranks(c, &cpu_model.params, layout, dt) {
                    Ok(r) => r,
                    Err(e) => {
                        errors.push(format!("{} {dt} {}: {e}", c.name, layout.name()));
                        rows.push(PRow {
                            case: c.name.clone(),
                            dtype: dt,
                            layout: layout.name(),
                            what: "run".into(),
                            err: f64::NAN,
                            bound: gb,
                            vs_cpu: f64::NAN,
                            one_vs_cpu: f64::NAN,
                        });
                        continue;
                    }
                };
                let row = |what: String, err: f64, bound: f64, vs_cpu: f64, one_vs_cpu: f64| PRow {
                    case: c.name.clone(),
                    dtype: dt,
                    layout: layout.name(),
                    what,
                    err,
                    bound,
                    vs_cpu,
                    one_vs_cpu,
                };
                rows.push(row(
                    "loss".into(),
                    rel(run.loss, one.loss),
                    lb,
                    rel(run.loss, cpu.loss),
                    rel(one.loss, cpu.loss),
                ));
                if let (Some(a), Some(b), Some(r)) = (run.aux, one.aux, cpu.aux_loss) {
                    rows.push(row("aux_loss".into(), rel(a, b), lb, rel(a, r), rel(b, r)));
                }
                rows.push(row(
                    "grad_norm".into(),
                    rel(run.norm, one.norm),
                    lb,
                    rel(run.norm, cpu_norm),
                    rel(one.norm, cpu_norm),
                ));
                if run.grads.len() != one.grads.len() {
                    rows.push(row(
                        format!("gradient count {} vs {}", run.grads.len(), one.grads.len()),
                        f64::NAN,
                        gb,
                        f64::NAN,
                        f64::NAN,
                    ));
                }
                for (name, g) in &run.grads {
                    let (Some(o), Some(r)) = (one_grads.get(name.as_str()), cpu_grads.get(name))
                    else {
                        rows.push(row(
                            format!("d {name} (missing)"),
                            f64::NAN,
                            gb,
                            f64::NAN,
                            f64::NAN,
                        ));
                        continue;
                    };
                    rows.push(row(
                        format!("d {name}"),
                        rel_err(g, o),
                        gb,
                        rel_err(g, r),
                        rel_err(o, r),
                    ));
                }
                eprintln!(
                    "# {} {dt} {}: {:.2}s",
                    c.name,
                    layout.name(),
                    t0.elapsed().as_secs_f64()
                );
            }
        }
    }

    if let Some(p) = &rows_file {
        let mut text = String::from(
            "case\tdtype\tlayout\twhat\terr_vs_1gpu\tbound\terr_vs_cpu_f32\tone_gpu_vs_cpu_f32\tok\n",
        );
        for r in &rows {
            text += &format!(
                "{}\t{}\t{}\t{}\t{:.3e}\t{:.0e}\t{:.3e}\t{:.3e}\t{}\n",
                r.case,
                r.dtype,
                r.layout,
                r.what,
                r.err,
                r.bound,
                r.vs_cpu,
                r.one_vs_cpu,
                r.ok()
            );
        }
        std::fs::write(p, text)?;
    }
    println!(
        "{:<17} {:<5} {:<6} {:>6} {:>5} {:>11} {:>11} {:>11} {:>11} {:>10} {:>12} {:>12}",
        "case",
        "dtype",
        "layout",
        "rows",
        "fail",
        "loss err",
        "norm err",
        "grad med",
        "grad max",
        "bound",
        "max vs cpu",
        "1gpu vs cpu"
    );
    let mut all_ok = errors.is_empty();
    for c in &cases {
        for dt in [DType::F32, DType::BF16] {
            for l in &layouts {
                let sel: Vec<&PRow> = rows
                    .iter()
                    .filter(|r| r.case == c.name && r.dtype == dt && r.layout == l.name())
                    .collect();
                if sel.is_empty() {
                    continue;
                }
                let fails = sel.iter().filter(|r| !r.ok()).count();
                all_ok &= fails == 0;
                let pick = |w: &str| sel.iter().find(|r| r.what == w).map_or(f64::NAN, |r| r.err);
                let g: Vec<&&PRow> = sel.iter().filter(|r| r.what.starts_with("d ")).collect();
                let gmax = g.iter().map(|r| r.err).fold(0.0, f64::max);
                let gmed = median(g.iter().map(|r| r.err).collect());
                let vs_cpu = g.iter().map(|r| r.vs_cpu).fold(0.0, f64::max);
                let one_cpu = g.iter().map(|r| r.one_vs_cpu).fold(0.0, f64::max);
                let bound = g.first().map_or(f64::NAN, |r| r.bound);
                println!(
                    "{:<17} {:<5} {:<6} {:>6} {:>5} {:>11.2e} {:>11.2e} {:>11.2e} {:>11.2e} {:>10.0e} {:>12.2e} {:>12.2e}",
                    c.name,
                    dt.to_string(),
                    l.name(),
                    sel.len(),
                    fails,
                    pick("loss"),
                    pick("grad_norm"),
                    gmed,
                    gmax,
                    bound,
                    vs_cpu,
                    one_cpu
                );
            }
        }
    }
    for r in rows.iter().filter(|r| !r.ok()) {
        println!(
            "FAIL {} {} {} {}: {:.3e} (bound {:.0e}; vs cpu f32 {:.3e}, 1-GPU vs cpu f32 {:.3e})",
            r.case, r.dtype, r.layout, r.what, r.err, r.bound, r.vs_cpu, r.one_vs_cpu
        );
    }
    for e in &errors {
        println!("ERROR {e}");
    }
    println!("tp-dp-parity: {}", if all_ok { "PASS" } else { "FAIL" });
    Ok(all_ok)
}

// ---------------------------------------------------------------------------------------------------------------
// tp-dp (throughput)

struct Timing {
    per_step: Vec<f64>,
    loss: f64,
    pool_gib: f64,
    init_s: f64,
    warm_s: f64,
}

fn random_params(cfg: &ModelConfig, seed: u64, dev: Device) -> R<Qwen3Params> {
    let mut pool = Pool::new(seed);
    let a = 0.02 * 3f32.sqrt();
    let p = Qwen3Params::build(cfg, &mut |_, shape| {
        let n: usize = shape.iter().product();
        let data = if shape.len() == 1 {
            vec![1.0; n]
        } else {
            pool.host(n, a)
        };
        Ok(Tensor::from_f32(data, &shape, &dev)?.to_dtype(compute_dtype())?)
    })?;
    release(dev)?;
    Ok(p)
}

fn pool_gib(dev: Device) -> f64 {
    match dev {
        Device::Cuda(i) => cuda::device::get(i)
            .map(|d| {
                let st = d.pool_stats();
                gib(st.live_bytes + st.cached_bytes)
            })
            .unwrap_or(f64::NAN),
        Device::Cpu => 0.0,
    }
}

/// Times `step` (each step ends with a device synchronize) after 2 warm-up steps.
fn time_steps(
    dev: Device,
    steps: usize,
    barrier: &dyn Fn() -> R<()>,
    step: &mut dyn FnMut() -> R<f64>,
) -> R<(Vec<f64>, f64, f64)> {
    let tw = Instant::now();
    for _ in 0..2 {
        step()?;
    }
    cuda::synchronize(&dev)?;
    let warm = tw.elapsed().as_secs_f64();
    barrier()?;
    let mut per = Vec::with_capacity(steps);
    let mut loss = f64::NAN;
    for _ in 0..steps {
        let t = Instant::now();
        loss = step()?;
        cuda::synchronize(&dev)?;
        per.push(t.elapsed().as_secs_f64());
    }
    Ok((per, loss, warm))
}

fn single_timing(cfg: &ModelConfig, batch: &Batch, steps: usize) -> R<Timing> {
    let dev = gpu();
    let t0 = Instant::now();
    let params = random_params(cfg, 1234, dev)?;
    let mut model = Qwen3Model::new(cfg.clone(), params, dev);
    let mut opt = DeviceAdamW::new(&model, AdamWConfig::default(), 0.1)?;
    let init_s = t0.elapsed().as_secs_f64();
    let (per_step, loss, warm_s) = time_steps(dev, steps, &|| Ok(()), &mut || {
        let out = model.forward_backward(batch)?;
        opt.step(&mut model, &out.grads, 1e-5, 1.0)?;
        Ok(out.loss)
    })?;
    let pool = pool_gib(dev);
    drop((model, opt));
    release(dev)?;
    Ok(Timing {
        per_step,
        loss,
        pool_gib: pool,
        init_s,
        warm_s,
    })
}

fn ranks_timing(cfg: &ModelConfig, global: &Batch, layout: Layout, steps: usize) -> R<Vec<Timing>> {
    let dims = layout.dims()?;
    let out = run_two(|rank, world, dev| -> S<Timing> {
        let t0 = Instant::now();
        let groups = ParallelGroups::new(world, &dims, cfg).map_err(s)?;
        let plan = TpPlan::new(cfg, &dims, rank).map_err(s)?;
        // Random weights of this rank's local shapes (values do not matter for timing).
        let params = random_params(&plan.local_config(cfg), 1234 + rank as u64, dev).map_err(s)?;
        let mut model = TpModel::new(cfg, params, dims, rank, groups).map_err(s)?;
        let mut opt =
            DeviceAdamW::for_params(&model.params, AdamWConfig::default(), 0.1).map_err(s)?;
        let batch = split_batch_rows(global, dims.dp(), model.dp_rank()).map_err(s)?;
        let init_s = t0.elapsed().as_secs_f64();
        let barrier = || -> R<()> { Ok(world.barrier()?) };
        let (per_step, loss, warm_s) = time_steps(dev, steps, &barrier, &mut || {
            let mut out = model.forward_backward(&batch)?;
            model.reduce_dp_grads(&mut out.grads)?;
            let norm = model.grad_norm(&out.grads)?;
            opt.step_params(&mut model.params, &out.grads, 1e-5, 1.0, norm)?;
            Ok(out.loss)
        })
        .map_err(s)?;
        let pool = pool_gib(dev);
        drop((model, opt));
        release(dev).map_err(s)?;
        Ok(Timing {
            per_step,
            loss,
            pool_gib: pool,
            init_s,
            warm_s,
        })
    })?;
    Ok(out)
}

pub(crate) fn throughput(args: &[String]) -> R<bool> {
    let mut pos = Vec::new();
    let mut layouts = vec![Layout::Single, Layout::Dp2, Layout::Tp2];
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--layouts" || args[i] == "--layout" {
            let v = args.get(i + 1).ok_or("--layouts needs a value")?;
            layouts = v.split(',').map(Layout::parse).collect::<R<_>>()?;
            i += 2;
        } else {
            pos.push(args[i].clone());
            i += 1;
        }
    }
    if pos.len() != 4 {
        return Err("tp-dp MODEL SEQ MBS STEPS [--layouts single,dp2,tp2,tp2sp]".into());
    }
    let name = pos[0].as_str();
    let seq: usize = pos[1].parse()?;
    let mbs: usize = pos[2].parse()?;
    let steps: usize = pos[3].parse()?;
    let cfg = official_config(name)?;
    if gpu() != Device::Cpu
        && cuda::device_count() < 2
        && layouts.iter().any(|l| *l != Layout::Single)
    {
        return Err(format!("tp-dp needs 2 GPUs, found {}", cuda::device_count()).into());
    }
    let mut rng = Rng(42);
    let v = cfg.vocab_size as u32;
    let make = |rows: usize, rng: &mut Rng| {
        Batch::causal_lm((0..rows * seq).map(|_| rng.below(v)).collect(), rows, seq)
    };
    let f_design = cfg.flops_per_token(seq);
    let mut single_tps: Option<f64> = None;
    let mut ok = true;
    for layout in layouts {
        // Rows of the global batch and GPUs of the layout.
        let (rows, gpus) = match layout {
            Layout::Single => (mbs, 1),
            Layout::Dp2 => (2 * mbs, 2),
            Layout::Tp2 | Layout::Tp2Sp => (mbs, 2),
        };
        let global = make(rows, &mut rng)?;
        let t = Instant::now();
        let res = match layout {
            Layout::Single => single_timing(&cfg, &global, steps).map(|t| vec![t]),
            _ => ranks_timing(&cfg, &global, layout, steps),
        };
        let timings = match res {
            Ok(t) => t,
            Err(e) => {
                ok = false;
                println!(
                    "{}",
                    serde_json::json!({"model": name, "layout": layout.name(), "seq": seq, "error": e.to_string()})
                );
                continue;
            }
        };
        // Slowest rank's mean step.
        let step_s = timings
            .iter()
            .map(|t| t.per_step.iter().sum::<f64>() / t.per_step.len().max(1) as f64)
            .fold(0.0, f64::max);
        let tokens = (rows * seq) as f64;
        let tps = tokens / step_s;
        let per_gpu = tps / gpus as f64;
        if layout == Layout::Single {
            single_tps = Some(tps);
        }
        let loss = timings[0].loss;
        ok &= loss.is_finite();
        let j = serde_json::json!({
            "system": "qcluster-rust",
            "model": name, "layout": layout.name(), "gpus": gpus, "seq": seq,
            "rows_per_step": rows, "tokens_per_step": rows * seq, "steps": steps,
            "includes": match layout {
                Layout::Single => "Qwen3Model: forward+loss+backward (bf16 weights/activations, f32 weight grads) + grad norm + clip 1.0 + AdamW on fp32 masters (GPU)",
                Layout::Dp2 => "TpModel tp1 dp2: forward+loss+backward + dp grad all-reduce (NCCL, f32, per tensor) + grad norm + clip 1.0 + AdamW on fp32 masters (GPU, replicated)",
                _ => "TpModel tp2: forward+loss+backward with bf16 activation collectives (NCCL) + tp grad reductions (f32) + grad norm over tp + clip 1.0 + AdamW on fp32 masters of the shard (GPU)",
            },
            "step_s": (step_s * 1e4).round() / 1e4,
            "step_s_per_rank": timings.iter().map(|t| (t.per_step.iter().sum::<f64>() / t.per_step.len().max(1) as f64 * 1e4).round() / 1e4).collect::<Vec<_>>(),
            "step_s_median_rank0": (median(timings[0].per_step.clone()) * 1e4).round() / 1e4,
            "tokens_per_s": tps.round(),
            "tokens_per_s_per_gpu": per_gpu.round(),
            "mfu_design_per_gpu": (per_gpu * f_design / PEAK * 1000.0).round() / 1000.0,
            "scaling_vs_single": single_tps.map(|s1| (tps / s1 * 1000.0).round() / 1000.0),
            "per_gpu_efficiency_vs_single": single_tps.map(|s1| (per_gpu / s1 * 1000.0).round() / 1000.0),
            "pool_reserved_gib_per_rank": timings.iter().map(|t| (t.pool_gib * 10.0).round() / 10.0).collect::<Vec<_>>(),
            "loss": loss,
            "init_s": (timings[0].init_s * 10.0).round() / 10.0,
            "warmup_s": (timings[0].warm_s * 10.0).round() / 10.0,
            "wall_s": (t.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        });
        println!("{j}");
    }
    Ok(ok)
}
