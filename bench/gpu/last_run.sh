#!/bin/bash
# Multi-tensor AdamW check + kernel parity + full step vs torch eager + GPU jobs (1 GPU, dp2) with it.
source bench/gpu/env.sh   # run from the repository root
F=$PWD/.gpu/last; W=/tmp/w; L=$OUT; mkdir -p $W
echo "== optim-parity"; timeout 120 $F/qcluster-gpu-bench optim-parity > $L/optim.log 2>&1; echo "rc $?"; grep -E "PASS|FAIL|ms" $L/optim.log | tail -8
echo "== cuda_parity"; timeout 120 $F/cuda_parity --skip-bench > $L/parity.log 2>&1; echo "rc $?"; grep -E "checks|FAIL" $L/parity.log | tail -3
echo "== full step vs torch eager"
for m in "qwen3-0.6b 4" "qwen3-1.7b 2"; do set -- $m
  timeout 100 $F/qcluster-gpu-bench train-step $1 4096 $2 10 --optimizer > $L/step-$1.log 2>&1; echo "ours rc $?"; tail -3 $L/step-$1.log
  timeout 100 python3 $F/torch_baseline.py $1 4096 $2 10 2>&1 | tail -1
done
echo "== jobs: 0.6B global batch 8, 1 GPU vs dp2"
python3 $F/mkdata.py $W/big.jsonl 40 4097 151936
python3 $F/job.py g1 configs/models/qwen3-0.6b.json $W/big.jsonl $W/g1 4096 4 8 8 > $W/g1.yaml
timeout 100 $F/qctl train $W/g1.yaml --local --device cuda > $L/g1.log 2>&1; echo "g1 rc $?"
python3 $F/job.py dp2 configs/models/qwen3-0.6b.json $W/big.jsonl $W/dp2 4096 4 8 8 > $W/dp2.yaml
timeout 100 $F/qctl train $W/dp2.yaml --local --nproc 2 --device cuda > $L/dp2.log 2>&1; echo "dp2 rc $?"
python3 $F/losses.py $W/g1/metrics.jsonl $W/dp2/metrics.jsonl
