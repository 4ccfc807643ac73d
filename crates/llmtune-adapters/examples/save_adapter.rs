//! Writes a LoRA adapter (every linear layer, non-zero B) for a model folder in PEFT's layout,
//! plus the logits our forward gives with it, for `scripts/peft_roundtrip.py` to compare
//! against transformers + PEFT.
//!
//! ```text
//! cargo run --release -p llmtune-adapters --example save_adapter -- <model_dir> <out_dir>
//! ```
//! writes `<out_dir>/adapter/{adapter_model.safetensors,adapter_config.json}` and
//! `<out_dir>/logits.safetensors` (`input_ids`, `attention_mask`, `logits`). The input is the
//! `forward.*` batch of `<model_dir>/cases.safetensors` when present (the fixtures), else a
//! fixed batch of ids; positions are `0..T-1`.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use llmtune_adapters::{Lora, LoraConfig, DEFAULT_ADAPTER};
use llmtune_models::{config::LlamaConfig, loader, Llama};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 2 {
        eprintln!("usage: save_adapter <model_dir> <out_dir>");
        std::process::exit(2);
    }
    let model_dir = std::fs::canonicalize(&args[0])?;
    let out = PathBuf::from(&args[1]);
    let dev = Device::Cpu;
    let cfg = LlamaConfig::from_file(&model_dir.join("config.json"))?;
    let src = loader::open_dir(&model_dir)?;
    let mut model = Llama::load(&cfg, src.as_ref(), DType::F32, &dev)?;

    let mut lora = Lora::new();
    let lcfg = LoraConfig::new(4, 8.0, 0.0, "all")?;
    lora.add_adapter(&mut model, DEFAULT_ADAPTER, &lcfg, 1234)?;
    // Non-zero B (a fresh adapter is a no-op): a fixed pseudo-random pattern, std ~0.05.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for (key, v) in lora.trainable() {
        if key.ends_with("lora_B.weight") {
            let n = v.elem_count();
            let vals: Vec<f32> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.17
                })
                .collect();
            v.set(&Tensor::from_vec(vals, v.dims(), &dev)?)?;
        }
    }
    let adapter_dir = out.join("adapter");
    lora.save_peft(
        DEFAULT_ADAPTER,
        &adapter_dir,
        &model_dir.display().to_string(),
    )?;

    let cases = model_dir.join("cases.safetensors");
    let (ids, mask) = if cases.exists() {
        let c = candle_core::safetensors::load(&cases, &dev)?;
        (
            c["forward.input_ids"].clone(),
            c["forward.attention_mask"].clone(),
        )
    } else {
        let ids: Vec<i64> = (0..24)
            .map(|i| (i * 37 + 11) % cfg.vocab_size as i64)
            .collect();
        (
            Tensor::from_vec(ids, (2, 12), &dev)?,
            Tensor::ones((2, 12), DType::I64, &dev)?,
        )
    };
    let (b, t) = ids.dims2()?;
    let pos: Vec<Vec<i64>> = vec![(0..t as i64).collect(); b];
    let (logits, _) = model.forward(&ids, Some(&mask), Some(&pos), None)?;
    std::fs::create_dir_all(&out)?;
    let tensors: HashMap<&str, Tensor> = HashMap::from([
        ("input_ids", ids.to_dtype(DType::I64)?),
        ("attention_mask", mask.to_dtype(DType::I64)?),
        ("logits", logits),
    ]);
    candle_core::safetensors::save(&tensors, out.join("logits.safetensors"))?;
    println!("adapter: {}", adapter_dir.display());
    println!("logits:  {}", out.join("logits.safetensors").display());
    Ok(())
}
