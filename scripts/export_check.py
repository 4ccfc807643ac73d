#!/usr/bin/env python3
"""Checks an `llmtune export` folder with Python transformers (issue 9).

    python scripts/export_check.py EXPORTED_DIR [--llmtune target/release/llmtune]

1. transformers loads EXPORTED_DIR (AutoTokenizer + AutoModelForCausalLM, float32, eager);
2. a few texts are tokenized by the exported tokenizer.json;
3. `llmtune bench logits` computes our logits of the same ids from the same folder;
4. prints `max_abs_diff: X` over every position, the largest |logit|, and `within_tol: yes|no`
   with the fixtures' logits tolerance |ours - theirs| <= tol + tol*|theirs| (tol 1e-4); exits 1
   when that fails.
Needs: torch, transformers, safetensors (pip).
"""
import argparse, os, subprocess, sys, tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("folder")
p.add_argument("--llmtune", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "llmtune"))
p.add_argument("--tol", type=float, default=1e-4)
a = p.parse_args()

tok = AutoTokenizer.from_pretrained(a.folder)
model = AutoModelForCausalLM.from_pretrained(a.folder, torch_dtype=torch.float32, attn_implementation="eager")
model.eval()
texts = [
    "Patient: I have had a fever and a dry cough for three days. Doctor:",
    "新冠肺炎的常见症状有哪些？",
    "The history of the city begins with a small settlement on the river.",
]
ids = [tok(t, add_special_tokens=False, return_tensors="pt").input_ids[0] for t in texts]
with tempfile.TemporaryDirectory() as d:
    save_file({f"ids.{i}": x.to(torch.int64).contiguous() for i, x in enumerate(ids)}, f"{d}/ids.safetensors")
    subprocess.run([a.llmtune, "bench", "logits", "--model_name_or_path", a.folder,
                    "--ids", f"{d}/ids.safetensors", "--out", f"{d}/ours.safetensors"], check=True)
    ours = load_file(f"{d}/ours.safetensors")
worst, excess, biggest, n = 0.0, -1.0, 0.0, 0
with torch.no_grad():
    for i, x in enumerate(ids):
        theirs = model(x.unsqueeze(0)).logits[0].float()
        d = (theirs - ours[f"logits.{i}"]).abs()
        worst = max(worst, d.max().item())
        excess = max(excess, (d - a.tol - a.tol * theirs.abs()).max().item())
        biggest = max(biggest, theirs.abs().max().item())
        n += x.numel()
ok = excess <= 0
print(f"model: {a.folder} transformers loaded it: yes")
print(f"tokens: {n} max_abs_diff: {worst:.3e} max_abs_logit: {biggest:.2f} within_tol: {'yes' if ok else 'no'}")
sys.exit(0 if ok else 1)
