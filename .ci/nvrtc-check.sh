#!/usr/bin/env bash
# Compiles every CUDA C kernel source of kernels/cuda/ with NVRTC for sm_90a, on a machine without a GPU.
#
# Installs NVRTC and the CUDA headers from PyPI (nvidia-cuda-nvrtc, nvidia-cuda-runtime, 13.0.x) into a private
# --target folder, points the loader and the header lookup at them, and runs the Rust test
# kernels/tests/cuda_nvrtc.rs with QCLUSTER_REQUIRE_NVRTC=1 (so a missing NVRTC fails instead of skipping).
#
# Usage: .ci/nvrtc-check.sh            (from the repository root)
# Env:   NVRTC_PREFIX   where the wheels go (default: target/nvrtc-wheels; reused when present)
#        PYTHON         python with pip (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX="${NVRTC_PREFIX:-$PWD/target/nvrtc-wheels}"
PY="${PYTHON:-python3}"
if [ ! -e "$PREFIX/nvidia/cu13/include/cuda_bf16.h" ] || ! ls "$PREFIX"/nvidia/cu13/lib/libnvrtc.so* >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$PREFIX" \
        "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*"
fi
LIB="$PREFIX/nvidia/cu13/lib"
# cudarc looks for libnvrtc.so.13 / libnvrtc.so; the wheel ships libnvrtc.so.13 and libnvrtc-builtins.so.13.0.
export LD_LIBRARY_PATH="$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export QCLUSTER_CUDA_INCLUDE="$PREFIX/nvidia/cu13/include"
export QCLUSTER_REQUIRE_NVRTC=1
cargo test -j2 -p qkernels --test cuda_nvrtc -- --nocapture
