//! Learning-rate schedules with warmup, as transformers' `get_scheduler`.
//!
//! Each schedule is a multiplier `lambda(step)` of the base learning rate,
//! the same formulas as the `lr_lambda`s of `transformers/optimization.py`
//! (computed in `f64` like Python's floats), and the learning rate is
//! `base_lr * lambda(step)` as torch's `LambdaLR` computes it.
//!
//! Step semantics follow torch: a fresh scheduler is at step 0; the optimizer
//! step number `k` (1-based) uses `lr_at(k - 1)`; after it the trainer calls
//! [`LrScheduler::step`], and [`LrScheduler::last_lr`] (what HF logs as
//! `learning_rate` after `k` steps) is `lr_at(k)`. With warmup the very first
//! update therefore uses a learning rate of 0, as in HF.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::{py_float_repr, read_json, write_json_sorted};

/// The file name of a saved scheduler inside a checkpoint.
pub const SCHEDULER_NAME: &str = "scheduler.json";

/// `lr_scheduler_type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerType {
    /// Linear warmup, then linear decay to 0 at `num_training_steps`.
    Linear,
    /// Linear warmup, then half a cosine wave (`num_cycles` 0.5) down to 0.
    Cosine,
    /// Constant (no warmup even if one is configured, as HF).
    Constant,
    /// Linear warmup, then constant.
    ConstantWithWarmup,
    /// Linear warmup, then polynomial decay (power 1) to `lr_end` (1e-7).
    Polynomial,
}

impl SchedulerType {
    /// Every accepted name, in the order of the docs.
    pub const NAMES: [&'static str; 5] = [
        "linear",
        "cosine",
        "constant",
        "constant_with_warmup",
        "polynomial",
    ];

    /// The name as given on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            SchedulerType::Linear => "linear",
            SchedulerType::Cosine => "cosine",
            SchedulerType::Constant => "constant",
            SchedulerType::ConstantWithWarmup => "constant_with_warmup",
            SchedulerType::Polynomial => "polynomial",
        }
    }
}

impl fmt::Display for SchedulerType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SchedulerType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "linear" => SchedulerType::Linear,
            "cosine" => SchedulerType::Cosine,
            "constant" => SchedulerType::Constant,
            "constant_with_warmup" => SchedulerType::ConstantWithWarmup,
            "polynomial" => SchedulerType::Polynomial,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "--lr_scheduler_type: unknown value '{other}' (expected one of: {})",
                    Self::NAMES.join(", ")
                )))
            }
        })
    }
}

/// The number of warmup steps as HF's `TrainingArguments.get_warmup_steps`:
/// `warmup_steps` if it is > 0, else `ceil(num_training_steps * warmup_ratio)`.
/// A `warmup_ratio` outside `[0, 1]` is an error naming the flag.
pub fn num_warmup_steps(
    num_training_steps: u64,
    warmup_steps: u64,
    warmup_ratio: f64,
) -> Result<u64> {
    if !(0.0..=1.0).contains(&warmup_ratio) {
        return Err(Error::InvalidArgument(format!(
            "--warmup_ratio must lie in range [0,1], got {warmup_ratio}"
        )));
    }
    if warmup_steps > 0 {
        Ok(warmup_steps)
    } else {
        Ok((num_training_steps as f64 * warmup_ratio).ceil() as u64)
    }
}

/// A learning-rate schedule and its position (torch's `LambdaLR` state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrScheduler {
    /// Which schedule.
    pub kind: SchedulerType,
    /// The optimizer's initial learning rate (`--learning_rate`).
    pub base_lr: f64,
    /// Warmup steps (see [`num_warmup_steps`]).
    pub num_warmup_steps: u64,
    /// Total optimizer steps of the run.
    pub num_training_steps: u64,
    /// Cosine waves (0.5: decay from the peak to 0 once).
    pub num_cycles: f64,
    /// Final learning rate of the polynomial schedule.
    pub lr_end: f64,
    /// Power of the polynomial schedule.
    pub power: f64,
    /// Scheduler steps taken so far (torch's `last_epoch`).
    pub current_step: u64,
}

impl LrScheduler {
    /// A schedule at step 0 with HF's defaults (`num_cycles` 0.5, `lr_end`
    /// 1e-7, `power` 1.0). The polynomial schedule needs `base_lr > lr_end`
    /// (HF raises the same error).
    pub fn new(
        kind: SchedulerType,
        base_lr: f64,
        num_training_steps: u64,
        num_warmup_steps: u64,
    ) -> Result<Self> {
        let s = LrScheduler {
            kind,
            base_lr,
            num_warmup_steps,
            num_training_steps,
            num_cycles: 0.5,
            lr_end: 1e-7,
            power: 1.0,
            current_step: 0,
        };
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<()> {
        if !self.base_lr.is_finite() || self.base_lr < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "--learning_rate must be a finite value >= 0, got {}",
                self.base_lr
            )));
        }
        if self.kind == SchedulerType::Polynomial && self.base_lr <= self.lr_end {
            return Err(Error::InvalidArgument(format!(
                "lr_end ({}) must be smaller than initial lr ({})",
                py_float_repr(self.lr_end),
                py_float_repr(self.base_lr)
            )));
        }
        Ok(())
    }

    /// The multiplier of `base_lr` at `step` (transformers' `lr_lambda`).
    pub fn lambda(&self, step: u64) -> f64 {
        let warmup = self.num_warmup_steps;
        let total = self.num_training_steps;
        let warmup_factor = |step: u64| step as f64 / warmup.max(1) as f64;
        match self.kind {
            SchedulerType::Constant => 1.0,
            SchedulerType::ConstantWithWarmup => {
                if step < warmup {
                    warmup_factor(step)
                } else {
                    1.0
                }
            }
            SchedulerType::Linear => {
                if step < warmup {
                    return warmup_factor(step);
                }
                let remaining = total as i128 - step as i128;
                let span = (total as i128 - warmup as i128).max(1);
                (remaining as f64 / span as f64).max(0.0)
            }
            SchedulerType::Cosine => {
                if step < warmup {
                    return warmup_factor(step);
                }
                let span = (total as i128 - warmup as i128).max(1);
                let progress = (step - warmup) as f64 / span as f64;
                let wave = (std::f64::consts::PI * self.num_cycles * 2.0 * progress).cos();
                (0.5 * (1.0 + wave)).max(0.0)
            }
            SchedulerType::Polynomial => {
                let lr_init = self.base_lr;
                if step < warmup {
                    warmup_factor(step)
                } else if step > total || total == warmup {
                    // (HF divides by zero when total == warmup; the end value
                    // is the only sensible one.)
                    self.lr_end / lr_init
                } else {
                    let lr_range = lr_init - self.lr_end;
                    let decay_steps = (total - warmup) as f64;
                    let pct_remaining = 1.0 - (step - warmup) as f64 / decay_steps;
                    let decay = lr_range * pct_remaining.powf(self.power) + self.lr_end;
                    decay / lr_init
                }
            }
        }
    }

    /// The learning rate at `step`: `base_lr * lambda(step)`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.base_lr * self.lambda(step)
    }

    /// Advance by one step (call after each optimizer step).
    pub fn step(&mut self) {
        self.current_step += 1;
    }

    /// The learning rate for the next optimizer step, `lr_at(current_step)`
    /// (torch's `get_last_lr()[0]`, what HF logs).
    pub fn last_lr(&self) -> f64 {
        self.lr_at(self.current_step)
    }

    /// Save as JSON (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        write_json_sorted(path, self)
    }

    /// Load a schedule saved by [`LrScheduler::save`] (bit-exact values).
    pub fn load(path: &Path) -> Result<Self> {
        let s: LrScheduler = read_json(path)?;
        s.validate()
            .map_err(|e| Error::state(path, e.to_string()))?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1e-30)
    }

    fn sched(kind: SchedulerType, base: f64) -> LrScheduler {
        LrScheduler::new(kind, base, 100, 10).unwrap()
    }

    // All expected values below are worked out by hand from the lambdas of
    // transformers' optimization.py with total = 100, warmup = 10.

    #[test]
    fn linear() {
        let s = sched(SchedulerType::Linear, 5e-5);
        assert_eq!(s.lr_at(0), 0.0);
        assert!(close(s.lr_at(5), 2.5e-5)); // 5/10
        assert!(close(s.lr_at(10), 5e-5)); // 90/90
        assert!(close(s.lr_at(55), 2.5e-5)); // 45/90
        assert!(close(s.lr_at(91), 5e-6)); // 9/90
        assert_eq!(s.lr_at(100), 0.0);
        assert_eq!(s.lr_at(130), 0.0); // max(0, -30/90)
    }

    #[test]
    fn cosine() {
        let s = sched(SchedulerType::Cosine, 5e-5);
        assert_eq!(s.lr_at(0), 0.0);
        assert!(close(s.lr_at(4), 2e-5)); // 4/10
        assert!(close(s.lr_at(10), 5e-5)); // cos(0) = 1
        assert!(close(s.lr_at(40), 3.75e-5)); // 0.5 (1 + cos(pi/3)) = 0.75
        assert!(close(s.lr_at(55), 2.5e-5)); // 0.5 (1 + cos(pi/2)) = 0.5
        assert!(close(s.lr_at(70), 1.25e-5)); // 0.5 (1 + cos(2pi/3)) = 0.25
        assert!(s.lr_at(100).abs() < 1e-20); // 0.5 (1 + cos(pi)) = 0
    }

    #[test]
    fn constant_and_constant_with_warmup() {
        let c = sched(SchedulerType::Constant, 1e-4);
        assert_eq!(c.lr_at(0), 1e-4);
        assert_eq!(c.lr_at(500), 1e-4);
        let w = sched(SchedulerType::ConstantWithWarmup, 1e-4);
        assert_eq!(w.lr_at(0), 0.0);
        assert!(close(w.lr_at(3), 3e-5));
        assert_eq!(w.lr_at(10), 1e-4);
        assert_eq!(w.lr_at(99), 1e-4);
    }

    #[test]
    fn polynomial() {
        let s = sched(SchedulerType::Polynomial, 1e-3);
        assert!(close(s.lr_at(5), 5e-4));
        assert!(close(s.lr_at(10), 1e-3)); // (1e-3 - 1e-7) * 1 + 1e-7
                                           // pct_remaining = 1 - 45/90 = 0.5: (1e-3 - 1e-7) * 0.5 + 1e-7
        assert!(close(s.lr_at(55), 5.0005e-4));
        assert!(close(s.lr_at(100), 1e-7));
        assert!(close(s.lr_at(150), 1e-7));
        let err = LrScheduler::new(SchedulerType::Polynomial, 1e-8, 100, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "lr_end (1e-07) must be smaller than initial lr (1e-08)"
        );
    }

    #[test]
    fn warmup_steps_from_ratio() {
        assert_eq!(num_warmup_steps(1000, 0, 0.1).unwrap(), 100);
        assert_eq!(num_warmup_steps(333, 0, 0.03).unwrap(), 10); // ceil(9.99)
        assert_eq!(num_warmup_steps(100, 0, 0.0).unwrap(), 0);
        assert_eq!(num_warmup_steps(1000, 7, 0.5).unwrap(), 7); // steps win
        let err = num_warmup_steps(10, 0, 1.5).unwrap_err().to_string();
        assert!(err.contains("--warmup_ratio"), "{err}");
    }

    #[test]
    fn stepping_and_round_trip() {
        let mut s = sched(SchedulerType::Cosine, 5e-5);
        for _ in 0..40 {
            s.step();
        }
        assert_eq!(s.last_lr(), s.lr_at(40));
        let dir = std::env::temp_dir().join(format!("llmtune-sched-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(SCHEDULER_NAME);
        s.save(&path).unwrap();
        let back = LrScheduler::load(&path).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.last_lr().to_bits(), s.last_lr().to_bits());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_parse() {
        for name in SchedulerType::NAMES {
            assert_eq!(name.parse::<SchedulerType>().unwrap().as_str(), name);
        }
        let err = "cosine_with_restarts".parse::<SchedulerType>().unwrap_err();
        assert!(err.to_string().contains("--lr_scheduler_type"));
    }
}
