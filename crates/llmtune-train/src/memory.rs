//! `--estimate_memory`: the expected peak memory of a training run, measured rather than
//! modelled.
//!
//! A formula for activation memory has to know every kernel's temporaries, the allocator and
//! the thread pool; it is wrong as soon as one of them changes. So the estimate runs what the
//! run would run: one optimizer step (forward, backward, AdamW) on a micro-batch of 1 row and
//! one of 2 rows, both made of the longest training example (every row of a real batch is
//! padded to its longest row, so this is the worst case), and reads the process's peak
//! resident memory (`VmHWM`) after each. Peak memory grows linearly in the rows of a
//! micro-batch, so
//!
//! `peak(b) = peak(1) + (b - 1) * (peak(2) - peak(1))`.
//!
//! Gradient accumulation does not change the peak (gradients are summed into fixed buffers);
//! evaluation runs forward only and needs less than a training step of the same size. The
//! largest batch that fits uses 90% of the memory available now (`MemAvailable` plus what this
//! process already holds). CPU (host memory) only.

use candle_core::Var;

use crate::error::{other, Error, Result};
use crate::optim::{AdamW, AdamWConfig};
use crate::trainer::{Task, TrainerConfig};

/// What `--estimate_memory` measured and concludes.
#[derive(Debug, Clone)]
pub struct MemoryEstimate {
    /// Tokens of the longest training example (the rows of the measured batches).
    pub row_tokens: usize,
    /// Peak RSS of a step of 1 row and of 2 rows, MB.
    pub peak_1_mb: f64,
    pub peak_2_mb: f64,
    /// The requested `--per_device_train_batch_size` and its expected peak, MB.
    pub batch: usize,
    pub expected_mb: f64,
    /// Memory available to this process now, MB (None where /proc/meminfo is missing).
    pub available_mb: Option<f64>,
    /// The largest micro-batch whose expected peak fits in 90% of `available_mb` (None when
    /// unknown, or when the measured growth per row is zero).
    pub max_batch: Option<usize>,
}

impl MemoryEstimate {
    /// Extra memory per row of a micro-batch, MB.
    pub fn per_row_mb(&self) -> f64 {
        (self.peak_2_mb - self.peak_1_mb).max(0.0)
    }

    /// The report printed by `--estimate_memory`.
    pub fn report(&self) -> String {
        let mut s = format!(
            "estimate_memory: expected peak {:.0} MB at --per_device_train_batch_size {} \
             (rows of {} tokens, the longest example; measured one optimizer step: {:.0} MB \
             at 1 row, {:.0} MB at 2 rows, +{:.0} MB per row)",
            self.expected_mb,
            self.batch,
            self.row_tokens,
            self.peak_1_mb,
            self.peak_2_mb,
            self.per_row_mb()
        );
        match (self.available_mb, self.max_batch) {
            (Some(a), Some(m)) => s.push_str(&format!(
                "\nestimate_memory: {a:.0} MB available; the largest --per_device_train_batch_size \
                 that fits in 90% of it is {m}{}",
                if m == 0 {
                    " (not even 1: shorten --max_source_length/--max_target_length, or use --gradient_checkpointing)"
                } else {
                    ""
                }
            )),
            (Some(a), None) => s.push_str(&format!(
                "\nestimate_memory: {a:.0} MB available; the measured growth per row is zero, so no batch limit follows"
            )),
            (None, _) => s.push_str("\nestimate_memory: available memory unknown (no /proc/meminfo)"),
        }
        s
    }
}

fn proc_kb(file: &str, key: &str) -> Option<f64> {
    std::fs::read_to_string(file).ok()?.lines().find_map(|l| {
        l.strip_prefix(key)?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<f64>()
            .ok()
    })
}

/// Peak resident memory of this process, MB.
fn peak_rss_mb() -> Result<f64> {
    proc_kb("/proc/self/status", "VmHWM:")
        .map(|kb| kb / 1024.0)
        .ok_or_else(|| {
            Error::InvalidArgument(
                "--estimate_memory reads the peak memory from /proc/self/status (Linux only)"
                    .into(),
            )
        })
}

/// Resets `VmHWM` to the current RSS (Linux `clear_refs` 5); a no-op where not permitted,
/// which only makes the 1-row figure include earlier peaks (e.g. model loading).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Pure arithmetic of the estimate, given the two measurements.
pub fn extrapolate(
    row_tokens: usize,
    peak_1_mb: f64,
    peak_2_mb: f64,
    batch: usize,
    available_mb: Option<f64>,
) -> MemoryEstimate {
    let per_row = (peak_2_mb - peak_1_mb).max(0.0);
    let expected_mb = peak_1_mb + batch.saturating_sub(1) as f64 * per_row;
    let max_batch = available_mb.and_then(|a| {
        let budget = 0.9 * a;
        if budget < peak_1_mb {
            Some(0)
        } else if per_row > 0.0 {
            Some(1 + ((budget - peak_1_mb) / per_row).floor() as usize)
        } else {
            None
        }
    });
    MemoryEstimate {
        row_tokens,
        peak_1_mb,
        peak_2_mb,
        batch,
        expected_mb,
        available_mb,
        max_batch,
    }
}

/// Runs the two measured steps. `lens[i]` is the longest row of training example `i`.
/// Changes the trainable variables (two optimizer steps): call it instead of training.
pub fn estimate(
    cfg: &TrainerConfig,
    vars: Vec<(String, Var)>,
    task: &mut dyn Task,
    lens: &[usize],
) -> Result<MemoryEstimate> {
    let (longest, &row_tokens) = lens
        .iter()
        .enumerate()
        .max_by_key(|(_, l)| **l)
        .ok_or_else(|| Error::InvalidArgument("no training samples".into()))?;
    let adam = AdamWConfig {
        lr: cfg.learning_rate,
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_epsilon,
        weight_decay: cfg.weight_decay,
    };
    let mut opt = AdamW::with_no_decay(vars.clone(), adam, crate::optim::is_no_decay_default)?;
    task.set_training(true);
    let mut peaks = [0.0f64; 2];
    for (rows, peak) in [1usize, 2].into_iter().zip(peaks.iter_mut()) {
        reset_peak();
        let batch = vec![longest; rows];
        let (lv, _, grads) = task.loss_and_grads(&batch, 1.0, &vars)?;
        let grads = grads.ok_or_else(|| {
            other(format!(
                "--estimate_memory: the loss of the measured step is {lv}"
            ))
        })?;
        opt.step(&grads)?;
        drop(grads);
        *peak = peak_rss_mb()?;
    }
    let rss_now = proc_kb("/proc/self/status", "VmRSS:").map(|kb| kb / 1024.0);
    let available =
        proc_kb("/proc/meminfo", "MemAvailable:").map(|kb| kb / 1024.0 + rss_now.unwrap_or(0.0));
    Ok(extrapolate(
        row_tokens,
        peaks[0],
        peaks[1],
        cfg.train_batch_size.max(1),
        available,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extrapolates_linearly_and_finds_the_largest_batch() {
        let e = extrapolate(300, 1000.0, 1200.0, 4, Some(4000.0));
        assert_eq!(e.expected_mb, 1600.0);
        // 90% of 4000 = 3600 = 1000 + 13 * 200 -> 14 rows.
        assert_eq!(e.max_batch, Some(14));
        assert!(
            e.report().contains("expected peak 1600 MB"),
            "{}",
            e.report()
        );
        assert!(e.report().contains("that fits in 90% of it is 14"));

        let tight = extrapolate(300, 1000.0, 1200.0, 1, Some(1000.0));
        assert_eq!(tight.max_batch, Some(0));
        assert!(tight.report().contains("not even 1"));

        let flat = extrapolate(300, 1000.0, 990.0, 8, Some(4000.0));
        assert_eq!(flat.per_row_mb(), 0.0);
        assert_eq!(flat.expected_mb, 1000.0);
        assert_eq!(flat.max_batch, None);
        assert!(extrapolate(1, 1.0, 2.0, 1, None)
            .report()
            .contains("unknown"));
    }
}
