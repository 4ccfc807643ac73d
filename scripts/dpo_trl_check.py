#!/usr/bin/env python3
"""DPO side by side with TRL: the same model, adapter, pairs and hyperparameters through
TRL's `DPOTrainer`, printing the loss it logs at each step (compare with the `loss` lines of
`llmtune train --stage dpo`'s trainer_log.jsonl). See docs/results.md, "DPO".

    # the pairs exactly as llmtune encodes them (TRL's field names)
    llmtune data inspect --stage dpo --model_name_or_path M --template chatml \
        --dataset example_rm --dataset_dir data/example --max_samples 3 --dump_jsonl pairs.jsonl
    python scripts/dpo_trl_check.py --model M --adapter A --pairs pairs.jsonl \
        --steps 3 --lr 1e-3 --beta 0.1

The adapter A (a PEFT folder) is continued, as `--checkpoint_dir A --resume_lora_training
true` does; TRL then makes a frozen copy of it the reference (its "ref" adapter). All pairs
form one batch, so the data order does not matter. AdamW, a linear schedule without warmup,
no weight decay, gradient clipping at 1.0 and dropout off: the defaults of both; f32
(TRL's own default would be bf16 autocast).
Needs torch, transformers, peft, trl, datasets (the reference venv).
"""
import argparse
import json
import tempfile

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    a = ap.parse_args()

    rows = [json.loads(l) for l in open(a.pairs, encoding="utf-8") if l.strip()]
    data = Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(a.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, a.adapter, is_trainable=True)

    # The pairs are token ids already (llmtune's encoding): skip TRL's own tokenization.
    DPOTrainer._prepare_dataset = lambda self, dataset, *args, **kwargs: dataset

    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(
            output_dir=out,
            beta=a.beta,
            learning_rate=a.lr,
            max_steps=a.steps,
            per_device_train_batch_size=len(rows),
            gradient_accumulation_steps=1,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=42,
            max_length=None,
            # TRL's configs default to bf16 autocast (also on a CPU that has bf16); llmtune
            # trains this in f32.
            bf16=False,
        )
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
        trainer.train()
        for h in trainer.state.log_history:
            if "loss" in h:
                print(f"step {h['step']}: loss {h['loss']:.6f} grad_norm {h['grad_norm']:.6f}")
        print("trl_version:", __import__("trl").__version__)


if __name__ == "__main__":
    main()
