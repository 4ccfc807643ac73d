#!/usr/bin/env python3
"""Score a generated_predictions.jsonl exactly like the Python reference.

This is the reference's `ComputeMetrics` (ChatGLM-Efficient-Tuning / LLaMA-Factory), applied
to the decoded strings of a `generated_predictions.jsonl` (one `{"label": ..., "predict": ...}`
object per line), to cross-check `llmtune eval-preds` / `llmtune-metrics`. Per sample:

* hyp = jieba.cut(predict), ref = jieba.cut(label) (jieba 0.42.1 default dictionary, HMM on);
* if either side has no non-space token, ROUGE-1/2/L are 0, else `rouge_chinese.Rouge` F-scores
  of the space-joined words;
* BLEU-4 = nltk `sentence_bleu` over characters with `SmoothingFunction().method3`;
* each score x100, rounded to 4 decimals; the result is `numpy.mean` per key.

Requires the versions the fixtures were made with (not run in CI):

    python3 -m venv /work/venv-metrics
    /work/venv-metrics/bin/pip install jieba==0.42.1 rouge-chinese==1.0.3 nltk==3.10.4 numpy

Usage: score_predictions.py PATH/generated_predictions.jsonl [--json]

Prints the four means with 4 decimals (`--json`: full precision JSON with the reference's keys).
"""

import argparse
import json
import logging
import sys

import jieba
import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def read_pairs(path):
    """Return [(predict, label)] in file order; blank lines are skipped."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{lineno}: invalid JSON: {e}")
            for field in ("label", "predict"):
                if field not in record:
                    sys.exit(f'{path}:{lineno}: missing field "{field}"')
            pairs.append((record["predict"], record["label"]))
    return pairs


def compute_metrics(pairs):
    """The reference's ComputeMetrics on decoded (prediction, label) strings."""
    score_dict = {k: [] for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")}
    for pred, label in pairs:
        hypothesis = list(jieba.cut(pred))
        reference = list(jieba.cut(label))

        if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
            result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            rouge = Rouge()
            scores = rouge.get_scores(" ".join(hypothesis), " ".join(reference))
            result = scores[0]

        for k, v in result.items():
            score_dict[k].append(round(v["f"] * 100, 4))

        bleu_score = sentence_bleu(
            [list(label)], list(pred), smoothing_function=SmoothingFunction().method3
        )
        score_dict["bleu-4"].append(round(bleu_score * 100, 4))

    return {k: float(np.mean(v)) for k, v in score_dict.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="generated_predictions.jsonl")
    parser.add_argument("--json", action="store_true", help="print full-precision JSON")
    args = parser.parse_args()

    jieba.setLogLevel(logging.WARNING)
    pairs = read_pairs(args.path)
    if not pairs:
        sys.exit(f"{args.path}: no predictions")
    means = compute_metrics(pairs)
    if args.json:
        print(json.dumps({f"predict_{k}": means[k] for k in KEYS}, indent=2))
    else:
        for k in KEYS:
            print(f"predict_{k:<8} {means[k]:.4f}")
        print(f"samples          {len(pairs)}")


if __name__ == "__main__":
    main()
