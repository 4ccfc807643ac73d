//! `trainer_log.jsonl`, as the reference's `LogCallback` writes it.
//!
//! One JSON object per line, written like Python's `json.dumps(logs)`:
//!
//! ```text
//! {"current_steps": 10, "total_steps": 100, "loss": 2.345, "learning_rate": 4.9e-05, "epoch": 0.1, "percentage": 10.0, "elapsed_time": "0:00:12", "remaining_time": "0:01:48"}
//! ```
//!
//! Keys in this order: `current_steps`, `total_steps`, `loss`, `eval_loss`,
//! further metrics by name (e.g. the reward model's `eval_accuracy`, as HF's
//! Trainer logs it next to `eval_loss`), `predict_loss`, `reward`,
//! `learning_rate`, `epoch`, `percentage`, `elapsed_time`, `remaining_time`;
//! absent values are omitted. `percentage`
//! is `round(current / total * 100, 2)`; times are Python's
//! `str(timedelta(seconds=int(t)))` (`H:MM:SS`, `1 day, H:MM:SS`), the
//! remaining time extrapolated from the mean time per step.
//!
//! Each line is appended with a single `write` on a file opened for
//! appending, then fsynced. Readers drop a last line without its newline
//! (a torn write), so a kill never leaves a line that breaks parsing.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::{atomic_write, push_py_string, py_float_repr, py_round};

/// File name of the log.
pub const TRAINER_LOG_NAME: &str = "trainer_log.jsonl";

/// Python's `str(datetime.timedelta(seconds=int(secs)))`: `H:MM:SS`, with a
/// `N day(s), ` prefix past 24 hours. Negative or non-finite input counts as 0.
pub fn format_duration(secs: f64) -> String {
    let total = if secs.is_finite() && secs > 0.0 {
        secs as u64
    } else {
        0
    };
    let days = total / 86_400;
    let rem = total % 86_400;
    let hms = format!("{}:{:02}:{:02}", rem / 3600, (rem % 3600) / 60, rem % 60);
    match days {
        0 => hms,
        1 => format!("1 day, {hms}"),
        d => format!("{d} days, {hms}"),
    }
}

/// One line of `trainer_log.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerLogLine {
    /// Optimizer steps done.
    pub current_steps: u64,
    /// Optimizer steps of the run.
    pub total_steps: u64,
    /// Training loss since the previous log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Evaluation loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Further metrics by name (e.g. `eval_accuracy`), written after `eval_loss` in name
    /// order; reading collects every unknown numeric key here.
    #[serde(flatten, default)]
    pub extra: BTreeMap<String, Option<f64>>,
    /// Prediction loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predict_loss: Option<f64>,
    /// PPO: mean reward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<f64>,
    /// Learning rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// Fractional epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<f64>,
    /// `round(current_steps / total_steps * 100, 2)` (100 when total is 0).
    pub percentage: f64,
    /// Wall time since training started, `H:MM:SS`.
    pub elapsed_time: String,
    /// Estimated time left, `H:MM:SS`.
    pub remaining_time: String,
}

impl TrainerLogLine {
    /// A line for `current_steps` of `total_steps`, `elapsed_secs` after the
    /// start of training (or of this resumed run: pass the steps done in this
    /// run as `steps_this_run` so the mean step time ignores resumed steps).
    /// Metric fields start absent; set the ones you have.
    pub fn new(
        current_steps: u64,
        total_steps: u64,
        steps_this_run: u64,
        elapsed_secs: f64,
    ) -> Self {
        let percentage = if total_steps == 0 {
            100.0
        } else {
            py_round(current_steps as f64 / total_steps as f64 * 100.0, 2)
        };
        let per_step = if steps_this_run == 0 {
            0.0
        } else {
            elapsed_secs / steps_this_run as f64
        };
        let remaining = total_steps.saturating_sub(current_steps) as f64 * per_step;
        TrainerLogLine {
            current_steps,
            total_steps,
            loss: None,
            eval_loss: None,
            extra: BTreeMap::new(),
            predict_loss: None,
            reward: None,
            learning_rate: None,
            epoch: None,
            percentage,
            elapsed_time: format_duration(elapsed_secs),
            remaining_time: format_duration(remaining),
        }
    }

    /// The line as Python's `json.dumps` writes it (no newline).
    pub fn to_json(&self) -> String {
        let mut out = String::from("{");
        let mut first = true;
        let mut key = |out: &mut String, k: &str| {
            if !first {
                out.push_str(", ");
            }
            first = false;
            push_py_string(out, k);
            out.push_str(": ");
        };
        key(&mut out, "current_steps");
        out.push_str(&self.current_steps.to_string());
        key(&mut out, "total_steps");
        out.push_str(&self.total_steps.to_string());
        let mut optional: Vec<(&str, Option<f64>)> =
            vec![("loss", self.loss), ("eval_loss", self.eval_loss)];
        optional.extend(self.extra.iter().map(|(k, v)| (k.as_str(), *v)));
        optional.extend([
            ("predict_loss", self.predict_loss),
            ("reward", self.reward),
            ("learning_rate", self.learning_rate),
            ("epoch", self.epoch),
        ]);
        for (k, v) in optional {
            if let Some(v) = v {
                key(&mut out, k);
                out.push_str(&py_float_repr(v));
            }
        }
        key(&mut out, "percentage");
        out.push_str(&py_float_repr(self.percentage));
        key(&mut out, "elapsed_time");
        push_py_string(&mut out, &self.elapsed_time);
        key(&mut out, "remaining_time");
        push_py_string(&mut out, &self.remaining_time);
        out.push('}');
        out
    }

    /// Parse one line (Python's `NaN`/`Infinity` read as absent values).
    pub fn parse(line: &str) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_str(line).or_else(|e| {
            let cleaned = line
                .replace(": -Infinity", ": null")
                .replace(": Infinity", ": null")
                .replace(": NaN", ": null");
            serde_json::from_str(&cleaned).map_err(|_| e)
        })
    }
}

/// The `trainer_log.jsonl` of an output directory.
#[derive(Debug, Clone)]
pub struct TrainerLog {
    path: PathBuf,
}

impl TrainerLog {
    /// The log of `output_dir` (nothing is created until the first append).
    pub fn new(output_dir: &Path) -> Self {
        TrainerLog {
            path: output_dir.join(TRAINER_LOG_NAME),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one line (one `write` + fsync). Creates the file.
    pub fn append(&self, line: &TrainerLogLine) -> Result<()> {
        let mut text = line.to_json();
        text.push('\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io("open", &self.path, e))?;
        f.write_all(text.as_bytes())
            .map_err(|e| Error::io("append", &self.path, e))?;
        f.sync_data().map_err(|e| Error::io("fsync", &self.path, e))
    }

    /// Delete the log (a fresh run with `overwrite_output_dir`, as the
    /// reference does). A missing file is fine.
    pub fn reset(&self) -> Result<()> {
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io("remove", &self.path, e))
            }
            _ => Ok(()),
        }
    }

    /// Every complete line (a torn last line is skipped). Errors name the
    /// file and the 1-based line number. A missing file gives no lines.
    pub fn read(&self) -> Result<Vec<TrainerLogLine>> {
        self.complete_lines()?
            .iter()
            .enumerate()
            .map(|(i, l)| {
                TrainerLogLine::parse(l)
                    .map_err(|e| Error::state(&self.path, format!("line {}: {e}", i + 1)))
            })
            .collect()
    }

    /// On resume from step `step`: keep only the complete lines with
    /// `current_steps <= step`, rewriting the file atomically, so the log
    /// reads as if the run had never stopped. Returns the lines kept.
    pub fn truncate_after(&self, step: u64) -> Result<usize> {
        let lines = self.complete_lines()?;
        let mut kept = String::new();
        let mut n = 0;
        for (i, l) in lines.iter().enumerate() {
            let line = TrainerLogLine::parse(l)
                .map_err(|e| Error::state(&self.path, format!("line {}: {e}", i + 1)))?;
            if line.current_steps <= step {
                kept.push_str(l);
                kept.push('\n');
                n += 1;
            }
        }
        if self.path.exists() {
            atomic_write(&self.path, kept.as_bytes())?;
        }
        Ok(n)
    }

    fn complete_lines(&self) -> Result<Vec<String>> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("read", &self.path, e)),
        };
        let complete = match text.rfind('\n') {
            Some(i) => &text[..i],
            None => "",
        };
        Ok(complete
            .split('\n')
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_like_python_timedelta() {
        assert_eq!(format_duration(0.0), "0:00:00");
        assert_eq!(format_duration(83.9), "0:01:23");
        assert_eq!(format_duration(3600.0 * 10.0 + 5.0), "10:00:05");
        assert_eq!(format_duration(86_400.0), "1 day, 0:00:00");
        assert_eq!(format_duration(2.0 * 86_400.0 + 3661.0), "2 days, 1:01:01");
        assert_eq!(format_duration(-5.0), "0:00:00");
    }

    #[test]
    fn line_format_matches_the_reference() {
        let mut l = TrainerLogLine::new(10, 100, 10, 12.5);
        l.loss = Some(2.345);
        l.learning_rate = Some(4.9e-5);
        l.epoch = Some(0.1);
        // Python: json.dumps(dict(current_steps=10, total_steps=100, loss=2.345,
        // learning_rate=4.9e-05, epoch=0.1, percentage=10.0,
        // elapsed_time="0:00:12", remaining_time="0:01:52"))
        assert_eq!(
            l.to_json(),
            "{\"current_steps\": 10, \"total_steps\": 100, \"loss\": 2.345, \
             \"learning_rate\": 4.9e-05, \"epoch\": 0.1, \"percentage\": 10.0, \
             \"elapsed_time\": \"0:00:12\", \"remaining_time\": \"0:01:52\"}"
        );
        let mut e = TrainerLogLine::new(1, 3, 1, 1.0);
        e.eval_loss = Some(3.0);
        e.reward = Some(-0.5);
        assert_eq!(
            e.to_json(),
            "{\"current_steps\": 1, \"total_steps\": 3, \"eval_loss\": 3.0, \"reward\": -0.5, \
             \"percentage\": 33.33, \"elapsed_time\": \"0:00:01\", \"remaining_time\": \"0:00:02\"}"
        );
        assert_eq!(TrainerLogLine::parse(&e.to_json()).unwrap(), e);
        // Further metrics (HF's `eval_accuracy`) follow eval_loss and read back.
        let mut m = TrainerLogLine::new(2, 4, 2, 2.0);
        m.eval_loss = Some(0.5);
        m.extra.insert("eval_accuracy".into(), Some(0.75));
        m.epoch = Some(0.5);
        assert_eq!(
            m.to_json(),
            "{\"current_steps\": 2, \"total_steps\": 4, \"eval_loss\": 0.5, \"eval_accuracy\": 0.75, \
             \"epoch\": 0.5, \"percentage\": 50.0, \"elapsed_time\": \"0:00:02\", \"remaining_time\": \"0:00:02\"}"
        );
        assert_eq!(TrainerLogLine::parse(&m.to_json()).unwrap(), m);
    }

    #[test]
    fn torn_lines_are_dropped_and_resume_truncates() {
        let dir = std::env::temp_dir().join(format!("llmtune-log-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let log = TrainerLog::new(&dir);
        for step in [10, 20, 30] {
            let mut l = TrainerLogLine::new(step, 30, step, step as f64);
            l.loss = Some(if step == 20 { f64::NAN } else { 1.0 });
            log.append(&l).unwrap();
        }
        // A torn write: half a line, no newline.
        let mut f = OpenOptions::new().append(true).open(log.path()).unwrap();
        f.write_all(b"{\"current_steps\": 40, \"tot").unwrap();
        drop(f);
        let lines = log.read().unwrap();
        assert_eq!(
            lines.iter().map(|l| l.current_steps).collect::<Vec<_>>(),
            [10, 20, 30]
        );
        assert_eq!(lines[1].loss, None); // NaN reads back as absent
        assert_eq!(log.truncate_after(20).unwrap(), 2);
        let text = fs::read_to_string(log.path()).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.lines().nth(1).unwrap().contains("\"loss\": NaN"));
        log.reset().unwrap();
        assert!(log.read().unwrap().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
