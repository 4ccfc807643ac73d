//! Typed model configs, read from Hugging Face `config.json` (or built from GGUF metadata).

use std::path::Path;

use serde::Deserialize;

use crate::{ModelError, Result};

/// Rope scaling (`rope_scaling` / transformers 5 `rope_parameters`). Only `llama3` and
/// `linear` change the frequencies; `default` is none.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeScaling {
    /// `rope_type` (or the older `type`): `default`, `linear`, `llama3`.
    #[serde(alias = "type", default = "default_rope_type")]
    pub rope_type: String,
    /// Linear / llama3 scaling factor.
    #[serde(default = "one")]
    pub factor: f64,
    /// llama3: low-frequency factor (default 1.0).
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    /// llama3: high-frequency factor (default 4.0).
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    /// llama3: the context length the model was pre-trained with (default 8192).
    #[serde(default = "ctx8k")]
    pub original_max_position_embeddings: usize,
    /// transformers 5 stores `rope_theta` inside `rope_parameters`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

fn default_rope_type() -> String {
    "default".into()
}
fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}
fn ctx8k() -> usize {
    8192
}

/// Config of a Llama-family model (Llama 2/3, Qwen2/2.5, Mistral, SmolLM2).
///
/// Defaults follow transformers' `LlamaConfig` where `config.json` omits a field.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `llama`, `qwen2`, `mistral` (SmolLM2 is `llama`).
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no GQA).
    pub num_key_value_heads: usize,
    /// Defaults to `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    /// Default 1e-6.
    pub rms_norm_eps: f64,
    /// Default 10000.
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// Default 2048.
    pub max_position_embeddings: usize,
    /// Whether the output projection is the embedding matrix (default false).
    pub tie_word_embeddings: bool,
    /// q/k/v projections have a bias (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj has a bias (Llama `attention_bias`).
    pub o_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RopeScaling>,
    rope_parameters: Option<RopeScaling>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    pad_token_id: Option<serde_json::Value>,
    hidden_act: Option<String>,
}

fn ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

impl LlamaConfig {
    /// Reads a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            ModelError::Config { msg, .. } => ModelError::Config {
                path: path.to_path_buf(),
                msg,
            },
            other => other,
        })
    }

    /// The HF `config.json` of this config (what transformers needs to rebuild the model),
    /// with `torch_dtype` set to `dtype` (`float32`, `bfloat16`, `float16`).
    pub fn to_hf_json(&self, dtype: &str) -> serde_json::Value {
        let arch = match self.model_type.as_str() {
            "qwen2" => "Qwen2ForCausalLM",
            "mistral" => "MistralForCausalLM",
            _ => "LlamaForCausalLM",
        };
        let mut v = serde_json::json!({
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": dtype,
        });
        let o = v.as_object_mut().expect("an object");
        if self.model_type == "llama" {
            o.insert("attention_bias".into(), self.qkv_bias.into());
            o.insert("mlp_bias".into(), false.into());
        }
        if let Some(r) = &self.rope_scaling {
            o.insert(
                "rope_scaling".into(),
                serde_json::json!({
                    "rope_type": r.rope_type,
                    "factor": r.factor,
                    "low_freq_factor": r.low_freq_factor,
                    "high_freq_factor": r.high_freq_factor,
                    "original_max_position_embeddings": r.original_max_position_embeddings,
                }),
            );
        }
        if let Some(b) = self.bos_token_id {
            o.insert("bos_token_id".into(), b.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [e] => {
                o.insert("eos_token_id".into(), (*e).into());
            }
            many => {
                o.insert("eos_token_id".into(), many.to_vec().into());
            }
        }
        if let Some(p) = self.pad_token_id {
            o.insert("pad_token_id".into(), p.into());
        }
        v
    }

    /// Parses the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg_err = |msg: String| ModelError::Config {
            path: "config.json".into(),
            msg,
        };
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| cfg_err(e.to_string()))?;
        let model_type = raw.model_type.unwrap_or_else(|| "llama".into());
        match model_type.as_str() {
            "llama" | "qwen2" | "mistral" => {}
            other => {
                return Err(cfg_err(format!(
                    "model_type {other:?} is not a Llama-family model (llama, qwen2, mistral)"
                )))
            }
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(cfg_err(format!(
                    "hidden_act {act:?} is not supported (silu)"
                )));
            }
        }
        if raw.num_attention_heads == 0
            || raw.hidden_size % raw.num_attention_heads != 0 && raw.head_dim.is_none()
        {
            return Err(cfg_err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                raw.hidden_size, raw.num_attention_heads
            )));
        }
        let kv = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if kv == 0 || raw.num_attention_heads % kv != 0 {
            return Err(cfg_err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                raw.num_attention_heads
            )));
        }
        let scaling = raw.rope_scaling.or(raw.rope_parameters);
        let rope_theta = raw
            .rope_theta
            .or_else(|| scaling.as_ref().and_then(|s| s.rope_theta))
            .unwrap_or(10000.0);
        let scaling = scaling.filter(|s| s.rope_type != "default");
        if let Some(s) = &scaling {
            if !matches!(s.rope_type.as_str(), "linear" | "llama3") {
                return Err(cfg_err(format!(
                    "rope scaling type {:?} is not supported (default, linear, llama3)",
                    s.rope_type
                )));
            }
        }
        let qkv_bias = model_type == "qwen2" || raw.attention_bias.unwrap_or(false);
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: kv,
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling: scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            o_bias: model_type != "qwen2" && raw.attention_bias.unwrap_or(false),
            qkv_bias,
            bos_token_id: ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: ids(&raw.eos_token_id),
            pad_token_id: ids(&raw.pad_token_id).first().copied(),
            model_type,
        })
    }

    /// Rotary inverse frequencies (`head_dim / 2` values), with rope scaling applied.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let mut f: Vec<f64> = (0..d / 2)
            .map(|j| 1.0 / self.rope_theta.powf(2.0 * j as f64 / d as f64))
            .collect();
        if let Some(s) = &self.rope_scaling {
            match s.rope_type.as_str() {
                "linear" => f.iter_mut().for_each(|x| *x /= s.factor),
                "llama3" => {
                    let old = s.original_max_position_embeddings as f64;
                    let low_wl = old / s.low_freq_factor;
                    let high_wl = old / s.high_freq_factor;
                    for x in f.iter_mut() {
                        let wl = 2.0 * std::f64::consts::PI / *x;
                        if wl > low_wl {
                            *x /= s.factor;
                        } else if wl >= high_wl {
                            let smooth = (old / wl - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            *x = (1.0 - smooth) * *x / s.factor + smooth * *x;
                        }
                    }
                }
                _ => {}
            }
        }
        f.into_iter().map(|x| x as f32).collect()
    }

    /// Number of parameters (for FLOP estimates).
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let per_layer = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size + 2 * h;
        let emb = self.vocab_size * h;
        emb * if self.tie_word_embeddings { 1 } else { 2 } + per_layer * self.num_hidden_layers + h
    }
}
