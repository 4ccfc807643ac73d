//! `llmtune bench`: measured figures for docs/results.md (never run in tests).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use llmtune_generate::{generate, GenerationConfig};

use crate::args::{compute_dtype, device, model_or_default};

/// Benchmarks.
#[derive(clap::Args, Debug)]
pub struct BenchCmd {
    #[command(subcommand)]
    pub action: BenchAction,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchAction {
    /// Decode speed: greedy generation of `new_tokens` per row after a short prompt.
    /// Ends with `tokens_per_s: X` (decode only, prefill excluded).
    Decode(DecodeArgs),
    /// Writes the logits of token-id sequences (`ids.{i}` in a safetensors file) as
    /// `logits.{i}`, for comparisons with other implementations.
    Logits(LogitsArgs),
    /// PPO rollout throughput: sampled generation as PPO samples (`top_k 0`, `top_p 1`,
    /// temperature 1, no stop ids so every row makes `new_tokens`) of `batch` prompts of
    /// different lengths, once as one left-padded batch with a KV cache and once one prompt at a
    /// time. Prints generated tokens/s of each, prefill included (a rollout pays for it).
    Rollout(RolloutArgs),
}

#[derive(clap::Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct RolloutArgs {
    #[arg(long)]
    pub model_name_or_path: Option<String>,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Length of the longest prompt; prompt i has `prompt_tokens - 3 i` tokens (at least 4).
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

#[derive(clap::Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct DecodeArgs {
    #[arg(long)]
    pub model_name_or_path: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
}

#[derive(clap::Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct LogitsArgs {
    #[arg(long)]
    pub model_name_or_path: Option<String>,
    /// safetensors with `ids.{i}` (1-D integer tensors).
    #[arg(long)]
    pub ids: PathBuf,
    /// Output safetensors with `logits.{i}` [T_i, vocab] (f32).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(c: BenchCmd) -> anyhow::Result<ExitCode> {
    match c.action {
        BenchAction::Decode(a) => decode(a),
        BenchAction::Logits(a) => logits(a),
        BenchAction::Rollout(a) => rollout(a),
    }
}

fn decode(a: DecodeArgs) -> anyhow::Result<ExitCode> {
    let name = model_or_default(&a.model_name_or_path);
    let dev = device()?;
    let t0 = Instant::now();
    let p = llmtune_models::load_pretrained(&name, compute_dtype(&dev), &dev)
        .with_context(|| format!("loading {name}"))?;
    eprintln!("loaded {name} in {:.2}s", t0.elapsed().as_secs_f64());
    let text = "The history of the city begins with a small settlement on the river, where";
    let mut ids = p.tokenizer.encode(text, false)?;
    ids.resize(a.prompt_tokens.max(1), ids[0]);
    let prompts = vec![ids; a.batch];
    let pad = p.tokenizer.pad_id().unwrap_or(0);
    // Prefill alone, to subtract it.
    let one = GenerationConfig {
        do_sample: false,
        max_new_tokens: 1,
        stop_ids: vec![],
        ..Default::default()
    };
    let t = Instant::now();
    generate(&p.model, &prompts, pad, &one, |_, _| {})?;
    let prefill = t.elapsed().as_secs_f64();
    let cfg = GenerationConfig {
        max_new_tokens: a.new_tokens,
        ..one
    };
    let t = Instant::now();
    let out = generate(&p.model, &prompts, pad, &cfg, |_, _| {})?;
    let total = t.elapsed().as_secs_f64();
    let n: usize = out.iter().map(|g| g.tokens.len().saturating_sub(1)).sum();
    let decode_s = (total - prefill).max(1e-9);
    println!(
        "model: {name} batch: {} prompt_tokens: {} new_tokens: {} prefill_s: {prefill:.3} decode_s: {decode_s:.3}",
        a.batch, a.prompt_tokens, a.new_tokens
    );
    println!("tokens_per_s: {:.2}", n as f64 / decode_s);
    Ok(ExitCode::SUCCESS)
}

fn logits(a: LogitsArgs) -> anyhow::Result<ExitCode> {
    let name = model_or_default(&a.model_name_or_path);
    let p = llmtune_models::load_pretrained(&name, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading {name}"))?;
    let inputs = candle_core::safetensors::load(&a.ids, &Device::Cpu)
        .with_context(|| format!("reading {}", a.ids.display()))?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let mut i = 0;
    while let Some(ids) = inputs.get(&format!("ids.{i}")) {
        let ids = ids.to_dtype(DType::U32)?.flatten_all()?.unsqueeze(0)?;
        let (l, _) = p.model.forward(&ids, None, None, None)?;
        out.insert(format!("logits.{i}"), l.squeeze(0)?.to_dtype(DType::F32)?);
        i += 1;
    }
    anyhow::ensure!(i > 0, "{}: no tensor named ids.0", a.ids.display());
    candle_core::safetensors::save(&out, &a.out)?;
    eprintln!("wrote {} sequences' logits to {}", i, a.out.display());
    Ok(ExitCode::SUCCESS)
}

fn rollout(a: RolloutArgs) -> anyhow::Result<ExitCode> {
    let name = model_or_default(&a.model_name_or_path);
    let dev = device()?;
    let p = llmtune_models::load_pretrained(&name, compute_dtype(&dev), &dev)
        .with_context(|| format!("loading {name}"))?;
    let text = "新冠肺炎的症状包括发热、干咳和乏力。The patient asks whether a cough after two \
                weeks means the infection is still active, and what to do about the fever.";
    let mut ids = p.tokenizer.encode(text, false)?;
    anyhow::ensure!(
        !ids.is_empty(),
        "the tokenizer encoded the bench text to nothing"
    );
    while ids.len() < a.prompt_tokens.max(4) {
        ids.extend_from_within(..);
    }
    let prompts: Vec<Vec<u32>> = (0..a.batch.max(1))
        .map(|i| ids[..a.prompt_tokens.saturating_sub(3 * i).max(4)].to_vec())
        .collect();
    let pad = p.tokenizer.pad_id().unwrap_or(0);
    let cfg = GenerationConfig {
        do_sample: true,
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        max_new_tokens: a.new_tokens,
        stop_ids: vec![],
        seed: a.seed,
        ..Default::default()
    };
    // Warm-up (allocator, thread pool).
    generate(
        &p.model,
        &prompts[..1],
        pad,
        &GenerationConfig {
            max_new_tokens: 2,
            ..cfg.clone()
        },
        |_, _| {},
    )?;
    let t = Instant::now();
    let out = generate(&p.model, &prompts, pad, &cfg, |_, _| {})?;
    let batched_s = t.elapsed().as_secs_f64();
    let batched_n: usize = out.iter().map(|g| g.tokens.len()).sum();
    let t = Instant::now();
    let mut single_n = 0;
    for pr in &prompts {
        let g = generate(&p.model, std::slice::from_ref(pr), pad, &cfg, |_, _| {})?;
        single_n += g[0].tokens.len();
    }
    let single_s = t.elapsed().as_secs_f64();
    let (bt, st) = (batched_n as f64 / batched_s, single_n as f64 / single_s);
    println!(
        "model: {name} prompts: {} (prompt tokens {}..{}) new_tokens: {} sampling: top_k 0, top_p 1, temperature 1",
        prompts.len(),
        prompts.last().map(Vec::len).unwrap_or(0),
        prompts[0].len(),
        a.new_tokens
    );
    println!("batched: {batched_n} tokens in {batched_s:.3}s = {bt:.2} tokens/s");
    println!("single:  {single_n} tokens in {single_s:.3}s = {st:.2} tokens/s");
    println!("speedup: {:.2}x", bt / st);
    Ok(ExitCode::SUCCESS)
}
