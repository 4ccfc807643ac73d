//! `llmtune train`: stages sft, rm, ppo (not yet implemented).

use std::process::ExitCode;

/// Arguments are those of ChatGLM-Efficient-Tuning's `train_bash.py`.
#[derive(clap::Args, Debug)]
pub struct TrainCmd {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

pub fn run(_a: TrainCmd) -> anyhow::Result<ExitCode> {
    super::stub::not_yet("train")
}
