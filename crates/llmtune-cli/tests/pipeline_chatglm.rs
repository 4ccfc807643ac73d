//! SFT -> RM -> PPO -> predict -> chat on tiny ChatGLM models (`LLMTUNE_FIXTURES`
//! `chatglm1`, `chatglm2`; ChatGLM3 = the `chatglm2` fixture with the ChatGLM3 tokenizer) with the real ChatGLM tokenizers (`LLMTUNE_SHARED`), using the
//! model's defaults: the template (`chatglm`/`chatglm2`/`chatglm3` from the tokenizer) and the LoRA target
//! (`query_key_value`).
//!
//! The fixture models have a 1000-token vocabulary while the real tokenizers emit ids up to
//! 130527 (v1) or 65023 (v2), so each test builds a model folder in a temp dir: the fixture's
//! config with the real vocabulary size (and, for v1, the real special ids), the fixture's
//! block weights, and random embeddings / output layer (std 0.02) of the real vocabulary size.

use std::path::{Path, PathBuf};

mod common;
use common::{
    chat, copy_files, example_data, fixtures, jsonl, read_json, run_ok, shared, tensors, tmp,
};

/// The tiny fixture model `arch` widened to the real tokenizer's vocabulary, with that
/// tokenizer beside it (see the module docs).
///
/// `chatglm3` is the `chatglm2` fixture (same architecture) with the ChatGLM3 tokenizer.
fn glm_model(fx: &Path, shared: &Path, arch: &str, root: &Path) -> PathBuf {
    use candle_core::{DType, Device, Tensor};
    let src = fx.join(if arch == "chatglm1" {
        "chatglm1"
    } else {
        "chatglm2"
    });
    let out = root.join("model");
    std::fs::create_dir_all(&out).unwrap();
    let mut cfg = read_json(&src.join("config.json"));
    let obj = cfg.as_object_mut().unwrap();
    let (vocab, tok_dir, tok_file, embed, head) = if arch == "chatglm1" {
        // The real ChatGLM-6B special ids are the config defaults.
        for k in [
            "bos_token_id",
            "eos_token_id",
            "mask_token_id",
            "gmask_token_id",
            "pad_token_id",
        ] {
            obj.remove(k);
        }
        obj.insert("vocab_size".into(), 130528.into());
        (
            130528,
            "reference/chatglm/v1",
            "ice_text.model",
            "transformer.word_embeddings.weight",
            "lm_head.weight",
        )
    } else {
        obj.insert("padded_vocab_size".into(), 65024.into());
        (
            65024,
            if arch == "chatglm3" {
                "reference/chatglm/v2/chatglm3-6b"
            } else {
                "reference/chatglm/v2"
            },
            "tokenizer.model",
            "transformer.embedding.word_embeddings.weight",
            "transformer.output_layer.weight",
        )
    };
    let hidden = cfg["hidden_size"].as_u64().unwrap() as usize;
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    let mut w =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    // Deterministic uniform values of std 0.02 (an LCG), so every run trains the same model.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for name in [embed, head] {
        assert!(w.contains_key(name), "{arch}: no {name}");
        let v: Vec<f32> = (0..vocab * hidden)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                (u - 0.5) * 0.02 * 12f32.sqrt()
            })
            .collect();
        let t = Tensor::from_vec(v, (vocab, hidden), &Device::Cpu).unwrap();
        w.insert(name.to_string(), t.to_dtype(DType::F32).unwrap());
    }
    candle_core::safetensors::save(&w, out.join("model.safetensors")).unwrap();
    copy_files(
        &shared.join(tok_dir),
        &out,
        &[tok_file, "tokenizer_config.json"],
    );
    out
}

fn walkthrough(fx: &Path, shared: &Path, arch: &str) {
    let t0 = std::time::Instant::now();
    let root = tmp(arch);
    let model = glm_model(fx, shared, arch, &root);
    let model = model.to_str().unwrap();
    let data = example_data();
    let data = data.to_str().unwrap();
    let dir = |n: &str| root.join(n).to_str().unwrap().to_string();
    let (sft, rm, ppo, pred) = (dir("sft"), dir("rm"), dir("ppo"), dir("pred"));
    // No --template and no --lora_target: the model's defaults.
    let shared_flags = [
        "--model_name_or_path",
        model,
        "--dataset_dir",
        data,
        "--overwrite_cache",
        "--lora_rank",
        "4",
        "--max_source_length",
        "32",
        "--logging_steps",
        "1",
        "--seed",
        "7",
    ];
    let with = |stage: &[&str]| -> Vec<String> {
        stage
            .iter()
            .chain(&shared_flags)
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };
    let template = match arch {
        "chatglm1" => "chatglm",
        "chatglm2" => "chatglm2",
        _ => "chatglm3",
    };

    // 1. SFT, with gradient checkpointing (the per-layer path of this architecture).
    let err = run_ok(&with(&[
        "train",
        "--stage",
        "sft",
        "--do_train",
        "--dataset",
        "example_sft",
        "--output_dir",
        &sft,
        "--per_device_train_batch_size",
        "2",
        "--max_target_length",
        "16",
        "--learning_rate",
        "1e-3",
        "--max_steps",
        "2",
        "--gradient_checkpointing",
        "true",
    ]));
    assert!(
        err.contains(&format!("template {template}")),
        "SFT did not pick the {template} template:\n{err}"
    );
    let sft_p = Path::new(&sft);
    let a = tensors(&sft_p.join("adapter_model.safetensors"));
    assert!(
        !a.is_empty() && a.iter().all(|k| k.contains("query_key_value")),
        "{a:?}"
    );
    assert_eq!(
        read_json(&sft_p.join("adapter_config.json"))["target_modules"],
        serde_json::json!(["query_key_value"])
    );
    let log = jsonl(&sft_p.join("trainer_log.jsonl"));
    assert_eq!(log.len(), 2, "{log:?}");
    // Random output layer over the full vocabulary: the loss is near ln(vocab).
    for l in &log {
        let loss = l["loss"].as_f64().unwrap();
        assert!(loss > 5.0 && loss < 20.0, "SFT loss {loss}");
    }

    // 2. RM on top of the SFT adapter.
    run_ok(&with(&[
        "train",
        "--stage",
        "rm",
        "--do_train",
        "--dataset",
        "example_rm",
        "--resume_lora_training",
        "false",
        "--checkpoint_dir",
        &sft,
        "--output_dir",
        &rm,
        "--per_device_train_batch_size",
        "2",
        "--max_target_length",
        "16",
        "--learning_rate",
        "1e-3",
        "--max_steps",
        "2",
        "--dev_ratio",
        "0.2",
        "--do_eval",
    ]));
    let rm_p = Path::new(&rm);
    let vh = tensors(&rm_p.join("value_head.safetensors"));
    assert!(vh.iter().any(|k| k.contains("summary")), "{vh:?}");
    let acc = read_json(&rm_p.join("all_results.json"))["eval_accuracy"]
        .as_f64()
        .unwrap();
    assert!((0.0..=1.0).contains(&acc), "eval_accuracy {acc}");

    // 3. PPO with the RM folder as the reward model.
    run_ok(&with(&[
        "train",
        "--stage",
        "ppo",
        "--do_train",
        "--dataset",
        "example_sft",
        "--resume_lora_training",
        "false",
        "--checkpoint_dir",
        &sft,
        "--reward_model",
        &rm,
        "--output_dir",
        &ppo,
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--max_target_length",
        "6",
        "--learning_rate",
        "1e-3",
        "--max_steps",
        "1",
        "--max_samples",
        "4",
    ]));
    let ppo_p = Path::new(&ppo);
    tensors(&ppo_p.join("adapter_model.safetensors"));
    tensors(&ppo_p.join("value_head.safetensors"));
    let log = jsonl(&ppo_p.join("trainer_log.jsonl"));
    assert_eq!(log.len(), 1, "{log:?}");
    assert!(log[0]["reward"].as_f64().unwrap().is_finite(), "{log:?}");

    // 3b. DPO on the same preference pairs, on top of the SFT adapter: a fresh adapter is
    // the reference, so the first step's loss is log 2.
    let dpo = dir("dpo");
    run_ok(&with(&[
        "train",
        "--stage",
        "dpo",
        "--do_train",
        "--dataset",
        "example_rm",
        "--resume_lora_training",
        "false",
        "--checkpoint_dir",
        &sft,
        "--output_dir",
        &dpo,
        "--per_device_train_batch_size",
        "2",
        "--max_target_length",
        "16",
        "--learning_rate",
        "1e-3",
        "--max_steps",
        "2",
    ]));
    let dpo_p = Path::new(&dpo);
    tensors(&dpo_p.join("adapter_model.safetensors"));
    let log = jsonl(&dpo_p.join("trainer_log.jsonl"));
    assert_eq!(log.len(), 2, "{log:?}");
    let first = log[0]["loss"].as_f64().unwrap();
    assert!((first - std::f64::consts::LN_2).abs() < 1e-4, "DPO {log:?}");

    // 4. Predict with both adapters merged, greedy.
    let both = format!("{sft},{ppo}");
    run_ok(&with(&[
        "train",
        "--stage",
        "sft",
        "--do_predict",
        "--predict_with_generate",
        "--dataset",
        "example_test",
        "--checkpoint_dir",
        &both,
        "--output_dir",
        &pred,
        "--max_target_length",
        "4",
        "--max_samples",
        "3",
        "--per_device_eval_batch_size",
        "3",
        "--do_sample",
        "false",
    ]));
    let preds = jsonl(&Path::new(&pred).join("generated_predictions.jsonl"));
    assert_eq!(preds.len(), 3);
    assert!(preds
        .iter()
        .all(|p| p["label"].is_string() && p["predict"].is_string()));

    // 5. Chat: one turn, then stop.
    let out = chat(
        &[
            "--model_name_or_path",
            model,
            "--checkpoint_dir",
            &both,
            "--do_sample",
            "false",
            "--max_new_tokens",
            "4",
        ],
        "医生您好，我咳嗽两周了\nstop\n",
    );
    assert_eq!(out.matches("Assistant: ").count(), 1, "{out}");
    eprintln!("{arch} walkthrough: {:.1}s", t0.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn walkthrough_chatglm1() {
    let (Some(fx), Some(sh)) = (fixtures(), shared()) else {
        return;
    };
    walkthrough(&fx, &sh, "chatglm1");
}

#[test]
fn walkthrough_chatglm2() {
    let (Some(fx), Some(sh)) = (fixtures(), shared()) else {
        return;
    };
    walkthrough(&fx, &sh, "chatglm2");
}

#[test]
fn walkthrough_chatglm3() {
    let (Some(fx), Some(sh)) = (fixtures(), shared()) else {
        return;
    };
    walkthrough(&fx, &sh, "chatglm3");
}

/// `llmtune export` of a ChatGLM fixture with its LoRA merged: the folder reloads with the
/// original tensor names and files, and its logits equal the reference's LoRA logits
/// (`lora.logits`, valid positions, 1e-4).
fn export_roundtrip(fx: &Path, shared: &Path, arch: &str) {
    use candle_core::{DType, Device, IndexOp};
    let root = tmp(&format!("{arch}-export"));
    let src = root.join("model");
    let (tok_dir, tok_file) = if arch == "chatglm1" {
        ("reference/chatglm/v1", "ice_text.model")
    } else {
        ("reference/chatglm/v2", "tokenizer.model")
    };
    copy_files(&fx.join(arch), &src, &["config.json", "model.safetensors"]);
    copy_files(
        &shared.join(tok_dir),
        &src,
        &[tok_file, "tokenizer_config.json"],
    );
    let out = root.join("export");
    run_ok(&[
        "export",
        "--model_name_or_path",
        src.to_str().unwrap(),
        "--checkpoint_dir",
        fx.join(arch).join("lora").to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
    ]);
    for f in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        tok_file,
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).exists(), "{arch}: missing {f}");
    }
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["model_type"], "chatglm");
    assert_eq!(cfg["torch_dtype"], "float32");
    let names = tensors(&out.join("model.safetensors"));
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("transformer.") || n == "lm_head.weight"),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.contains("lora")), "{names:?}");

    let cases =
        candle_core::safetensors::load(fx.join(arch).join("cases.safetensors"), &Device::Cpu)
            .unwrap();
    let ids = &cases["batch.input_ids"];
    let valid = cases["batch.valid_mask"].to_dtype(DType::U32).unwrap();
    let p =
        llmtune_models::load_pretrained(out.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let (logits, _) = p.model.forward(ids, Some(&valid), None).unwrap();
    let want = &cases["lora.logits"];
    let base = &cases["batch.logits"];
    let m: Vec<Vec<u32>> = valid.to_vec2().unwrap();
    let (mut worst, mut lora_effect) = (0f32, 0f32);
    for (b, row) in m.iter().enumerate() {
        for (t, &v) in row.iter().enumerate() {
            if v == 0 {
                continue;
            }
            let g = logits.i((b, t)).unwrap().to_vec1::<f32>().unwrap();
            let w = want.i((b, t)).unwrap().to_vec1::<f32>().unwrap();
            let o = base.i((b, t)).unwrap().to_vec1::<f32>().unwrap();
            for ((x, y), z) in g.iter().zip(&w).zip(&o) {
                worst = worst.max((x - y).abs());
                lora_effect = lora_effect.max((y - z).abs());
            }
        }
    }
    eprintln!(
        "{arch} export: max |logits - lora.logits| = {worst:e} (LoRA moves them {lora_effect:e})"
    );
    assert!(worst <= 1e-4, "{arch}: exported logits differ by {worst}");
    assert!(
        lora_effect > 1e-3,
        "{arch}: the fixture LoRA changes nothing"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn export_chatglm1() {
    let (Some(fx), Some(sh)) = (fixtures(), shared()) else {
        return;
    };
    export_roundtrip(&fx, &sh, "chatglm1");
}

#[test]
fn export_chatglm2() {
    let (Some(fx), Some(sh)) = (fixtures(), shared()) else {
        return;
    };
    export_roundtrip(&fx, &sh, "chatglm2");
}
