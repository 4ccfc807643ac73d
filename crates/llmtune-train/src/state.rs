//! `trainer_state.json` and the `*_results.json` files, in HF's formats.
//!
//! [`TrainerState`] mirrors transformers' `TrainerState` dataclass (same
//! field names, written with sorted keys and an indent of 2 like
//! `TrainerState.save_to_json`), so the reference's `plot_loss` and users'
//! scripts read it. [`save_metrics`] writes `{split}_results.json` and merges
//! into `all_results.json` like `Trainer.save_metrics` (indent 4, sorted).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Result;
use crate::io::{atomic_write, py_round, read_json, to_python_json, write_json_sorted};

/// File name of the trainer state (HF's `TRAINER_STATE_NAME`).
pub const TRAINER_STATE_NAME: &str = "trainer_state.json";
/// File name of the merged metrics.
pub const ALL_RESULTS_NAME: &str = "all_results.json";

/// One `log_history` record: metric name to value, plus `step` and (during
/// training) `epoch`.
pub type LogEntry = BTreeMap<String, Value>;

/// Metrics of a split (`train_loss`, `eval_loss`, `train_runtime`, ...).
pub type Metrics = BTreeMap<String, Value>;

/// HF's `TrainerState` (transformers 4.x/5.x field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainerState {
    /// Fractional epoch reached (`None` before training).
    pub epoch: Option<f64>,
    /// Optimizer steps completed.
    pub global_step: u64,
    /// Optimizer steps of the whole run.
    pub max_steps: u64,
    /// `--logging_steps`.
    pub logging_steps: u64,
    /// `--eval_steps`.
    pub eval_steps: u64,
    /// `--save_steps`.
    pub save_steps: u64,
    /// Per-device train batch size.
    pub train_batch_size: Option<u64>,
    /// Epochs of the run (an integer in HF's state: `ceil(num_train_epochs)`).
    pub num_train_epochs: u64,
    /// Input tokens seen so far (HF counts it when asked; we always do).
    pub num_input_tokens_seen: u64,
    /// Floating-point operations so far.
    pub total_flos: f64,
    /// Every logged record, in order.
    pub log_history: Vec<LogEntry>,
    /// Best value of `metric_for_best_model` so far.
    pub best_metric: Option<f64>,
    /// Step of the best checkpoint.
    pub best_global_step: Option<u64>,
    /// Path of the best checkpoint (`<output_dir>/checkpoint-N`).
    pub best_model_checkpoint: Option<String>,
    /// Rank-local process zero.
    pub is_local_process_zero: bool,
    /// Global process zero.
    pub is_world_process_zero: bool,
    /// Always false here.
    pub is_hyper_param_search: bool,
    /// Unused (HF hyper-parameter search).
    pub trial_name: Option<String>,
    /// Unused (HF hyper-parameter search).
    pub trial_params: Option<Value>,
    /// Unused (HF callbacks' state).
    pub stateful_callbacks: Option<Value>,
}

impl Default for TrainerState {
    fn default() -> Self {
        TrainerState {
            epoch: None,
            global_step: 0,
            max_steps: 0,
            logging_steps: 500,
            eval_steps: 500,
            save_steps: 500,
            train_batch_size: None,
            num_train_epochs: 0,
            num_input_tokens_seen: 0,
            total_flos: 0.0,
            log_history: Vec::new(),
            best_metric: None,
            best_global_step: None,
            best_model_checkpoint: None,
            is_local_process_zero: true,
            is_world_process_zero: true,
            is_hyper_param_search: false,
            trial_name: None,
            trial_params: None,
            stateful_callbacks: None,
        }
    }
}

impl TrainerState {
    /// Append a `log_history` record as HF's `Trainer.log` does: the given
    /// values, `epoch` (when set) and `step` = `global_step`. Non-finite
    /// values are stored as `null` (JSON has no NaN). Returns the record.
    pub fn log(&mut self, values: &[(&str, f64)]) -> &LogEntry {
        let mut entry = LogEntry::new();
        for (k, v) in values {
            entry.insert(k.to_string(), f64_value(*v));
        }
        if let Some(epoch) = self.epoch {
            entry.insert("epoch".into(), f64_value(epoch));
        }
        entry.insert("step".into(), Value::from(self.global_step));
        self.log_history.push(entry);
        self.log_history.last().expect("just pushed")
    }

    /// `(step, value)` of every record holding `key` as a number, in order
    /// (what the loss plots read).
    pub fn history(&self, key: &str) -> Vec<(u64, f64)> {
        history_of(&self.log_history, key)
    }

    /// Record `metric` of the checkpoint `checkpoint` (e.g. `eval_loss` of
    /// `<output_dir>/checkpoint-100`) if it beats the best so far, as HF's
    /// `_save_checkpoint`: greater is better when `greater_is_better`, else
    /// smaller. Returns whether it became the best.
    pub fn update_best(&mut self, metric: f64, greater_is_better: bool, checkpoint: &str) -> bool {
        let better = match (self.best_metric, &self.best_model_checkpoint) {
            (Some(best), Some(_)) => {
                if greater_is_better {
                    metric > best
                } else {
                    metric < best
                }
            }
            _ => true,
        };
        if better {
            self.best_metric = Some(metric);
            self.best_global_step = Some(self.global_step);
            self.best_model_checkpoint = Some(checkpoint.to_string());
        }
        better
    }

    /// Write as HF does (sorted keys, indent 2, final newline), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_json_sorted(path, self)
    }

    /// Read a state written by us or by HF's Trainer (missing fields take
    /// their defaults).
    pub fn load(path: &Path) -> Result<Self> {
        read_json(path)
    }
}

/// `(step, value)` of every entry of `log_history` holding `key` as a number.
pub(crate) fn history_of(log_history: &[LogEntry], key: &str) -> Vec<(u64, f64)> {
    log_history
        .iter()
        .filter_map(|e| {
            let v = e.get(key)?.as_f64()?;
            let step = e.get("step").and_then(Value::as_u64).unwrap_or(0);
            Some((step, v))
        })
        .collect()
}

/// A JSON number for `v`, or `null` when not finite.
pub fn f64_value(v: f64) -> Value {
    serde_json::Number::from_f64(v)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// HF's `speed_metrics(split, start_time, num_samples, num_steps)`:
/// `{split}_runtime` (rounded to 4 decimals) and, when given,
/// `{split}_samples_per_second` / `{split}_steps_per_second` (3 decimals).
pub fn speed_metrics(
    split: &str,
    runtime_secs: f64,
    num_samples: Option<u64>,
    num_steps: Option<u64>,
) -> Metrics {
    let mut m = Metrics::new();
    m.insert(
        format!("{split}_runtime"),
        f64_value(py_round(runtime_secs, 4)),
    );
    if let Some(n) = num_samples {
        m.insert(
            format!("{split}_samples_per_second"),
            f64_value(py_round(n as f64 / runtime_secs, 3)),
        );
    }
    if let Some(n) = num_steps {
        m.insert(
            format!("{split}_steps_per_second"),
            f64_value(py_round(n as f64 / runtime_secs, 3)),
        );
    }
    m
}

/// HF's `Trainer.save_metrics(split, metrics, combined=True)`: write
/// `{split}_results.json` and merge `metrics` into `all_results.json` (both
/// `json.dump(..., indent=4, sort_keys=True)`, no final newline), atomically.
pub fn save_metrics(output_dir: &Path, split: &str, metrics: &Metrics) -> Result<()> {
    let to_text = |m: &Metrics| {
        let value = Value::Object(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        to_python_json(&value, Some(4), true)
    };
    let split_path = output_dir.join(format!("{split}_results.json"));
    atomic_write(&split_path, to_text(metrics).as_bytes())?;
    let all_path = output_dir.join(ALL_RESULTS_NAME);
    let mut all: Metrics = if all_path.exists() {
        read_json(&all_path)?
    } else {
        Metrics::new()
    };
    all.extend(metrics.iter().map(|(k, v)| (k.clone(), v.clone())));
    atomic_write(&all_path, to_text(&all).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tmpdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("llmtune-state-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn log_records_and_history() {
        let mut s = TrainerState {
            max_steps: 100,
            ..Default::default()
        };
        s.global_step = 10;
        s.epoch = Some(0.5);
        s.log(&[("loss", 2.5), ("learning_rate", 4.9e-5)]);
        s.global_step = 20;
        s.epoch = Some(1.0);
        s.log(&[("eval_loss", 2.25)]);
        s.log(&[("loss", f64::NAN)]);
        assert_eq!(s.history("loss"), vec![(10, 2.5)]);
        assert_eq!(s.history("eval_loss"), vec![(20, 2.25)]);
        assert_eq!(s.log_history[0]["step"], json!(10));
        assert_eq!(s.log_history[0]["epoch"], json!(0.5));
        assert_eq!(s.log_history[2]["loss"], Value::Null);
    }

    #[test]
    fn best_checkpoint_tracking() {
        let mut s = TrainerState {
            global_step: 100,
            ..Default::default()
        };
        assert!(s.update_best(3.0, false, "out/checkpoint-100"));
        s.global_step = 200;
        assert!(!s.update_best(3.5, false, "out/checkpoint-200"));
        s.global_step = 300;
        assert!(s.update_best(2.9, false, "out/checkpoint-300"));
        assert_eq!(
            s.best_model_checkpoint.as_deref(),
            Some("out/checkpoint-300")
        );
        assert_eq!(s.best_global_step, Some(300));
        assert_eq!(s.best_metric, Some(2.9));
    }

    #[test]
    fn state_file_format_and_round_trip() {
        let dir = tmpdir("ts");
        let mut s = TrainerState {
            max_steps: 3,
            logging_steps: 1,
            ..Default::default()
        };
        s.global_step = 1;
        s.epoch = Some(0.33);
        s.log(&[("loss", 1.25)]);
        let path = dir.join(TRAINER_STATE_NAME);
        s.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        // Sorted keys, indent 2, Python floats, trailing newline.
        assert!(
            text.starts_with("{\n  \"best_global_step\": null,\n  \"best_metric\": null,\n"),
            "{text}"
        );
        assert!(text.contains("  \"log_history\": [\n    {\n      \"epoch\": 0.33,\n      \"loss\": 1.25,\n      \"step\": 1\n    }\n  ],\n"), "{text}");
        assert!(text.contains("\"total_flos\": 0.0,"), "{text}");
        assert!(text.ends_with("}\n"));
        assert_eq!(TrainerState::load(&path).unwrap(), s);
        // An HF-written state with fewer fields loads too.
        std::fs::write(&path, r#"{"epoch": 1.0, "global_step": 5, "log_history": [{"loss": 2.0, "step": 5}], "max_steps": 5}"#).unwrap();
        let hf = TrainerState::load(&path).unwrap();
        assert_eq!(hf.global_step, 5);
        assert_eq!(hf.history("loss"), vec![(5, 2.0)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn metrics_files_merge() {
        let dir = tmpdir("metrics");
        let mut train = speed_metrics("train", 12.345678, Some(100), Some(10));
        assert_eq!(train["train_runtime"], json!(12.3457));
        assert_eq!(train["train_samples_per_second"], json!(8.1));
        assert_eq!(train["train_steps_per_second"], json!(0.81));
        train.insert("train_loss".into(), json!(2.5));
        train.insert("epoch".into(), json!(1.0));
        save_metrics(&dir, "train", &train).unwrap();
        let mut eval = Metrics::new();
        eval.insert("eval_loss".into(), json!(2.75));
        eval.insert("epoch".into(), json!(1.0));
        save_metrics(&dir, "eval", &eval).unwrap();
        let eval_text = std::fs::read_to_string(dir.join("eval_results.json")).unwrap();
        assert_eq!(
            eval_text,
            "{\n    \"epoch\": 1.0,\n    \"eval_loss\": 2.75\n}"
        );
        let all: Metrics = read_json(&dir.join(ALL_RESULTS_NAME)).unwrap();
        assert_eq!(
            all.keys().cloned().collect::<Vec<_>>(),
            [
                "epoch",
                "eval_loss",
                "train_loss",
                "train_runtime",
                "train_samples_per_second",
                "train_steps_per_second"
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
