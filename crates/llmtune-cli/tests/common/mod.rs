//! Helpers shared by the CLI integration tests: where the fixtures and the example data are,
//! temp folders, running `llmtune`, reading its JSON/JSONL/safetensors outputs.
//!
//! Every test binary compiles this module (`mod common;`) and uses only part of it.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, IndexOp, Tensor};

fn env_dir(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: {var} not set");
            None
        }
    }
}

/// The golden fixtures (`LLMTUNE_FIXTURES`), or `None` after printing "skipped: ...".
pub fn fixtures() -> Option<PathBuf> {
    env_dir("LLMTUNE_FIXTURES")
}

/// The shared folder with the reference tokenizers (`LLMTUNE_SHARED`), or `None` after
/// printing "skipped: ...".
pub fn shared() -> Option<PathBuf> {
    env_dir("LLMTUNE_SHARED")
}

/// The project's example datasets (`data/example`).
pub fn example_data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/example")
}

/// A fresh (removed if present) temp path for this test binary and process, not created.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "llmtune-{}-{name}-{}",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Owned copies of `v` (command lines).
pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Replaces the value after `flag` (or appends the pair).
pub fn set_flag(args: &mut Vec<String>, flag: &str, value: &str) {
    match args.iter().position(|a| a == flag) {
        Some(i) => args[i + 1] = value.to_string(),
        None => args.extend([flag.to_string(), value.to_string()]),
    }
}

/// The `llmtune` binary with a test `LLMTUNE_HOME` (no downloads into the user's cache).
pub fn llmtune() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_llmtune"));
    c.env(
        "LLMTUNE_HOME",
        std::env::temp_dir().join("llmtune-test-home"),
    );
    c
}

/// Runs [`llmtune`] with `args`: (exit code, stdout, stderr).
pub fn run<S: AsRef<str>>(args: &[S]) -> (i32, String, String) {
    let o = llmtune()
        .args(args.iter().map(AsRef::as_ref))
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs [`llmtune`] with `args`, asserts that it succeeds and returns its stderr.
pub fn run_ok<S: AsRef<str>>(args: &[S]) -> String {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let o = llmtune().args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "llmtune {}\n{err}", args.join(" "));
    err
}

/// Starts [`llmtune`] with `args`, waits until `marker` exists (at most `timeout`, or until
/// the run ends by itself), then kills it with SIGKILL.
pub fn kill_when_exists(args: &[String], marker: &Path, timeout: Duration) {
    let mut child = llmtune().args(args).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + timeout;
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "no {} appeared",
            marker.file_name().unwrap().to_string_lossy()
        );
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

/// `llmtune chat` with `args`, `input` on stdin; asserts that it succeeds and returns stdout.
pub fn chat(args: &[&str], input: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmtune"))
        .arg("chat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Copies the files `names` from `src` into `dst` (created if needed).
pub fn copy_files(src: &Path, dst: &Path, names: &[&str]) {
    std::fs::create_dir_all(dst).unwrap();
    for f in names {
        std::fs::copy(src.join(f), dst.join(f))
            .unwrap_or_else(|e| panic!("{} -> {}: {e}", src.join(f).display(), dst.display()));
    }
}

/// A reward-model folder `dir`: the fixture's llama adapter and value head side by side.
pub fn reward_model(fx: &Path, dir: PathBuf) -> PathBuf {
    copy_files(
        &fx.join("llama/lora"),
        &dir,
        &["adapter_config.json", "adapter_model.safetensors"],
    );
    copy_files(&fx.join("llama"), &dir, &["value_head.safetensors"]);
    dir
}

pub fn read_json(p: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn jsonl(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", p.display())))
        .collect()
}

/// The `loss` of every line of `out/trainer_log.jsonl` that has one.
pub fn step_losses(out: &Path) -> Vec<f64> {
    jsonl(&out.join("trainer_log.jsonl"))
        .iter()
        .filter_map(|l| l["loss"].as_f64())
        .collect()
}

pub fn assert_png(p: &Path) {
    let b = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(
        b.len() > 1000 && b.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG plot",
        p.display()
    );
}

/// The tensors of a safetensors file, by name, with a check that they are finite.
pub fn tensors(p: &Path) -> Vec<String> {
    let t = candle_core::safetensors::load(p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    for (k, v) in &t {
        let s = v
            .to_dtype(DType::F32)
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

/// Logits of the fixture's right-padded batch (`fx_model/cases.safetensors`) computed by the
/// model at `model` (a folder or a GGUF file), valid positions only.
pub fn valid_logits(model: &Path, fx_model: &Path) -> Vec<Vec<f32>> {
    let cases =
        candle_core::safetensors::load(fx_model.join("cases.safetensors"), &Device::Cpu).unwrap();
    let ids = &cases["forward.input_ids"];
    let mask = cases["forward.attention_mask"]
        .to_dtype(DType::U32)
        .unwrap();
    let p =
        llmtune_models::load_pretrained(model.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let (logits, _) = p.model.forward(ids, Some(&mask), None).unwrap();
    rows(&logits, &mask)
}

/// The rows of `logits` `[batch, seq, vocab]` where `mask` (U32) is 1.
pub fn rows(logits: &Tensor, mask: &Tensor) -> Vec<Vec<f32>> {
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
