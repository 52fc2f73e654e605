//! The inference worker inside a rank process: `kind: serve` jobs and `serve_after_training` (see
//! `qjobspec::serve`). The rank starts qserve's OpenAI-compatible server on its node's address, reports the
//! endpoint as the job result `endpoint` (so `qctl status` shows it), and serves until the job is cancelled
//! (SIGTERM from its worker), then shuts the server down and exits 0.
//!
//! A LoRA checkpoint (a dir with `adapter_config.json`) or explicit `adapters` are merged into the base once, into
//! `<run dir>/merged-model`, and that dir is served.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use qjobspec::ServeSpec;

use crate::rank::{RankEnv, RankLink};

/// The model dir to serve: `model` itself, or `model` (+ `adapters`) merged into `<run_dir>/merged-model`.
fn servable_dir(model: &Path, adapters: Option<&Path>, run_dir: &Path) -> anyhow::Result<PathBuf> {
    let (base, adapters) = match adapters {
        Some(a) => (model.to_path_buf(), a.to_path_buf()),
        None if qparallel::lora::is_adapter_dir(model) => {
            let base = qparallel::lora::base_model_dir(model).with_context(|| format!("{}", model.display()))?;
            (base, model.to_path_buf())
        }
        None => return Ok(model.to_path_buf()),
    };
    let out = run_dir.join("merged-model");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("cannot clear {}", out.display()))?;
    }
    qparallel::lora::merge_to_dir(&base, &adapters, &out)
        .with_context(|| format!("merging {} into {}", adapters.display(), base.display()))?;
    eprintln!("merged the adapters {} into {} for serving", adapters.display(), base.display());
    Ok(out)
}

/// Serves `model` as `settings` says until SIGTERM/SIGINT; reports the endpoint through `link`. On this rank's
/// GPU when the job asks for GPUs (`resources.gpus_per_node > 0`, bf16), else on the CPU.
pub fn serve_until_stopped(
    env: &RankEnv,
    spec: &qjobspec::JobSpec,
    settings: &ServeSpec,
    model: &Path,
    link: &mut RankLink,
) -> anyhow::Result<()> {
    let dir = servable_dir(model, settings.adapters.as_deref().map(Path::new), &env.run_dir)?;
    let gpu = crate::rank::job_rank_gpu(spec, env.local_rank)?;
    let mut config = qserve::ServeConfig::new(&dir);
    config.device = gpu.map_or(qkernels::Device::Cpu, qkernels::Device::Cuda);
    let ip: std::net::IpAddr = env.node_address.parse().unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    config.listen = std::net::SocketAddr::new(ip, settings.port);
    config.served_model_name = settings.served_model_name.clone();
    config.reasoning_parser = settings.reasoning_parser;
    if let Some(f) = &settings.api_key_file {
        let key = std::fs::read_to_string(f).with_context(|| format!("serve.api_key_file {f}"))?;
        config.api_key = Some(key.trim().to_string());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let server = runtime
        .block_on(qserve::serve(config))
        .with_context(|| format!("cannot serve {}", dir.display()))?;
    let endpoint = format!("http://{}/v1", server.local_addr());
    eprintln!("serving {} at {endpoint} on {}", dir.display(), device_name(gpu));
    let results = HashMap::from([
        ("endpoint".to_string(), endpoint),
        ("served_model".to_string(), dir.display().to_string()),
    ]);
    link.report(None, results)?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        eprintln!("stopping the inference worker");
        server.shutdown().await.map_err(anyhow::Error::from)
    })
}

/// The rank of a `kind: serve` job.
pub fn run_serve_rank(env: &RankEnv, spec: &qjobspec::JobSpec, link: &mut RankLink) -> anyhow::Result<()> {
    let settings = spec.serve.clone().context("a serve job has a `serve:` block (checked at submit)")?;
    let model = PathBuf::from(settings.model.clone().context("serve.model (checked at submit)")?);
    serve_until_stopped(env, spec, &settings, &model, link)
}

/// "cuda:N" or "the CPU", for log lines.
fn device_name(gpu: Option<usize>) -> String {
    gpu.map_or("the CPU".into(), |i| format!("cuda:{i}"))
}
