//! `llmtune export --export_gguf f16,q8_0` on the tiny fixture models (llama with permuted
//! q/k rows, qwen2 with biases and an untied head), each with its PEFT adapter merged: the
//! GGUF read back by our own loader gives the logits of the HF-layout export with its
//! matrices rounded to f16 (f16: the same weights, as 1-D tensors stay f32 in both, so the
//! same logits up to f32 arithmetic; q8_0: 8-bit blocks, looser), the metadata keys are
//! llama.cpp's, and the tokenizer rebuilt from the GGUF encodes like the exported
//! tokenizer.json.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

mod common;
use common::{copy_files, fixtures, read_json, tmp, valid_logits};

fn llmtune(args: &[&str], paths: &[(&str, &Path)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_llmtune"));
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    c.output().unwrap()
}

/// Logits of the fixture's right-padded batch at valid positions, and the largest |logit|.
fn logits(model: &Path, fx_model: &Path) -> (Vec<Vec<f32>>, f32) {
    let rows = valid_logits(model, fx_model);
    let max = rows.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    (rows, max)
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, usize) {
    let mut worst = 0f32;
    let mut argmax_equal = 0;
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs());
        }
        let am = |v: &[f32]| {
            v.iter()
                .enumerate()
                .max_by(|p, q| p.1.total_cmp(q.1))
                .unwrap()
                .0
        };
        argmax_equal += usize::from(am(x) == am(y));
    }
    (worst, argmax_equal)
}

/// A copy of the HF export `src` with every matrix rounded to f16 (1-D tensors kept f32),
/// which is what an f16 GGUF holds.
fn f16_matrices(src: &Path, dst: &Path) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    let w = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let rounded: std::collections::HashMap<String, Tensor> = w
        .into_iter()
        .map(|(k, t)| {
            let t = if t.rank() >= 2 {
                t.to_dtype(DType::F16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            } else {
                t
            };
            (k, t)
        })
        .collect();
    candle_core::safetensors::save(&rounded, dst.join("model.safetensors")).unwrap();
    copy_files(
        src,
        dst,
        &[
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ],
    );
    dst.to_path_buf()
}

fn read_meta(path: &Path) -> gguf_file::Content {
    let mut f = std::fs::File::open(path).unwrap();
    gguf_file::Content::read(&mut f).unwrap()
}

#[test]
fn gguf_export_reloads_to_the_hf_export_logits() {
    let Some(fx) = fixtures() else { return };
    for arch in ["llama", "qwen2"] {
        let model = fx.join(arch);
        let out = tmp(arch);
        let o = llmtune(
            &["export", "--export_gguf", "f16,q8_0"],
            &[
                ("--model_name_or_path", &model),
                ("--checkpoint_dir", &model.join("lora")),
                ("--output_dir", &out),
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        let cfg = read_json(&model.join("config.json"));
        let (exact, scale) = logits(&out, &model);
        let (want, _) = logits(&f16_matrices(&out, &tmp(&format!("{arch}-f16ref"))), &model);
        let n_rows = want.len();
        let (d_round, _) = max_diff(&exact, &want);
        eprintln!("{arch}: rounding the matrices to f16 moves the logits by {d_round:.3e}");

        // f16: the HF export holds the same f16-rounded weights; only the q/k row permutation
        // (exact) and f32 arithmetic order separate the two.
        let f16 = out.join("model-f16.gguf");
        let (got, _) = logits(&f16, &model);
        let (d16, am16) = max_diff(&got, &want);
        eprintln!(
            "{arch} f16: max |diff| {d16:.3e} (max |logit| {scale:.3}), argmax {am16}/{n_rows}"
        );
        assert!(d16 <= 1e-5 * scale.max(1.0), "{arch} f16: {d16}");
        assert!(
            d_round > 1e-3,
            "{arch}: the f16 reference should differ from f32"
        );
        assert_eq!(am16, n_rows, "{arch} f16 argmax");
        // q8_0: blocks of 32 weights share one f16 scale with 8-bit values (error up to
        // 1/254 of a block's largest weight, ~8x f16's), on these random tiny models a few
        // percent of the largest logit; near-tied argmaxes may flip.
        let q8 = out.join("model-q8_0.gguf");
        let (got, _) = logits(&q8, &model);
        let (d8, am8) = max_diff(&got, &want);
        eprintln!("{arch} q8_0: max |diff| {d8:.3e}, argmax {am8}/{n_rows}");
        assert!(d8 <= 5e-2 * scale.max(1.0), "{arch} q8_0: {d8}");
        assert!(am8 * 10 >= n_rows * 9, "{arch} q8_0 argmax {am8}/{n_rows}");
        assert!(
            d8 > d16,
            "{arch}: q8_0 ({d8}) should be coarser than f16 ({d16})"
        );

        // Metadata as convert_hf_to_gguf.py writes it.
        let c = read_meta(&f16);
        let md = &c.metadata;
        let u = |k: &str| md[&format!("{arch}.{k}")].to_u32().unwrap() as u64;
        assert_eq!(
            md["general.architecture"].to_string().unwrap().as_str(),
            arch
        );
        assert_eq!(u("block_count"), cfg["num_hidden_layers"].as_u64().unwrap());
        assert_eq!(u("embedding_length"), cfg["hidden_size"].as_u64().unwrap());
        assert_eq!(
            u("feed_forward_length"),
            cfg["intermediate_size"].as_u64().unwrap()
        );
        assert_eq!(
            u("attention.head_count"),
            cfg["num_attention_heads"].as_u64().unwrap()
        );
        assert_eq!(
            u("attention.head_count_kv"),
            cfg["num_key_value_heads"].as_u64().unwrap()
        );
        assert_eq!(
            u("context_length"),
            cfg["max_position_embeddings"].as_u64().unwrap()
        );
        assert_eq!(u("vocab_size"), cfg["vocab_size"].as_u64().unwrap());
        let head_dim =
            cfg["hidden_size"].as_u64().unwrap() / cfg["num_attention_heads"].as_u64().unwrap();
        assert_eq!(
            u("rope.dimension_count"),
            cfg.get("head_dim")
                .and_then(|h| h.as_u64())
                .unwrap_or(head_dim)
        );
        assert_eq!(
            md[&format!("{arch}.rope.freq_base")].to_f32().unwrap() as f64,
            cfg["rope_theta"].as_f64().unwrap()
        );
        assert_eq!(
            md[&format!("{arch}.attention.layer_norm_rms_epsilon")]
                .to_f32()
                .unwrap(),
            cfg["rms_norm_eps"].as_f64().unwrap() as f32
        );
        assert_eq!(md["general.file_type"].to_u32().unwrap(), 1);
        assert_eq!(
            read_meta(&q8).metadata["general.file_type"]
                .to_u32()
                .unwrap(),
            7
        );
        assert_eq!(md["tokenizer.ggml.model"].to_string().unwrap(), "gpt2");
        assert_eq!(md["tokenizer.ggml.pre"].to_string().unwrap(), "qwen2");
        let tokens = md["tokenizer.ggml.tokens"].to_vec().unwrap();
        assert_eq!(tokens.len() as u64, cfg["vocab_size"].as_u64().unwrap());
        assert_eq!(
            md["tokenizer.ggml.token_type"].to_vec().unwrap().len(),
            tokens.len()
        );
        assert!(!md["tokenizer.ggml.merges"].to_vec().unwrap().is_empty());
        for (k, v) in [
            ("bos", "bos_token_id"),
            ("eos", "eos_token_id"),
            ("pad", "pad_token_id"),
        ] {
            let key = if k == "pad" {
                "tokenizer.ggml.padding_token_id".to_string()
            } else {
                format!("tokenizer.ggml.{v}")
            };
            assert_eq!(
                md[&key].to_u32().unwrap() as u64,
                cfg[v].as_u64().unwrap(),
                "{arch} {key}"
            );
        }
        assert!(!md["tokenizer.ggml.add_bos_token"].to_bool().unwrap());
        assert!(md["tokenizer.chat_template"]
            .to_string()
            .unwrap()
            .contains("<|im_start|>"));
        // Tensors: GGUF names, untied head only for an untied model, 1-D in F32.
        let tied = cfg["tie_word_embeddings"].as_bool().unwrap();
        assert_eq!(
            c.tensor_infos.contains_key("output.weight"),
            !tied,
            "{arch}"
        );
        assert_eq!(
            c.tensor_infos["blk.0.attn_norm.weight"].ggml_dtype,
            candle_core::quantized::GgmlDType::F32
        );
        assert_eq!(
            c.tensor_infos["blk.0.ffn_down.weight"].ggml_dtype,
            candle_core::quantized::GgmlDType::F16
        );
        assert_eq!(
            read_meta(&q8).tensor_infos["blk.0.ffn_down.weight"].ggml_dtype,
            candle_core::quantized::GgmlDType::Q8_0
        );
        assert_eq!(
            c.tensor_infos.contains_key("blk.0.attn_q.bias"),
            arch == "qwen2"
        );

        // The tokenizer rebuilt from the GGUF encodes like the exported tokenizer.json.
        let (from_gguf, _) = llmtune_models::load_tokenizer(f16.to_str().unwrap()).unwrap();
        let from_json = llmtune_tokenize::Tokenizer::from_dir(&out).unwrap();
        for text in [
            "Hello world, it's 2024!",
            "<|im_start|>user\nwhat is 12345?<|im_end|>\n<|im_start|>assistant\n",
            "  leading spaces\tand\ttabs\n\nnewlines ünïcödé 中文 🚀",
            "don't WE'LL they'RE 3.14159",
        ] {
            assert_eq!(
                from_gguf.encode(text, true).unwrap(),
                from_json.encode(text, true).unwrap(),
                "{arch}: {text:?}"
            );
        }
        assert_eq!(from_gguf.eos_id(), from_json.eos_id());
        std::fs::remove_dir_all(&out).unwrap();
        let _ = tmp(&format!("{arch}-f16ref")); // removes it
    }
}

#[test]
fn gguf_export_refuses_chatglm_and_bad_types() {
    let Some(fx) = fixtures() else { return };
    let out = tmp("chatglm");
    let o = llmtune(
        &["export", "--export_gguf", "f16"],
        &[
            ("--model_name_or_path", &fx.join("chatglm2")),
            ("--output_dir", &out),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--export_gguf") && err.contains("ChatGLM"),
        "{err}"
    );
    assert!(!out.join("model-f16.gguf").exists());

    let o = llmtune(
        &["export", "--export_gguf", "q4_k"],
        &[
            ("--model_name_or_path", &fx.join("llama")),
            ("--output_dir", &out),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("q4_k") && err.contains("f16 or q8_0"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}
