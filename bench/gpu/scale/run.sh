#!/bin/bash
# Scale-out runs (issue #8): bash bench/gpu/scale/run.sh SECTION[,SECTION...] [N], SECTION = nccl|parity|weak|dense|moe
# Needs the release qctl in .gpu/scale/ (carry .gpu); see scale.py for what each section runs and reports.
source bench/gpu/env.sh   # run from the repository root
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c
sections=${1:?nccl|parity|weak|dense|moe, comma-separated}
for section in ${sections//,/ }; do
  python3 bench/gpu/scale/scale.py "$section" ${2:+"$2"}
done
