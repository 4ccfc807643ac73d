//! `llmtune export` and `llmtune chat` end to end on the tiny fixture models.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::{DType, Device, IndexOp, Tensor};

fn fixtures() -> Option<PathBuf> {
    match std::env::var_os("LLMTUNE_FIXTURES") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: LLMTUNE_FIXTURES not set");
            None
        }
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llmtune-export-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

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

/// Logits of the fixture's right-padded batch, valid positions only.
fn valid_logits(dir: &Path, fx_model: &Path) -> Vec<Vec<f32>> {
    let cases =
        candle_core::safetensors::load(fx_model.join("cases.safetensors"), &Device::Cpu).unwrap();
    let ids = &cases["forward.input_ids"];
    let mask = cases["forward.attention_mask"]
        .to_dtype(DType::U32)
        .unwrap();
    let p =
        llmtune_models::load_pretrained(dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let (logits, _) = p.model.forward(ids, Some(&mask), None).unwrap();
    rows(&logits, &mask)
}

fn rows(logits: &Tensor, mask: &Tensor) -> Vec<Vec<f32>> {
    let m: Vec<Vec<u32>> = mask.to_vec2().unwrap();
    let mut out = vec![];
    for (b, row) in m.iter().enumerate() {
        for (t, &v) in row.iter().enumerate() {
            if v == 1 {
                out.push(logits.i((b, t)).unwrap().to_vec1::<f32>().unwrap());
            }
        }
    }
    out
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
        let gen: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("generation_config.json")).unwrap(),
        )
        .unwrap();
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
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmtune"))
        .args(["chat", "--model_name_or_path"])
        .arg(fx.join("llama"))
        .args([
            "--template",
            "chatml",
            "--do_sample",
            "false",
            "--max_new_tokens",
            "5",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello\nhow are you\nclear\nhello\nstop\nnever read\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
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
