//! Bad weight files give errors that name the file and the tensor, never a panic.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use llmtune_models::{config::LlamaConfig, load_pretrained, loader, Llama};

fn copy_model(src: &Path, name: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("llmtune-loader-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    dst
}

fn load_err(dir: &Path) -> String {
    match load_pretrained(dir.to_str().unwrap(), DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_safetensors_names_the_file() {
    let Some(fx) = common::fixtures() else { return };
    let dir = copy_model(&fx.join("llama"), "trunc");
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(
        err.contains("truncated or corrupt") || err.contains("cannot read tensor"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn garbage_header_names_the_file() {
    let Some(fx) = common::fixtures() else { return };
    let dir = copy_model(&fx.join("llama"), "garbage");
    std::fs::write(
        dir.join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header",
    )
    .unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("not plausible"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let Some(fx) = common::fixtures() else { return };
    let dir = fx.join("llama");
    let cfg = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    let mut tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    tensors.remove("model.layers.1.mlp.up_proj.weight");
    let src = loader::MapSource::new(tensors, "in-memory.safetensors");
    let err = Llama::load(&cfg, &src, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "in-memory.safetensors: tensor model.layers.1.mlp.up_proj.weight is missing"
    );
}

#[test]
fn shape_mismatch_is_named() {
    let Some(fx) = common::fixtures() else { return };
    let dir = fx.join("qwen2");
    let mut cfg = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    cfg.intermediate_size += 1;
    let src = loader::open_dir(&dir).unwrap();
    let err = Llama::load(&cfg, src.as_ref(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight has shape"),
        "{err}"
    );
}

#[test]
fn missing_weights_and_bad_config_are_clear() {
    let dir = std::env::temp_dir().join(format!("llmtune-loader-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "llama", "vocab_size": 10}"#,
    )
    .unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("config.json") && err.contains("hidden_size"),
        "{err}"
    );
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2}"#,
    )
    .unwrap();
    let err = load_err(&dir);
    assert!(err.contains("no model.safetensors"), "{err}");
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type":"gpt2","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2}"#,
    )
    .unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("\"gpt2\" is not a Llama-family model"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_model_name_lists_aliases() {
    let err = load_err(Path::new("/nonexistent/model-xyz"));
    assert!(
        err.contains("/nonexistent/model-xyz") && err.contains("smollm2-135m"),
        "{err}"
    );
}

#[test]
fn corrupt_gguf_names_the_file() {
    let p = std::env::temp_dir().join(format!("llmtune-bad-{}.gguf", std::process::id()));
    std::fs::write(&p, b"GGUF\x03\x00\x00\x00trailing garbage").unwrap();
    let err = load_err(&p);
    assert!(
        err.contains(p.to_str().unwrap()) && err.contains("not a valid GGUF"),
        "{err}"
    );
    std::fs::remove_file(&p).unwrap();
}
