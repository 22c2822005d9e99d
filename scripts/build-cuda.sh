#!/usr/bin/env bash
# Builds the `cuda` binary (target/cuda/release/mlxd) on a machine without a GPU, against
# CUDA 13.0 from PyPI wheels. These exact versions matter: nvvm/crt 13.5 emit PTX that the
# GPU machine's driver (580, CUDA 13.0) cannot load. CUDA_COMPUTE_CAP picks the GPU
# generation (90 = H100/H200). A clean build takes about 25 minutes on 2 cores.
#
#   bash scripts/build-cuda.sh            # then: bash scripts/test-gpu.sh on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${MLXD_CUDA_VENV:-$PWD/.cuda/venv}"
ROOT="$PWD/.cuda/root"
WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
        nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35
        nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cccl==13.0.85)

if ! compgen -G "$VENV/lib/python3*/site-packages/nvidia/cu13/bin/nvcc" >/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --no-cache-dir --disable-pip-version-check "${WHEELS[@]}"
fi
NV="$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)"

# CUDA_ROOT as the build scripts expect it: bin, include, nvvm, lib64 with unversioned names.
rm -rf "$ROOT" && mkdir -p "$ROOT/lib64"
for d in bin include nvvm; do ln -s "$NV/$d" "$ROOT/$d"; done
for f in "$NV"/lib/*.so.*; do
  name="$(basename "$f")"
  ln -sf "$f" "$ROOT/lib64/$name"
  ln -sf "$f" "$ROOT/lib64/${name%%.so.*}.so"
done

# candle links cudarc's driver API dynamically; the driver (libcuda.so.1) only exists on the
# GPU machine, so link against a stub that defines every driver symbol cudarc declares.
CUDARC="$(cargo metadata --format-version 1 --locked --features cuda 2>/dev/null \
  | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')"
grep -oE '^ +fn cu[A-Za-z0-9_]+\(' "$CUDARC/src/driver/sys/mod.rs" | sed -E 's/ *fn //; s/\(//' | sort -u \
  | sed 's/.*/int &(void) { return 0; }/' > "$ROOT/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib64/libcuda.so" "$ROOT/libcuda_stub.c"

export CUDA_ROOT="$ROOT" CUDA_PATH="$ROOT" CUDA_TOOLKIT_ROOT_DIR="$ROOT"
export PATH="$ROOT/bin:$PATH" LIBRARY_PATH="$ROOT/lib64" LD_LIBRARY_PATH="$ROOT/lib64"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" NVCC_CCBIN=g++
CARGO_TARGET_DIR=target/cuda cargo build --release --locked --features cuda --bins "$@"
strip target/cuda/release/mlxd
ls -l target/cuda/release/mlxd
