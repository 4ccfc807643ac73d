//! `llmtune export`: the base model with its `--checkpoint_dir` adapters merged, written in
//! the HF layout that transformers, vLLM and llama.cpp's converter read:
//!
//! * `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` of at most
//!   `--max_shard_size` with `model.safetensors.index.json`;
//! * `config.json` (from the model's config, whatever it was loaded from: HF folder or GGUF);
//! * `generation_config.json` with the template's stop ids as `eos_token_id`;
//! * `tokenizer.json` and `tokenizer_config.json`.
//!
//! ChatGLM models keep their original tensor names, and the folder's `config.json` (dtype
//! updated), remote code (`*.py`) and tokenizer files (`ice_text.model`/`tokenizer.model`,
//! `tokenizer_config.json`) are copied.
//!
//! With `--export_gguf f16` and/or `q8_0` (comma-separated), the Llama-family model is also
//! written as `model-f16.gguf` / `model-q8_0.gguf` beside the HF files, in the layout of
//! llama.cpp's `convert_hf_to_gguf.py` with the tokenizer and chat template in its metadata
//! (see `llmtune_models::gguf_write`); ChatGLM models cannot be written as GGUF.
//!
//! Every file is written atomically (temporary file, then rename).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use candle_core::{DType, Tensor};
use llmtune_data::template::Template;

use crate::args::load_merged_with;

/// Merge adapters into the base and export the model (HF layout).
#[derive(clap::Args, Debug)]
#[command(rename_all = "snake_case")]
pub struct ExportArgs {
    /// A HF model folder, a .gguf file, or a built-in alias (default: smollm2-135m).
    #[arg(long)]
    pub model_name_or_path: Option<String>,
    /// LoRA adapter folders to merge, comma-separated, in order.
    #[arg(long)]
    pub checkpoint_dir: Option<String>,
    /// Chat template whose stop ids go into generation_config.json (default: the model's own).
    #[arg(long)]
    pub template: Option<String>,
    /// The folder to write (created; files in it are replaced).
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Largest shard, e.g. 2GB, 500MB, 10GiB (decimal units as transformers uses).
    #[arg(long, default_value = "10GB")]
    pub max_shard_size: String,
    /// Weight dtype on disk: float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    pub export_dtype: String,
    /// Also write a GGUF for llama.cpp: `f16`, `q8_0`, or both comma-separated, as
    /// `<output_dir>/model-<type>.gguf` (tokenizer and chat template in its metadata;
    /// Llama-family models with a byte-level BPE tokenizer only).
    #[arg(long, value_name = "TYPES")]
    pub export_gguf: Option<String>,
}

/// Parses `--export_gguf` (`f16`, `q8_0`, or both comma-separated).
pub fn parse_gguf_types(s: &str) -> anyhow::Result<Vec<llmtune_models::gguf_write::GgufType>> {
    let mut out = vec![];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let t = llmtune_models::gguf_write::GgufType::parse(part)
            .map_err(|e| anyhow::anyhow!("--export_gguf: {e}"))?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    anyhow::ensure!(
        !out.is_empty(),
        "--export_gguf: expected f16, q8_0 or f16,q8_0"
    );
    Ok(out)
}

/// Parses `2GB`, `500MB`, `10GiB`, `1000` (bytes).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().with_context(|| {
        format!("--max_shard_size {s:?}: expected a number with a unit, e.g. 2GB")
    })?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => anyhow::bail!(
            "--max_shard_size {s:?}: unknown unit {other:?} (KB, MB, GB, KiB, MiB, GiB)"
        ),
    };
    anyhow::ensure!(n > 0.0, "--max_shard_size must be positive");
    Ok((n * mult) as u64)
}

fn write_json(path: &Path, v: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v)? + "\n";
    llmtune_train::io::atomic_write(path, text.as_bytes())?;
    Ok(())
}

/// Splits `(name, bytes)` into consecutive groups of at most `max` bytes (a tensor larger than
/// `max` gets a shard of its own), as transformers' `shard_checkpoint` does.
pub fn plan_shards(sizes: &[(String, u64)], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![];
    let mut current = 0u64;
    for (i, (_, sz)) in sizes.iter().enumerate() {
        if shards.is_empty() || (current + sz > max && current > 0) {
            shards.push(vec![]);
            current = 0;
        }
        shards.last_mut().expect("a shard").push(i);
        current += sz;
    }
    shards
}

const CHATGLM_GGUF: &str = "--export_gguf: ChatGLM models cannot be written as GGUF (llama.cpp's \
     chatglm architecture needs fused QKV tensors and a SentencePiece vocabulary this exporter \
     does not produce); export without --export_gguf for the HF layout";

/// Whether `--model_name_or_path` is a folder whose `config.json` says ChatGLM (checked before
/// loading, so that `--export_gguf` fails fast).
fn source_is_chatglm(model: &Option<String>) -> bool {
    let name = crate::args::model_or_default(model);
    let Ok((path, _)) = llmtune_models::hub::resolve(&name) else {
        return false;
    };
    std::fs::read_to_string(path.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|c| llmtune_models::chatglm_version(&c).is_some())
}

pub fn run(a: ExportArgs) -> anyhow::Result<ExitCode> {
    let dtype = match a.export_dtype.as_str() {
        "float32" | "f32" | "fp32" => (DType::F32, "float32"),
        "bfloat16" | "bf16" => (DType::BF16, "bfloat16"),
        "float16" | "f16" | "fp16" => (DType::F16, "float16"),
        other => anyhow::bail!("--export_dtype {other}: expected float32, bfloat16 or float16"),
    };
    let max_shard = parse_size(&a.max_shard_size)?;
    let gguf_types = a
        .export_gguf
        .as_deref()
        .map(parse_gguf_types)
        .transpose()?
        .unwrap_or_default();
    if !gguf_types.is_empty() && source_is_chatglm(&a.model_name_or_path) {
        anyhow::bail!("{CHATGLM_GGUF}");
    }
    let (mut p, name) = load_merged_with(&a.model_name_or_path, &a.checkpoint_dir, false)?;
    if !gguf_types.is_empty() && p.model.is_chatglm() {
        anyhow::bail!("{CHATGLM_GGUF}");
    }
    // Llama-family models get a config.json and tokenizer.json written from what was loaded;
    // ChatGLM keeps the files of its folder (config.json with `auto_map`, the remote code,
    // the SentencePiece model).
    let cfg = match &p.model {
        llmtune_models::CausalLm::Llama(m) => Some(m.cfg.clone()),
        _ => None,
    };
    let template = match &a.template {
        Some(t) => Template::by_name(t)?,
        None => Template::default_for_model_type(&p.info.model_type, &p.tokenizer),
    };
    let stop_ids = template
        .resolve(&p.tokenizer)
        .map(|rt| rt.stop_ids().to_vec())
        .unwrap_or_else(|_| p.tokenizer.stop_ids().to_vec());
    let out = &a.output_dir;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;

    // Weights, in HF names and order.
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (n, t) in p.model.params_mut() {
        tensors.push((n, t.detach().to_dtype(dtype.0)?));
    }
    let sizes: Vec<(String, u64)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                (t.elem_count() * t.dtype().size_in_bytes()) as u64,
            )
        })
        .collect();
    let total: u64 = sizes.iter().map(|(_, s)| s).sum();
    let shards = plan_shards(&sizes, max_shard);
    // Remove weight files of an earlier export so no stale shard is picked up.
    for e in std::fs::read_dir(out)?.flatten() {
        let f = e.file_name().to_string_lossy().to_string();
        if f.starts_with("model") && (f.ends_with(".safetensors") || f.ends_with(".index.json")) {
            std::fs::remove_file(e.path())?;
        }
    }
    if shards.len() == 1 {
        llmtune_adapters::save_safetensors(&out.join("model.safetensors"), &tensors)?;
    } else {
        let n = shards.len();
        let mut map = serde_json::Map::new();
        for (k, idx) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
            let part: Vec<(String, Tensor)> = idx.iter().map(|&i| tensors[i].clone()).collect();
            llmtune_adapters::save_safetensors(&out.join(&file), &part)?;
            for &i in idx {
                map.insert(tensors[i].0.clone(), file.clone().into());
            }
        }
        write_json(
            &out.join("model.safetensors.index.json"),
            &serde_json::json!({"metadata": {"total_size": total}, "weight_map": map}),
        )?;
    }

    if let Some(cfg) = &cfg {
        write_json(&out.join("config.json"), &cfg.to_hf_json(dtype.1))?;
    }
    let mut gen = serde_json::json!({
        "eos_token_id": stop_ids,
        "do_sample": true,
        "temperature": 0.95,
        "top_p": 0.7,
        "max_new_tokens": 512,
    });
    if let Some(b) = p.tokenizer.bos_id() {
        gen["bos_token_id"] = b.into();
    }
    if let Some(pad) = p.tokenizer.pad_id() {
        gen["pad_token_id"] = pad.into();
    }
    write_json(&out.join("generation_config.json"), &gen)?;

    let Some(cfg) = cfg else {
        copy_chatglm_files(&p.info.path, out, dtype.1)?;
        eprintln!(
            "exported {name} ({} tensors, {:.1} MB, {} shard(s), {}) to {}",
            tensors.len(),
            total as f64 / 1e6,
            shards.len(),
            dtype.1,
            out.display()
        );
        return Ok(ExitCode::SUCCESS);
    };
    // Tokenizer: tokenizer.json as the HF tokenizers library writes it, and its config.
    let tok_json = p
        .tokenizer
        .hf()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "export writes a tokenizer.json; the tokenizer of {} is a ChatGLM \
                 SentencePiece model, which has none",
                p.tokenizer.source().display()
            )
        })?
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?;
    llmtune_train::io::atomic_write(&out.join("tokenizer.json"), tok_json.as_bytes())?;
    let tok_name = |id: Option<u32>| id.and_then(|i| p.tokenizer.id_to_token(i));
    let mut tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
    });
    for (k, id) in [
        ("bos_token", p.tokenizer.bos_id()),
        ("eos_token", p.tokenizer.eos_id()),
        ("pad_token", p.tokenizer.pad_id()),
    ] {
        if let Some(t) = tok_name(id) {
            tc[k] = t.into();
        }
    }
    write_json(&out.join("tokenizer_config.json"), &tc)?;
    if !gguf_types.is_empty() {
        write_ggufs(&mut p, &cfg, &name, out, &gguf_types)?;
    }
    eprintln!(
        "exported {name} ({} tensors, {:.1} MB, {} shard(s), {}) to {}",
        tensors.len(),
        total as f64 / 1e6,
        shards.len(),
        dtype.1,
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes `model-<type>.gguf` for each type (weights in f32 before conversion).
fn write_ggufs(
    p: &mut llmtune_models::Pretrained,
    cfg: &llmtune_models::LlamaConfig,
    name: &str,
    out: &Path,
    types: &[llmtune_models::gguf_write::GgufType],
) -> anyhow::Result<()> {
    use llmtune_models::gguf_write::{chat_template_of, write_gguf, GgufExport};
    let chat_template = chat_template_of(&p.info.path)?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (n, t) in p.model.params_mut() {
        tensors.push((n, t.detach().to_dtype(DType::F32)?));
    }
    let general_name = Path::new(name)
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| name.to_string());
    for &ty in types {
        let path = out.join(format!("model-{}.gguf", ty.name()));
        let e = GgufExport {
            name: &general_name,
            config: cfg,
            tokenizer: &p.tokenizer,
            chat_template: chat_template.as_deref(),
            ty,
        };
        write_gguf(&path, &tensors, &e).with_context(|| format!("writing {}", path.display()))?;
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        eprintln!(
            "wrote {} ({:.1} MB, {})",
            path.display(),
            size as f64 / 1e6,
            ty.name()
        );
    }
    Ok(())
}

/// The ChatGLM files of the source folder `src`: `config.json` (with `torch_dtype` set to
/// the export dtype), the remote code (`*.py`) and the tokenizer files.
fn copy_chatglm_files(src: &Path, out: &Path, dtype: &str) -> anyhow::Result<()> {
    let cfg_path = src.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("reading {}", cfg_path.display()))?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", cfg_path.display()))?;
    cfg["torch_dtype"] = dtype.into();
    write_json(&out.join("config.json"), &cfg)?;
    let tokenizer_files = [
        "ice_text.model",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ];
    for e in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let e = e?;
        let f = e.file_name().to_string_lossy().to_string();
        if f.ends_with(".py") || tokenizer_files.contains(&f.as_str()) {
            let bytes = std::fs::read(e.path())
                .with_context(|| format!("reading {}", e.path().display()))?;
            llmtune_train::io::atomic_write(&out.join(&f), &bytes)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("2XB")
            .unwrap_err()
            .to_string()
            .contains("unknown unit"));
        assert!(parse_size("GB")
            .unwrap_err()
            .to_string()
            .contains("--max_shard_size"));
    }

    #[test]
    fn gguf_types_parse() {
        use llmtune_models::gguf_write::GgufType;
        assert_eq!(
            parse_gguf_types("f16, q8_0,f16").unwrap(),
            vec![GgufType::F16, GgufType::Q8_0]
        );
        let e = parse_gguf_types("q4_0").unwrap_err().to_string();
        assert!(
            e.contains("--export_gguf") && e.contains("f16 or q8_0"),
            "{e}"
        );
        assert!(parse_gguf_types(",").is_err());
    }

    #[test]
    fn shards_fill_in_order() {
        let s = |v: &[u64]| -> Vec<(String, u64)> {
            v.iter()
                .enumerate()
                .map(|(i, &x)| (format!("t{i}"), x))
                .collect()
        };
        assert_eq!(plan_shards(&s(&[4, 4, 4]), 10), vec![vec![0, 1], vec![2]]);
        assert_eq!(plan_shards(&s(&[12, 1]), 10), vec![vec![0], vec![1]]);
        assert_eq!(plan_shards(&s(&[1, 2, 3]), 100), vec![vec![0, 1, 2]]);
    }
}
