#!/bin/bash
# pp2 on two GPUs with the activations sent device to device (compare with the 1-GPU losses of pp.sh).
source bench/gpu/env.sh   # run from the repository root
F=$PWD/.gpu/last; W=/tmp/w; L=$OUT; mkdir -p $W
python3 $F/mkdata.py $W/big.jsonl 24 4097 151936
python3 $F/job.py pp2 configs/models/qwen3-0.6b.json $W/big.jsonl $W/pp2 4096 4 8 6 "parallel: {pp: 2}" > $W/pp2.yaml
timeout 100 $F/qctl train $W/pp2.yaml --local --nproc 2 --device cuda > $L/pp2.log 2>&1; echo "pp2 rc $?"; grep -v "^ *[0-9]*: \|^ *at " $L/pp2.log | grep -E "step|rank|rror" | tail -9
python3 -c "
import json
g1=[12.13534,12.13333,12.13349,11.93171,11.94585,11.94409]
r=[json.loads(l) for l in open('$W/pp2/metrics.jsonl')]
for a,m in zip(g1,r): print(m['step'], a, round(m['loss'],5), round(m['tokens_per_s']))
print('max rel diff vs the 1-GPU job', max(abs(a-m['loss'])/a for a,m in zip(g1,r)))"
