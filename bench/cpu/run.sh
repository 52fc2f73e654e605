#!/usr/bin/env bash
# CPU training throughput of the reference engine (tokens/s), for catching regressions.
# Usage: bench/cpu/run.sh [STEPS]   (from the repository root; builds qctl in release mode)
# Prints the steady-state tokens/s of each config (mean over the logged steps after the first).
set -euo pipefail
steps=${1:-8}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build --release -j2 -p qctl >/dev/null
python3 - "$work/tokens.jsonl" <<'PY'
import json, random, sys
random.seed(0)
with open(sys.argv[1], "w") as f:
    for _ in range(512):
        f.write(json.dumps({"input_ids": [random.randrange(256) for _ in range(512)]}) + "\n")
PY
run() {
  local name=$1 config=$2 seq=$3 mbs=$4
  cat > "$work/$name.yaml" <<YAML
name: bench-$name
kind: pretrain
resources: {ranks: 1}
init: random
model_config: $PWD/configs/models/$config
dataset: $work/tokens.jsonl
output_dir: $work/out-$name
max_length: $seq
micro_batch_size: $mbs
train_iters: $steps
logging_steps: 1
resume: none
YAML
  ./target/release/qctl train "$work/$name.yaml" --local >/dev/null 2>&1
  python3 - "$work/out-$name/metrics.jsonl" "$name" "$seq" "$mbs" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][1:]
tps = sum(r["tokens_per_s"] for r in rows) / len(rows)
print(f"{sys.argv[2]}: seq {sys.argv[3]} mbs {sys.argv[4]}: {tps:,.0f} tokens/s (mean of {len(rows)} steps after the first)")
PY
}
run tiny qwen3-tiny.json 256 8
run 50m qwen3-50m.json 256 4
