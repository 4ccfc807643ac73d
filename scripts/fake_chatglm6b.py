#!/usr/bin/env python3
"""Writes a ChatGLM-6B-shaped checkpoint with random weights, the way THUDM ships it: the real
tensor names, shapes and shard layout of `pytorch_model.bin.index.json`, f16 `torch.save` shards
(`pytorch_model-0000N-of-00008.bin`), `config.json` and the tokenizer files beside it.

Shards are written one at a time, each tensor created and filled in place, so writing needs one
shard's memory (about 2 GB), not the model's.

Usage: python scripts/fake_chatglm6b.py REFERENCE_V1_DIR OUT_DIR
  REFERENCE_V1_DIR: ../shared/reference/chatglm/v1 (config.json, pytorch_model.bin.index.json,
  ice_text.model, tokenizer_config.json). Needs torch (e.g. the venv of scripts/bench_vs_torch.sh).
"""
import json
import os
import shutil
import sys

import torch


def shape_of(name, c):
    h, inner, vocab = c["hidden_size"], c["inner_hidden_size"], c["vocab_size"]
    head_dim = h // c["num_attention_heads"]
    table = {
        "word_embeddings.weight": (vocab, h),
        "lm_head.weight": (vocab, h),
        "query_key_value.weight": (3 * h, h),
        "query_key_value.bias": (3 * h,),
        "attention.dense.weight": (h, h),
        "attention.dense.bias": (h,),
        "dense_h_to_4h.weight": (inner, h),
        "dense_h_to_4h.bias": (inner,),
        "dense_4h_to_h.weight": (h, inner),
        "dense_4h_to_h.bias": (h,),
        "layernorm.weight": (h,),
        "layernorm.bias": (h,),
        # 2-D rotary: each half of the rotary dims (head_dim / 2) has its own angle table.
        "rotary_emb.inv_freq": (head_dim // 4,),
    }
    for suffix, shape in table.items():
        if name.endswith(suffix):
            return shape
    raise SystemExit(f"{name}: no shape rule")


def tensor(name, c, gen):
    shape = shape_of(name, c)
    if name.endswith("rotary_emb.inv_freq"):
        dim = c["hidden_size"] // c["num_attention_heads"] // 2
        return 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)).half()
    if name.endswith("layernorm.weight"):
        return torch.ones(shape, dtype=torch.float16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.float16)
    return torch.empty(shape, dtype=torch.float16).normal_(0.0, 0.02, generator=gen)


def main():
    ref, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    c = json.load(open(os.path.join(ref, "config.json")))
    index = json.load(open(os.path.join(ref, "pytorch_model.bin.index.json")))
    shards = {}
    for name, shard in index["weight_map"].items():
        shards.setdefault(shard, []).append(name)
    gen = torch.Generator().manual_seed(0)
    total = 0
    for shard in sorted(shards):
        tensors = {n: tensor(n, c, gen) for n in shards[shard]}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        tmp = os.path.join(out, shard + ".tmp")
        torch.save(tensors, tmp)
        os.replace(tmp, os.path.join(out, shard))
        del tensors
        print(f"{shard}: {len(shards[shard])} tensors", flush=True)
    for f in ("config.json", "pytorch_model.bin.index.json", "ice_text.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(ref, f), os.path.join(out, f))
    print(f"wrote {total / 1e9:.2f} GB of f16 tensors (index total_size {index['metadata']['total_size'] / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
