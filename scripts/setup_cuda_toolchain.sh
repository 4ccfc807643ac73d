#!/usr/bin/env bash
# Install a CUDA 13.0 build toolchain WITHOUT a GPU or a system CUDA install, from
# NVIDIA's PyPI wheels, laid out as a CUDA_HOME that candle-kernels (cudaforge) and
# cudarc (`dynamic-linking`) accept.  Only needed to *build* `--features cuda` on a
# machine without CUDA; a machine with a CUDA toolkit just uses its own.
#
#   bash scripts/setup_cuda_toolchain.sh            # -> /work/venv-cuda + /work/cuda-13.0
#   source <(bash scripts/setup_cuda_toolchain.sh --env)   # print/export the build env
#
# Versions are pinned to CUDA 13.0: the PTX that nvcc 13.0 emits (ISA 9.0) is JIT-
# compiled by the driver at module load and needs driver >= 580; nvcc 13.1+ would need
# a newer driver.  The libraries here are only linked against: at run time the target's
# own libcuda.so.1 (driver), libcublas(Lt).so.13, libcurand.so.10, libnvrtc.so.13 and
# libcudart.so.13 are loaded.
#
# libcuda.so is the driver and ships in no wheel: we link against a generated stub
# (every cu* function of cudarc's CUDA 13.0 driver bindings, each returning
# CUDA_ERROR_NO_DEVICE=100) with SONAME libcuda.so.1.  On this machine the stub also
# lets a cuda build *start* (e.g. `--help`); any device request fails cleanly.
set -euo pipefail
VENV=${VENV:-/work/venv-cuda}
CUDA_HOME_DIR=${CUDA_HOME_DIR:-/work/cuda-13.0}

if [[ "${1:-}" == "--env" ]]; then
  cat <<ENV
export CUDA_HOME=$CUDA_HOME_DIR
export CUDA_PATH=$CUDA_HOME_DIR
export NVCC=$CUDA_HOME_DIR/bin/nvcc
export PATH=$CUDA_HOME_DIR/bin:\$PATH
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH=$CUDA_HOME_DIR/lib64:$CUDA_HOME_DIR/lib64/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}
ENV
  exit 0
fi

python3 -m venv "$VENV"
"$VENV/bin/pip" install -q \
  "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" \
  "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" \
  "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.0.35" "nvidia-cuda-nvrtc==13.0.88"

C=$("$VENV/bin/python" -c 'import os,nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
H=$CUDA_HOME_DIR
mkdir -p "$H/lib64/stubs"
ln -sfn "$C/bin" "$H/bin"
ln -sfn "$C/include" "$H/include"
ln -sfn "$C/nvvm" "$H/nvvm"
for f in "$C"/lib/*.so* "$C"/lib/*.a; do ln -sfn "$f" "$H/lib64/$(basename "$f")"; done
ln -sfn lib64 "$H/lib"
(
  cd "$H/lib64"
  ln -sfn libcudart.so.13 libcudart.so
  ln -sfn libcublas.so.13 libcublas.so
  ln -sfn libcublasLt.so.13 libcublasLt.so
  ln -sfn libcurand.so.10 libcurand.so
  ln -sfn libnvrtc.so.13 libnvrtc.so
)

# libcuda stub from cudarc's driver bindings (the exact cudarc in Cargo.lock).
CUDARC_SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 2>/dev/null | head -1)
if [[ -z "$CUDARC_SRC" ]]; then
  echo "cudarc-0.19.10 source not found: run 'cargo fetch' first" >&2
  exit 1
fi
grep -oP '^\s+fn \Kcu\w+(?=\()' "$CUDARC_SRC/src/driver/sys/mod.rs" | sort -u |
  awk '{print "int " $1 "(void) { return 100; }"}' > "$H/lib64/stubs/libcuda_stub.c"
gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$H/lib64/stubs/libcuda.so.1" "$H/lib64/stubs/libcuda_stub.c"
ln -sfn libcuda.so.1 "$H/lib64/stubs/libcuda.so"
"$H/bin/nvcc" --version | tail -2
echo "CUDA_HOME ready: $H"
