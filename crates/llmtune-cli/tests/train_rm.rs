//! `llmtune train --stage rm` end to end on the tiny fixture model and the project's example
//! preference pairs: every output file (adapter, value head, logs with `eval_accuracy`,
//! checkpoints with their head), `--do_predict` with the trained folder, and the errors for a
//! folder without a value head and for a dataset without pairs.

use std::path::Path;

mod common;
use common::{
    copy_files, example_data, fixtures, jsonl, read_json, run, set_flag, step_losses, strings, tmp,
};

fn rm_train_args(model: &Path, out: &Path, dataset: &str) -> Vec<String> {
    strings(&[
        "train",
        "--stage",
        "rm",
        "--do_train",
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--template",
        "chatml",
        "--dataset",
        dataset,
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
        "48",
        "--max_target_length",
        "24",
        "--lr_scheduler_type",
        "cosine",
        "--logging_steps",
        "1",
        "--save_steps",
        "2",
        "--eval_steps",
        "2",
        "--learning_rate",
        "5e-3",
        "--max_steps",
        "4",
        "--dev_ratio",
        "0.25",
        "--evaluation_strategy",
        "steps",
        "--load_best_model_at_end",
        "--plot_loss",
        "--seed",
        "7",
    ])
}

fn predict_args(model: &Path, ckpt: &str, out: &Path) -> Vec<String> {
    strings(&[
        "train",
        "--stage",
        "rm",
        "--do_predict",
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--template",
        "chatml",
        "--dataset",
        "example_rm",
        "--dataset_dir",
        example_data().to_str().unwrap(),
        "--checkpoint_dir",
        ckpt,
        "--output_dir",
        out.to_str().unwrap(),
        "--per_device_eval_batch_size",
        "5",
        "--max_source_length",
        "48",
        "--max_target_length",
        "24",
    ])
}

fn safetensors_keys(p: &Path) -> Vec<String> {
    let bytes = std::fs::read(p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut keys: Vec<String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    keys.sort();
    keys
}

#[test]
fn rm_writes_every_file_and_predict_scores_pairs() {
    let Some(fx) = fixtures() else { return };
    let model = fx.join("llama");
    let out = tmp("train");
    let (code, _, err) = run(&rm_train_args(&model, &out, "example_rm"));
    assert_eq!(code, 0, "{err}");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "value_head.safetensors",
        "trainer_log.jsonl",
        "trainer_state.json",
        "train_results.json",
        "eval_results.json",
        "all_results.json",
        "training_args.json",
        "finetuning_args.json",
        "training_loss.png",
        "training_eval_loss.png",
        "training_eval_accuracy.png",
        "checkpoint-2/adapter_model.safetensors",
        "checkpoint-2/value_head.safetensors",
        "checkpoint-4/value_head.safetensors",
        "checkpoint-4/optimizer.safetensors",
        "checkpoint-4/task_state.json",
    ] {
        assert!(out.join(f).exists(), "missing {f}; stderr: {err}");
    }
    assert_eq!(
        safetensors_keys(&out.join("value_head.safetensors")),
        ["summary.bias", "summary.weight"]
    );
    // The value head is trained with the adapter: its optimizer state is in the checkpoint.
    assert!(
        safetensors_keys(&out.join("checkpoint-4/optimizer.safetensors"))
            .iter()
            .any(|k| k.contains("v_head.summary.weight"))
    );
    let task_state = read_json(&out.join("checkpoint-4/task_state.json"));
    assert!(task_state["value_head_dropout_calls"].as_u64().unwrap() > 0);

    let lines = jsonl(&out.join("trainer_log.jsonl"));
    let losses: Vec<f64> = lines.iter().filter_map(|l| l["loss"].as_f64()).collect();
    assert_eq!(losses.len(), 4, "one loss line per step: {lines:?}");
    // A fresh head starts near log 2 (rewards of a pair nearly equal).
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    let evals: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals.len(), 2, "{lines:?}");
    // 34 pairs, dev_ratio 0.25: 9 held out; accuracy is a share of 9.
    for e in &evals {
        let acc = e["eval_accuracy"].as_f64().unwrap();
        assert!((0..=9).any(|k| (acc - k as f64 / 9.0).abs() < 1e-4), "{e}");
    }
    let state = read_json(&out.join("trainer_state.json"));
    assert_eq!(state["global_step"], 4);
    let hist_acc: Vec<f64> = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["eval_accuracy"].as_f64())
        .collect();
    assert_eq!(hist_acc.len(), 2);
    let eval = read_json(&out.join("eval_results.json"));
    let all = read_json(&out.join("all_results.json"));
    let eval_acc = eval["eval_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&eval_acc), "{eval}");
    assert_eq!(all["eval_accuracy"], eval["eval_accuracy"]);
    assert!(all["eval_loss"].as_f64().unwrap().is_finite(), "{all}");
    assert!(all["train_loss"].as_f64().unwrap().is_finite(), "{all}");
    // load_best_model_at_end restored the best checkpoint's adapter and head.
    let best = state["best_model_checkpoint"].as_str().unwrap().to_string();
    assert!(best.contains("checkpoint-"), "{best}");
    assert_eq!(
        std::fs::read(out.join("value_head.safetensors")).unwrap(),
        std::fs::read(Path::new(&best).join("value_head.safetensors")).unwrap(),
        "the saved head is the best checkpoint's"
    );
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(Path::new(&best).join("adapter_model.safetensors")).unwrap(),
    );

    // Resume from checkpoint-2 (adapter, value head, optimizer, dropout RNGs) in a fresh
    // folder: the same final adapter and head as the uninterrupted run, byte for byte.
    let resumed = tmp("resumed");
    std::fs::create_dir_all(&resumed).unwrap();
    let ck2 = resumed.join("checkpoint-2");
    std::fs::create_dir_all(&ck2).unwrap();
    for e in std::fs::read_dir(out.join("checkpoint-2")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), ck2.join(e.file_name())).unwrap();
    }
    // trainer_state.json names the best checkpoint by path: point it at the copy.
    let st = std::fs::read_to_string(ck2.join("trainer_state.json"))
        .unwrap()
        .replace(out.to_str().unwrap(), resumed.to_str().unwrap());
    std::fs::write(ck2.join("trainer_state.json"), st).unwrap();
    let mut a = rm_train_args(&model, &resumed, "example_rm");
    a.extend(strings(&["--resume_from_checkpoint", "true"]));
    let (code, _, err) = run(&a);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resuming from"), "{err}");
    for f in ["value_head.safetensors", "adapter_model.safetensors"] {
        assert!(
            std::fs::read(out.join(f)).unwrap() == std::fs::read(resumed.join(f)).unwrap(),
            "{f}: the resumed run differs from the uninterrupted one"
        );
    }

    // Predict with the trained folder: one {"chosen", "rejected"} line per pair (34).
    let pred = tmp("pred");
    let (code, stdout, err) = run(&predict_args(&model, out.to_str().unwrap(), &pred));
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(pred.join("generated_predictions.jsonl")).unwrap();
    let rows: Vec<(f64, f64)> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v.as_object().unwrap().len(), 2, "{l}");
            (
                v["chosen"].as_f64().unwrap(),
                v["rejected"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows.len(), 34);
    let correct = rows.iter().filter(|(c, r)| c > r).count();
    let res = read_json(&pred.join("predict_results.json"));
    assert_eq!(
        res["predict_accuracy"].as_f64().unwrap(),
        correct as f64 / 34.0
    );
    assert_eq!(res["predict_samples"].as_f64().unwrap(), 34.0);
    let loss: f64 = rows
        .iter()
        .map(|(c, r)| {
            let x = r - c;
            x.max(0.0) + (-x.abs()).exp().ln_1p()
        })
        .sum::<f64>()
        / 34.0;
    let pl = res["predict_loss"].as_f64().unwrap();
    assert!((pl - loss).abs() < 1e-6, "{pl} vs {loss}");
    assert!(res["predict_runtime"].as_f64().is_some(), "{res}");
    assert!(
        stdout.contains(&format!(
            "34 pairs: accuracy {:.4} ({correct} with chosen > rejected)",
            correct as f64 / 34.0
        )),
        "{stdout}"
    );

    // The same scores with a different batch size (positions follow the mask).
    let pred1 = tmp("pred1");
    let mut a = predict_args(&model, out.to_str().unwrap(), &pred1);
    set_flag(&mut a, "--per_device_eval_batch_size", "1");
    let i = a.iter().position(|x| x == "--do_predict").unwrap();
    a[i] = "--do_eval".into();
    let (code, _, err) = run(&a);
    assert_eq!(code, 0, "{err}");
    let ev = read_json(&pred1.join("eval_results.json"));
    assert_eq!(ev["eval_accuracy"], res["predict_accuracy"], "{ev}");
    let el = ev["eval_loss"].as_f64().unwrap();
    assert!((el - pl).abs() < 1e-5, "{el} vs {pl}");
    assert!(!pred1.join("generated_predictions.jsonl").exists());

    // A folder without a value head (an SFT-style adapter): a clear error naming it.
    let no_head = tmp("nohead");
    copy_files(
        &out,
        &no_head,
        &["adapter_model.safetensors", "adapter_config.json"],
    );
    let (code, _, err) = run(&predict_args(
        &model,
        no_head.to_str().unwrap(),
        &tmp("bad"),
    ));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("--checkpoint_dir {}", no_head.display()))
            && err.contains("value_head.safetensors"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // No checkpoint_dir at all.
    let mut a = predict_args(&model, "x", &tmp("bad2"));
    let i = a.iter().position(|x| x == "--checkpoint_dir").unwrap();
    a.drain(i..i + 2);
    let (code, _, err) = run(&a);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("needs --checkpoint_dir"), "{err}");

    for d in [&out, &resumed, &pred, &pred1, &no_head] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// `--do_train --do_predict`: after training, the saved reward model scores every pair into
/// the same output folder.
#[test]
fn rm_train_then_predict_in_one_command() {
    let Some(fx) = fixtures() else { return };
    let out = tmp("trainpredict");
    let mut a = rm_train_args(&fx.join("llama"), &out, "example_rm");
    a.push("--do_predict".into());
    set_flag(&mut a, "--max_steps", "2");
    let (code, stdout, err) = run(&a);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("value_head.safetensors").is_file());
    let text = std::fs::read_to_string(out.join("generated_predictions.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 34);
    let res = read_json(&out.join("predict_results.json"));
    assert!(res["predict_accuracy"].as_f64().is_some(), "{res}");
    let all = read_json(&out.join("all_results.json"));
    for k in ["train_loss", "eval_accuracy", "predict_accuracy"] {
        assert!(all[k].as_f64().is_some(), "{k} in {all}");
    }
    assert!(stdout.contains("34 pairs: accuracy "), "{stdout}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn rm_on_a_dataset_without_pairs_names_the_record_and_field() {
    let Some(fx) = fixtures() else { return };
    let out = tmp("sftdata");
    let (code, _, err) = run(&rm_train_args(&fx.join("llama"), &out, "example_sft"));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("example_sft.json"), "{err}");
    assert!(err.contains("output"), "{err}");
    assert!(
        err.contains("expected a two-element list [chosen, rejected]"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn rm_without_an_action_says_what_to_pass() {
    let (code, _, err) = run(&strings(&[
        "train",
        "--stage",
        "rm",
        "--dataset",
        "example_rm",
        "--output_dir",
        "/tmp/x",
    ]));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("nothing to do: pass --do_train, --do_eval or --do_predict"),
        "{err}"
    );
}

#[test]
fn rm_gradient_checkpointing_trains_like_a_plain_run() {
    let Some(fx) = fixtures() else { return };
    let model = fx.join("llama");
    let (plain, ck) = (tmp("gc-plain"), tmp("gc-on"));
    let (code, _, err) = run(&rm_train_args(&model, &plain, "example_rm"));
    assert_eq!(code, 0, "{err}");
    let mut args = rm_train_args(&model, &ck, "example_rm");
    args.extend(strings(&["--gradient_checkpointing", "true"]));
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    let (a, b) = (step_losses(&plain), step_losses(&ck));
    assert_eq!(a.len(), 4, "{a:?}");
    // Rounded to 4 decimals in the log; steps 2-4 depend on the updates (lr 5e-3, LoRA dropout
    // 0.1 and the value head's dropout), so equal losses mean equal gradients.
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 2e-4, "plain {a:?} vs checkpointed {b:?}");
    }
    let acc = |d: &Path| read_json(&d.join("all_results.json"))["eval_accuracy"].as_f64();
    assert_eq!(acc(&plain), acc(&ck));
    std::fs::remove_dir_all(&plain).unwrap();
    std::fs::remove_dir_all(&ck).unwrap();
}
