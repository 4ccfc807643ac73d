//! `llmtune export` and `llmtune chat` end to end on the tiny fixture models.

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device};

mod common;
use common::{chat, fixtures, read_json, rows, tmp, valid_logits};

fn export(model: &Path, lora: &Path, out: &Path, extra: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_llmtune"))
        .args(["export", "--model_name_or_path"])
        .arg(model)
        .arg("--checkpoint_dir")
        .arg(lora)
        .arg("--output_dir")
        .arg(out)
        .args(["--template", "chatml"])
        .args(extra)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    err
}

#[test]
fn exported_model_reproduces_the_merged_lora_logits() {
    let Some(fx) = fixtures() else { return };
    for arch in ["llama", "qwen2"] {
        let model = fx.join(arch);
        let out = tmp(arch);
        export(&model, &model.join("lora"), &out, &[]);
        for f in [
            "model.safetensors",
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(out.join(f).exists(), "{arch}: missing {f}");
        }
        let cases =
            candle_core::safetensors::load(model.join("cases.safetensors"), &Device::Cpu).unwrap();
        let mask = cases["forward.attention_mask"]
            .to_dtype(DType::U32)
            .unwrap();
        let want = rows(&cases["lora.merged_logits"], &mask);
        let got = valid_logits(&out, &model);
        let mut worst = 0f32;
        for (a, b) in got.iter().zip(&want) {
            for (x, y) in a.iter().zip(b) {
                let d = (x - y).abs() - 1e-4 * y.abs();
                worst = worst.max(d);
            }
        }
        assert!(
            worst <= 1e-4,
            "{arch}: logits differ by {worst} beyond tolerance"
        );
        // The config round-trips; generation_config carries the template's stop id.
        let gen = read_json(&out.join("generation_config.json"));
        assert!(
            gen["eos_token_id"]
                .as_array()
                .is_some_and(|a| !a.is_empty()),
            "{gen}"
        );

        // Sharded: several files plus an index, the same logits bit for bit.
        let sharded = tmp(&format!("{arch}-sharded"));
        let err = export(
            &model,
            &model.join("lora"),
            &sharded,
            &["--max_shard_size", "300KB"],
        );
        assert!(!sharded.join("model.safetensors").exists());
        let index = read_json(&sharded.join("model.safetensors.index.json"));
        let files: std::collections::BTreeSet<&str> = index["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(files.len() > 1, "{arch}: {err}");
        assert_eq!(
            valid_logits(&sharded, &model),
            got,
            "{arch}: sharded export differs"
        );
        std::fs::remove_dir_all(&out).unwrap();
        std::fs::remove_dir_all(&sharded).unwrap();
    }
}

#[test]
fn export_flags_are_checked() {
    let Some(fx) = fixtures() else { return };
    let out = tmp("bad");
    let o = Command::new(env!("CARGO_BIN_EXE_llmtune"))
        .args(["export", "--model_name_or_path"])
        .arg(fx.join("llama"))
        .arg("--output_dir")
        .arg(&out)
        .args(["--max_shard_size", "2XB"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--max_shard_size") && err.contains("unknown unit"),
        "{err}"
    );
}

#[test]
fn chat_keeps_history_clears_it_and_stops() {
    let Some(fx) = fixtures() else { return };
    let out = chat(
        &[
            "--model_name_or_path",
            fx.join("llama").to_str().unwrap(),
            "--template",
            "chatml",
            "--do_sample",
            "false",
            "--max_new_tokens",
            "5",
        ],
        "hello\nhow are you\nclear\nhello\nstop\nnever read\n",
    );
    assert_eq!(out.matches("Assistant: ").count(), 3, "{out}");
    assert_eq!(out.matches("History has been removed.").count(), 1, "{out}");
    // Greedy: the first turn and the turn after `clear` see the same prompt, so they reply the
    // same; the second turn sees the history.
    let replies: Vec<&str> = out
        .split("Assistant: ")
        .skip(1)
        .map(|r| r.split("\nUser:").next().unwrap().trim())
        .collect();
    assert_eq!(replies[0], replies[2], "{out}");
}
