//! Writes a stand-in reward model folder for trying `--stage ppo` without an RM run: a random
//! LoRA adapter (non-zero `B`, so it changes the backbone) and a fresh value head, in the
//! layout `--stage rm` writes (`adapter_model.safetensors`, `adapter_config.json`,
//! `value_head.safetensors`). Its scores are a fixed random function of the text: useful to
//! exercise the pipeline, meaningless as a preference model.
//!
//! `cargo run --release -p llmtune-train --example random_reward_model -- <model> <out_dir> [seed]`

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use llmtune_adapters::{Lora, LoraConfig, ValueHead};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: random_reward_model <model_name_or_path> <out_dir> [seed]".into());
    }
    let out = PathBuf::from(&args[2]);
    let seed: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let mut p = llmtune_models::load_pretrained(&args[1], DType::F32, &Device::Cpu)?;
    let cfg = LoraConfig::new(8, 32.0, 0.1, "q_proj,v_proj")?;
    let mut weights = BTreeMap::new();
    for (i, (name, lin)) in p.model.linears_mut().into_iter().enumerate() {
        if !cfg.target.matches(&name) {
            continue;
        }
        let (o, inp) = (lin.out_features(), lin.in_features());
        let s = seed.wrapping_mul(1000).wrapping_add(i as u64);
        let a = random(&[cfg.r, inp], 1.0 / (inp as f64).sqrt(), s)?;
        let b = random(&[o, cfg.r], 0.02, s ^ 0xB)?;
        weights.insert(name, (a, b));
    }
    let mut lora = Lora::new();
    lora.insert_adapter(&mut p.model, "reward", cfg, weights, false)?;
    lora.save_peft("reward", &out, &args[1])?;
    ValueHead::new(p.model.hidden_size(), DType::F32, &Device::Cpu, seed)?.save(&out)?;
    eprintln!("stand-in reward model written to {}", out.display());
    Ok(())
}

/// Uniform in `±std·sqrt(3)` (variance `std²`), from a seed.
fn random(shape: &[usize], std: f64, seed: u64) -> candle_core::Result<Tensor> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let u = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
            ((2.0 * u - 1.0) * std * 3f64.sqrt()) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}
