//! [`CausalLm`]: one type for every architecture the stages, generation and the CLI run.
//!
//! All variants take the same inputs: token ids `[b, t]`, a 2-D left-padding mask
//! `[b, past + t]` (`1` = token) and an optional [`KvCache`]. Each derives what it needs from
//! them: Llama and ChatGLM2/3 count positions from the mask (`cumsum - 1`, as `generate`
//! does), ChatGLM-6B builds its prefix mask and 2-D positions from the ids (`[gMASK]`,
//! `<sop>`) and the padding. Dispatch is a `match` per call, so per-layer access (gradient
//! checkpointing) stays static.

use candle_core::{DType, Device, Module, Tensor};

use crate::chatglm::{self, ChatGlm};
use crate::chatglm2::{self, ChatGlm2};
use crate::kv_cache::KvCache;
use crate::llama::{self, mask_rows, positions_from_mask, Linear, Llama};
use crate::Result;

/// A causal LM of any supported architecture.
#[derive(Debug, Clone)]
pub enum CausalLm {
    /// Llama 2/3, Qwen2, Mistral, SmolLM2.
    Llama(Llama),
    /// ChatGLM-6B.
    ChatGlm(ChatGlm),
    /// ChatGLM2-6B and ChatGLM3-6B.
    ChatGlm2(ChatGlm2),
}

impl From<Llama> for CausalLm {
    fn from(m: Llama) -> Self {
        Self::Llama(m)
    }
}
impl From<ChatGlm> for CausalLm {
    fn from(m: ChatGlm) -> Self {
        Self::ChatGlm(m)
    }
}
impl From<ChatGlm2> for CausalLm {
    fn from(m: ChatGlm2) -> Self {
        Self::ChatGlm2(m)
    }
}

/// What every layer of one full-sequence pass needs (rotary tables and mask), per
/// architecture; from [`CausalLm::layer_context`].
#[derive(Debug, Clone)]
pub enum LayerCtx {
    Llama(llama::LayerContext),
    ChatGlm(chatglm::LayerContext),
    ChatGlm2(chatglm2::LayerContext),
}

impl CausalLm {
    /// Short architecture name for messages (`llama`, `chatglm`, `chatglm2`).
    pub fn arch(&self) -> &'static str {
        match self {
            Self::Llama(_) => "llama",
            Self::ChatGlm(_) => "chatglm",
            Self::ChatGlm2(_) => "chatglm2",
        }
    }

    /// Whether this is a ChatGLM model (any version).
    pub fn is_chatglm(&self) -> bool {
        !matches!(self, Self::Llama(_))
    }

    pub fn dtype(&self) -> DType {
        match self {
            Self::Llama(m) => m.dtype(),
            Self::ChatGlm(m) => m.dtype(),
            Self::ChatGlm2(m) => m.dtype(),
        }
    }

    pub fn device(&self) -> &Device {
        match self {
            Self::Llama(m) => m.device(),
            Self::ChatGlm(m) => m.device(),
            Self::ChatGlm2(m) => m.device(),
        }
    }

    /// Width of the hidden states.
    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Llama(m) => m.cfg.hidden_size,
            Self::ChatGlm(m) => m.cfg.hidden_size,
            Self::ChatGlm2(m) => m.cfg.hidden_size,
        }
    }

    /// Number of logits per position (ChatGLM2: `padded_vocab_size`).
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Llama(m) => m.cfg.vocab_size,
            Self::ChatGlm(m) => m.cfg.vocab_size,
            Self::ChatGlm2(m) => m.cfg.padded_vocab_size,
        }
    }

    /// The longest sequence the model was configured for (`max_position_embeddings`;
    /// ChatGLM-6B `max_sequence_length`, ChatGLM2/3 `seq_length`).
    pub fn max_positions(&self) -> usize {
        match self {
            Self::Llama(m) => m.cfg.max_position_embeddings,
            Self::ChatGlm(m) => m.cfg.max_sequence_length,
            Self::ChatGlm2(m) => m.cfg.seq_length,
        }
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        match self {
            Self::Llama(m) => m.layers.len(),
            Self::ChatGlm(m) => m.layers.len(),
            Self::ChatGlm2(m) => m.layers.len(),
        }
    }

    /// The default `--lora_target`: `q_proj,v_proj` for Llama, the fused `query_key_value`
    /// for ChatGLM (as the reference).
    pub fn default_lora_target(&self) -> &'static str {
        match self {
            Self::Llama(_) => "q_proj,v_proj",
            _ => "query_key_value",
        }
    }

    /// A fresh, empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        match self {
            Self::Llama(m) => m.new_cache(),
            Self::ChatGlm(m) => m.new_cache(),
            Self::ChatGlm2(m) => m.new_cache(),
        }
    }

    /// ChatGLM2 positions of the new tokens: from the padding mask when given (`cumsum - 1`,
    /// as the tokenizer pads them), else the original's `past, past + 1, ...`.
    fn glm2_positions(mask: Option<&Tensor>, t: usize) -> Result<Option<Vec<Vec<i64>>>> {
        Ok(match mask {
            Some(m) => Some(positions_from_mask(&mask_rows(m)?, t)),
            None => None,
        })
    }

    /// Final hidden states `[b, t, hidden]` (after the final norm: what the LM head reads).
    ///
    /// * `input_ids`: `[b, t]`, the new tokens.
    /// * `attention_mask`: `[b, past + t]`, `1` = token, left padding only; `None` = all real.
    /// * `cache`: appended to when given.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        match self {
            Self::Llama(m) => m.forward_hidden(input_ids, attention_mask, None, cache),
            Self::ChatGlm(m) => Ok(m.forward(input_ids, attention_mask, cache)?.1),
            Self::ChatGlm2(m) => {
                let t = input_ids.dim(1)?;
                let pos = Self::glm2_positions(attention_mask, t)?;
                Ok(m.forward(input_ids, attention_mask, pos.as_deref(), cache)?
                    .1)
            }
        }
    }

    /// `(final hidden states, value hidden states)` of a full pass without a cache. The value
    /// hidden states are what TRL's value head reads (`hidden_states[-1]`): after the final
    /// norm for Llama and ChatGLM-6B, *before* it for ChatGLM2/3.
    pub fn forward_with_value(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Llama(m) => {
                let h = m.forward_hidden(input_ids, attention_mask, None, None)?;
                Ok((h.clone(), h))
            }
            Self::ChatGlm(m) => {
                let h = m.forward(input_ids, attention_mask, None)?.1;
                Ok((h.clone(), h))
            }
            Self::ChatGlm2(m) => {
                let t = input_ids.dim(1)?;
                let pos = Self::glm2_positions(attention_mask, t)?;
                let mut hs =
                    m.forward_hidden_states(input_ids, attention_mask, pos.as_deref(), None)?;
                let value = hs.all.pop().expect("at least the embeddings");
                Ok((hs.last, value))
            }
        }
    }

    /// bf16 linear weights with f32 activations on the CPU (see
    /// [`crate::Llama::use_bf16_linear_weights`]); `false` (nothing changed) for ChatGLM.
    pub fn use_bf16_linear_weights(&mut self) -> Result<bool> {
        match self {
            Self::Llama(m) => {
                m.use_bf16_linear_weights()?;
                Ok(true)
            }
            Self::ChatGlm(_) | Self::ChatGlm2(_) => Ok(false),
        }
    }

    /// The LM head's weight `[vocab, hidden]` when the head is a plain bias-free linear with no
    /// adapter (so that head and loss can be fused: `llmtune_ops::linear_cross_entropy_sum`).
    pub fn plain_lm_head(&self) -> Option<&Tensor> {
        match self {
            Self::Llama(m) => m.plain_lm_head(),
            Self::ChatGlm(m) => m.plain_lm_head(),
            Self::ChatGlm2(m) => m.plain_lm_head(),
        }
    }

    /// Logits `[.., vocab]` from final hidden states `[.., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match self {
            Self::Llama(m) => m.logits(hidden),
            Self::ChatGlm(m) => m.logits(hidden),
            Self::ChatGlm2(m) => m.logits(hidden),
        }
    }

    /// Full forward: `(logits [b, t, vocab], hidden [b, t, hidden])`; arguments as
    /// [`CausalLm::forward_hidden`].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, Tensor)> {
        let hidden = self.forward_hidden(input_ids, attention_mask, cache)?;
        Ok((self.logits(&hidden)?, hidden))
    }

    /// Logits of the last position only `[b, vocab]` in f32 (generation).
    pub fn forward_last(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        match self {
            Self::Llama(m) => m.forward_last(input_ids, attention_mask, cache),
            Self::ChatGlm(m) => m.forward_last(input_ids, attention_mask, cache),
            Self::ChatGlm2(_) => {
                let hidden = self.forward_hidden(input_ids, attention_mask, cache)?;
                let t = hidden.dim(1)?;
                let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
                Ok(self.logits(&last)?.to_dtype(DType::F32)?)
            }
        }
    }

    // -- Layer-level access (gradient checkpointing). --------------------------------------

    /// Token embeddings `[b, t, hidden]` of `input_ids` `[b, t]`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Llama(m) => m.embed(input_ids),
            Self::ChatGlm(m) => m.embed(input_ids),
            Self::ChatGlm2(m) => m.embed(input_ids),
        }
    }

    /// Whether the token embeddings are trained (full fine-tuning).
    pub fn embed_is_variable(&self) -> bool {
        match self {
            Self::Llama(m) => m.embed_tokens.is_variable(),
            Self::ChatGlm(m) => m.word_embeddings.is_variable(),
            Self::ChatGlm2(m) => m.word_embeddings.is_variable(),
        }
    }

    /// The per-layer context of a full-sequence pass without a cache (same positions and
    /// masks as [`CausalLm::forward_hidden`]).
    pub fn layer_context(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<LayerCtx> {
        let (b, t) = input_ids.dims2()?;
        Ok(match self {
            Self::Llama(m) => LayerCtx::Llama(m.layer_context(attention_mask, b, t)?),
            Self::ChatGlm(m) => LayerCtx::ChatGlm(m.layer_context(input_ids, attention_mask)?),
            Self::ChatGlm2(m) => {
                let pos = Self::glm2_positions(attention_mask, t)?;
                LayerCtx::ChatGlm2(m.layer_context(b, t, 0, attention_mask, pos.as_deref())?)
            }
        })
    }

    /// Runs decoder layer `i` on `x` `[b, t, hidden]` with a context of this model.
    pub fn layer_forward(&self, ctx: &LayerCtx, i: usize, x: &Tensor) -> Result<Tensor> {
        match (self, ctx) {
            (Self::Llama(m), LayerCtx::Llama(c)) => c.forward(&m.layers[i], x),
            (Self::ChatGlm(m), LayerCtx::ChatGlm(c)) => c.forward(&m.layers[i], x),
            (Self::ChatGlm2(m), LayerCtx::ChatGlm2(c)) => c.forward(&m.layers[i], x),
            _ => Err(crate::ModelError::Input(format!(
                "layer context of another architecture passed to a {} model",
                self.arch()
            ))),
        }
    }

    /// The final norm on the last layer's output.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Llama(m) => m.norm.forward(x)?,
            Self::ChatGlm(m) => m.final_layernorm.forward(x)?,
            Self::ChatGlm2(m) => m.final_layernorm.forward(x)?,
        })
    }

    /// The value hidden states (see [`CausalLm::forward_with_value`]) from the last layer's
    /// output.
    pub fn value_from_top(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::ChatGlm2(_) => Ok(x.clone()),
            _ => self.final_norm(x),
        }
    }

    // -- Parameters. ----------------------------------------------------------------------

    /// Every linear layer by its checkpoint module name, for attaching adapters.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        match self {
            Self::Llama(m) => m.linears_mut(),
            Self::ChatGlm(m) => m.linears_mut(),
            Self::ChatGlm2(m) => m.linears_mut(),
        }
    }

    /// Every parameter tensor by its checkpoint name (freeze/full tuning, merging, export).
    pub fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        match self {
            Self::Llama(m) => m.params_mut(),
            Self::ChatGlm(m) => m.params_mut(),
            Self::ChatGlm2(m) => m.params_mut(),
        }
    }
}
