#!/bin/bash
# Two-GPU TP/DP over NCCL: parity against the one-GPU run, then step throughput (0.6B, 1.7B at seq 4096).
# Every phase is its own process under its own timeout; logs under $OUT.
export NCCL_NVLS_ENABLE=0 QCLUSTER_CUDA_INCLUDE=/usr/local/cuda/include QCLUSTER_NVRTC_CACHE=/tmp/nvrtc
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
L=$(ls $NV/cu13/lib/libnccl.so.2 $NV/nccl/lib/libnccl.so.2 $NV/cu13/lib/libnccl.so* $NV/nccl/lib/libnccl.so* 2>/dev/null | head -1)
[ -n "$L" ] || L=$(find / -name 'libnccl.so.2' 2>/dev/null | head -1)
mkdir -p /tmp/ncl && ln -sf "$L" /tmp/ncl/libnccl.so
export LD_LIBRARY_PATH=/tmp/ncl:$NV/cu13/lib:$LD_LIBRARY_PATH
B=.gpu/qcluster-gpu-bench
chmod +x $B
log() { echo "=== $(date -u +%T) [${SECONDS}s] $*" | tee -a $OUT/tpdp.log; }
log "libnccl: $L"
nvidia-smi --query-gpu=index,name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
nvidia-smi topo -m >> $OUT/gpu.txt 2>&1
log tp-dp-parity
timeout 80 $B tp-dp-parity --fixtures tests/fixtures --rows $OUT/parity_rows.tsv > $OUT/parity.log 2>&1; rc=$?; echo "rc=$rc" >> $OUT/parity.log
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
  for l in dp2 tp2 tp2sp; do
    log "parity retry, one layout per process: $l"
    timeout 30 $B tp-dp-parity --fixtures tests/fixtures --layouts $l --rows $OUT/parity_rows_$l.tsv > $OUT/parity_$l.log 2>&1; echo "rc=$?" >> $OUT/parity_$l.log
    grep -E "FAIL|ERROR|tp-dp-parity:|^rc=" $OUT/parity_$l.log | head -20 | tee -a $OUT/tpdp.log
  done
fi
grep -E "^(case|dense|moe|synth)|FAIL|ERROR|tp-dp-parity:|^rc=|error" $OUT/parity.log | head -60 | tee -a $OUT/tpdp.log
log "tp-dp qwen3-0.6b 4096 4 5"
timeout 110 $B tp-dp qwen3-0.6b 4096 4 5 --layouts single,dp2,tp2,tp2sp > $OUT/tp_dp_0.6b.log 2>&1; echo "rc=$?" >> $OUT/tp_dp_0.6b.log
tail -8 $OUT/tp_dp_0.6b.log | tee -a $OUT/tpdp.log
log "tp-dp qwen3-1.7b 4096 2 5"
timeout 120 $B tp-dp qwen3-1.7b 4096 2 5 --layouts single,dp2,tp2,tp2sp > $OUT/tp_dp_1.7b.log 2>&1; echo "rc=$?" >> $OUT/tp_dp_1.7b.log
tail -8 $OUT/tp_dp_1.7b.log | tee -a $OUT/tpdp.log
log done
