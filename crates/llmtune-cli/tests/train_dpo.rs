//! `llmtune train --stage dpo` on the tiny fixture Llama and the project's example preference
//! pairs: the first step's loss is `log 2` (a fresh adapter is the reference), training on
//! the same pairs lowers it, the adapter and TRL's evaluation metrics are written, and bad
//! flags are clear errors.

use std::path::Path;

mod common;
use common::{
    assert_png, example_data, fixtures, read_json, run, set_flag, step_losses, strings, tmp,
};

fn dpo_args(model: &Path, out: &Path) -> Vec<String> {
    strings(&[
        "train",
        "--stage",
        "dpo",
        "--do_train",
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--template",
        "chatml",
        "--dataset",
        "example_rm",
        "--dataset_dir",
        example_data().to_str().unwrap(),
        "--finetuning_type",
        "lora",
        "--lora_rank",
        "4",
        "--output_dir",
        out.to_str().unwrap(),
        "--overwrite_cache",
        "--max_samples",
        "4",
        "--dev_ratio",
        "0.5",
        "--per_device_train_batch_size",
        "2",
        "--per_device_eval_batch_size",
        "2",
        "--max_steps",
        "6",
        "--logging_steps",
        "1",
        "--evaluation_strategy",
        "steps",
        "--eval_steps",
        "6",
        "--learning_rate",
        "1e-2",
        "--plot_loss",
    ])
}

#[test]
fn dpo_starts_at_log_2_lowers_the_loss_and_saves_the_adapter() {
    let Some(fx) = fixtures() else { return };
    let model = fx.join("llama");
    let out = tmp("dpo");
    let (code, _, err) = run(&dpo_args(&model, &out));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("DPO beta 0.1"), "{err}");
    // Two training pairs, one batch: every step sees the same pairs.
    let losses = step_losses(&out);
    assert_eq!(losses.len(), 6, "{losses:?}");
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 1e-4,
        "first step {losses:?}"
    );
    assert!(losses[5] < losses[0] - 1e-3, "{losses:?}");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "trainer_state.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["r"], 4);
    let all = read_json(&out.join("all_results.json"));
    let acc = all["eval_rewards/accuracies"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{all}");
    let (c, r, m) = (
        all["eval_rewards/chosen"].as_f64().unwrap(),
        all["eval_rewards/rejected"].as_f64().unwrap(),
        all["eval_rewards/margins"].as_f64().unwrap(),
    );
    assert!((m - (c - r)).abs() < 1e-9, "{all}");
    assert!(all["eval_logps/chosen"].as_f64().unwrap() < 0.0, "{all}");
    assert!(all["eval_loss"].as_f64().unwrap() > 0.0, "{all}");
    assert_png(&out.join("training_loss.png"));
    assert_png(&out.join("training_eval_rewards_accuracies.png"));
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn continuing_an_adapter_takes_its_start_as_the_reference() {
    let Some(fx) = fixtures() else { return };
    let model = fx.join("llama");
    let out = tmp("dpo-continue");
    let mut args = dpo_args(&model, &out);
    set_flag(&mut args, "--max_steps", "2");
    set_flag(&mut args, "--eval_steps", "2");
    // The fixture's adapter sets its own rank; it is continued, not merged.
    set_flag(
        &mut args,
        "--checkpoint_dir",
        model.join("lora").to_str().unwrap(),
    );
    set_flag(&mut args, "--resume_lora_training", "true");
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("(a frozen copy)"), "{err}");
    let losses = step_losses(&out);
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 1e-4,
        "{losses:?}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn dpo_flag_errors_name_the_flag() {
    let Some(fx) = fixtures() else { return };
    let model = fx.join("llama");
    let out = tmp("dpo-bad");
    let cases: [(&str, &str, &str); 3] = [
        (
            "--finetuning_type",
            "freeze",
            "--stage dpo trains a LoRA adapter",
        ),
        ("--dpo_beta", "0", "--dpo_beta must be > 0, got 0"),
        (
            "--gradient_checkpointing",
            "true",
            "--gradient_checkpointing is not supported with --stage dpo",
        ),
    ];
    for (flag, value, want) in cases {
        let mut args = dpo_args(&model, &out);
        set_flag(&mut args, flag, value);
        let (code, _, err) = run(&args);
        assert_ne!(code, 0, "{flag} {value}");
        assert!(err.contains(want), "{flag} {value}: {err}");
    }
    let mut args = dpo_args(&model, &out);
    for a in args.iter_mut().filter(|a| *a == "--do_train") {
        *a = "--do_eval".into();
    }
    let (code, _, err) = run(&args);
    assert_ne!(code, 0);
    assert!(err.contains("--stage dpo needs --do_train"), "{err}");
    assert!(!out.join("adapter_model.safetensors").exists());
    let _ = std::fs::remove_dir_all(&out);
}
