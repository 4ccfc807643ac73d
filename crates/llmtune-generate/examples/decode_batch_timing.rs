//! Times `DecodeBatch` prefill and decode steps at several batch sizes (CPU, f32).
//!
//! `cargo run --release -p llmtune-generate --example decode_batch_timing -- smollm2-135m`
use std::time::Instant;

use candle_core::{DType, Device};
use llmtune_generate::DecodeBatch;

fn main() {
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "smollm2-135m".into());
    let p = llmtune_models::load_pretrained(&name, DType::F32, &Device::Cpu).unwrap();
    let m = &p.model;
    let prompt: Vec<u32> = (0..32u32).map(|i| 100 + i * 37).collect();
    let t = Instant::now();
    let (_, c) = DecodeBatch::prefill(m, &prompt).unwrap();
    println!("prefill 1 x 32 tokens: {:.3} s", t.elapsed().as_secs_f64());
    for k in [8usize, 32] {
        let prompts = vec![prompt.as_slice(); k];
        let t = Instant::now();
        DecodeBatch::prefill_many(m, &prompts).unwrap();
        println!(
            "prefill {k} x 32 tokens together: {:.3} s",
            t.elapsed().as_secs_f64()
        );
    }
    for b in [1usize, 8, 32] {
        let mut batch = DecodeBatch::new(m);
        batch.join(&c, b).unwrap();
        let inputs = vec![200u32; b];
        batch.step(m, &inputs).unwrap();
        let t = Instant::now();
        let n = 5;
        for _ in 0..n {
            batch.step(m, &inputs).unwrap();
        }
        let s = t.elapsed().as_secs_f64() / n as f64;
        println!("batch {b:2}: {:.3} s/step, {:.1} tokens/s", s, b as f64 / s);
    }
}
