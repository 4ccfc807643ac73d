//! The Llama family: Llama 2/3, Qwen2/2.5, Mistral, SmolLM2.
//!
//! Read top to bottom: rotary tables, attention masks, the linear layer (with an adapter
//! hook for LoRA), attention, MLP, the decoder layer, and the model. Every op on the
//! training path comes from `llmtune_ops`, which is differentiable end to end.
//!
//! Conventions (as transformers): `x = embed[ids]`; per layer
//! `h = x + o_proj(attn(rmsnorm1(x)))`, `x = h + down(silu(gate(rmsnorm2(h))) * up(rmsnorm2(h)))`;
//! final RMSNorm; `logits = x @ W_out^T`. RoPE rotates halves (not interleaved pairs); each
//! KV head serves `heads / kv_heads` consecutive query heads.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use llmtune_ops::quant::{QFormat, QMatrix, QK};

use crate::config::LlamaConfig;
use crate::kv_cache::KvCache;
use crate::loader::WeightSource;
use crate::{ModelError, Result};

// ---------------------------------------------------------------------------------------
// Rotary embedding tables.

/// Precomputed inverse frequencies; cos/sin are built per batch from position ids.
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Vec<f32>,
}

impl Rotary {
    pub fn new(cfg: &LlamaConfig) -> Self {
        Self {
            inv_freq: cfg.inv_freq(),
        }
    }

    /// cos and sin of shape `[b, t, head_dim/2]` for `positions` (`[b][t]`).
    pub fn cos_sin(
        &self,
        positions: &[Vec<i64>],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let b = positions.len();
        let t = positions.first().map(|r| r.len()).unwrap_or(0);
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        for row in positions {
            for &p in row {
                for &f in &self.inv_freq {
                    // Angles in f32 like transformers (position * inv_freq in float32).
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let cos = Tensor::from_vec(cos, (b, t, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (b, t, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

// ---------------------------------------------------------------------------------------
// Masks and positions.

/// Per-row attention mask as host vectors (`1` = real token), for the whole sequence seen
/// so far (cache + new tokens).
pub fn mask_rows(mask: &Tensor) -> Result<Vec<Vec<u8>>> {
    let m = mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    Ok(m.into_iter()
        .map(|r| r.into_iter().map(|x| (x != 0) as u8).collect())
        .collect())
}

/// Position ids as `generate` builds them: `cumsum(mask) - 1`, and 1 on padding (unused).
/// Returns the positions of the last `t_new` columns.
pub fn positions_from_mask(mask: &[Vec<u8>], t_new: usize) -> Vec<Vec<i64>> {
    mask.iter()
        .map(|row| {
            let mut c = 0i64;
            let all: Vec<i64> = row
                .iter()
                .map(|&m| {
                    c += m as i64;
                    if m == 1 {
                        c - 1
                    } else {
                        1
                    }
                })
                .collect();
            all[all.len() - t_new..].to_vec()
        })
        .collect()
}

/// Additive mask `[b, 1, t_new, t_total]`: 0 where query `i` (at absolute index
/// `past + i`) may attend key `j` (`j <= past + i` and key `j` is real), else the dtype's
/// most negative finite value. Rows whose every key is masked (left padding) stay finite and
/// degenerate to a uniform average, as eager attention in transformers does.
pub fn causal_mask(
    mask: &[Vec<u8>],
    t_new: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let b = mask.len();
    let total = mask.first().map(|r| r.len()).unwrap_or(0);
    let past = total - t_new;
    let neg = f32::MIN;
    let mut v = vec![0f32; b * t_new * total];
    for (bi, row) in mask.iter().enumerate() {
        for i in 0..t_new {
            let base = (bi * t_new + i) * total;
            for j in 0..total {
                if j > past + i || row[j] == 0 {
                    v[base + j] = neg;
                }
            }
        }
    }
    let t = Tensor::from_vec(v, (b, 1, t_new, total), device)?;
    Ok(if dtype == DType::F32 {
        t
    } else {
        // Keep the value finite in half precision.
        t.clamp(-65000f32, 0f32)?.to_dtype(dtype)?
    })
}

// ---------------------------------------------------------------------------------------
// Linear layer with an adapter hook.

/// Something added on top of a linear layer's output (LoRA). Implemented by
/// `llmtune-adapters`; the model knows only this hook.
pub trait LinearAdapter: Send + Sync + std::fmt::Debug {
    /// Returns `base + adapter(x)`, where `base = x W^T (+ b)`.
    fn apply(&self, x: &Tensor, base: Tensor) -> candle_core::Result<Tensor>;
}

/// `y = x W^T (+ b)`, plus an optional adapter.
///
/// With `quant` set (inference from a quantized GGUF), `W` is the quantized matrix and
/// `weight` is only a placeholder of the right shape that holds no memory (a broadcast zero):
/// such a layer cannot be trained or merged into.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub adapter: Option<Arc<dyn LinearAdapter>>,
    pub quant: Option<Arc<QMatrix>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            adapter: None,
            quant: None,
        }
    }

    pub fn out_features(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }
    pub fn in_features(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }

    /// The weight when this layer is `x @ w^T` and nothing else (no bias, no adapter).
    pub fn plain_weight(&self) -> Option<&Tensor> {
        (self.bias.is_none() && self.adapter.is_none()).then_some(&self.weight)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.quant {
            Some(q) => {
                let y = llmtune_ops::quant::quant_linear(x, q)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            None => llmtune_ops::linear(x, &self.weight, self.bias.as_ref())?,
        };
        match &self.adapter {
            Some(a) => a.apply(x, y),
            None => Ok(y),
        }
    }
}

/// The GGML format of `--quantization_bit bits` (4: `Q4_1`, 8: `Q8_0`); CPU only.
pub(crate) fn quant_format(bits: u32, device: &Device) -> Result<(QFormat, GgmlDType)> {
    let f = match bits {
        4 => (QFormat::Q4_1, GgmlDType::Q4_1),
        8 => (QFormat::Q8_0, GgmlDType::Q8_0),
        b => {
            return Err(ModelError::Input(format!(
                "quantization_bit must be 4 or 8, got {b}"
            )))
        }
    };
    if !device.is_cpu() {
        return Err(ModelError::Input(
            "--quantization_bit runs on the CPU only for now (the quantized kernels are CPU \
             kernels)"
                .into(),
        ));
    }
    Ok(f)
}

/// Replaces `lin`'s float weight by its quantized matrix (in place; the float tensor is
/// dropped). Layers already quantized, and those whose input size is not a multiple of 32
/// (the block size), are left as they are.
fn quantize_linear(name: &str, lin: &mut Linear, (format, gd): (QFormat, GgmlDType)) -> Result<()> {
    let (rows, cols) = (lin.out_features(), lin.in_features());
    if lin.quant.is_some() || cols % QK != 0 {
        return Ok(());
    }
    let w = lin.weight.to_dtype(DType::F32)?;
    lin.quant = Some(Arc::new(quantize_matrix(name, &w, (format, gd))?));
    // A placeholder of the right shape that holds no memory (as a GGUF load's).
    lin.weight = Tensor::zeros((1, 1), DType::F32, w.device())?.broadcast_as((rows, cols))?;
    Ok(())
}

/// `w` (f32, `[rows, cols]` with `cols` a multiple of 32) as a GGML `format` matrix.
pub(crate) fn quantize_matrix(
    name: &str,
    w: &Tensor,
    (format, gd): (QFormat, GgmlDType),
) -> Result<QMatrix> {
    let (rows, cols) = w.dims2()?;
    let qt = QTensor::quantize(w, gd)?;
    QMatrix::from_ggml_bytes(format, rows, cols, &qt.data()?)
        .map_err(|e| ModelError::Model(format!("{name}: {e}")))
}

/// RMSNorm with a weight.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        llmtune_ops::rms_norm(x, &self.weight, self.eps)
    }
}

// ---------------------------------------------------------------------------------------
// Attention.

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
}

impl Attention {
    /// `x`: `[b, t, hidden]`; `cos`/`sin`: `[b, t, head_dim/2]`; `mask`: `[b, 1, t, T]`.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut (Option<Tensor>, Option<Tensor>)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, d) = (self.n_head, self.n_kv, self.head_dim);
        let (q, k, v) = (
            self.q_proj.forward(x)?,
            self.k_proj.forward(x)?,
            self.v_proj.forward(x)?,
        );
        let scale = 1.0 / (d as f64).sqrt();
        if cache.is_none() {
            // Training and full-sequence passes: one fused node on the CPU (f32).
            let heads = llmtune_ops::AttentionHeads {
                n_head: h,
                n_kv: kvh,
                head_dim: d,
            };
            if let Some(out) = llmtune_ops::attention(&q, &k, &v, (cos, sin), mask, heads, scale)? {
                return Ok(self.o_proj.forward(&out)?);
            }
        }
        let q = q.reshape((b, t, h, d))?.transpose(1, 2)?;
        let k = k.reshape((b, t, kvh, d))?.transpose(1, 2)?;
        let v = v.reshape((b, t, kvh, d))?.transpose(1, 2)?.contiguous()?;
        // rope reads the transposed views in place and writes contiguous results.
        let q = llmtune_ops::rope(&q, cos, sin)?;
        let mut k = llmtune_ops::rope(&k, cos, sin)?;
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
        let rep = h / kvh;
        // Group the query heads that share a KV head: [b, kvh, rep*t, d].
        let q = q.reshape((b, kvh, rep * t, d))?;
        let scores = llmtune_ops::matmul(&q, &k.t()?)?.reshape((b, h, t, total))?;
        // softmax(scores / sqrt(d) + mask), fused: no gradient is stored for the mask.
        let probs = llmtune_ops::masked_softmax(&scores, Some(mask), scale)?;
        let probs = probs.reshape((b, kvh, rep * t, total))?;
        let out = llmtune_ops::matmul(&probs, &v)?.reshape((b, h, t, d))?;
        let out = out.transpose(1, 2)?.reshape((b, t, h * d))?;
        Ok(self.o_proj.forward(&out)?)
    }
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        fn plain(l: &Linear) -> Option<&Tensor> {
            l.plain_weight().filter(|_| l.quant.is_none())
        }
        if let (Some(wg), Some(wu)) = (plain(&self.gate_proj), plain(&self.up_proj)) {
            // Frozen gate/up on the CPU: one fused node (no gradient buffers for g and u).
            if let Some(h) = llmtune_ops::swiglu_in(x, wg, wu)? {
                return self.down_proj.forward(&h);
            }
        }
        if let (Some(wg), Some(wu)) = (&self.gate_proj.quant, &self.up_proj.quant) {
            // A quantized base (`--quantization_bit`): the same products, as one node.
            if self.gate_proj.plain_weight().is_some() && self.up_proj.plain_weight().is_some() {
                if let Some(h) = llmtune_ops::swiglu_in_quant(x, wg, wu)? {
                    return self.down_proj.forward(&h);
                }
            }
        }
        let g = self.gate_proj.forward(x)?;
        let u = self.up_proj.forward(x)?;
        self.down_proj.forward(&llmtune_ops::swiglu(&g, &u)?)
    }
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// One decoder layer: `x + attn(norm(x))`, then `h + mlp(norm(h))`.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut (Option<Tensor>, Option<Tensor>)>,
    ) -> Result<Tensor> {
        let a = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, cos, sin, mask, cache)?;
        let h = (x + a)?;
        let m = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h)?)?;
        Ok((h + m)?)
    }
}

/// Rotary tables and the additive attention mask of one full-sequence pass
/// ([`Llama::layer_context`]); lets callers run the layers one at a time (gradient
/// checkpointing).
#[derive(Debug, Clone)]
pub struct LayerContext {
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Tensor,
}

impl LayerContext {
    /// Runs `layer` on `x` `[b, t, hidden]` without a cache.
    pub fn forward(&self, layer: &DecoderLayer, x: &Tensor) -> Result<Tensor> {
        layer.forward(x, &self.cos, &self.sin, &self.mask, None)
    }
}

// ---------------------------------------------------------------------------------------
// The model.

/// A Llama-family causal LM.
#[derive(Debug, Clone)]
pub struct Llama {
    pub cfg: LlamaConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
    /// The tied LM head as a quantized matrix (inference from a quantized GGUF; the f32
    /// `embed_tokens` still serves the embedding lookups).
    pub tied_head_quant: Option<Arc<QMatrix>>,
    rotary: Rotary,
    dtype: DType,
    device: Device,
}

impl Llama {
    /// Builds the model from HF-named weights, converting to `dtype` on `device`.
    pub fn load(
        cfg: &LlamaConfig,
        src: &dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_quantized(cfg, src, dtype, device, None)
    }

    /// [`Llama::load`], quantizing each decoder-layer linear weight as it is read when `bits`
    /// is set (as [`Llama::quantize_linear_weights`] does after a load, but without ever
    /// holding the whole base in `dtype`: one matrix at a time).
    pub fn load_quantized(
        cfg: &LlamaConfig,
        src: &dyn WeightSource,
        dtype: DType,
        device: &Device,
        bits: Option<u32>,
    ) -> Result<Self> {
        let format = bits.map(|b| quant_format(b, device)).transpose()?;
        let (hs, v) = (cfg.hidden_size, cfg.vocab_size);
        let q_out = cfg.num_attention_heads * cfg.head_dim;
        let kv_out = cfg.num_key_value_heads * cfg.head_dim;
        let get = |name: &str, shape: &[usize]| src.require(name, shape, dtype, device);
        let lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let w = get(&format!("{name}.weight"), &[out, inp])?;
            let b = if bias {
                Some(get(&format!("{name}.bias"), &[out])?)
            } else {
                None
            };
            let mut l = Linear::new(w, b);
            if let Some(f) = format {
                quantize_linear(name, &mut l, f)?;
            }
            Ok(l)
        };
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: get(name, &[hs])?,
                eps: cfg.rms_norm_eps,
            })
        };
        let embed_tokens = get("model.embed_tokens.weight", &[v, hs])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
                self_attn: Attention {
                    q_proj: lin(&format!("{p}.self_attn.q_proj"), q_out, hs, cfg.qkv_bias)?,
                    k_proj: lin(&format!("{p}.self_attn.k_proj"), kv_out, hs, cfg.qkv_bias)?,
                    v_proj: lin(&format!("{p}.self_attn.v_proj"), kv_out, hs, cfg.qkv_bias)?,
                    o_proj: lin(&format!("{p}.self_attn.o_proj"), hs, q_out, cfg.o_bias)?,
                    n_head: cfg.num_attention_heads,
                    n_kv: cfg.num_key_value_heads,
                    head_dim: cfg.head_dim,
                },
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate_proj: lin(
                        &format!("{p}.mlp.gate_proj"),
                        cfg.intermediate_size,
                        hs,
                        false,
                    )?,
                    up_proj: lin(
                        &format!("{p}.mlp.up_proj"),
                        cfg.intermediate_size,
                        hs,
                        false,
                    )?,
                    down_proj: lin(
                        &format!("{p}.mlp.down_proj"),
                        hs,
                        cfg.intermediate_size,
                        false,
                    )?,
                },
            });
        }
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            match src.get("lm_head.weight", dtype, device)? {
                Some(w) => {
                    if w.dims() != [v, hs] {
                        return Err(ModelError::ShapeMismatch {
                            path: src.location().to_path_buf(),
                            name: "lm_head.weight".into(),
                            expected: vec![v, hs],
                            found: w.dims().to_vec(),
                        });
                    }
                    Some(Linear::new(w, None))
                }
                None => {
                    return Err(ModelError::MissingTensor {
                        path: src.location().to_path_buf(),
                        name: "lm_head.weight (tie_word_embeddings is false)".into(),
                    })
                }
            }
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm: norm("model.norm.weight")?,
            lm_head,
            tied_head_quant: None,
            rotary: Rotary::new(cfg),
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
        KvCache::new(self.cfg.num_hidden_layers)
    }

    /// Runs the decoder and returns the final hidden states `[b, t, hidden]` (after the final
    /// norm).
    ///
    /// * `input_ids`: `[b, t]` (u32 or i64) — the new tokens.
    /// * `attention_mask`: `[b, past + t]` with 1 for real tokens; `None` = all real.
    /// * `position_ids`: `[b][t]`; `None` = derived from the mask (`cumsum - 1`).
    /// * `cache`: appended to when given (incremental decoding).
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&[Vec<i64>]>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let mask = match attention_mask {
            Some(m) => {
                let rows = mask_rows(m)?;
                if rows.len() != b || rows.iter().any(|r| r.len() != past + t) {
                    return Err(ModelError::Input(format!(
                        "attention_mask must be [{b}, {}] (cache {past} + new {t}), got {:?}",
                        past + t,
                        m.dims()
                    )));
                }
                rows
            }
            None => vec![vec![1u8; past + t]; b],
        };
        let positions = match position_ids {
            Some(p) => p.to_vec(),
            None => positions_from_mask(&mask, t),
        };
        let (cos, sin) = self.rotary.cos_sin(&positions, self.dtype, &self.device)?;
        let additive = causal_mask(&mask, t, self.dtype, &self.device)?;
        let ids = self.ids_on_device(input_ids)?;
        let mut x =
            self.embed_tokens
                .index_select(&ids, 0)?
                .reshape((b, t, self.cfg.hidden_size))?;
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| c.layer_mut(i));
            x = layer.forward(&x, &cos, &sin, &additive, slot)?;
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        Ok(self.norm.forward(&x)?)
    }

    /// Token embeddings `[b, t, hidden]` of `input_ids` `[b, t]`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ids = self.ids_on_device(input_ids)?;
        Ok(self
            .embed_tokens
            .index_select(&ids, 0)?
            .reshape((b, t, self.cfg.hidden_size))?)
    }

    /// The rotary tables and additive mask every layer needs for a full-sequence pass without
    /// a cache (positions from the mask, as [`Llama::forward_hidden`] does).
    pub fn layer_context(
        &self,
        attention_mask: Option<&Tensor>,
        b: usize,
        t: usize,
    ) -> Result<LayerContext> {
        let mask = match attention_mask {
            Some(m) => mask_rows(m)?,
            None => vec![vec![1u8; t]; b],
        };
        let positions = positions_from_mask(&mask, t);
        let (cos, sin) = self.rotary.cos_sin(&positions, self.dtype, &self.device)?;
        let mask = causal_mask(&mask, t, self.dtype, &self.device)?;
        Ok(LayerContext { cos, sin, mask })
    }

    /// Per-layer residual streams (before the final norm) for parity tests.
    pub fn forward_layers(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Vec<Tensor>> {
        let (b, t) = input_ids.dims2()?;
        let ctx = self.layer_context(attention_mask, b, t)?;
        let mut x = self.embed(input_ids)?;
        let mut outs = Vec::new();
        for layer in &self.layers {
            x = ctx.forward(layer, &x)?;
            outs.push(x.clone());
        }
        Ok(outs)
    }

    /// Token ids as a flat u32 tensor on the model's device (callers may pass ids on the CPU).
    fn ids_on_device(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(input_ids
            .to_dtype(DType::U32)?
            .to_device(&self.device)?
            .flatten_all()?)
    }

    /// The LM head's weight `[vocab, hidden]` (the tied embeddings or `lm_head.weight`) when
    /// the head is a plain bias-free linear without an adapter, for fused head + loss ops.
    pub fn plain_lm_head(&self) -> Option<&Tensor> {
        match &self.lm_head {
            None => Some(&self.embed_tokens),
            Some(h) => h.plain_weight(),
        }
    }

    /// Logits `[.., vocab]` from final hidden states `[.., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(match &self.lm_head {
            Some(h) => h.forward(hidden)?,
            None => match &self.tied_head_quant {
                Some(q) => llmtune_ops::quant::quant_linear(hidden, q)?,
                None => llmtune_ops::linear(hidden, &self.embed_tokens, None)?,
            },
        })
    }

    /// Switches the linear layers named in `quant` (HF weight names such as
    /// `model.layers.0.self_attn.q_proj.weight`; `model.embed_tokens.weight` for a tied LM
    /// head) to their quantized matrices. Returns how many layers were switched.
    pub fn attach_quantized(
        &mut self,
        quant: &std::collections::HashMap<String, Arc<QMatrix>>,
    ) -> Result<usize> {
        let mut n = 0;
        for (name, lin) in self.linears_mut() {
            if let Some(q) = quant.get(&format!("{name}.weight")) {
                if [q.rows(), q.cols()] != [lin.out_features(), lin.in_features()] {
                    return Err(ModelError::Model(format!(
                        "{name}: quantized weight [{}, {}] for a [{}, {}] layer",
                        q.rows(),
                        q.cols(),
                        lin.out_features(),
                        lin.in_features()
                    )));
                }
                lin.quant = Some(q.clone());
                n += 1;
            }
        }
        if self.lm_head.is_none() {
            if let Some(q) = quant.get("model.embed_tokens.weight") {
                if [q.rows(), q.cols()] != [self.cfg.vocab_size, self.cfg.hidden_size] {
                    return Err(ModelError::Model(format!(
                        "tied LM head: quantized weight [{}, {}], expected [{}, {}]",
                        q.rows(),
                        q.cols(),
                        self.cfg.vocab_size,
                        self.cfg.hidden_size
                    )));
                }
                self.tied_head_quant = Some(q.clone());
                n += 1;
            }
        }
        Ok(n)
    }

    /// A quantized base for LoRA (`--quantization_bit 4|8`, QLoRA's memory saving): every
    /// decoder layer's linear weight (q/k/v/o, gate/up/down) becomes a GGML `Q4_1` (4) or
    /// `Q8_0` (8) matrix and its f32 tensor is freed; embeddings, norms and the LM head stay
    /// as they are. Quantized layers run forward on the quantized kernels and pass gradients
    /// to their inputs (`llmtune_ops::quant::quant_linear`), so adapters on top of them and
    /// anything before them train; the quantized weights themselves cannot (no freeze/full
    /// tuning, no merging into them). A layer whose input size is not a multiple of 32 (the
    /// block size) stays f32. CPU only. Returns (quantized, left f32).
    pub fn quantize_linear_weights(&mut self, bits: u32) -> Result<(usize, usize)> {
        let format = quant_format(bits, self.device())?;
        for (name, lin) in self.linears_mut() {
            if name != "lm_head" {
                quantize_linear(&name, lin, format)?;
            }
        }
        Ok(self.quantized_linear_counts())
    }

    /// Decoder-layer linear layers on quantized weights, and those on float weights.
    pub fn quantized_linear_counts(&mut self) -> (usize, usize) {
        let mut n = (0, 0);
        for (name, lin) in self.linears_mut() {
            if name != "lm_head" {
                if lin.quant.is_some() {
                    n.0 += 1;
                } else {
                    n.1 += 1;
                }
            }
        }
        n
    }

    /// Whether any layer runs on quantized weights (a GGUF's, or `quantize_linear_weights`).
    pub fn is_quantized(&self) -> bool {
        self.tied_head_quant.is_some()
            || self.layers.iter().any(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &m.gate_proj,
                    &m.up_proj,
                    &m.down_proj,
                ]
                .iter()
                .any(|x| x.quant.is_some())
            })
            || self.lm_head.as_ref().is_some_and(|h| h.quant.is_some())
    }

    /// bf16 compute on the CPU with f32 activations: the frozen linear weights and the LM head
    /// (a tied head gets its own bf16 copy; the f32 embeddings still serve the lookups) are
    /// stored in bf16 and multiply through MKL's bf16 GEMM with f32 accumulation
    /// (`llmtune_ops::linear`); embeddings, norms, biases and adapters stay f32. For frozen
    /// base weights only (LoRA): a bf16 weight gets no gradient.
    pub fn use_bf16_linear_weights(&mut self) -> Result<()> {
        for (_, lin) in self.linears_mut() {
            if lin.quant.is_none() {
                lin.weight = lin.weight.to_dtype(DType::BF16)?;
            }
        }
        // An untied head was converted above (it is one of `linears_mut`).
        if self.lm_head.is_none() && self.tied_head_quant.is_none() {
            self.lm_head = Some(Linear::new(self.embed_tokens.to_dtype(DType::BF16)?, None));
        }
        Ok(())
    }

    /// Full forward: `(logits [b, t, vocab], hidden [b, t, hidden])`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&[Vec<i64>]>,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, Tensor)> {
        let hidden = self.forward_hidden(input_ids, attention_mask, position_ids, cache)?;
        let logits = self.logits(&hidden)?;
        Ok((logits, hidden))
    }

    /// Logits of the last position only `[b, vocab]` (generation).
    pub fn forward_last(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, attention_mask, None, cache)?;
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        Ok(self.logits(&last)?.to_dtype(DType::F32)?)
    }

    /// Every linear layer by its HF module name (e.g. `model.layers.0.self_attn.q_proj`),
    /// for attaching adapters.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &mut l.self_attn;
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            let m = &mut l.mlp;
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        if let Some(h) = self.lm_head.as_mut() {
            out.push(("lm_head".into(), h));
        }
        out
    }

    /// Every parameter tensor by HF name (for freeze/full tuning, merging and export).
    pub fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out: Vec<(String, &mut Tensor)> =
            vec![("model.embed_tokens.weight".into(), &mut self.embed_tokens)];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                &mut l.input_layernorm.weight,
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                &mut l.post_attention_layernorm.weight,
            ));
            let a = &mut l.self_attn;
            for (n, lin) in [
                ("q_proj", &mut a.q_proj),
                ("k_proj", &mut a.k_proj),
                ("v_proj", &mut a.v_proj),
                ("o_proj", &mut a.o_proj),
            ] {
                out.push((format!("{p}.self_attn.{n}.weight"), &mut lin.weight));
                if let Some(b) = lin.bias.as_mut() {
                    out.push((format!("{p}.self_attn.{n}.bias"), b));
                }
            }
            let m = &mut l.mlp;
            for (n, lin) in [
                ("gate_proj", &mut m.gate_proj),
                ("up_proj", &mut m.up_proj),
                ("down_proj", &mut m.down_proj),
            ] {
                out.push((format!("{p}.mlp.{n}.weight"), &mut lin.weight));
            }
        }
        out.push(("model.norm.weight".into(), &mut self.norm.weight));
        if let Some(h) = self.lm_head.as_mut() {
            out.push(("lm_head.weight".into(), &mut h.weight));
        }
        out
    }
}
