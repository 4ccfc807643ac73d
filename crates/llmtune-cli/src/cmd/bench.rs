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
    /// One LoRA training step on random weights, the same model and settings as
    /// `torch_lora_bench.py` (alpha = 2 x rank, dropout 0, random ids, labels -100 on the first
    /// quarter, AdamW lr 1e-4). Ends with `tokens_per_s: X peak_rss_mb: Y step_s: Z` (median
    /// over the timed steps after one warm-up; on a GPU, peak device memory).
    Train(TrainArgs),
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
    /// Timed generations; `tokens_per_s` is the mean of their tokens/s (llama-bench's `-r`
    /// and `avg_ts`).
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
}

#[derive(clap::Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct TrainArgs {
    /// Model shape: smollm2-135m, qwen2.5-0.5b or llama3-8b.
    #[arg(long, default_value = "smollm2-135m")]
    pub shape: String,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    #[arg(long, default_value = "q_proj,v_proj")]
    pub lora_target: String,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Compute dtype of the frozen base: f32 or bf16 (LoRA masters stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Accepted for symmetry with torch_lora_bench.py; set RAYON_NUM_THREADS to pin threads.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Recompute each layer in the backward pass (less memory, one more forward).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_parser = crate::args::parse_bool)]
    pub gradient_checkpointing: bool,
    /// Also time a 2048^3 matmul in the compute dtype and report the step's share of it.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_parser = crate::args::parse_bool)]
    pub gemm_peak: bool,
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
        BenchAction::Train(a) => train(a),
        BenchAction::Rollout(a) => rollout(a),
    }
}

/// `(vocab, hidden, ffn, layers, heads, kv_heads, tied)`, as in torch_lora_bench.py.
fn shape(name: &str) -> anyhow::Result<(usize, usize, usize, usize, usize, usize, bool)> {
    Ok(match name {
        "smollm2-135m" => (49152, 576, 1536, 30, 9, 3, true),
        "qwen2.5-0.5b" => (151936, 896, 4864, 24, 14, 2, true),
        "llama3-8b" => (128256, 4096, 14336, 32, 32, 8, false),
        other => anyhow::bail!("--shape {other}: unknown (smollm2-135m, qwen2.5-0.5b, llama3-8b)"),
    })
}

/// Peak memory so far: the process's peak RSS, or the device's used memory on a GPU (candle's
/// CUDA allocator keeps freed blocks in the stream's pool, so used memory after a step is its
/// high-water mark).
fn peak_memory_mb(dev: &Device) -> anyhow::Result<f64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        let (free, total) = d.cuda_stream().context().mem_get_info()?;
        return Ok((total - free) as f64 / (1u64 << 20) as f64);
    }
    let _ = dev;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    Ok(kb / 1024.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn train(a: TrainArgs) -> anyhow::Result<ExitCode> {
    use llmtune_adapters::{Lora, LoraConfig};
    use llmtune_train::optim::{AdamW, AdamWConfig, Gradients};

    let (vocab, hidden, ffn, layers, heads, kv, tied) = shape(&a.shape)?;
    let dev = match a.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0).context(
            "--device cuda: no CUDA device (build with `--features cuda` on a machine with a GPU)",
        )?,
        other => anyhow::bail!("--device {other}: expected cpu or cuda"),
    };
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => anyhow::bail!("--dtype {other}: expected f32 or bf16"),
    };
    anyhow::ensure!(
        a.batch > 0 && a.seq >= 8,
        "--batch must be > 0 and --seq >= 8"
    );
    anyhow::ensure!(a.steps > 0, "--steps must be > 0");
    let cfg = llmtune_models::LlamaConfig::from_json_str(
        &serde_json::json!({
            "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "max_position_embeddings": a.seq.max(2048),
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tied,
        })
        .to_string(),
    )?;
    let t0 = Instant::now();
    let src = llmtune_models::loader::RandomSource::new(&cfg, 0.02);
    // bf16 on the CPU with MKL: f32 activations and masters, frozen linear weights in bf16
    // multiplied by MKL's bf16 GEMM (AMX / AVX-512 BF16). Without MKL the whole model runs in
    // bf16 through candle (slow on the CPU).
    let mixed_bf16 = dtype == DType::BF16 && dev.is_cpu() && llmtune_ops::blas::has_bf16_gemm();
    let load_dtype = if mixed_bf16 { DType::F32 } else { dtype };
    let mut model = llmtune_models::Llama::load(&cfg, &src, load_dtype, &dev)?;
    if mixed_bf16 {
        model.use_bf16_linear_weights()?;
    }
    if dev.is_cpu() {
        eprintln!(
            "CPU products: {}{}",
            llmtune_ops::blas::init().map_err(anyhow::Error::msg)?,
            if mixed_bf16 {
                "; bf16 linear weights, f32 activations"
            } else {
                ""
            }
        );
    }
    let lcfg = LoraConfig::new(a.lora_rank, 2.0 * a.lora_rank as f64, 0.0, &a.lora_target)?;
    let mut lora = Lora::new();
    lora.add_adapter(&mut model, "default", &lcfg, 0)?;
    lora.set_training(true);
    let model = llmtune_models::CausalLm::Llama(model);
    let vars = lora.trainable();
    let n_lora: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    eprintln!(
        "shape {} ({} params, {n_lora} LoRA) {:?} on {:?}, built in {:.1}s",
        a.shape,
        cfg.num_params(),
        dtype,
        dev,
        t0.elapsed().as_secs_f64()
    );
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: 1e-4,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    // Random ids and labels -100 on the first quarter (same recipe as the PyTorch side).
    let mut rng = llmtune_train::rng::Rng::seed_from_u64(1);
    let n = a.batch * a.seq;
    let ids: Vec<u32> = (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect();
    let mut labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    for r in 0..a.batch {
        for t in 0..a.seq / 4 {
            labels[r * a.seq + t] = -100;
        }
    }
    let ids = Tensor::from_vec(ids, (a.batch, a.seq), &dev)?;
    let mut times = Vec::new();
    for step in 0..=a.steps {
        dev.synchronize()?;
        let t = Instant::now();
        let lm_loss = |hidden: &Tensor| -> llmtune_train::Result<Tensor> {
            llmtune_train::stages::sft::causal_lm_loss_from_hidden(
                &model, hidden, &labels, a.batch, a.seq,
            )
        };
        let (loss, grads) = if a.gradient_checkpointing {
            llmtune_train::checkpointing::checkpointed_grads(
                &model,
                &ids,
                None,
                Some(&lora),
                &vars,
                lm_loss,
            )?
        } else {
            let hidden = model.forward_hidden(&ids, None, None)?;
            let loss = lm_loss(&hidden)?;
            drop(hidden);
            let store = loss.backward()?;
            (loss, Gradients::from_grad_store(&store, &vars)?)
        };
        opt.step(&grads)?;
        dev.synchronize()?;
        let dt = t.elapsed().as_secs_f64();
        eprintln!("step {step}: loss {:.4} {dt:.3}s", loss.to_scalar::<f32>()?);
        if step > 0 {
            times.push(dt);
        }
    }
    let step_s = median(&mut times);
    let peak = peak_memory_mb(&dev)?;
    // FLOPs of the step: 2 per weight per token forward, 2 more backward for the input
    // gradient (the frozen weights get none), plus attention scores and mixing (forward 4, backward 8
    // per key per attention dim per layer).
    let matmul_params = cfg.num_params() - if tied { 0 } else { vocab * hidden }; // embedding lookup is not a matmul
    let attn = 12 * layers * a.seq * heads * cfg.head_dim;
    let flops = (n * (4 * matmul_params + attn)) as f64;
    let achieved = flops / step_s;
    println!(
        "shape: {} batch: {} seq: {} lora_rank: {} dtype: {} device: {} gradient_checkpointing: {} flops_per_step: {:.3e} tflops: {:.3}",
        a.shape, a.batch, a.seq, a.lora_rank, a.dtype, a.device, a.gradient_checkpointing, flops, achieved / 1e12
    );
    if a.gemm_peak {
        let peak_flops = gemm_peak(dtype, mixed_bf16, &dev)?;
        println!(
            "gemm_2048_tflops: {:.3} share_of_gemm_peak: {:.3}",
            peak_flops / 1e12,
            achieved / peak_flops
        );
    }
    println!(
        "tokens_per_s: {:.1} peak_rss_mb: {peak:.0} step_s: {step_s:.3}",
        n as f64 / step_s
    );
    Ok(ExitCode::SUCCESS)
}

/// FLOP/s of a 2048^3 matmul in `dtype` (best of 5 after a warm-up).
/// With `mixed`, an f32 input against a bf16 weight (the bf16 CPU path's product).
fn gemm_peak(dtype: DType, mixed: bool, dev: &Device) -> anyhow::Result<f64> {
    let m = 2048;
    let x_dtype = if mixed { DType::F32 } else { dtype };
    let x = Tensor::randn(0f32, 1.0, (m, m), dev)?.to_dtype(x_dtype)?;
    let y = Tensor::randn(0f32, 1.0, (m, m), dev)?.to_dtype(dtype)?;
    let mut best = f64::MAX;
    for i in 0..6 {
        dev.synchronize()?;
        let t = Instant::now();
        // The linear layers' own product (`x @ y^T`): OpenBLAS with the `openblas` feature,
        // candle's gemm (or cuBLAS) otherwise, so the share is of the GEMM the step uses.
        let z = llmtune_ops::linear(&x, &y, None)?;
        dev.synchronize()?;
        drop(z);
        if i > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    Ok(2.0 * (m * m * m) as f64 / best)
}

fn decode(a: DecodeArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(a.repetitions >= 1, "--repetitions must be at least 1");
    let name = model_or_default(&a.model_name_or_path);
    let dev = device()?;
    let t0 = Instant::now();
    let p = llmtune_models::load_for_inference(&name, compute_dtype(&dev), &dev)
        .with_context(|| format!("loading {name}"))?;
    let quantized = matches!(&p.model, llmtune_models::CausalLm::Llama(m) if m.is_quantized());
    eprintln!(
        "loaded {name} in {:.2}s ({})",
        t0.elapsed().as_secs_f64(),
        if quantized {
            "quantized GGUF weights; LLMTUNE_GGUF_F32=1 dequantizes"
        } else {
            "unquantized weights"
        }
    );
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
    // Each repetition: the whole generation, less the prefill measured above.
    let mut rates = Vec::with_capacity(a.repetitions);
    let mut decode_s = Vec::with_capacity(a.repetitions);
    for _ in 0..a.repetitions {
        let t = Instant::now();
        let out = generate(&p.model, &prompts, pad, &cfg, |_, _| {})?;
        let total = t.elapsed().as_secs_f64();
        let n: usize = out.iter().map(|g| g.tokens.len().saturating_sub(1)).sum();
        let s = (total - prefill).max(1e-9);
        decode_s.push(format!("{s:.3}"));
        rates.push(n as f64 / s);
    }
    println!(
        "model: {name} batch: {} prompt_tokens: {} new_tokens: {} quantized: {quantized} prefill_s: {prefill:.3} decode_s: {} tokens_per_s_each: {}",
        a.batch,
        a.prompt_tokens,
        a.new_tokens,
        decode_s.join(","),
        rates.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(","),
    );
    println!(
        "tokens_per_s: {:.2}",
        rates.iter().sum::<f64>() / rates.len() as f64
    );
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
        let (l, _) = p.model.forward(&ids, None, None)?;
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
