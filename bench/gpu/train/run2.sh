#!/bin/bash
# GPU training jobs through `qctl train --local`: tiny model CPU vs GPU, 0.6B on 1 GPU vs dp2 / tp2 on 2 GPUs.
source bench/gpu/env.sh   # run from the repository root
Q=$PWD/.gpu/train/qctl; T=.gpu/train; W=/tmp/w; L=$OUT/logs; mkdir -p $W $L
python3 $T/mkdata.py $W/tiny.jsonl 64 200 256
python3 $T/mkdata.py $W/big.jsonl 40 4097 151936
echo "== tiny: CPU f32 | GPU f32 | GPU bf16 (16 steps, accumulation 2)"
for d in cpu f32 bf16; do
  dt=float32; [ $d = bf16 ] && dt=bfloat16
  python3 $T/job.py tiny-$d configs/models/qwen3-tiny.json $W/tiny.jsonl $W/tiny-$d 64 4 8 16 "torch_dtype: $dt" > $W/tiny-$d.yaml
  dev=cuda; [ $d = cpu ] && dev=cpu
  $Q train $W/tiny-$d.yaml --local --device $dev > $L/tiny-$d.log 2>&1 || { echo "tiny-$d FAILED"; tail -5 $L/tiny-$d.log; }
done
python3 $T/losses.py $W/tiny-cpu/metrics.jsonl $W/tiny-f32/metrics.jsonl $W/tiny-bf16/metrics.jsonl | tail -2
sed -i 's/train_iters: 16/train_iters: 20/' $W/tiny-bf16.yaml; $Q train $W/tiny-bf16.yaml --local --device cuda > $L/tiny-bf16-resume.log 2>&1; echo "resume rc=$?"; grep -E "resuming|trained" $L/tiny-bf16-resume.log
echo "== 0.6B seq 4096, global batch 8: 1 GPU (mbs 4, accum 2) | dp2 (mbs 4) | tp2 (mbs 4, accum 2)"
python3 $T/job.py g1 configs/models/qwen3-0.6b.json $W/big.jsonl $W/g1 4096 4 8 8 > $W/g1.yaml
$Q train $W/g1.yaml --local --device cuda > $L/g1.log 2>&1 || { echo "g1 FAILED"; grep -v "^ *[0-9]*: \|^ *at " $L/g1.log | tail -5; }
python3 $T/job.py dp2 configs/models/qwen3-0.6b.json $W/big.jsonl $W/dp2 4096 4 8 8 > $W/dp2.yaml
$Q train $W/dp2.yaml --local --nproc 2 --device cuda > $L/dp2.log 2>&1 || { echo "dp2 FAILED"; grep -v "^ *[0-9]*: \|^ *at " $L/dp2.log | tail -8; }
python3 $T/job.py tp2 configs/models/qwen3-0.6b.json $W/big.jsonl $W/tp2 4096 4 8 8 "parallel: {tp: 2}" > $W/tp2.yaml
$Q train $W/tp2.yaml --local --nproc 2 --device cuda > $L/tp2.log 2>&1 || { echo "tp2 FAILED"; grep -v "^ *[0-9]*: \|^ *at " $L/tp2.log | tail -8; }
python3 $T/losses.py $W/g1/metrics.jsonl $W/dp2/metrics.jsonl $W/tp2/metrics.jsonl
echo "== resume the dp2 run on one GPU for 2 more steps, and the 1-GPU run under tp2"
sed -i 's/train_iters: 8/train_iters: 10/' $W/dp2.yaml $W/g1.yaml
$Q train $W/dp2.yaml --local --device cuda > $L/dp2-to-1.log 2>&1; echo "dp2->1 rc=$?"; grep -E "resuming|trained" $L/dp2-to-1.log
sed -i 's/resources: {ranks: 1}/resources: {gpus_per_node: 2}\nparallel: {tp: 2}/' $W/g1.yaml
$Q train $W/g1.yaml --local --nproc 2 > $L/g1-to-tp2.log 2>&1; echo "1->tp2 rc=$?"; grep -E "resuming|step 10/" $L/g1-to-tp2.log | head -3
python3 $T/losses.py $W/g1/metrics.jsonl $W/dp2/metrics.jsonl | tail -3
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
for d in tiny-cpu tiny-f32 tiny-bf16 g1 dp2 tp2; do cp $W/$d/metrics.jsonl $OUT/$d.metrics.jsonl 2>/dev/null; done
