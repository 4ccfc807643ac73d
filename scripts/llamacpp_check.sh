#!/usr/bin/env bash
# Checks that llama.cpp loads and runs what `llmtune export --export_gguf` writes (issue 9):
#   1. `llmtune export --export_gguf f16,q8_0` of --model (+ --adapter merged) into --out;
#   2. greedy generation of --new_tokens tokens from one prompt with llama.cpp's
#      `llama-completion` on each GGUF, and with `llmtune generate --do_sample false` on the
#      same GGUF file;
#   3. prints both continuations and how long their common prefix is.
#
# Usage:
#   scripts/llamacpp_check.sh [--model smollm2-135m] [--adapter DIR|none] [--out DIR]
#       [--prompt TEXT] [--new_tokens 48] [--threads 2] [--types f16,q8_0]
#
# The prompt is given to both sides verbatim (llmtune with `--template vanilla`, llama.cpp
# with `-no-cnv`), so the default is a ChatML-rendered user turn; special tokens in it are
# parsed by both. llama.cpp runs with `--temp 0 --top-k 1 --no-repack` (greedy; no repacking,
# which avoids the SIGILL of 0c1e57098's AMX path on this machine), CPU only.
#
# Environment: LLMTUNE_BIN (default <repo>/target/release/llmtune, or
# $CARGO_TARGET_DIR/release/llmtune; built with `cargo build --release -p llmtune-cli` when
# missing), LLMTUNE_HOME (for the smollm2-135m alias), BENCH_CACHE / LLAMA_CPP_PYTHON_VERSION /
# LLAMA_CPP_SDIST / LLAMA_BIN_DIR (see scripts/build_llamacpp.sh, which builds
# llama-completion).
#
# Last lines (machine-readable), one per type:
#   match_<type>: identical (N chars) | prefix N of A/B chars (llmtune/llama.cpp)
set -euo pipefail

# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
MODEL=smollm2-135m
ADAPTER="$REPO/../runs/covid/sft"
OUT="${TMPDIR:-/tmp}/llmtune-llamacpp-check"
PROMPT=$'<|im_start|>user\n新冠病毒感染后应该注意什么？<|im_end|>\n<|im_start|>assistant\n'
NEW_TOKENS=48 THREADS=2 TYPES=f16,q8_0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --adapter) ADAPTER="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --prompt) PROMPT="$2"; shift 2 ;;
    --new_tokens) NEW_TOKENS="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --types) TYPES="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "llamacpp_check.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
done

if [[ -z "${LLMTUNE_BIN:-}" ]]; then
  LLMTUNE_BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/llmtune"
  if [[ ! -x "$LLMTUNE_BIN" ]]; then
    log "building $LLMTUNE_BIN"
    (cd "$REPO" && cargo build --release -p llmtune-cli)
  fi
fi
BIN_DIR="$(llama_bin_dir llama-completion)"
LLAMA_COMPLETION="$BIN_DIR/llama-completion"
log "$("$LLAMA_COMPLETION" --version 2>&1 | grep -m1 commit): $LLAMA_COMPLETION"

export_args=(export --model_name_or_path "$MODEL" --output_dir "$OUT" --export_gguf "$TYPES")
if [[ "$ADAPTER" != none ]]; then export_args+=(--checkpoint_dir "$ADAPTER"); fi
log "$(basename "$LLMTUNE_BIN") ${export_args[*]}"
start=$(date +%s.%N)
"$LLMTUNE_BIN" "${export_args[@]}"
log "export took $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"

# compare OURS_FILE THEIRS_FILE: "identical N" or "prefix N of A/B" (characters; an unfinished
# UTF-8 sequence at the end of either, as llama.cpp prints a token's raw bytes, is dropped).
compare() {
  python3 - "$1" "$2" <<'PY'
import sys
a, b = (open(p, "rb").read().decode("utf-8", "replace").rstrip("\ufffd\n") for p in sys.argv[1:3])
n = 0
while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
print(f"identical ({n} chars)" if a == b else f"prefix {n} of {len(a)}/{len(b)} chars (llmtune/llama.cpp)")
PY
}

summary=()
IFS=',' read -ra types <<<"$TYPES"
for t in "${types[@]}"; do
  gguf="$OUT/model-$t.gguf"
  log "llama.cpp on $gguf"
  "$LLAMA_COMPLETION" -m "$gguf" -p "$PROMPT" -n "$NEW_TOKENS" --temp 0 --top-k 1 -s 0 \
    -no-cnv --no-display-prompt --no-warmup --no-repack --verbose-prompt -v -t "$THREADS" \
    -c 1024 >"$OUT/llamacpp-$t.txt" 2>"$OUT/llamacpp-$t.log" || {
      echo "llama-completion failed on $gguf; its log:" >&2; tail -n 30 "$OUT/llamacpp-$t.log" >&2
      exit 1; }
  sed -i 's/ \[end of text\]$//' "$OUT/llamacpp-$t.txt"
  grep -E "print_info: (arch|file type|model params|vocab type|n_vocab|n_merges)|load: special tokens|tokenizer.ggml.pre|eval time" \
    "$OUT/llamacpp-$t.log" | sed 's/^/   /' >&2 || true
  log "llmtune generate on $gguf"
  RAYON_NUM_THREADS="$THREADS" "$LLMTUNE_BIN" generate --model_name_or_path "$gguf" \
    --template vanilla --prompt "$PROMPT" --do_sample false --max_new_tokens "$NEW_TOKENS" \
    >"$OUT/llmtune-$t.txt" 2>"$OUT/llmtune-$t.log"
  printf -- '--- %s: llama.cpp\n%s\n--- %s: llmtune\n%s\n' "$t" "$(cat "$OUT/llamacpp-$t.txt")" \
    "$t" "$(cat "$OUT/llmtune-$t.txt")"
  summary+=("match_$t: $(compare "$OUT/llmtune-$t.txt" "$OUT/llamacpp-$t.txt")")
done
printf '%s\n' "${summary[@]}"
