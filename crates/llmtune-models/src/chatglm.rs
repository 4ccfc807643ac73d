//! ChatGLM-6B (the first version; "v1"), as THUDM's `modeling_chatglm.py`.
//!
//! Read top to bottom: the config, where each row's parts are ([`RowLayout`]: the prefix
//! that attends both ways, the `[gMASK]` position, the 2-D positions), the rotary table, the
//! LayerNorm, attention, MLP, the block and the model.
//!
//! Conventions (all batch-first here; the original runs `[t, b, h]`):
//! * `a = LN1(x)`, `h = a·α + Attn(a)`, `m = LN2(h)`, `out = m·α + MLP(m)` with the DeepNorm
//!   factor `α = sqrt(2·28)` (a constant, see [`ChatGlmConfig::alpha`]): the residual is the
//!   *normalised* input.
//! * `query_key_value` is one biased linear layer whose output is viewed
//!   `[.., heads, 3·head_dim]`: per head, `q | k | v` (interleaved per head).
//! * 2-D rotary: q and k are split in two halves of `head_dim/2`; the first is rotated by the
//!   position ids, the second by the block position ids; each half rotates its own halves
//!   (`rotate_half`, NeoX layout) with `head_dim/4` frequencies that the original rounds to
//!   fp16.
//! * Attention scores `q·k / sqrt(head_dim)` (the `layer_id + 1` scaling of the original
//!   cancels), masked entries dropped (the original fills -10000·(layer_id+1)), softmax.
//! * MLP: `dense_4h_to_h(gelu_tanh(dense_h_to_4h(x)))`, both with biases.
//! * Final LayerNorm, then an untied, bias-free `lm_head`.
//!
//! Masks and positions ([`RowLayout`]): a row is `[pads] source [gMASK] <sop> target`; every
//! token attends the whole prefix before `<sop>` (bidirectionally) and, from `<sop>` on,
//! causally; left padding is never attended. Position ids count from the first real token and
//! stay at the `[gMASK]` position from `<sop>` on; block position ids are 0 before `<sop>`
//! and 1, 2, ... from it. Generation continues the same rule (the original's
//! `[mask_position, seq_len - context_length]` for each new token).

use candle_core::{DType, Device, Module, Tensor, D};
use serde::Deserialize;

use crate::kv_cache::KvCache;
use crate::llama::Linear;
use crate::loader::WeightSource;
use crate::{ModelError, Result};

// ---------------------------------------------------------------------------------------
// Config.

/// Config of ChatGLM-6B (`config.json` with `position_encoding_2d`).
///
/// Defaults are those of the original `configuration_chatglm.py` where `config.json` omits
/// a field, except the special ids, whose defaults are the released ChatGLM-6B's
/// (`[MASK]` 130000, `[gMASK]` 130001, `<sop>` 130004, `<eop>` 130005, pad 3).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatGlmConfig {
    /// `vocab_size` (default 150528).
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// `hidden_size` (default 4096).
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// `num_layers` (default 28).
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    /// `num_attention_heads` (default 32).
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// `inner_hidden_size`, the MLP width (default 16384).
    #[serde(default = "d_inner")]
    pub inner_hidden_size: usize,
    /// `layernorm_epsilon` (default 1e-5).
    #[serde(default = "d_eps")]
    pub layernorm_epsilon: f64,
    /// `max_sequence_length` (default 2048); informational (the rotary table has no limit).
    #[serde(default = "d_max_seq")]
    pub max_sequence_length: usize,
    /// `position_encoding_2d` (default true; only true is supported).
    #[serde(default = "d_true")]
    pub position_encoding_2d: bool,
    /// `bos_token_id`: `<sop>`, where the causal part starts (default 130004).
    #[serde(default = "d_bos")]
    pub bos_token_id: u32,
    /// `eos_token_id`: `<eop>`, the end of a reply (default 130005).
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
    /// `mask_token_id`: `[MASK]` (default 130000).
    #[serde(default = "d_mask")]
    pub mask_token_id: u32,
    /// `gmask_token_id`: `[gMASK]` (default 130001).
    #[serde(default = "d_gmask")]
    pub gmask_token_id: u32,
    /// `pad_token_id` (default 3).
    #[serde(default = "d_pad")]
    pub pad_token_id: u32,
    /// `quantization_bit` (default 0; quantized checkpoints are not supported).
    #[serde(default)]
    pub quantization_bit: u32,
    /// `pre_seq_len` (P-tuning v2 prefix; not supported).
    #[serde(default)]
    pub pre_seq_len: Option<usize>,
}

fn d_vocab() -> usize {
    150528
}
fn d_hidden() -> usize {
    4096
}
fn d_layers() -> usize {
    28
}
fn d_heads() -> usize {
    32
}
fn d_inner() -> usize {
    16384
}
fn d_eps() -> f64 {
    1e-5
}
fn d_max_seq() -> usize {
    2048
}
fn d_true() -> bool {
    true
}
fn d_bos() -> u32 {
    130004
}
fn d_eos() -> u32 {
    130005
}
fn d_mask() -> u32 {
    130000
}
fn d_gmask() -> u32 {
    130001
}
fn d_pad() -> u32 {
    3
}

/// Reads a `config.json` of a ChatGLM model into `T`, with errors naming the file.
pub(crate) fn read_config<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// `cfg` read from `path`, once `validate` accepts it; its message names the file.
pub(crate) fn checked_config<T>(
    path: &std::path::Path,
    cfg: T,
    validate: fn(&T) -> std::result::Result<(), String>,
) -> Result<T> {
    validate(&cfg).map_err(|msg| ModelError::Config {
        path: path.to_path_buf(),
        msg,
    })?;
    Ok(cfg)
}

/// The config parsed from the text of a `config.json`, once `validate` accepts it.
pub(crate) fn checked_config_str<T: serde::de::DeserializeOwned>(
    text: &str,
    validate: fn(&T) -> std::result::Result<(), String>,
) -> Result<T> {
    let path = std::path::Path::new("config.json");
    let cfg: T = serde_json::from_str(text).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    checked_config(path, cfg, validate)
}

impl ChatGlmConfig {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        checked_config(path, read_config(path)?, Self::validate)
    }

    /// Parses the text of a `config.json` and checks it.
    pub fn from_json_str(text: &str) -> Result<Self> {
        checked_config_str(text, Self::validate)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if !self.position_encoding_2d {
            return Err(
                "position_encoding_2d false is not supported (ChatGLM-6B uses 2-D \
                        positions)"
                    .into(),
            );
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
        let h = self.num_attention_heads;
        if h == 0 || self.hidden_size % h != 0 || (self.hidden_size / h) % 4 != 0 {
            return Err(format!(
                "hidden_size {} must be num_attention_heads {h} times a multiple of 4 (2-D \
                 rotary splits each head in quarters)",
                self.hidden_size
            ));
        }
        if self.num_layers == 0 {
            return Err("num_layers must be at least 1".into());
        }
        Ok(())
    }

    /// `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The rotary inverse frequencies the original uses: `head_dim/4` values
    /// `1 / 10000^(2i / (head_dim/2))`, rounded to fp16 (`inv_freq.half()`).
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim() / 2;
        (0..dim / 2)
            .map(|i| {
                // torch: 1 / (base ** (arange(0, dim, 2).float() / dim)) in f32.
                let e = (2 * i) as f32 / dim as f32;
                let f = 1.0f32 / 10000f32.powf(e);
                half::f16::from_f32(f).to_f32()
            })
            .collect()
    }

    /// The DeepNorm residual factor: `sqrt(2·28)` whatever `num_layers` is. The original
    /// computes `(2 * self.num_layers) ** 0.5` in `GLMBlock`, but `ChatGLMModel` never passes
    /// `num_layers` to the blocks, so the default 28 always applies (the same value for the
    /// released 28-layer model; the fixtures' 2-layer model confirms the constant).
    pub fn alpha(&self) -> f64 {
        (2.0f64 * 28.0).sqrt()
    }

    /// Number of parameters (for FLOP estimates).
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let i = self.inner_hidden_size;
        let per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h);
        2 * self.vocab_size * h + per_layer * self.num_layers + 2 * h
    }
}

// ---------------------------------------------------------------------------------------
// Where a row's parts are: masks and 2-D positions.

/// The layout of one row: `[pad] source [gMASK] <sop> target`, as absolute indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowLayout {
    /// Number of left-padding tokens (0 when the row has none, or when padding is treated as
    /// part of the prefix, which is what the original model does on its own).
    pub pad: usize,
    /// Index of the first `<sop>` (`bos_token_id`): the prefix before it attends both ways.
    pub context: usize,
    /// Index of the first `[gMASK]`, or of the first `[MASK]` when the row has no `[gMASK]`.
    pub mask_position: usize,
}

impl RowLayout {
    /// Finds `<sop>` and the mask token in `ids` (a whole row, padding included); `pad` is the
    /// number of left-padding tokens. `row` names the row in messages.
    pub fn from_ids(ids: &[u32], pad: usize, cfg: &ChatGlmConfig, row: usize) -> Result<Self> {
        let context = ids
            .iter()
            .position(|&x| x == cfg.bos_token_id)
            .ok_or_else(|| {
                ModelError::Input(format!(
                    "ChatGLM-6B row {row} has no <sop> token (bos_token_id {}): every row must \
                     be `source [gMASK] <sop> ...`",
                    cfg.bos_token_id
                ))
            })?;
        let mask_position = ids
            .iter()
            .position(|&x| x == cfg.gmask_token_id)
            .or_else(|| ids.iter().position(|&x| x == cfg.mask_token_id))
            .ok_or_else(|| {
                ModelError::Input(format!(
                    "ChatGLM-6B row {row} has no [gMASK] ({}) or [MASK] ({}) token",
                    cfg.gmask_token_id, cfg.mask_token_id
                ))
            })?;
        if pad > context || pad > mask_position {
            return Err(ModelError::Input(format!(
                "ChatGLM-6B row {row}: {pad} padding tokens, but <sop> is at {context} and the \
                 mask token at {mask_position}"
            )));
        }
        Ok(Self {
            pad,
            context,
            mask_position,
        })
    }

    /// Position id of absolute index `a`: 0 on padding, counting from the first real token,
    /// and the mask token's position from `<sop>` on.
    pub fn position(&self, a: usize) -> i64 {
        if a < self.pad {
            0
        } else if a < self.context {
            (a - self.pad) as i64
        } else {
            (self.mask_position - self.pad) as i64
        }
    }

    /// Block position id of absolute index `a`: 0 before `<sop>`, then 1, 2, ...
    pub fn block_position(&self, a: usize) -> i64 {
        if a < self.context {
            0
        } else {
            (a - self.context + 1) as i64
        }
    }

    /// Whether the token at `query` attends the one at `key`: never padding; the prefix
    /// before `<sop>` always; everything else causally.
    pub fn attends(&self, query: usize, key: usize) -> bool {
        key >= self.pad && (key < self.context || key <= query)
    }
}

/// The number of leading zeros of each row of a 2-D padding mask (`1` = token), checking
/// that the padding is on the left only, or, with `trailing_ok`, also after the row's last
/// token (a full pass without a cache: causal attention never reaches those positions from a
/// real token, so they change no real token's output).
fn left_padding(mask: &Tensor, b: usize, total: usize, trailing_ok: bool) -> Result<Vec<usize>> {
    if mask.dims() != [b, total] {
        return Err(ModelError::Input(format!(
            "attention_mask must be [{b}, {total}] (cached + new tokens), got {:?}",
            mask.dims()
        )));
    }
    let rows: Vec<Vec<i64>> = mask.to_dtype(DType::I64)?.to_vec2()?;
    let mut pads = Vec::with_capacity(b);
    for (i, r) in rows.iter().enumerate() {
        let pad = r.iter().take_while(|&&x| x == 0).count();
        let end = if trailing_ok {
            r.len() - r.iter().rev().take_while(|&&x| x == 0).count()
        } else {
            r.len()
        };
        if r[pad..end.max(pad)].contains(&0) {
            return Err(ModelError::Input(format!(
                "attention_mask row {i} has padding after its first token: ChatGLM batches \
                 must be left-padded{}",
                if trailing_ok {
                    " (or padded after the last token, without a KV cache)"
                } else {
                    ""
                }
            )));
        }
        pads.push(pad);
    }
    Ok(pads)
}

/// Token ids `[b, t]` on the host.
pub(crate) fn ids_rows(input_ids: &Tensor) -> Result<Vec<Vec<u32>>> {
    let (_, _) = input_ids.dims2()?;
    Ok(input_ids.to_dtype(DType::U32)?.to_vec2()?)
}

/// Additive mask `[b, 1, t, total]` from a per-element "keep" predicate: 0 kept, else the most
/// negative finite value (so that a fully masked row degenerates to a uniform average, as in
/// the original, instead of NaN).
pub(crate) fn additive_mask(
    b: usize,
    t: usize,
    total: usize,
    dtype: DType,
    device: &Device,
    keep: impl Fn(usize, usize, usize) -> bool,
) -> Result<Tensor> {
    let mut v = vec![0f32; b * t * total];
    for bi in 0..b {
        for i in 0..t {
            let base = (bi * t + i) * total;
            for j in 0..total {
                if !keep(bi, i, j) {
                    v[base + j] = f32::MIN;
                }
            }
        }
    }
    let m = Tensor::from_vec(v, (b, 1, t, total), device)?;
    Ok(if dtype == DType::F32 || dtype == DType::F64 {
        m.to_dtype(dtype)?
    } else {
        // Keep the value finite in half precision.
        m.clamp(-65000f32, 0f32)?.to_dtype(dtype)?
    })
}

// ---------------------------------------------------------------------------------------
// Rotary tables.

/// `x` rounded to `dtype` (f16/bf16) and back; unchanged for f32/f64.
pub(crate) fn round_to(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// cos and sin `[b, t, inv_freq.len()]` of the angles `position · inv_freq`.
///
/// As the originals, the angles are computed in the model dtype: in f16/bf16 the positions,
/// the frequencies and their product are rounded to it (exact in f32).
pub(crate) fn cos_sin(
    positions: &[Vec<i64>],
    inv_freq: &[f32],
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let b = positions.len();
    let t = positions.first().map(|r| r.len()).unwrap_or(0);
    let n = inv_freq.len();
    let freqs: Vec<f32> = inv_freq.iter().map(|&f| round_to(f, dtype)).collect();
    let mut cos = Vec::with_capacity(b * t * n);
    let mut sin = Vec::with_capacity(b * t * n);
    for row in positions {
        if row.len() != t {
            return Err(ModelError::Input(
                "position ids rows have different lengths".into(),
            ));
        }
        for &p in row {
            let p = round_to(p as f32, dtype);
            for &f in &freqs {
                let a = round_to(p * f, dtype);
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    let cos = Tensor::from_vec(cos, (b, t, n), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (b, t, n), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

// ---------------------------------------------------------------------------------------
// LayerNorm.

/// LayerNorm with weight and bias over the last dim, normalised in f32 (f64 for f64), built
/// from candle ops that all have a backward (candle's fused `layer_norm` has none).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let acc = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let xf = x.to_dtype(acc)?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let xc = xf.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let w = self.weight.to_dtype(acc)?;
        let b = self.bias.to_dtype(acc)?;
        xn.broadcast_mul(&w)?.broadcast_add(&b)?.to_dtype(dtype)
    }
}

// ---------------------------------------------------------------------------------------
// Attention.

/// Self-attention with the fused, per-head interleaved `query_key_value`.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    pub query_key_value: Linear,
    pub dense: Linear,
    n_head: usize,
    head_dim: usize,
}

/// Rotary tables of one pass: the position half and the block-position half.
#[derive(Debug, Clone)]
pub struct Rotary2d {
    pub cos: Tensor,
    pub sin: Tensor,
    pub block_cos: Tensor,
    pub block_sin: Tensor,
}

impl SelfAttention {
    /// Rotates the first half of each head by the positions and the second by the block
    /// positions. `x`: `[b, h, t, head_dim]` (a strided view is fine).
    fn rope_2d(x: &Tensor, r: &Rotary2d) -> Result<Tensor> {
        let half = x.dim(3)? / 2;
        let x1 = llmtune_ops::rope(&x.narrow(3, 0, half)?, &r.cos, &r.sin)?;
        let x2 = llmtune_ops::rope(&x.narrow(3, half, half)?, &r.block_cos, &r.block_sin)?;
        Ok(Tensor::cat(&[x1, x2], 3)?)
    }

    /// `x`: `[b, t, hidden]`; `mask`: additive `[b, 1, t, past + t]`.
    fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary2d,
        mask: &Tensor,
        cache: Option<&mut (Option<Tensor>, Option<Tensor>)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, d) = (self.n_head, self.head_dim);
        // [b, t, h, 3d] -> per head q | k | v, each viewed [b, h, t, d].
        let qkv = self.query_key_value.forward(x)?.reshape((b, t, h, 3 * d))?;
        let q = qkv.narrow(3, 0, d)?.transpose(1, 2)?;
        let k = qkv.narrow(3, d, d)?.transpose(1, 2)?;
        let v = qkv.narrow(3, 2 * d, d)?.transpose(1, 2)?.contiguous()?;
        let q = Self::rope_2d(&q, rotary)?;
        let mut k = Self::rope_2d(&k, rotary)?;
        let mut v = v;
        if let Some(slot) = cache {
            if let (Some(pk), Some(pv)) = (&slot.0, &slot.1) {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            slot.0 = Some(k.clone());
            slot.1 = Some(v.clone());
        }
        let scores = llmtune_ops::matmul(&q, &k.t()?)?;
        let probs = llmtune_ops::masked_softmax(&scores, Some(mask), 1.0 / (d as f64).sqrt())?;
        let out = llmtune_ops::matmul(&probs, &v)?; // [b, h, t, d]
        let out = out.transpose(1, 2)?.reshape((b, t, h * d))?;
        Ok(self.dense.forward(&out)?)
    }
}

/// `dense_4h_to_h(gelu_tanh(dense_h_to_4h(x)))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub dense_h_to_4h: Linear,
    pub dense_4h_to_h: Linear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // candle's `gelu` is the tanh approximation of the original's `gelu_impl`.
        self.dense_4h_to_h
            .forward(&self.dense_h_to_4h.forward(x)?.gelu()?)
    }
}

/// One block: post-LayerNorm residuals scaled by `alpha` (DeepNorm).
#[derive(Debug, Clone)]
pub struct GlmBlock {
    pub input_layernorm: LayerNorm,
    pub attention: SelfAttention,
    pub post_attention_layernorm: LayerNorm,
    pub mlp: Mlp,
    alpha: f64,
}

impl GlmBlock {
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary2d,
        mask: &Tensor,
        cache: Option<&mut (Option<Tensor>, Option<Tensor>)>,
    ) -> Result<Tensor> {
        let a = self.input_layernorm.forward(x)?;
        let h = ((&a * self.alpha)? + self.attention.forward(&a, rotary, mask, cache)?)?;
        let m = self.post_attention_layernorm.forward(&h)?;
        Ok(((&m * self.alpha)? + self.mlp.forward(&m)?)?)
    }
}

/// Rotary tables and the additive mask of one full-sequence pass without a cache; lets
/// callers run the blocks one at a time (gradient checkpointing).
#[derive(Debug, Clone)]
pub struct LayerContext {
    pub rotary: Rotary2d,
    pub mask: Tensor,
}

impl LayerContext {
    /// Runs `layer` on `x` `[b, t, hidden]` without a cache.
    pub fn forward(&self, layer: &GlmBlock, x: &Tensor) -> Result<Tensor> {
        layer.forward(x, &self.rotary, &self.mask, None)
    }
}

// ---------------------------------------------------------------------------------------
// The model.

/// Hidden states of a forward pass, as transformers' `output_hidden_states`.
#[derive(Debug, Clone)]
pub struct HiddenStates {
    /// `num_layers + 1` tensors `[b, t, hidden]`: the embeddings, the input of each later
    /// block, and last the value after the final LayerNorm (ChatGLM-6B) or, for ChatGLM2/3,
    /// the output of the last block *before* the final norm. The last one is what TRL's
    /// value head reads.
    pub all: Vec<Tensor>,
    /// After the final norm `[b, t, hidden]` (what `lm_head` reads).
    pub last: Tensor,
}

/// ChatGLM-6B as a causal LM (`ChatGLMForConditionalGeneration`).
#[derive(Debug, Clone)]
pub struct ChatGlm {
    pub cfg: ChatGlmConfig,
    pub word_embeddings: Tensor,
    pub layers: Vec<GlmBlock>,
    pub final_layernorm: LayerNorm,
    pub lm_head: Linear,
    inv_freq: Vec<f32>,
    dtype: DType,
    device: Device,
}

impl ChatGlm {
    /// Builds the model from the original tensor names (`transformer.layers.N...`,
    /// `lm_head.weight`), converting each tensor to `dtype` on `device` as it is read.
    ///
    /// `lm_head.weight` and `transformer.word_embeddings.weight` are used as stored (the
    /// modeling code does not tie them; the released checkpoint stores two equal tensors).
    /// When the checkpoint has no `lm_head.weight`, the embeddings serve as the output layer.
    /// The `rotary_emb.inv_freq` buffers are ignored, as the original ignores them.
    pub fn load(
        cfg: &ChatGlmConfig,
        src: &dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (hs, v, inner) = (cfg.hidden_size, cfg.vocab_size, cfg.inner_hidden_size);
        let get = |name: &str, shape: &[usize]| src.require(name, shape, dtype, device);
        let lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear::new(
                get(&format!("{name}.weight"), &[out, inp])?,
                Some(get(&format!("{name}.bias"), &[out])?),
            ))
        };
        let ln = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: get(&format!("{name}.weight"), &[hs])?,
                bias: get(&format!("{name}.bias"), &[hs])?,
                eps: cfg.layernorm_epsilon,
            })
        };
        let word_embeddings = get("transformer.word_embeddings.weight", &[v, hs])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("transformer.layers.{i}");
            layers.push(GlmBlock {
                input_layernorm: ln(&format!("{p}.input_layernorm"))?,
                attention: SelfAttention {
                    query_key_value: lin(&format!("{p}.attention.query_key_value"), 3 * hs, hs)?,
                    dense: lin(&format!("{p}.attention.dense"), hs, hs)?,
                    n_head: cfg.num_attention_heads,
                    head_dim: cfg.head_dim(),
                },
                post_attention_layernorm: ln(&format!("{p}.post_attention_layernorm"))?,
                mlp: Mlp {
                    dense_h_to_4h: lin(&format!("{p}.mlp.dense_h_to_4h"), inner, hs)?,
                    dense_4h_to_h: lin(&format!("{p}.mlp.dense_4h_to_h"), hs, inner)?,
                },
                alpha: cfg.alpha(),
            });
        }
        let lm_head = match src.get("lm_head.weight", dtype, device)? {
            Some(w) if w.dims() != [v, hs] => {
                return Err(ModelError::ShapeMismatch {
                    path: src.location().to_path_buf(),
                    name: "lm_head.weight".into(),
                    expected: vec![v, hs],
                    found: w.dims().to_vec(),
                })
            }
            Some(w) => Linear::new(w, None),
            None => Linear::new(word_embeddings.clone(), None),
        };
        Ok(Self {
            cfg: cfg.clone(),
            word_embeddings,
            layers,
            final_layernorm: ln("transformer.final_layernorm")?,
            lm_head,
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

    /// The layout of each row of `ids` (whole rows): with `padding` (a 2-D mask, `1` =
    /// token; left padding, and padding after a row's last token, which no real token
    /// attends) the padding is skipped as the training collator does; without it every token
    /// counts, as the original model does on its own.
    pub fn row_layouts(
        &self,
        ids: &[Vec<u32>],
        padding: Option<&Tensor>,
    ) -> Result<Vec<RowLayout>> {
        self.row_layouts_with(ids, padding, true)
    }

    /// [`ChatGlm::row_layouts`]; `trailing_ok` false refuses padding after a row's last
    /// token (a prompt going into a KV cache: later tokens would attend it).
    fn row_layouts_with(
        &self,
        ids: &[Vec<u32>],
        padding: Option<&Tensor>,
        trailing_ok: bool,
    ) -> Result<Vec<RowLayout>> {
        let b = ids.len();
        let t = ids.first().map(|r| r.len()).unwrap_or(0);
        let pads = match padding {
            Some(m) => left_padding(m, b, t, trailing_ok)?,
            None => vec![0; b],
        };
        ids.iter()
            .zip(pads)
            .enumerate()
            .map(|(i, (r, pad))| RowLayout::from_ids(r, pad, &self.cfg, i))
            .collect()
    }

    /// The original's inputs for a (padded) batch: the mask `[b, 1, t, t]` (`1` = masked, as
    /// the original's boolean mask) and position ids `[b, 2, t]` (i64, on the CPU), from the
    /// row layouts. For left-padded rows with `padding` these are exactly what the
    /// training collator (`DataCollatorForChatGLM`) builds.
    pub fn masks_and_positions(
        &self,
        input_ids: &Tensor,
        padding: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let ids = ids_rows(input_ids)?;
        let layouts = self.row_layouts(&ids, padding)?;
        let (b, t) = input_ids.dims2()?;
        let mut mask = vec![0i64; b * t * t];
        let mut pos = vec![0i64; b * 2 * t];
        for (bi, l) in layouts.iter().enumerate() {
            for q in 0..t {
                for k in 0..t {
                    mask[(bi * t + q) * t + k] = (!l.attends(q, k)) as i64;
                }
                pos[bi * 2 * t + q] = l.position(q);
                pos[bi * 2 * t + t + q] = l.block_position(q);
            }
        }
        Ok((
            Tensor::from_vec(mask, (b, 1, t, t), &Device::Cpu)?,
            Tensor::from_vec(pos, (b, 2, t), &Device::Cpu)?,
        ))
    }

    fn rotary(&self, pos: &[Vec<i64>], block: &[Vec<i64>]) -> Result<Rotary2d> {
        let (cos, sin) = cos_sin(pos, &self.inv_freq, self.dtype, &self.device)?;
        let (block_cos, block_sin) = cos_sin(block, &self.inv_freq, self.dtype, &self.device)?;
        Ok(Rotary2d {
            cos,
            sin,
            block_cos,
            block_sin,
        })
    }

    /// Rotary tables and mask of the new tokens `past..past + t` of rows laid out as `layouts`.
    fn context_from_layouts(
        &self,
        layouts: &[RowLayout],
        past: usize,
        t: usize,
    ) -> Result<LayerContext> {
        let pos: Vec<Vec<i64>> = layouts
            .iter()
            .map(|l| (past..past + t).map(|a| l.position(a)).collect())
            .collect();
        let block: Vec<Vec<i64>> = layouts
            .iter()
            .map(|l| (past..past + t).map(|a| l.block_position(a)).collect())
            .collect();
        let mask = additive_mask(
            layouts.len(),
            t,
            past + t,
            self.dtype,
            &self.device,
            |bi, i, j| layouts[bi].attends(past + i, j),
        )?;
        Ok(LayerContext {
            rotary: self.rotary(&pos, &block)?,
            mask,
        })
    }

    /// Rotary tables and mask from the original's explicit inputs: `mask` `[b, 1, t, T]` or
    /// `[b, t, T]` (nonzero = masked) and `position_ids` `[b, 2, t]`.
    pub fn explicit_context(&self, mask: &Tensor, position_ids: &Tensor) -> Result<LayerContext> {
        let (b, two, t) = position_ids.dims3()?;
        if two != 2 {
            return Err(ModelError::Input(format!(
                "ChatGLM-6B position_ids must be [b, 2, t], got {:?}",
                position_ids.dims()
            )));
        }
        let p: Vec<Vec<Vec<i64>>> = position_ids.to_dtype(DType::I64)?.to_vec3()?;
        let pos: Vec<Vec<i64>> = p.iter().map(|r| r[0].clone()).collect();
        let block: Vec<Vec<i64>> = p.iter().map(|r| r[1].clone()).collect();
        let m = match mask.rank() {
            4 => mask.squeeze(1)?,
            3 => mask.clone(),
            _ => {
                return Err(ModelError::Input(format!(
                    "ChatGLM-6B attention mask must be [b, 1, t, T], got {:?}",
                    mask.dims()
                )))
            }
        };
        let (mb, mt, total) = m.dims3()?;
        if mb != b || mt != t {
            return Err(ModelError::Input(format!(
                "attention mask {:?} does not match position ids {:?}",
                mask.dims(),
                position_ids.dims()
            )));
        }
        let m: Vec<Vec<Vec<i64>>> = m.to_dtype(DType::I64)?.to_vec3()?;
        let mask = additive_mask(b, t, total, self.dtype, &self.device, |bi, i, j| {
            m[bi][i][j] == 0
        })?;
        Ok(LayerContext {
            rotary: self.rotary(&pos, &block)?,
            mask,
        })
    }

    /// The rotary tables and mask every block needs for a full-sequence pass without a cache
    /// (layouts from the ids; `padding` as in [`ChatGlm::row_layouts`]).
    pub fn layer_context(
        &self,
        input_ids: &Tensor,
        padding: Option<&Tensor>,
    ) -> Result<LayerContext> {
        let (_, t) = input_ids.dims2()?;
        let layouts = self.row_layouts(&ids_rows(input_ids)?, padding)?;
        self.context_from_layouts(&layouts, 0, t)
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

    /// Runs the blocks with a prepared context; returns all hidden states.
    fn run(
        &self,
        input_ids: &Tensor,
        ctx: &LayerContext,
        mut cache: Option<&mut KvCache>,
        keep_all: bool,
    ) -> Result<HiddenStates> {
        let t = input_ids.dim(1)?;
        let mut x = self.embed(input_ids)?;
        let mut all = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            if keep_all {
                all.push(x.clone());
            }
            let slot = cache.as_mut().map(|c| c.layer_mut(i));
            x = layer.forward(&x, &ctx.rotary, &ctx.mask, slot)?;
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        let last = self.final_layernorm.forward(&x)?;
        if keep_all {
            all.push(last.clone());
        }
        Ok(HiddenStates { all, last })
    }

    /// The context of new tokens `input_ids` `[b, t]`, from the ids and a 2-D padding mask
    /// `[b, past + t]` (`1` = token); the row layouts are kept in (or read from) the cache.
    fn derived_context(
        &self,
        input_ids: &Tensor,
        padding: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<LayerContext> {
        let (b, t) = input_ids.dims2()?;
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        if past == 0 {
            // Tokens decoded after a right-padded prompt would attend its padding.
            let layouts = self.row_layouts_with(&ids_rows(input_ids)?, padding, cache.is_none())?;
            if let Some(c) = cache {
                c.rows = layouts
                    .iter()
                    .map(|l| [l.pad, l.context, l.mask_position])
                    .collect();
            }
            return self.context_from_layouts(&layouts, 0, t);
        }
        let c = cache.expect("past > 0 implies a cache");
        if c.rows.len() != b {
            return Err(ModelError::Input(format!(
                "the KV cache holds {} ChatGLM rows, the input has {b}: start decoding with the \
                 whole prompt through this model",
                c.rows.len()
            )));
        }
        if let Some(m) = padding {
            left_padding(m, b, past + t, false)?;
        }
        let layouts: Vec<RowLayout> = c
            .rows
            .iter()
            .map(|r| RowLayout {
                pad: r[0],
                context: r[1],
                mask_position: r[2],
            })
            .collect();
        self.context_from_layouts(&layouts, past, t)
    }

    /// Runs the model and returns every hidden state.
    ///
    /// * `input_ids`: `[b, t]`, the new tokens (the whole rows when the cache is empty).
    /// * `padding`: 2-D padding mask `[b, past + t]` (`1` = token; left padding only), or
    ///   `None` (every token real — and, as in the original, padding would count as prefix).
    /// * `cache`: appended to when given. On the first call it records where each row's
    ///   `<sop>` and mask token are; later tokens get the generation positions
    ///   `[mask_position, block + 1]` from it.
    pub fn forward_hidden_states(
        &self,
        input_ids: &Tensor,
        padding: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<HiddenStates> {
        let ctx = self.derived_context(input_ids, padding, cache.as_deref_mut())?;
        self.run(input_ids, &ctx, cache, true)
    }

    /// [`ChatGlm::forward_hidden_states`] with the original's explicit mask `[b, 1, t, T]`
    /// (`1` = masked) and position ids `[b, 2, t]`.
    pub fn forward_hidden_states_explicit(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        position_ids: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<HiddenStates> {
        let ctx = self.explicit_context(mask, position_ids)?;
        self.run(input_ids, &ctx, cache, true)
    }

    /// The LM head's weight when it is a plain linear (see [`Linear::plain_weight`]).
    pub fn plain_lm_head(&self) -> Option<&Tensor> {
        self.lm_head.plain_weight()
    }

    /// Logits `[.., vocab]` from final hidden states `[.., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?)
    }

    /// Full forward: `(logits [b, t, vocab], hidden after the final norm [b, t, hidden])`;
    /// arguments as [`ChatGlm::forward_hidden_states`].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        padding: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, Tensor)> {
        let ctx = self.derived_context(input_ids, padding, cache.as_deref_mut())?;
        let h = self.run(input_ids, &ctx, cache, false)?;
        Ok((self.logits(&h.last)?, h.last))
    }

    /// Logits of the last position only `[b, vocab]` in f32 (generation).
    pub fn forward_last(
        &self,
        input_ids: &Tensor,
        padding: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let ctx = self.derived_context(input_ids, padding, cache.as_deref_mut())?;
        let hidden = self.run(input_ids, &ctx, cache, false)?.last;
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        Ok(self.logits(&last)?.to_dtype(DType::F32)?)
    }

    /// Every linear layer by its original module name (e.g.
    /// `transformer.layers.0.attention.query_key_value`), for attaching adapters.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("transformer.layers.{i}");
            out.push((
                format!("{p}.attention.query_key_value"),
                &mut l.attention.query_key_value,
            ));
            out.push((format!("{p}.attention.dense"), &mut l.attention.dense));
            out.push((format!("{p}.mlp.dense_h_to_4h"), &mut l.mlp.dense_h_to_4h));
            out.push((format!("{p}.mlp.dense_4h_to_h"), &mut l.mlp.dense_4h_to_h));
        }
        out.push(("lm_head".into(), &mut self.lm_head));
        out
    }

    /// Every parameter tensor by its original name (freeze/full tuning, merging, export).
    pub fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out: Vec<(String, &mut Tensor)> = vec![(
            "transformer.word_embeddings.weight".into(),
            &mut self.word_embeddings,
        )];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("transformer.layers.{i}");
            for (n, ln) in [
                ("input_layernorm", &mut l.input_layernorm),
                ("post_attention_layernorm", &mut l.post_attention_layernorm),
            ] {
                out.push((format!("{p}.{n}.weight"), &mut ln.weight));
                out.push((format!("{p}.{n}.bias"), &mut ln.bias));
            }
            for (n, lin) in [
                (
                    "attention.query_key_value",
                    &mut l.attention.query_key_value,
                ),
                ("attention.dense", &mut l.attention.dense),
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
            "transformer.final_layernorm.weight".into(),
            &mut self.final_layernorm.weight,
        ));
        out.push((
            "transformer.final_layernorm.bias".into(),
            &mut self.final_layernorm.bias,
        ));
        out.push(("lm_head.weight".into(), &mut self.lm_head.weight));
        out
    }
}
