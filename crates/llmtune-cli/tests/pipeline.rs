//! The COVID-doctor walkthrough in miniature: SFT -> RM -> PPO -> predict -> chat on the tiny
//! fixture models, each stage reading the previous one's outputs, every output file checked.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn fixtures() -> Option<PathBuf> {
    match std::env::var_os("LLMTUNE_FIXTURES") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: LLMTUNE_FIXTURES not set");
            None
        }
    }
}

fn example_data() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../data/example")
        .to_str()
        .unwrap()
        .to_string()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llmtune-pipeline-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn llmtune(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_llmtune"))
        .args(args)
        .env(
            "LLMTUNE_HOME",
            std::env::temp_dir().join("llmtune-test-home"),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "llmtune {}\n{err}", args.join(" "));
    err
}

fn read_json(p: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn jsonl(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", p.display())))
        .collect()
}

fn assert_png(p: &Path) {
    let b = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(
        b.len() > 1000 && b.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG plot",
        p.display()
    );
}

/// The tensors of a safetensors file, by name, with a check that they are finite.
fn tensors(p: &Path) -> Vec<String> {
    let t = candle_core::safetensors::load(p, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    for (k, v) in &t {
        let s = v
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(s.is_finite(), "{}: {k} is not finite", p.display());
    }
    t.into_keys().collect()
}

fn walkthrough(fx: &Path, arch: &str) {
    let model = fx.join(arch);
    let model = model.to_str().unwrap();
    let data = example_data();
    let root = tmp(arch);
    let dir = |n: &str| root.join(n).to_str().unwrap().to_string();
    let (sft, rm, ppo, pred) = (dir("sft"), dir("rm"), dir("ppo"), dir("pred"));
    let common = [
        "--model_name_or_path",
        model,
        "--template",
        "chatml",
        "--dataset_dir",
        &data,
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
            .chain(&common)
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| llmtune(&args.iter().map(String::as_str).collect::<Vec<_>>());

    // 1. SFT.
    run(with(&[
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
    run(with(&[
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
    let err = run(with(&[
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
    run(with(&[
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmtune"))
        .args([
            "chat",
            "--model_name_or_path",
            model,
            "--template",
            "chatml",
        ])
        .args(["--checkpoint_dir", &both, "--do_sample", "false"])
        .args(["--max_new_tokens", "4"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all("医生您好，我咳嗽两周了\nstop\n".as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
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
