//! GGUF models (`llama` and `qwen2` architectures): config from metadata, tensors
//! dequantized to f32 under their HF names, and the tokenizer from `tokenizer.ggml.*`.
//!
//! [`load_gguf_quantized`] keeps the `Q4_1` and `Q8_0` matrices of the linear layers (and of
//! a tied LM head) in their blocks for the inference-only quantized path
//! ([`llmtune_ops::quant`]); everything else is dequantized as before.
//!
//! llama.cpp's converter permutes the rows of `q_proj`/`k_proj` for the `llama` architecture
//! (to interleaved rotary pairs); we undo it so the weights match the HF layout.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Tensor};
use llmtune_ops::quant::{QFormat, QMatrix};
use llmtune_tokenize::gguf::GgufVocab;

use crate::config::LlamaConfig;
use crate::loader::MapSource;
use crate::{ModelError, Result};

/// A GGUF file read into memory.
pub struct GgufModel {
    pub config: LlamaConfig,
    pub weights: MapSource,
    pub vocab: GgufVocab,
    /// `tokenizer.chat_template`, if any.
    pub chat_template: Option<String>,
    /// Matrices kept quantized by [`load_gguf_quantized`] (HF names); their entries in
    /// `weights` are placeholders holding no memory. Empty from [`load_gguf`].
    pub quant: HashMap<String, Arc<QMatrix>>,
}

fn hf_name(gguf: &str) -> Option<String> {
    let direct = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Some(d.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = part.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes llama.cpp's `permute(w, n_head)` on q/k rows: the converter maps HF rows
/// `[h, 2, d/2]` to `[h, d/2, 2]`; we map back.
fn unpermute(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let out = dims[0];
    let head_dim = out / n_head;
    let rest: Vec<usize> = dims[1..].to_vec();
    let mut shape = vec![n_head, head_dim / 2, 2];
    shape.extend(&rest);
    let t = t.reshape(shape)?.transpose(1, 2)?.contiguous()?;
    Ok(t.reshape(dims)?)
}

/// The row permutation [`unpermute`] applies: row `i` of the HF layout is row `perm[i]` of
/// the GGUF one.
fn unpermute_rows(rows: usize, n_head: usize) -> Vec<usize> {
    let hd = rows / n_head;
    let half = hd / 2;
    (0..rows)
        .map(|i| {
            let (h, r) = (i / hd, i % hd);
            let (a, b) = (r / half, r % half);
            h * hd + b * 2 + a
        })
        .collect()
}

/// Whether the quantized path keeps this tensor (an HF weight name) in its blocks.
fn keeps_quantized(hf: &str, tied: bool) -> bool {
    let linear = [
        "q_proj.weight",
        "k_proj.weight",
        "v_proj.weight",
        "o_proj.weight",
        "gate_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
    ];
    hf == "lm_head.weight"
        || (tied && hf == "model.embed_tokens.weight")
        || (hf.starts_with("model.layers.") && linear.iter().any(|l| hf.ends_with(l)))
}

struct Meta<'a> {
    md: &'a HashMap<String, gguf_file::Value>,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&gguf_file::Value> {
        self.md.get(key)
    }
    fn err(&self, key: &str, msg: &str) -> ModelError {
        ModelError::Weights {
            path: self.path.to_path_buf(),
            msg: format!("GGUF metadata {key}: {msg}"),
        }
    }
    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key).ok_or_else(|| self.err(key, "missing"))?;
        v.to_u64()
            .or_else(|_| v.to_u32().map(|x| x as u64))
            .or_else(|_| v.to_i32().map(|x| x as u64))
            .map(|x| x as usize)
            .map_err(|e| self.err(key, &e.to_string()))
    }
    fn opt_u32(&self, key: &str) -> Option<u32> {
        let v = self.get(key)?;
        v.to_u32()
            .ok()
            .or_else(|| v.to_i32().ok().map(|x| x as u32))
    }
    fn f64(&self, key: &str) -> Option<f64> {
        let v = self.get(key)?;
        v.to_f32().map(|x| x as f64).or_else(|_| v.to_f64()).ok()
    }
    fn string(&self, key: &str) -> Option<String> {
        self.get(key)?.to_string().ok().cloned()
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(v) => v
                .to_vec()
                .map_err(|e| self.err(key, &e.to_string()))?
                .iter()
                .map(|x| {
                    x.to_string()
                        .cloned()
                        .map_err(|e| self.err(key, &e.to_string()))
                })
                .collect(),
        }
    }
    fn ints(&self, key: &str) -> Result<Vec<i32>> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(v) => v
                .to_vec()
                .map_err(|e| self.err(key, &e.to_string()))?
                .iter()
                .map(|x| x.to_i32().map_err(|e| self.err(key, &e.to_string())))
                .collect(),
        }
    }
}

/// Reads only the metadata of a GGUF file: the architecture name and the tokenizer vocabulary.
pub fn read_gguf_vocab(path: &Path) -> Result<(String, GgufVocab)> {
    let (_, content) = open_gguf(path)?;
    let m = Meta {
        md: &content.metadata,
        path,
    };
    let arch = architecture(&m)?;
    Ok((arch, vocab_of(&m)?))
}

/// Opens a GGUF file and reads its header (metadata and tensor index).
fn open_gguf(path: &Path) -> Result<(std::fs::File, gguf_file::Content)> {
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| ModelError::Weights {
        path: path.to_path_buf(),
        msg: format!("not a valid GGUF file (truncated or corrupt?): {e}"),
    })?;
    Ok((file, content))
}

/// `general.architecture`, which every GGUF file must name.
fn architecture(m: &Meta<'_>) -> Result<String> {
    m.string("general.architecture")
        .ok_or_else(|| m.err("general.architecture", "missing"))
}

fn vocab_of(m: &Meta<'_>) -> Result<GgufVocab> {
    let eos = m.opt_u32("tokenizer.ggml.eos_token_id");
    let mut stop: Vec<u32> = eos.into_iter().collect();
    if let Some(eot) = m.opt_u32("tokenizer.ggml.eot_token_id") {
        if !stop.contains(&eot) {
            stop.push(eot);
        }
    }
    Ok(GgufVocab {
        model: m.string("tokenizer.ggml.model").unwrap_or_default(),
        pre: m
            .string("tokenizer.ggml.pre")
            .unwrap_or_else(|| "default".into()),
        tokens: m.strings("tokenizer.ggml.tokens")?,
        token_types: m.ints("tokenizer.ggml.token_type")?,
        merges: m.strings("tokenizer.ggml.merges")?,
        bos: m.opt_u32("tokenizer.ggml.bos_token_id"),
        eos,
        pad: m.opt_u32("tokenizer.ggml.padding_token_id"),
        extra_stop: stop,
    })
}

/// Reads a GGUF file: config, dequantized f32 weights (HF names) and tokenizer vocabulary.
pub fn load_gguf(path: &Path, device: &Device) -> Result<GgufModel> {
    load(path, device, Keep::Nothing)
}

/// As [`load_gguf`], but keeps the `Q4_1`/`Q8_0` matrices of the linear layers and of the LM
/// head quantized (in [`GgufModel::quant`]) for inference on the CPU; other formats are
/// dequantized. The tied token embeddings are kept both ways (f32 for the lookups).
pub fn load_gguf_quantized(path: &Path) -> Result<GgufModel> {
    load(path, &Device::Cpu, Keep::Inference)
}

/// As [`load_gguf`], for a quantized LoRA base (`--quantization_bit 4|8`, CPU): the decoder
/// layers' linear weights come back quantized in [`GgufModel::quant`], as `Q4_1` (4 bits) or
/// `Q8_0` (8 bits). Those the file stores in that format are kept as they are (no second
/// rounding); the others are dequantized and quantized to it one tensor at a time, so the
/// float weights are never held whole. Embeddings, norms and the LM head come back f32 (the
/// training head needs them); a matrix whose input size is not a multiple of 32 stays f32.
pub fn load_gguf_base(path: &Path, bits: u32) -> Result<GgufModel> {
    let format = crate::llama::quant_format(bits, &Device::Cpu)?;
    load(path, &Device::Cpu, Keep::Base(format))
}

/// What [`load`] keeps quantized.
#[derive(Clone, Copy)]
enum Keep {
    /// Nothing: every tensor is dequantized.
    Nothing,
    /// For inference: `Q4_1`/`Q8_0` linear layers and LM head (tied embeddings both ways).
    Inference,
    /// A LoRA base: the decoder layers' linear weights, in this format.
    Base((QFormat, GgmlDType)),
}

fn load(path: &Path, device: &Device, keep: Keep) -> Result<GgufModel> {
    let (mut file, content) = open_gguf(path)?;
    let m = Meta {
        md: &content.metadata,
        path,
    };
    let arch = architecture(&m)?;
    if arch != "llama" && arch != "qwen2" {
        return Err(m.err(
            "general.architecture",
            &format!("{arch:?} is not supported (llama, qwen2)"),
        ));
    }
    let k = |s: &str| format!("{arch}.{s}");
    let vocab = vocab_of(&m)?;
    let n_head = m.usize(&k("attention.head_count"))?;
    let n_kv = m.usize(&k("attention.head_count_kv")).unwrap_or(n_head);
    let hidden = m.usize(&k("embedding_length"))?;
    let vocab_size = m.usize(&k("vocab_size")).unwrap_or(vocab.tokens.len());
    let has_output = content.tensor_infos.contains_key("output.weight");
    let config = LlamaConfig {
        model_type: arch.clone(),
        vocab_size,
        hidden_size: hidden,
        intermediate_size: m.usize(&k("feed_forward_length"))?,
        num_hidden_layers: m.usize(&k("block_count"))?,
        num_attention_heads: n_head,
        num_key_value_heads: n_kv,
        head_dim: m
            .usize(&k("attention.key_length"))
            .unwrap_or(hidden / n_head),
        rms_norm_eps: m
            .f64(&k("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-6),
        rope_theta: m.f64(&k("rope.freq_base")).unwrap_or(10000.0),
        rope_scaling: None,
        max_position_embeddings: m.usize(&k("context_length")).unwrap_or(2048),
        tie_word_embeddings: !has_output,
        qkv_bias: arch == "qwen2",
        o_bias: false,
        bos_token_id: vocab.bos,
        eos_token_ids: vocab.extra_stop.clone(),
        pad_token_id: vocab.pad,
    };

    let mut tensors = HashMap::new();
    let mut quant = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(name) else {
            tracing::debug!("GGUF {}: skipping tensor {name}", path.display());
            continue;
        };
        let qt =
            content
                .tensor(&mut file, name, &Device::Cpu)
                .map_err(|e| ModelError::Weights {
                    path: path.to_path_buf(),
                    msg: format!("cannot read tensor {name}: {e}"),
                })?;
        let format = match qt.dtype() {
            GgmlDType::Q4_1 => Some(QFormat::Q4_1),
            GgmlDType::Q8_0 => Some(QFormat::Q8_0),
            _ => None,
        };
        let dims = qt.shape().dims().to_vec();
        // A LoRA base keeps only the decoder layers' matrices, and only in its own format.
        let (keep_this, format) = match keep {
            Keep::Nothing => (false, None),
            Keep::Inference => (keeps_quantized(&hf, !has_output), format),
            Keep::Base((f, gd)) => {
                let layer = hf.starts_with("model.") && keeps_quantized(&hf, false);
                (layer, (qt.dtype() == gd).then_some(f))
            }
        };
        if let (true, Some(format), &[rows, cols]) = (keep_this, format, &dims[..]) {
            let bytes = qt.data()?;
            let mut q = QMatrix::from_ggml_bytes(format, rows, cols, &bytes).map_err(|msg| {
                ModelError::Weights {
                    path: path.to_path_buf(),
                    msg: format!("tensor {name}: {msg}"),
                }
            })?;
            if arch == "llama" && hf.ends_with("q_proj.weight") {
                q = q.permute_rows(&unpermute_rows(rows, n_head));
            } else if arch == "llama" && hf.ends_with("k_proj.weight") {
                q = q.permute_rows(&unpermute_rows(rows, n_kv));
            }
            if hf != "model.embed_tokens.weight" {
                // A placeholder of the right shape that holds one float.
                let p = Tensor::zeros((1, 1), DType::F32, device)?.broadcast_as((rows, cols))?;
                tensors.insert(hf.clone(), p);
                quant.insert(hf, Arc::new(q));
                continue;
            }
            quant.insert(hf.clone(), Arc::new(q));
        }
        let mut t = qt.dequantize(&Device::Cpu)?;
        if arch == "llama" {
            if hf.ends_with("q_proj.weight") || hf.ends_with("q_proj.bias") {
                t = unpermute(&t, n_head)?;
            } else if hf.ends_with("k_proj.weight") || hf.ends_with("k_proj.bias") {
                t = unpermute(&t, n_kv)?;
            }
        }
        if let (Keep::Base(f), true, &[rows, cols]) = (keep, keep_this, &dims[..]) {
            if cols % llmtune_ops::quant::QK == 0 {
                let q = crate::llama::quantize_matrix(&hf, &t, f)?;
                let p = Tensor::zeros((1, 1), DType::F32, device)?.broadcast_as((rows, cols))?;
                tensors.insert(hf.clone(), p);
                quant.insert(hf, Arc::new(q));
                continue;
            }
        }
        tensors.insert(hf, t.to_device(device)?);
    }

    Ok(GgufModel {
        config,
        weights: MapSource::new(tensors, path),
        vocab,
        chat_template: m.string("tokenizer.chat_template"),
        quant,
    })
}
