#!/usr/bin/env bash
# One-shot CUDA check of llmtune on a borrowed GPU machine, from a bundle made by
# scripts/build_gpu_bundle.sh (which copies this script next to the bundle):
#
#   bash .gpu/gpu_check.sh                    # on the GPU machine, from the repo root
#   GPU_CHECK_DRY=1 bash .gpu/gpu_check.sh    # here, without a GPU: packaging dry run
#
# Steps (each one's exit code is listed at the end; a failure does not stop the others):
#   nvidia-smi; unpack; find the CUDA libraries the binaries need (libcuda.so.1 from the
#   driver, libcublas/libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13, libcudart.so.13);
#   every parity test executable with LLMTUNE_TEST_DEVICE=cuda on both fixture sets;
#   `llmtune bench train` (smollm2-135m shape, then llama3-8b shape) and `llmtune bench
#   decode` (on the fixture llama model) when the binary has them.
# Everything is tee'd into $OUT/gpu_check.log ($OUT defaults to /tmp/llmtune-gpu-out).
# Dry run: no nvidia-smi, the tests run on the CPU (LLMTUNE_TEST_DEVICE=cpu) with the same
# executables, the benches only print --help. Link against a stub libcuda with
#   GPU_CHECK_EXTRA_LIBS=/work/cuda-13.0/lib64/stubs:/work/cuda-13.0/lib64
# Knobs: GPU_CHECK_WORK (unpack dir, default /tmp/llmtune-gpu), GPU_CHECK_SKIP_TESTS=1,
# GPU_CHECK_SKIP_BENCH=1, GPU_CHECK_STEP_TIMEOUT (seconds per test step, default 90),
# GPU_CHECK_BUDGET (seconds for the whole script, default 340; later steps are skipped).
set -u

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${OUT:-/tmp/llmtune-gpu-out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

DRY=${GPU_CHECK_DRY:-0}
WORK=${GPU_CHECK_WORK:-/tmp/llmtune-gpu}
STEP_TIMEOUT=${GPU_CHECK_STEP_TIMEOUT:-90}
START=$(date +%s)
RESULTS=()

# step NAME TIMEOUT CMD...: runs CMD with a timeout (cut to what is left of the whole
# script's budget, GPU_CHECK_BUDGET seconds, default 340), logs and records its exit code.
BUDGET=${GPU_CHECK_BUDGET:-340}
step() {
  local name=$1 limit=$2
  shift 2
  local t0 rc left
  t0=$(date +%s)
  left=$((BUDGET - (t0 - START)))
  if ((left < 15)); then
    echo "=== [$name] SKIPPED: the ${BUDGET}s budget is spent"
    RESULTS+=("$(printf '%-40s rc=%-3s' "$name" skip)")
    return 0
  fi
  ((limit > left)) && limit=$left
  echo
  echo "=== [$name] $(date +%T) $*"
  if declare -F "$1" >/dev/null; then
    "$@" # a function of this script (timeout runs only programs)
  else
    timeout --kill-after=10 "$limit" "$@"
  fi
  rc=$?
  [[ $rc == 124 || $rc == 137 ]] && echo "=== [$name] TIMED OUT after ${limit}s"
  echo "=== [$name] rc=$rc ($(($(date +%s) - t0)) s)"
  RESULTS+=("$(printf '%-40s rc=%-3s %4ss' "$name" "$rc" "$(($(date +%s) - t0))")")
  return 0
}

echo "llmtune GPU check $(date -u +%FT%TZ) on $(hostname) (dry=$DRY), bundle $HERE"
if [[ $DRY != 1 ]]; then
  step nvidia-smi 30 nvidia-smi
fi

# ---------------------------------------------------------------- unpack
unpack() {
  rm -rf "$WORK" && mkdir -p "$WORK" || return 1
  if tar -C "$WORK" -xJf "$HERE/bundle.tar.xz"; then
    :
  else
    echo "tar -xJ failed; trying Python's lzma"
    python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" \
      "$HERE/bundle.tar.xz" "$WORK" || return 1
  fi
  cat "$WORK/COMMIT" 2>/dev/null
  (cd "$WORK" && sha256sum --quiet -c MANIFEST.sha256) || { echo "manifest check FAILED"; return 1; }
  echo "manifest OK"
  du -sh "$WORK"/* | sed 's/^/  /'
}
step unpack 120 unpack
BIN=$WORK/bin/llmtune

# ---------------------------------------------------------------- CUDA libraries
# The binaries are dynamically linked (cudarc `dynamic-linking`) against these sonames.
NEEDED_LIBS="libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13"
find_libs() {
  local dirs=() d lib py
  [[ -n ${GPU_CHECK_EXTRA_LIBS:-} ]] && IFS=: read -r -a dirs <<<"$GPU_CHECK_EXTRA_LIBS"
  for d in ${CUDA_HOME:-} ${CUDA_PATH:-} /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13; do
    dirs+=("$d/lib64" "$d/targets/x86_64-linux/lib" "$d/lib")
  done
  dirs+=(/usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64)
  # PyTorch's CUDA 13 wheels (nvidia-cublas etc.): site-packages/nvidia/cu13/lib
  for py in python3 /opt/torch/.venv/bin/python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    while read -r d; do dirs+=("$d"); done < <("$py" - <<'EOF' 2>/dev/null
import glob, os, site
roots = set(site.getsitepackages() + [site.getusersitepackages()])
for r in roots:
    for d in glob.glob(os.path.join(r, "nvidia", "*", "lib")) + glob.glob(os.path.join(r, "nvidia", "cu13", "lib")):
        print(d)
EOF
    )
  done
  dirs+=("$WORK/lib") # bundled libcudart.so.13, last resort
  local path="" missing="" deps
  deps=$(ldd "$BIN" 2>&1) || { echo "ldd $BIN failed: $deps"; return 1; }
  for lib in $NEEDED_LIBS; do
    local hit=""
    if ! grep -q "$lib" <<<"$deps"; then
      echo "  $lib: not needed by this build"
      continue
    fi
    for d in "${dirs[@]}"; do
      if [[ -e "$d/$lib" ]]; then hit=$d; break; fi
    done
    if [[ -z $hit ]] && ldconfig -p 2>/dev/null | grep -q "$lib "; then
      echo "  $lib: ldconfig"
      continue
    fi
    if [[ -z $hit ]]; then
      hit=$(find / -xdev -name "$lib" -not -path '/proc/*' 2>/dev/null | head -1)
      hit=${hit%/*}
    fi
    if [[ -n $hit ]]; then
      echo "  $lib: $hit"
      case ":$path:" in *":$hit:"*) ;; *) path=${path:+$path:}$hit ;; esac
    else
      echo "  $lib: NOT FOUND"
      missing="$missing $lib"
    fi
  done
  export LD_LIBRARY_PATH=$path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "-- ldd $BIN"
  ldd "$BIN" | grep -E "cuda|cublas|curand|nvrtc|not found"
  [[ -z $missing ]]
}
echo
echo "=== [libraries] $(date +%T)"
find_libs
rc=$?
RESULTS+=("$(printf '%-40s rc=%-3s' libraries "$rc")")
if [[ $DRY != 1 ]]; then
  echo "-- nvrtc builtins (needed only if candle compiles a kernel at run time):"
  for d in ${LD_LIBRARY_PATH//:/ }; do ls "$d"/libnvrtc-builtins* 2>/dev/null; done
fi

step llmtune-help 30 "$BIN" --help

# ---------------------------------------------------------------- parity tests
if [[ ${GPU_CHECK_SKIP_TESTS:-0} != 1 ]]; then
  if [[ $DRY == 1 ]]; then DEV=cpu; else DEV=cuda; fi
  export RUST_BACKTRACE=1
  for t in "$WORK"/tests/*; do
    name=$(basename "$t")
    case $name in
      linear | ops | gradient_checkpointing) sets=none ;; # no fixtures
      *) sets=$(ls "$WORK/fixtures") ;;
    esac
    for s in $sets; do
      if [[ $s == none ]]; then
        step "test $name ($DEV)" "$STEP_TIMEOUT" env LLMTUNE_TEST_DEVICE=$DEV \
          "$t" --test-threads=1 --nocapture
      else
        step "test $name $s ($DEV)" "$STEP_TIMEOUT" env LLMTUNE_TEST_DEVICE=$DEV \
          LLMTUNE_FIXTURES="$WORK/fixtures/$s" "$t" --test-threads=1 --nocapture
      fi
    done
  done
fi

# ---------------------------------------------------------------- benches
if [[ ${GPU_CHECK_SKIP_BENCH:-0} != 1 ]]; then
  if "$BIN" bench --help 2>/dev/null | grep -qE '^\s+train'; then
    TRAIN="bench train --device cuda --lora_rank 8 --lora_target q_proj,v_proj --steps 3 --dtype bf16"
    if [[ $DRY == 1 ]]; then
      step "bench train --help" 30 "$BIN" bench train --help
    else
      step "bench train smollm2-135m b4 s256" 180 "$BIN" $TRAIN --shape smollm2-135m --batch 4 --seq 256
      step "bench train llama3-8b b1 s2048" 240 "$BIN" $TRAIN --shape llama3-8b --batch 1 --seq 2048
    fi
  else
    echo "(no 'llmtune bench train' in this binary: skipped)"
  fi
  if "$BIN" bench --help 2>/dev/null | grep -qE '^\s+decode'; then
    FIX=$WORK/fixtures/$(ls "$WORK/fixtures" | head -1)/llama
    if [[ $DRY == 1 ]]; then
      step "bench decode --help" 30 "$BIN" bench decode --help
    else
      # No network there: the embedded default model cannot be fetched, so the tiny fixture
      # model exercises the CUDA decode path (the figure is not a speed reference).
      step "bench decode fixture-llama" 120 "$BIN" bench decode --model_name_or_path "$FIX" \
        --batch 4 --new_tokens 64
    fi
  else
    echo "(no 'llmtune bench decode' in this binary: skipped)"
  fi
fi

echo
echo "================ summary ($(($(date +%s) - START)) s, dry=$DRY)"
for r in "${RESULTS[@]}"; do echo "  $r"; done
fails=$(printf '%s\n' "${RESULTS[@]}" | grep -vc 'rc=0 ')
echo "steps failed: $fails of ${#RESULTS[@]}"
# Let tee write the last lines before the script returns.
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null || sleep 1
