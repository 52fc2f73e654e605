#!/bin/bash
# One device call: kernel parity, model parity, qcluster train steps and the torch baselines, in that order.
# Run from the repository root with the binaries, fixtures and scripts copied into .gpu/ (see ../README.md).
# Writes logs to $OUT; stops starting new work after BUDGET_S seconds.
BUDGET_S=${BUDGET_S:-400}
G=.gpu
export QCLUSTER_NVRTC_CACHE=/tmp/nvrtc-cache PYTHONUNBUFFERED=1
log() { echo "=== $(date +%T) [${SECONDS}s] $*" | tee -a $OUT/steps.log; }
left() { [ "$SECONDS" -lt "$BUDGET_S" ] || { log "budget reached, skipping: $*"; return 1; }; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv | tee $OUT/gpu.txt
if [ -x $G/cuda_parity ]; then
  log "cuda_parity"; timeout 150 $G/cuda_parity > $OUT/cuda_parity.log 2>&1; echo "rc=$?" >> $OUT/cuda_parity.log
  tail -n 15 $OUT/cuda_parity.log
fi
log "parity"; timeout 120 $G/qcluster-gpu-bench parity --fixtures $G/fixtures > $OUT/parity.log 2>&1; echo "rc=$?" >> $OUT/parity.log
grep -E "^#|parity:|^rc=|FAIL" $OUT/parity.log | head -60
run() { left "$*" || return; log "$*"; timeout ${T:-150} "$@" 2>&1 | tee -a $OUT/steps.log; }
run $G/qcluster-gpu-bench train-step qwen3-0.6b 4096 4 10
run python3 $G/torch_baseline.py qwen3-0.6b 4096 4 10
run $G/qcluster-gpu-bench train-step qwen3-1.7b 4096 2 10
run python3 $G/torch_baseline.py qwen3-1.7b 4096 2 10
run python3 $G/torch_fwd_bwd.py qwen3-0.6b 4096 4 10
run python3 $G/torch_fwd_bwd.py qwen3-1.7b 4096 2 10
run $G/qcluster-gpu-bench train-step qwen3-4b 4096 1 5 --no-breakdown
run python3 $G/torch_baseline.py qwen3-4b 4096 1 5
log "done"
