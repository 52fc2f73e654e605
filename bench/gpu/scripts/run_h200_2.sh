#!/bin/bash
# Second device call: model parity with the final bounds, torch SDPA attention at the train-step shapes, and the
# 4B forward+backward-only torch number. Run from the repository root with .gpu/ filled (see ../README.md).
G=.gpu
export QCLUSTER_NVRTC_CACHE=/tmp/nvrtc-cache PYTHONUNBUFFERED=1
log() { echo "=== $(date +%T) [${SECONDS}s] $*" | tee -a $OUT/steps2.log; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv | tee $OUT/gpu2.txt
log "parity"; timeout 120 $G/qcluster-gpu-bench parity --fixtures $G/fixtures > $OUT/parity2.log 2>&1; echo "rc=$?" >> $OUT/parity2.log
grep -E "^#|parity:|^rc=|FAIL|ERROR" $OUT/parity2.log | head -40
run() { log "$*"; timeout ${T:-150} "$@" 2>&1 | grep -v Warning | tee -a $OUT/steps2.log; }
run python3 $G/torch_attention.py 4 4096 16 8 128
run python3 $G/torch_attention.py 2 4096 16 8 128
run python3 $G/torch_attention.py 1 4096 32 8 128
run python3 $G/torch_fwd_bwd.py qwen3-4b 4096 1 5
run $G/qcluster-gpu-bench train-step qwen3-4b 4096 1 5
log "done"
