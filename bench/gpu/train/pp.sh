#!/bin/bash
# Pipeline parallelism on two GPUs (bf16, device optimizer) against the one-GPU job.
source bench/gpu/env.sh   # run from the repository root
F=$PWD/.gpu/last; W=/tmp/w; L=$OUT; mkdir -p $W
python3 $F/mkdata.py $W/big.jsonl 24 4097 151936
python3 $F/job.py g1 configs/models/qwen3-0.6b.json $W/big.jsonl $W/g1 4096 4 8 6 > $W/g1.yaml
timeout 90 $F/qctl train $W/g1.yaml --local --device cuda > $L/g1.log 2>&1; echo "g1 rc $?"
python3 $F/job.py pp2 configs/models/qwen3-0.6b.json $W/big.jsonl $W/pp2 4096 4 8 6 "parallel: {pp: 2}" > $W/pp2.yaml
timeout 120 $F/qctl train $W/pp2.yaml --local --nproc 2 --device cuda > $L/pp2.log 2>&1; echo "pp2 rc $?"; grep -v "^ *[0-9]*: \|^ *at " $L/pp2.log | tail -4
python3 $F/losses.py $W/g1/metrics.jsonl $W/pp2/metrics.jsonl
