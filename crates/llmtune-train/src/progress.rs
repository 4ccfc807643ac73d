//! Progress reporting: an indicatif bar on a terminal, plain lines otherwise.
//!
//! On a terminal (stderr is a TTY) [`Progress`] draws a bar with the step,
//! loss, learning rate, tokens/s and ETA. Otherwise (CI, `nohup`, a pipe) it
//! prints one plain line every `logging_steps` steps and at the last step:
//!
//! ```text
//! step 10/100 loss 2.345 lr 4.9e-05 tokens/s 1234 eta 0:01:23
//! ```

use std::io::{IsTerminal, Write};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::log::format_duration;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar if stderr is a terminal, plain lines otherwise.
    Auto,
    /// Always the bar (on stderr).
    Bar,
    /// Always plain lines.
    Plain,
    /// Nothing.
    Silent,
}

/// What happened in one optimizer step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepStats {
    /// Optimizer steps done, this one included.
    pub step: u64,
    /// Loss to show (e.g. the mean since the last log).
    pub loss: Option<f64>,
    /// Learning rate used.
    pub learning_rate: Option<f64>,
    /// Tokens processed by this step (all micro-batches).
    pub tokens: u64,
}

/// Python-style scientific notation with `digits` decimals: `4.9e-05`.
pub fn format_sci(x: f64, digits: usize) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let s = format!("{x:.digits$e}");
    let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let sign = if exp < 0 { '-' } else { '+' };
    format!("{mantissa}e{sign}{:02}", exp.abs())
}

/// The plain progress line (without newline); absent values are left out.
pub fn format_plain_line(
    step: u64,
    total_steps: u64,
    loss: Option<f64>,
    learning_rate: Option<f64>,
    tokens_per_second: f64,
    eta_secs: f64,
) -> String {
    let mut line = format!("step {step}/{total_steps}");
    if let Some(loss) = loss {
        line.push_str(&format!(" loss {loss:.3}"));
    }
    if let Some(lr) = learning_rate {
        line.push_str(&format!(" lr {}", format_sci(lr, 1)));
    }
    line.push_str(&format!(
        " tokens/s {:.0} eta {}",
        tokens_per_second,
        format_duration(eta_secs)
    ));
    line
}

/// A progress reporter for a run of `total_steps` optimizer steps.
pub struct Progress {
    total_steps: u64,
    logging_steps: u64,
    start_step: u64,
    started: Instant,
    tokens: u64,
    bar: Option<ProgressBar>,
    plain: Option<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("total_steps", &self.total_steps)
            .field("logging_steps", &self.logging_steps)
            .field("start_step", &self.start_step)
            .field("bar", &self.bar.is_some())
            .field("plain", &self.plain.is_some())
            .finish()
    }
}

impl Progress {
    /// A reporter in [`ProgressMode::Auto`]. `start_step` is the step the run
    /// starts from (non-zero when resuming; rates count from there).
    pub fn new(total_steps: u64, logging_steps: u64, start_step: u64) -> Self {
        Self::with_mode(total_steps, logging_steps, start_step, ProgressMode::Auto)
    }

    /// A reporter in the given mode (plain lines go to stderr).
    pub fn with_mode(
        total_steps: u64,
        logging_steps: u64,
        start_step: u64,
        mode: ProgressMode,
    ) -> Self {
        let mode = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
            ProgressMode::Auto => ProgressMode::Plain,
            m => m,
        };
        let mut p = Self::bare(total_steps, logging_steps, start_step);
        match mode {
            ProgressMode::Bar => {
                let bar =
                    ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr());
                if let Ok(style) = ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                ) {
                    bar.set_style(style);
                }
                bar.set_position(start_step);
                p.bar = Some(bar);
            }
            ProgressMode::Plain => p.plain = Some(Box::new(std::io::stderr())),
            ProgressMode::Silent | ProgressMode::Auto => {}
        }
        p
    }

    /// A reporter writing plain lines to `out` (a log file, or a buffer in
    /// tests).
    pub fn with_writer(
        total_steps: u64,
        logging_steps: u64,
        start_step: u64,
        out: Box<dyn Write + Send>,
    ) -> Self {
        let mut p = Self::bare(total_steps, logging_steps, start_step);
        p.plain = Some(out);
        p
    }

    fn bare(total_steps: u64, logging_steps: u64, start_step: u64) -> Self {
        Progress {
            total_steps,
            logging_steps: logging_steps.max(1),
            start_step,
            started: Instant::now(),
            tokens: 0,
            bar: None,
            plain: None,
        }
    }

    /// Tokens per second since the reporter was created.
    pub fn tokens_per_second(&self) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        if secs > 0.0 {
            self.tokens as f64 / secs
        } else {
            0.0
        }
    }

    /// Estimated seconds left for the remaining steps, from the mean time
    /// per step of this run.
    pub fn eta_secs(&self, step: u64) -> f64 {
        let done = step.saturating_sub(self.start_step);
        if done == 0 {
            return 0.0;
        }
        let per_step = self.started.elapsed().as_secs_f64() / done as f64;
        self.total_steps.saturating_sub(step) as f64 * per_step
    }

    /// Report a finished optimizer step. In plain mode, returns the line
    /// written (every `logging_steps` steps and at the last step).
    pub fn update(&mut self, stats: &StepStats) -> Option<String> {
        self.tokens += stats.tokens;
        let tps = self.tokens_per_second();
        if let Some(bar) = &self.bar {
            bar.set_position(stats.step);
            let mut msg = String::new();
            if let Some(loss) = stats.loss {
                msg.push_str(&format!("loss {loss:.3} "));
            }
            if let Some(lr) = stats.learning_rate {
                msg.push_str(&format!("lr {} ", format_sci(lr, 1)));
            }
            msg.push_str(&format!("tok/s {tps:.0}"));
            bar.set_message(msg);
        }
        let due = stats.step % self.logging_steps == 0 || stats.step == self.total_steps;
        if !due {
            return None;
        }
        let eta = self.eta_secs(stats.step);
        let out = self.plain.as_mut()?;
        let line = format_plain_line(
            stats.step,
            self.total_steps,
            stats.loss,
            stats.learning_rate,
            tps,
            eta,
        );
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
        Some(line)
    }

    /// Print a message without breaking the bar.
    pub fn println(&mut self, msg: &str) {
        if let Some(bar) = &self.bar {
            bar.println(msg);
        } else if let Some(out) = self.plain.as_mut() {
            let _ = writeln!(out, "{msg}");
        }
    }

    /// Finish the bar (leaves it on screen).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn plain_line_format() {
        assert_eq!(
            format_plain_line(10, 100, Some(2.3454), Some(4.9e-5), 1234.4, 83.7),
            "step 10/100 loss 2.345 lr 4.9e-05 tokens/s 1234 eta 0:01:23"
        );
        assert_eq!(
            format_plain_line(3, 3, None, None, 0.0, 0.0),
            "step 3/3 tokens/s 0 eta 0:00:00"
        );
        assert_eq!(format_sci(1e-3, 1), "1.0e-03");
        assert_eq!(format_sci(123456.0, 2), "1.23e+05");
    }

    #[test]
    fn plain_lines_every_logging_steps_and_at_the_end() {
        let buf = Buf::default();
        let mut p = Progress::with_writer(7, 3, 0, Box::new(buf.clone()));
        let mut printed = Vec::new();
        for step in 1..=7 {
            let line = p.update(&StepStats {
                step,
                loss: Some(1.0),
                learning_rate: Some(1e-4),
                tokens: 100,
            });
            if let Some(l) = line {
                printed.push(l);
            }
        }
        let steps: Vec<&str> = printed
            .iter()
            .map(|l| l.split(' ').nth(1).unwrap())
            .collect();
        assert_eq!(steps, ["3/7", "6/7", "7/7"]);
        assert!(printed[0].starts_with("step 3/7 loss 1.000 lr 1.0e-04 tokens/s "));
        let written = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(written.lines().collect::<Vec<_>>(), printed);
    }
}
