//! The COVID-doctor walkthrough in miniature: SFT -> RM -> PPO -> predict -> chat on the tiny
//! fixture models, each stage reading the previous one's outputs, every output file checked.

use std::path::Path;

mod common;
use common::{assert_png, chat, example_data, fixtures, jsonl, read_json, run_ok, tensors, tmp};

fn walkthrough(fx: &Path, arch: &str) {
    let model = fx.join(arch);
    let model = model.to_str().unwrap();
    let data = example_data();
    let data = data.to_str().unwrap();
    let root = tmp(arch);
    let dir = |n: &str| root.join(n).to_str().unwrap().to_string();
    let (sft, rm, ppo, pred) = (dir("sft"), dir("rm"), dir("ppo"), dir("pred"));
    let shared_flags = [
        "--model_name_or_path",
        model,
        "--template",
        "chatml",
        "--dataset_dir",
        data,
        "--overwrite_cache",
        "--lora_rank",
        "4",
        "--max_source_length",
        "48",
        "--logging_steps",
        "1",
        "--seed",
        "7",
    ];
    // `train` and its stage flags first, then the flags every stage shares.
    let with = |stage: &[&str]| -> Vec<String> {
        stage
            .iter()
            .chain(&shared_flags)
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };

    // 1. SFT.
    run_ok(&with(&[
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
        "3",
        "--plot_loss",
    ]));
    let sft_p = Path::new(&sft);
    let a = tensors(&sft_p.join("adapter_model.safetensors"));
    assert!(a.iter().any(|k| k.contains("lora_A")), "{a:?}");
    assert_eq!(read_json(&sft_p.join("adapter_config.json"))["r"], 4);
    let log = jsonl(&sft_p.join("trainer_log.jsonl"));
    assert_eq!(log.len(), 3, "{log:?}");
    assert!(log.iter().all(|l| l["loss"].as_f64().unwrap() > 0.0));
    assert_png(&sft_p.join("training_loss.png"));
    assert!(
        read_json(&sft_p.join("all_results.json"))["train_loss"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    // 2. RM on top of the SFT adapter (merged), fresh LoRA + value head.
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
        "--plot_loss",
    ]));
    let rm_p = Path::new(&rm);
    let vh = tensors(&rm_p.join("value_head.safetensors"));
    assert!(vh.iter().any(|k| k.contains("summary")), "{vh:?}");
    tensors(&rm_p.join("adapter_model.safetensors"));
    let acc = read_json(&rm_p.join("all_results.json"))["eval_accuracy"]
        .as_f64()
        .unwrap();
    assert!((0.0..=1.0).contains(&acc), "eval_accuracy {acc}");
    assert_png(&rm_p.join("training_loss.png"));

    // 3. PPO: the SFT adapter merged, the RM folder as the reward model.
    let err = run_ok(&with(&[
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
        "8",
        "--learning_rate",
        "1e-3",
        "--max_steps",
        "2",
        "--max_samples",
        "8",
        "--plot_loss",
    ]));
    assert!(
        err.contains(&rm),
        "PPO did not name the reward model:\n{err}"
    );
    let ppo_p = Path::new(&ppo);
    tensors(&ppo_p.join("adapter_model.safetensors"));
    tensors(&ppo_p.join("value_head.safetensors"));
    let log = jsonl(&ppo_p.join("trainer_log.jsonl"));
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(log
        .iter()
        .all(|l| l["reward"].as_f64().unwrap().is_finite()));
    assert_png(&ppo_p.join("training_reward.png"));

    // 4. Predict with the SFT and PPO adapters merged in order, greedy.
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
        "8",
        "--max_samples",
        "4",
        "--do_sample",
        "false",
    ]));
    let pred_p = Path::new(&pred);
    let preds = jsonl(&pred_p.join("generated_predictions.jsonl"));
    assert_eq!(preds.len(), 4);
    assert!(preds
        .iter()
        .all(|p| p["label"].is_string() && p["predict"].is_string()));
    let scores = read_json(&pred_p.join("predict_results.json"));
    for k in ["bleu-4", "rouge-1", "rouge-2", "rouge-l"] {
        let v = scores[format!("predict_{k}")].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&v), "{k} = {v}");
    }

    // 5. Chat with the same adapters: one turn, then stop.
    let out = chat(
        &[
            "--model_name_or_path",
            model,
            "--template",
            "chatml",
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
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn walkthrough_llama() {
    let Some(fx) = fixtures() else { return };
    walkthrough(&fx, "llama");
}

#[test]
fn walkthrough_qwen2() {
    let Some(fx) = fixtures() else { return };
    walkthrough(&fx, "qwen2");
}
