# The GPU machine's environment for our binaries, sourced (from the repository root) by the scripts under
# bench/gpu/: cuBLAS/cuBLASLt/NVRTC/cudart 13 from the torch venv, NVLink multicast off, the CUDA headers NVRTC
# needs, an NVRTC cache, and libnccl.so (the pip wheel ships only libnccl.so.2) on the loader path.
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:$LD_LIBRARY_PATH
export NCCL_NVLS_ENABLE=0 QCLUSTER_CUDA_INCLUDE=/usr/local/cuda/include QCLUSTER_NVRTC_CACHE=/tmp/nvrtc
NCCLDIR=$(python3 -c "import nvidia.nccl,os;print(os.path.dirname(nvidia.nccl.__file__))" 2>/dev/null)/lib
mkdir -p /tmp/ncclink && ln -sf "$NCCLDIR/libnccl.so.2" /tmp/ncclink/libnccl.so
export LD_LIBRARY_PATH=/tmp/ncclink:$NCCLDIR:$LD_LIBRARY_PATH
