#!/usr/bin/env bash
# Side-by-side benchmark of llmtune against the tools users know (issue 10):
#   * one LoRA training step: `llmtune bench train` vs PyTorch eager + PEFT
#     (`$LLMTUNE_SHARED/tools/torch_lora_bench.py`, run unchanged, same flags);
#   * greedy decode at batch 1 on the SmolLM2-135M GGUF: `llmtune bench decode` vs llama.cpp's
#     `llama-bench` (built from the llama.cpp that the PyPI sdist of llama-cpp-python vendors).
#
# Usage:
#   scripts/bench_vs_torch.sh [--shape smollm2-135m] [--batch 4] [--seq 256] [--lora_rank 8]
#       [--lora_target q_proj,v_proj] [--steps 3] [--dtype f32|bf16] [--device cpu|cuda]
#       [--threads 2] [--model PATH.gguf] [--new_tokens 128] [--skip_train] [--skip_decode]
#       [--mkl auto|off]
#
# The last three lines are machine-readable (ours / theirs; higher is better for the first and
# third, lower for the second; `n/a` where our side exits 2, i.e. not yet implemented):
#   train_ratio_vs_torch: X       (tokens/s of llmtune / tokens/s of PyTorch)
#   rss_ratio_vs_torch: Y         (peak RSS of llmtune / peak RSS of PyTorch; peak CUDA memory on cuda)
#   decode_ratio_vs_llamacpp: Z   (decode tokens/s of llmtune / llama-bench's tg tokens/s)
#
# Sets up what it lacks (PyPI and Debian only; nothing of it lands in the repo):
#   * REF_VENV (default <repo>/.venv-ref, git-ignored): a venv with torch, transformers, peft;
#   * LLAMA_BENCH (default $BENCH_CACHE/llama.cpp-<ver>/build/bin/llama-bench, with
#     BENCH_CACHE=~/.cache/llmtune-bench): built by scripts/build_llamacpp.sh (`pip download
#     --no-binary llama-cpp-python llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION`, default 0.3.36,
#     which vendors llama.cpp 0c1e57098, then cmake Release, CPU, -DGGML_NATIVE=ON of
#     vendor/llama.cpp; cmake comes from apt or, failing that, from PyPI into REF_VENV);
#   * LLMTUNE_BIN (default <repo>/target/release/llmtune): `cargo build --release -p llmtune-cli`
#     (with `--features cuda` for --device cuda, else `--features openblas` when the system
#     OpenBLAS is installed: Debian `libopenblas-dev`, installed with apt-get when possible)
#     when missing;
#   * the GGUF (default $LLMTUNE_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf, LLMTUNE_HOME default
#     ~/.cache/llmtune): fetched by llmtune's own `smollm2-135m` alias when missing.
#   * MKL for our CPU products: LLMTUNE_MKL when set, else scripts/setup_mkl.sh fetches it from
#     PyPI (`--mkl off` keeps the binary's own products: OpenBLAS or candle's gemm). With MKL and
#     --dtype f32 on cpu, our step also runs with --dtype bf16 (bf16 linear weights through MKL's
#     AMX/AVX-512-BF16 GEMM, f32 activations), reported as
#     `train_bf16_ratio_vs_torch_f32: X` with both loss curves, before the last three lines.
# LLMTUNE_SHARED (default <repo>/../shared) must hold tools/torch_lora_bench.py.
#
# Threads: torch gets --threads, llama-bench -t, llmtune RAYON_NUM_THREADS. Decode runs on CPU
# (llama.cpp is built CPU-only); llama-bench's tg test decodes --new_tokens tokens from an empty
# context, ours after a 16-token prompt with prefill excluded; each side reports the mean
# tokens/s of 3 timed generations (llama-bench -r 3, ours --repetitions 3). On a shared
# machine, look at the load average printed before each run.
set -euo pipefail

# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
LLMTUNE_SHARED="${LLMTUNE_SHARED:-$REPO/../shared}"
LLAMA_BENCH="${LLAMA_BENCH:-$LLAMA_SRC/build/bin/llama-bench}"
LLMTUNE_BIN="${LLMTUNE_BIN:-$REPO/target/release/llmtune}"
export LLMTUNE_HOME="${LLMTUNE_HOME:-$HOME/.cache/llmtune}"

SHAPE=smollm2-135m BATCH=4 SEQ=256 RANK=8 TARGET=q_proj,v_proj STEPS=3 DTYPE=f32 DEVICE=cpu
THREADS=2 MODEL="" NEW_TOKENS=128 DO_TRAIN=1 DO_DECODE=1 MKL=auto
while [[ $# -gt 0 ]]; do
  case "$1" in
    --shape) SHAPE="$2"; shift 2 ;;
    --batch) BATCH="$2"; shift 2 ;;
    --seq) SEQ="$2"; shift 2 ;;
    --lora_rank) RANK="$2"; shift 2 ;;
    --lora_target) TARGET="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --new_tokens) NEW_TOKENS="$2"; shift 2 ;;
    --skip_train) DO_TRAIN=0; shift ;;
    --skip_decode) DO_DECODE=0; shift ;;
    --mkl) MKL="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench_vs_torch.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
done

load() { cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime; }

# ---------------------------------------------------------------- setup
ensure_venv() {
  local py="$REF_VENV/bin/python"
  if [[ -x "$py" ]] && "$py" -c "import torch, transformers, peft" 2>/dev/null; then return; fi
  log "creating $REF_VENV (torch, transformers, peft from PyPI; about 6 GB, several minutes)"
  python3 -m venv "$REF_VENV"
  "$REF_VENV/bin/pip" install --quiet torch transformers peft safetensors numpy
}

ensure_llama_bench() {
  if [[ -x "$LLAMA_BENCH" ]]; then return; fi
  # Fetch + build are shared with scripts/llamacpp_check.sh.
  llama_bin_dir llama-bench >/dev/null
}

ensure_llmtune() {
  if [[ -x "$LLMTUNE_BIN" ]]; then return; fi
  log "building $LLMTUNE_BIN"
  local feat=()
  if [[ "$DEVICE" == cuda ]]; then
    feat=(--features cuda)
  else
    if ! ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so ' && command -v apt-get >/dev/null &&
      [[ "$(id -u)" == 0 ]]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas-dev >/dev/null || true
    fi
    ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so ' && feat=(--features openblas)
  fi
  (cd "$REPO" && cargo build --release -p llmtune-cli "${feat[@]}")
  LLMTUNE_BIN="$REPO/target/release/llmtune"
}

ensure_model() {
  if [[ -z "$MODEL" ]]; then MODEL="$LLMTUNE_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf"; fi
  if [[ -f "$MODEL" ]]; then return; fi
  log "fetching the SmolLM2-135M GGUF through llmtune's smollm2-135m alias"
  "$LLMTUNE_BIN" generate --model_name_or_path smollm2-135m --do_sample false \
    --max_new_tokens 1 --prompt hi >/dev/null
  [[ -f "$MODEL" ]] || { echo "bench_vs_torch.sh: no model at $MODEL" >&2; exit 1; }
}

# ---------------------------------------------------------------- helpers
# field NAME LINE: the number after "NAME:" in LINE.
field() { sed -n "s/.*$1: *\([0-9.eE+-]*\).*/\1/p" <<<"$2"; }
# ratio A B: A/B with 3 decimals, or n/a when either is empty.
ratio() {
  if [[ -z "$1" || -z "$2" ]]; then echo n/a; return; fi
  awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.3f\n", a / b }'
}
FAILED=0
# run_ours VAR CMD...: runs our side, stores its last "tokens_per_s:" line in VAR ("" when exit 2).
run_ours() {
  local var="$1"; shift
  local out rc=0
  out="$(RAYON_NUM_THREADS="$THREADS" "$@" 2>&1)" || rc=$?
  printf '%s\n' "$out" | tail -n 5 >&2
  if [[ $rc == 2 ]]; then
    log "llmtune exited 2 (not yet implemented): n/a"
    printf -v "$var" '%s' ""
  elif [[ $rc != 0 ]]; then
    log "llmtune failed (exit $rc)"; FAILED=1
    printf -v "$var" '%s' ""
  else
    printf -v "$var" '%s' "$(grep 'tokens_per_s:' <<<"$out" | tail -n 1)"
  fi
}

ensure_mkl() {
  if [[ "$MKL" == off ]]; then unset LLMTUNE_MKL; return; fi
  if [[ -n "${LLMTUNE_MKL:-}" || "$DEVICE" != cpu ]]; then return; fi
  if LLMTUNE_MKL="$("$REPO/scripts/setup_mkl.sh")"; then
    export LLMTUNE_MKL
  else
    log "could not fetch MKL; llmtune runs with the products it was built with"
  fi
}

# ---------------------------------------------------------------- train step
TORCH_TPS="" TORCH_RSS="" OURS_TPS="" OURS_RSS=""
if [[ $DO_TRAIN == 1 ]]; then
  TORCH_BENCH="$LLMTUNE_SHARED/tools/torch_lora_bench.py"
  [[ -f "$TORCH_BENCH" ]] || { echo "bench_vs_torch.sh: $TORCH_BENCH not found (set LLMTUNE_SHARED)" >&2; exit 1; }
  ensure_venv
  ensure_llmtune
  FLAGS=(--shape "$SHAPE" --batch "$BATCH" --seq "$SEQ" --lora_rank "$RANK" --lora_target "$TARGET"
         --steps "$STEPS" --dtype "$DTYPE" --device "$DEVICE")
  log "torch: torch_lora_bench.py ${FLAGS[*]} --threads $THREADS (load $(load))"
  TORCH_LINE="$("$REF_VENV/bin/python" "$TORCH_BENCH" "${FLAGS[@]}" --threads "$THREADS" | tee /dev/stderr | tail -n 1)"
  TORCH_TPS="$(field tokens_per_s "$TORCH_LINE")"; TORCH_RSS="$(field peak_rss_mb "$TORCH_LINE")"
  ensure_mkl
  log "llmtune: bench train ${FLAGS[*]} (load $(load); LLMTUNE_MKL=${LLMTUNE_MKL:-unset})"
  run_ours OURS_LINE "$LLMTUNE_BIN" bench train "${FLAGS[@]}"
  OURS_TPS="$(field tokens_per_s "$OURS_LINE")"; OURS_RSS="$(field peak_rss_mb "$OURS_LINE")"
  echo "torch:   ${TORCH_LINE}"
  echo "llmtune: ${OURS_LINE:-n/a}"
  BF16_TPS=""
  if [[ -n "${LLMTUNE_MKL:-}" && "$DTYPE" == f32 && "$DEVICE" == cpu ]]; then
    BF16_FLAGS=(--shape "$SHAPE" --batch "$BATCH" --seq "$SEQ" --lora_rank "$RANK"
                --lora_target "$TARGET" --steps "$STEPS" --dtype bf16 --device cpu)
    log "llmtune: bench train ${BF16_FLAGS[*]} (load $(load))"
    run_ours OURS_BF16_LINE "$LLMTUNE_BIN" bench train "${BF16_FLAGS[@]}"
    BF16_TPS="$(field tokens_per_s "$OURS_BF16_LINE")"
    echo "llmtune bf16: ${OURS_BF16_LINE:-n/a}"
  fi
fi

# ---------------------------------------------------------------- decode
LLAMA_TPS="" OURS_DEC=""
if [[ $DO_DECODE == 1 ]]; then
  ensure_llmtune
  ensure_model
  ensure_llama_bench
  LB_ARGS=(-m "$MODEL" -t "$THREADS" -p 0 -n "$NEW_TOKENS" -r 3 -o json)
  log "llama.cpp: llama-bench ${LB_ARGS[*]} (load $(load))"
  if ! LLAMA_JSON="$("$LLAMA_BENCH" "${LB_ARGS[@]}" 2>/dev/null)"; then
    # This llama.cpp's AMX kernels can die of SIGILL in worker threads (tile config/permission
    # set on the main thread only); --repack 0 keeps the weights out of the AMX buffer type.
    log "llama-bench failed; again with --repack 0 (no AMX/repacked weights)"
    LLAMA_JSON="$("$LLAMA_BENCH" "${LB_ARGS[@]}" --repack 0 2>/dev/null)"
  fi
  LLAMA_TPS="$(python3 -c 'import json,sys; r=json.load(sys.stdin); print(r[0]["avg_ts"])' <<<"$LLAMA_JSON")"
  # Both sides: 3 timed generations, the mean of their tokens/s (llama-bench's avg_ts).
  log "llmtune: bench decode --model_name_or_path $MODEL --batch 1 --new_tokens $NEW_TOKENS --repetitions 3 (load $(load))"
  run_ours OURS_DEC_LINE "$LLMTUNE_BIN" bench decode --model_name_or_path "$MODEL" --batch 1 --new_tokens "$NEW_TOKENS" --repetitions 3
  OURS_DEC="$(field tokens_per_s "$OURS_DEC_LINE")"
  echo "llama.cpp decode tokens_per_s: $LLAMA_TPS"
  echo "llmtune decode tokens_per_s: ${OURS_DEC:-n/a}"
fi

if [[ -n "${BF16_TPS:-}" ]]; then
  echo "train_bf16_ratio_vs_torch_f32: $(ratio "$BF16_TPS" "$TORCH_TPS")"
fi
echo "train_ratio_vs_torch: $(ratio "$OURS_TPS" "$TORCH_TPS")"
echo "rss_ratio_vs_torch: $(ratio "$OURS_RSS" "$TORCH_RSS")"
echo "decode_ratio_vs_llamacpp: $(ratio "$OURS_DEC" "$LLAMA_TPS")"
exit "$FAILED"
