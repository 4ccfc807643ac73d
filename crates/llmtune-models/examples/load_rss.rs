//! Peak memory of loading a model folder for inference, against its size on disk.
//!
//! `cargo run --release -p llmtune-models --example load_rss -- DIR [bf16|f16|f32] [PROMPT]`
//!
//! Loads DIR with `load_pretrained` (weights converted to the dtype tensor by tensor), greedily
//! picks the next token of PROMPT with one forward pass, and prints the size of the weight files,
//! the peak RSS (`VmHWM`) and their ratio. `scripts/fake_chatglm6b.py` writes a ChatGLM-6B-shaped
//! folder to try it on.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or("usage: load_rss DIR [bf16|f16|f32] [PROMPT]")?;
    let dtype = match args.next().as_deref().unwrap_or("bf16") {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        other => return Err(format!("unknown dtype {other}").into()),
    };
    let prompt = args.next().unwrap_or_else(|| "你好".to_string());
    let disk: u64 = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.ends_with(".bin") || n.ends_with(".safetensors") || n.ends_with(".gguf")
        })
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    let t0 = Instant::now();
    let p = llmtune_models::load_pretrained(&dir, dtype, &Device::Cpu)?;
    let load_s = t0.elapsed().as_secs_f64();
    let after_load = peak_rss_mb();
    let ids = p.tokenizer.encode(&prompt, true)?;
    let n = ids.len();
    let input = Tensor::from_vec(ids, (1, n), &Device::Cpu)?;
    let t1 = Instant::now();
    let logits = p.model.forward_last(&input, None, None)?;
    let next = logits.argmax(1)?.to_vec1::<u32>()?[0];
    let fwd_s = t1.elapsed().as_secs_f64();
    let peak = peak_rss_mb();
    let disk_mb = disk as f64 / (1024.0 * 1024.0);
    println!(
        "{} ({}), {dtype:?}: weights on disk {disk_mb:.0} MB; loaded in {load_s:.1} s, peak RSS after load {after_load:.0} MB; \
         forward over {n} prompt tokens in {fwd_s:.1} s -> next token {next}",
        dir,
        p.model.arch()
    );
    println!(
        "peak_rss_mb: {peak:.0} disk_mb: {disk_mb:.0} ratio: {:.3}",
        peak / disk_mb
    );
    Ok(())
}
