#!/usr/bin/env bash
# Builds the CUDA bundle for a one-shot check on a borrowed GPU machine (no network there,
# nothing to compile with Cargo there): the `llmtune` binary and the fixture parity test
# executables built with `--features cuda`, the fixture subsets they read, and
# scripts/gpu_check.sh, into DEST (default: .gpu/ of the repo this script is in).
#
#   bash scripts/setup_cuda_toolchain.sh        # once: CUDA 13.0 from PyPI wheels (no GPU needed)
#   bash scripts/build_gpu_bundle.sh [DEST]     # build + pack (~50 min cold on 2 cores)
#   GPU_CHECK_DRY=1 bash DEST/gpu_check.sh      # dry run here: unpack, link check, tests on CPU
#   # on the GPU machine, from the repo root:  bash .gpu/gpu_check.sh   (log in $OUT/gpu_check.log)
#
# Environment:
#   CUDA_HOME           a CUDA toolkit (default /work/cuda-13.0 from setup_cuda_toolchain.sh)
#   CUDA_COMPUTE_CAP    target GPU (default 90: H100/H200; cudaforge makes it sm_90a)
#   CARGO_TARGET_DIR    build dir (default target/ of the repo)
#   FIXTURE_SETS        fixture dirs to pack (default /work/shared/fixtures and fixtures-alt)
#   ARCHS               fixture models to pack (default "llama qwen2")
#   FULL_KERNELS=1      build upstream candle-kernels (adds its GGUF MoE/MMQ static library:
#                       15 nvcc runs of ~9 min each on 2 cores, ~4 MB of sm_90a code each in
#                       every executable, and a libcudart.so.13 dependency). By default a
#                       PTX-only copy is patched in (scripts/candle_kernels_ptx_only.sh): the
#                       same PTX kernels, the unused GGUF/MoE launchers as aborting stubs.
#
# The bundle keeps under ~50 MiB: binaries stripped and xz-compressed; fixtures only for ARCHS.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$ROOT/.gpu}
CUDA_HOME=${CUDA_HOME:-/work/cuda-13.0}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
FIXTURE_SETS=${FIXTURE_SETS:-"/work/shared/fixtures /work/shared/fixtures-alt"}
ARCHS=${ARCHS:-"llama qwen2"}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

if [[ ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  echo "no nvcc under CUDA_HOME=$CUDA_HOME: run scripts/setup_cuda_toolchain.sh first" >&2
  exit 1
fi
export CUDA_HOME CUDA_PATH=$CUDA_HOME NVCC=$CUDA_HOME/bin/nvcc PATH=$CUDA_HOME/bin:$PATH
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
# libcuda.so comes from the driver; link against the stub when there is no real one.
export LIBRARY_PATH=$CUDA_HOME/lib64:$CUDA_HOME/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}

cd "$ROOT"
CARGO_CFG=()
if [[ ${FULL_KERNELS:-0} != 1 ]]; then
  KDIR=$CARGO_TARGET_DIR/candle-kernels-ptx-only
  bash "$ROOT/scripts/candle_kernels_ptx_only.sh" "$KDIR"
  CARGO_CFG=(--config "patch.crates-io.candle-kernels.path=\"$KDIR\"")
  # The patch rewrites candle-kernels' entry in Cargo.lock: put the file back afterwards.
  cp Cargo.lock "$CARGO_TARGET_DIR/Cargo.lock.orig"
  trap 'cp "$CARGO_TARGET_DIR/Cargo.lock.orig" "$ROOT/Cargo.lock"' EXIT
fi
# The parity tests that select their device with LLMTUNE_TEST_DEVICE (package:test).
TESTS=(
  llmtune-ops:linear
  llmtune-ops:ops
  llmtune-models:llama_fixtures
  llmtune-adapters:lora_fixtures
  llmtune-generate:batched
  llmtune-train:adamw_fixtures
  llmtune-train:gradient_checkpointing
)

t0=$(date +%s)
cargo "${CARGO_CFG[@]}" build --release --features cuda -p llmtune-cli
t1=$(date +%s)
echo "llmtune (cuda) built in $((t1 - t0)) s"

args=()
for pt in "${TESTS[@]}"; do
  args+=(-p "${pt%%:*}" --test "${pt#*:}")
done
cargo "${CARGO_CFG[@]}" test --release --features cuda --no-run --message-format=json "${args[@]}" \
  > "$CARGO_TARGET_DIR/gpu-tests.json"
t2=$(date +%s)
echo "test executables (cuda) built in $((t2 - t1)) s"

[[ ${FULL_KERNELS:-0} != 1 ]] && cp "$CARGO_TARGET_DIR/Cargo.lock.orig" "$ROOT/Cargo.lock"

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin" "$STAGE/tests" "$STAGE/lib" "$STAGE/fixtures"
cp "$CARGO_TARGET_DIR/release/llmtune" "$STAGE/bin/llmtune"
python3 - "$CARGO_TARGET_DIR/gpu-tests.json" "$STAGE/tests" "${TESTS[@]}" <<'EOF'
import json, shutil, sys
out, want = sys.argv[2], {t.split(":")[1] for t in sys.argv[3:]}
found = set()
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    if "test" in t["kind"] and t["name"] in want:
        shutil.copy(m["executable"], f"{out}/{t['name']}")
        found.add(t["name"])
missing = want - found
if missing:
    sys.exit(f"test executables not found: {sorted(missing)}")
print("tests:", " ".join(sorted(found)))
EOF
strip "$STAGE"/bin/* "$STAGE"/tests/*
# Fallback only (the check script prefers the machine's own): the CUDA runtime is small and
# redistributable (needed with FULL_KERNELS=1); cuBLAS, cuRAND and NVRTC are hundreds of MB
# and must come from the target machine.
cp -L "$CUDA_HOME/lib64/libcudart.so.13" "$STAGE/lib/"

for set in $FIXTURE_SETS; do
  name=$(basename "$set")
  mkdir -p "$STAGE/fixtures/$name"
  cp "$set/README.md" "$STAGE/fixtures/$name/" 2>/dev/null || true
  for a in $ARCHS; do
    cp -r "$set/$a" "$STAGE/fixtures/$name/"
  done
done
chmod -R u+w "$STAGE"
(cd "$STAGE" && find . -type f | sort | xargs sha256sum > "$CARGO_TARGET_DIR/MANIFEST.sha256")
mv "$CARGO_TARGET_DIR/MANIFEST.sha256" "$STAGE/MANIFEST.sha256"
git -C "$ROOT" rev-parse HEAD > "$STAGE/COMMIT" 2>/dev/null || true

mkdir -p "$DEST"
# One xz stream with a dictionary larger than the tar: the executables share most of their
# bytes (candle's PTX, the same crates), which LZMA then stores once.
# Written aside and moved into place, so that an interrupted run leaves the old bundle whole.
tar -C "$STAGE" -cf - . | xz -T1 -9e --lzma2=dict=512MiB > "$DEST/bundle.tar.xz.part"
mv "$DEST/bundle.tar.xz.part" "$DEST/bundle.tar.xz"
cp "$ROOT/scripts/gpu_check.sh" "$DEST/gpu_check.sh"
t3=$(date +%s)
du -b "$STAGE"/bin/* "$STAGE"/tests/* | awk '{printf "%8.1f MiB  %s\n", $1/1048576, $2}'
echo "bundle: $(du -b "$DEST/bundle.tar.xz" | awk '{printf "%.1f MiB", $1/1048576}') ($DEST/bundle.tar.xz), packed in $((t3 - t2)) s"
