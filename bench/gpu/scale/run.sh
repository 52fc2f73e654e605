#!/bin/bash
# Scale-out runs (issue #8): bash bench/gpu/scale/run.sh SECTION[,SECTION...] [N], SECTION = nccl|parity|weak|dense|moe
# Needs the release qctl in .gpu/scale/ (carry .gpu); see scale.py for what each section runs and reports.
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:$LD_LIBRARY_PATH
export NCCL_NVLS_ENABLE=0 QCLUSTER_CUDA_INCLUDE=/usr/local/cuda/include QCLUSTER_NVRTC_CACHE=/tmp/nvrtc
NCCLDIR=$(python3 -c "import nvidia.nccl,os;print(os.path.dirname(nvidia.nccl.__file__))" 2>/dev/null)/lib
mkdir -p /tmp/ncclink && ln -sf "$NCCLDIR/libnccl.so.2" /tmp/ncclink/libnccl.so
export LD_LIBRARY_PATH=/tmp/ncclink:$NCCLDIR:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c
sections=${1:?nccl|parity|weak|dense|moe, comma-separated}
for section in ${sections//,/ }; do
  python3 bench/gpu/scale/scale.py "$section" ${2:+"$2"}
done
