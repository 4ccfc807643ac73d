//! Model architectures and weights for llmtune.
//!
//! * [`config`]: typed mirrors of HF `config.json`.
//! * [`llama`]: the Llama family (Llama 2/3, Qwen2/2.5, Mistral, SmolLM2).
//! * [`chatglm`]: ChatGLM-6B (2-D positions, DeepNorm, prefix attention).
//! * [`chatglm2`]: ChatGLM2-6B and ChatGLM3-6B (multi-query attention, RMSNorm).
//! * [`loader`]: safetensors (single/sharded), PyTorch `.bin` (single/sharded), in-memory.
//! * [`gguf`]: GGUF files (dequantized to f32, tokenizer from metadata).
//! * [`gguf_write`]: writing a Llama-family model as an F16/Q8_0 GGUF for llama.cpp.
//! * [`hub`]: built-in aliases such as `smollm2-135m` and their local cache.
//! * [`kv_cache`]: the cache for incremental decoding.
//!
//! [`load_pretrained`] resolves a `--model_name_or_path` value (folder, `.gguf` file or alias)
//! into a model and its tokenizer.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

pub mod causal;
pub mod chatglm;
pub mod chatglm2;
pub mod config;
pub mod decode;
pub mod gguf;
pub mod gguf_write;
pub mod hub;
pub mod kv_cache;
pub mod llama;
pub mod loader;

pub use causal::{CausalLm, LayerCtx};
pub use chatglm::{ChatGlm, ChatGlmConfig};
pub use chatglm2::{ChatGlm2, ChatGlm2Config};
pub use config::LlamaConfig;
pub use decode::DecodeEngine;
pub use kv_cache::KvCache;
pub use llama::{Linear, LinearAdapter, Llama};
pub use llmtune_tokenize::Tokenizer;

/// Errors of model loading and running. Each names the file and tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid model config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Weights { path: PathBuf, msg: String },
    #[error("{path}: tensor {name} is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{0}")]
    Model(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error(transparent)]
    Tokenizer(#[from] llmtune_tokenize::TokenizerError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// What was loaded, for choosing defaults (template) and for messages.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// `llama`, `qwen2`, `mistral`, `chatglm` (`config.json`'s `model_type`).
    pub model_type: String,
    /// The folder or file the weights came from.
    pub path: PathBuf,
    /// Whether it came from a GGUF file.
    pub from_gguf: bool,
    /// The built-in alias used, if any (e.g. `smollm2-135m`).
    pub alias: Option<String>,
}

/// A loaded model with its tokenizer.
pub struct Pretrained {
    pub model: CausalLm,
    pub tokenizer: Tokenizer,
    pub info: ModelInfo,
}

/// Loads only the tokenizer (and the model type) of a HF folder, `.gguf` file or alias.
pub fn load_tokenizer(name_or_path: &str) -> Result<(Tokenizer, String)> {
    let (path, _) = hub::resolve(name_or_path)?;
    if path.is_file() {
        let (arch, vocab) = gguf::read_gguf_vocab(&path)?;
        let tok = llmtune_tokenize::gguf::tokenizer_from_gguf(&vocab, path.clone())?;
        return Ok((tok, arch));
    }
    if !path.is_dir() {
        return Err(ModelError::Model(format!(
            "--model_name_or_path {name_or_path}: no such folder or file, and not a built-in \
             alias (known: {})",
            hub::ALIASES
                .iter()
                .map(|a| a.name)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let cfg: serde_json::Value = {
        let p = path.join("config.json");
        let text = std::fs::read_to_string(&p).map_err(|e| ModelError::io(&p, e))?;
        serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: p.clone(),
            msg: e.to_string(),
        })?
    };
    let model_type = cfg
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("llama")
        .to_string();
    Ok((Tokenizer::from_dir(&path)?, model_type))
}

/// Loads a model from a HF folder, a `.gguf` file, or a built-in alias.
pub fn load_pretrained(name_or_path: &str, dtype: DType, device: &Device) -> Result<Pretrained> {
    load_with(name_or_path, dtype, device, false, None)
}

/// Why `--quantization_bit` refuses a ChatGLM model.
pub const QUANTIZED_BASE_LLAMA_ONLY: &str = "--quantization_bit supports Llama-family models \
     (llama, qwen2, mistral, smollm2) only for now, not ChatGLM";

/// As [`load_pretrained`], with the decoder layers' linear weights quantized to `bits` (4:
/// `Q4_1`, 8: `Q8_0`) for LoRA on a quantized base (`--quantization_bit`): from a HF folder
/// each matrix is quantized as it is read, so the float base is never held whole; a `.gguf`
/// is read whole in f32 first (its loader dequantizes eagerly), then quantized. CPU,
/// Llama-family models.
pub fn load_pretrained_quantized(
    name_or_path: &str,
    dtype: DType,
    device: &Device,
    bits: u32,
) -> Result<Pretrained> {
    load_with(name_or_path, dtype, device, false, Some(bits))
}

/// Whether `LLMTUNE_GGUF_F32` (any value but `0` or empty) asks for the dequantized f32 path
/// even where [`load_for_inference`] would keep GGUF weights quantized.
pub fn gguf_f32_forced() -> bool {
    std::env::var("LLMTUNE_GGUF_F32").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// As [`load_pretrained`], for inference only (generation, chat, the API server, benches):
/// a `.gguf` model on the CPU in f32 keeps its `Q4_1`/`Q8_0` linear layers and LM head
/// quantized and runs them with [`llmtune_ops::quant`] kernels (weights are never
/// dequantized). Such a model cannot be trained or have adapters merged into it. Other
/// models, other devices or dtypes, and `LLMTUNE_GGUF_F32=1` load as [`load_pretrained`].
pub fn load_for_inference(name_or_path: &str, dtype: DType, device: &Device) -> Result<Pretrained> {
    let quantized = device.is_cpu() && dtype == DType::F32 && !gguf_f32_forced();
    load_with(name_or_path, dtype, device, quantized, None)
}

fn load_with(
    name_or_path: &str,
    dtype: DType,
    device: &Device,
    quantized: bool,
    base_bits: Option<u32>,
) -> Result<Pretrained> {
    let (path, alias) = hub::resolve(name_or_path)?;
    if path.is_file() {
        let is_gguf = path.extension().map(|e| e == "gguf").unwrap_or(false);
        if !is_gguf {
            return Err(ModelError::Model(format!(
                "{}: a model file must be a .gguf; otherwise pass the model folder",
                path.display()
            )));
        }
        let g = match base_bits {
            // Kept or quantized tensor by tensor: the float base is never held whole.
            Some(bits) => gguf::load_gguf_base(&path, bits)?,
            None if quantized => gguf::load_gguf_quantized(&path)?,
            None => gguf::load_gguf(&path, device)?,
        };
        let tokenizer = llmtune_tokenize::gguf::tokenizer_from_gguf(&g.vocab, path.clone())?;
        let mut llama = Llama::load(&g.config, &g.weights, dtype, device)?;
        drop(g.weights);
        let n = llama.attach_quantized(&g.quant)?;
        if n > 0 {
            tracing::info!("{}: {n} matrices run quantized", path.display());
        }
        let model = llama.into();
        return Ok(Pretrained {
            info: ModelInfo {
                model_type: g.config.model_type.clone(),
                path,
                from_gguf: true,
                alias,
            },
            model,
            tokenizer,
        });
    }
    if !path.is_dir() {
        return Err(ModelError::Model(format!(
            "--model_name_or_path {name_or_path}: no such folder or file, and not a built-in \
             alias (known: {})",
            hub::ALIASES
                .iter()
                .map(|a| a.name)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let cfg_path = path.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: cfg_path.clone(),
        msg: e.to_string(),
    })?;
    // The config is checked before the weights are looked for.
    let (model, model_type): (CausalLm, String) = match chatglm_version(&raw) {
        Some(_) if base_bits.is_some() => {
            return Err(ModelError::Input(QUANTIZED_BASE_LLAMA_ONLY.into()))
        }
        Some(1) => {
            let cfg = ChatGlmConfig::from_file(&cfg_path)?;
            let src = loader::open_dir(&path)?;
            (
                ChatGlm::load(&cfg, src.as_ref(), dtype, device)?.into(),
                "chatglm".into(),
            )
        }
        Some(_) => {
            let cfg = ChatGlm2Config::from_file(&cfg_path)?;
            let src = loader::open_dir(&path)?;
            (
                ChatGlm2::load(&cfg, src.as_ref(), dtype, device)?.into(),
                "chatglm".into(),
            )
        }
        None => {
            let cfg = LlamaConfig::from_file(&cfg_path)?;
            let src = loader::open_dir(&path)?;
            (
                Llama::load_quantized(&cfg, src.as_ref(), dtype, device, base_bits)?.into(),
                cfg.model_type.clone(),
            )
        }
    };
    let tokenizer = Tokenizer::from_dir(&path)?;
    Ok(Pretrained {
        info: ModelInfo {
            model_type,
            path,
            from_gguf: false,
            alias,
        },
        model,
        tokenizer,
    })
}

/// The ChatGLM version of a parsed `config.json`: `Some(1)` for ChatGLM-6B (it has
/// `position_encoding_2d`), `Some(2)` for ChatGLM2/3 (`multi_query_attention` or
/// `padded_vocab_size`; ChatGLM3 has the same architecture), `None` when `model_type` is not
/// `chatglm`.
pub fn chatglm_version(config: &serde_json::Value) -> Option<u32> {
    let mt = config.get("model_type").and_then(|v| v.as_str())?;
    if !mt.eq_ignore_ascii_case("chatglm") {
        return None;
    }
    let has = |k: &str| config.get(k).is_some();
    if has("multi_query_attention") || has("padded_vocab_size") || has("kv_channels") {
        Some(2)
    } else {
        Some(1)
    }
}

#[cfg(test)]
mod tests {
    use super::chatglm_version;
    use serde_json::json;

    #[test]
    fn chatglm_versions_from_config() {
        let v1 =
            json!({"model_type": "chatglm", "position_encoding_2d": true, "vocab_size": 130528});
        let v2 = json!({"model_type": "chatglm", "multi_query_attention": true, "padded_vocab_size": 65024});
        let v2_min = json!({"model_type": "chatglm", "padded_vocab_size": 65024});
        assert_eq!(chatglm_version(&v1), Some(1));
        assert_eq!(chatglm_version(&v2), Some(2));
        assert_eq!(chatglm_version(&v2_min), Some(2));
        assert_eq!(chatglm_version(&json!({"model_type": "llama"})), None);
        assert_eq!(chatglm_version(&json!({"hidden_size": 8})), None);
    }
}
