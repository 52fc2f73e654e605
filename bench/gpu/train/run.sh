#!/bin/bash
# GPU training jobs through `qctl train --local` (one and two GPUs), against the CPU run and torch_baseline.py.
set -x
source bench/gpu/env.sh   # run from the repository root
Q=$PWD/.gpu/train/qctl; T=.gpu/train; W=/tmp/w; mkdir -p $W
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 $T/mkdata.py $W/tiny.jsonl 64 200 256
python3 $T/mkdata.py $W/big.jsonl 40 4097 151936
# 1. tiny model: CPU f32 vs GPU f32 vs GPU bf16 (16 steps, accumulation 2)
for d in cpu f32 bf16; do
  dt=float32; [ $d = bf16 ] && dt=bfloat16
  python3 $T/job.py tiny-$d configs/models/qwen3-tiny.json $W/tiny.jsonl $W/tiny-$d 64 4 8 16 "torch_dtype: $dt" > $W/tiny-$d.yaml
  dev=cuda; [ $d = cpu ] && dev=cpu
  $Q train $W/tiny-$d.yaml --local --device $dev > $OUT/tiny-$d.log 2>&1; echo "tiny-$d rc=$?"
done
python3 $T/losses.py $W/tiny-cpu/metrics.jsonl $W/tiny-f32/metrics.jsonl $W/tiny-bf16/metrics.jsonl
# resume on GPU: 16 -> 20 steps from the bf16 checkpoint
sed -i 's/train_iters: 16/train_iters: 20/' $W/tiny-bf16.yaml; $Q train $W/tiny-bf16.yaml --local --device cuda > $OUT/tiny-bf16-resume.log 2>&1; echo "resume rc=$?"; tail -3 $OUT/tiny-bf16-resume.log
# 2. 0.6B shape, seq 4096, mbs 4, bf16, one GPU: the job path vs torch eager
python3 $T/job.py q06 configs/models/qwen3-0.6b.json $W/big.jsonl $W/q06 4096 4 4 12 > $W/q06.yaml
$Q train $W/q06.yaml --local --device cuda > $OUT/q06.log 2>&1; echo "q06 rc=$?"; tail -4 $OUT/q06.log
python3 $T/losses.py $W/q06/metrics.jsonl $W/q06/metrics.jsonl | tail -1
python3 $T/torch_baseline.py qwen3-0.6b 4096 4 12 2>&1 | tail -1
# 3. two GPUs: dp2 and tp2 jobs (global batch 8 = the 1-GPU run with mbs 8? no: same global batch 4 -> dp2 mbs 2)
python3 $T/job.py q06g4 configs/models/qwen3-0.6b.json $W/big.jsonl $W/q06-1gpu 4096 2 4 6 > $W/q06-1gpu.yaml
$Q train $W/q06-1gpu.yaml --local --device cuda > $OUT/q06-1gpu.log 2>&1; echo "1gpu rc=$?"
python3 $T/job.py q06dp2 configs/models/qwen3-0.6b.json $W/big.jsonl $W/q06-dp2 4096 2 4 6 > $W/q06-dp2.yaml
sed -i 's/resources: {ranks: 1}/resources: {gpus_per_node: 2}/' $W/q06-dp2.yaml
$Q train $W/q06-dp2.yaml --local --nproc 2 > $OUT/q06-dp2.log 2>&1; echo "dp2 rc=$?"; tail -5 $OUT/q06-dp2.log
python3 $T/job.py q06tp2 configs/models/qwen3-0.6b.json $W/big.jsonl $W/q06-tp2 4096 2 4 6 "parallel: {tp: 2}" > $W/q06-tp2.yaml
$Q train $W/q06-tp2.yaml --local --nproc 2 --device cuda > $OUT/q06-tp2.log 2>&1; echo "tp2 rc=$?"; tail -5 $OUT/q06-tp2.log
python3 $T/losses.py $W/q06-1gpu/metrics.jsonl $W/q06-dp2/metrics.jsonl $W/q06-tp2/metrics.jsonl
# 4. LoRA SFT (the README demo) on a GPU
$Q train examples/self-cognition.yaml --local --device cuda > $OUT/lora.log 2>&1; echo "lora rc=$?"; grep -E "step (1|100|300|600)/" $OUT/lora.log | head; tail -2 $OUT/lora.log
cp -r $W/*/metrics.jsonl $OUT/ 2>/dev/null; for d in $W/*/; do [ -f $d/metrics.jsonl ] && cp $d/metrics.jsonl $OUT/$(basename $d).metrics.jsonl; done
