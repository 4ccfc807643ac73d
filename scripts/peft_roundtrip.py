#!/usr/bin/env python3
"""Checks that Python PEFT loads an adapter written by llmtune and computes the same logits.

Not run in CI (needs torch, transformers and peft). Usage:

    cargo run --release -p llmtune-adapters --example save_adapter -- <model_dir> <out_dir>
    python scripts/peft_roundtrip.py <model_dir> <out_dir>

`<out_dir>` holds `adapter/` (PEFT layout) and `logits.safetensors` (`input_ids`,
`attention_mask`, `logits` from llmtune with the adapter, positions 0..T-1). Prints the max
|difference| of the logits on valid positions and exits non-zero above 1e-4 + 1e-4|ref|, or when
PEFT's loaded LoRA tensors differ from the file.
"""

import argparse
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)

    base = AutoModelForCausalLM.from_pretrained(
        args.model_dir, attn_implementation="eager"
    ).float()
    model = PeftModel.from_pretrained(base, f"{args.out_dir}/adapter")
    model.eval()

    # Every saved tensor must have been loaded under PEFT's in-memory name (`.default.`).
    saved = load_file(f"{args.out_dir}/adapter/adapter_model.safetensors")
    state = model.state_dict()
    worst_w = 0.0
    for key, t in saved.items():
        mem = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        if mem not in state:
            print(f"saved key {key} was not loaded by PEFT (no {mem})")
            return 1
        worst_w = max(worst_w, (state[mem].float() - t.float()).abs().max().item())
    print(f"{len(saved)} LoRA tensors loaded by PEFT; max |weight diff| {worst_w:.3e}")

    d = load_file(f"{args.out_dir}/logits.safetensors")
    ids, mask, ours = d["input_ids"], d["attention_mask"], d["logits"]
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    valid = mask.bool()
    diff = (ours - ref).abs()[valid]
    bound = (1e-4 + 1e-4 * ref.abs())[valid]
    print(f"max |logits diff| on valid positions: {diff.max().item():.3e}")
    with torch.no_grad():
        with model.disable_adapter():
            plain = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    effect = (plain - ref).abs()[valid].max().item()
    print(f"adapter effect (max |with - without|): {effect:.3e}")
    ok = bool((diff <= bound).all()) and worst_w == 0.0 and effect > 1e-3
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
