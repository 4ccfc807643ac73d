#!/usr/bin/env bash
# Peak RSS and losses of two LoRA SFT steps on the COVID data: an f32 base against
# `--quantization_bit 8` and `4` (docs/results.md, "LoRA on a quantized base").
#
#   LLMTUNE_SHARED=../shared [LLMTUNE_BIN=target/release/llmtune] [MODEL=smollm2-135m] \
#     [BS=4] [SRC=256] [TGT=64] scripts/qlora_mem.sh
#
# MODEL is anything `--model_name_or_path` takes (the default alias is the SmolLM2 Q4_1 GGUF
# in LLMTUNE_HOME; a HF folder works too). Needs GNU time (`/usr/bin/time -v`). Prints one
# line per base: the quantization message, the logged steps, peak RSS and wall time.
set -euo pipefail
: "${LLMTUNE_SHARED:?set LLMTUNE_SHARED to the shared folder (the COVID data)}"
BIN=${LLMTUNE_BIN:-target/release/llmtune}
for q in none 8 4; do
  extra=()
  [[ $q != none ]] && extra=(--quantization_bit "$q")
  out=$(mktemp -d "${TMPDIR:-/tmp}/qlora_mem_$q.XXXX")
  log=$out.log
  /usr/bin/time -v env RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}" "$BIN" train --stage sft \
    --do_train --dataset covid_train,covid_dev --dataset_dir "$LLMTUNE_SHARED/data/covid" \
    --finetuning_type lora --output_dir "$out" --overwrite_output_dir --overwrite_cache \
    --per_device_train_batch_size "${BS:-4}" --gradient_accumulation_steps 1 \
    --max_source_length "${SRC:-256}" --max_target_length "${TGT:-64}" --learning_rate 5e-5 \
    --max_steps 2 --logging_steps 1 --model_name_or_path "${MODEL:-smollm2-135m}" \
    --max_samples 64 "${extra[@]}" > "$log" 2>&1
  echo "== $q: $(grep -E 'quantiz' "$log" | grep -v 'Command being timed' || true)" \
    "$(grep -E '^step|^done' "$log" | tr '\n' ' ')" \
    "$(grep -E 'Maximum resident|Elapsed' "$log" | tr '\n' ' ')"
  rm -rf "$out" "$log"
done
