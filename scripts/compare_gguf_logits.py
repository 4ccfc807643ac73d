#!/usr/bin/env python3
"""Compare llmtune's logits on a GGUF model with PyTorch/transformers' (dequantized f32).

The reference side loads the GGUF with transformers,
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` (dir = the folder holding the file),
which dequantizes every weight to f32, and runs a full forward pass on three fixed prompts in
plain ChatML without a system prompt:

    <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n

It saves the token ids it used and its logits in one safetensors file (`--save`):
`ids.{i}` (int64, [T_i]) and `logits.{i}` (f32, [T_i, vocab]) for prompt i = 0, 1, 2.
That file is also a valid `--ids` input of `llmtune bench logits`, which writes our logits
of the same ids as `logits.{i}`; `--ours` then reports, per prompt, the max and mean absolute
difference, the largest logit magnitude (for scale) and whether the argmax agrees at every
position. The ids come from transformers' tokenizer of the GGUF, so both sides see the very
same tokens whatever our own tokenizer does.

Usage (the reference venv: torch, transformers, gguf, safetensors, numpy; not run in CI):

    # 1. reference logits (about a minute on 2 CPU cores)
    /work/venv-ref/bin/python scripts/compare_gguf_logits.py \\
        --gguf /tmp/llmtune-home/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --save /tmp/compare/torch_logits.safetensors
    # 2. our logits of the same ids
    llmtune bench logits --model_name_or_path /tmp/llmtune-home/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --ids /tmp/compare/torch_logits.safetensors --out /tmp/compare/ours.safetensors
    # 3. the comparison (no model is loaded when --save names an existing file and --gguf is omitted)
    /work/venv-ref/bin/python scripts/compare_gguf_logits.py \\
        --save /tmp/compare/torch_logits.safetensors --ours /tmp/compare/ours.safetensors

`--llmtune BIN` does step 2 itself (it runs `BIN bench logits ...` and writes `--ours`, default
next to `--save`), so one call does all three. With `--save` naming an existing file and no
`--gguf`, the saved reference is reused. `--threads` sets torch's thread count (default 2).

Output: one line per prompt, `prompt {i}: T={T} max_abs_diff={d} mean_abs_diff={m}
max_abs_logit={s} argmax_agree={k}/{T}`, then `max_abs_diff: X` over all prompts. Measured on
SmolLM2-135M-Instruct.Q4_1.gguf (logits up to about 38 in magnitude): max_abs_diff 1e-4 and the
argmax agreeing everywhere, with `bench logits` running dequantized f32 weights like transformers.
Quantized kernels (which quantize activations to Q8 for the Q4_1 dot products) would differ by
far more than that.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
]


def chatml(question):
    """Plain ChatML, no system prompt, open assistant turn."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def reference(gguf, threads):
    """Token ids and f32 logits of each prompt from transformers on the dequantized GGUF."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from the local file
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    gguf = Path(gguf).resolve()
    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    out = {}
    with torch.no_grad():
        for i, q in enumerate(QUESTIONS):
            ids = tok(chatml(q), add_special_tokens=False, return_tensors="pt").input_ids
            logits = model(input_ids=ids).logits[0].float()
            out[f"ids.{i}"] = ids[0].to(torch.int64).contiguous()
            out[f"logits.{i}"] = logits.contiguous()
            nxt = tok.decode([int(logits[-1].argmax())])
            print(f"prompt {i}: T={ids.shape[1]} next={nxt!r} ({q})", flush=True)
    return out


def compare(ref, ours):
    """Prints per-prompt differences; returns the overall max abs difference."""
    import numpy as np

    worst = 0.0
    i = 0
    while f"logits.{i}" in ref:
        key = f"logits.{i}"
        if key not in ours:
            sys.exit(f"--ours has no tensor named {key}")
        a = np.asarray(ref[key], dtype=np.float32)
        b = np.asarray(ours[key], dtype=np.float32)
        if a.shape != b.shape:
            sys.exit(f"{key}: shape {list(b.shape)} in --ours, {list(a.shape)} in the reference")
        d = np.abs(a - b)
        agree = int((a.argmax(-1) == b.argmax(-1)).sum())
        print(
            f"prompt {i}: T={a.shape[0]} max_abs_diff={d.max():.5f} mean_abs_diff={d.mean():.5f} "
            f"max_abs_logit={np.abs(a).max():.3f} argmax_agree={agree}/{a.shape[0]}"
        )
        worst = max(worst, float(d.max()))
        i += 1
    if i == 0:
        sys.exit("the reference file has no tensor named logits.0")
    print(f"max_abs_diff: {worst:.5f}")
    return worst


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", help="the GGUF file (computes the reference logits)")
    p.add_argument("--save", required=True, help="safetensors with ids.{i} and the reference logits.{i}")
    p.add_argument("--ours", help="safetensors with llmtune's logits.{i} [T_i, vocab]")
    p.add_argument("--llmtune", help="llmtune binary: run `bench logits` to produce --ours")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    save = Path(a.save)
    if a.gguf:
        ref = reference(a.gguf, a.threads)
        save.parent.mkdir(parents=True, exist_ok=True)
        save_file(ref, str(save))
        print(f"saved {save}")
    elif not save.exists():
        sys.exit(f"{save} does not exist: pass --gguf to compute the reference")

    ours = a.ours
    if a.llmtune:
        if not a.gguf:
            sys.exit("--llmtune needs --gguf (the model to run)")
        ours = ours or str(save.with_name(save.stem + ".ours.safetensors"))
        cmd = [a.llmtune, "bench", "logits", "--model_name_or_path", a.gguf, "--ids", str(save), "--out", ours]
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    if ours:
        compare(load_file(str(save)), load_file(ours))


if __name__ == "__main__":
    main()
