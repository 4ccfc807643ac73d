//! ChatGLM2-6B and ChatGLM3-6B ("v2"; same architecture), as THUDM's `modeling_chatglm.py`.
//!
//! Read top to bottom: the config, the rotary table, attention, MLP, the block and the model.
//!
//! Conventions (batch-first here; the original runs `[t, b, h]`):
//! * pre-norm blocks with RMSNorm (weight only, f32 statistics):
//!   `h = x + Attn(RMS1(x))`, `out = h + MLP(RMS2(h))`; a final RMSNorm; untied, bias-free
//!   `output_layer`.
//! * multi-query attention: one biased `query_key_value` whose output is
//!   `[q: heads·d | k: groups·d | v: groups·d]` (contiguous blocks); query head `h` uses KV
//!   group `h / (heads / groups)`.
//! * rotary on the first `d/2` dims of each head as interleaved pairs `(x[2i], x[2i+1])`,
//!   `d/4` frequencies with base 10000; the other half passes through. Scores `q·k/sqrt(d)`.
//! * MLP: `dense_4h_to_h(silu(a) · b)` with `[a | b] = dense_h_to_4h(x)`, no biases.
//! * Masks: causal; with a 2-D padding mask, padding columns are masked and (without a cache)
//!   padding query rows attend everything, as the original's `get_masks`. Position ids
//!   default to `0, 1, 2, ...` over the whole (padded) row, as the original derives them.

use candle_core::{DType, Device, Module, Tensor, D};
use serde::Deserialize;

use crate::chatglm::{
    additive_mask, checked_config, checked_config_str, cos_sin, read_config, HiddenStates,
};
use crate::kv_cache::KvCache;
use crate::llama::{Linear, RmsNorm};
use crate::loader::WeightSource;
use crate::{ModelError, Result};

// ---------------------------------------------------------------------------------------
// Config.

/// Config of ChatGLM2-6B / ChatGLM3-6B. Defaults are those of the original
/// `configuration_chatglm.py` where `config.json` omits a field. Only the settings of the
/// released models are supported (RMSNorm, pre-norm residuals, final norm, multi-query
/// attention, no linear biases besides `query_key_value`); others are refused.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatGlm2Config {
    /// `num_layers` (default 28).
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    /// `padded_vocab_size` (default 65024).
    #[serde(default = "d_vocab")]
    pub padded_vocab_size: usize,
    /// `hidden_size` (default 4096).
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// `ffn_hidden_size`: the width of each SwiGLU half (default 13696).
    #[serde(default = "d_ffn")]
    pub ffn_hidden_size: usize,
    /// `kv_channels`: the head dim (default 128).
    #[serde(default = "d_kv_channels")]
    pub kv_channels: usize,
    /// `num_attention_heads` (default 32).
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// `seq_length`: the length of the original's rotary table (default 2048).
    #[serde(default = "d_seq")]
    pub seq_length: usize,
    /// `layernorm_epsilon` (default 1e-5).
    #[serde(default = "d_eps")]
    pub layernorm_epsilon: f64,
    /// `rmsnorm` (default true; only true is supported).
    #[serde(default = "d_true")]
    pub rmsnorm: bool,
    /// `apply_residual_connection_post_layernorm` (default false; only false is supported).
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
    /// `post_layer_norm` (default true; only true is supported).
    #[serde(default = "d_true")]
    pub post_layer_norm: bool,
    /// `add_bias_linear` (default false; only false is supported).
    #[serde(default)]
    pub add_bias_linear: bool,
    /// `add_qkv_bias` (default false; true in the released models).
    #[serde(default)]
    pub add_qkv_bias: bool,
    /// `multi_query_attention` (default false in the config class, true in the released
    /// models; only true is supported).
    #[serde(default)]
    pub multi_query_attention: bool,
    /// `multi_query_group_num`: the number of KV groups (default 1).
    #[serde(default = "d_groups")]
    pub multi_query_group_num: usize,
    /// `eos_token_id` (a number or a list; default none).
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    /// `pad_token_id` (default none).
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// `quantization_bit` (default 0; quantized checkpoints are not supported).
    #[serde(default)]
    pub quantization_bit: u32,
    /// `pre_seq_len` (P-tuning v2 prefix; not supported).
    #[serde(default)]
    pub pre_seq_len: Option<usize>,
}

fn d_layers() -> usize {
    28
}
fn d_vocab() -> usize {
    65024
}
fn d_hidden() -> usize {
    4096
}
fn d_ffn() -> usize {
    13696
}
fn d_kv_channels() -> usize {
    128
}
fn d_heads() -> usize {
    32
}
fn d_seq() -> usize {
    2048
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_groups() -> usize {
    1
}

impl ChatGlm2Config {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        checked_config(path, read_config(path)?, Self::validate)
    }

    /// Parses the text of a `config.json` and checks it.
    pub fn from_json_str(text: &str) -> Result<Self> {
        checked_config_str(text, Self::validate)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let unsupported = |field: &str, value: bool| {
            format!(
                "{field} {value} is not supported (ChatGLM2-6B and ChatGLM3-6B use {})",
                !value
            )
        };
        if !self.rmsnorm {
            return Err(unsupported("rmsnorm", false));
        }
        if self.apply_residual_connection_post_layernorm {
            return Err(unsupported(
                "apply_residual_connection_post_layernorm",
                true,
            ));
        }
        if !self.post_layer_norm {
            return Err(unsupported("post_layer_norm", false));
        }
        if self.add_bias_linear {
            return Err(unsupported("add_bias_linear", true));
        }
        if !self.multi_query_attention {
            return Err(unsupported("multi_query_attention", false));
        }
        if self.quantization_bit != 0 {
            return Err(format!(
                "quantization_bit {} is not supported: load the float16 checkpoint",
                self.quantization_bit
            ));
        }
        if let Some(n) = self.pre_seq_len {
            return Err(format!(
                "pre_seq_len {n} (P-tuning v2) is not supported; remove it to load the base model"
            ));
        }
        let (h, g) = (self.num_attention_heads, self.multi_query_group_num);
        if h == 0 || g == 0 || h % g != 0 {
            return Err(format!(
                "num_attention_heads {h} must be a positive multiple of multi_query_group_num {g}"
            ));
        }
        if self.kv_channels == 0 || self.kv_channels % 4 != 0 {
            return Err(format!(
                "kv_channels {} must be a positive multiple of 4 (rotary on half of each head, \
                 in pairs)",
                self.kv_channels
            ));
        }
        if self.num_layers == 0 {
            return Err("num_layers must be at least 1".into());
        }
        Ok(())
    }

    /// End-of-sequence ids of the config (`eos_token_id`, a number or a list).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Width of the query part of `query_key_value` (`heads · kv_channels`).
    pub fn q_size(&self) -> usize {
        self.num_attention_heads * self.kv_channels
    }

    /// Width of `query_key_value`'s output (`(heads + 2·groups) · kv_channels`).
    pub fn qkv_size(&self) -> usize {
        (self.num_attention_heads + 2 * self.multi_query_group_num) * self.kv_channels
    }

    /// The rotary inverse frequencies: `kv_channels/4` values `1 / 10000^(2i / (kv_channels/2))`
    /// (the original computes them in f32 for an f32 model).
    pub fn inv_freq(&self) -> Vec<f32> {
        let n = self.kv_channels / 2;
        (0..n / 2)
            .map(|i| 1.0f32 / 10000f32.powf((2 * i) as f32 / n as f32))
            .collect()
    }

    /// Number of parameters (for FLOP estimates).
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let qkv = self.qkv_size();
        let per_layer = 2 * h
            + (h * qkv + qkv)
            + self.q_size() * h
            + h * 2 * self.ffn_hidden_size
            + self.ffn_hidden_size * h;
        2 * self.padded_vocab_size * h + per_layer * self.num_layers + h
    }
}

// ---------------------------------------------------------------------------------------
// Attention.

/// Multi-query self-attention with the fused `query_key_value`.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    pub query_key_value: Linear,
    pub dense: Linear,
    n_head: usize,
    n_groups: usize,
    head_dim: usize,
}

impl SelfAttention {
    /// Interleaved rotary on the first half of each head; `x` `[b, h, t, d]` (a view).
    fn rope_half(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = x.dim(3)?;
        let rot = d / 2;
        let r = llmtune_ops::rope_interleaved(&x.narrow(3, 0, rot)?, cos, sin)?;
        Ok(Tensor::cat(
            &[r, x.narrow(3, rot, d - rot)?.contiguous()?],
            3,
        )?)
    }

    /// `x`: `[b, t, hidden]`; `cos`/`sin`: `[b, t, d/4]`; `mask`: additive `[b, 1, t, past+t]`.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut (Option<Tensor>, Option<Tensor>)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, g, d) = (self.n_head, self.n_groups, self.head_dim);
        let qkv = self
            .query_key_value
            .forward(x)?
            .reshape((b, t, h + 2 * g, d))?;
        let q = qkv.narrow(2, 0, h)?.transpose(1, 2)?;
        let k = qkv.narrow(2, h, g)?.transpose(1, 2)?;
        let v = qkv.narrow(2, h + g, g)?.transpose(1, 2)?.contiguous()?;
        let q = Self::rope_half(&q, cos, sin)?;
        let mut k = Self::rope_half(&k, cos, sin)?;
        let mut v = v;
        if let Some(slot) = cache {
            if let (Some(pk), Some(pv)) = (&slot.0, &slot.1) {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            slot.0 = Some(k.clone());
            slot.1 = Some(v.clone());
        }
        let total = k.dim(2)?;
        let rep = h / g;
        // The query heads of one KV group are consecutive: [b, g, rep*t, d].
        let q = q.reshape((b, g, rep * t, d))?;
        let scores = llmtune_ops::matmul(&q, &k.t()?)?.reshape((b, h, t, total))?;
        let probs = llmtune_ops::masked_softmax(&scores, Some(mask), 1.0 / (d as f64).sqrt())?;
        let probs = probs.reshape((b, g, rep * t, total))?;
        let out = llmtune_ops::matmul(&probs, &v)?.reshape((b, h, t, d))?;
        let out = out.transpose(1, 2)?.reshape((b, t, h * d))?;
        Ok(self.dense.forward(&out)?)
    }
}

/// `dense_4h_to_h(silu(a) · b)` with `[a | b] = dense_h_to_4h(x)`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub dense_h_to_4h: Linear,
    pub dense_4h_to_h: Linear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.dense_h_to_4h.forward(x)?;
        let f = y.dim(D::Minus1)? / 2;
        let a = y.narrow(D::Minus1, 0, f)?;
        let b = y.narrow(D::Minus1, f, f)?;
        self.dense_4h_to_h.forward(&llmtune_ops::swiglu(&a, &b)?)
    }
}

/// One pre-norm block.
#[derive(Debug, Clone)]
pub struct GlmBlock {
    pub input_layernorm: RmsNorm,
    pub self_attention: SelfAttention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl GlmBlock {
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut (Option<Tensor>, Option<Tensor>)>,
    ) -> Result<Tensor> {
        let a = self.self_attention.forward(
            &self.input_layernorm.forward(x)?,
            cos,
            sin,
            mask,
            cache,
        )?;
        let h = (x + a)?;
        let m = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h)?)?;
        Ok((h + m)?)
    }
}

/// Rotary tables and the additive mask of one pass; lets callers run the blocks one at a
/// time (gradient checkpointing).
#[derive(Debug, Clone)]
pub struct LayerContext {
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Tensor,
}

impl LayerContext {
    /// Runs `layer` on `x` `[b, t, hidden]` without a cache.
    pub fn forward(&self, layer: &GlmBlock, x: &Tensor) -> Result<Tensor> {
        layer.forward(x, &self.cos, &self.sin, &self.mask, None)
    }
}

// ---------------------------------------------------------------------------------------
// The model.

/// ChatGLM2-6B / ChatGLM3-6B as a causal LM (`ChatGLMForConditionalGeneration`).
#[derive(Debug, Clone)]
pub struct ChatGlm2 {
    pub cfg: ChatGlm2Config,
    pub word_embeddings: Tensor,
    pub layers: Vec<GlmBlock>,
    pub final_layernorm: RmsNorm,
    pub output_layer: Linear,
    inv_freq: Vec<f32>,
    dtype: DType,
    device: Device,
}

impl ChatGlm2 {
    /// Builds the model from the original tensor names (`transformer.embedding...`,
    /// `transformer.encoder.layers.N...`, `transformer.output_layer.weight`), converting each
    /// tensor to `dtype` on `device` as it is read. `transformer.rotary_pos_emb.inv_freq` is
    /// ignored (the original recomputes the table).
    pub fn load(
        cfg: &ChatGlm2Config,
        src: &dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (hs, v) = (cfg.hidden_size, cfg.padded_vocab_size);
        let get = |name: &str, shape: &[usize]| src.require(name, shape, dtype, device);
        let lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let w = get(&format!("{name}.weight"), &[out, inp])?;
            let b = if bias {
                Some(get(&format!("{name}.bias"), &[out])?)
            } else {
                None
            };
            Ok(Linear::new(w, b))
        };
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: get(&format!("{name}.weight"), &[hs])?,
                eps: cfg.layernorm_epsilon,
            })
        };
        let word_embeddings = get("transformer.embedding.word_embeddings.weight", &[v, hs])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("transformer.encoder.layers.{i}");
            layers.push(GlmBlock {
                input_layernorm: norm(&format!("{p}.input_layernorm"))?,
                self_attention: SelfAttention {
                    query_key_value: lin(
                        &format!("{p}.self_attention.query_key_value"),
                        cfg.qkv_size(),
                        hs,
                        cfg.add_qkv_bias,
                    )?,
                    dense: lin(
                        &format!("{p}.self_attention.dense"),
                        hs,
                        cfg.q_size(),
                        false,
                    )?,
                    n_head: cfg.num_attention_heads,
                    n_groups: cfg.multi_query_group_num,
                    head_dim: cfg.kv_channels,
                },
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm"))?,
                mlp: Mlp {
                    dense_h_to_4h: lin(
                        &format!("{p}.mlp.dense_h_to_4h"),
                        2 * cfg.ffn_hidden_size,
                        hs,
                        false,
                    )?,
                    dense_4h_to_h: lin(
                        &format!("{p}.mlp.dense_4h_to_h"),
                        hs,
                        cfg.ffn_hidden_size,
                        false,
                    )?,
                },
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            word_embeddings,
            layers,
            final_layernorm: norm("transformer.encoder.final_layernorm")?,
            output_layer: lin("transformer.output_layer", v, hs, false)?,
            inv_freq: cfg.inv_freq(),
            dtype,
            device: device.clone(),
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A fresh, empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_layers)
    }

    /// cos/sin `[b, t, kv_channels/4]` of position ids `[b][t]`.
    pub fn cos_sin(&self, positions: &[Vec<i64>]) -> Result<(Tensor, Tensor)> {
        cos_sin(positions, &self.inv_freq, self.dtype, &self.device)
    }

    /// Rotary tables and mask for `t` new tokens after `past` cached ones.
    ///
    /// * `attention_mask`: 2-D padding mask `[b, past + t]` (`1` = token) or `None`.
    /// * `position_ids`: `[b][t]`, or `None` for `past, past + 1, ...` (the original's
    ///   default, which counts padding).
    pub fn layer_context(
        &self,
        b: usize,
        t: usize,
        past: usize,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&[Vec<i64>]>,
    ) -> Result<LayerContext> {
        let total = past + t;
        let padding: Option<Vec<Vec<i64>>> = match attention_mask {
            Some(m) => {
                if m.dims() != [b, total] {
                    return Err(ModelError::Input(format!(
                        "attention_mask must be [{b}, {total}] (cache {past} + new {t}), got {:?}",
                        m.dims()
                    )));
                }
                Some(m.to_dtype(DType::I64)?.to_vec2()?)
            }
            None => None,
        };
        let positions: Vec<Vec<i64>> = match position_ids {
            Some(p) => {
                if p.len() != b || p.iter().any(|r| r.len() != t) {
                    return Err(ModelError::Input(format!(
                        "position_ids must be [{b}][{t}]"
                    )));
                }
                p.to_vec()
            }
            None => vec![(past as i64..total as i64).collect(); b],
        };
        let (cos, sin) = self.cos_sin(&positions)?;
        let mask = additive_mask(b, t, total, self.dtype, &self.device, |bi, i, j| {
            let q = past + i;
            match &padding {
                None => j <= q,
                // A padding query row (no cache) attends everything, as the original.
                Some(p) if past == 0 && p[bi][q] == 0 => true,
                Some(p) => j <= q && p[bi][j] != 0,
            }
        })?;
        Ok(LayerContext { cos, sin, mask })
    }

    /// Token embeddings `[b, t, hidden]` of `input_ids` `[b, t]`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ids = input_ids
            .to_dtype(DType::U32)?
            .to_device(&self.device)?
            .flatten_all()?;
        Ok(self
            .word_embeddings
            .index_select(&ids, 0)?
            .reshape((b, t, self.cfg.hidden_size))?)
    }

    fn run(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&[Vec<i64>]>,
        mut cache: Option<&mut KvCache>,
        keep_all: bool,
    ) -> Result<HiddenStates> {
        let (b, t) = input_ids.dims2()?;
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let ctx = self.layer_context(b, t, past, attention_mask, position_ids)?;
        let mut x = self.embed(input_ids)?;
        let mut all = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            if keep_all {
                all.push(x.clone());
            }
            let slot = cache.as_mut().map(|c| c.layer_mut(i));
            x = layer.forward(&x, &ctx.cos, &ctx.sin, &ctx.mask, slot)?;
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        if keep_all {
            // As the original: the last element is the residual stream before the final norm.
            all.push(x.clone());
        }
        let last = self.final_layernorm.forward(&x)?;
        Ok(HiddenStates { all, last })
    }

    /// Runs the model and returns every hidden state (see [`HiddenStates`]; for this
    /// architecture the last element of `all` is taken *before* the final norm).
    ///
    /// * `input_ids`: `[b, t]`, the new tokens.
    /// * `attention_mask`: `[b, past + t]` with 1 for real tokens; `None` = all real.
    /// * `position_ids`: `[b][t]`; `None` = `past, past + 1, ...`.
    /// * `cache`: appended to when given.
    pub fn forward_hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&[Vec<i64>]>,
        cache: Option<&mut KvCache>,
    ) -> Result<HiddenStates> {
        self.run(input_ids, attention_mask, position_ids, cache, true)
    }

    /// The output layer's weight when it is a plain linear (see [`Linear::plain_weight`]).
    pub fn plain_lm_head(&self) -> Option<&Tensor> {
        self.output_layer.plain_weight()
    }

    /// Logits `[.., vocab]` from final hidden states `[.., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.output_layer.forward(hidden)?)
    }

    /// Full forward: `(logits [b, t, vocab], hidden after the final norm [b, t, hidden])`;
    /// arguments as [`ChatGlm2::forward_hidden_states`].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&[Vec<i64>]>,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, Tensor)> {
        let h = self.run(input_ids, attention_mask, position_ids, cache, false)?;
        Ok((self.logits(&h.last)?, h.last))
    }

    /// Logits of the last position only `[b, vocab]` in f32 (generation).
    pub fn forward_last(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self
            .run(input_ids, attention_mask, None, cache, false)?
            .last;
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        Ok(self.logits(&last)?.to_dtype(DType::F32)?)
    }

    /// Every linear layer by its original module name (e.g.
    /// `transformer.encoder.layers.0.self_attention.query_key_value`), for adapters.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("transformer.encoder.layers.{i}");
            let a = &mut l.self_attention;
            out.push((
                format!("{p}.self_attention.query_key_value"),
                &mut a.query_key_value,
            ));
            out.push((format!("{p}.self_attention.dense"), &mut a.dense));
            out.push((format!("{p}.mlp.dense_h_to_4h"), &mut l.mlp.dense_h_to_4h));
            out.push((format!("{p}.mlp.dense_4h_to_h"), &mut l.mlp.dense_4h_to_h));
        }
        out.push(("transformer.output_layer".into(), &mut self.output_layer));
        out
    }

    /// Every parameter tensor by its original name (freeze/full tuning, merging, export).
    pub fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out: Vec<(String, &mut Tensor)> = vec![(
            "transformer.embedding.word_embeddings.weight".into(),
            &mut self.word_embeddings,
        )];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("transformer.encoder.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                &mut l.input_layernorm.weight,
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                &mut l.post_attention_layernorm.weight,
            ));
            for (n, lin) in [
                (
                    "self_attention.query_key_value",
                    &mut l.self_attention.query_key_value,
                ),
                ("self_attention.dense", &mut l.self_attention.dense),
                ("mlp.dense_h_to_4h", &mut l.mlp.dense_h_to_4h),
                ("mlp.dense_4h_to_h", &mut l.mlp.dense_4h_to_h),
            ] {
                out.push((format!("{p}.{n}.weight"), &mut lin.weight));
                if let Some(b) = lin.bias.as_mut() {
                    out.push((format!("{p}.{n}.bias"), b));
                }
            }
        }
        out.push((
            "transformer.encoder.final_layernorm.weight".into(),
            &mut self.final_layernorm.weight,
        ));
        out.push((
            "transformer.output_layer.weight".into(),
            &mut self.output_layer.weight,
        ));
        out
    }
}
