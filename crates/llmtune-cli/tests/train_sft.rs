//! `llmtune train --stage sft` end to end on the tiny fixture model and the project's example
//! data: every output file, loss values, predict with scores, and exact resume after kill -9.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

mod common;
use common::{
    example_data, fixtures, jsonl, kill_when_exists, llmtune, read_json, run, set_flag,
    step_losses, strings, tmp,
};

fn sft_args(model: &Path, out: &Path, max_steps: u32) -> Vec<String> {
    strings(&[
        "train",
        "--stage",
        "sft",
        "--do_train",
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--template",
        "chatml",
        "--dataset",
        "example_sft",
        "--dataset_dir",
        example_data().to_str().unwrap(),
        "--finetuning_type",
        "lora",
        "--lora_rank",
        "4",
        "--output_dir",
        out.to_str().unwrap(),
        "--overwrite_cache",
        "--per_device_train_batch_size",
        "2",
        "--per_device_eval_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--max_source_length",
        "64",
        "--max_target_length",
        "32",
        "--lr_scheduler_type",
        "cosine",
        "--logging_steps",
        "1",
        "--save_steps",
        "3",
        "--eval_steps",
        "3",
        "--learning_rate",
        "1e-2",
        "--max_steps",
        &max_steps.to_string(),
        "--dev_ratio",
        "0.1",
        "--evaluation_strategy",
        "steps",
        "--load_best_model_at_end",
        "--plot_loss",
        "--seed",
        "7",
        "--lora_dropout",
        "0.1",
        "--max_samples",
        "40",
    ])
}

/// `--do_predict --predict_with_generate` on `example_sft` with the trained `ckpt` merged
/// into `model`; each test adds its lengths and sample count.
fn predict_args(model: &Path, ckpt: &Path, out: &Path) -> Vec<String> {
    strings(&[
        "train",
        "--stage",
        "sft",
        "--do_predict",
        "--predict_with_generate",
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--template",
        "chatml",
        "--dataset",
        "example_sft",
        "--dataset_dir",
        example_data().to_str().unwrap(),
        "--checkpoint_dir",
        ckpt.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
        "--max_source_length",
        "64",
    ])
}

#[test]
fn sft_writes_every_file_and_predict_scores() {
    let Some(fx) = fixtures() else { return };
    let model = fx.join("llama");
    let out = tmp("full");
    let (code, _, err) = run(&sft_args(&model, &out, 6));
    assert_eq!(code, 0, "{err}");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "trainer_log.jsonl",
        "trainer_state.json",
        "train_results.json",
        "eval_results.json",
        "all_results.json",
        "training_args.json",
        "finetuning_args.json",
        "training_loss.png",
        "training_eval_loss.png",
        "checkpoint-3/adapter_model.safetensors",
        "checkpoint-6/optimizer.safetensors",
    ] {
        assert!(out.join(f).exists(), "missing {f}; stderr: {err}");
    }
    let png = std::fs::read(out.join("training_loss.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let lines = jsonl(&out.join("trainer_log.jsonl"));
    let losses: Vec<f64> = lines.iter().filter_map(|l| l["loss"].as_f64()).collect();
    assert_eq!(losses.len(), 6, "one loss line per step: {lines:?}");
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.get("eval_loss").is_some())
            .count(),
        2
    );
    assert_eq!(lines.last().unwrap()["current_steps"], 6);
    assert_eq!(lines.last().unwrap()["total_steps"], 6);
    let all = read_json(&out.join("all_results.json"));
    assert!(all["train_loss"].as_f64().unwrap().is_finite(), "{all}");
    assert!(all["eval_loss"].as_f64().unwrap().is_finite(), "{all}");
    let state = read_json(&out.join("trainer_state.json"));
    assert_eq!(state["global_step"], 6);
    assert!(state["best_model_checkpoint"]
        .as_str()
        .unwrap()
        .contains("checkpoint-"));
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["peft_type"], "LORA");

    // Predict with the trained adapter merged: 5 lines, scores in predict_results.json.
    let pred = tmp("pred");
    let mut args = predict_args(&model, &out, &pred);
    args.extend(strings(&[
        "--per_device_eval_batch_size",
        "2",
        "--max_target_length",
        "8",
        "--max_samples",
        "5",
    ]));
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    let rows = jsonl(&pred.join("generated_predictions.jsonl"));
    assert_eq!(rows.len(), 5);
    assert!(rows
        .iter()
        .all(|r| r["label"].is_string() && r["predict"].is_string()));
    let res = read_json(&pred.join("predict_results.json"));
    for k in [
        "predict_bleu-4",
        "predict_rouge-1",
        "predict_rouge-2",
        "predict_rouge-l",
        "predict_runtime",
    ] {
        assert!(res[k].as_f64().is_some(), "{k} in {res}");
    }
    // eval-preds on the same file gives the same scores.
    let o = Command::new(env!("CARGO_BIN_EXE_llmtune"))
        .args([
            "eval-preds",
            pred.join("generated_predictions.jsonl").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let again = read_json(&pred.join("eval_preds_results.json"));
    for k in [
        "predict_bleu-4",
        "predict_rouge-1",
        "predict_rouge-2",
        "predict_rouge-l",
    ] {
        assert_eq!(again[k], res[k], "{k}");
    }
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::remove_dir_all(&pred).unwrap();
}

#[test]
fn resume_after_kill_is_bit_identical() {
    let Some(fx) = fixtures() else { return };
    let model = fx.join("qwen2");
    let straight = tmp("straight");
    let (code, _, err) = run(&sft_args(&model, &straight, 6));
    assert_eq!(code, 0, "{err}");
    // Interrupted run: start, wait for checkpoint-3, kill -9, resume.
    let broken = tmp("broken");
    kill_when_exists(
        &sft_args(&model, &broken, 6),
        &broken.join("checkpoint-3"),
        Duration::from_secs(120),
    );
    let mut args = sft_args(&model, &broken, 6);
    args.extend(["--resume_from_checkpoint".into(), "true".into()]);
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    let a = std::fs::read(straight.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(broken.join("adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed adapter differs from the uninterrupted one");
    std::fs::remove_dir_all(&straight).unwrap();
    std::fs::remove_dir_all(&broken).unwrap();
}

#[test]
fn bad_train_flags_name_the_flag() {
    let (code, _, err) = run(&["train", "--stage", "sft", "--do_train"]);
    assert_eq!(code, 1);
    assert!(err.contains("--dataset is required"), "{err}");
    let (code, _, err) = run(&[
        "train",
        "--stage",
        "sft",
        "--do_train",
        "--predict_with_generate",
        "--dataset",
        "x",
        "--output_dir",
        "/tmp/x",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--predict_with_generate cannot be used with --do_train"),
        "{err}"
    );
    let (code, _, err) = run(&["train", "--lora_rank", "eight"]);
    assert_eq!(code, 2);
    assert!(err.contains("--lora_rank"), "{err}");
    let (code, _, err) = run(&["train", "--no_such_flag", "1"]);
    assert_eq!(code, 2);
    assert!(err.contains("--no_such_flag"), "{err}");
}

#[test]
fn config_file_is_read_and_flags_override_it() {
    let dir = tmp("cfg");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("sft.yaml");
    std::fs::write(&f, "stage: sft\ndo_train: true\n# a comment\ndataset: nope_dataset\ndataset_dir: /nonexistent\n").unwrap();
    let (code, _, err) = run(&[
        "train",
        f.to_str().unwrap(),
        "--output_dir",
        dir.join("out").to_str().unwrap(),
        "--model_name_or_path",
        "/nonexistent-model",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("/nonexistent-model"),
        "the command-line model is used: {err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gradient_checkpointing_trains_like_a_plain_run() {
    let Some(fx) = fixtures() else { return };
    let model = fx.join("llama");
    let (plain, ck) = (tmp("gc-plain"), tmp("gc-on"));
    let (code, _, err) = run(&sft_args(&model, &plain, 3));
    assert_eq!(code, 0, "{err}");
    let mut args = sft_args(&model, &ck, 3);
    args.extend(["--gradient_checkpointing".into(), "true".into()]);
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    let (a, b) = (step_losses(&plain), step_losses(&ck));
    assert_eq!(a.len(), 3);
    assert_eq!(a.len(), b.len());
    // Logged losses are rounded to 4 decimals; steps 2 and 3 depend on the updates, so equal
    // losses mean equal gradients (LoRA dropout 0.1 included).
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 2e-4, "plain {a:?} vs checkpointed {b:?}");
    }
    std::fs::remove_dir_all(&plain).unwrap();
    std::fs::remove_dir_all(&ck).unwrap();
}

/// `--bf16` on the CPU: with MKL (`LLMTUNE_MKL`, as `.ci/run`'s MKL step sets it) the frozen
/// linear weights run in bf16 and the loss curve tracks the f32 run's (bf16 rounding of
/// weights and activations: within 2% of each logged loss); without MKL it says so and trains
/// in f32, giving the f32 losses to the logged digit.
#[test]
fn bf16_on_cpu_tracks_f32_or_says_it_needs_mkl() {
    let Some(fx) = fixtures() else { return };
    let model = fx.join("llama");
    let (f32_dir, bf16_dir) = (tmp("bf16-ref"), tmp("bf16-on"));
    let (code, _, err) = run(&sft_args(&model, &f32_dir, 3));
    assert_eq!(code, 0, "{err}");
    let mut args = sft_args(&model, &bf16_dir, 3);
    args.push("--bf16".into());
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    let (a, b) = (step_losses(&f32_dir), step_losses(&bf16_dir));
    assert_eq!(a.len(), 3);
    assert_eq!(a.len(), b.len());
    let mkl = std::env::var("LLMTUNE_MKL").is_ok_and(|v| !v.is_empty());
    if mkl {
        assert!(
            err.contains("--bf16 on CPU: frozen linear weights in bf16"),
            "{err}"
        );
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 0.02 * x.abs(), "f32 {a:?} vs bf16 {b:?}");
        }
        assert_ne!(a, b, "bf16 compute should change the losses' low digits");
    } else {
        assert!(err.contains("--bf16 on CPU needs MKL"), "{err}");
        assert_eq!(a, b);
    }
    std::fs::remove_dir_all(&f32_dir).unwrap();
    std::fs::remove_dir_all(&bf16_dir).unwrap();
}

#[test]
fn freeze_and_full_save_the_trained_tensors_and_predict_loads_them() {
    let Some(fx) = fixtures() else { return };
    let model = fx.join("llama");
    let layers = read_json(&model.join("config.json"))["num_hidden_layers"]
        .as_u64()
        .unwrap();
    for (kind, extra) in [
        (
            "freeze",
            vec![
                "--num_layer_trainable",
                "1",
                "--name_module_trainable",
                "mlp",
            ],
        ),
        ("full", vec![]),
    ] {
        let out = tmp(&format!("ft-{kind}"));
        let mut args = sft_args(&model, &out, 2);
        set_flag(&mut args, "--finetuning_type", kind);
        set_flag(&mut args, "--learning_rate", "1e-3");
        set_flag(&mut args, "--save_steps", "2");
        set_flag(&mut args, "--eval_steps", "2");
        args.extend(extra.iter().map(|s| s.to_string()));
        let (code, _, err) = run(&args);
        assert_eq!(code, 0, "{kind}: {err}");
        let saved = candle_core::safetensors::load(
            out.join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mut names: Vec<&String> = saved.keys().collect();
        names.sort();
        if kind == "freeze" {
            let last = layers - 1;
            let want: Vec<String> = ["down_proj", "gate_proj", "up_proj"]
                .iter()
                .map(|m| format!("model.layers.{last}.mlp.{m}.weight"))
                .collect();
            assert_eq!(names, want.iter().collect::<Vec<_>>(), "{kind}");
        } else {
            assert!(
                names.contains(&&"model.embed_tokens.weight".to_string()),
                "{names:?}"
            );
            assert!(
                names.contains(&&"model.norm.weight".to_string()),
                "{names:?}"
            );
            assert!(
                names.len() as u64 >= 9 * layers,
                "{kind}: {} tensors",
                names.len()
            );
        }
        assert!(
            !out.join("adapter_model.safetensors").exists(),
            "{kind} writes no adapter"
        );
        assert!(out.join("checkpoint-2/model.safetensors").exists());
        let losses = step_losses(&out);
        assert_eq!(losses.len(), 2, "{kind}");
        assert!(losses.iter().all(|l| l.is_finite()), "{kind}: {losses:?}");
        // Predict with the trained tensors loaded over the base.
        let pred = tmp(&format!("ft-{kind}-pred"));
        let mut args = predict_args(&model, &out, &pred);
        args.extend(strings(&[
            "--finetuning_type",
            kind,
            "--max_target_length",
            "4",
            "--max_samples",
            "2",
        ]));
        let (code, _, err) = run(&args);
        assert_eq!(code, 0, "{kind} predict: {err}");
        assert!(err.contains("trained tensors from"), "{err}");
        let n = std::fs::read_to_string(pred.join("generated_predictions.jsonl"))
            .unwrap()
            .lines()
            .count();
        assert_eq!(n, 2);
        std::fs::remove_dir_all(&out).unwrap();
        std::fs::remove_dir_all(&pred).unwrap();
    }
}

/// The number right after `key` in `text` (e.g. `"expected peak "` -> 812.0).
fn number_after(text: &str, key: &str) -> f64 {
    let rest = &text[text
        .find(key)
        .unwrap_or_else(|| panic!("{key:?} not in {text}"))
        + key.len()..];
    let n: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    n.parse()
        .unwrap_or_else(|e| panic!("{key:?} in {text}: {e}"))
}

#[test]
fn estimate_memory_reports_the_expected_peak_and_trains_nothing() {
    let Some(fx) = fixtures() else { return };
    let out = tmp("estimate");
    let mut args = sft_args(&fx.join("llama"), &out, 3);
    args.extend(["--estimate_memory".into(), "true".into()]);
    let o = llmtune().args(&args).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let expected = number_after(&stdout, "expected peak ");
    let batch = number_after(&stdout, "--per_device_train_batch_size ");
    let p1 = number_after(&stdout, "optimizer step: ");
    let p2 = number_after(&stdout, "MB at 1 row, ");
    assert!(p1 > 10.0 && p2 >= p1 - 1.0, "{stdout}");
    // expected = peak(1) + (batch - 1) * growth per row; each figure is rounded to 1 MB.
    let want = p1 + (batch - 1.0) * (p2 - p1).max(0.0);
    assert!((expected - want).abs() <= batch + 1.0, "{stdout}");
    assert!(
        stdout.contains("largest --per_device_train_batch_size"),
        "{stdout}"
    );
    for f in [
        "adapter_model.safetensors",
        "trainer_log.jsonl",
        "training_args.json",
    ] {
        assert!(!out.join(f).exists(), "--estimate_memory wrote {f}");
    }

    let mut ppo = args.clone();
    ppo[2] = "ppo".into();
    let (code, _, err) = run(&ppo);
    assert_ne!(code, 0);
    assert!(
        err.contains("--estimate_memory works with --do_train for --stage sft, rm and dpo"),
        "{err}"
    );
}

/// How many decoder linear layers of the HF model in `model` `--quantization_bit` quantizes:
/// those whose input size is a multiple of 32 (q/k/v/gate/up read the hidden size, o the
/// heads, down the MLP width).
fn quantizable_layers(model: &Path) -> u64 {
    let cfg = read_json(&model.join("config.json"));
    let dim = |k: &str| cfg[k].as_u64().unwrap();
    let head_dim = cfg["head_dim"]
        .as_u64()
        .unwrap_or(dim("hidden_size") / dim("num_attention_heads"));
    let ok = |n: u64| (n % 32 == 0) as u64;
    let per_layer = 5 * ok(dim("hidden_size"))
        + ok(dim("num_attention_heads") * head_dim)
        + ok(dim("intermediate_size"));
    per_layer * dim("num_hidden_layers")
}

#[test]
fn quantized_base_trains_lora_close_to_f32_and_predicts() {
    let Some(fx) = fixtures() else { return };
    let model = fx.join("llama");
    let expect_n = quantizable_layers(&model);
    let reference = tmp("qlora-f32");
    let (code, _, err) = run(&sft_args(&model, &reference, 3));
    assert_eq!(code, 0, "{err}");
    let f32_losses = step_losses(&reference);
    for (bits, format, tol) in [("8", "Q8_0", 0.01), ("4", "Q4_1", 0.05)] {
        let out = tmp(&format!("qlora-{bits}"));
        let mut args = sft_args(&model, &out, 3);
        set_flag(&mut args, "--quantization_bit", bits);
        let (code, _, err) = run(&args);
        assert_eq!(code, 0, "{err}");
        assert!(
            err.contains(&format!(
                "--quantization_bit {bits}: {expect_n} linear layers of the base quantized to {format}"
            )),
            "{err}"
        );
        let losses = step_losses(&out);
        assert_eq!(losses.len(), f32_losses.len());
        for (q, f) in losses.iter().zip(&f32_losses) {
            assert!(
                (q - f).abs() <= tol * f.abs(),
                "{bits}-bit {losses:?} vs f32 {f32_losses:?}"
            );
        }
        if expect_n > 0 {
            assert_ne!(
                losses, f32_losses,
                "{bits}-bit base should change the losses"
            );
        }
        // The adapters trained: every LoRA B (zero at the start) moved.
        let saved = candle_core::safetensors::load(
            out.join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let bs: Vec<_> = saved.iter().filter(|(k, _)| k.contains("lora_B")).collect();
        assert!(!bs.is_empty());
        for (k, t) in bs {
            let m = t
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(m > 0.0, "{bits}-bit: {k} did not train");
        }
        // Prediction on the quantized base with the adapter merged first.
        let pred = tmp(&format!("qlora-{bits}-pred"));
        let mut args = predict_args(&model, &out, &pred);
        args.extend(strings(&[
            "--max_samples",
            "2",
            "--max_new_tokens",
            "4",
            "--quantization_bit",
            bits,
        ]));
        let (code, _, err) = run(&args);
        assert_eq!(code, 0, "{err}");
        assert_eq!(jsonl(&pred.join("generated_predictions.jsonl")).len(), 2);
        std::fs::remove_dir_all(&out).unwrap();
        std::fs::remove_dir_all(&pred).unwrap();
    }
    std::fs::remove_dir_all(&reference).unwrap();
    // Not with PPO, and only 4 or 8 bits: clear errors naming the flag.
    let mut args = sft_args(&model, &tmp("qlora-bad"), 1);
    set_flag(&mut args, "--quantization_bit", "3");
    let (code, _, err) = run(&args);
    assert_ne!(code, 0);
    assert!(
        err.contains("--quantization_bit must be 4 or 8, got 3"),
        "{err}"
    );
    set_flag(&mut args, "--quantization_bit", "4");
    set_flag(&mut args, "--stage", "ppo");
    let (code, _, err) = run(&args);
    assert_ne!(code, 0);
    assert!(
        err.contains("--quantization_bit is not supported with --stage ppo yet"),
        "{err}"
    );
}

/// `--quantization_bit 8` on a `Q8_0` GGUF trains on the file's own blocks (read tensor by
/// tensor, never dequantized whole): the losses follow the same file's dequantized f32 base
/// within the 8-bit activations' error, and the same layers are quantized as from the HF
/// folder.
#[test]
fn quantized_base_from_a_gguf_trains_on_its_blocks() {
    let Some(fx) = fixtures() else { return };
    let model = fx.join("llama");
    let expect_n = quantizable_layers(&model);
    let exp = tmp("qlora-gguf-export");
    let (code, _, err) = run(&strings(&[
        "export",
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--export_gguf",
        "q8_0",
        "--output_dir",
        exp.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{err}");
    let gguf = exp.join("model-q8_0.gguf");
    let reference = tmp("qlora-gguf-f32");
    let (code, _, err) = run(&sft_args(&gguf, &reference, 3));
    assert_eq!(code, 0, "{err}");
    let f32_losses = step_losses(&reference);
    let out = tmp("qlora-gguf-8");
    let mut args = sft_args(&gguf, &out, 3);
    set_flag(&mut args, "--quantization_bit", "8");
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!(
            "--quantization_bit 8: {expect_n} linear layers of the base quantized to Q8_0"
        )),
        "{err}"
    );
    let losses = step_losses(&out);
    assert_eq!(losses.len(), f32_losses.len());
    for (q, f) in losses.iter().zip(&f32_losses) {
        assert!(
            (q - f).abs() <= 0.01 * f.abs(),
            "8-bit {losses:?} vs f32 {f32_losses:?}"
        );
    }
    for d in [exp, reference, out] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
