"""Scale-out runs of issue #8 on one host with N GPUs, through the job path (`qctl train --local --nproc N`).

Usage (on the GPU machine, repository root, binaries in .gpu/scale/):
    bash bench/gpu/scale/run.sh SECTION [N]
SECTION:
    nccl    qctl comm-check (bf16, NCCL, all four collectives) vs torch_nccl.py + torch_all_to_all.py at 2..N GPUs
    parity  20 steps of every layout of N GPUs on Qwen3-0.6B vs the 1-GPU run of the same job (max rel loss diff)
    weak    Qwen3-8B width with few enough layers to fit one GPU: every layout vs 1 GPU (weak-scaling efficiency)
    dense   full Qwen3-8B seq 4096: tokens/s per GPU of every layout (no 1-GPU run: it does not fit)
    moe     Qwen3-30B-A3B shape (fewer layers): EP=N and EP=N/2·TP=2, tokens/s/GPU and MFU on active parameters
Every run is one `qctl train` job; its metrics.jsonl is copied to $OUT/<section>/<layout>.metrics.jsonl, its log to
$OUT/<section>/<layout>.log, and the section's summary to $OUT/<section>/summary.txt (also printed).

Micro-batch 1 sequence everywhere; the global batch is fixed per section (4 sequences per GPU for weak/dense, so a
pp4·vpp2 pipeline of a dp2 layout gets 16 micro-batches per replica), the 1-GPU job accumulates it.
Per-GPU throughput is the median `tokens_per_s` of the steps after the first two (the job's global tokens/s) / N.
Weak-scaling efficiency of a layout = its tokens/s/GPU / the 1-GPU job's tokens/s (same model, same global batch).
"""
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.getcwd()
sys.path.insert(0, os.path.join(ROOT, "bench/gpu/train"))
import job as train_job  # noqa: E402  (bench/gpu/train/job.py: the job spec the GPU job benches share)
QCTL = os.environ.get("SCALE_QCTL", os.path.join(ROOT, ".gpu/scale/qctl"))
# SCALE_DEVICE=cpu SCALE_PARITY_MODEL=qwen3-tiny SCALE_SMOKE=1: a CPU smoke test of the driver itself (parity
# section, 3 steps of 128 tokens).
DEVICE = os.environ.get("SCALE_DEVICE", "cuda")
SMOKE = bool(os.environ.get("SCALE_SMOKE"))
OUT = os.environ.get("OUT", "/tmp/out")
WORK = "/tmp/scale"
DATA_SEED = 7


def layouts(n, layers):
    """(name, parallel block) of the layouts the issue asks for on n GPUs, for a model of `layers` layers: the
    interleaved pipeline gets the smallest vpp > 1 that splits the layers evenly (1 if none does)."""
    def interleaved(pp):
        vpp = next((v for v in (2, 3, 4) if layers % (pp * v) == 0), 1)
        return f"pp{pp}" + (f".vpp{vpp}" if vpp > 1 else ""), {"pp": pp, "vpp": vpp}
    def named(base, par, dp):
        return (base + (f".dp{dp}" if dp > 1 else ""), par)
    if n >= 8:
        pp_name, pp_par = interleaved(4)
        return [("dp8", {}), named("tp4", {"tp": 4}, 2), named("tp2.pp2", {"tp": 2, "pp": 2}, 2),
                named(pp_name, pp_par, 2)]
    if n >= 4:
        pp_name, pp_par = interleaved(4)
        return [("dp4", {}), ("tp4", {"tp": 4}), ("tp2.pp2", {"tp": 2, "pp": 2}), (pp_name, pp_par)]
    return [("dp2", {}), ("tp2", {"tp": 2}), interleaved(2)]


def layer_count(cfg_path):
    with open(cfg_path) as f:
        return json.load(f)["num_hidden_layers"]


def write_data(path, lines, length, vocab):
    if os.path.exists(path):
        return
    import random
    r = random.Random(DATA_SEED)
    with open(path, "w") as f:
        for _ in range(lines):
            f.write(json.dumps({"input_ids": [r.randrange(vocab) for _ in range(length)]}) + "\n")


def model_config(base, layers=None, **overrides):
    """A model config file: `configs/models/<base>.json` with `num_hidden_layers` (and other keys) replaced."""
    with open(os.path.join(ROOT, "configs/models", base + ".json")) as f:
        cfg = json.load(f)
    if layers:
        cfg["num_hidden_layers"] = layers
        cfg["max_window_layers"] = layers
    cfg.update(overrides)
    name = f"{base}-L{cfg['num_hidden_layers']}"
    path = os.path.join(WORK, name + ".json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def job_yaml(name, cfg, data, seq, mbs, gbs, iters, parallel):
    """A pretrain job `name` writing into WORK/runs/<name>: bench/gpu/train/job.py's spec, no checkpoint, no
    resume, the distributed optimizer on, `parallel` as the layout."""
    par = ", ".join(f"{k}: {v}" for k, v in parallel.items())
    extra = f"resume: none\nuse_distributed_optimizer: true\nparallel: {{{par}}}\n"
    return train_job.job_yaml(name, cfg, data, f"{WORK}/runs/{name}", seq, mbs, gbs, iters, extra, save_steps=100000)


def run_job(section, name, yaml, nproc, timeout):
    """Runs the job `<section>-<name>` (`yaml` from job_yaml with that name); returns its metrics lines ([] on
    failure) and the wall time."""
    os.makedirs(os.path.join(OUT, section), exist_ok=True)
    ypath = os.path.join(WORK, name + ".yaml")
    with open(ypath, "w") as f:
        f.write(yaml)
    log = os.path.join(OUT, section, name + ".log")
    t = time.time()
    cmd = [QCTL, "train", ypath, "--local", "--device", DEVICE, "--nproc", str(nproc)]
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.time() - t
    metrics = os.path.join(WORK, "runs", f"{section}-{name}", "metrics.jsonl")
    lines = []
    if os.path.exists(metrics):
        with open(metrics) as f:
            lines = [json.loads(l) for l in f if l.strip()]
        subprocess.run(["cp", metrics, os.path.join(OUT, section, name + ".metrics.jsonl")])
    if rc != 0:
        with open(log) as f:
            tail = [l.rstrip() for l in f if not l.lstrip()[:1].isdigit() and " at " not in l][-6:]
        print(f"  {name}: rc {rc} after {wall:.0f}s; " + " | ".join(tail), flush=True)
    return lines, wall


def tokens_per_gpu(lines, nproc):
    steady = [m["tokens_per_s"] for m in lines[2:]] or [m["tokens_per_s"] for m in lines] or [0.0]
    return statistics.median(steady) / nproc


def max_rel_loss_diff(a, b):
    pairs = list(zip(a, b))
    if not pairs or len(a) != len(b):
        return float("nan")
    return max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in pairs)


def summary(section, rows):
    path = os.path.join(OUT, section, "summary.txt")
    with open(path, "w") as f:
        for r in rows:
            print(r, flush=True)
            f.write(r + "\n")


def compare_section(section, n, cfg, data, seq, gbs, iters, timeout):
    """1-GPU job, then every layout of n GPUs with the same global batch: losses and throughput vs the 1-GPU job."""
    ref, wall = run_job(section, "gpu1", job_yaml(f"{section}-gpu1", cfg, data, seq, 1, gbs, iters, {}), 1, timeout)
    ref_tps = tokens_per_gpu(ref, 1)
    rows = [f"{section}: {os.path.basename(cfg)} seq {seq} global batch {gbs}, {iters} steps; "
            f"1 GPU: {ref_tps:.0f} tokens/s ({len(ref)} steps, {wall:.0f}s)"]
    for name, par in layouts(n, layer_count(cfg)):
        lines, wall = run_job(section, name, job_yaml(f"{section}-{name}", cfg, data, seq, 1, gbs, iters, par), n, timeout)
        tps = tokens_per_gpu(lines, n)
        eff = tps / ref_tps if ref_tps else float("nan")
        rows.append(f"  {name:14s} {tps:9.0f} tokens/s/GPU  weak-scaling {eff:6.1%}  max rel loss diff vs 1 GPU "
                    f"{max_rel_loss_diff(ref, lines):.2e}  ({len(lines)} steps, {wall:.0f}s)")
    summary(section, rows)


def nccl(n):
    os.makedirs(os.path.join(OUT, "nccl"), exist_ok=True)
    rows = []
    sizes = [2 ** k for k in range(1, 4) if 2 ** k <= n]
    for k in sizes:
        visible = ",".join(str(i) for i in range(k))
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=visible)
        torch_nccl = next((p for p in [".gpu/scale/torch_nccl.py", "../shared/bench/torch_nccl.py"]
                           if os.path.exists(p)), None)
        for script in [torch_nccl, "bench/gpu/scripts/torch_all_to_all.py"]:
            if script and os.path.exists(script):
                p = subprocess.run([sys.executable, script, "512"], env=env, capture_output=True, text=True, timeout=300)
                rows += [l for l in p.stdout.splitlines() if l.startswith("torch")] or [f"{script} x{k}: {p.stderr[-300:]}"]
        yaml = os.path.join(WORK, f"comm{k}.yaml")
        with open(yaml, "w") as f:
            f.write(f"name: comm{k}\nkind: comm-check\nresources: {{nodes: 1, gpus_per_node: {k}}}\n"
                    f"comm_check: {{bytes: 536870912, iters: 20}}\nenv: {{COMM_CHECK_DTYPE: bf16}}\n")
        env.update(NNODES="1", NPROC_PER_NODE=str(k))
        p = subprocess.run([QCTL, "launch", yaml], env=env, capture_output=True, text=True, timeout=300)
        with open(os.path.join(OUT, "nccl", f"qctl-comm{k}.log"), "w") as f:
            f.write(p.stdout + p.stderr)
        names = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "collective")
        rows += [f"qctl x{k}: " + l.strip() for l in (p.stdout + p.stderr).splitlines()
                 if l.strip().startswith(names)] or [f"qctl comm-check x{k}: rc {p.returncode}"]
    summary("nccl", rows)


def main():
    section = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else int(subprocess.run(
        ["bash", "-c", "nvidia-smi -L | wc -l"], capture_output=True, text=True).stdout)
    os.makedirs(os.path.join(WORK, "runs"), exist_ok=True)
    print(f"== {section} on {n} GPUs", flush=True)
    if section == "nccl":
        nccl(n)
    elif section == "parity":
        data = os.path.join(WORK, "d2049.jsonl")
        model = os.environ.get("SCALE_PARITY_MODEL", "qwen3-0.6b")
        with open(os.path.join(ROOT, "configs/models", model + ".json")) as f:
            vocab = json.load(f)["vocab_size"]
        write_data(data, 8 * 20 * 2, 2049, vocab)
        # Qwen3-0.6B with 24 of its 28 layers, so that pp4·vpp2 splits it evenly.
        layers = 24 if model == "qwen3-0.6b" else None
        seq, steps = (128, 3) if SMOKE else (2048, 20)
        compare_section("parity", n, model_config(model, layers=layers), data, seq, 8, steps, 300)
    elif section == "weak":
        data = os.path.join(WORK, "d4097.jsonl")
        write_data(data, 4 * n * 6, 4097, 151936)
        # 8B width, 16 layers (~4.3B parameters): fits one H200 with the replicated f32 optimizer state.
        compare_section("weak", n, model_config("qwen3-8b", layers=16), data, 4096, 4 * n, 6, 540)
    elif section == "dense":
        data = os.path.join(WORK, "d4097.jsonl")
        write_data(data, 4 * n * 6, 4097, 151936)
        cfg = model_config("qwen3-8b")
        rows = [f"dense: Qwen3-8B seq 4096 global batch {4 * n}, 6 steps"]
        for name, par in layouts(n, layer_count(cfg)):
            lines, wall = run_job("dense", name, job_yaml(f"dense-{name}", cfg, data, 4096, 1, 4 * n, 6, par), n, 540)
            mfu = statistics.median([m["mfu"] for m in lines[2:]]) if len(lines) > 2 else 0.0
            rows.append(f"  {name:14s} {tokens_per_gpu(lines, n):9.0f} tokens/s/GPU  MFU {mfu:.1%}  "
                        f"({len(lines)} steps, {wall:.0f}s)")
        summary("dense", rows)
    elif section == "moe":
        data = os.path.join(WORK, "d4097.jsonl")
        write_data(data, 4 * n * 6, 4097, 151936)
        cfg = model_config("qwen3-30b-a3b", layers=12)
        rows = [f"moe: Qwen3-30B-A3B shape, 12 layers, seq 4096 global batch {4 * n}, 6 steps "
                f"(Megatron-Bridge: 8,655 tokens/s/GPU on H100, EP16)"]
        for name, par in [(f"ep{n}", {"ep": n}), (f"ep{n // 2}.tp2", {"ep": n // 2, "tp": 2, "sp": "true"})]:
            lines, wall = run_job("moe", name, job_yaml(f"moe-{name}", cfg, data, 4096, 1, 4 * n, 6, par), n, 540)
            mfu = statistics.median([m["mfu"] for m in lines[2:]]) if len(lines) > 2 else 0.0
            rows.append(f"  {name:14s} {tokens_per_gpu(lines, n):9.0f} tokens/s/GPU  MFU {mfu:.1%} "
                        f"(active parameters)  ({len(lines)} steps, {wall:.0f}s)")
        summary("moe", rows)
    else:
        sys.exit(f"unknown section {section!r}: nccl | parity | weak | dense | moe")


if __name__ == "__main__":
    main()
