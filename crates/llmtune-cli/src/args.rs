//! Argument helpers shared by the subcommands.

use candle_core::{DType, Device};

/// HF-style boolean flags (`true/false/1/0/yes/no`); one parser for every subcommand.
pub use llmtune_train::args::parse_bool;

/// `--model_name_or_path` value, defaulting to the embedded model with a notice.
pub fn model_or_default(m: &Option<String>) -> String {
    match m {
        Some(m) => m.clone(),
        None => {
            let d = llmtune_models::hub::DEFAULT_MODEL;
            eprintln!("llmtune: --model_name_or_path not given; using the embedded default {d}");
            d.to_string()
        }
    }
}

/// The device to run on: CUDA when built with it and available, else CPU (saying why when a
/// CUDA build falls back).
pub fn device() -> anyhow::Result<Device> {
    device_at(0)
}

/// [`device`] with CUDA device `ordinal` (a data-parallel rank's `LOCAL_RANK`).
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn device_at(ordinal: usize) -> anyhow::Result<Device> {
    #[cfg(feature = "cuda")]
    {
        match Device::new_cuda(ordinal) {
            Ok(d) => return Ok(d),
            Err(e) => {
                let e = e.to_string();
                let first = e.lines().next().unwrap_or_default();
                eprintln!("llmtune: no usable CUDA device ({first}); running on the CPU");
            }
        }
    }
    Ok(Device::Cpu)
}

/// f32 on CPU; bf16 on GPU unless asked otherwise.
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// Generation flags (SPEC §2), shared by `generate`, `chat` and the server's defaults.
#[derive(clap::Args, Debug, Clone)]
#[command(rename_all = "snake_case")]
pub struct GenFlags {
    /// Sample (true) or decode greedily (false).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub do_sample: bool,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.95)]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 0.7)]
    pub top_p: f64,
    /// Top-k sampling (0 = off).
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    /// Repetition penalty (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Longest prompt kept (older history is dropped first).
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// Seed for sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl GenFlags {
    /// The generation settings, stopping at `stop_ids`.
    pub fn config(&self, stop_ids: &[u32]) -> llmtune_generate::GenerationConfig {
        llmtune_generate::GenerationConfig {
            do_sample: self.do_sample,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            max_new_tokens: self.max_new_tokens,
            stop_ids: stop_ids.to_vec(),
            seed: self.seed,
            vocab_size: None,
        }
    }
}

/// Loads `--model_name_or_path` with the `--checkpoint_dir` LoRA adapters merged in (for
/// inference). Without adapters a quantized GGUF keeps its quantized weights
/// ([`llmtune_models::load_for_inference`]); with adapters it is dequantized to f32 so that
/// they can be merged.
pub fn load_merged(
    model: &Option<String>,
    checkpoint_dir: &Option<String>,
) -> anyhow::Result<(llmtune_models::Pretrained, String)> {
    load_merged_with(model, checkpoint_dir, true)
}

/// [`load_merged`]; `inference: false` always loads unquantized weights (export).
pub fn load_merged_with(
    model: &Option<String>,
    checkpoint_dir: &Option<String>,
    inference: bool,
) -> anyhow::Result<(llmtune_models::Pretrained, String)> {
    use anyhow::Context;
    let name = model_or_default(model);
    let dev = device()?;
    let dirs: Vec<String> = checkpoint_dir
        .as_deref()
        .map(|d| {
            d.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    // Without adapters to merge, a quantized GGUF runs on its quantized weights; merging
    // needs the dequantized f32 weights.
    let load = if dirs.is_empty() && inference {
        llmtune_models::load_for_inference
    } else {
        llmtune_models::load_pretrained
    };
    let mut p = load(&name, compute_dtype(&dev), &dev)
        .with_context(|| format!("loading --model_name_or_path {name}"))?;
    if !dirs.is_empty() {
        let mut ck = llmtune_adapters::apply_checkpoints(&mut p.model, &dirs, false, false)
            .context("--checkpoint_dir")?;
        ck.lora.merge_all(&mut p.model)?;
        eprintln!("merged {} adapter(s): {}", dirs.len(), dirs.join(", "));
    }
    Ok((p, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bools_like_hf() {
        for t in ["true", "True", "1", "yes"] {
            assert_eq!(parse_bool(t), Ok(true));
        }
        for f in ["false", "False", "0", "no"] {
            assert_eq!(parse_bool(f), Ok(false));
        }
        assert!(parse_bool("maybe").unwrap_err().contains("not a boolean"));
    }
}
