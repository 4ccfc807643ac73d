//! `llmtune train --stage ppo` end to end on the tiny fixture model: the fixture LoRA as the
//! SFT `checkpoint_dir`, the fixture LoRA + value head as the reward model; every output file
//! and its contents, exact resume after kill -9, and the errors for a bad `--reward_model`.

use std::path::Path;
use std::time::Duration;

mod common;
use common::{
    copy_files, example_data, fixtures, jsonl, kill_when_exists, read_json, reward_model, run,
    strings, tmp,
};

fn ppo_args(fx: &Path, rm: &Path, out: &Path, max_steps: u32) -> Vec<String> {
    let model = fx.join("llama");
    let sft = fx.join("llama/lora");
    strings(&[
        "train",
        "--stage",
        "ppo",
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
        "--resume_lora_training",
        "False",
        "--checkpoint_dir",
        sft.to_str().unwrap(),
        "--reward_model",
        rm.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
        "--overwrite_cache",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--max_source_length",
        "48",
        "--max_target_length",
        "12",
        "--lr_scheduler_type",
        "cosine",
        "--logging_steps",
        "1",
        "--save_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--max_steps",
        &max_steps.to_string(),
        "--max_samples",
        "16",
        "--plot_loss",
        "--seed",
        "3",
    ])
}

#[test]
fn ppo_writes_every_file() {
    let Some(fx) = fixtures() else { return };
    let rm = reward_model(&fx, tmp("rm-full"));
    let out = tmp("full");
    let (code, _, err) = run(&ppo_args(&fx, &rm, &out, 4));
    assert_eq!(code, 0, "{err}");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "value_head.safetensors",
        "ppo_state.json",
        "trainer_log.jsonl",
        "trainer_state.json",
        "train_results.json",
        "all_results.json",
        "training_args.json",
        "finetuning_args.json",
        "training_loss.png",
        "training_reward.png",
        "checkpoint-2/adapter_model.safetensors",
        "checkpoint-2/value_head.safetensors",
        "checkpoint-2/ppo_state.json",
        "checkpoint-2/optimizer.safetensors",
        "checkpoint-4/scheduler.json",
    ] {
        assert!(out.join(f).exists(), "missing {f}; stderr: {err}");
    }
    for png in ["training_loss.png", "training_reward.png"] {
        assert_eq!(&std::fs::read(out.join(png)).unwrap()[1..4], b"PNG");
    }
    let lines = jsonl(&out.join("trainer_log.jsonl"));
    assert_eq!(lines.len(), 4, "one line per step: {lines:?}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["current_steps"], i as u64 + 1);
        assert_eq!(l["total_steps"], 4);
        assert!(l["loss"].as_f64().unwrap().is_finite(), "{l}");
        assert!(l["reward"].as_f64().unwrap().is_finite(), "{l}");
        assert!(l["learning_rate"].as_f64().unwrap() > 0.0, "{l}");
    }
    // The fixture value head scores every response: the rewards are not all equal.
    let rewards: Vec<f64> = lines
        .iter()
        .map(|l| l["reward"].as_f64().unwrap())
        .collect();
    assert!(rewards.iter().any(|r| *r != rewards[0]), "{rewards:?}");

    let state = read_json(&out.join("trainer_state.json"));
    assert_eq!(state["global_step"], 4);
    let hist = state["log_history"].as_array().unwrap();
    let steps: Vec<&serde_json::Value> = hist.iter().filter(|e| e.get("kl").is_some()).collect();
    assert_eq!(steps.len(), 4);
    let mut prev_coef = None;
    for e in &steps {
        for k in [
            "loss",
            "reward",
            "kl",
            "kl_coef",
            "response_length",
            "learning_rate",
            "epoch",
            "time_rollout",
            "time_scoring",
            "time_optimization",
        ] {
            assert!(e[k].as_f64().is_some_and(f64::is_finite), "{k} in {e}");
        }
        let len = e["response_length"].as_f64().unwrap();
        assert!((2.0..=11.0).contains(&len), "max new tokens < 12: {e}");
        let coef = e["kl_coef"].as_f64().unwrap();
        assert!((coef - 0.2).abs() < 1e-3, "adaptive KL starts at 0.2: {e}");
        if let Some(p) = prev_coef {
            assert_ne!(coef, p, "the KL controller moves every step");
        }
        prev_coef = Some(coef);
        assert!(e["time_rollout"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(steps[0]["kl_coef"], 0.2);
    let train = read_json(&out.join("train_results.json"));
    for k in [
        "train_loss",
        "train_reward",
        "train_runtime",
        "train_rollout_runtime",
        "train_scoring_runtime",
        "train_optimization_runtime",
        "train_rollout_tokens_per_second",
        "epoch",
    ] {
        assert!(
            train[k].as_f64().is_some_and(f64::is_finite),
            "{k} in {train}"
        );
    }
    let ps = read_json(&out.join("ppo_state.json"));
    assert_eq!(
        ps["kl_ctl"]["value"].as_f64(),
        read_json(&out.join("checkpoint-4/ppo_state.json"))["kl_ctl"]["value"].as_f64()
    );
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["r"], 4);
    // The output adapter + head load as a checkpoint_dir/critic, and the policy moved.
    let a = candle_core::safetensors::load(
        out.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let moved = a
        .iter()
        .filter(|(k, _)| k.contains("lora_B"))
        .any(|(_, t)| {
            t.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        });
    assert!(moved, "the fresh policy adapter (B = 0) was trained");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&rm);
}

#[test]
fn ppo_resume_after_kill_is_bit_identical() {
    let Some(fx) = fixtures() else { return };
    let rm = reward_model(&fx, tmp("rm-resume"));
    let straight = tmp("straight");
    let (code, _, err) = run(&ppo_args(&fx, &rm, &straight, 4));
    assert_eq!(code, 0, "{err}");
    let broken = tmp("broken");
    kill_when_exists(
        &ppo_args(&fx, &rm, &broken, 4),
        &broken.join("checkpoint-2"),
        Duration::from_secs(300),
    );
    let mut args = ppo_args(&fx, &rm, &broken, 4);
    args.extend(["--resume_from_checkpoint".into(), "true".into()]);
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    for f in [
        "adapter_model.safetensors",
        "value_head.safetensors",
        "ppo_state.json",
    ] {
        let a = std::fs::read(straight.join(f)).unwrap();
        let b = std::fs::read(broken.join(f)).unwrap();
        assert!(a == b, "resumed {f} differs from the uninterrupted one");
    }
    let _ = std::fs::remove_dir_all(&straight);
    let _ = std::fs::remove_dir_all(&broken);
    let _ = std::fs::remove_dir_all(&rm);
}

#[test]
fn bad_reward_model_names_the_flag_and_file() {
    let Some(fx) = fixtures() else { return };
    let out = tmp("bad");
    // No --reward_model at all.
    let mut args = ppo_args(&fx, Path::new("x"), &out, 1);
    let i = args.iter().position(|a| a == "--reward_model").unwrap();
    args.drain(i..i + 2);
    let (code, _, err) = run(&args);
    assert_eq!(code, 1);
    assert!(err.contains("--reward_model"), "{err}");
    // A folder with the adapter but no value head.
    let rm = tmp("rm-nohead");
    copy_files(
        &fx.join("llama/lora"),
        &rm,
        &["adapter_config.json", "adapter_model.safetensors"],
    );
    let (code, _, err) = run(&ppo_args(&fx, &rm, &out, 1));
    assert_eq!(code, 1);
    assert!(
        err.contains("--reward_model") && err.contains("value_head.safetensors"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&rm);
    let _ = std::fs::remove_dir_all(&out);
}
