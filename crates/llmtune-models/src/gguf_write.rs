//! Writing a Llama-family model as a GGUF file that llama.cpp loads (`llmtune export
//! --export_gguf`).
//!
//! The layout follows llama.cpp's `convert_hf_to_gguf.py` (llama.cpp 0c1e57098, as vendored
//! in the PyPI package `llama-cpp-python` 0.3.36):
//!
//! * architecture `llama` (model types `llama`, `mistral`, ...) or `qwen2`;
//! * tensors under GGUF names (`token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output`
//!   when the embeddings are untied), the rows of `attn_q`/`attn_k` permuted for `llama`
//!   as the converter's `LlamaModel.permute` does (our reader undoes it; `qwen2` is not
//!   permuted);
//! * 1-D tensors (norms, biases) in F32, matrices in F16 or Q8_0 (a matrix whose rows are
//!   not a multiple of 32 falls back to F16 under Q8_0, as the converter does);
//! * the hyper-parameters `{arch}.context_length`, `embedding_length`, `block_count`,
//!   `feed_forward_length`, `attention.head_count`, `attention.head_count_kv`,
//!   `rope.freq_base`, `attention.layer_norm_rms_epsilon`, `rope.dimension_count`,
//!   `vocab_size` (and `attention.key_length`/`value_length` when `head_dim` is not
//!   `hidden_size / heads`);
//! * the tokenizer as `tokenizer.ggml.*` (byte-level BPE only, `model = gpt2`; see
//!   [`llmtune_tokenize::gguf::vocab_for_gguf`]), `add_bos_token`, and
//!   `tokenizer.chat_template` when one is known.
//!
//! The file is written to a temporary name in the same folder and renamed into place.

use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use llmtune_tokenize::Tokenizer;

use crate::config::LlamaConfig;
use crate::{ModelError, Result};

/// The weight type of an exported GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F16,
    Q8_0,
}

impl GgufType {
    /// Parses `f16` or `q8_0` (case-insensitive).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f16" | "float16" => Ok(Self::F16),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            other => Err(format!("GGUF type {other:?}: expected f16 or q8_0")),
        }
    }

    /// `f16` / `q8_0` (for file names).
    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_F16` = 1, `MOSTLY_Q8_0` = 7).
    pub fn file_type(self) -> u32 {
        match self {
            Self::F16 => 1,
            Self::Q8_0 => 7,
        }
    }

    fn matrix_dtype(self) -> GgmlDType {
        match self {
            Self::F16 => GgmlDType::F16,
            Self::Q8_0 => GgmlDType::Q8_0,
        }
    }
}

/// What [`write_gguf`] needs besides the weights.
pub struct GgufExport<'a> {
    /// `general.name`.
    pub name: &'a str,
    pub config: &'a LlamaConfig,
    pub tokenizer: &'a Tokenizer,
    /// `tokenizer.chat_template` (a Jinja template), if known.
    pub chat_template: Option<&'a str>,
    pub ty: GgufType,
}

/// The GGUF architecture for a config's `model_type`: `qwen2` or `llama`.
pub fn gguf_arch(cfg: &LlamaConfig) -> &'static str {
    if cfg.model_type == "qwen2" {
        "qwen2"
    } else {
        "llama"
    }
}

/// The GGUF name of an HF tensor name of a Llama-family model.
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = part.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// llama.cpp's `LlamaModel.permute(w, n_head)`: rows `[h, 2, d/2]` to `[h, d/2, 2]`
/// (the inverse of what [`crate::gguf`] undoes on read).
pub fn permute_rows(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let head_dim = dims[0] / n_head;
    let mut shape = vec![n_head, 2, head_dim / 2];
    shape.extend(&dims[1..]);
    Ok(t.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

fn s(v: &str) -> gguf_file::Value {
    gguf_file::Value::String(v.to_string())
}
fn u(v: usize) -> gguf_file::Value {
    gguf_file::Value::U32(v as u32)
}

/// The metadata, in the order the converter writes it.
fn metadata(e: &GgufExport<'_>) -> Result<Vec<(String, gguf_file::Value)>> {
    let c = e.config;
    let arch = gguf_arch(c);
    let k = |key: &str| format!("{arch}.{key}");
    let mut md: Vec<(String, gguf_file::Value)> = vec![
        ("general.architecture".into(), s(arch)),
        ("general.type".into(), s("model")),
        ("general.name".into(), s(e.name)),
        (k("block_count"), u(c.num_hidden_layers)),
        (k("context_length"), u(c.max_position_embeddings)),
        (k("embedding_length"), u(c.hidden_size)),
        (k("feed_forward_length"), u(c.intermediate_size)),
        (k("attention.head_count"), u(c.num_attention_heads)),
        (k("attention.head_count_kv"), u(c.num_key_value_heads)),
        (
            k("rope.freq_base"),
            gguf_file::Value::F32(c.rope_theta as f32),
        ),
        (
            k("attention.layer_norm_rms_epsilon"),
            gguf_file::Value::F32(c.rms_norm_eps as f32),
        ),
    ];
    if c.head_dim * c.num_attention_heads != c.hidden_size {
        md.push((k("attention.key_length"), u(c.head_dim)));
        md.push((k("attention.value_length"), u(c.head_dim)));
    }
    md.push(("general.file_type".into(), u(e.ty.file_type() as usize)));
    md.push((k("vocab_size"), u(c.vocab_size)));
    md.push((k("rope.dimension_count"), u(c.head_dim)));
    md.push(("general.quantization_version".into(), u(2)));

    let v = llmtune_tokenize::gguf::vocab_for_gguf(e.tokenizer, c.vocab_size)?;
    let bos = e.tokenizer.bos_id();
    // Whether the tokenizer adds BOS itself (its post-processor), as `add_bos_token` says.
    let adds_bos = match bos {
        Some(b) => e.tokenizer.encode("a", true)?.first() == Some(&b),
        None => false,
    };
    md.push(("tokenizer.ggml.model".into(), s(&v.model)));
    md.push(("tokenizer.ggml.pre".into(), s(&v.pre)));
    md.push((
        "tokenizer.ggml.tokens".into(),
        gguf_file::Value::Array(v.tokens.iter().map(|t| s(t)).collect()),
    ));
    md.push((
        "tokenizer.ggml.token_type".into(),
        gguf_file::Value::Array(
            v.token_types
                .iter()
                .map(|&t| gguf_file::Value::I32(t))
                .collect(),
        ),
    ));
    md.push((
        "tokenizer.ggml.merges".into(),
        gguf_file::Value::Array(v.merges.iter().map(|m| s(m)).collect()),
    ));
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", v.bos),
        ("tokenizer.ggml.eos_token_id", v.eos),
        ("tokenizer.ggml.padding_token_id", v.pad),
    ] {
        if let Some(id) = id {
            md.push((key.into(), gguf_file::Value::U32(id)));
        }
    }
    md.push((
        "tokenizer.ggml.add_bos_token".into(),
        gguf_file::Value::Bool(adds_bos),
    ));
    if let Some(t) = e.chat_template {
        md.push(("tokenizer.chat_template".into(), s(t)));
    }
    Ok(md)
}

/// Writes `tensors` (HF names, any float dtype) with the metadata of `e` to `path`.
/// Fails with a clear message for what llama.cpp's `llama`/`qwen2` graphs would not read
/// (rope scaling, biases on a `llama` model, unknown tensor names).
pub fn write_gguf(path: &Path, tensors: &[(String, Tensor)], e: &GgufExport<'_>) -> Result<()> {
    let c = e.config;
    let arch = gguf_arch(c);
    let unsupported = |msg: String| ModelError::Model(format!("GGUF export: {msg}"));
    if c.rope_scaling.is_some() {
        return Err(unsupported(
            "rope_scaling is not written (llama.cpp needs rope_freqs/scaling keys that this \
             exporter does not produce); export the HF layout and convert it with \
             convert_hf_to_gguf.py"
                .into(),
        ));
    }
    if arch == "llama" && (c.qkv_bias || c.o_bias) {
        return Err(unsupported(
            "attention biases on a llama-architecture model are not supported".into(),
        ));
    }
    let md = metadata(e)?;

    let mut qts: Vec<(String, QTensor)> = Vec::with_capacity(tensors.len());
    for (hf, t) in tensors {
        let name = gguf_tensor_name(hf)
            .ok_or_else(|| unsupported(format!("tensor {hf} has no GGUF name")))?;
        let mut t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        if arch == "llama" {
            if hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.q_proj.bias") {
                t = permute_rows(&t, c.num_attention_heads)?;
            } else if hf.ends_with("self_attn.k_proj.weight")
                || hf.ends_with("self_attn.k_proj.bias")
            {
                t = permute_rows(&t, c.num_key_value_heads)?;
            }
        }
        let dtype = if t.rank() < 2 {
            GgmlDType::F32
        } else {
            let want = e.ty.matrix_dtype();
            if t.dim(candle_core::D::Minus1)? % want.block_size() == 0 {
                want
            } else {
                GgmlDType::F16
            }
        };
        let q = QTensor::quantize(&t, dtype)
            .map_err(|err| unsupported(format!("quantizing {hf} to {dtype:?}: {err}")))?;
        qts.push((name, q));
    }

    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_else(|| "model.gguf".into());
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let write = || -> Result<()> {
        let f = std::fs::File::create(&tmp).map_err(|err| ModelError::io(&tmp, err))?;
        let mut w = BufWriter::new(f);
        let md_refs: Vec<(&str, &gguf_file::Value)> =
            md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut w, &md_refs, &t_refs).map_err(|err| ModelError::Weights {
            path: tmp.clone(),
            msg: format!("writing GGUF: {err}"),
        })?;
        let f = w
            .into_inner()
            .map_err(|err| ModelError::io(&tmp, err.into_error()))?;
        f.sync_all().map_err(|err| ModelError::io(&tmp, err))?;
        Ok(())
    };
    if let Err(err) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(err);
    }
    std::fs::rename(&tmp, path).map_err(|err| ModelError::io(path, err))?;
    Ok(())
}

/// The chat template of a model source: `tokenizer.chat_template` of a `.gguf` file, or a
/// folder's `chat_template.jinja` / `tokenizer_config.json` `chat_template` (a string, or the
/// entry named `default` of a list). `None` when there is none.
pub fn chat_template_of(source: &Path) -> Result<Option<String>> {
    if source.is_file() {
        let mut f = std::fs::File::open(source).map_err(|e| ModelError::io(source, e))?;
        let content = gguf_file::Content::read(&mut f).map_err(|e| ModelError::Weights {
            path: source.to_path_buf(),
            msg: format!("not a valid GGUF file: {e}"),
        })?;
        return Ok(content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned()));
    }
    let jinja = source.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| ModelError::io(&jinja, e));
    }
    let tc = source.join("tokenizer_config.json");
    if !tc.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&tc).map_err(|e| ModelError::io(&tc, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: tc.clone(),
        msg: e.to_string(),
    })?;
    Ok(match v.get("chat_template") {
        Some(serde_json::Value::String(t)) => Some(t.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|x| x.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|x| x.get("template"))
            .and_then(|t| t.as_str())
            .map(String::from),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_is_the_inverse_of_the_readers_unpermute() {
        // 2 heads of dim 4, 3 columns: rows [h, 2, 2] -> [h, 2, 2] transposed.
        let t = Tensor::arange(0f32, 24., &Device::Cpu)
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        let p = permute_rows(&t, 2).unwrap();
        let rows: Vec<Vec<f32>> = p.to_vec2().unwrap();
        // Head 0 rows 0..4 become 0, 2, 1, 3 (interleaved rotary pairs).
        assert_eq!(rows[1], vec![6., 7., 8.]);
        assert_eq!(rows[2], vec![3., 4., 5.]);
        assert_eq!(rows[5], vec![18., 19., 20.]);
        // Reading back (reshape [h, d/2, 2] and transpose) restores the HF rows.
        let back = p
            .reshape((2, 2, 2, 3))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn names_and_types() {
        assert_eq!(
            gguf_tensor_name("model.layers.3.self_attn.q_proj.bias").as_deref(),
            Some("blk.3.attn_q.bias")
        );
        assert_eq!(
            gguf_tensor_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(gguf_tensor_name("v_head.summary.weight"), None);
        assert_eq!(GgufType::parse("Q8_0"), Ok(GgufType::Q8_0));
        assert!(GgufType::parse("q4_k").unwrap_err().contains("f16 or q8_0"));
    }
}
